//! Feature statistics and the Frechet Inception Distance, as pytorch-fid's
//! `fid_score.py` (`calculate_activation_statistics`,
//! `calculate_frechet_distance`) computes them; DiffMoE's `evaluation/fid.py`
//! and the ADM evaluator hold the same arithmetic (see
//! `shared/docs/vae-inception-semantics.md`, sections 1 and 4).
//!
//! `tr sqrtm(s1 s2)` is taken from a symmetric eigen-decomposition instead
//! of scipy's `sqrtm`: `s1 s2` is similar to `sqrt(s1) s2 sqrt(s1)`, a
//! symmetric positive semi-definite matrix, so the trace is
//! `sum sqrt(max(eig(sqrt(s1) s2 sqrt(s1)), 0))`. This never fails on
//! singular covariances, where scipy's `sqrtm` can return non-finite values
//! and pytorch-fid falls back to `sigma + eps I`; that fallback is available
//! as [`SqrtmOffset::Eps`].

use std::path::{Path, PathBuf};

use faer::linalg::matmul::matmul;
use faer::{get_global_parallelism, Accum, Mat, Side};

use diffmoe_train::data::DataError;
use diffmoe_train::{NpyArray, NpyDtype, NpzWriter};

use crate::pairwise_sum::{column_mean_f32, pairwise_sum_f32};

/// Rows per block of the covariance accumulation (64 MiB of float64 at 2048 dims).
const COVARIANCE_BLOCK_ROWS: usize = 4096;

/// The `eps` of pytorch-fid's `calculate_frechet_distance` fallback.
pub const PYTORCH_FID_EPS: f64 = 1e-6;

/// How the feature mean is computed and stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeanPrecision {
    /// pytorch-fid: `np.mean` of float64 activations.
    F64,
    /// DiffMoE's `sample_ddp_feature.py`: `np.mean(acts, axis=0)` on the
    /// float32 activations, a float32 mean. Two float32 means also make
    /// `diff = mu1 - mu2` and `diff.dot(diff)` float32 in the distance, as
    /// NumPy computes them; the FID moves by about 1e-7 relative.
    F32,
}

/// Whether the matrix square root sees offset covariances.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SqrtmOffset {
    /// `tr sqrtm(s1 s2)` of the covariances as they are (what pytorch-fid
    /// computes whenever scipy's `sqrtm` is finite, i.e. in practice).
    None,
    /// pytorch-fid's fallback for a non-finite `sqrtm(s1 s2)`:
    /// `tr sqrtm((s1 + eps I)(s2 + eps I))`, the other traces still of the
    /// un-offset covariances. pytorch-fid uses [`PYTORCH_FID_EPS`].
    Eps(f64),
}

/// Why statistics could not be computed, read, written or compared.
#[derive(Debug, thiserror::Error)]
pub enum StatisticsError {
    /// The `.npz` file could not be read.
    #[error("cannot read feature statistics from {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: DataError,
    },
    /// The `.npz` file could not be written.
    #[error("cannot write feature statistics to {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: DataError,
    },
    /// The file lacks `mu` or `sigma`.
    #[error("{}: no array `{key}` (feature statistics need `mu` and `sigma`)", path.display())]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The missing array.
        key: String,
    },
    /// `mu` or `sigma` has the wrong shape or dtype.
    #[error("{}: array `{key}` is {found}, expected {expected}", path.display())]
    BadArray {
        /// The file.
        path: PathBuf,
        /// The array.
        key: String,
        /// What it should be.
        expected: String,
        /// What it is.
        found: String,
    },
    /// The features are not `rows x dim`, or fewer than two rows.
    #[error("{values} feature values do not make at least 2 rows of {dim}")]
    Features {
        /// Values given.
        values: usize,
        /// Feature dimension.
        dim: usize,
    },
    /// Two statistics of different dimensions.
    #[error("cannot compare statistics of dimension {a} and {b}")]
    DimensionMismatch {
        /// First dimension.
        a: usize,
        /// Second dimension.
        b: usize,
    },
    /// The eigensolver failed (non-finite covariance entries).
    #[error("the symmetric eigen-decomposition of a {dim}x{dim} matrix failed: {reason}")]
    Eigen {
        /// Matrix size.
        dim: usize,
        /// The solver's message.
        reason: String,
    },
}

