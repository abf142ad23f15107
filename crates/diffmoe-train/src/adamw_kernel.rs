//! The AdamW update as one pass over parameter, gradient and moments, in
//! place, on burn's CPU backend.
//!
//! Written with tensor ops the update is a dozen passes over memory, each
//! allocating its result; for a MoE model, whose optimizer touches every
//! expert (four times the parameters of the dense model of equal activated
//! size), that was a quarter of a CPU training step. The arithmetic is the
//! same f32 operations in the same order as [`crate::AdamW`]'s tensor path,
//! so both give the same bits.

use burn::tensor::{backend::Backend, DType, Tensor};
use rayon::prelude::*;

use diffmoe_core::{flex_contiguous, flex_f32, from_flex};

/// Elements per rayon task of the trainer's passes over the parameters:
/// AdamW here, the EMA blend and the gradient norm.
pub(crate) const TASK_ELEMS: usize = 64 * 1024;

/// The per-step constants of the update, rounded to f32 as the tensor ops
/// round their scalars.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamWStep {
    /// `1 - lr * weight_decay`, or `None` without weight decay.
    pub decay: Option<f64>,
    /// `1 - beta1`.
    pub one_minus_beta1: f64,
    /// `beta2`.
    pub beta2: f64,
    /// `1 - beta2`.
    pub one_minus_beta2: f64,
    /// `sqrt(1 - beta2^t)`.
    pub bias_correction2_sqrt: f64,
    /// `epsilon`.
    pub epsilon: f64,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f64,
}

/// One element's update, in the order of the tensor path:
/// `p *= decay; m += (g - m)(1 - b1); v = v b2 + g^2 (1 - b2);`
/// `p -= m / (sqrt(v) / bc2 + eps) * step_size`.
#[inline(always)]
fn update(p: &mut f32, g: f32, m: &mut f32, v: &mut f32, c: &[f32; 7], decay: bool) {
    let [decay_f, c1, b2, c2, bc2, eps, step] = *c;
    let pv = if decay { *p * decay_f } else { *p };
    *m += (g - *m) * c1;
    *v = *v * b2 + (g * g) * c2;
    let denom = v.sqrt() / bc2 + eps;
    *p = pv - (*m / denom) * step;
}

/// Applies the update in place to slices of equal length.
pub(crate) fn adamw_in_place(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], step: &AdamWStep) {
    assert!(p.len() == g.len() && p.len() == m.len() && p.len() == v.len(), "AdamW: slice lengths differ");
    let c = [
        step.decay.unwrap_or(1.0) as f32,
        step.one_minus_beta1 as f32,
        step.beta2 as f32,
        step.one_minus_beta2 as f32,
        step.bias_correction2_sqrt as f32,
        step.epsilon as f32,
        step.step_size as f32,
    ];
    let decay = step.decay.is_some();
    p.par_chunks_mut(TASK_ELEMS)
        .zip(g.par_chunks(TASK_ELEMS))
        .zip(m.par_chunks_mut(TASK_ELEMS))
        .zip(v.par_chunks_mut(TASK_ELEMS))
        .for_each(|(((p, g), m), v)| update_chunk_best(p, g, m, v, &c, decay));
}

/// [`update`] over a chunk.
#[inline(always)]
fn update_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: &[f32; 7], decay: bool) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        update(p, g, m, v, c, decay);
    }
}

/// [`update_chunk`] compiled for AVX-512F, or else AVX2, when the CPU has
/// it: sixteen or eight lanes of the same IEEE operations (Rust never
/// contracts a multiply and an add into an FMA), so the same bits; the
/// update is bound by its two divisions and square root, which run at the
/// vector width.
fn update_chunk_best(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: &[f32; 7], decay: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx2")]
        unsafe fn avx512(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: &[f32; 7], decay: bool) {
            update_chunk(p, g, m, v, c, decay)
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F.
            return unsafe { avx512(p, g, m, v, c, decay) };
        }
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: &[f32; 7], decay: bool) {
            update_chunk(p, g, m, v, c, decay)
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2.
            return unsafe { avx2(p, g, m, v, c, decay) };
        }
    }
    update_chunk(p, g, m, v, c, decay)
}

