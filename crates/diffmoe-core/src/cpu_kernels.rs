//! Vectorised f32 kernels of the CPU backend: GELU (tanh) and the last-axis
//! softmax, forward and backward, and a bias added to rows (with GELU after
//! it), each one pass over memory.
//!
//! burn's CPU backend computes `exp`, `tanh` and `sigmoid` one element at a
//! time through libm, and autodiff records GELU and softmax as chains of
//! elementwise ops: the two were 40% of a CPU training step. Here `exp` is a
//! branch-free polynomial (Cephes `expf`: range reduction by `ln 2`, a
//! degree-6 polynomial, `2^n` through the exponent bits, within 2 ulp) that
//! LLVM vectorises; each kernel is compiled for AVX-512F and for AVX2 + FMA,
//! chosen at run time, and for the baseline target, with the same results:
//! the compiler contracts no multiply and add into an FMA, and the fused
//! multiply-adds that `exp` asks for (`mul_add`) are exactly rounded in
//! hardware and in libm's `fmaf` alike (the baseline build calls the
//! latter, slowly). Work is split over rayon's threads in chunks of whole
//! rows.

use core::mem::MaybeUninit;

use rayon::prelude::*;

/// Elements per rayon task (16K f32: 64 KiB in, 64 KiB out).
const TASK_ELEMS: usize = 16 * 1024;

/// `sqrt(2 / pi)`, the GELU tanh-approximation constant.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The cubic coefficient of the GELU tanh approximation.
const GELU_CUBIC: f32 = 0.044715;

/// `exp(x)` within 2 ulp for `x` in `[-87.3, 88.3]`; 0 below, `exp(88.3)`
/// above (only reached by saturated sigmoids, where it is as good as inf).
/// The range reduction and the polynomial are fused multiply-adds: half the
/// instructions of separate products and sums (the attention softmax and
/// GELU were 18% of a small model's inference forward; 7% faster overall).
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = core::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const LOWEST: f32 = -87.336_55;
    /// `1.5 * 2^23`: adding it rounds to an integer held in the low mantissa
    /// bits (float ops only, so the loop vectorises; a float-to-int cast
    /// does not).
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(LOWEST, 88.3);
    let shifted = xc.mul_add(LOG2E, ROUND);
    let n = shifted - ROUND;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, xc));
    let p = 1.987_569_1e-4f32;
    let p = p.mul_add(r, 1.398_199_9e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1);
    let p = p.mul_add(r, 5e-1);
    let e = p.mul_add(r * r, r) + 1.0;
    let n_int = shifted.to_bits().wrapping_sub(ROUND.to_bits()); // n as a two's-complement u32
    let scale = f32::from_bits(n_int.wrapping_add(127) << 23);
    if x < LOWEST {
        0.0
    } else {
        e * scale
    }
}

/// `x * sigmoid(2u)`, `u = sqrt(2/pi) (x + 0.044715 x^3)`: equal to
/// `0.5 x (1 + tanh(u))`.
#[inline(always)]
fn gelu_scalar(x: f32) -> f32 {
    let u2 = 2.0 * SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x);
    x / (1.0 + exp(-u2))
}

/// `d gelu / dx = s + x s (1 - s) du2/dx` with `s = sigmoid(2u)`.
#[inline(always)]
fn gelu_grad(x: f32) -> f32 {
    let x2 = x * x;
    let u2 = 2.0 * SQRT_2_OVER_PI * (x + GELU_CUBIC * x2 * x);
    let s = 1.0 / (1.0 + exp(-u2));
    let du2 = 2.0 * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x2);
    s + x * s * (1.0 - s) * du2
}

