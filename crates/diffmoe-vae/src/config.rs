//! The hyper-parameters of diffusers' `AutoencoderKL`
//! (`diffusers/models/autoencoders/autoencoder_kl.py`, constructor kwargs),
//! the `stabilityai/sd-vae-ft-mse` preset, and DiffMoE's latent scale.

use burn::config::Config;
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::autoencoder::AutoencoderKl;
use crate::error::ConfigError;

/// The latent scale of the SD VAE. DiffMoE hard-codes the literal instead of
/// reading `config.scaling_factor`: `train.py` trains on
/// `latent_dist.sample() * 0.18215` and `sample_ddp_feature.py` decodes
/// `vae.decode(z / 0.18215)`. PyTorch applies the Python float to a float32
/// tensor as float32(0.18215), and divides truly (not by the reciprocal), so
/// this is an `f32` and [`crate::from_diffusion_scale`] divides by it.
pub const SCALING_FACTOR: f32 = 0.18215;

/// A down block type of the encoder (diffusers `down_block_types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DownBlockType {
    /// `DownEncoderBlock2D`: resnets, then a `Downsample2D` except on the last level.
    #[serde(rename = "DownEncoderBlock2D")]
    DownEncoderBlock2D,
}

/// An up block type of the decoder (diffusers `up_block_types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpBlockType {
    /// `UpDecoderBlock2D`: resnets, then an `Upsample2D` except on the last level.
    #[serde(rename = "UpDecoderBlock2D")]
    UpDecoderBlock2D,
}

/// The activation after every GroupNorm (diffusers `act_fn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActFn {
    /// `x * sigmoid(x)`.
    #[serde(rename = "silu")]
    Silu,
}

/// diffusers' `AutoencoderKL(**kwargs)`: the fields that shape the network.
#[derive(Config, Debug, PartialEq)]
pub struct AutoencoderKlConfig {
    /// Image channels in.
    #[config(default = 3)]
    pub in_channels: usize,
    /// Image channels out.
    #[config(default = 3)]
    pub out_channels: usize,
    /// One encoder block per level.
    pub down_block_types: Vec<DownBlockType>,
    /// One decoder block per level.
    pub up_block_types: Vec<UpBlockType>,
    /// Channels of each level, from full resolution down.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder level; the decoder has one more per level.
    #[config(default = 1)]
    pub layers_per_block: usize,
    /// Activation after the GroupNorms.
    #[config(default = "ActFn::Silu")]
    pub act_fn: ActFn,
    /// Latent channels (the moments have twice as many).
    #[config(default = 4)]
    pub latent_channels: usize,
    /// Groups of every GroupNorm.
    #[config(default = 32)]
    pub norm_num_groups: usize,
    /// Tile size of diffusers' optional tiled encode/decode; no effect on the
    /// weights or the untiled forward that DiffMoE uses.
    #[config(default = 32)]
    pub sample_size: usize,
    /// diffusers' `scaling_factor`; kept for reference only, since DiffMoE uses
    /// the literal [`SCALING_FACTOR`].
    #[config(default = 0.18215)]
    pub scaling_factor: f64,
}

/// The constructor kwargs as JSON, every field optional (diffusers' defaults
/// fill the rest), plus the keys of a resolved `config.json`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Kwargs {
    in_channels: Option<usize>,
    out_channels: Option<usize>,
    down_block_types: Option<Vec<DownBlockType>>,
    up_block_types: Option<Vec<UpBlockType>>,
    block_out_channels: Option<Vec<usize>>,
    layers_per_block: Option<usize>,
    act_fn: Option<ActFn>,
    latent_channels: Option<usize>,
    norm_num_groups: Option<usize>,
    sample_size: Option<usize>,
    scaling_factor: Option<f64>,
    // Used by pipelines, never by `AutoencoderKL.forward`, and not by DiffMoE.
    #[allow(dead_code)]
    shift_factor: Option<f64>,
    #[allow(dead_code)]
    latents_mean: Option<Vec<f64>>,
    #[allow(dead_code)]
    latents_std: Option<Vec<f64>>,
    // Only changes the dtype of half-precision runs; this port is float32.
    #[allow(dead_code)]
    force_upcast: Option<bool>,
    use_quant_conv: Option<bool>,
    use_post_quant_conv: Option<bool>,
    mid_block_add_attention: Option<bool>,
    // Bookkeeping keys of a diffusers `config.json`.
    #[serde(rename = "_class_name")]
    #[allow(dead_code)]
    class_name: Option<String>,
    #[serde(rename = "_diffusers_version")]
    #[allow(dead_code)]
    diffusers_version: Option<String>,
    #[serde(rename = "_name_or_path")]
    #[allow(dead_code)]
    name_or_path: Option<String>,
}

impl AutoencoderKlConfig {
    /// `stabilityai/sd-vae-ft-mse` (and sd-vae-ft-ema, same architecture): the
    /// kl-f8 VAE of Stable Diffusion, 83,653,863 parameters.
    pub fn sd_vae_ft_mse() -> Self {
        Self::new(
            vec![DownBlockType::DownEncoderBlock2D; 4],
            vec![UpBlockType::UpDecoderBlock2D; 4],
            vec![128, 256, 512, 512],
        )
        .with_layers_per_block(2)
        .with_norm_num_groups(32)
        .with_sample_size(256)
    }

