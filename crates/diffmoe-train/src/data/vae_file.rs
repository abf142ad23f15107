//! The VAE weight file a user brings for `cache-latents`: diffusers'
//! `diffusion_pytorch_model.safetensors` (or `.bin`) of
//! `stabilityai/sd-vae-ft-mse` / `sd-vae-ft-ema`, the original LDM
//! `vae-ft-mse-840000-ema-pruned.{ckpt,safetensors}`, or a full Stable
//! Diffusion checkpoint, in any of the three key layouts that
//! `diffmoe_vae::KeyLayout` reads; an optional diffusers `config.json` for
//! another architecture. Also what identifies the file in a cache manifest
//! (name, size, SHA-256), and procedural weights for tests and smoke runs,
//! where the real 335 MB file is not at hand.

use std::io::Read;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use diffmoe_vae::{load_safetensors, load_tensor_map, AutoencoderKl, AutoencoderKlConfig, TensorMap};
use diffmoe_weights::{checkpoint_entries, is_torch_save_file, read_state_dict, TorchCheckpointError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a user has to bring, appended to every error about the weight file.
pub const VAE_FILE_HINT: &str = "bring the Stable Diffusion VAE the paper uses: \
     `diffusion_pytorch_model.safetensors` of stabilityai/sd-vae-ft-mse (or stabilityai/sd-vae-ft-ema) \
     from the Hugging Face hub; its `.bin`, or the LDM `vae-ft-mse-840000-ema-pruned.ckpt`, work too";

/// The top-level entry of an LDM / Stable Diffusion `.ckpt` that holds the
/// weights (diffusers' `.bin` is the state dict itself).
const CKPT_STATE_DICT: &str = "state_dict";

/// The name endings of GroupNorm scales, which procedural weights set near 1.
const NORM_WEIGHTS: [&str; 4] = ["norm1.weight", "norm2.weight", "group_norm.weight", "conv_norm_out.weight"];

/// A VAE weight or config file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum VaeFileError {
    /// The weight file does not exist.
    #[error("VAE weights {} do not exist; {VAE_FILE_HINT}", path.display())]
    NotFound { path: PathBuf },

    /// The file could not be read.
    #[error("cannot read {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Procedural weights could not be written.
    #[error(transparent)]
    Write(#[from] diffmoe_weights::WriteError),

    /// The weights do not fit the architecture (missing or unexpected keys,
    /// wrong shapes, not a safetensors file).
    #[error(
        "{} is not VAE weights of the expected architecture ({VAE_FILE_HINT}; a VAE of another \
         architecture needs its config.json)",
        path.display()
    )]
    Weights {
        path: PathBuf,
        // Boxed, as the checkpoint errors are large and errors travel far.
        #[source]
        source: Box<diffmoe_vae::LoadError>,
    },

    /// A torch pickle (`.bin`, `.ckpt`) that cannot be read.
    #[error("cannot read the torch checkpoint {} ({VAE_FILE_HINT})", path.display())]
    Torch {
        path: PathBuf,
        #[source]
        source: Box<TorchCheckpointError>,
    },

    /// A config file that is not JSON.
    #[error("{} is not a JSON AutoencoderKL config", path.display())]
    ConfigJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A config this port cannot build.
    #[error("{} describes an AutoencoderKL this port cannot build", path.display())]
    Config {
        path: PathBuf,
        #[source]
        source: diffmoe_vae::ConfigError,
    },
}

/// Reads diffusers' `config.json` of an `AutoencoderKL` (or the constructor
/// kwargs as JSON); absent fields take diffusers' defaults.
pub fn read_vae_config(path: &Path) -> Result<AutoencoderKlConfig, VaeFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| VaeFileError::Io { path: path.to_path_buf(), source })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| VaeFileError::ConfigJson { path: path.to_path_buf(), source })?;
    AutoencoderKlConfig::from_constructor_kwargs(&json)
        .map_err(|source| VaeFileError::Config { path: path.to_path_buf(), source })
}

