//! GroupNorm as the SD VAE uses it (torch `nn.GroupNorm(groups, C, eps=1e-6,
//! affine=True)`, built by diffusers' `ResnetBlock2D`, `Attention` and
//! `Encoder`/`Decoder.conv_norm_out`).

use burn::module::{Initializer, Module, Param};
use burn::tensor::{backend::Backend, Tensor};

/// The epsilon of every GroupNorm of the VAE (diffusers passes
/// `resnet_eps=1e-6` and `eps=1e-6`; torch's default 1e-5 would be wrong).
pub const GROUP_NORM_EPS: f64 = 1e-6;

/// `(x - mean) / sqrt(var + eps) * weight + bias`, statistics per sample and
/// group over `(channels / groups, height, width)`, biased variance.
#[derive(Module, Debug)]
pub struct GroupNorm<B: Backend> {
    /// `[channels]`, torch `weight`.
    pub weight: Param<Tensor<B, 1>>,
    /// `[channels]`, torch `bias`.
    pub bias: Param<Tensor<B, 1>>,
    /// Number of groups.
    pub num_groups: usize,
    /// Added to the variance.
    pub eps: f64,
}

impl<B: Backend> GroupNorm<B> {
    /// torch's init: weight 1, bias 0 (lazily allocated).
    ///
    /// # Panics
    /// If `channels` is not a multiple of `num_groups`.
    pub fn new(num_groups: usize, channels: usize, device: &B::Device) -> Self {
        assert!(
            num_groups > 0 && channels.is_multiple_of(num_groups),
            "GroupNorm: {channels} channels are not divisible into {num_groups} groups"
        );
        Self {
            weight: Initializer::Ones.init([channels], device),
            bias: Initializer::Zeros.init([channels], device),
            num_groups,
            eps: GROUP_NORM_EPS,
        }
    }

    /// # Shapes
    /// - `x`: `[batch, channels, height, width]` -> same
    ///
    /// # Panics
    /// If `x` does not have the module's channels.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [batch, channels, height, width] = x.dims();
        let [expected] = self.weight.dims();
        assert_eq!(channels, expected, "GroupNorm: input has {channels} channels, the module {expected}");
        let groups = self.num_groups;
        let grouped = x.reshape([batch, groups, channels / groups * height * width]); // [batch, groups, group_size]
        let mean = grouped.clone().mean_dim(2); // [batch, groups, 1]
        let centered = grouped - mean;
        let var = centered.clone().square().mean_dim(2); // [batch, groups, 1], biased
        let normed = (centered / var.add_scalar(self.eps).sqrt()).reshape([batch, channels, height, width]);
        normed * self.weight.val().reshape([1, channels, 1, 1]) + self.bias.val().reshape([1, channels, 1, 1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, TensorData};

    type B = Flex;

    #[test]
    fn each_sample_and_group_is_standardised() {
        let device = Default::default();
        let norm = GroupNorm::<B>::new(2, 4, &device);
        let x = Tensor::<B, 4>::random([3, 4, 5, 6], Distribution::Normal(1.5, 3.0), &device);
        let y = norm.forward(x).reshape([3, 2, 2 * 5 * 6]);
        let mean: Vec<f32> = y.clone().mean_dim(2).into_data().to_vec().unwrap();
        let var: Vec<f32> = (y.clone() - y.mean_dim(2)).square().mean_dim(2).into_data().to_vec().unwrap();
        for m in mean {
            assert!(m.abs() < 1e-5, "mean {m}");
        }
        for v in var {
            // var / (var + eps) with var ~ 9: 1 - 1e-7.
            assert!((v - 1.0).abs() < 1e-4, "biased variance {v}");
        }
    }

    #[test]
    fn matches_the_formula_with_eps_and_affine() {
        let device = Default::default();
        let mut norm = GroupNorm::<B>::new(1, 2, &device);
        norm.weight = Param::from_tensor(Tensor::from_data(TensorData::new(vec![2.0f32, 3.0], [2]), &device));
        norm.bias = Param::from_tensor(Tensor::from_data(TensorData::new(vec![0.5f32, -1.0], [2]), &device));
        // One group over both channels: values 0, 1, 2, 3 (mean 1.5, biased var 1.25).
        let x = Tensor::<B, 4>::from_data(TensorData::new(vec![0.0f32, 1.0, 2.0, 3.0], [1, 2, 1, 2]), &device);
        let y: Vec<f32> = norm.forward(x).into_data().to_vec().unwrap();
        let s = (1.25f64 + GROUP_NORM_EPS).sqrt();
        let expected = [(-1.5 / s) * 2.0 + 0.5, (-0.5 / s) * 2.0 + 0.5, (0.5 / s) * 3.0 - 1.0, (1.5 / s) * 3.0 - 1.0];
        for (a, b) in y.iter().zip(expected) {
            assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn eps_dominates_a_constant_group() {
        let device = Default::default();
        let norm = GroupNorm::<B>::new(1, 1, &device);
        // A constant input normalises to 0, not NaN: eps keeps the denominator positive.
        let y: Vec<f32> = norm.forward(Tensor::<B, 4>::ones([1, 1, 2, 2], &device)).into_data().to_vec().unwrap();
        assert!(y.iter().all(|v| *v == 0.0));
    }
}
