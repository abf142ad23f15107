//! The DiT backbone of DiffMoE (Shi et al., 2025) for the four families of the
//! paper (Dense-DiT, TC-DiT, EC-DiT, DiffMoE), equal to the official PyTorch
//! implementation (`KwaiVGI/DiffMoE`, `models/`): configs and presets,
//! parameter counts, and weight import/export under the official names.

mod attention;
mod block;
mod config;
mod dit;
mod embedding;
mod error;
mod params;
mod preset;
mod recipe;
mod state_dict;
mod weights;

pub use attention::Attention;
pub use block::{BlockMlp, DiTBlock, FinalLayer};
pub use config::{DiTConfig, Family, MoeConfig, MoeLayout, Objective, RunConfig};
pub use diffmoe_core::{layer_norm, modulate};
pub use dit::{Activations, BlockRouting, CfgChannels, DiT, DiTOutput};
pub use embedding::{sincos_pos_embed_2d, timestep_embedding, LabelEmbedder, PatchEmbed, TimestepEmbedder};
pub use error::{ConfigError, ImportError};
pub use params::{ParamCount, ParamReport};
pub use preset::{preset, preset_names, presets};
pub use recipe::{
    BadFiles, CapacitySchedule, DataConfig, Flip, GridConfig, OptimizerConfig, TimestepSampling, TrainConfig,
};
pub use state_dict::StateDict;
pub use weights::{load_weights, save_weights, WeightSource};
