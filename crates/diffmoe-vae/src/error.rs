//! Errors where user input enters this crate: `AutoencoderKL` constructor
//! arguments and weight files (diffusers `ModelMixin.from_pretrained` and
//! `convert_ldm_vae_checkpoint` raise the Python counterparts).

use std::path::PathBuf;

use crate::key_layout::KeyLayout;

/// Constructor arguments that this port cannot build.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The arguments are not a JSON object of diffusers' `AutoencoderKL` kwargs.
    #[error("the AutoencoderKL constructor arguments are not valid")]
    Json {
        /// The cause; it names the offending field.
        #[source]
        source: serde_json::Error,
    },
    /// A field holds a value this port does not implement.
    #[error("AutoencoderKL argument `{field}` = {value} is not supported (supported: {supported})")]
    Unsupported {
        /// The argument name.
        field: &'static str,
        /// The value found.
        value: String,
        /// What is supported, in words.
        supported: &'static str,
    },
    /// Fields that contradict each other or an impossible value.
    #[error("AutoencoderKL argument `{field}` = {value}: {allowed}")]
    Invalid {
        /// The argument name.
        field: &'static str,
        /// The value found.
        value: String,
        /// What is allowed, in words.
        allowed: String,
    },
}

/// A weight file or tensor map that cannot be loaded; nothing is half-loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A tensor the model needs is absent.
    #[error("missing key `{key}` (diffusers name `{canonical}`, expected shape {expected:?})")]
    MissingKey {
        /// The name the checkpoint's layout gives the tensor (with its prefix).
        key: String,
        /// diffusers' current name of the tensor.
        canonical: String,
        /// The shape the model needs, in the checkpoint's layout.
        expected: Vec<usize>,
    },
    /// A tensor of the wrong shape.
    #[error("shape mismatch for `{key}`: the checkpoint has {found:?}, the model needs {expected:?}")]
    ShapeMismatch {
        /// The name in the checkpoint.
        key: String,
        /// Shape in the checkpoint.
        found: Vec<usize>,
        /// Shape the model needs, in the checkpoint's layout.
        expected: Vec<usize>,
    },
    /// VAE tensors the model does not have (a config that does not match the
    /// checkpoint, e.g. another number of levels or layers).
    #[error("unexpected key `{key}` with shape {shape:?}{}", if *more > 0 { format!(" (and {more} more unexpected keys)") } else { String::new() })]
    UnexpectedKey {
        /// The first unexpected name.
        key: String,
        /// Its shape.
        shape: Vec<usize>,
        /// How many other keys are unexpected.
        more: usize,
    },
    /// Keys of two naming layouts in one checkpoint.
    #[error("the checkpoint mixes key layouts: `{first_key}` is {first}, `{second_key}` is {second}")]
    MixedLayout {
        /// The first layout seen.
        first: KeyLayout,
        /// A key revealing it.
        first_key: String,
        /// The other layout.
        second: KeyLayout,
        /// A key revealing it.
        second_key: String,
    },
    /// A tensor of the map whose value count does not match its shape.
    #[error("tensor `{key}` has shape {shape:?} but {len} values")]
    DataLength {
        /// The tensor.
        key: String,
        /// Its shape.
        shape: Vec<usize>,
        /// How many values it has.
        len: usize,
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
    #[error("{path} is not a valid safetensors file")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// A tensor the model needs is stored with a dtype that is not a float.
    #[error("{path}: tensor `{key}` has dtype {dtype:?}, expected F32, F64, F16 or BF16")]
    Dtype {
        /// The file.
        path: PathBuf,
        /// The tensor.
        key: String,
        /// Its dtype.
        dtype: safetensors::Dtype,
    },
    /// The config given for the weights is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
}
