//! Improved precision and recall (Kynkaanniemi et al., 2019, "Improved
//! Precision and Recall Metric for Assessing Generative Models"; the
//! `ManifoldEstimator` of the ADM evaluator): each set of features spans a
//! manifold, the union of balls around its points whose radius is the
//! distance to the point's k-th nearest neighbour in the same set (the point
//! itself not counted). Precision is the fraction of generated samples
//! inside the real manifold (fidelity), recall the fraction of real samples
//! inside the generated one (diversity).
//!
//! Distances are computed on the device in blocks of rows
//! (`|a|^2 + |b|^2 - 2 a.b`), so memory grows with `block x n`, never `n x n`.

use burn::tensor::{backend::Backend, Tensor, TensorData};

/// The ADM evaluator's neighbourhood size.
pub const DEFAULT_K: usize = 3;

/// Rows of distances held at once.
const BLOCK: usize = 1024;

/// Precision and recall of generated features against real ones.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PrecisionRecall {
    /// Fraction of generated samples within the real manifold.
    pub precision: f64,
    /// Fraction of real samples within the generated manifold.
    pub recall: f64,
    /// The neighbourhood size.
    pub k: usize,
}

/// Features of one set, `[n, d]` row-major, on the device.
fn to_device<B: Backend>(values: &[f32], d: usize, device: &B::Device) -> Tensor<B, 2> {
    assert!(d > 0 && values.len().is_multiple_of(d), "{} values are not rows of {d} features", values.len());
    Tensor::from_data(TensorData::new(values.to_vec(), [values.len() / d, d]), device)
}

/// Squared distances between the rows of `a` and of `b`, clamped at 0.
///
/// # Shapes
/// - `a`: `[m, d]`, `b`: `[n, d]`, `b_norms`: `[1, n]` -> `[m, n]`
fn squared_distances<B: Backend>(a: Tensor<B, 2>, b: &Tensor<B, 2>, b_norms: &Tensor<B, 2>) -> Tensor<B, 2> {
    let a_norms = a.clone().powi_scalar(2).sum_dim(1); // [m, 1]
    let dot = a.matmul(b.clone().transpose()); // [m, n]
    (a_norms + b_norms.clone() - dot.mul_scalar(2.0)).clamp_min(0.0)
}

/// The squared radius of every point: its squared distance to its `k`-th
/// nearest neighbour in the set (itself excluded).
///
/// # Shapes
/// - `x`: `[n, d]` -> `[1, n]`
fn radii<B: Backend>(x: &Tensor<B, 2>, k: usize) -> Tensor<B, 2> {
    let [n, _] = x.dims();
    assert!(k < n, "a manifold of {n} points has no {k}-th neighbour besides each point");
    let norms = x.clone().powi_scalar(2).sum_dim(1).transpose(); // [1, n]
    let mut out = Vec::with_capacity(n.div_ceil(BLOCK));
    for start in (0..n).step_by(BLOCK) {
        let rows = x.clone().narrow(0, start, BLOCK.min(n - start));
        let d = squared_distances(rows, x, &norms); // [block, n]
                                                    // The k + 1 smallest include the point itself (distance 0).
        let (smallest, _) = d.neg().topk_with_indices(k + 1, 1); // [block, k + 1], descending
        out.push(smallest.narrow(1, k, 1).neg()); // [block, 1]
    }
    Tensor::cat(out, 0).transpose()
}

/// The fraction of `queries` within the manifold of `points` (radii `radii`).
///
/// # Shapes
/// - `queries`: `[m, d]`, `points`: `[n, d]`, `radii`: `[1, n]`
fn coverage<B: Backend>(queries: &Tensor<B, 2>, points: &Tensor<B, 2>, radii: &Tensor<B, 2>) -> f64 {
    let [m, _] = queries.dims();
    let norms = points.clone().powi_scalar(2).sum_dim(1).transpose(); // [1, n]
    let mut inside = 0usize;
    for start in (0..m).step_by(BLOCK) {
        let rows = queries.clone().narrow(0, start, BLOCK.min(m - start));
        let d = squared_distances(rows, points, &norms); // [block, n]
        let within = (d - radii.clone()).min_dim(1).lower_equal_elem(0.0); // [block, 1]
        inside += within.int().sum().into_data().iter::<i64>().next().unwrap_or(0) as usize;
    }
    inside as f64 / m.max(1) as f64
}

/// Precision and recall of `fake` against `real`, rows of `d` features.
///
/// # Panics
/// If a set has no more than `k` rows or the values are not whole rows.
pub fn precision_recall<B: Backend>(
    real: &[f32],
    fake: &[f32],
    d: usize,
    k: usize,
    device: &B::Device,
) -> PrecisionRecall {
    let real = to_device::<B>(real, d, device);
    let fake = to_device::<B>(fake, d, device);
    let real_radii = radii(&real, k);
    let fake_radii = radii(&fake, k);
    PrecisionRecall { precision: coverage(&fake, &real, &real_radii), recall: coverage(&real, &fake, &fake_radii), k }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    type B = Flex;

    /// Points on a line: `start, start + 1, ...`.
    fn line(start: f32, n: usize) -> Vec<f32> {
        (0..n).flat_map(|i| [start + i as f32, 0.0]).collect()
    }

    #[test]
    fn identical_sets_have_full_precision_and_recall() {
        let points = line(0.0, 50);
        let pr = precision_recall::<B>(&points, &points, 2, 3, &Default::default());
        assert_eq!((pr.precision, pr.recall), (1.0, 1.0));
    }

    #[test]
    fn a_collapsed_generator_is_precise_but_recalls_little() {
        let real = line(0.0, 100);
        // All fake samples on the first ten real points: inside the real
        // manifold, but their own manifold (radius ~3) covers few real points.
        let fake: Vec<f32> = (0..100).flat_map(|i| [(i % 10) as f32, 0.0]).collect();
        let pr = precision_recall::<B>(&real, &fake, 2, 3, &Default::default());
        assert_eq!(pr.precision, 1.0);
        assert!(pr.recall <= 0.2, "{pr:?}");
        // Far-away fakes are neither precise nor do they recall anything.
        let far = line(1000.0, 100);
        let pr = precision_recall::<B>(&real, &far, 2, 3, &Default::default());
        assert_eq!((pr.precision, pr.recall), (0.0, 0.0));
    }

    #[test]
    fn radii_are_the_kth_neighbour_distance_excluding_the_point() {
        let points: Vec<f32> = [0.0f32, 1.0, 3.0, 7.0, 15.0].iter().flat_map(|&x| [x, 0.0]).collect();
        let x = to_device::<B>(&points, 2, &Default::default());
        let r: Vec<f32> = radii(&x, 2).into_data().to_vec().unwrap();
        // Second-nearest neighbour of 0 is 3 (squared 9); of 15 it is 3 (144).
        assert_eq!(r, vec![9.0, 4.0, 9.0, 36.0, 144.0]);
    }
}
