//! Errors where user input enters this crate: configs and weight files.

use std::path::PathBuf;

/// An invalid or unreadable model configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A field holds a value outside what is allowed.
    #[error("config field `{field}` = {value}: {allowed}")]
    Invalid {
        /// Dotted path of the field, e.g. `model.moe.capacity`.
        field: String,
        /// The value found.
        value: String,
        /// What is allowed, in words.
        allowed: String,
    },
    /// Neither a preset name nor a readable config file.
    #[error("`{name}` is neither a preset nor a config file (presets: {presets})")]
    Unknown {
        /// What the user gave.
        name: String,
        /// The preset names, comma-separated.
        presets: String,
    },
    /// The config file could not be read.
    #[error("cannot read config file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this schema.
    #[error("config file {path} is not a valid config")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause, which names the line and the field.
        #[source]
        source: toml::de::Error,
    },
}

impl ConfigError {
    pub(crate) fn invalid(field: &str, value: impl std::fmt::Display, allowed: impl Into<String>) -> Self {
        Self::Invalid { field: field.to_string(), value: value.to_string(), allowed: allowed.into() }
    }
}

/// A weight file that cannot be loaded into a model; nothing is half-loaded.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A tensor the model needs is absent.
    #[error("missing key `{key}` (expected shape {expected:?})")]
    MissingKey {
        /// Official name of the tensor.
        key: String,
        /// The shape the model needs.
        expected: Vec<usize>,
    },
    /// Tensors the model does not have.
    #[error("unexpected key `{key}` with shape {shape:?}{}", if *more > 0 { format!(" (and {more} more unexpected keys)") } else { String::new() })]
    UnexpectedKey {
        /// The first unexpected name.
        key: String,
        /// Its shape.
        shape: Vec<usize>,
        /// How many other keys are unexpected.
        more: usize,
    },
    /// A tensor of the wrong shape.
    #[error("shape mismatch for `{key}`: the file has {found:?}, the model needs {expected:?}")]
    ShapeMismatch {
        /// Official name of the tensor.
        key: String,
        /// Shape in the file.
        found: Vec<usize>,
        /// Shape the model needs.
        expected: Vec<usize>,
    },
    /// The weights belong to another model family.
    #[error("the weights are a {found} model (key `{key}`), the config is a {expected} model")]
    WrongFamily {
        /// Family of the config.
        expected: String,
        /// Family the keys reveal.
        found: String,
        /// The key that reveals it.
        key: String,
    },
    /// The file could not be read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid safetensors file.
    #[error("{path} is not a valid safetensors file: {reason}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// A tensor in a safetensors file has a dtype that is not a float.
    #[error("{path}: tensor `{key}` has dtype {dtype}, expected a float dtype")]
    Dtype {
        /// The file.
        path: PathBuf,
        /// The tensor.
        key: String,
        /// Its dtype.
        dtype: String,
    },
    /// The PyTorch checkpoint could not be read.
    #[error(transparent)]
    Torch(#[from] diffmoe_weights::TorchCheckpointError),
    /// A project safetensors file whose metadata is unreadable.
    #[error("{path}: invalid diffmoe metadata: {reason}")]
    Metadata {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Writing a file failed.
    #[error(transparent)]
    Write(#[from] diffmoe_weights::WriteError),
    /// The config embedded in or given for the weights is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
}
