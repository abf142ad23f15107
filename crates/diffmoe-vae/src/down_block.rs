//! diffusers `DownEncoderBlock2D` (`diffusers/models/unets/unet_2d_blocks.py`):
//! one level of the encoder (LDM `encoder.down.{i}`).

use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor};

use crate::activations::Recorder;
use crate::downsample::Downsample2d;
use crate::resnet::{forward_stack, resnet_stack, ResnetBlock2d};

/// `layers_per_block` resnets (the first changes the width), then a
/// [`Downsample2d`] on every level but the last.
#[derive(Module, Debug)]
pub struct DownEncoderBlock2d<B: Backend> {
    /// The resnets (LDM `block`).
    pub resnets: Vec<ResnetBlock2d<B>>,
    /// diffusers `downsamplers.0` (LDM `downsample`); `None` on the last level.
    pub downsamplers: Option<Downsample2d<B>>,
}

/// Whether a level halves the resolution at its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LevelEnd {
    /// Every level but the last changes the resolution.
    Resample,
    /// The last level keeps it.
    Keep,
}

impl<B: Backend> DownEncoderBlock2d<B> {
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
            downsamplers: (end == LevelEnd::Resample).then(|| Downsample2d::new(out_channels, device)),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, in_channels, height, width]` -> `[batch, out_channels, height / 2, width / 2]`
    ///   (floored), or the same size on the last level
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.forward_recorded(x, "down_block", &mut Recorder::off())
    }

    /// [`Self::forward`], recording `{path}.resnets.{j}` and `{path}`.
    pub(crate) fn forward_recorded(&self, x: Tensor<B, 4>, path: &str, rec: &mut Recorder<'_, B>) -> Tensor<B, 4> {
        let mut h = forward_stack(&self.resnets, x, path, rec);
        if let Some(down) = &self.downsamplers {
            h = down.forward(h);
        }
        rec.record(|| path.to_string(), &h);
        h
    }
}
