//! `DataError`: every way reading training data can fail. Each variant names
//! the offending file or directory (or, for the loader, the numbers that do
//! not fit) so that a failure deep inside a worker thread can still be traced
//! to the file a user has to look at.

use std::path::{Path, PathBuf};

use super::ImageShape;

/// An error opening a dataset, decoding an example or running the loader.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or directory could not be read or written.
    #[error("cannot access {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A gzip stream could not be decompressed.
    #[error("cannot decompress {}: {source}", path.display())]
    Decompress {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file was read but its contents are not what its format requires.
    #[error("{} is corrupt: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },

    /// An image file could not be opened or decoded (or a PNG not encoded).
    #[error("cannot decode image {}: {source}", path.display())]
    Image {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },

    /// A safetensors shard could not be parsed or written.
    #[error("invalid safetensors file {}: {source}", path.display())]
    Safetensors {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },

    /// A file could not be replaced (see [`diffmoe_weights::write_atomically`]).
    #[error(transparent)]
    Write(#[from] diffmoe_weights::WriteError),

    /// A data specification names a path that does not exist.
    #[error("dataset path {} does not exist", path.display())]
    NotFound { path: PathBuf },

    /// A bare path was given but its kind of dataset could not be detected.
    #[error("cannot tell what kind of dataset {} is: looked for {looked_for}", path.display())]
    Undetected { path: PathBuf, looked_for: &'static str },

    /// A data specification string is malformed (for example `idx:` with no path).
    #[error("invalid data specification {spec:?}: {reason}")]
    InvalidSpec { spec: String, reason: &'static str },

    /// A directory that should hold a dataset holds no usable example.
    #[error("{} holds no {what}", path.display())]
    Empty { path: PathBuf, what: &'static str },

    /// A latent shard's latent shape differs from the model's input shape or
    /// from the shards read before it.
    #[error("{}: latent shape {found} does not match {expected}", path.display())]
    ShapeMismatch { path: PathBuf, expected: ImageShape, found: ImageShape },

    /// The dataset cannot produce examples of the model's input shape (for
    /// example 4 channels from pixels).
    #[error("{dataset} cannot be converted to the input shape {target}: {reason}")]
    UnsupportedTarget { dataset: String, target: ImageShape, reason: &'static str },

    /// The dataset is smaller than one global batch, so no epoch would hold a batch.
    #[error(
        "dataset has {len} examples, fewer than one global batch of \
         {batch_size} per replica x {world_size} replicas = {}",
        batch_size * world_size
    )]
    TooSmall { len: usize, batch_size: usize, world_size: usize },

    /// A loader setting is out of range.
    #[error("invalid loader setting {field}: {reason}")]
    InvalidLoader { field: &'static str, reason: &'static str },

    /// A loader worker thread panicked or stopped before delivering its batch.
    #[error("data loader worker {worker} stopped unexpectedly (it panicked) before batch {batch}")]
    WorkerStopped { worker: usize, batch: u64 },
}

impl DataError {
    /// The file or directory the error is about, when there is one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            DataError::Io { path, .. }
            | DataError::Decompress { path, .. }
            | DataError::Corrupt { path, .. }
            | DataError::Image { path, .. }
            | DataError::Safetensors { path, .. }
            | DataError::NotFound { path }
            | DataError::Undetected { path, .. }
            | DataError::Empty { path, .. }
            | DataError::ShapeMismatch { path, .. } => Some(path),
            DataError::Write(e) => Some(e.path()),
            DataError::InvalidSpec { .. }
            | DataError::UnsupportedTarget { .. }
            | DataError::TooSmall { .. }
            | DataError::InvalidLoader { .. }
            | DataError::WorkerStopped { .. } => None,
        }
    }

    /// Wraps an IO error with the path it happened on.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io { path: path.into(), source }
    }

    /// A format problem in `path`.
    pub(crate) fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        DataError::Corrupt { path: path.into(), reason: reason.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_path() {
        let error = DataError::corrupt("/data/x-idx3-ubyte", "bad magic");
        assert!(error.to_string().contains("/data/x-idx3-ubyte"));
        assert_eq!(error.path(), Some(Path::new("/data/x-idx3-ubyte")));
        let error = DataError::TooSmall { len: 10, batch_size: 4, world_size: 3 };
        assert!(error.to_string().contains("= 12"), "{error}");
    }
}
