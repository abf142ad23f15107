//! Dense feed-forward layers: the GELU `Mlp` of DiT (timm) and the SwiGLU
//! `MoeMLP` of the official `models/modules.py`.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::{backend::Backend, Tensor};

use crate::activation::silu;
use crate::bias::{linear_then, AfterBias};
use crate::init;
use crate::matmul::linear;
use crate::rows::on_rows;

/// `fc2(gelu_tanh(fc1(x)))`, timm's `Mlp` with biases (official `Mlp`).
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `fc1`: `[d_model] -> [d_hidden]`.
    pub fc1: Linear<B>,
    /// `fc2`: `[d_hidden] -> [d_model]`.
    pub fc2: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    /// A new MLP with the official initialisation (Xavier-uniform, zero bias).
    pub fn new(d_model: usize, d_hidden: usize, device: &B::Device) -> Self {
        Self { fc1: init::linear(d_model, d_hidden, true, device), fc2: init::linear(d_hidden, d_model, true, device) }
    }

    /// # Shapes
    /// - `x`: `[..., d_model]` -> `[..., d_model]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        on_rows(x, |x| {
            let h = linear_then(x, &self.fc1, AfterBias::GeluTanh);
            linear_then(h, &self.fc2, AfterBias::Nothing)
        })
    }
}

/// `down(silu(gate(x)) * up(x))` without biases (official `MoeMLP`).
///
/// The official layer splits the matmuls into `pretraining_tp = 2` slices and
/// sums the two down projections; that is the same sum in another order, so it
/// is computed here in one piece. (With `d_hidden % 2 != 0` the official code
/// silently drops the remainder rows; no preset of the paper reaches that case.)
#[derive(Module, Debug)]
pub struct SwiGluMlp<B: Backend> {
    /// `gate_proj`: `[d_model] -> [d_hidden]`.
    pub gate_proj: Linear<B>,
    /// `up_proj`: `[d_model] -> [d_hidden]`.
    pub up_proj: Linear<B>,
    /// `down_proj`: `[d_hidden] -> [d_model]`.
    pub down_proj: Linear<B>,
}

impl<B: Backend> SwiGluMlp<B> {
    /// A new SwiGLU MLP with the official initialisation (Xavier-uniform).
    pub fn new(d_model: usize, d_hidden: usize, device: &B::Device) -> Self {
        Self {
            gate_proj: init::linear(d_model, d_hidden, false, device),
            up_proj: init::linear(d_model, d_hidden, false, device),
            down_proj: init::linear(d_hidden, d_model, false, device),
        }
    }

    /// # Shapes
    /// - `x`: `[..., d_model]` -> `[..., d_model]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        on_rows(x, |x| {
            let gate = silu(linear(x.clone(), &self.gate_proj));
            linear(gate * linear(x, &self.up_proj), &self.down_proj)
        })
    }
}

/// A dense feed-forward layer of either kind.
// Variants are not boxed: burn's `Module` derive needs them as they are,
// and a model holds one per block.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum FeedForward<B: Backend> {
    /// GELU (tanh) MLP with biases.
    Gelu(Mlp<B>),
    /// SwiGLU MLP without biases.
    SwiGlu(SwiGluMlp<B>),
}

impl<B: Backend> FeedForward<B> {
    /// # Shapes
    /// - `x`: `[..., d_model]` -> `[..., d_model]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::Gelu(mlp) => mlp.forward(x),
            Self::SwiGlu(mlp) => mlp.forward(x),
        }
    }
}
