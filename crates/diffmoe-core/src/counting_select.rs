//! Top-k selection by counting, for backends without a device sort.
//!
//! burn 0.21 sorts on GPU backends by reading the tensor back to the host
//! (`burn_backend::ops::sort_with_indices`), and its `topk_with_indices`
//! is such a sort: a host synchronisation, a copy each way and a CPU sort of
//! the whole `[n_experts, S]` pool in every routed layer. Here the k-th
//! largest entry of each row is bracketed on the device instead, by counting:
//! each round compares the row with [`CANDIDATES`] thresholds evenly spaced in
//! the current bracket and keeps the sub-interval where the count crosses
//! `k`. The entries above the bracket are taken, and the rest of the `k` from
//! the bracket in index order ([`top_k_mask`]); callers compact the mask
//! into indices with [`crate::compaction`]. Only elementwise ops,
//! reductions, `gather`, `scatter` and prefix sums: no host read.
//!
//! The selection is exact (the `k` largest, ties by lower index, as the CPU
//! kernel) whenever the bracket has narrowed to entries of one value, which
//! [`ROUNDS`] rounds guarantee unless two distinct entries at the k-th place
//! lie closer than `2^-48` of the row's range. Inputs must be finite.

use burn::tensor::{backend::Backend, Bool, Int, Tensor};

use crate::compaction::prefix_sum;

/// Thresholds tested per round: each round narrows the bracket 16-fold.
const CANDIDATES: usize = 15;
/// Rounds: the bracket ends at most `16^-12 = 2^-48` of the row's range wide.
const ROUNDS: usize = 12;

/// Per row, thresholds `lo <= hi` with `#{x >= lo} >= k` and `#{x > hi} < k`:
/// the k-th largest entry lies in `[lo, hi]`.
///
/// # Shapes
/// - `x`: `[rows, n]`, `k`: `[rows, 1]` with `1 <= k <= n` -> `([rows, 1], [rows, 1])`
fn bracket<B: Backend>(x: &Tensor<B, 2>, k: &Tensor<B, 2, Int>) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let [rows, n] = x.dims();
    let device = x.device();
    // Fractions (j + 1) / (CANDIDATES + 1) of the bracket, j < CANDIDATES.
    let steps = Tensor::<B, 1, Int>::arange(1..CANDIDATES as i64 + 1, &device)
        .float()
        .div_scalar((CANDIDATES + 1) as f64)
        .reshape([1, CANDIDATES]);
    let column = x.clone().reshape([rows, n, 1]);
    let mut lo = x.clone().min_dim(1);
    let mut hi = x.clone().max_dim(1);
    for _ in 0..ROUNDS {
        // [rows, C] candidates, [rows, n, C] comparisons, then [rows, C]
        // counts of the entries at or above each candidate. The counts fall
        // with the threshold, so the candidates that keep at least k entries
        // are a prefix; its length picks the sub-interval.
        let candidates = lo.clone() + (hi.clone() - lo.clone()) * steps.clone();
        let above = column.clone().greater_equal(candidates.clone().reshape([rows, 1, CANDIDATES]));
        let counts = above.int().sum_dim(1).reshape([rows, CANDIDATES]);
        let kept = counts.greater_equal(k.clone()).int().sum_dim(1); // [rows, 1]
        let ends = Tensor::cat(vec![lo, candidates, hi], 1); // [rows, C + 2]
        lo = ends.clone().gather(1, kept.clone());
        hi = ends.gather(1, kept.add_scalar(1));
    }
    (lo, hi)
}

/// The `k[r]` largest entries of each row: a mask with exactly `k[r]` true
/// entries in row `r` (for `0 <= k[r] <= n`), ties by lower index.
///
/// # Shapes
/// - `x`: `[rows, n]`, `k`: `[rows, 1]` -> `[rows, n]`
pub(crate) fn top_k_mask<B: Backend>(x: Tensor<B, 2>, k: Tensor<B, 2, Int>) -> Tensor<B, 2, Bool> {
    let x = x.detach();
    let (lo, hi) = bracket(&x, &k);
    let above = x.clone().greater(hi.clone()); // [rows, n]: all taken
    let inside = x.clone().greater_equal(lo).bool_and(x.lower_equal(hi)); // [rows, n]
    let missing = k - above.clone().int().sum_dim(1); // [rows, 1]
    let rank = prefix_sum(inside.clone().int()); // [rows, n], 1-based within the bracket
    above.bool_or(inside.bool_and(rank.lower_equal(missing)))
}

