//! The mid-block attention of the SD VAE: diffusers `Attention` with
//! `AttnProcessor2_0` as `UNetMidBlock2D` builds it
//! (`diffusers/models/attention_processor.py`): one head with
//! `head_dim = channels`, GroupNorm eps 1e-6, biased q/k/v/out linears, a
//! residual and `rescale_output_factor` 1. The LDM original is `AttnBlock`
//! with 1x1 convs (`ldm/modules/diffusionmodules/model.py`).

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{activation::softmax, backend::Backend, Tensor};

use crate::group_norm::GroupNorm;

/// `x + to_out(softmax(q k^T / sqrt(C)) v)` over the `H*W` positions of
/// `group_norm(x)` in row-major order (`token = y * W + x`).
#[derive(Module, Debug)]
pub struct MidBlockAttention<B: Backend> {
    /// diffusers `group_norm` (LDM `norm`).
    pub group_norm: GroupNorm<B>,
    /// diffusers `to_q` (legacy `query`, LDM `q`).
    pub to_q: Linear<B>,
    /// diffusers `to_k` (legacy `key`, LDM `k`).
    pub to_k: Linear<B>,
    /// diffusers `to_v` (legacy `value`, LDM `v`).
    pub to_v: Linear<B>,
    /// diffusers `to_out.0` (legacy `proj_attn`, LDM `proj_out`); `to_out.1`
    /// is a parameter-free `Dropout(0)`.
    pub to_out: Linear<B>,
}

impl<B: Backend> MidBlockAttention<B> {
    /// Attention over `channels` channels.
    pub fn new(channels: usize, groups: usize, device: &B::Device) -> Self {
        let linear = || LinearConfig::new(channels, channels).init(device);
        Self {
            group_norm: GroupNorm::new(groups, channels, device),
            to_q: linear(),
            to_k: linear(),
            to_v: linear(),
            to_out: linear(),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, channels, height, width]` -> same
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [batch, channels, height, width] = x.dims();
        let residual = x.clone();
        let tokens = self.group_norm.forward(x).reshape([batch, channels, height * width]).swap_dims(1, 2); // [batch, tokens, channels]
        let q = self.to_q.forward(tokens.clone()); // [batch, tokens, channels]
        let k = self.to_k.forward(tokens.clone()); // [batch, tokens, channels]
        let v = self.to_v.forward(tokens); // [batch, tokens, channels]
                                           // SDPA's default scale 1/sqrt(head_dim), with one head of C channels.
        let scale = 1.0 / (channels as f64).sqrt();
        let scores = q.matmul(k.swap_dims(1, 2)).mul_scalar(scale); // [batch, queries, keys]
        let weights = softmax(scores, 2); // over the keys
        let out = self.to_out.forward(weights.matmul(v)); // [batch, tokens, channels]
        let out = out.swap_dims(1, 2).reshape([batch, channels, height, width]); // [batch, channels, height, width]
        out + residual
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::module::Param;
    use burn::tensor::{Distribution, TensorData};

    type B = Flex;

    fn set(l: &mut Linear<B>, w: Vec<f32>, c: usize) {
        let device = Default::default();
        l.weight = Param::from_tensor(Tensor::from_data(TensorData::new(w, [c, c]), &device));
        l.bias = Some(Param::from_tensor(Tensor::zeros([c], &device)));
    }

    #[test]
    fn zero_output_projection_keeps_the_residual() {
        let device = Default::default();
        let mut attn = MidBlockAttention::<B>::new(4, 2, &device);
        set(&mut attn.to_out, vec![0.0; 16], 4);
        let x = Tensor::<B, 4>::random([2, 4, 3, 5], Distribution::Default, &device);
        let diff: f32 = (attn.forward(x.clone()) - x).abs().max().into_scalar();
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn identical_keys_average_the_values() {
        // With q = k = 0 the softmax is uniform, so every token gets the mean of v
        // over the positions of its own sample.
        let device = Default::default();
        let c = 2;
        let mut attn = MidBlockAttention::<B>::new(c, 1, &device);
        set(&mut attn.to_q, vec![0.0; 4], c);
        set(&mut attn.to_k, vec![0.0; 4], c);
        set(&mut attn.to_v, vec![1.0, 0.0, 0.0, 1.0], c);
        set(&mut attn.to_out, vec![1.0, 0.0, 0.0, 1.0], c);
        let x = Tensor::<B, 4>::random([2, c, 2, 3], Distribution::Normal(0.0, 2.0), &device);
        let out = attn.forward(x.clone()) - x.clone();
        let normed = attn.group_norm.forward(x);
        let expected = normed.mean_dim(3).mean_dim(2); // [batch, channels, 1, 1]
        let diff: f32 = (out - expected).abs().max().into_scalar();
        assert!(diff < 1e-5, "{diff}");
    }
}
