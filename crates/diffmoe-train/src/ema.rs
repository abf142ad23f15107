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

use diffmoe_model::DiT;

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
        let blended = ema.mul_scalar(self.decay) + source.reshape(dims).mul_scalar(1.0 - self.decay);
        Param::from_mapped_value(id, blended, mapper)
    }
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
