//! diffusers `Upsample2D` with `use_conv=True` (`diffusers/models/upsampling.py`),
//! the decoder's upsampler: `F.interpolate(scale_factor=2, mode="nearest")`
//! then a 3x3 conv with padding 1.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::tensor::{backend::Backend, Tensor};

use crate::conv::conv3x3;

/// Nearest-neighbour x2 (`out[i, j] = in[i / 2, j / 2]`), then a 3x3 conv.
#[derive(Module, Debug)]
pub struct Upsample2d<B: Backend> {
    /// 3x3, channels -> channels; diffusers `upsamplers.0.conv`.
    pub conv: Conv2d<B>,
}

/// torch's `F.interpolate(x, scale_factor=2, mode="nearest")`: every pixel
/// becomes a 2x2 block. Done by broadcasting, so it is exact on every backend.
///
/// # Shapes
/// - `x`: `[batch, channels, height, width]` -> `[batch, channels, 2 * height, 2 * width]`
pub fn upsample_nearest_2x<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [batch, channels, height, width] = x.dims();
    x.reshape([batch, channels, height, 1, width, 1])
        .expand([batch, channels, height, 2, width, 2]) // [batch, channels, height, 2, width, 2]
        .reshape([batch, channels, 2 * height, 2 * width])
}

impl<B: Backend> Upsample2d<B> {
    /// An upsampler for `channels` channels.
    pub fn new(channels: usize, device: &B::Device) -> Self {
        Self { conv: conv3x3(channels, channels, device) }
    }

    /// # Shapes
    /// - `x`: `[batch, channels, height, width]` -> `[batch, channels, 2 * height, 2 * width]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.conv.forward(upsample_nearest_2x(x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    type B = Flex;

    #[test]
    fn nearest_copies_each_pixel_into_a_2x2_block() {
        let device = Default::default();
        let (h, w) = (2, 3);
        let x: Vec<f32> = (0..2 * h * w).map(|v| v as f32).collect();
        let x = Tensor::<B, 4>::from_data(TensorData::new(x.clone(), [1, 2, h, w]), &device);
        let y = upsample_nearest_2x(x.clone());
        assert_eq!(y.dims(), [1, 2, 2 * h, 2 * w]);
        let yv: Vec<f32> = y.into_data().to_vec().unwrap();
        let xv: Vec<f32> = x.into_data().to_vec().unwrap();
        for c in 0..2 {
            for i in 0..2 * h {
                for j in 0..2 * w {
                    assert_eq!(yv[(c * 2 * h + i) * 2 * w + j], xv[(c * h + i / 2) * w + j / 2]);
                }
            }
        }
    }

    #[test]
    fn upsampler_doubles_the_size() {
        let device = Default::default();
        let up = Upsample2d::<B>::new(4, &device);
        assert_eq!(up.forward(Tensor::zeros([2, 4, 3, 5], &device)).dims(), [2, 4, 6, 10]);
    }
}
