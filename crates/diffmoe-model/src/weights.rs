//! Weight files: official state dicts (`.safetensors`, or a `train.py`
//! checkpoint `.pt` read without executing it) and this project's own
//! safetensors format (official names plus the model config in the metadata).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::config::DiTConfig;
use crate::dit::DiT;
use crate::error::ImportError;
use crate::state_dict::{HostTensor, StateDict};
use crate::torch_checkpoint::{f16_to_f32, read_state_dict};

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
        let entries = crate::torch_checkpoint::checkpoint_entries(path)?;
        let entry = if entries.iter().any(|e| e == source.entry()) { source.entry() } else { "" };
        let tensors = read_state_dict(path, entry)?;
        let tensors =
            tensors.into_iter().map(|(name, t)| (name, HostTensor { shape: t.shape, data: t.data })).collect();
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
        let data = to_f32(view.dtype(), view.data()).ok_or_else(|| ImportError::Dtype {
            path: path.to_path_buf(),
            key: name.clone(),
            dtype: format!("{:?}", view.dtype()),
        })?;
        sd.tensors.insert(name, HostTensor { shape: view.shape().to_vec(), data });
    }
    Ok((sd, config))
}

fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F64 => {
            bytes.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32).collect()
        }
        Dtype::F16 => bytes.chunks_exact(2).map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect(),
        Dtype::BF16 => {
            bytes.chunks_exact(2).map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)).collect()
        }
        _ => return None,
    })
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
    write_f32_safetensors(path, sd.tensors.into_iter().map(|(k, t)| (k, t.shape, t.data)), metadata)
}

/// Writes float32 tensors `(name, shape, values)` and string `metadata` as a
/// safetensors file, atomically ([`write_atomically`]).
///
/// # Errors
/// If a tensor's values do not fill its shape, or the file cannot be written.
pub fn write_f32_safetensors(
    path: &Path,
    tensors: impl IntoIterator<Item = (String, Vec<usize>, Vec<f32>)>,
    metadata: HashMap<String, String>,
) -> Result<(), ImportError> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(k, shape, values)| (k, shape, values.iter().flat_map(|v| v.to_le_bytes()).collect()))
        .collect();
    let views = bytes
        .iter()
        .map(|(k, s, b)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(|e| ImportError::Safetensors { path: path.to_path_buf(), reason: format!("`{k}`: {e}") })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = (!metadata.is_empty()).then_some(metadata);
    let out = safetensors::serialize(views, &metadata)
        .map_err(|e| ImportError::Safetensors { path: path.to_path_buf(), reason: e.to_string() })?;
    write_atomically(path, &out)
}

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it
/// over `path`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ImportError> {
    use std::io::Write;
    let write_err = |source| ImportError::Write { path: path.to_path_buf(), source };
    let tmp: PathBuf = {
        let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(format!(".tmp-{}", std::process::id()));
        path.with_file_name(name)
    };
    let mut file = std::fs::File::create(&tmp).map_err(write_err)?;
    file.write_all(bytes).map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(write_err)
}
