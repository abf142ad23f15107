//! One row per group, lined up with the items of its group: the adaLN
//! vectors of a sample over its tokens, the biases of an expert over the
//! tokens it processes.

use burn::tensor::{backend::Backend, Tensor};

use crate::fused::is_cpu;

/// `v` broadcast along a new middle axis of length `n`.
///
/// On GPU backends this is a free stride-0 view. burn-flex runs a binary op
/// whose operand has a stride-0 axis between two real ones through a scalar
/// strided iterator, several times slower than its SIMD path, so on Flex the
/// rows are copied out once instead: the same numbers, one more buffer.
///
/// # Shapes
/// - `v`: `[groups, width]` -> `[groups, n, width]` (on backends other than
///   Flex, `[groups, 1, width]`, which broadcasts to it)
pub fn broadcast_middle<B: Backend>(v: Tensor<B, 2>, n: usize) -> Tensor<B, 3> {
    let v = v.unsqueeze_dim::<3>(1);
    if is_cpu::<B>() {
        v.repeat_dim(1, n)
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};

    #[test]
    fn adds_each_row_to_its_group_and_sums_gradients_back() {
        let device = Default::default();
        let x =
            Tensor::<Autodiff<Flex>, 3>::from_floats([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], [[0.0; 2]; 3]], &device);
        let v = Tensor::<Autodiff<Flex>, 2>::from_floats([[10.0, 20.0], [-1.0, -2.0]], &device).require_grad();
        let y = x + broadcast_middle(v.clone(), 3);
        let expected = [[[11.0, 22.0], [13.0, 24.0], [15.0, 26.0]], [[-1.0, -2.0]; 3]];
        y.to_data().assert_eq(&Tensor::<Flex, 3>::from_floats(expected, &device).to_data(), true);
        let grads = y.sum().backward();
        let g = v.grad(&grads).unwrap();
        g.to_data().assert_eq(&Tensor::<Flex, 2>::from_floats([[3.0, 3.0], [3.0, 3.0]], &device).to_data(), true);
    }
}
