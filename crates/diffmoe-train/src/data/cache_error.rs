//! `CacheError`: every way `cache-latents` can fail. Each variant names the
//! file, directory or setting a user has to look at.

use std::path::PathBuf;

use super::vae_file::VaeFileError;
use super::DataError;

/// An error building or resuming a latent cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The images could not be opened or decoded, or a shard not written.
    #[error(transparent)]
    Data(#[from] DataError),

    /// The VAE weight or config file cannot be used.
    #[error(transparent)]
    Vae(#[from] VaeFileError),

    /// The data specification names latents, not images.
    #[error("{spec} holds latents already; cache-latents encodes images (folder:DIR, idx:PATH or embedded)")]
    NotPixels { spec: String },

    /// A setting is out of range.
    #[error("invalid setting {field} = {value}: {allowed}")]
    Setting { field: &'static str, value: String, allowed: String },

    /// A file or directory of the cache could not be read or written.
    #[error("cannot access {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The cache manifest is not valid JSON of the expected fields.
    #[error("{} is not a latent cache manifest", path.display())]
    ManifestJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// The directory is a cache of something else than what this run asks for.
    #[error(
        "{} records a cache made with {setting} = {cached}, but this run asks for {requested}; \
         rerun with the same settings, or write to another directory",
        manifest.display()
    )]
    Mismatch { manifest: PathBuf, setting: &'static str, cached: String, requested: String },

    /// The directory holds latent shards that no cache manifest describes.
    #[error(
        "{} holds *.safetensors files but no cache manifest (cache.json), so they were not written \
         by cache-latents with known settings; write to an empty or new directory",
        path.display()
    )]
    NotACache { path: PathBuf },
}

impl CacheError {
    /// Wraps an IO error with the path it happened on.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CacheError::Io { path: path.into(), source }
    }
}
