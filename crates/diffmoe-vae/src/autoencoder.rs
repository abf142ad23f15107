//! diffusers `AutoencoderKL` (`diffusers/models/autoencoders/autoencoder_kl.py`),
//! untiled and unsliced, and DiffMoE's use of it: `train.py` encodes
//! `vae.encode(x).latent_dist.sample().mul_(0.18215)`, `sample_ddp_feature.py`
//! decodes `vae.decode(z / 0.18215).sample`.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::tensor::{backend::Backend, Tensor};

use crate::activations::Activations;
use crate::config::{AutoencoderKlConfig, SCALING_FACTOR};
use crate::conv::conv1x1;
use crate::decoder::Decoder;
use crate::encoder::Encoder;
use crate::posterior::DiagonalGaussian;

/// Which latent `AutoencoderKL.forward` decodes.
#[derive(Debug, Clone)]
pub enum PosteriorDraw<B: Backend> {
    /// The posterior mean (`sample_posterior=False`, diffusers' default).
    Mode,
    /// `mean + std * noise` with the given standard-normal noise
    /// (`sample_posterior=True`).
    Sample(Tensor<B, 4>),
}

/// The KL autoencoder of Stable Diffusion.
#[derive(Module, Debug)]
pub struct AutoencoderKl<B: Backend> {
    /// Image -> moments before `quant_conv`.
    pub encoder: Encoder<B>,
    /// Latent after `post_quant_conv` -> image.
    pub decoder: Decoder<B>,
    /// 1x1, `2 * latent_channels` -> same.
    pub quant_conv: Conv2d<B>,
    /// 1x1, `latent_channels` -> same.
    pub post_quant_conv: Conv2d<B>,
}

/// Posterior sample -> the latents DiffMoE trains on: `sample * 0.18215`,
/// a float32 multiply by float32(0.18215).
///
/// # Shapes
/// - `sample`: `[batch, latent_channels, height, width]` -> same
pub fn to_diffusion_scale<B: Backend>(sample: Tensor<B, 4>) -> Tensor<B, 4> {
    sample.mul_scalar(SCALING_FACTOR)
}

/// DiffMoE latents -> the decoder's input: `z / 0.18215`, a true float32
/// division (PyTorch's; multiplying by the reciprocal differs by 1 ulp in
/// about a quarter of the elements).
///
/// # Shapes
/// - `z`: `[batch, latent_channels, height, width]` -> same
pub fn from_diffusion_scale<B: Backend>(z: Tensor<B, 4>) -> Tensor<B, 4> {
    z.div_scalar(SCALING_FACTOR)
}

impl<B: Backend> AutoencoderKl<B> {
    /// A randomly initialised model; see [`AutoencoderKlConfig::init`].
    pub(crate) fn new(config: &AutoencoderKlConfig, device: &B::Device) -> Self {
        Self {
            encoder: Encoder::new(config, device),
            decoder: Decoder::new(config, device),
            quant_conv: conv1x1(2 * config.latent_channels, 2 * config.latent_channels, device),
            post_quant_conv: conv1x1(config.latent_channels, config.latent_channels, device),
        }
    }

    /// The moments (`latent_dist.parameters`): encoder, then `quant_conv`.
    ///
    /// # Shapes
    /// - `x`: `[batch, in_channels, height, width]` in `[-1, 1]` ->
    ///   `[batch, 2 * latent_channels, height / f, width / f]` (floored at every level)
    pub fn encode(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.quant_conv.forward(self.encoder.forward(x))
    }

    /// [`Self::encode`], recording the encoder's module outputs and `quant_conv`.
    ///
    /// # Shapes
    /// As [`Self::encode`].
    pub fn encode_recorded(&self, x: Tensor<B, 4>, activations: &mut Activations<B>) -> Tensor<B, 4> {
        let moments = self.quant_conv.forward(self.encoder.forward_recorded(x, activations));
        activations.outputs.push(("quant_conv".into(), moments.clone()));
        moments
    }

    /// The posterior `vae.encode(x).latent_dist`.
    ///
    /// # Shapes
    /// - `x`: `[batch, in_channels, height, width]`
    pub fn latent_dist(&self, x: Tensor<B, 4>) -> DiagonalGaussian<B> {
        DiagonalGaussian::from_moments(self.encode(x))
    }

    /// `vae.decode(z).sample`: `post_quant_conv`, then the decoder.
    ///
    /// # Shapes
    /// - `z`: `[batch, latent_channels, height, width]` ->
    ///   `[batch, out_channels, height * f, width * f]`
    pub fn decode(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        self.decoder.forward(self.post_quant_conv.forward(z))
    }

    /// [`Self::decode`], recording `post_quant_conv` and the decoder's module outputs.
    ///
    /// # Shapes
    /// As [`Self::decode`].
    pub fn decode_recorded(&self, z: Tensor<B, 4>, activations: &mut Activations<B>) -> Tensor<B, 4> {
        let h = self.post_quant_conv.forward(z);
        activations.outputs.push(("post_quant_conv".into(), h.clone()));
        self.decoder.forward_recorded(h, activations)
    }

