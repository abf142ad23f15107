//! NumPy's float32 reductions (`numpy/_core/src/umath/loops_utils.h.src`,
//! `pairwise_sum`), reproduced so that the float32 arithmetic of the ADM
//! evaluator and of DiffMoE's statistics gives NumPy's roundings:
//! `np.sum` along a contiguous axis sums pairwise with an 8-way unrolled
//! base case, while a reduction over axis 0 of a C-order matrix adds the
//! rows one after the other.

/// NumPy's block below which the unrolled loop is used.
const PAIRWISE_BLOCK: usize = 128;

/// `np.sum` of a contiguous float32 vector: NumPy's pairwise summation.
pub fn pairwise_sum_f32(a: &[f32]) -> f32 {
    let n = a.len();
    if n < 8 {
        // NumPy starts this case from -0.0 (`res = -0.0`), which only matters for an all -0.0 input.
        a.iter().fold(-0.0f32, |acc, &v| acc + v)
    } else if n <= PAIRWISE_BLOCK {
        let mut r = [0f32; 8];
        r.copy_from_slice(&a[..8]);
        let whole = n - n % 8;
        for chunk in a[8..whole].chunks_exact(8) {
            for (acc, &v) in r.iter_mut().zip(chunk) {
                *acc += v;
            }
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &v in &a[whole..] {
            res += v;
        }
        res
    } else {
        let mut half = n / 2;
        half -= half % 8;
        pairwise_sum_f32(&a[..half]) + pairwise_sum_f32(&a[half..])
    }
}

/// `np.mean(x, axis=0)` of a C-order float32 `[rows, cols]` matrix: the rows
/// added in order in float32, then divided by the row count in float32.
///
/// # Panics
/// If `x.len()` is not `rows * cols` or `rows` is zero.
pub fn column_mean_f32(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    assert!(rows > 0 && x.len() == rows * cols, "{} values are not {rows} rows of {cols}", x.len());
    let mut sum = x[..cols].to_vec();
    for row in x.chunks_exact(cols).skip(1) {
        for (s, &v) in sum.iter_mut().zip(row) {
            *s += v;
        }
    }
    let count = rows as f32;
    sum.iter().map(|s| s / count).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairwise_order_differs_from_a_running_sum() {
        // 1 + 16 * 2^-24: a running float32 sum loses every small term, the
        // 8 partial sums of the unrolled loop keep them.
        let mut a = vec![1.0f32];
        a.extend(std::iter::repeat_n(2f32.powi(-24), 15));
        let running = a.iter().fold(0f32, |s, &v| s + v);
        assert_eq!(running, 1.0);
        assert_eq!(pairwise_sum_f32(&a), 1.0 + 14.0 * 2f32.powi(-24));
        let long: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        assert_eq!(pairwise_sum_f32(&long), 499_500.0);
    }

    #[test]
    fn column_means() {
        assert_eq!(column_mean_f32(&[1.0, 2.0, 3.0, 6.0], 2, 2), vec![2.0, 4.0]);
    }
}
