//! Weight files: official state dicts (`.safetensors`, or a `train.py`
//! checkpoint `.pt` read without executing it) and this project's own
//! safetensors format (official names plus the model config in the metadata).

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::backend::Backend;
use diffmoe_weights::{checkpoint_entries, read_state_dict, write_f32_safetensors, Element};
use safetensors::SafeTensors;

use crate::config::DiTConfig;
use crate::dit::DiT;
use crate::error::ImportError;
use crate::state_dict::StateDict;

/// Metadata key holding the model config (JSON) in the project's format.
pub const CONFIG_METADATA_KEY: &str = "diffmoe.model_config";
/// Metadata key naming the format.
pub const FORMAT_METADATA_KEY: &str = "format";
/// Value of [`FORMAT_METADATA_KEY`] in the project's format.
pub const FORMAT_NAME: &str = "diffmoe-v1";

/// Which weights of a training checkpoint to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightSource {
    /// The trained weights (`model`).
    Model,
    /// The exponential moving average (`ema`), the weights papers sample from.
    Ema,
}

impl WeightSource {
    fn entry(self) -> &'static str {
        match self {
            Self::Model => "model",
            Self::Ema => "ema",
        }
    }
}

/// Reads a state dict and the config stored with it, if any.
///
/// `.pt` files are official `train.py` checkpoints (entry `model` or `ema`;
/// a bare `torch.save(state_dict)` also works); anything else is read as
/// safetensors (the `source` does not apply).
pub fn read_weights(path: &Path, source: WeightSource) -> Result<(StateDict, Option<DiTConfig>), ImportError> {
    if path.extension().is_some_and(|e| e == "pt" || e == "pth") {
        let entries = checkpoint_entries(path)?;
        let entry = if entries.iter().any(|e| e == source.entry()) { source.entry() } else { "" };
        let tensors = read_state_dict(path, entry)?.into_iter().collect();
        return Ok((StateDict { tensors }, None));
    }
    let bytes = std::fs::read(path).map_err(|source| ImportError::Io { path: path.to_path_buf(), source })?;
    read_safetensors(path, &bytes)
}

fn read_safetensors(path: &Path, bytes: &[u8]) -> Result<(StateDict, Option<DiTConfig>), ImportError> {
    let bad = |reason: String| ImportError::Safetensors { path: path.to_path_buf(), reason };
    let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
    let config = match metadata.metadata().as_ref().and_then(|m| m.get(CONFIG_METADATA_KEY)) {
        Some(json) => Some(serde_json::from_str::<DiTConfig>(json).map_err(|e| ImportError::Metadata {
            path: path.to_path_buf(),
            reason: format!("{CONFIG_METADATA_KEY}: {e}"),
        })?),
        None => None,
    };
    let st = SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
    let mut sd = StateDict::default();
    for (name, view) in st.tensors() {
        let element = Element::from_safetensors(view.dtype()).filter(|e| e.is_float()).ok_or_else(|| {
            ImportError::Dtype { path: path.to_path_buf(), key: name.clone(), dtype: format!("{:?}", view.dtype()) }
        })?;
        sd.tensors.insert(name, (view.shape().to_vec(), element.decode_all(view.data())).into());
    }
    Ok((sd, config))
}

/// Loads a model from a weight file.
///
/// The config comes from `config` when given, otherwise from the file's
/// metadata (the project's format); official files carry none, so they need
/// one. A config given for a file that also stores one must describe the same
/// network. Errors name the key and both shapes; nothing is half-loaded.
pub fn load_weights<B: Backend>(
    path: &Path,
    config: Option<&DiTConfig>,
    source: WeightSource,
    device: &B::Device,
) -> Result<DiT<B>, ImportError> {
    let (sd, stored) = read_weights(path, source)?;
    let config = match (config, stored) {
        (Some(given), Some(stored)) if !same_network(given, &stored) => {
            return Err(ImportError::Metadata {
                path: path.to_path_buf(),
                reason: format!(
                    "the file stores another model config: {}",
                    serde_json::to_string(&stored).unwrap_or_default()
                ),
            })
        }
        (Some(given), _) => given.clone(),
        (None, Some(stored)) => stored,
        (None, None) => {
            return Err(ImportError::Metadata {
                path: path.to_path_buf(),
                reason: "the file stores no model config; give one (--config or a preset)".to_string(),
            })
        }
    };
    sd.to_model(&config, device)
}

/// Whether two configs build the same tensors (label dropout and routing
/// settings that do not change shapes may differ).
fn same_network(a: &DiTConfig, b: &DiTConfig) -> bool {
    let strip = |c: &DiTConfig| {
        let mut c = c.clone();
        c.class_dropout_prob = if c.class_dropout_prob > 0.0 { 1.0 } else { 0.0 };
        if let Some(m) = &mut c.moe {
            m.capacity_loss_weight = 0.0;
            if c.family != crate::config::Family::Tc {
                m.capacity = 0.0;
            }
        }
        c
    };
    strip(a) == strip(b)
}

/// Saves a model in the project's format: official names, f32, and the model
/// config in the metadata. Written to a temporary file, then renamed, so an
/// interrupted save never leaves a truncated file under `path`.
pub fn save_weights<B: Backend>(model: &DiT<B>, path: &Path) -> Result<(), ImportError> {
    let sd = StateDict::from_model(model);
    let mut metadata = HashMap::new();
    metadata.insert(FORMAT_METADATA_KEY.to_string(), FORMAT_NAME.to_string());
    metadata.insert(
        CONFIG_METADATA_KEY.to_string(),
        serde_json::to_string(&model.config).expect("a DiTConfig always serialises"),
    );
    write_f32_safetensors(path, sd.tensors.into_iter().map(|(k, t)| (k, t.shape, t.data)), metadata)?;
    Ok(())
}