/// The updated `[param, exp_avg, exp_avg_sq]`: in one in-place pass on the
/// CPU backend ([`fused_adamw`]), with tensor ops elsewhere
/// ([`tensor_update`]); the same bits either way.
///
/// # Shapes
/// - `[param, grad, exp_avg, exp_avg_sq]`: each `[numel]`
pub(crate) fn adamw_update<B: Backend>(tensors: [Tensor<B, 1>; 4], step: &AdamWStep) -> [Tensor<B, 1>; 3] {
    fused_adamw(tensors, step).unwrap_or_else(|tensors| tensor_update(tensors, step))
}

/// The update as tensor ops, for any backend.
fn tensor_update<B: Backend>(
    [param, grad, exp_avg, exp_avg_sq]: [Tensor<B, 1>; 4],
    step: &AdamWStep,
) -> [Tensor<B, 1>; 3] {
    let param = match step.decay {
        Some(decay) => param.mul_scalar(decay),
        None => param,
    };
    let exp_avg = exp_avg.clone() + (grad.clone() - exp_avg).mul_scalar(step.one_minus_beta1);
    let exp_avg_sq = exp_avg_sq.mul_scalar(step.beta2) + (grad.clone() * grad).mul_scalar(step.one_minus_beta2);
    let denom = exp_avg_sq.clone().sqrt().div_scalar(step.bias_correction2_sqrt).add_scalar(step.epsilon);
    let param = param - (exp_avg.clone() / denom).mul_scalar(step.step_size);
    [param, exp_avg, exp_avg_sq]
}

/// The updated `(param, exp_avg, exp_avg_sq)` computed in place when `B` is
/// the CPU backend and all four tensors hold f32; the inputs back otherwise.
///
/// # Shapes
/// - `[param, grad, exp_avg, exp_avg_sq]`: each `[numel]`
pub(crate) fn fused_adamw<B: Backend>(
    [param, grad, exp_avg, exp_avg_sq]: [Tensor<B, 1>; 4],
    step: &AdamWStep,
) -> Result<[Tensor<B, 1>; 3], [Tensor<B, 1>; 4]> {
    let all_f32 = [&param, &grad, &exp_avg, &exp_avg_sq].iter().all(|t| t.dtype() == DType::F32);
    let param = match flex_f32(param) {
        Ok(p) if all_f32 => p,
        Ok(p) => return Err([from_flex(p), grad, exp_avg, exp_avg_sq]),
        Err(p) => return Err([p, grad, exp_avg, exp_avg_sq]),
    };
    let flex = |t: Tensor<B, 1>| flex_contiguous(flex_f32(t).unwrap_or_else(|_| unreachable!("B is Flex, dtype f32")));
    let (mut p, g, mut m, mut v) = (flex_contiguous(param), flex(grad), flex(exp_avg), flex(exp_avg_sq));
    // `storage_mut` copies a buffer that is shared (a parameter still held
    // elsewhere), so the update never writes through another tensor.
    adamw_in_place(p.storage_mut(), g.storage(), m.storage_mut(), v.storage_mut(), step);
    Ok([from_flex(p), from_flex(m), from_flex(v)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    #[test]
    fn equals_the_tensor_formula_bit_for_bit() {
        let device = Default::default();
        let n = 200_003; // several rayon tasks and a ragged tail
        let rand = |std: f64| Tensor::<Flex, 1>::random([n], Distribution::Normal(0.0, std), &device);
        let (p, g, m) = (rand(1.0), rand(0.1), rand(0.01));
        let v = rand(0.001).abs();
        for decay in [None, Some(1.0 - 1e-3 * 0.01)] {
            let step = AdamWStep {
                decay,
                one_minus_beta1: 1.0 - 0.9,
                beta2: 0.999,
                one_minus_beta2: 1.0 - 0.999,
                bias_correction2_sqrt: (1.0f64 - 0.999f64.powi(3)).sqrt(),
                epsilon: 1e-8,
                step_size: 1e-3 / (1.0 - 0.9f64.powi(3)),
            };
            let expected = tensor_update([p.clone(), g.clone(), m.clone(), v.clone()], &step)
                .map(|t| t.into_data().to_vec::<f32>().unwrap());
            let kept = p.clone(); // shared: must not be written through
            let got =
                fused_adamw([p.clone(), g.clone(), m.clone(), v.clone()], &step).unwrap_or_else(|_| panic!("Flex"));
            let got = got.map(|t| t.into_data().to_vec::<f32>().unwrap());
            assert_eq!(got, expected);
            assert_eq!(kept.into_data().to_vec::<f32>().unwrap(), p.clone().into_data().to_vec::<f32>().unwrap());
        }
    }
}