    /// `vae(x, sample_posterior).sample`: decode the posterior's mode or a sample.
    ///
    /// # Shapes
    /// - `x`: `[batch, in_channels, height, width]` -> `[batch, out_channels, height, width]` for
    ///   sizes divisible by `f`; `draw`'s noise is `[batch, latent_channels, height / f, width / f]`
    pub fn forward(&self, x: Tensor<B, 4>, draw: PosteriorDraw<B>) -> Tensor<B, 4> {
        let dist = self.latent_dist(x);
        let z = match draw {
            PosteriorDraw::Mode => dist.mode(),
            PosteriorDraw::Sample(noise) => dist.sample(noise),
        };
        self.decode(z)
    }

    /// DiffMoE's training latents (`train.py`):
    /// `latent_dist.sample() * 0.18215` with the given standard-normal noise.
    ///
    /// # Shapes
    /// - `x`: `[batch, in_channels, height, width]`, `noise`:
    ///   `[batch, latent_channels, height / f, width / f]` -> like `noise`
    pub fn encode_latents(&self, x: Tensor<B, 4>, noise: Tensor<B, 4>) -> Tensor<B, 4> {
        to_diffusion_scale(self.latent_dist(x).sample(noise))
    }

    /// DiffMoE's decoding of sampled latents (`sample_ddp_feature.py`):
    /// `vae.decode(z / 0.18215).sample`, not clamped.
    ///
    /// # Shapes
    /// - `z`: `[batch, latent_channels, height, width]` -> `[batch, out_channels, height * f, width * f]`
    pub fn decode_latents(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        self.decode(from_diffusion_scale(z))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DownBlockType, UpBlockType};
    use burn::backend::Flex;
    use burn::tensor::{Distribution, TensorData};

    type B = Flex;

    fn small() -> AutoencoderKlConfig {
        AutoencoderKlConfig::new(
            vec![DownBlockType::DownEncoderBlock2D; 3],
            vec![UpBlockType::UpDecoderBlock2D; 3],
            vec![8, 16, 16],
        )
        .with_norm_num_groups(4)
        .with_layers_per_block(1)
    }

    #[test]
    fn shapes_through_encode_and_decode() {
        let device = Default::default();
        let vae = small().init::<B>(&device);
        let x = Tensor::<B, 4>::random([2, 3, 16, 12], Distribution::Uniform(-1.0, 1.0), &device);
        let moments = vae.encode(x.clone());
        assert_eq!(moments.dims(), [2, 8, 4, 3]);
        assert_eq!(vae.decode(moments.narrow(1, 0, 4)).dims(), [2, 3, 16, 12]);
        let odd = Tensor::<B, 4>::zeros([1, 3, 27, 21], &device);
        assert_eq!(vae.encode(odd).dims(), [1, 8, 6, 5]);
        let noise = Tensor::<B, 4>::zeros([2, 4, 4, 3], &device);
        assert_eq!(vae.forward(x, PosteriorDraw::Sample(noise)).dims(), [2, 3, 16, 12]);
    }

    #[test]
    fn recorded_forwards_equal_the_plain_ones() {
        let device = Default::default();
        let vae = small().init::<B>(&device);
        let x = Tensor::<B, 4>::random([1, 3, 8, 8], Distribution::Uniform(-1.0, 1.0), &device);
        let mut acts = Activations::new();
        let recorded = vae.encode_recorded(x.clone(), &mut acts);
        let diff: f32 = (recorded.clone() - vae.encode(x)).abs().max().into_scalar();
        assert_eq!(diff, 0.0);
        let names: Vec<&str> = acts.outputs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.first(), Some(&"encoder.conv_in"));
        assert_eq!(names.last(), Some(&"quant_conv"));
        assert!(names.contains(&"encoder.down_blocks.1.resnets.0"));
        assert!(names.contains(&"encoder.mid_block.attentions.0"));
        let mut acts = Activations::new();
        let z = recorded.narrow(1, 0, 4);
        let image = vae.decode_recorded(z.clone(), &mut acts);
        let diff: f32 = (image - vae.decode(z)).abs().max().into_scalar();
        assert_eq!(diff, 0.0);
        assert_eq!(acts.outputs[0].0, "post_quant_conv");
        assert!(acts.get("decoder.up_blocks.2.resnets.1").is_some());
    }

    #[test]
    fn latent_scale_is_a_true_float32_division() {
        let device = Default::default();
        let values: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.0137).collect();
        let z = Tensor::<B, 4>::from_data(TensorData::new(values.clone(), [1, 1, 10, 100]), &device);
        let ours: Vec<f32> = from_diffusion_scale(z.clone()).into_data().to_vec().unwrap();
        assert!(ours.iter().zip(&values).all(|(o, v)| o.to_bits() == (v / 0.18215f32).to_bits()));
        let scaled: Vec<f32> = to_diffusion_scale(z).into_data().to_vec().unwrap();
        assert!(scaled.iter().zip(&values).all(|(o, v)| o.to_bits() == (v * 0.18215f32).to_bits()));
    }
}
