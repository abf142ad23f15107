//! The Inception Score as the ADM evaluator computes it
//! (`evaluations/evaluator.py`, `compute_inception_score`, the improved-GAN
//! formula; DiffMoE copies it as `evaluation/evaluator.py`): class
//! probabilities `softmax(pool W^T)` without the `fc` bias, splits of 5000
//! rows (a partial last split included), `exp(mean_rows KL(p(y|x) || p(y)))`
//! per split, and the mean over the splits.
//!
//! ADM's arithmetic is float32 (TF returns float32 softmax rows and NumPy
//! keeps the dtype); [`ScoreArithmetic::F32`] reproduces NumPy's roundings
//! (row-by-row column means, pairwise row sums), [`ScoreArithmetic::F64`]
//! is the same formula in float64 (about 1e-7 relative away).

use crate::pairwise_sum::{column_mean_f32, pairwise_sum_f32};

/// The split size of the ADM evaluator.
pub const ADM_SPLIT_SIZE: usize = 5000;

/// The arithmetic of the score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreArithmetic {
    /// float32, as the ADM evaluator (NumPy on TF's float32 softmax).
    F32,
    /// float64 throughout.
    F64,
}

/// An Inception Score and its per-split scores.
#[derive(Debug, Clone, PartialEq)]
pub struct InceptionScore {
    /// The mean of the split scores (what the evaluator reports).
    pub score: f64,
    /// `exp(mean KL)` of each split, in order.
    pub split_scores: Vec<f64>,
}

/// Row-wise softmax of float32 logits (`torch.softmax(logits, dim=1)`):
/// `exp(x - max) / sum`, within a few ulps of PyTorch.
///
/// # Panics
/// If `logits.len()` is not a multiple of `classes`.
pub fn softmax_rows(logits: &[f32], classes: usize) -> Vec<f32> {
    assert!(classes > 0 && logits.len().is_multiple_of(classes), "{} logits are not rows of {classes}", logits.len());
    let mut out = Vec::with_capacity(logits.len());
    for row in logits.chunks_exact(classes) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let start = out.len();
        out.extend(row.iter().map(|&x| (x - max).exp()));
        // Summed in float64: a running float32 sum over 1008 classes drifts by
        // tens of ulps, PyTorch's vectorised sum by a few.
        let sum = out[start..].iter().map(|&v| f64::from(v)).sum::<f64>() as f32;
        out[start..].iter_mut().for_each(|v| *v /= sum);
    }
    out
}

/// The Inception Score of class-probability rows (`probabilities`, C order,
/// `classes` per row) with splits of `split_size` rows.
///
/// A row with an exact zero probability gives NaN, as in the evaluator
/// (`0 * log 0`); real logits do not underflow.
///
/// # Panics
/// If there are no rows, `split_size` is zero, or the length is not a
/// multiple of `classes`.
pub fn inception_score(
    probabilities: &[f32],
    classes: usize,
    split_size: usize,
    arithmetic: ScoreArithmetic,
) -> InceptionScore {
    assert!(classes > 0 && probabilities.len().is_multiple_of(classes), "probabilities are not rows of {classes}");
    assert!(!probabilities.is_empty() && split_size > 0, "the Inception Score needs rows and a split size");
    let split_scores: Vec<f64> = probabilities
        .chunks(split_size * classes)
        .map(|part| match arithmetic {
            ScoreArithmetic::F32 => f64::from(split_score_f32(part, classes)),
            ScoreArithmetic::F64 => split_score_f64(part, classes),
        })
        .collect();
    let score = match arithmetic {
        ScoreArithmetic::F32 => {
            let scores: Vec<f32> = split_scores.iter().map(|&s| s as f32).collect();
            f64::from(pairwise_sum_f32(&scores) / scores.len() as f32)
        }
        ScoreArithmetic::F64 => split_scores.iter().sum::<f64>() / split_scores.len() as f64,
    };
    InceptionScore { score, split_scores }
}

/// `np.exp(np.mean(np.sum(part * (np.log(part) - np.log(np.mean(part, 0))), 1)))` in float32.
fn split_score_f32(part: &[f32], classes: usize) -> f32 {
    let rows = part.len() / classes;
    let log_marginal: Vec<f32> = column_mean_f32(part, rows, classes).iter().map(|m| m.ln()).collect();
    let mut terms = vec![0f32; classes];
    let row_kl: Vec<f32> = part
        .chunks_exact(classes)
        .map(|row| {
            for ((t, &p), &lm) in terms.iter_mut().zip(row).zip(&log_marginal) {
                *t = p * (p.ln() - lm);
            }
            pairwise_sum_f32(&terms)
        })
        .collect();
    (pairwise_sum_f32(&row_kl) / rows as f32).exp()
}

/// The same formula in float64.
fn split_score_f64(part: &[f32], classes: usize) -> f64 {
    let rows = part.len() / classes;
    let mut marginal = vec![0f64; classes];
    for row in part.chunks_exact(classes) {
        for (m, &p) in marginal.iter_mut().zip(row) {
            *m += f64::from(p);
        }
    }
    let log_marginal: Vec<f64> = marginal.iter().map(|m| (m / rows as f64).ln()).collect();
    let kl: f64 = part
        .chunks_exact(classes)
        .map(|row| row.iter().zip(&log_marginal).map(|(&p, lm)| f64::from(p) * (f64::from(p).ln() - lm)).sum::<f64>())
        .sum();
    (kl / rows as f64).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confident_distinct_classes_score_the_class_count() {
        // Four one-hot-like rows over four classes: KL = log 4 per row.
        let eps = 1e-6f32;
        let mut p = vec![eps; 16];
        for i in 0..4 {
            p[i * 4 + i] = 1.0 - 3.0 * eps;
        }
        for arithmetic in [ScoreArithmetic::F32, ScoreArithmetic::F64] {
            let s = inception_score(&p, 4, ADM_SPLIT_SIZE, arithmetic);
            assert_eq!(s.split_scores.len(), 1);
            assert!((s.score - 4.0).abs() < 1e-3, "{s:?}");
        }
        // Identical rows carry no information: the score is 1.
        let s = inception_score(&[0.25f32; 16], 4, 2, ScoreArithmetic::F32);
        assert_eq!(s.split_scores, vec![1.0, 1.0]);
    }

    #[test]
    fn partial_last_split_is_scored() {
        let p = softmax_rows(&(0..5 * 3).map(|i| (i % 7) as f32).collect::<Vec<_>>(), 3);
        assert!((p[..3].iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let s = inception_score(&p, 3, 2, ScoreArithmetic::F64);
        assert_eq!(s.split_scores.len(), 3);
        assert!((s.score - s.split_scores.iter().sum::<f64>() / 3.0).abs() < 1e-15);
    }
}