/// Loads the VAE of `config` from `path`: a torch pickle when the file is a
/// `torch.save` file, zip or legacy (an LDM `.ckpt`'s `state_dict` entry,
/// else the top-level dict), else safetensors.
pub fn load_vae<B: Backend>(
    path: &Path,
    config: &AutoencoderKlConfig,
    device: &B::Device,
) -> Result<AutoencoderKl<B>, VaeFileError> {
    let weights_error = |source| VaeFileError::Weights { path: path.to_path_buf(), source: Box::new(source) };
    if is_torch_file(path)? {
        let torch_error = |source| VaeFileError::Torch { path: path.to_path_buf(), source: Box::new(source) };
        let entries = checkpoint_entries(path).map_err(torch_error)?;
        let entry = if entries.iter().any(|e| e == CKPT_STATE_DICT) { CKPT_STATE_DICT } else { "" };
        let tensors: TensorMap = read_state_dict(path, entry).map_err(torch_error)?.into_iter().collect();
        load_tensor_map(config, tensors, device).map_err(weights_error)
    } else {
        load_safetensors(config, path, device).map_err(weights_error)
    }
}

/// Whether `path` is a `torch.save` file (zip or legacy); a missing file is `NotFound`.
fn is_torch_file(path: &Path) -> Result<bool, VaeFileError> {
    is_torch_save_file(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => VaeFileError::NotFound { path: path.to_path_buf() },
        _ => VaeFileError::Io { path: path.to_path_buf(), source },
    })
}

/// What identifies a VAE weight file in a cache manifest: the same bytes
/// give the same latents, whatever the file is called.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeIdentity {
    /// The file name, recorded as provenance in every shard (`vae` metadata).
    pub file: String,
    /// The size in bytes.
    pub bytes: u64,
    /// The SHA-256 of the contents, lower-case hex.
    pub sha256: String,
}

impl std::fmt::Display for VaeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} bytes, sha256 {})", self.file, self.bytes, self.sha256)
    }
}

/// Reads `path` once to compute its [`VaeIdentity`]; a missing file is
/// `NotFound` with the hint of which file to bring.
pub fn identify_vae_file(path: &Path) -> Result<VaeIdentity, VaeFileError> {
    let io = |source| VaeFileError::Io { path: path.to_path_buf(), source };
    let mut file = std::fs::File::open(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => VaeFileError::NotFound { path: path.to_path_buf() },
        _ => VaeFileError::Io { path: path.to_path_buf(), source },
    })?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buffer).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        bytes += n as u64;
    }
    let sha256 = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let file = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string());
    Ok(VaeIdentity { file, bytes, sha256 })
}

