//! The rectified-flow loss (official `RectifiedFlow.forward`): `t = 0` is
//! noise and `t = 1` is data, `z_t = t * x1 + (1 - t) * z0`, target
//! `u_t = x1 - z0`; the model sees `t` in `[0, 1]` as is.

use burn::tensor::{backend::Backend, Int, Tensor};

use diffmoe_core::Routing;
use diffmoe_model::DiT;

use crate::capacity_loss::capacity_terms;
use crate::loss_terms::LossTerms;

/// The flow loss for given noise `z0` and times `t` (the training loop draws
/// them; passing them in keeps this deterministic). With a learned sigma the
/// second half of the output channels is ignored, as officially. DiffMoE adds
/// `capacity_loss_weight * BCE` per MoE layer; TC's auxiliary losses go into
/// `total` only.
///
/// # Shapes
/// - `x1`, `z0`: `[batch, C, H, W]`, `t`: `[batch]`, `y`: `[batch]`
pub fn flow_loss<B: Backend>(
    model: &DiT<B>,
    x1: Tensor<B, 4>,
    y: Tensor<B, 1, Int>,
    z0: Tensor<B, 4>,
    t: Tensor<B, 1>,
) -> LossTerms<B> {
    let [n, c, ..] = x1.dims();
    let texp = t.clone().reshape([n, 1, 1, 1]);
    let ut = x1.clone() - z0.clone(); // [N, C, H, W]
    let zt = texp.clone() * x1 + (texp.neg() + 1.0) * z0; // [N, C, H, W]
    let output = model.forward(zt.clone(), t, y, Routing::Train);
    let pred = output.output.clone().narrow(1, 0, c); // learned-sigma half dropped
    let mse = (pred - ut.clone()).powi_scalar(2).reshape([n as i32, -1]).mean_dim(1).reshape([n]);
    finish(model, output, mse, None, zt, ut)
}

/// Adds the capacity and auxiliary terms to a per-sample regression loss.
pub(crate) fn finish<B: Backend>(
    model: &DiT<B>,
    output: diffmoe_model::DiTOutput<B>,
    mse: Tensor<B, 1>,
    vb: Option<Tensor<B, 1>>,
    model_input: Tensor<B, 4>,
    target: Tensor<B, 4>,
) -> LossTerms<B> {
    let device = mse.device();
    let weight = model.config.moe.as_ref().map_or(0.0, |m| m.capacity_loss_weight);
    let capacity = capacity_terms(&output.routing);
    let capacity_loss =
        capacity.iter().fold(Tensor::zeros([1], &device), |acc, (_, bce)| acc + bce.clone().mul_scalar(weight));
    let aux_loss = output
        .routing
        .iter()
        .filter_map(|r| r.stats.aux_loss.clone())
        .fold(Tensor::zeros([1], &device), |acc, a| acc + a);
    let mut loss = capacity_loss.clone() + mse.clone().mean();
    if let Some(vb) = &vb {
        loss = loss + vb.clone().mean();
    }
    let total = loss.clone() + aux_loss.clone();
    LossTerms { mse, vb, capacity, capacity_loss, aux_loss, loss, total, model_input, target, output }
}