/// `x * sigmoid(x)`.
#[inline(always)]
fn silu_scalar(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `d silu / dx = s (1 + x (1 - s))` with `s = sigmoid(x)`.
#[inline(always)]
fn silu_grad(x: f32) -> f32 {
    let s = 1.0 / (1.0 + exp(-x));
    s * (1.0 + x * (1.0 - s))
}

/// Lanes of the manual reductions: float reductions do not vectorise
/// without reassociation, eight independent accumulators do.
const LANES: usize = 8;

#[inline(always)]
fn row_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    rest.iter().chain(acc.iter()).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

#[inline(always)]
pub(crate) fn row_sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// Three passes over a row that stays in L1: max, exp (a plain loop, so that
/// it vectorises), sum and scale. In place.
#[inline(always)]
fn softmax_row(x: &mut [f32]) {
    let max = row_max(x);
    for v in x.iter_mut() {
        *v = exp(*v - max);
    }
    let inv = 1.0 / row_sum(x);
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `sum(y * g)`, in `LANES` partial sums.
#[inline(always)]
pub(crate) fn row_dot(y: &[f32], g: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut ys = y.chunks_exact(LANES);
    let mut gs = g.chunks_exact(LANES);
    for (yc, gc) in (&mut ys).zip(&mut gs) {
        for ((a, &yv), &gv) in acc.iter_mut().zip(yc).zip(gc) {
            *a += yv * gv;
        }
    }
    let rest: f32 = ys.remainder().iter().zip(gs.remainder()).map(|(a, b)| a * b).sum();
    acc.iter().sum::<f32>() + rest
}

/// `dx = y * (g - sum(g * y))` along the row.
#[inline(always)]
fn softmax_backward_row(y: &[f32], g: &[f32], dx: &mut [f32]) {
    let dot = row_dot(y, g);
    for ((d, &yv), &gv) in dx.iter_mut().zip(y).zip(g) {
        *d = yv * (gv - dot);
    }
}

/// Defines `$name`, running `$body` (an `#[inline(always)]` kernel) compiled
/// for AVX-512F, or else AVX2 + FMA, when the CPU has them, and for the
/// baseline otherwise (the same operations at each width, so the same bits).
macro_rules! multiversion {
    ($name:ident, $body:ident, ($($arg:ident: $ty:ty),*)) => {
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports the enabled features.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the enabled features.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Defines the forward, in-place and backward chunk kernels of the
/// pointwise function `$f` with derivative `$grad`.
macro_rules! pointwise_chunks {
    ($f:ident, $grad:ident, $fwd:ident, $in_place:ident, $bwd:ident) => {
        #[inline(always)]
        fn $fwd(x: &[f32], y: &mut [f32]) {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = $f(x);
            }
        }

        #[inline(always)]
        fn $in_place(x: &mut [f32]) {
            for v in x.iter_mut() {
                *v = $f(*v);
            }
        }

        #[inline(always)]
        fn $bwd(x: &[f32], g: &[f32], dx: &mut [f32]) {
            for ((d, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                *d = g * $grad(x);
            }
        }
    };
}

pointwise_chunks!(gelu_scalar, gelu_grad, gelu_chunk, gelu_in_place_chunk, gelu_backward_chunk);
pointwise_chunks!(silu_scalar, silu_grad, silu_chunk, silu_in_place_chunk, silu_backward_chunk);

#[inline(always)]
fn softmax_rows(x: &mut [f32], row: usize) {
    for x in x.chunks_exact_mut(row) {
        softmax_row(x);
    }
}

/// `g = y * (g - sum(g * y))` along each row, in place.
#[inline(always)]
fn softmax_backward_rows_in_place_body(y: &[f32], g: &mut [f32], row: usize) {
    for (y, g) in y.chunks_exact(row).zip(g.chunks_exact_mut(row)) {
        let dot = row_dot(y, g);
        for (gv, &yv) in g.iter_mut().zip(y) {
            *gv = yv * (*gv - dot);
        }
    }
}

#[inline(always)]
fn softmax_backward_rows(y: &[f32], g: &[f32], dx: &mut [f32], row: usize) {
    for ((y, g), dx) in y.chunks_exact(row).zip(g.chunks_exact(row)).zip(dx.chunks_exact_mut(row)) {
        softmax_backward_row(y, g, dx);
    }
}

multiversion!(gelu_chunk_best, gelu_chunk, (x: &[f32], y: &mut [f32]));
multiversion!(gelu_in_place_chunk_best, gelu_in_place_chunk, (x: &mut [f32]));
multiversion!(gelu_backward_chunk_best, gelu_backward_chunk, (x: &[f32], g: &[f32], dx: &mut [f32]));
multiversion!(silu_chunk_best, silu_chunk, (x: &[f32], y: &mut [f32]));
multiversion!(silu_in_place_chunk_best, silu_in_place_chunk, (x: &mut [f32]));
multiversion!(silu_backward_chunk_best, silu_backward_chunk, (x: &[f32], g: &[f32], dx: &mut [f32]));
multiversion!(softmax_rows_best, softmax_rows, (x: &mut [f32], row: usize));
multiversion!(softmax_backward_rows_best, softmax_backward_rows, (y: &[f32], g: &[f32], dx: &mut [f32], row: usize));
multiversion!(softmax_backward_rows_in_place_best, softmax_backward_rows_in_place_body, (y: &[f32], g: &mut [f32], row: usize));

/// Rows per rayon task for rows of `row` elements.
fn task_rows(row: usize) -> usize {
    (TASK_ELEMS / row.max(1)).max(1)
}

/// Defines the public forward, in-place and backward functions of a
/// pointwise kernel, split over rayon's threads.
macro_rules! pointwise_api {
    ($name:literal, $fwd:ident, $in_place:ident, $bwd:ident, $fwd_chunk:ident, $in_place_chunk:ident, $bwd_chunk:ident) => {
        #[doc = concat!("`y = ", $name, "(x)`.")]
        pub fn $fwd(x: &[f32], y: &mut [f32]) {
            assert_eq!(x.len(), y.len(), concat!($name, ": input and output lengths differ"));
            x.par_chunks(TASK_ELEMS).zip(y.par_chunks_mut(TASK_ELEMS)).for_each(|(x, y)| $fwd_chunk(x, y));
        }

        #[doc = concat!("`x = ", $name, "(x)`.")]
        pub fn $in_place(x: &mut [f32]) {
            x.par_chunks_mut(TASK_ELEMS).for_each($in_place_chunk);
        }

        #[doc = concat!("`dx = g * ", $name, "'(x)`.")]
        pub fn $bwd(x: &[f32], g: &[f32], dx: &mut [f32]) {
            assert!(x.len() == g.len() && x.len() == dx.len(), concat!($name, " backward: lengths differ"));
            x.par_chunks(TASK_ELEMS)
                .zip(g.par_chunks(TASK_ELEMS))
                .zip(dx.par_chunks_mut(TASK_ELEMS))
                .for_each(|((x, g), dx)| $bwd_chunk(x, g, dx));
        }
    };
}

pointwise_api!(
    "gelu_tanh",
    gelu_tanh,
    gelu_tanh_in_place,
    gelu_tanh_backward,
    gelu_chunk_best,
    gelu_in_place_chunk_best,
    gelu_backward_chunk_best
);
pointwise_api!(
    "silu",
    silu,
    silu_in_place,
    silu_backward,
    silu_chunk_best,
    silu_in_place_chunk_best,
    silu_backward_chunk_best
);

#[inline(always)]
fn bias_rows(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (v, &b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

#[inline(always)]
fn bias_gelu_rows(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (v, &b) in row.iter_mut().zip(bias) {
            *v = gelu_scalar(*v + b);
        }
    }
}

/// `z = x + bias` in place and `y = gelu_tanh(z)`, row by row.
#[inline(always)]
fn bias_gelu_keep_rows(z: &mut [f32], y: &mut [MaybeUninit<f32>], bias: &[f32]) {
    for (z, y) in z.chunks_exact_mut(bias.len()).zip(y.chunks_exact_mut(bias.len())) {
        for ((z, y), &b) in z.iter_mut().zip(y.iter_mut()).zip(bias) {
            *z += b;
            y.write(gelu_scalar(*z));
        }
    }
}

/// `dz = g * gelu_tanh'(z)`, and the sum of `dz`'s rows added into `sums`.
#[inline(always)]
fn gelu_backward_sum_rows(z: &[f32], g: &[f32], dz: &mut [MaybeUninit<f32>], sums: &mut [f32]) {
    let d = sums.len();
    for ((z, g), dz) in z.chunks_exact(d).zip(g.chunks_exact(d)).zip(dz.chunks_exact_mut(d)) {
        for (((dz, &z), &g), s) in dz.iter_mut().zip(z).zip(g).zip(sums.iter_mut()) {
            let v = g * gelu_grad(z);
            dz.write(v);
            *s += v;
        }
    }
}

/// The sum of `g`'s rows added into `sums`.
#[inline(always)]
fn sum_rows_into(g: &[f32], sums: &mut [f32]) {
    for g in g.chunks_exact(sums.len()) {
        for (s, &g) in sums.iter_mut().zip(g) {
            *s += g;
        }
    }
}

multiversion!(bias_rows_best, bias_rows, (x: &mut [f32], bias: &[f32]));
multiversion!(bias_gelu_keep_rows_best, bias_gelu_keep_rows, (z: &mut [f32], y: &mut [MaybeUninit<f32>], bias: &[f32]));
multiversion!(gelu_backward_sum_rows_best, gelu_backward_sum_rows, (z: &[f32], g: &[f32], dz: &mut [MaybeUninit<f32>], sums: &mut [f32]));
multiversion!(sum_rows_into_best, sum_rows_into, (g: &[f32], sums: &mut [f32]));

/// `z += bias` on every row of `z` and `y = gelu_tanh(z)`, on the calling
/// thread: the pre-activation kept for the backward pass.
pub(crate) fn add_bias_gelu_tanh_keep(z: &mut [f32], y: &mut [MaybeUninit<f32>], bias: &[f32]) {
    assert!(
        !bias.is_empty() && z.len() == y.len() && z.len().is_multiple_of(bias.len()),
        "bias of {} on {} elements",
        bias.len(),
        z.len()
    );
    bias_gelu_keep_rows_best(z, y, bias);
}

/// `dz = g * gelu_tanh'(z)` and `sums += ` the sum of `dz`'s rows (rows of
/// `sums.len()`), on the calling thread.
pub(crate) fn gelu_tanh_backward_row_sums(z: &[f32], g: &[f32], dz: &mut [MaybeUninit<f32>], sums: &mut [f32]) {
    assert!(
        !sums.is_empty() && z.len() == g.len() && z.len() == dz.len() && z.len().is_multiple_of(sums.len()),
        "gelu backward: lengths"
    );
    gelu_backward_sum_rows_best(z, g, dz, sums);
}

/// `x[r] += bias` for every row `r` of `x`, on the calling thread.
pub(crate) fn add_bias_rows_serial(x: &mut [f32], bias: &[f32]) {
    assert!(!bias.is_empty() && x.len().is_multiple_of(bias.len()), "bias of {} on {} elements", bias.len(), x.len());
    bias_rows_best(x, bias);
}

/// `sums += ` the sum of `g`'s rows (rows of `sums.len()`), on the calling
/// thread.
pub(crate) fn add_row_sums(g: &[f32], sums: &mut [f32]) {
    assert!(!sums.is_empty() && g.len().is_multiple_of(sums.len()), "row sums: lengths");
    sum_rows_into_best(g, sums);
}
multiversion!(bias_gelu_rows_best, bias_gelu_rows, (x: &mut [f32], bias: &[f32]));

/// `x[r] += bias` for every row `r` of `bias.len()` elements of `x`, in
/// place.
pub fn add_bias_rows(x: &mut [f32], bias: &[f32]) {
    over_biased_rows(x, bias, bias_rows_best);
}

/// `x[r] = gelu_tanh(x[r] + bias)` for every row `r` of `bias.len()`
/// elements of `x`, in place: the sum rounded to f32 first, as the two
/// ops in turn give it.
pub fn add_bias_rows_gelu_tanh(x: &mut [f32], bias: &[f32]) {
    over_biased_rows(x, bias, bias_gelu_rows_best);
}

/// `kernel(rows, bias)` over the rows of `x`, in chunks of whole rows on
/// rayon's threads.
fn over_biased_rows(x: &mut [f32], bias: &[f32], kernel: fn(&mut [f32], &[f32])) {
    assert!(!bias.is_empty() && x.len().is_multiple_of(bias.len()), "bias of {} on {} elements", bias.len(), x.len());
    let chunk = task_rows(bias.len()) * bias.len();
    x.par_chunks_mut(chunk).for_each(|x| kernel(x, bias));
}

/// Softmax of every row of `row` elements of `x`, in place (the scores are
/// the largest tensor of attention: the pass is memory-bound).
pub fn softmax_in_place(x: &mut [f32], row: usize) {
    assert!(row > 0 && x.len().is_multiple_of(row), "softmax: bad row length {row}");
    let chunk = task_rows(row) * row;
    x.par_chunks_mut(chunk).for_each(|x| softmax_rows_best(x, row));
}

/// Softmax of every row of `row` elements of `x`, in place, on the calling
/// thread (for kernels that run on rayon's threads already).
pub(crate) fn softmax_rows_serial(x: &mut [f32], row: usize) {
    assert!(row > 0 && x.len().is_multiple_of(row), "softmax: bad row length {row}");
    softmax_rows_best(x, row);
}

/// `g = y * (g - sum(g * y))` row by row, in place over the output gradient
/// `g`, on the calling thread.
pub(crate) fn softmax_backward_rows_in_place(y: &[f32], g: &mut [f32], row: usize) {
    assert!(row > 0 && y.len() == g.len() && y.len().is_multiple_of(row), "softmax_backward: bad row length {row}");
    softmax_backward_rows_in_place_best(y, g, row);
}

/// The softmax gradient `dx = y * (g - sum(g * y))`, row by row, from the
/// softmax output `y` and the output gradient `g`.
pub fn softmax_backward(y: &[f32], g: &[f32], dx: &mut [f32], row: usize) {
    assert!(
        row > 0 && y.len() == g.len() && y.len() == dx.len() && y.len().is_multiple_of(row),
        "softmax_backward: bad row length {row}"
    );
    let chunk = task_rows(row) * row;
    y.par_chunks(chunk)
        .zip(g.par_chunks(chunk))
        .zip(dx.par_chunks_mut(chunk))
        .for_each(|((y, g), dx)| softmax_backward_rows_best(y, g, dx, row));
}

/// The `k` largest entries of every row of `row` elements, in descending
/// order (`f32::total_cmp`, ties by lower index): `(values, indices)`, each
/// `rows * k` long. A partial selection, `O(row + k log k)` per row, rows in
/// parallel.
pub fn topk_rows(x: &[f32], row: usize, k: usize) -> (Vec<f32>, Vec<i64>) {
    assert!(row > 0 && x.len().is_multiple_of(row) && k <= row, "topk: k = {k} of rows of {row}");
    let rows = x.len() / row;
    let mut values = vec![0.0f32; rows * k];
    let mut indices = vec![0i64; rows * k];
    if k == 0 {
        return (values, indices);
    }
    values.par_chunks_mut(k).zip(indices.par_chunks_mut(k)).zip(x.par_chunks(row)).for_each_init(
        Vec::new,
        |order: &mut Vec<u32>, ((values, indices), x)| {
            let descending = |a: &u32, b: &u32| x[*b as usize].total_cmp(&x[*a as usize]).then(a.cmp(b));
            order.clear();
            order.extend(0..row as u32);
            if k < row {
                order.select_nth_unstable_by(k - 1, descending);
                order.truncate(k);
            }
            order.sort_unstable_by(descending);
            for ((v, i), &o) in values.iter_mut().zip(indices.iter_mut()).zip(order.iter()) {
                *v = x[o as usize];
                *i = o as i64;
            }
        },
    );
    (values, indices)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f64, rel: f64) -> bool {
        (a as f64 - b).abs() <= rel * b.abs().max(1e-30)
    }

    #[test]
    fn exp_is_within_two_ulp() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = exp(x);
            assert!(close(got, (x as f64).exp(), 2.5e-7), "exp({x}) = {got}, expected {}", (x as f64).exp());
            x += 0.0137;
        }
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(200.0) > 1e38);
    }

    /// A pointwise kernel's forward, in-place forward and backward.
    type Kernels = (fn(&[f32], &mut [f32]), fn(&mut [f32]), fn(&[f32], &[f32], &mut [f32]));

    /// Checks a pointwise kernel's forward (and in-place forward) and
    /// backward on `xs` against `f` and `f'` computed in f64.
    fn check_pointwise(
        name: &str,
        (forward, in_place, backward): Kernels,
        xs: &[f32],
        f: impl Fn(f64) -> f64,
        f_prime: impl Fn(f64) -> f64,
    ) {
        let mut y = vec![0.0; xs.len()];
        forward(xs, &mut y);
        let g: Vec<f32> = (0..xs.len()).map(|i| 0.5 + (i % 5) as f32).collect();
        let mut dx = vec![0.0; xs.len()];
        backward(xs, &g, &mut dx);
        let mut y_in_place = xs.to_vec();
        in_place(&mut y_in_place);
        assert_eq!(y_in_place, y, "{name} in place");
        for i in 0..xs.len() {
            let x = xs[i] as f64;
            let expected = f(x);
            assert!((y[i] as f64 - expected).abs() <= 1e-6 * (1.0 + expected.abs()), "{name}({x}) = {}", y[i]);
            let expected = g[i] as f64 * f_prime(x);
            assert!((dx[i] as f64 - expected).abs() <= 2e-6 * (1.0 + expected.abs()), "{name}'({x}) = {}", dx[i]);
        }
    }

    #[test]
    fn gelu_and_its_gradient_match_the_tanh_formula() {
        let xs: Vec<f32> = (-4000..=4000).map(|i| i as f32 / 400.0).collect(); // [-10, 10]
        let c = (2.0 / std::f64::consts::PI).sqrt();
        let u = move |x: f64| c * (x + 0.044715 * x * x * x);
        check_pointwise(
            "gelu_tanh",
            (gelu_tanh, gelu_tanh_in_place, gelu_tanh_backward),
            &xs,
            |x| 0.5 * x * (1.0 + u(x).tanh()),
            |x| {
                let t = u(x).tanh();
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x)
            },
        );
    }

    #[test]
    fn topk_equals_a_full_descending_sort() {
        let row = 97;
        // Repeated values, so that ties are exercised.
        let x: Vec<f32> = (0..5 * row).map(|i| ((i * 7919) % 23) as f32 - 11.0).collect();
        for k in [0, 1, 5, 96, 97] {
            let (values, indices) = topk_rows(&x, row, k);
            for r in 0..5 {
                let xs = &x[r * row..(r + 1) * row];
                let mut order: Vec<usize> = (0..row).collect();
                order.sort_by(|&a, &b| xs[b].total_cmp(&xs[a]).then(a.cmp(&b)));
                for j in 0..k {
                    assert_eq!(indices[r * k + j], order[j] as i64, "row {r} k {k} slot {j}");
                    assert_eq!(values[r * k + j], xs[order[j]]);
                }
            }
        }
    }

    #[test]
    fn silu_and_its_gradient_match_the_definition() {
        let xs: Vec<f32> = (-4000..=4000).map(|i| i as f32 / 200.0).collect(); // [-20, 20]
        let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        check_pointwise(
            "silu",
            (silu, silu_in_place, silu_backward),
            &xs,
            |x| x * sigmoid(x),
            |x| sigmoid(x) * (1.0 + x * (1.0 - sigmoid(x))),
        );
    }

    #[test]
    fn softmax_and_its_gradient_match_the_definition() {
        // Rows of several lengths, remainders and a -inf entry included.
        for row in [1usize, 7, 8, 37, 256] {
            let rows = 300;
            let x: Vec<f32> = (0..rows * row).map(|i| ((i * 7919) % 1000) as f32 / 50.0 - 10.0).collect();
            let mut x = x;
            if row > 1 {
                x[row / 2] = f32::NEG_INFINITY;
            }
            let g: Vec<f32> = (0..rows * row).map(|i| ((i * 104729) % 97) as f32 / 30.0 - 1.5).collect();
            let mut y = x.clone();
            softmax_in_place(&mut y, row);
            let mut dx = vec![0.0; x.len()];
            softmax_backward(&y, &g, &mut dx, row);
            for r in 0..rows {
                let xs = &x[r * row..(r + 1) * row];
                let max = xs.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
                let sum: f64 = xs.iter().map(|&v| (v as f64 - max).exp()).sum();
                let p: Vec<f64> = xs.iter().map(|&v| (v as f64 - max).exp() / sum).collect();
                let dot: f64 = (0..row).map(|j| p[j] * g[r * row + j] as f64).sum();
                let abs_dot: f64 = (0..row).map(|j| p[j] * (g[r * row + j] as f64).abs()).sum();
                for j in 0..row {
                    assert!((y[r * row + j] as f64 - p[j]).abs() <= 1e-6 * p[j] + 1e-12, "row {r} col {j}");
                    let gj = g[r * row + j] as f64;
                    let expected = p[j] * (gj - dot);
                    // f32 rounding of y and of the dot product (which may cancel).
                    let tol = 4e-6 * p[j] * (gj.abs() + abs_dot) + 1e-12;
                    assert!((dx[r * row + j] as f64 - expected).abs() <= tol, "row {r} col {j}: {}", dx[r * row + j]);
                }
            }
        }
    }
}
