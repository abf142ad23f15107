//! The exponential moving average of the weights that DiT-style models are
//! sampled from (official `train.py` `update_ema`, decay 0.9999).
//!
//! Like the official code, the average runs over **every** float tensor of
//! the model, buffers included: the EMA model's `expert_threshold` is an EMA
//! of the training thresholds (which are themselves an EMA of the per-step
//! quantiles), and the constant `pos_embed` and `ema_decay` buffers are
//! "averaged" into themselves.

use std::collections::BTreeMap;

use burn::module::Param;
use burn::tensor::{backend::Backend, Tensor};
use rayon::prelude::*;

use diffmoe_core::{flex_contiguous, flex_f32, flex_from_vec, from_flex};
use diffmoe_model::DiT;

use crate::adamw_kernel::TASK_ELEMS;
use crate::param_path::{map_named, visit_named, NamedMapper, NamedVisitor};

/// The EMA model and its decay.
#[derive(Debug, Clone)]
pub struct Ema<B: Backend> {
    /// The averaged weights.
    pub model: DiT<B>,
    /// `ema <- decay * ema + (1 - decay) * model` at every optimizer step.
    pub decay: f64,
}

/// Every float tensor of a model, flattened to `[numel]`, by name.
fn flatten<B: Backend>(model: &DiT<B>) -> BTreeMap<String, Tensor<B, 1>> {
    struct Flatten<B: Backend>(BTreeMap<String, Tensor<B, 1>>);
    impl<B: Backend> NamedVisitor<B> for Flatten<B> {
        fn visit<const D: usize>(&mut self, name: String, param: &Param<Tensor<B, D>>) {
            let value = param.val();
            let numel = value.shape().num_elements();
            self.0.insert(name, value.reshape([numel]));
        }
    }
    let mut flat = Flatten(BTreeMap::new());
    visit_named(model, &mut flat);
    flat.0
}

struct Blend<B: Backend> {
    source: BTreeMap<String, Tensor<B, 1>>,
    decay: f64,
}

impl<B: Backend> NamedMapper<B> for Blend<B> {
    fn map<const D: usize>(&mut self, name: String, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, ema, mapper) = param.consume();
        let source = self.source.remove(&name).unwrap_or_else(|| panic!("EMA: the model has no parameter {name}"));
        let dims = ema.dims();
        // Official: ema.mul_(decay).add_(param, alpha=1 - decay).
        let blended = blend(ema, source.reshape(dims), self.decay);
        Param::from_mapped_value(id, blended, mapper)
    }
}

/// `ema * decay + source * (1 - decay)`: in one pass on the CPU backend, as
/// tensor ops elsewhere. Both give the same bits: each product rounded to
/// f32 with its scalar rounded to f32, then the sum (Rust does not contract
/// them into an FMA). The tensor ops make about five passes over memory;
/// over DiffMoE-S-E16's 140M parameters that was a tenth of a CPU step.
///
/// # Shapes
/// - `ema`, `source`: equal shapes -> the same shape
fn blend<B: Backend, const D: usize>(ema: Tensor<B, D>, source: Tensor<B, D>, decay: f64) -> Tensor<B, D> {
    let (Ok(e), Ok(s)) = (flex_f32(ema.clone()), flex_f32(source.clone())) else {
        return ema.mul_scalar(decay) + source.mul_scalar(1.0 - decay);
    };
    let (e, s) = (flex_contiguous(e), flex_contiguous(s));
    let (e, s): (&[f32], &[f32]) = (e.storage(), s.storage());
    assert_eq!(e.len(), s.len(), "EMA: a parameter and its average differ in size");
    let (d, c) = (decay as f32, (1.0 - decay) as f32);
    let n = e.len();
    let mut out = Vec::with_capacity(n);
    let tasks = out.spare_capacity_mut()[..n].par_chunks_mut(TASK_ELEMS);
    tasks.zip(e.par_chunks(TASK_ELEMS)).zip(s.par_chunks(TASK_ELEMS)).for_each(|((out, e), s)| {
        for ((o, &e), &s) in out.iter_mut().zip(e).zip(s) {
            o.write(e * d + s * c);
        }
    });
    // SAFETY: all `n` elements were written above.
    unsafe { out.set_len(n) };
    from_flex(flex_from_vec(out, ema.shape()))
}

impl<B: Backend> Ema<B> {
    /// An EMA starting at `model` (official `update_ema(ema, model, decay=0)`).
    pub fn new(model: DiT<B>, decay: f64) -> Self {
        Self { model, decay }
    }

    /// One EMA step towards `model` (its inference copy, `model.valid()`).
    ///
    /// # Panics
    /// If `model` is not the same network as the EMA.
    pub fn update(&mut self, model: &DiT<B>) {
        let mut blend = Blend { source: flatten(model), decay: self.decay };
        self.model = map_named(self.model.clone(), &mut blend);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use diffmoe_model::preset;

    #[test]
    fn the_cpu_blend_gives_the_bits_of_the_tensor_ops() {
        use burn::backend::NdArray;
        use burn::tensor::Distribution;
        let device = Default::default();
        let e = Tensor::<Flex, 2>::random([300, 7], Distribution::Normal(0.0, 1.0), &device);
        let s = Tensor::<Flex, 2>::random([300, 7], Distribution::Normal(0.0, 1.0), &device);
        let bits =
            |t: Tensor<Flex, 2>| t.into_data().to_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for decay in [0.9999, 0.75, 0.0] {
            let expected = e.clone().mul_scalar(decay) + s.clone().mul_scalar(1.0 - decay);
            let kept = e.clone(); // shared with the caller: must not be written
            assert_eq!(bits(blend(e.clone(), s.clone(), decay)), bits(expected));
            assert_eq!(bits(kept), bits(e.clone()));
            // The tensor ops of another backend, the same bits.
            let to_nd = |t: &Tensor<Flex, 2>| Tensor::<NdArray, 2>::from_data(t.to_data(), &Default::default());
            let nd = blend(to_nd(&e), to_nd(&s), decay);
            assert_eq!(bits(Tensor::from_data(nd.into_data(), &device)), bits(blend(e.clone(), s.clone(), decay)));
        }
    }

    #[test]
    fn ema_moves_every_tensor_by_one_minus_decay_buffers_included() {
        let config = preset("diffmoe-tiny-e8-flow").unwrap().model;
        let device = Default::default();
        let a = config.init::<Flex>(&device);
        let b = config.init::<Flex>(&device);
        let mut ema = Ema::new(a.clone(), 0.75);
        ema.update(&b);
        let (fa, fb, fe) = (flatten(&a), flatten(&b), flatten(&ema.model));
        assert_eq!(fe.len(), fa.len());
        for (k, e) in fe {
            let expected = fa[&k].clone().mul_scalar(0.75) + fb[&k].clone().mul_scalar(0.25);
            let diff: f32 = (e - expected).abs().max().into_scalar();
            assert!(diff <= 1e-6, "{k}: {diff}");
        }
    }
}