/// The mean and covariance of a set of feature vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureStatistics {
    /// Feature dimension.
    pub dim: usize,
    /// The mean, `[dim]` (float32 values when `mu_precision` is `F32`).
    pub mu: Vec<f64>,
    /// How `mu` was computed; stored as `<f4` or `<f8` in `.npz` files.
    pub mu_precision: MeanPrecision,
    /// The unbiased (N - 1) covariance, `[dim, dim]` row-major (`np.cov(rowvar=False)`).
    pub sigma: Vec<f64>,
}

impl FeatureStatistics {
    /// Statistics of `features`, float32 rows of `dim` values (C order), as
    /// pytorch-fid (`MeanPrecision::F64`) or DiffMoE (`MeanPrecision::F32`)
    /// computes them. The covariance is float64 either way: `np.cov` centres
    /// with its own float64 mean.
    pub fn from_features(features: &[f32], dim: usize, mu_precision: MeanPrecision) -> Result<Self, StatisticsError> {
        let bad = || StatisticsError::Features { values: features.len(), dim };
        if dim == 0 || !features.len().is_multiple_of(dim) || features.len() / dim < 2 {
            return Err(bad());
        }
        let rows = features.len() / dim;
        let mut mean64 = vec![0f64; dim];
        for row in features.chunks_exact(dim) {
            for (m, &v) in mean64.iter_mut().zip(row) {
                *m += f64::from(v);
            }
        }
        mean64.iter_mut().for_each(|m| *m /= rows as f64);
        // X_c^T X_c accumulated over blocks of rows, so that 50k x 2048
        // features never need a float64 copy at once.
        let mut cov = Mat::<f64>::zeros(dim, dim);
        for (b, block) in features.chunks(COVARIANCE_BLOCK_ROWS * dim).enumerate() {
            let n = block.len() / dim;
            let centred = Mat::<f64>::from_fn(n, dim, |i, j| f64::from(block[i * dim + j]) - mean64[j]); // [n, dim]
            let accum = if b == 0 { Accum::Replace } else { Accum::Add };
            matmul(cov.as_mut(), accum, centred.transpose(), centred.as_ref(), 1.0, get_global_parallelism());
        }
        let scale = 1.0 / (rows - 1) as f64;
        let sigma = (0..dim * dim).map(|k| cov[(k / dim, k % dim)] * scale).collect();
        let mu = match mu_precision {
            MeanPrecision::F64 => mean64,
            MeanPrecision::F32 => column_mean_f32(features, rows, dim).into_iter().map(f64::from).collect(),
        };
        Ok(Self { dim, mu, mu_precision, sigma })
    }

    /// Reads `mu` and `sigma` from an `.npz` file (the layout of ADM's
    /// reference batches such as `VIRTUAL_imagenet256_labeled.npz`, stored or
    /// compressed); other arrays in the file are not read.
    pub fn read_npz(path: &Path) -> Result<Self, StatisticsError> {
        let mut arrays = NpyArray::read_selected(path, &["mu", "sigma"])
            .map_err(|source| StatisticsError::Read { path: path.to_path_buf(), source })?;
        let mut take = |key: &str| {
            arrays.remove(key).ok_or_else(|| StatisticsError::MissingKey { path: path.to_path_buf(), key: key.into() })
        };
        let (mu, sigma) = (take("mu")?, take("sigma")?);
        let bad = |key: &str, expected: String, a: &NpyArray| StatisticsError::BadArray {
            path: path.to_path_buf(),
            key: key.into(),
            expected,
            found: format!("{:?} of shape {:?}", a.dtype, a.shape),
        };
        let mu_precision = match (mu.dtype, mu.shape.as_slice()) {
            (NpyDtype::F32, [_]) => MeanPrecision::F32,
            (NpyDtype::F64, [_]) => MeanPrecision::F64,
            _ => return Err(bad("mu", "a float32 or float64 vector".into(), &mu)),
        };
        let dim = mu.shape[0];
        if !matches!(sigma.dtype, NpyDtype::F32 | NpyDtype::F64) || sigma.shape != [dim, dim] {
            return Err(bad("sigma", format!("a float matrix of shape [{dim}, {dim}]"), &sigma));
        }
        Ok(Self { dim, mu: mu.values, mu_precision, sigma: sigma.values })
    }

