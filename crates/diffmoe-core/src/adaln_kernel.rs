//! The adaLN passes of a DiT block on the CPU, forward and backward, one
//! pass over memory each: the modulated LayerNorm
//! `layer_norm(x) * (1 + scale) + shift` and the gated residual
//! `x + gate * h`, with `shift`, `scale` and `gate` one row per image.
//!
//! Composed of burn ops these are a dozen passes over the `[images, tokens,
//! d_model]` activations forward (mean, centring, variance, division, the
//! broadcast copies of the conditioning rows, product, sum) and more
//! backward; at `d_model` 128 they cost about as much as the block's
//! products. Rows are split over rayon's threads in chunks inside one
//! image, so that the sums over an image's tokens (the gradients of `shift`,
//! `scale` and `gate`) are per-chunk partial sums added in chunk order: the
//! same bits on any number of threads.

use core::mem::MaybeUninit;

use crate::cpu_kernels::{multiversion, row_dot, row_sum};
use crate::row_groups::{filled, RowGroups};

/// LayerNorm's epsilon in DiT (`nn.LayerNorm(..., eps=1e-6)`).
pub(crate) const LAYER_NORM_EPS: f32 = 1e-6;

/// `(mean, 1 / sqrt(var + eps))` of a row (biased variance, two passes).
#[inline(always)]
fn row_moments(x: &[f32]) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = row_sum(x) / n;
    let mut acc = [0.0f32; 8];
    let chunks = x.chunks_exact(acc.len());
    let rest: f32 = chunks.remainder().iter().map(|&v| (v - mean) * (v - mean)).sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += (v - mean) * (v - mean);
        }
    }
    let var = (acc.iter().sum::<f32>() + rest) / n;
    (mean, 1.0 / (var + LAYER_NORM_EPS).sqrt())
}

/// Rows of one image: `y = (x - mean) * rstd * (1 + scale) + shift`, and
/// each row's `(mean, rstd)` into `stats`.
#[inline(always)]
fn modulate_rows(x: &[f32], y: &mut [MaybeUninit<f32>], stats: &mut [MaybeUninit<f32>], shift: &[f32], scale: &[f32]) {
    let d = shift.len();
    for ((x, y), st) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).zip(stats.chunks_exact_mut(2)) {
        let (mean, rstd) = row_moments(x);
        for (((y, &x), &b), &s) in y.iter_mut().zip(x).zip(shift).zip(scale) {
            y.write((x - mean) * rstd * (1.0 + s) + b);
        }
        st[0].write(mean);
        st[1].write(rstd);
    }
}

/// Rows of one image, backward: `dx`, and the sums over the rows of
/// `g` and `g * x_hat` added into `sums` (`[d_shift | d_scale]`);
/// `scratch` holds `2 * width` elements.
#[inline(always)]
fn modulate_backward_rows(
    x: &[f32],
    g: &[f32],
    stats: &[f32],
    scale: &[f32],
    dx: &mut [MaybeUninit<f32>],
    sums: &mut [f32],
    scratch: &mut [f32],
) {
    let d = scale.len();
    let n = d as f32;
    let (d_shift, d_scale) = sums.split_at_mut(d);
    let (x_hat, g_hat) = scratch.split_at_mut(d);
    for (((x, g), st), dx) in
        x.chunks_exact(d).zip(g.chunks_exact(d)).zip(stats.chunks_exact(2)).zip(dx.chunks_exact_mut(d))
    {
        let (mean, rstd) = (st[0], st[1]);
        for ((((xh, gh), &x), &g), &s) in x_hat.iter_mut().zip(g_hat.iter_mut()).zip(x).zip(g).zip(scale) {
            *xh = (x - mean) * rstd;
            *gh = g * (1.0 + s);
        }
        for (((ds, dc), &g), &xh) in d_shift.iter_mut().zip(d_scale.iter_mut()).zip(g).zip(x_hat.iter()) {
            *ds += g;
            *dc += g * xh;
        }
        // dx = rstd (g_hat - mean(g_hat) - x_hat mean(g_hat x_hat)).
        let (a, b) = (row_sum(g_hat) / n, row_dot(g_hat, x_hat) / n);
        for ((dx, &gh), &xh) in dx.iter_mut().zip(g_hat.iter()).zip(x_hat.iter()) {
            dx.write(rstd * (gh - a - xh * b));
        }
    }
}

/// Rows of one image: `y = x + gate * h`.
#[inline(always)]
fn gate_rows(x: &[f32], h: &[f32], y: &mut [MaybeUninit<f32>], gate: &[f32]) {
    let d = gate.len();
    for ((x, h), y) in x.chunks_exact(d).zip(h.chunks_exact(d)).zip(y.chunks_exact_mut(d)) {
        for (((y, &x), &h), &a) in y.iter_mut().zip(x).zip(h).zip(gate) {
            y.write(x + a * h);
        }
    }
}

/// Rows of one image, backward: `dh = gate * g`, and the sum over the
/// rows of `g * h` added into `sums`.
#[inline(always)]
fn gate_backward_rows(h: &[f32], g: &[f32], dh: &mut [MaybeUninit<f32>], gate: &[f32], sums: &mut [f32]) {
    let d = gate.len();
    for ((h, g), dh) in h.chunks_exact(d).zip(g.chunks_exact(d)).zip(dh.chunks_exact_mut(d)) {
        for ((((dh, &h), &g), &a), s) in dh.iter_mut().zip(h).zip(g).zip(gate).zip(sums.iter_mut()) {
            dh.write(a * g);
            *s += g * h;
        }
    }
}