/// The k-th largest entry of each row (for `1 <= k <= n`).
///
/// # Shapes
/// - `x`: `[rows, n]` -> `[rows]`
pub(crate) fn kth_largest<B: Backend>(x: Tensor<B, 2>, k: usize) -> Tensor<B, 1> {
    let [rows, _] = x.dims();
    let x = x.detach();
    let k = Tensor::<B, 2, Int>::full([rows, 1], k as i64, &x.device());
    let (lo, hi) = bracket(&x, &k);
    // The bracket holds the k-th entry; once narrowed to one value, its largest entry is it.
    let outside = x.clone().lower(lo).bool_or(x.clone().greater(hi));
    x.mask_fill(outside, f32::NEG_INFINITY).max_dim(1).reshape([rows])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_kernels::topk_rows;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, TensorData};

    type B = Flex;

    fn ks(rows: &[i64]) -> Tensor<B, 2, Int> {
        Tensor::from_data(TensorData::new(rows.to_vec(), [rows.len(), 1]), &Default::default())
    }

    fn mask_rows(mask: Tensor<B, 2, Bool>) -> Vec<Vec<usize>> {
        let [rows, n] = mask.dims();
        let bits = mask.into_data().to_vec::<bool>().unwrap();
        (0..rows).map(|r| (0..n).filter(|&i| bits[r * n + i]).collect()).collect()
    }

    /// The CPU kernel's selection, as sorted index sets.
    fn reference(x: &[f32], n: usize, k: &[i64]) -> Vec<Vec<usize>> {
        k.iter()
            .enumerate()
            .map(|(r, &k)| {
                let (_, idx) = topk_rows(&x[r * n..(r + 1) * n], n, k as usize);
                let mut idx: Vec<usize> = idx.into_iter().map(|i| i as usize).collect();
                idx.sort();
                idx
            })
            .collect()
    }

    #[test]
    fn selects_the_k_largest_like_the_cpu_kernel() {
        let device = Default::default();
        for (rows, n) in [(3, 1), (4, 7), (16, 1024), (2, 5000)] {
            // Softmax-like scores: positive, spanning e^8. The selection is
            // exact while no two distinct entries at the k-th place lie
            // closer than 2^-48 of the row's range, which f32 guarantees for
            // entries above 2^-25 of it (normal scores, exp(4 N(0, 1)) over
            // thousands of entries, span e^30 and failed one run in ten).
            let x = Tensor::<B, 2>::random([rows, n], Distribution::Uniform(-1.0, 1.0), &device);
            let x = x.clone().mul_scalar(4.0).exp() / x.mul_scalar(4.0).exp().sum_dim(1);
            let values = x.to_data().to_vec::<f32>().unwrap();
            let k: Vec<i64> = (0..rows).map(|r| ((r * 37 + 5) % (n + 1)) as i64).collect();
            let got = mask_rows(top_k_mask(x.clone(), ks(&k)));
            assert_eq!(got, reference(&values, n, &k), "rows {rows}, n {n}");
            for kk in [1, n] {
                let expected = reference(&values, n, &vec![kk as i64; rows]);
                let kth: Vec<f32> = kth_largest(x.clone(), kk).into_data().to_vec().unwrap();
                for r in 0..rows {
                    let min = expected[r].iter().map(|&i| values[r * n + i]).fold(f32::INFINITY, f32::min);
                    assert_eq!(kth[r], min, "k-th largest of row {r}, k {kk}");
                }
            }
        }
    }

    #[test]
    fn ties_go_to_the_lower_index_and_equal_rows_work() {
        let x = Tensor::<B, 2>::from_data(
            TensorData::from([
                [0.5f32, 0.2, 0.5, 0.9, 0.5, 0.2],
                [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                [-1.0, 0.3, -1.0, 0.3, 0.1, -1.0],
            ]),
            &Default::default(),
        );
        let k = [3, 4, 2];
        let got = mask_rows(top_k_mask(x.clone(), ks(&k)));
        let values = x.to_data().to_vec::<f32>().unwrap();
        assert_eq!(got, vec![vec![0, 2, 3], vec![0, 1, 2, 3], vec![1, 3]]);
        assert_eq!(got, reference(&values, 6, &k));
        let kth: Vec<f32> = kth_largest(x, 5).into_data().to_vec().unwrap();
        assert_eq!(kth, vec![0.2, 1.0, -1.0]);
    }
}
