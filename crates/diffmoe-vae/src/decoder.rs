//! diffusers `Decoder` (`diffusers/models/autoencoders/vae.py`): latent
//! (after `post_quant_conv`) -> image.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::tensor::{activation::silu, backend::Backend, Tensor};

use crate::activations::{Activations, Recorder};
use crate::config::AutoencoderKlConfig;
use crate::conv::conv3x3;
use crate::down_block::LevelEnd;
use crate::group_norm::GroupNorm;
use crate::mid_block::MidBlock2d;
use crate::up_block::UpDecoderBlock2d;

/// `conv_in` -> mid-block -> up blocks over the reversed widths -> GroupNorm
/// -> SiLU -> `conv_out`. The output is not clamped.
#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    /// 3x3, latent -> `block_out_channels[-1]`.
    pub conv_in: Conv2d<B>,
    /// At `block_out_channels[-1]` (LDM `mid`).
    pub mid_block: MidBlock2d<B>,
    /// One block per level, lowest resolution first (LDM `up`, indexed the
    /// other way round: diffusers `up_blocks.{i}` is LDM `up.{levels - 1 - i}`).
    pub up_blocks: Vec<UpDecoderBlock2d<B>>,
    /// GroupNorm over `block_out_channels[0]` (LDM `norm_out`).
    pub conv_norm_out: GroupNorm<B>,
    /// 3x3, -> `out_channels`.
    pub conv_out: Conv2d<B>,
}

impl<B: Backend> Decoder<B> {
    /// The decoder of `config`.
    pub fn new(config: &AutoencoderKlConfig, device: &B::Device) -> Self {
        let reversed: Vec<usize> = config.block_out_channels.iter().rev().copied().collect();
        let groups = config.norm_num_groups;
        let levels = reversed.len();
        let up_blocks = (0..levels)
            .map(|i| {
                let end = if i + 1 == levels { LevelEnd::Keep } else { LevelEnd::Resample };
                let input = reversed[i.saturating_sub(1)];
                UpDecoderBlock2d::new(input, reversed[i], config.layers_per_block + 1, groups, end, device)
            })
            .collect();
        Self {
            conv_in: conv3x3(config.latent_channels, reversed[0], device),
            mid_block: MidBlock2d::new(reversed[0], groups, device),
            up_blocks,
            conv_norm_out: GroupNorm::new(groups, reversed[levels - 1], device),
            conv_out: conv3x3(reversed[levels - 1], config.out_channels, device),
        }
    }

    /// # Shapes
    /// - `z`: `[batch, latent_channels, height, width]` ->
    ///   `[batch, out_channels, height * f, width * f]` with `f = 2^(levels - 1)`
    pub fn forward(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        self.run(z, &mut Recorder::off())
    }

    /// [`Self::forward`], recording the module outputs under diffusers' paths
    /// (`decoder.conv_in`, `decoder.mid_block...`, `decoder.up_blocks.{i}.resnets.{j}`,
    /// `decoder.up_blocks.{i}`, `decoder.conv_norm_out` (before the SiLU), `decoder.conv_out`).
    ///
    /// # Shapes
    /// As [`Self::forward`].
    pub fn forward_recorded(&self, z: Tensor<B, 4>, activations: &mut Activations<B>) -> Tensor<B, 4> {
        self.run(z, &mut Recorder::on(activations))
    }

    fn run(&self, z: Tensor<B, 4>, rec: &mut Recorder<'_, B>) -> Tensor<B, 4> {
        let mut h = self.conv_in.forward(z);
        rec.record(|| "decoder.conv_in".into(), &h);
        h = self.mid_block.forward_recorded(h, "decoder.mid_block", rec);
        for (i, block) in self.up_blocks.iter().enumerate() {
            h = block.forward_recorded(h, &format!("decoder.up_blocks.{i}"), rec);
        }
        h = self.conv_norm_out.forward(h);
        rec.record(|| "decoder.conv_norm_out".into(), &h);
        h = self.conv_out.forward(silu(h));
        rec.record(|| "decoder.conv_out".into(), &h);
        h
    }
}
