//! The convolutions of the SD VAE (torch `nn.Conv2d` with bias, weights
//! `[out, in, kh, kw]`): 3x3 with padding 1, which keeps the size, and 1x1.
//! The downsampler's asymmetric stride-2 convolution is in `downsample.rs`.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::tensor::backend::Backend;

/// `nn.Conv2d(in, out, kernel_size=3, padding=1)`: the same size out.
pub fn conv3x3<B: Backend>(in_channels: usize, out_channels: usize, device: &B::Device) -> Conv2d<B> {
    Conv2dConfig::new([in_channels, out_channels], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(device)
}

/// `nn.Conv2d(in, out, kernel_size=1)`: `conv_shortcut`, `quant_conv`, `post_quant_conv`.
pub fn conv1x1<B: Backend>(in_channels: usize, out_channels: usize, device: &B::Device) -> Conv2d<B> {
    Conv2dConfig::new([in_channels, out_channels], [1, 1]).with_padding(PaddingConfig2d::Valid).init(device)
}