    /// Writes `mu` (`<f4` or `<f8` as computed) and `sigma` (`<f8`) to an
    /// `.npz` file, as `np.savez(path, mu=mu, sigma=sigma)`.
    pub fn write_npz(&self, path: &Path) -> Result<(), StatisticsError> {
        let write = |source| StatisticsError::Write { path: path.to_path_buf(), source };
        let mut npz = NpzWriter::create(path).map_err(write)?;
        match self.mu_precision {
            MeanPrecision::F64 => npz.array("mu", &[self.dim], &self.mu),
            MeanPrecision::F32 => {
                let mu: Vec<f32> = self.mu.iter().map(|&v| v as f32).collect();
                npz.array("mu", &[self.dim], &mu)
            }
        }
        .map_err(write)?;
        npz.array("sigma", &[self.dim, self.dim], &self.sigma).map_err(write)?;
        npz.finish().map_err(write)?;
        Ok(())
    }

    fn trace(&self) -> f64 {
        (0..self.dim).map(|i| self.sigma[i * self.dim + i]).sum()
    }

    fn sigma_matrix(&self, offset: f64) -> Mat<f64> {
        let d = self.dim;
        Mat::from_fn(d, d, |i, j| self.sigma[i * d + j] + if i == j { offset } else { 0.0 })
    }
}

/// `|mu1 - mu2|^2`: float32 arithmetic when both means are float32 (NumPy
/// keeps the dtype; its float32 `dot` is matched by a pairwise sum of the
/// float32 products), float64 otherwise.
fn mean_term(a: &FeatureStatistics, b: &FeatureStatistics) -> f64 {
    match (a.mu_precision, b.mu_precision) {
        (MeanPrecision::F32, MeanPrecision::F32) => {
            let squares: Vec<f32> =
                a.mu.iter()
                    .zip(&b.mu)
                    .map(|(&x, &y)| {
                        let d = x as f32 - y as f32;
                        d * d
                    })
                    .collect();
            f64::from(pairwise_sum_f32(&squares))
        }
        _ => a.mu.iter().zip(&b.mu).map(|(x, y)| (x - y) * (x - y)).sum(),
    }
}

/// `tr sqrtm(s1 s2) = sum sqrt(max(eig(D U^T s2 U D), 0))` with
/// `s1 = U diag(l) U^T` and `D = diag(sqrt(max(l, 0)))`: `D U^T s2 U D` is
/// similar to `sqrt(s1) s2 sqrt(s1)` and to `s1 s2`.
///
/// # Errors
/// If an eigen-decomposition fails (non-finite entries).
fn trace_sqrt_product(s1: &Mat<f64>, s2: &Mat<f64>) -> Result<f64, StatisticsError> {
    let dim = s1.nrows();
    let eigen_error = |e: faer::linalg::evd::EvdError| StatisticsError::Eigen { dim, reason: format!("{e:?}") };
    let e1 = s1.self_adjoint_eigen(Side::Lower).map_err(eigen_error)?;
    let u = e1.U();
    let root: Vec<f64> = (0..dim).map(|i| e1.S().column_vector()[i].max(0.0).sqrt()).collect();
    let rotated = u.transpose() * s2 * u; // U^T s2 U, [dim, dim]
    let m = Mat::<f64>::from_fn(dim, dim, |i, j| {
        // Symmetrised against the rounding of the two products.
        0.5 * (rotated[(i, j)] + rotated[(j, i)]) * root[i] * root[j]
    });
    let eigenvalues = m.self_adjoint_eigenvalues(Side::Lower).map_err(eigen_error)?;
    Ok(eigenvalues.iter().map(|&l| l.max(0.0).sqrt()).sum())
}

