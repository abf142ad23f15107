//! The Stable Diffusion VAE of DiffMoE's latent diffusion (diffusers
//! `AutoencoderKL`, `stabilityai/sd-vae-ft-mse`), backend-generic.
//!
//! It mirrors `diffusers/models/autoencoders/autoencoder_kl.py` and
//! `vae.py` (diffusers 0.42) in float32, untiled, as DiffMoE uses it:
//! `train.py` trains on `vae.encode(x).latent_dist.sample() * 0.18215`
//! ([`AutoencoderKl::encode_latents`]) and `sample_ddp_feature.py` decodes
//! `vae.decode(z / 0.18215)` ([`AutoencoderKl::decode_latents`]). The
//! semantics are written down in `shared/docs/vae-inception-semantics.md`.
//!
//! Weights load from safetensors ([`load_safetensors`]) or from host tensors
//! ([`load_tensor_map`]; torch pickles such as `diffusion_pytorch_model.bin`
//! or `vae-ft-mse-840000-ema-pruned.ckpt` are read with
//! `diffmoe_weights::read_state_dict` and passed as a map), in any of the
//! three key layouts of the real checkpoints ([`KeyLayout`]).
//!
//! Code map: `config` (constructor kwargs, preset, latent scale) ->
//! `group_norm`, `conv`, `resnet`, `downsample`, `upsample`, `attention`,
//! `mid_block`, `down_block`, `up_block` -> `encoder`, `decoder` ->
//! `autoencoder`, `posterior`; loading: `state_dict` (names and shapes),
//! `key_layout` (renaming), `load_plan` (checks), `weights` (values);
//! `parity` checks all of it against diffusers' outputs.

mod activations;
mod attention;
mod autoencoder;
mod config;
mod conv;
mod decoder;
mod down_block;
mod downsample;
mod encoder;
mod error;
mod group_norm;
mod key_layout;
mod load_plan;
mod mid_block;
pub mod parity;
mod posterior;
mod resnet;
mod state_dict;
mod up_block;
mod upsample;
mod weights;

pub use activations::Activations;
pub use attention::MidBlockAttention;
pub use autoencoder::{from_diffusion_scale, to_diffusion_scale, AutoencoderKl, PosteriorDraw};
pub use config::{ActFn, AutoencoderKlConfig, DownBlockType, UpBlockType, SCALING_FACTOR};
pub use conv::{conv1x1, conv3x3};
pub use decoder::Decoder;
pub use down_block::{DownEncoderBlock2d, LevelEnd};
pub use downsample::{downsampled_size, Downsample2d};
pub use encoder::Encoder;
pub use error::{ConfigError, LoadError};
pub use group_norm::{GroupNorm, GROUP_NORM_EPS};
pub use key_layout::{KeyLayout, SD_CHECKPOINT_PREFIX, VAE_ROOTS};
pub use load_plan::{LoadPlan, PlanEntry};
pub use mid_block::MidBlock2d;
pub use posterior::{DiagonalGaussian, LOGVAR_MAX, LOGVAR_MIN};
pub use resnet::ResnetBlock2d;
pub use state_dict::{ParamKind, ParamSpec};
pub use up_block::UpDecoderBlock2d;
pub use upsample::{upsample_nearest_2x, Upsample2d};
pub use weights::{load_safetensors, load_tensor_map, TensorMap};
