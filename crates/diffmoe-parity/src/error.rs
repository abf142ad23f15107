//! Why a fixture cannot be read.

use std::path::PathBuf;

/// A fixture file that cannot be read, or lacks what a checker needs.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    /// The file could not be read.
    #[error("cannot read fixture file {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A manifest or index is not JSON.
    #[error("fixture file {} is not valid JSON", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The tensors are not valid safetensors.
    #[error("fixture tensors {} are not valid safetensors", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// The file lacks something the checker needs, or holds something it cannot read.
    #[error("fixture file {} is malformed: {reason}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl FixtureError {
    /// A [`FixtureError::Malformed`] of `path`.
    pub fn malformed(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Malformed { path: path.into(), reason: reason.into() }
    }
}