/// The Frechet distance `|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr sqrtm(s1 s2)`
/// of pytorch-fid's `calculate_frechet_distance`, with the matrix square
/// root's trace from a symmetric eigensolver (see the module docs).
///
/// Runs in seconds for 2048-d statistics (two eigen-decompositions and two
/// matrix products, on faer's global thread pool).
///
/// # Errors
/// If the dimensions differ or the eigensolver fails.
pub fn frechet_distance(
    a: &FeatureStatistics,
    b: &FeatureStatistics,
    offset: SqrtmOffset,
) -> Result<f64, StatisticsError> {
    if a.dim != b.dim {
        return Err(StatisticsError::DimensionMismatch { a: a.dim, b: b.dim });
    }
    let eps = match offset {
        SqrtmOffset::None => 0.0,
        SqrtmOffset::Eps(eps) => eps,
    };
    let tr_covmean = trace_sqrt_product(&a.sigma_matrix(eps), &b.sigma_matrix(eps))?;
    Ok(mean_term(a, b) + a.trace() + b.trace() - 2.0 * tr_covmean)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diagonal(mu: Vec<f64>, var: &[f64]) -> FeatureStatistics {
        let dim = var.len();
        let mut sigma = vec![0.0; dim * dim];
        for (i, v) in var.iter().enumerate() {
            sigma[i * dim + i] = *v;
        }
        FeatureStatistics { dim, mu, mu_precision: MeanPrecision::F64, sigma }
    }

    #[test]
    fn diagonal_covariances_have_a_closed_form() {
        let a = diagonal(vec![0.0, 1.0, 2.0], &[1.0, 4.0, 9.0]);
        let b = diagonal(vec![1.0, 1.0, 0.0], &[4.0, 4.0, 1.0]);
        // |dmu|^2 = 1 + 0 + 4; sum (sqrt(a) - sqrt(b))^2 = 1 + 0 + 4.
        let fid = frechet_distance(&a, &b, SqrtmOffset::None).unwrap();
        assert!((fid - 10.0).abs() < 1e-12, "{fid}");
        assert!(frechet_distance(&a, &a, SqrtmOffset::None).unwrap().abs() < 1e-12);
        // The offset only enters the square root: sqrt((1+e)(4+e)) etc.
        let eps = 1e-2;
        let expected = 5.0 + 14.0 + 9.0
            - 2.0
                * [(1.0, 4.0), (4.0, 4.0), (9.0, 1.0)]
                    .iter()
                    .map(|(x, y): &(f64, f64)| ((x + eps) * (y + eps)).sqrt())
                    .sum::<f64>();
        let fid = frechet_distance(&a, &b, SqrtmOffset::Eps(eps)).unwrap();
        assert!((fid - expected).abs() < 1e-12, "{fid} vs {expected}");
    }

    #[test]
    fn statistics_are_unbiased_and_round_trip_through_npz() {
        let features = [1.0f32, 2.0, 3.0, 6.0, 5.0, 10.0];
        let s = FeatureStatistics::from_features(&features, 2, MeanPrecision::F64).unwrap();
        assert_eq!(s.mu, vec![3.0, 6.0]);
        assert_eq!(s.sigma, vec![4.0, 8.0, 8.0, 16.0]);
        let dir = std::env::temp_dir().join(format!("diffmoe-eval-frechet-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stats.npz");
        s.write_npz(&path).unwrap();
        assert_eq!(FeatureStatistics::read_npz(&path).unwrap(), s);
        let f32_stats = FeatureStatistics::from_features(&features, 2, MeanPrecision::F32).unwrap();
        f32_stats.write_npz(&path).unwrap();
        assert_eq!(FeatureStatistics::read_npz(&path).unwrap().mu_precision, MeanPrecision::F32);

        let mut npz = NpzWriter::create(&path).unwrap();
        npz.array("mu", &[2], &[0.0f64, 1.0]).unwrap();
        npz.finish().unwrap();
        let e = FeatureStatistics::read_npz(&path).unwrap_err().to_string();
        assert!(e.contains("stats.npz") && e.contains("`sigma`"), "{e}");
        let mut npz = NpzWriter::create(&path).unwrap();
        npz.array("mu", &[2], &[0.0f64, 1.0]).unwrap();
        npz.array("sigma", &[3], &[0.0f64, 1.0, 2.0]).unwrap();
        npz.finish().unwrap();
        let e = FeatureStatistics::read_npz(&path).unwrap_err().to_string();
        assert!(e.contains("`sigma`") && e.contains("[2, 2]") && e.contains("[3]"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(FeatureStatistics::from_features(&features, 4, MeanPrecision::F64).is_err());
    }
}
