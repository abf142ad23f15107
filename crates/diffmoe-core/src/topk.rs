//! Top-k along the last axis, the selection step of every router.
//!
//! burn's `topk_with_indices` sorts the whole axis; on the CPU backend this
//! selects the `k` largest of each row first (`cpu_kernels::topk_rows`), a
//! few times faster at the pool sizes of DiffMoE. Elsewhere burn's op runs.
//! Values come back without autodiff history: routers take indices from
//! detached scores and gather the differentiable weights themselves.

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

use crate::cpu_kernels;
use crate::fused::cpu_values;

/// The `k` largest entries along the last axis, in descending order, and
/// their indices. Ties go to the lower index on the CPU backend (burn's sort
/// leaves them unspecified).
///
/// # Shapes
/// - `x`: `[..., n]` -> `([..., k], [..., k])`
///
/// # Panics
/// If `k > n`.
pub fn topk_last<B: Backend, const D: usize>(x: Tensor<B, D>, k: usize) -> (Tensor<B, D>, Tensor<B, D, Int>) {
    let mut dims = x.dims();
    let n = dims[D - 1];
    assert!(k <= n, "top-{k} of an axis of {n}");
    let Some(values) = cpu_values(&x) else {
        let (values, indices) = x.detach().topk_with_indices(k, D - 1);
        return (values, indices);
    };
    let device = x.device();
    dims[D - 1] = k;
    let (top, indices) = if n == 0 { (Vec::new(), Vec::new()) } else { cpu_kernels::topk_rows(values.storage(), n, k) };
    (Tensor::from_data(TensorData::new(top, dims), &device), Tensor::from_data(TensorData::new(indices, dims), &device))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::Distribution;

    #[test]
    fn equals_burns_topk_on_distinct_values() {
        let device = Default::default();
        let x = Tensor::<Autodiff<Flex>, 3>::random([2, 3, 50], Distribution::Normal(0.0, 1.0), &device).require_grad();
        for k in [1, 7, 50] {
            let (v, i) = topk_last(x.clone().swap_dims(1, 2).swap_dims(1, 2), k);
            let (v_ref, i_ref) = x.clone().detach().topk_with_indices(k, 2);
            v.into_data().assert_eq(&v_ref.into_data(), true);
            i.into_data().assert_eq(&i_ref.into_data(), true);
        }
    }
}
