//! diffusers `UNetMidBlock2D` as the SD VAE's encoder and decoder build it
//! (`diffusers/models/unets/unet_2d_blocks.py`, `temb_channels=None`,
//! `add_attention=True`): resnet, attention, resnet, all at one width.

use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor};

use crate::activations::Recorder;
use crate::attention::MidBlockAttention;
use crate::resnet::ResnetBlock2d;

/// `resnets.1(attentions.0(resnets.0(x)))`.
#[derive(Module, Debug)]
pub struct MidBlock2d<B: Backend> {
    /// Two resnets (LDM `block_1`, `block_2`).
    pub resnets: Vec<ResnetBlock2d<B>>,
    /// One attention (LDM `attn_1`).
    pub attentions: Vec<MidBlockAttention<B>>,
}

impl<B: Backend> MidBlock2d<B> {
    /// A mid-block of `channels` channels.
    pub fn new(channels: usize, groups: usize, device: &B::Device) -> Self {
        Self {
            resnets: vec![
                ResnetBlock2d::new(channels, channels, groups, device),
                ResnetBlock2d::new(channels, channels, groups, device),
            ],
            attentions: vec![MidBlockAttention::new(channels, groups, device)],
        }
    }

    /// # Shapes
    /// - `x`: `[batch, channels, height, width]` -> same
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.forward_recorded(x, "mid_block", &mut Recorder::off())
    }

    /// [`Self::forward`], recording `{path}.resnets.0`, `{path}.attentions.0` and `{path}`.
    pub(crate) fn forward_recorded(&self, x: Tensor<B, 4>, path: &str, rec: &mut Recorder<'_, B>) -> Tensor<B, 4> {
        let mut h = self.resnets[0].forward(x);
        rec.record(|| format!("{path}.resnets.0"), &h);
        h = self.attentions[0].forward(h);
        rec.record(|| format!("{path}.attentions.0"), &h);
        h = self.resnets[1].forward(h);
        rec.record(|| path.to_string(), &h);
        h
    }
}