/// Writes a VAE of `config` with procedural weights (seeded uniform values,
/// `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` for weights, norms near 1) as a
/// diffusers-layout safetensors file: a stand-in for tests and smoke runs,
/// whose latents mean nothing. `B` only lays out the parameter table; nothing
/// is allocated on its device.
pub fn write_procedural_vae<B: Backend>(
    config: &AutoencoderKlConfig,
    path: &Path,
    seed: u64,
) -> Result<(), VaeFileError> {
    config.validate().map_err(|source| VaeFileError::Config { path: path.to_path_buf(), source })?;
    let specs = config.init::<B>(&Default::default()).parameter_specs();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let tensors = specs.into_iter().map(|spec| {
        let numel = spec.numel();
        let is_norm_weight = spec.shape.len() == 1 && NORM_WEIGHTS.iter().any(|n| spec.name.ends_with(n));
        let (centre, half_width) = match spec.shape.as_slice() {
            [_] if is_norm_weight => (1.0, 0.1),
            [_] => (0.0, 0.1),
            [out, ..] => (0.0, 1.0 / ((numel / out) as f32).sqrt()),
            [] => (0.0, 0.1),
        };
        let values = (0..numel).map(|_| centre + rng.random_range(-half_width..=half_width)).collect();
        (spec.name, spec.shape, values)
    });
    Ok(diffmoe_weights::write_f32_safetensors(path, tensors, Default::default())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_dir;
    use burn::backend::Flex;
    use diffmoe_vae::{DownBlockType, UpBlockType};

    fn with_channels(channels: Vec<usize>) -> AutoencoderKlConfig {
        AutoencoderKlConfig::new(
            vec![DownBlockType::DownEncoderBlock2D; 2],
            vec![UpBlockType::UpDecoderBlock2D; 2],
            channels,
        )
        .with_norm_num_groups(4)
    }

    fn tiny() -> AutoencoderKlConfig {
        with_channels(vec![8, 16])
    }

    #[test]
    fn procedural_weights_load_and_identify() {
        let dir = test_dir("vae-file");
        let path = dir.join("vae.safetensors");
        write_procedural_vae::<Flex>(&tiny(), &path, 3).unwrap();
        let vae = load_vae::<Flex>(&path, &tiny(), &Default::default()).unwrap();
        let x = burn::tensor::Tensor::<Flex, 4>::ones([1, 3, 8, 8], &Default::default());
        assert_eq!(vae.encode(x).dims(), [1, 8, 4, 4]);

        let id = identify_vae_file(&path).unwrap();
        assert_eq!((id.file.as_str(), id.bytes), ("vae.safetensors", std::fs::metadata(&path).unwrap().len()));
        assert_eq!(id.sha256.len(), 64);
        let other = dir.join("other.safetensors");
        write_procedural_vae::<Flex>(&tiny(), &other, 4).unwrap();
        assert_ne!(identify_vae_file(&other).unwrap().sha256, id.sha256);

        // A config written as JSON reads back; diffusers' bookkeeping keys are accepted.
        let mut json = serde_json::to_value(tiny()).unwrap();
        json["_class_name"] = "AutoencoderKL".into();
        let config_path = dir.join("config.json");
        std::fs::write(&config_path, json.to_string()).unwrap();
        assert_eq!(read_vae_config(&config_path).unwrap(), tiny());
        std::fs::write(&config_path, r#"{"block_out_channels": [8, 16], "norm_num_groups": 3}"#).unwrap();
        let e = read_vae_config(&config_path).unwrap_err();
        assert!(matches!(e, VaeFileError::Config { .. }) && e.to_string().contains("config.json"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_files_name_the_file_and_what_to_bring() {
        let dir = test_dir("vae-file-bad");
        let missing = dir.join("diffusion_pytorch_model.safetensors");
        for e in [
            load_vae::<Flex>(&missing, &tiny(), &Default::default()).unwrap_err(),
            identify_vae_file(&missing).unwrap_err(),
        ] {
            assert!(matches!(e, VaeFileError::NotFound { .. }), "{e}");
            let message = e.to_string();
            assert!(message.contains("diffusion_pytorch_model.safetensors"), "{message}");
            assert!(message.contains("stabilityai/sd-vae-ft-mse"), "{message}");
        }

        let garbage = dir.join("garbage.safetensors");
        std::fs::write(&garbage, b"not safetensors at all").unwrap();
        let e = load_vae::<Flex>(&garbage, &tiny(), &Default::default()).unwrap_err();
        assert!(matches!(e, VaeFileError::Weights { .. }) && e.to_string().contains("garbage.safetensors"), "{e}");

        // A zip without a pickle is read as a torch file and refused as one.
        let zip_path = dir.join("model.bin");
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&zip_path).unwrap());
        zip.start_file("archive/readme.txt", zip::write::SimpleFileOptions::default()).unwrap();
        std::io::Write::write_all(&mut zip, b"hello").unwrap();
        zip.finish().unwrap();
        let e = load_vae::<Flex>(&zip_path, &tiny(), &Default::default()).unwrap_err();
        assert!(matches!(e, VaeFileError::Torch { .. }) && e.to_string().contains("model.bin"), "{e}");

        // Weights of another architecture name the file and the config hint.
        let small = dir.join("small.safetensors");
        write_procedural_vae::<Flex>(&with_channels(vec![4, 8]), &small, 0).unwrap();
        let e = load_vae::<Flex>(&small, &tiny(), &Default::default()).unwrap_err();
        assert!(matches!(e, VaeFileError::Weights { .. }) && e.to_string().contains("config.json"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
