//! The error of a training run, at the edge where user input (configs, data,
//! run directories, checkpoints) enters.

use std::path::PathBuf;

use diffmoe_model::ConfigError;

use crate::checkpoint::CheckpointError;
use crate::data::DataError;
use crate::generate::SampleError;

/// Why a training run could not start or go on.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The config is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data could not be read.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A checkpoint could not be written or read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The sample grid could not be drawn.
    #[error("cannot sample the grid")]
    Sample(#[from] SampleError),
    /// A file of the run could not be written.
    #[error("cannot write {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file of the run could not be replaced (see [`diffmoe_weights::write_atomically`]).
    #[error(transparent)]
    Write(#[from] diffmoe_weights::WriteError),
    /// The output directory cannot take this run.
    #[error("output directory {path}: {reason}")]
    RunDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The data does not fit the model.
    #[error("the data does not fit the model: {reason}")]
    Mismatch {
        /// What differs.
        reason: String,
    },
    /// The loss stopped being a number.
    #[error("the loss is {value} at step {step}; lower the learning rate or enable train.clip_grad_norm")]
    NonFinite {
        /// The step.
        step: u64,
        /// The loss.
        value: f64,
    },
}