    /// From diffusers' constructor kwargs (`AutoencoderKL(**kwargs)`) or a
    /// resolved `config.json`, with diffusers' defaults for absent fields.
    pub fn from_constructor_kwargs(kwargs: &Value) -> Result<Self, ConfigError> {
        let k: Kwargs = serde_json::from_value(kwargs.clone()).map_err(|source| ConfigError::Json { source })?;
        for (field, value) in [
            ("use_quant_conv", k.use_quant_conv),
            ("use_post_quant_conv", k.use_post_quant_conv),
            ("mid_block_add_attention", k.mid_block_add_attention),
        ] {
            if value == Some(false) {
                return Err(ConfigError::Unsupported { field, value: "false".into(), supported: "true" });
            }
        }
        let config = Self {
            in_channels: k.in_channels.unwrap_or(3),
            out_channels: k.out_channels.unwrap_or(3),
            down_block_types: k.down_block_types.unwrap_or_else(|| vec![DownBlockType::DownEncoderBlock2D]),
            up_block_types: k.up_block_types.unwrap_or_else(|| vec![UpBlockType::UpDecoderBlock2D]),
            block_out_channels: k.block_out_channels.unwrap_or_else(|| vec![64]),
            layers_per_block: k.layers_per_block.unwrap_or(1),
            act_fn: k.act_fn.unwrap_or(ActFn::Silu),
            latent_channels: k.latent_channels.unwrap_or(4),
            norm_num_groups: k.norm_num_groups.unwrap_or(32),
            sample_size: k.sample_size.unwrap_or(32),
            scaling_factor: k.scaling_factor.unwrap_or(0.18215),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks that the fields describe a network diffusers can build.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let levels = self.block_out_channels.len();
        let invalid = |field, value: String, allowed: String| Err(ConfigError::Invalid { field, value, allowed });
        if levels == 0 {
            return invalid("block_out_channels", "[]".into(), "at least one level".into());
        }
        if self.down_block_types.len() != levels {
            return invalid(
                "down_block_types",
                format!("{} entries", self.down_block_types.len()),
                format!("one per level of block_out_channels ({levels})"),
            );
        }
        if self.up_block_types.len() != levels {
            return invalid(
                "up_block_types",
                format!("{} entries", self.up_block_types.len()),
                format!("one per level of block_out_channels ({levels})"),
            );
        }
        if self.norm_num_groups == 0 {
            return invalid("norm_num_groups", "0".into(), "at least 1".into());
        }
        if let Some(c) = self.block_out_channels.iter().find(|&&c| c == 0 || c % self.norm_num_groups != 0) {
            return invalid(
                "block_out_channels",
                format!("{:?}", self.block_out_channels),
                format!("positive multiples of norm_num_groups = {} (found {c})", self.norm_num_groups),
            );
        }
        for (field, value) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("layers_per_block", self.layers_per_block),
            ("latent_channels", self.latent_channels),
        ] {
            if value == 0 {
                return invalid(field, "0".into(), "at least 1".into());
            }
        }
        Ok(())
    }

    /// Resolution levels (`len(block_out_channels)`).
    pub fn levels(&self) -> usize {
        self.block_out_channels.len()
    }

    /// How much smaller the latent is than the image: `2^(levels - 1)` for
    /// even sizes (8 for SD); odd sizes are floored at every level.
    pub fn downsampling_factor(&self) -> usize {
        1 << (self.levels() - 1)
    }

    /// A randomly initialised model (PyTorch's default init; the parameters
    /// are allocated lazily, so a model that is then loaded never allocates
    /// them).
    ///
    /// # Panics
    /// If [`Self::validate`] fails.
    pub fn init<B: Backend>(&self, device: &B::Device) -> AutoencoderKl<B> {
        if let Err(e) = self.validate() {
            panic!("invalid AutoencoderKL config: {e}");
        }
        AutoencoderKl::new(self, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_diffusers() {
        let c = AutoencoderKlConfig::from_constructor_kwargs(&serde_json::json!({})).unwrap();
        assert_eq!(c.block_out_channels, vec![64]);
        assert_eq!(c.layers_per_block, 1);
        assert_eq!(c.norm_num_groups, 32);
        assert_eq!(c.latent_channels, 4);
        assert_eq!(c.scaling_factor, 0.18215);
    }

    #[test]
    fn sd_preset_matches_its_kwargs() {
        let kwargs = serde_json::json!({
            "in_channels": 3, "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
            "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "act_fn": "silu",
            "latent_channels": 4, "norm_num_groups": 32, "sample_size": 256
        });
        let c = AutoencoderKlConfig::from_constructor_kwargs(&kwargs).unwrap();
        assert_eq!(c, AutoencoderKlConfig::sd_vae_ft_mse());
        assert_eq!(c.downsampling_factor(), 8);
    }

    #[test]
    fn unknown_and_unsupported_fields_are_named() {
        let e =
            AutoencoderKlConfig::from_constructor_kwargs(&serde_json::json!({"block_out_channel": [64]})).unwrap_err();
        let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
        assert!(chain.contains("block_out_channel"), "{chain}");
        let e = AutoencoderKlConfig::from_constructor_kwargs(&serde_json::json!({"act_fn": "gelu"})).unwrap_err();
        assert!(matches!(e, ConfigError::Json { .. }));
        let e =
            AutoencoderKlConfig::from_constructor_kwargs(&serde_json::json!({"use_quant_conv": false})).unwrap_err();
        assert!(e.to_string().contains("use_quant_conv"), "{e}");
    }

    #[test]
    fn inconsistent_levels_are_invalid() {
        let e = AutoencoderKlConfig::from_constructor_kwargs(&serde_json::json!({
            "block_out_channels": [32, 64],
            "down_block_types": ["DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
            "norm_num_groups": 16
        }))
        .unwrap_err();
        assert!(e.to_string().contains("down_block_types"), "{e}");
        let e =
            AutoencoderKlConfig::from_constructor_kwargs(&serde_json::json!({"block_out_channels": [48]})).unwrap_err();
        assert!(e.to_string().contains("norm_num_groups"), "{e}");
    }
}
