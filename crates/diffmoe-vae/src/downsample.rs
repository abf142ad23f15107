//! diffusers `Downsample2D` with `use_conv=True, padding=0`
//! (`diffusers/models/downsampling.py`), the encoder's downsampler:
//! `F.pad(x, (0, 1, 0, 1))` then a 3x3 stride-2 conv with padding 0.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::tensor::{backend::Backend, Tensor};

/// One zero column on the right and one zero row at the bottom, nothing on
/// the left or top, then a 3x3 stride-2 conv: `floor(n / 2)` out for every
/// `n`. A symmetric padding of 1 would give `ceil(n / 2)` and other values.
#[derive(Module, Debug)]
pub struct Downsample2d<B: Backend> {
    /// 3x3, stride 2, channels -> channels; diffusers `downsamplers.0.conv`.
    pub conv: Conv2d<B>,
}

/// The output size of [`Downsample2d`]: `floor((n + 1 - 3) / 2) + 1 = floor(n / 2)`.
///
/// # Panics
/// If `n < 2` (the padded input is smaller than the kernel).
pub fn downsampled_size(n: usize) -> usize {
    assert!(n >= 2, "Downsample2D needs at least 2 pixels, got {n}");
    (n + 1 - 3) / 2 + 1
}

impl<B: Backend> Downsample2d<B> {
    /// A downsampler for `channels` channels.
    pub fn new(channels: usize, device: &B::Device) -> Self {
        Self {
            conv: Conv2dConfig::new([channels, channels], [3, 3])
                .with_stride([2, 2])
                // (top, left, bottom, right): torch's F.pad(x, (0, 1, 0, 1)).
                .with_padding(PaddingConfig2d::Explicit(0, 0, 1, 1))
                .init(device),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, channels, height, width]` -> `[batch, channels, height / 2, width / 2]` (floored)
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.conv.forward(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::module::Param;
    use burn::tensor::TensorData;

    type B = Flex;

    #[test]
    fn output_sizes_are_floored_for_even_and_odd_inputs() {
        let device = Default::default();
        let down = Downsample2d::<B>::new(2, &device);
        for (h, w, eh, ew) in [(32, 32, 16, 16), (27, 21, 13, 10), (13, 10, 6, 5), (2, 3, 1, 1)] {
            assert_eq!((downsampled_size(h), downsampled_size(w)), (eh, ew));
            let y = down.forward(Tensor::zeros([1, 2, h, w], &device));
            assert_eq!(y.dims(), [1, 2, eh, ew], "input {h}x{w}");
        }
    }

    #[test]
    fn padding_is_on_the_right_and_bottom_only() {
        let device = Default::default();
        let mut down = Downsample2d::<B>::new(1, &device);
        // A kernel that sums its 3x3 window: output (i, j) sums rows 2i..2i+2 and
        // columns 2j..2j+2 of the padded input.
        down.conv.weight = Param::from_tensor(Tensor::ones([1, 1, 3, 3], &device));
        down.conv.bias = Some(Param::from_tensor(Tensor::zeros([1], &device)));
        let x: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let x = Tensor::<B, 4>::from_data(TensorData::new(x, [1, 1, 4, 4]), &device);
        let y: Vec<f32> = down.forward(x).into_data().to_vec().unwrap();
        // Windows: (0,0) rows 0-2 cols 0-2; (0,1) cols 2-3 + zero column; (1,0) rows 2-3 + zero row.
        let window = |r0: usize, c0: usize| -> f32 {
            let mut s = 0.0;
            for r in r0..(r0 + 3).min(4) {
                for c in c0..(c0 + 3).min(4) {
                    s += (r * 4 + c) as f32;
                }
            }
            s
        };
        assert_eq!(y, vec![window(0, 0), window(0, 2), window(2, 0), window(2, 2)]);
    }
}
