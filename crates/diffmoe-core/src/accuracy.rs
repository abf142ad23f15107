//! Test support: an f32 result judged by its error from the exact value, as
//! large as burn's own f32 ops make it.
//!
//! Two f32 computations of one reduction (a bias gradient summed over rows,
//! a LayerNorm's mean, attention's backward step) summed in different
//! orders differ by their rounding, which scales with the terms and the
//! length of the sum, not with the result: a fixed tolerance between them
//! fails on some random draws. So the op under test is compared with the
//! same burn ops run in f64 (the exact value, up to f64 rounding), and
//! passes when its root-mean-square error is at most [`FACTOR`] times that
//! of the burn ops in f32, as FlashAttention's tests judge their kernels by
//! PyTorch's error. The mean square over the elements is a steady scale
//! where the largest error of either is not.

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};

/// How many times burn's f32 error the op under test may err by.
const FACTOR: f64 = 4.0;

/// A floor in units of f32's epsilon times the exact values' root mean
/// square, for results that burn's ops happen to round exactly.
const FLOOR_EPSILONS: f64 = 4.0;

/// The error allowed a sum, in units of f32's epsilon times the sum of its
/// terms' magnitudes: far above its rounding in any order (well under one
/// epsilon on random terms), far below a term gone missing.
const SUM_EPSILONS: f64 = 64.0;

/// `t` cast to f64: burn's ops on it give the value an f32 result approximates.
pub(crate) fn in_f64<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    t.cast(DType::F64)
}

/// Asserts that the root-mean-square error of `ours` from `exact` is at
/// most [`FACTOR`] times that of `ops` (burn's f32 ops), or
/// [`FLOOR_EPSILONS`] f32 epsilons of the exact values' root mean square.
///
/// # Panics
/// If the shapes differ or `ours` errs by more, naming `what`.
pub(crate) fn assert_as_accurate(what: &str, ours: &TensorData, ops: &TensorData, exact: &TensorData) {
    assert_eq!(ours.shape, exact.shape, "{what}: shape");
    assert_eq!(ops.shape, exact.shape, "{what}: shape of the ops' result");
    let exact: Vec<f64> = exact.iter::<f64>().collect();
    let rms = |values: &mut dyn Iterator<Item = f64>| (values.map(|v| v * v).sum::<f64>() / exact.len() as f64).sqrt();
    let error = |data: &TensorData| rms(&mut data.iter::<f64>().zip(&exact).map(|(value, exact)| value - exact));
    let (ours, ops) = (error(ours), error(ops));
    let bound = (FACTOR * ops).max(FLOOR_EPSILONS * f64::from(f32::EPSILON) * rms(&mut exact.iter().copied()));
    assert!(
        ours <= bound,
        "{what}: root-mean-square error {ours:e} from the exact value, against {bound:e} (burn's f32 ops: {ops:e})"
    );
}

/// [`assert_as_accurate`] on each result of an op (its output and its
/// gradients), named by `whats`.
///
/// # Panics
/// If the counts differ, or as [`assert_as_accurate`].
pub(crate) fn assert_each_as_accurate(whats: &[&str], ours: &[TensorData], ops: &[TensorData], exact: &[TensorData]) {
    assert!(ours.len() == whats.len() && ops.len() == whats.len() && exact.len() == whats.len(), "{whats:?}: counts");
    for (i, what) in whats.iter().enumerate() {
        assert_as_accurate(what, &ours[i], &ops[i], &exact[i]);
    }
}

/// Asserts that each element of `ours` errs from `exact` by at most
/// [`SUM_EPSILONS`] f32 epsilons of `magnitudes`, the same sum over the
/// terms' absolute values: for results of a few elements, where the largest
/// error of burn's ops is too noisy a scale.
///
/// # Panics
/// If the shapes differ or an element errs by more, naming `what`.
pub(crate) fn assert_sum_accurate(what: &str, ours: &TensorData, exact: &TensorData, magnitudes: &TensorData) {
    assert_eq!(ours.shape, exact.shape, "{what}: shape");
    assert_eq!(magnitudes.shape, exact.shape, "{what}: shape of the magnitudes");
    let elements = ours.iter::<f64>().zip(exact.iter::<f64>()).zip(magnitudes.iter::<f64>());
    for (i, ((value, exact), magnitude)) in elements.enumerate() {
        let bound = SUM_EPSILONS * f64::from(f32::EPSILON) * magnitude;
        assert!((value - exact).abs() <= bound, "{what}, element {i}: {value} against {exact} (bound {bound:e})");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn_flex::Flex;
    use std::panic::{catch_unwind, AssertUnwindSafe};

    fn data(values: &[f32]) -> TensorData {
        TensorData::new(values.to_vec(), [values.len()])
    }

    #[test]
    fn the_bound_is_burns_error_times_the_factor() {
        let exact = TensorData::new(vec![1.0f64, -2.0], [2]);
        // burn's root-mean-square error: 0.001 / sqrt(2).
        let ops = data(&[1.001, -2.0]);
        assert_as_accurate("within", &data(&[1.002, -2.002]), &ops, &exact);
        let outside =
            catch_unwind(AssertUnwindSafe(|| assert_as_accurate("outside", &data(&[1.0, -2.0045]), &ops, &exact)));
        assert!(outside.is_err());
        // Exact ops: the floor, a few epsilons of the values' size.
        let exact_ops = data(&[1.0, -2.0]);
        assert_as_accurate("floor", &data(&[1.0 + 4.0 * f32::EPSILON, -2.0]), &exact_ops, &exact);
        let outside =
            catch_unwind(AssertUnwindSafe(|| assert_as_accurate("floor", &data(&[1.0, -2.0001]), &exact_ops, &exact)));
        assert!(outside.is_err());
    }

    #[test]
    fn a_sum_is_bounded_by_its_magnitude() {
        let exact = TensorData::new(vec![0.0f64, 5.0], [2]);
        let magnitudes = TensorData::new(vec![1000.0f64, 5.0], [2]);
        assert_sum_accurate("within", &data(&[0.007, 5.0]), &exact, &magnitudes);
        let outside = catch_unwind(AssertUnwindSafe(|| {
            assert_sum_accurate("outside", &data(&[0.0, 5.0001]), &exact, &magnitudes)
        }));
        assert!(outside.is_err());
    }

    #[test]
    fn in_f64_keeps_the_values() {
        let x = Tensor::<Flex, 1>::from_data(data(&[0.1, 3.0e7]), &Default::default());
        let wide = in_f64(x).into_data();
        assert_eq!(wide.dtype, DType::F64);
        assert_eq!(wide.to_vec::<f64>().unwrap(), [f64::from(0.1f32), 3.0e7]);
    }
}
