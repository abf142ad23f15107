//! diffusers `ResnetBlock2D` (`diffusers/models/resnet.py`) as the SD VAE
//! builds it: no time embedding, dropout 0, `output_scale_factor` 1, GroupNorm
//! eps 1e-6, SiLU.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::tensor::{activation::silu, backend::Backend, Tensor};

use crate::activations::Recorder;
use crate::conv::{conv1x1, conv3x3};
use crate::group_norm::GroupNorm;

/// `shortcut(x) + conv2(SiLU(norm2(conv1(SiLU(norm1(x))))))`.
#[derive(Module, Debug)]
pub struct ResnetBlock2d<B: Backend> {
    /// GroupNorm over the input channels.
    pub norm1: GroupNorm<B>,
    /// 3x3, in -> out.
    pub conv1: Conv2d<B>,
    /// GroupNorm over the output channels.
    pub norm2: GroupNorm<B>,
    /// 3x3, out -> out.
    pub conv2: Conv2d<B>,
    /// 1x1 with bias, only when the channel count changes (diffusers
    /// `use_in_shortcut = in_channels != out_channels`); the identity otherwise.
    pub conv_shortcut: Option<Conv2d<B>>,
}

impl<B: Backend> ResnetBlock2d<B> {
    /// A block from `in_channels` to `out_channels`.
    pub fn new(in_channels: usize, out_channels: usize, groups: usize, device: &B::Device) -> Self {
        Self {
            norm1: GroupNorm::new(groups, in_channels, device),
            conv1: conv3x3(in_channels, out_channels, device),
            norm2: GroupNorm::new(groups, out_channels, device),
            conv2: conv3x3(out_channels, out_channels, device),
            conv_shortcut: (in_channels != out_channels).then(|| conv1x1(in_channels, out_channels, device)),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, in_channels, height, width]` -> `[batch, out_channels, height, width]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = self.conv1.forward(silu(self.norm1.forward(x.clone())));
        let h = self.conv2.forward(silu(self.norm2.forward(h)));
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x),
            None => x,
        };
        shortcut + h
    }
}

/// The `layers` resnets of an encoder or decoder level: the first maps
/// `in_channels` to `out_channels`, the rest keep `out_channels`.
pub(crate) fn resnet_stack<B: Backend>(
    in_channels: usize,
    out_channels: usize,
    layers: usize,
    groups: usize,
    device: &B::Device,
) -> Vec<ResnetBlock2d<B>> {
    (0..layers)
        .map(|j| ResnetBlock2d::new(if j == 0 { in_channels } else { out_channels }, out_channels, groups, device))
        .collect()
}

/// Runs a level's resnets in order, recording `{path}.resnets.{j}`.
pub(crate) fn forward_stack<B: Backend>(
    resnets: &[ResnetBlock2d<B>],
    x: Tensor<B, 4>,
    path: &str,
    rec: &mut Recorder<'_, B>,
) -> Tensor<B, 4> {
    resnets.iter().enumerate().fold(x, |h, (j, resnet)| {
        let h = resnet.forward(h);
        rec.record(|| format!("{path}.resnets.{j}"), &h);
        h
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::module::Param;

    type B = Flex;

    #[test]
    fn shortcut_conv_only_when_channels_change() {
        let device = Default::default();
        assert!(ResnetBlock2d::<B>::new(32, 32, 16, &device).conv_shortcut.is_none());
        let block = ResnetBlock2d::<B>::new(32, 64, 16, &device);
        assert_eq!(block.conv_shortcut.as_ref().unwrap().weight.lazy_shape().to_vec(), vec![64, 32, 1, 1]);
        let y = block.forward(Tensor::zeros([2, 32, 5, 7], &device));
        assert_eq!(y.dims(), [2, 64, 5, 7]);
    }

    #[test]
    fn zero_residual_branch_is_the_identity() {
        let device = Default::default();
        let mut block = ResnetBlock2d::<B>::new(16, 16, 4, &device);
        block.conv2.weight = Param::from_tensor(Tensor::zeros([16, 16, 3, 3], &device));
        block.conv2.bias = Some(Param::from_tensor(Tensor::zeros([16], &device)));
        let x = Tensor::<B, 4>::random([1, 16, 4, 4], burn::tensor::Distribution::Default, &device);
        let y = block.forward(x.clone());
        let diff: f32 = (y - x).abs().max().into_scalar();
        assert_eq!(diff, 0.0);
    }
}
