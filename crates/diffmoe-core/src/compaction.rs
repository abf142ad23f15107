//! Compaction of a mask: the indices of each row's true entries moved to the
//! front of the row, on the device.
//!
//! Routers select tokens as a `[rows, n]` mask (the threshold test of dynamic
//! routing, the counting top-k of `counting_select`, token choice's
//! assignments) and process them as a fixed number of slots per expert. A
//! prefix count gives each true entry its slot, a scatter writes its index
//! there: no sort and no host read.

use burn::tensor::{backend::Backend, Bool, IndexingUpdateOp, Int, Tensor};

/// The indices of each row's true entries, in increasing order, then zeros:
/// the first `min(#true, slots)` of each row. The zeros are real indices:
/// a caller weights those slots by zero.
///
/// # Shapes
/// - `mask`: `[rows, n]` -> `[rows, slots]`
pub(crate) fn compact<B: Backend>(mask: Tensor<B, 2, Bool>, slots: usize) -> Tensor<B, 2, Int> {
    let [rows, n] = mask.dims();
    let device = mask.device();
    // Slot of each true entry; false entries and overflow go to a spare slot.
    let slot = prefix_sum(mask.clone().int()).sub_scalar(1);
    let spare = mask.clone().bool_not().bool_or(slot.clone().greater_equal_elem(slots as i64));
    let slot = slot.mask_fill(spare.clone(), slots as i64);
    let index = Tensor::<B, 1, Int>::arange(0..n as i64, &device).reshape([1, n]).repeat_dim(0, rows);
    let index = index.mask_fill(spare, 0); // the spare slot only ever adds zeros
    Tensor::<B, 2, Int>::zeros([rows, slots + 1], &device)
        .scatter(1, slot, index, IndexingUpdateOp::Add)
        .narrow(1, 0, slots)
}

/// `1` in the first `counts[r]` of row `r`'s `slots` slots, `0` after: the
/// slots of a compacted row that hold its entries.
///
/// # Shapes
/// - `counts`: `[rows]` -> `[rows, slots]`
pub(crate) fn filled_slots<B: Backend>(counts: Tensor<B, 1, Int>, slots: usize) -> Tensor<B, 2> {
    let slot = Tensor::<B, 1, Int>::arange(0..slots as i64, &counts.device()).unsqueeze_dim::<2>(0); // [1, slots]
    slot.lower(counts.unsqueeze_dim(1)).float()
}

/// Inclusive prefix sums along each row, in two levels: within blocks of
/// about `sqrt(n)` entries, then across the blocks' totals. burn's GPU
/// `cumsum` reads every earlier entry for each output (`O(n^2)` per row);
/// this reads `O(sqrt(n))` per output.
///
/// # Shapes
/// - `x`: `[rows, n]` -> `[rows, n]`
pub(crate) fn prefix_sum<B: Backend>(x: Tensor<B, 2, Int>) -> Tensor<B, 2, Int> {
    let [rows, n] = x.dims();
    let block = (n as f64).sqrt().ceil().max(1.0) as usize;
    if n <= 2 * block {
        return x.cumsum(1);
    }
    let blocks = n.div_ceil(block);
    let padded = match blocks * block - n {
        0 => x,
        pad => Tensor::cat(vec![x.clone(), Tensor::zeros([rows, pad], &x.device())], 1),
    };
    let within = padded.reshape([rows, blocks, block]).cumsum(2); // [rows, blocks, block]
    let totals = within.clone().narrow(2, block - 1, 1); // [rows, blocks, 1]
    let before = totals.clone().cumsum(1) - totals; // exclusive prefix of the block totals
    (within + before).reshape([rows, blocks * block]).narrow(1, 0, n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, TensorData};

    type B = Flex;

    #[test]
    fn compacts_true_entries_to_the_front_in_order() {
        let mask = Tensor::<B, 2, Bool>::from_data(
            TensorData::from([[false, true, false, true, true], [false; 5], [true; 5]]),
            &Default::default(),
        );
        let got = compact(mask.clone(), 4).into_data().convert::<i64>().to_vec::<i64>().unwrap();
        assert_eq!(got, vec![1, 3, 4, 0, 0, 0, 0, 0, 0, 1, 2, 3]);
        let got = compact(mask, 2).into_data().convert::<i64>().to_vec::<i64>().unwrap();
        assert_eq!(got, vec![1, 3, 0, 0, 0, 1]);
        let counts = Tensor::<B, 1, Int>::from_data(TensorData::from([3i64, 0, 4]), &Default::default());
        let filled = filled_slots(counts, 4).into_data().to_vec::<f32>().unwrap();
        assert_eq!(filled, vec![1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn prefix_sum_equals_cumsum_at_every_length() {
        let device = Default::default();
        for n in [1, 2, 3, 8, 9, 10, 63, 100, 1001] {
            let x = Tensor::<B, 2>::random([3, n], Distribution::Uniform(0.0, 5.0), &device).int();
            let got = prefix_sum(x.clone()).into_data().convert::<i64>().to_vec::<i64>().unwrap();
            let expected = x.cumsum(1).into_data().convert::<i64>().to_vec::<i64>().unwrap();
            assert_eq!(got, expected, "n = {n}");
        }
    }
}
