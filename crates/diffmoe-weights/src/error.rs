//! Why a file could not be written.

use std::path::{Path, PathBuf};

use safetensors::SafeTensorError;

/// Why a file could not be written. The file at the path is left as it
/// was: writes go to a temporary file that replaces it only once complete.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Creating, writing, syncing or renaming the file failed.
    #[error("cannot write {}", path.display())]
    Io {
        /// The file being written (or its temporary, when that is what failed).
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A tensor's values do not fill its shape.
    #[error("cannot write {}: tensor `{key}`: {source}", path.display())]
    Tensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        key: String,
        /// What safetensors said (boxed: it is larger than the error's other fields).
        #[source]
        source: Box<SafeTensorError>,
    },
    /// The tensors could not be serialised (e.g. a name given twice).
    #[error("cannot write {} as safetensors: {source}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What safetensors said (boxed: it is larger than the error's other fields).
        #[source]
        source: Box<SafeTensorError>,
    },
}

impl WriteError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            Self::Io { path, .. } | Self::Tensor { path, .. } | Self::Safetensors { path, .. } => path,
        }
    }
}
