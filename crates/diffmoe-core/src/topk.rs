//! Top-k along the last axis, the selection step of every router.
//!
//! burn's `topk_with_indices` sorts the whole axis, and on GPU backends its
//! sort reads the tensor back to the host. On the CPU backend this selects
//! the `k` largest of each row first (`cpu_kernels::topk_rows`), a few times
//! faster at the pool sizes of DiffMoE; on every other backend the routers'
//! selections run on the device by counting ([`counting_select`]), with no
//! host synchronisation. Values come back without autodiff history: routers
//! take indices from detached scores and gather the differentiable weights
//! themselves.

use burn::tensor::{backend::Backend, DType, Int, Tensor, TensorData};

use crate::compaction::compact;
use crate::counting_select::{kth_largest, top_k_mask};
use crate::cpu_kernels;
use crate::fused::{cpu_values, is_cpu};

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

/// The indices of the `k` largest entries along the last axis, as a set:
/// in descending order of value on the CPU backend, in increasing index
/// order on others. Ties go to the lower index.
///
/// # Shapes
/// - `x`: `[..., n]` -> `[..., k]`
///
/// # Panics
/// If `k > n`.
pub(crate) fn top_k_indices<B: Backend, const D: usize>(x: Tensor<B, D>, k: usize) -> Tensor<B, D, Int> {
    if on_cpu_kernel(&x) {
        return topk_last(x, k).1;
    }
    let mut dims = x.dims();
    let n = dims[D - 1];
    assert!(k <= n, "top-{k} of an axis of {n}");
    let rows = dims[..D - 1].iter().product::<usize>();
    let x = x.reshape([rows, n]);
    let mask = top_k_mask(x.clone(), Tensor::full([rows, 1], k as i64, &x.device()));
    dims[D - 1] = k;
    compact(mask, k).reshape(dims)
}

/// For each row `r`, its `counts[r]` largest entries in its first
/// `counts[r]` slots (any order), then padding: more entries in descending
/// order on the CPU backend, index 0 on others.
///
/// # Shapes
/// - `x`: `[rows, n]`, `counts`: `[rows]` with `counts[r] <= slots <= n` -> `[rows, slots]`
pub(crate) fn top_counts_indices<B: Backend>(
    x: Tensor<B, 2>,
    counts: Tensor<B, 1, Int>,
    slots: usize,
) -> Tensor<B, 2, Int> {
    if on_cpu_kernel(&x) {
        return topk_last(x, slots).1;
    }
    let [rows, _] = x.dims();
    compact(top_k_mask(x, counts.reshape([rows, 1])), slots)
}

/// The k-th largest entry of each row.
///
/// # Shapes
/// - `x`: `[rows, n]` -> `[rows]`
///
/// # Panics
/// If `k` is 0 or larger than `n`.
pub(crate) fn kth_largest_rows<B: Backend>(x: Tensor<B, 2>, k: usize) -> Tensor<B, 1> {
    let [rows, n] = x.dims();
    assert!(k >= 1 && k <= n, "the k-th largest of {n} entries needs 1 <= k <= {n}, got k = {k}");
    if on_cpu_kernel(&x) {
        return topk_last(x, k).0.narrow(1, k - 1, 1).reshape([rows]);
    }
    kth_largest(x, k)
}

/// Whether `x` goes to `cpu_kernels::topk_rows`.
fn on_cpu_kernel<B: Backend, const D: usize>(x: &Tensor<B, D>) -> bool {
    is_cpu::<B>() && x.dtype() == DType::F32
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
