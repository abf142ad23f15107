//! diffusers `Encoder` (`diffusers/models/autoencoders/vae.py`) with
//! `double_z=True`: image -> `2 * latent_channels` channels (before `quant_conv`).

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::tensor::{activation::silu, backend::Backend, Tensor};

use crate::activations::{Activations, Recorder};
use crate::config::AutoencoderKlConfig;
use crate::conv::conv3x3;
use crate::down_block::{DownEncoderBlock2d, LevelEnd};
use crate::group_norm::GroupNorm;
use crate::mid_block::MidBlock2d;

/// `conv_in` -> down blocks -> mid-block -> GroupNorm -> SiLU -> `conv_out`.
#[derive(Module, Debug)]
pub struct Encoder<B: Backend> {
    /// 3x3, image -> `block_out_channels[0]`.
    pub conv_in: Conv2d<B>,
    /// One block per level (LDM `down`).
    pub down_blocks: Vec<DownEncoderBlock2d<B>>,
    /// At `block_out_channels[-1]` (LDM `mid`).
    pub mid_block: MidBlock2d<B>,
    /// GroupNorm over `block_out_channels[-1]` (LDM `norm_out`).
    pub conv_norm_out: GroupNorm<B>,
    /// 3x3, -> `2 * latent_channels` (mean and log-variance).
    pub conv_out: Conv2d<B>,
}

impl<B: Backend> Encoder<B> {
    /// The encoder of `config`.
    pub fn new(config: &AutoencoderKlConfig, device: &B::Device) -> Self {
        let channels = &config.block_out_channels;
        let groups = config.norm_num_groups;
        let levels = channels.len();
        let down_blocks = (0..levels)
            .map(|i| {
                let end = if i + 1 == levels { LevelEnd::Keep } else { LevelEnd::Resample };
                let input = channels[i.saturating_sub(1)];
                DownEncoderBlock2d::new(input, channels[i], config.layers_per_block, groups, end, device)
            })
            .collect();
        let top = channels[levels - 1];
        Self {
            conv_in: conv3x3(config.in_channels, channels[0], device),
            down_blocks,
            mid_block: MidBlock2d::new(top, groups, device),
            conv_norm_out: GroupNorm::new(groups, top, device),
            conv_out: conv3x3(top, 2 * config.latent_channels, device),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, in_channels, height, width]` ->
    ///   `[batch, 2 * latent_channels, height / f, width / f]`, floored at every level
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.run(x, &mut Recorder::off())
    }

    /// [`Self::forward`], recording the module outputs under diffusers' paths
    /// (`encoder.conv_in`, `encoder.down_blocks.{i}.resnets.{j}`,
    /// `encoder.down_blocks.{i}`, `encoder.mid_block...`, `encoder.conv_norm_out`
    /// (before the SiLU), `encoder.conv_out`).
    ///
    /// # Shapes
    /// As [`Self::forward`].
    pub fn forward_recorded(&self, x: Tensor<B, 4>, activations: &mut Activations<B>) -> Tensor<B, 4> {
        self.run(x, &mut Recorder::on(activations))
    }

    fn run(&self, x: Tensor<B, 4>, rec: &mut Recorder<'_, B>) -> Tensor<B, 4> {
        let mut h = self.conv_in.forward(x);
        rec.record(|| "encoder.conv_in".into(), &h);
        for (i, block) in self.down_blocks.iter().enumerate() {
            h = block.forward_recorded(h, &format!("encoder.down_blocks.{i}"), rec);
        }
        h = self.mid_block.forward_recorded(h, "encoder.mid_block", rec);
        h = self.conv_norm_out.forward(h);
        rec.record(|| "encoder.conv_norm_out".into(), &h);
        h = self.conv_out.forward(silu(h));
        rec.record(|| "encoder.conv_out".into(), &h);
        h
    }
}