multiversion!(modulate_rows_best, modulate_rows, (x: &[f32], y: &mut [MaybeUninit<f32>], stats: &mut [MaybeUninit<f32>], shift: &[f32], scale: &[f32]));
multiversion!(modulate_backward_rows_best, modulate_backward_rows, (x: &[f32], g: &[f32], stats: &[f32], scale: &[f32], dx: &mut [MaybeUninit<f32>], sums: &mut [f32], scratch: &mut [f32]));
multiversion!(gate_rows_best, gate_rows, (x: &[f32], h: &[f32], y: &mut [MaybeUninit<f32>], gate: &[f32]));
multiversion!(gate_backward_rows_best, gate_backward_rows, (h: &[f32], g: &[f32], dh: &mut [MaybeUninit<f32>], gate: &[f32], sums: &mut [f32]));

/// `layer_norm(x) * (1 + scale) + shift` and each row's `(mean, rstd)`.
///
/// # Shapes
/// - `x`: `[images, tokens, width]`, `shift`, `scale`: `[images, width]`
///   -> (`[images, tokens, width]`, `[images * tokens, 2]`)
pub(crate) fn modulated_layer_norm(shape: RowGroups, x: &[f32], shift: &[f32], scale: &[f32]) -> (Vec<f32>, Vec<f32>) {
    shape.check("modulated_layer_norm", &[x], &[shift, scale]);
    let d = shape.width;
    let rows = shape.groups * shape.rows;
    let mut stats = Vec::with_capacity(rows * 2);
    let y = filled(shape.len(), |y| {
        let st = shape.chunks_of(&mut stats.spare_capacity_mut()[..rows * 2], 2);
        let outs = shape.chunks_of(y, d).into_iter().zip(st).collect();
        shape.for_each_chunk(outs, |n, rows, (y, st)| {
            let (shift, scale) = (&shift[n * d..][..d], &scale[n * d..][..d]);
            modulate_rows_best(&x[shape.span(n, &rows, d)], y, st, shift, scale);
        });
    });
    // SAFETY: the chunks wrote every row's two statistics.
    unsafe { stats.set_len(rows * 2) };
    (y, stats)
}

/// The gradients of [`modulated_layer_norm`] with respect to `x`, `shift`
/// and `scale`, given the output's gradient `g` and the forward pass's
/// statistics.
///
/// # Shapes
/// - `x`, `g`: `[images, tokens, width]`, `scale`: `[images, width]`,
///   `stats`: `[images * tokens, 2]` -> (`[images, tokens, width]`,
///   `[images, width]`, `[images, width]`)
pub(crate) fn modulated_layer_norm_backward(
    shape: RowGroups,
    x: &[f32],
    g: &[f32],
    scale: &[f32],
    stats: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    shape.check("modulated_layer_norm backward", &[x, g], &[scale]);
    assert_eq!(stats.len(), shape.groups * shape.rows * 2, "modulated_layer_norm backward: statistics");
    let d = shape.width;
    let mut sums = Vec::new();
    let dx = filled(shape.len(), |dx| {
        sums = shape.chunk_sums(2 * d, shape.chunks_of(dx, d), |n, rows, dx, sums| {
            let span = shape.span(n, &rows, d);
            let st = &stats[shape.span(n, &rows, 2)];
            let mut scratch = vec![0.0f32; 2 * d];
            modulate_backward_rows_best(&x[span.clone()], &g[span], st, &scale[n * d..][..d], dx, sums, &mut scratch);
        });
    });
    let (mut d_shift, mut d_scale) = (Vec::with_capacity(shape.groups * d), Vec::with_capacity(shape.groups * d));
    for image in sums.chunks_exact(2 * d) {
        d_shift.extend_from_slice(&image[..d]);
        d_scale.extend_from_slice(&image[d..]);
    }
    (dx, d_shift, d_scale)
}

/// `x + gate * h`.
///
/// # Shapes
/// - `x`, `h`: `[images, tokens, width]`, `gate`: `[images, width]` ->
///   `[images, tokens, width]`
pub(crate) fn gated_residual(shape: RowGroups, x: &[f32], gate: &[f32], h: &[f32]) -> Vec<f32> {
    shape.check("gated_residual", &[x, h], &[gate]);
    let d = shape.width;
    filled(shape.len(), |y| {
        shape.for_each_chunk(shape.chunks_of(y, d), |n, rows, y| {
            let span = shape.span(n, &rows, d);
            gate_rows_best(&x[span.clone()], &h[span], y, &gate[n * d..][..d]);
        });
    })
}

/// The gradients of [`gated_residual`] with respect to `h` and `gate` (that
/// of `x` is `g`).
///
/// # Shapes
/// - `h`, `g`: `[images, tokens, width]`, `gate`: `[images, width]` ->
///   (`[images, tokens, width]`, `[images, width]`)
pub(crate) fn gated_residual_backward(shape: RowGroups, h: &[f32], g: &[f32], gate: &[f32]) -> (Vec<f32>, Vec<f32>) {
    shape.check("gated_residual backward", &[h, g], &[gate]);
    let d = shape.width;
    let mut d_gate = Vec::new();
    let dh = filled(shape.len(), |dh| {
        d_gate = shape.chunk_sums(d, shape.chunks_of(dh, d), |n, rows, dh, sums| {
            let span = shape.span(n, &rows, d);
            gate_backward_rows_best(&h[span.clone()], &g[span], dh, &gate[n * d..][..d], sums);
        });
    });
    (dh, d_gate)
}
