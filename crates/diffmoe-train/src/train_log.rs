//! The run's JSONL log (`RUN_DIR/log.jsonl`): one record per logging
//! interval with every loss term averaged over the interval, as the official
//! loop averages its `running_loss`, plus what the official log lacks: the
//! gradient norm, and each DiffMoE layer's tokens per expert and thresholds.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::TrainError;

/// The log file of a run.
pub const LOG_FILE: &str = "log.jsonl";

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    /// Optimizer steps done.
    pub step: u64,
    /// Images seen by all replicas.
    pub images_seen: u64,
    /// Learning rate of the last step.
    pub lr: f64,
    /// The reported loss (official `loss`: regression + weighted capacity terms).
    pub loss: f64,
    /// Mean squared error.
    pub mse: f64,
    /// DDPM variational bound (learned sigma only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub vb: Option<f64>,
    /// Weighted sum of the capacity-predictor losses.
    pub capacity_loss: f64,
    /// Unweighted capacity-predictor BCE per DiffMoE block (`"block index" -> BCE`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub capacity_bce: BTreeMap<String, f64>,
    /// TC auxiliary (load-balancing) loss.
    pub aux_loss: f64,
    /// Global gradient norm before clipping (mean over the interval).
    pub grad_norm: f64,
    /// Tokens each expert processed in the last micro-step, per MoE block.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub tokens_per_expert: BTreeMap<String, Vec<i64>>,
    /// Per-expert thresholds after the last step, per DiffMoE block.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub thresholds: BTreeMap<String, Vec<f32>>,
    /// Training capacity of the last step (the capacity schedule moves it).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub capacity: Option<f64>,
    /// Throughput over the interval.
    pub images_per_second: f64,
    /// Optimizer steps per second over the interval.
    pub steps_per_second: f64,
    /// Training seconds since the run started, resumed sessions included.
    pub elapsed_seconds: f64,
    /// Examples the loader replaced because their file was unreadable.
    #[serde(skip_serializing_if = "is_zero", default)]
    pub skipped_files: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Appends records to a run's log.
#[derive(Debug)]
pub struct TrainLog {
    path: PathBuf,
    file: File,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.to_path_buf(), source }
}

impl TrainLog {
    /// Opens the log of `run_dir` for appending, first dropping every record
    /// after `resume_step` (written by a session that stopped before its next
    /// checkpoint; the resumed run writes them again). The truncated log is
    /// written to a temporary file and renamed over the old one.
    pub fn open(run_dir: &Path, resume_step: u64) -> Result<Self, TrainError> {
        let path = run_dir.join(LOG_FILE);
        if path.exists() {
            let reader = BufReader::new(File::open(&path).map_err(io(&path))?);
            let mut kept = String::new();
            for line in reader.lines() {
                let line = line.map_err(io(&path))?;
                let record: Result<LogRecord, _> = serde_json::from_str(&line);
                // A line cut short by a kill is dropped like a later one.
                if matches!(record, Ok(ref r) if r.step <= resume_step) {
                    kept.push_str(&line);
                    kept.push('\n');
                }
            }
            diffmoe_weights::write_atomically(&path, kept.as_bytes())?;
        }
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(io(&path))?;
        Ok(Self { path, file })
    }

    /// Appends one record as a line, flushed.
    pub fn append(&mut self, record: &LogRecord) -> Result<(), TrainError> {
        let mut line = serde_json::to_string(record).expect("a LogRecord always serialises");
        line.push('\n');
        self.file.write_all(line.as_bytes()).map_err(io(&self.path))?;
        self.file.flush().map_err(io(&self.path))
    }

    /// Reads every record of a log file.
    pub fn read(path: &Path) -> Result<Vec<LogRecord>, TrainError> {
        let reader = BufReader::new(File::open(path).map_err(io(path))?);
        reader
            .lines()
            .map(|line| {
                let line = line.map_err(io(path))?;
                serde_json::from_str(&line).map_err(|e| TrainError::Io {
                    path: path.to_path_buf(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                })
            })
            .collect()
    }
}
