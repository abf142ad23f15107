//! Gradients gathered from one or more backward passes, by parameter name:
//! the buffer that gradient accumulation sums into, that replicas all-reduce,
//! whose global norm is logged and clipped, and that the optimizer consumes.

use std::collections::BTreeMap;

use burn::module::Param;
use burn::tensor::{backend::AutodiffBackend, Tensor};

use diffmoe_model::DiT;

use crate::param_path::{visit_named, NamedVisitor};

/// Flattened gradients `[numel]` per trainable parameter, summed over the
/// backward passes added so far.
#[derive(Debug)]
pub struct GradientBuffer<B: AutodiffBackend> {
    grads: BTreeMap<String, Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> Default for GradientBuffer<B> {
    fn default() -> Self {
        Self { grads: BTreeMap::new() }
    }
}

struct Collect<'a, B: AutodiffBackend> {
    grads: &'a B::Gradients,
    into: &'a mut BTreeMap<String, Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> NamedVisitor<B> for Collect<'_, B> {
    fn visit<const D: usize>(&mut self, key: String, param: &Param<Tensor<B, D>>) {
        let Some(grad) = param.val().grad(self.grads) else { return };
        let numel = grad.shape().num_elements();
        let grad = grad.reshape([numel]); // [numel]
        let summed = match self.into.remove(&key) {
            Some(previous) => previous + grad,
            None => grad,
        };
        self.into.insert(key, summed);
    }
}

impl<B: AutodiffBackend> GradientBuffer<B> {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the gradients of one backward pass through `model` (summed, as
    /// PyTorch's `.grad` accumulates).
    pub fn accumulate(&mut self, model: &DiT<B>, grads: &B::Gradients) {
        visit_named(model, &mut Collect::<B> { grads, into: &mut self.grads });
    }

    /// Whether nothing has been accumulated.
    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    /// `[1]`: the squared global L2 norm over all parameters, on the device.
    pub fn squared_norm(&self) -> Option<Tensor<B::InnerBackend, 1>> {
        self.grads.values().map(|g| g.clone().powi_scalar(2).sum()).reduce(|a, b| a + b)
    }

    /// Multiplies every gradient by `factor` (gradient clipping).
    pub fn scale(&mut self, factor: f64) {
        for g in self.grads.values_mut() {
            *g = g.clone().mul_scalar(factor);
        }
    }

    /// The gradient of a parameter.
    pub fn get(&self, name: &str) -> Option<&Tensor<B::InnerBackend, 1>> {
        self.grads.get(name)
    }

    /// Every gradient by name, for in-place reduction across replicas.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&String, &mut Tensor<B::InnerBackend, 1>)> {
        self.grads.iter_mut()
    }

    /// Removes the gradient of a parameter (the optimizer consumes them).
    pub(crate) fn take(&mut self, name: &str) -> Option<Tensor<B::InnerBackend, 1>> {
        self.grads.remove(name)
    }
}
