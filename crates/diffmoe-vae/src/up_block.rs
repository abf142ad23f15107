//! diffusers `UpDecoderBlock2D` (`diffusers/models/unets/unet_2d_blocks.py`):
//! one level of the decoder (LDM `decoder.up.{levels - 1 - i}`).

use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor};

use crate::activations::Recorder;
use crate::down_block::LevelEnd;
use crate::resnet::{forward_stack, resnet_stack, ResnetBlock2d};
use crate::upsample::Upsample2d;

/// `layers_per_block + 1` resnets (the first changes the width), then an
/// [`Upsample2d`] on every level but the last.
#[derive(Module, Debug)]
pub struct UpDecoderBlock2d<B: Backend> {
    /// The resnets (LDM `block`).
    pub resnets: Vec<ResnetBlock2d<B>>,
    /// diffusers `upsamplers.0` (LDM `upsample`); `None` on the last level.
    pub upsamplers: Option<Upsample2d<B>>,
}

impl<B: Backend> UpDecoderBlock2d<B> {
    /// A level from `in_channels` to `out_channels` with `layers` resnets.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        layers: usize,
        groups: usize,
        end: LevelEnd,
        device: &B::Device,
    ) -> Self {
        Self {
            resnets: resnet_stack(in_channels, out_channels, layers, groups, device),
            upsamplers: (end == LevelEnd::Resample).then(|| Upsample2d::new(out_channels, device)),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, in_channels, height, width]` -> `[batch, out_channels, 2 * height, 2 * width]`,
    ///   or the same size on the last level
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.forward_recorded(x, "up_block", &mut Recorder::off())
    }

    /// [`Self::forward`], recording `{path}.resnets.{j}` and `{path}`.
    pub(crate) fn forward_recorded(&self, x: Tensor<B, 4>, path: &str, rec: &mut Recorder<'_, B>) -> Tensor<B, 4> {
        let mut h = forward_stack(&self.resnets, x, path, rec);
        if let Some(up) = &self.upsamplers {
            h = up.forward(h);
        }
        rec.record(|| path.to_string(), &h);
        h
    }
}
