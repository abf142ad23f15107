//! Gradients laid out as a model, so they can be read under the official
//! parameter names like the weights themselves.

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{backend::AutodiffBackend, Tensor};

use diffmoe_model::DiT;

struct GradientMapper<'a, B: AutodiffBackend> {
    grads: &'a B::Gradients,
}

impl<B: AutodiffBackend> ModuleMapper<B> for GradientMapper<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let grad = match tensor.grad(self.grads) {
            Some(g) => Tensor::from_inner(g),
            None => tensor.zeros_like().detach(),
        };
        Param::from_mapped_value(id, grad, mapper)
    }
}

/// A copy of `model` whose every parameter holds its gradient (zeros where
/// the parameter received none, e.g. buffers and `pos_embed`).
pub fn gradient_model<B: AutodiffBackend>(model: &DiT<B>, grads: &B::Gradients) -> DiT<B> {
    model.clone().map(&mut GradientMapper { grads })
}
