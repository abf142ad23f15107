//! Training checkpoints: everything a run needs to continue exactly where it
//! stopped, in open formats.
//!
//! ```text
//! RUN_DIR/checkpoints/step-00001000/
//!     model.safetensors       trained weights (official names, config in the metadata)
//!     ema.safetensors         EMA weights, thresholds included (same format)
//!     optimizer.safetensors   AdamW moments: `exp_avg.<param>`, `exp_avg_sq.<param>`
//!     state.json              step counters, images seen, elapsed time
//!     config.toml             the resolved run config that wrote it
//! ```
//!
//! A checkpoint is written into a hidden `.step-XXXXXXXX.partial-<pid>`
//! directory, every file is synced, and only then is the directory renamed to
//! its final name: a process killed while writing leaves the previous
//! checkpoints intact and at most a partial directory, which is never read
//! and is removed by the next run. The random state is the step itself (see
//! `step_rng` and the loader), so nothing else needs saving.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use burn::tensor::backend::{AutodiffBackend, Backend};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use diffmoe_model::{load_weights, save_weights, DiT, ImportError, RunConfig, WeightSource};
use diffmoe_weights::transpose_matrix;

use crate::optimizer::{AdamW, OptimizerState};
use crate::param_path::param_infos;

/// The checkpoints folder of a run.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
const STATE_FILE: &str = "state.json";
const CONFIG_FILE: &str = "config.toml";
const MODEL_FILE: &str = "model.safetensors";
const EMA_FILE: &str = "ema.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FORMAT: &str = "diffmoe-checkpoint-v2";
/// The format before 2026-12-07, read and upgraded: its AdamW moments of
/// the experts' weight matrices follow the layout the experts then had,
/// each expert's matrix transposed against today's (see
/// [`upgrade_v1_moments`]). Its weight files are the same.
const STATE_FORMAT_V1: &str = "diffmoe-checkpoint-v1";

/// A test hook: with `DIFFMOE_FAULT=abort-in-checkpoint:STEP` the process
/// aborts half-way through writing the checkpoint of `STEP`, as if it were
/// killed there (the resume tests use it).
const FAULT_ENV: &str = "DIFFMOE_FAULT";

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file or directory could not be read or written.
    #[error("checkpoint I/O on {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Weights could not be read or written.
    #[error("checkpoint weights {path}")]
    Weights {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<ImportError>,
    },
    /// A file of the checkpoint is malformed.
    #[error("checkpoint file {path} is malformed: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The checkpoint was written by another configuration.
    #[error(
        "checkpoint {path} was written by another configuration: `{field}` is {checkpoint} there but {run} in this run"
    )]
    ConfigMismatch {
        /// The checkpoint.
        path: PathBuf,
        /// The first differing field.
        field: String,
        /// Its value in the checkpoint.
        checkpoint: String,
        /// Its value in the run being resumed.
        run: String,
    },
    /// The run has no complete checkpoint.
    #[error("{run_dir} holds no complete checkpoint (looked for {run_dir}/checkpoints/step-*/state.json)")]
    NoCheckpoint {
        /// The run directory.
        run_dir: PathBuf,
    },
    /// A weights file was given without the run config that describes it.
    #[error("{path} is a weights file, which does not say how the model was trained; give the run config (a preset name or TOML file) with it")]
    NeedsConfig {
        /// The weights file.
        path: PathBuf,
    },
}

/// Counters saved with a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Format tag.
    pub format: String,
    /// Optimizer steps done.
    pub step: u64,
    /// Micro-steps done (`step * accumulation`): the loader's batch index and
    /// the key of every random draw.
    pub micro_step: u64,
    /// Images seen by all replicas.
    pub images_seen: u64,
    /// Training seconds so far.
    pub elapsed_seconds: f64,
    /// Replicas that trained it.
    pub world_size: usize,
}

impl TrainState {
    /// The state of a run that has not started.
    pub fn start(world_size: usize) -> Self {
        Self {
            format: STATE_FORMAT.to_string(),
            step: 0,
            micro_step: 0,
            images_seen: 0,
            elapsed_seconds: 0.0,
            world_size,
        }
    }
}

/// A loaded checkpoint.
#[derive(Debug)]
pub struct Checkpoint<B: AutodiffBackend> {
    /// Where it was read from.
    pub path: PathBuf,
    /// The trained model.
    pub model: DiT<B>,
    /// The EMA weights.
    pub ema: DiT<B::InnerBackend>,
    /// The optimizer.
    pub optimizer: AdamW<B>,
    /// Its counters.
    pub state: TrainState,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
}

/// The directory of the checkpoint at `step`.
pub fn checkpoint_dir(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join(CHECKPOINTS_DIR).join(format!("step-{step:08}"))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    use std::io::Write;
    let mut file = fs::File::create(path).map_err(io(path))?;
    file.write_all(bytes).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

fn sync_dir(path: &Path) -> Result<(), CheckpointError> {
    fs::File::open(path).and_then(|d| d.sync_all()).map_err(io(path))
}

/// Writes the checkpoint of `step` and returns its directory. An existing
/// complete checkpoint of the same step is left as it is.
pub fn save_checkpoint<B: AutodiffBackend>(
    run_dir: &Path,
    config: &RunConfig,
    model: &DiT<B>,
    ema: &DiT<B::InnerBackend>,
    optimizer: &AdamW<B>,
    state: &TrainState,
) -> Result<PathBuf, CheckpointError> {
    let root = run_dir.join(CHECKPOINTS_DIR);
    fs::create_dir_all(&root).map_err(io(&root))?;
    let final_dir = checkpoint_dir(run_dir, state.step);
    if final_dir.join(STATE_FILE).is_file() {
        return Ok(final_dir);
    }
    let tmp = root.join(format!(".step-{:08}.partial-{}", state.step, std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    fs::create_dir(&tmp).map_err(io(&tmp))?;

    let weights = |path: PathBuf, result: Result<(), ImportError>| {
        result.map_err(|source| CheckpointError::Weights { path, source: Box::new(source) })
    };
    weights(tmp.join(MODEL_FILE), save_weights(model, &tmp.join(MODEL_FILE)))?;
    if std::env::var(FAULT_ENV).ok().and_then(|v| v.strip_prefix("abort-in-checkpoint:")?.parse::<u64>().ok())
        == Some(state.step)
    {
        std::process::abort();
    }
    weights(tmp.join(EMA_FILE), save_weights(ema, &tmp.join(EMA_FILE)))?;
    write_synced(&tmp.join(OPTIMIZER_FILE), &optimizer_bytes(&optimizer.export(), &tmp.join(OPTIMIZER_FILE))?)?;
    write_synced(&tmp.join(CONFIG_FILE), config.to_toml().as_bytes())?;
    let json = serde_json::to_vec_pretty(state).expect("a TrainState always serialises");
    write_synced(&tmp.join(STATE_FILE), &json)?;
    sync_dir(&tmp)?;
    if final_dir.exists() {
        // An incomplete directory under the final name (no state.json) is
        // not a checkpoint; replace it.
        fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
    }
    fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
    sync_dir(&root)?;
    Ok(final_dir)
}

/// Complete checkpoints of a run, oldest first, with their steps.
pub fn list_checkpoints(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let root = run_dir.join(CHECKPOINTS_DIR);
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in fs::read_dir(&root).map_err(io(&root))? {
        let entry = entry.map_err(io(&root))?;
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok()) else { continue };
        if entry.path().join(STATE_FILE).is_file() {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Deletes all but the newest `keep` checkpoints, and partial directories
/// left by killed processes.
pub fn prune_checkpoints(run_dir: &Path, keep: usize) -> Result<(), CheckpointError> {
    let all = list_checkpoints(run_dir)?;
    for (_, path) in all.iter().take(all.len().saturating_sub(keep)) {
        fs::remove_dir_all(path).map_err(io(path))?;
    }
    let root = run_dir.join(CHECKPOINTS_DIR);
    let own = format!(".partial-{}", std::process::id());
    if root.is_dir() {
        for entry in fs::read_dir(&root).map_err(io(&root))? {
            let entry = entry.map_err(io(&root))?;
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with(".step-") && name.contains(".partial-") && !name.ends_with(&own) {
                let path = entry.path();
                fs::remove_dir_all(&path).map_err(io(&path))?;
            }
        }
    }
    Ok(())
}

/// A model to sample from, with the config of the run that trained it.
#[derive(Debug)]
pub struct TrainedModel<B: Backend> {
    /// The run config (objective, data, model).
    pub config: RunConfig,
    /// The network.
    pub model: DiT<B>,
    /// The weights file it was read from.
    pub weights: PathBuf,
}

/// Reads a trained model from `path`: a run directory (its latest complete
/// checkpoint), a checkpoint directory, or a weights file (this project's
/// safetensors, or official weights) with `config` describing its run.
/// `source` picks the EMA weights (`ema.safetensors` of a checkpoint, the
/// `ema` entry of an official `.pt`) or the trained ones.
///
/// # Errors
/// If nothing readable is at `path`, a weights file comes without `config`,
/// or the weights do not fit the config (the error names the key).
pub fn load_trained<B: Backend>(
    path: &Path,
    source: WeightSource,
    config: Option<RunConfig>,
    device: &B::Device,
) -> Result<TrainedModel<B>, CheckpointError> {
    let load = |weights: PathBuf, config: RunConfig, source| {
        let model = load_weights::<B>(&weights, Some(&config.model), source, device)
            .map_err(|e| CheckpointError::Weights { path: weights.clone(), source: Box::new(e) })?;
        Ok(TrainedModel { config, model, weights })
    };
    if path.is_file() {
        let config = config.ok_or_else(|| CheckpointError::NeedsConfig { path: path.to_path_buf() })?;
        return load(path.to_path_buf(), config, source);
    }
    let dir = if path.join(STATE_FILE).is_file() {
        path.to_path_buf()
    } else if path.is_dir() {
        let (_, latest) = list_checkpoints(path)?
            .pop()
            .ok_or_else(|| CheckpointError::NoCheckpoint { run_dir: path.to_path_buf() })?;
        latest
    } else {
        return Err(CheckpointError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        });
    };
    let config_path = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&config_path).map_err(io(&config_path))?;
    let stored: RunConfig = toml::from_str(&text)
        .map_err(|e| CheckpointError::Corrupt { path: config_path.clone(), reason: e.to_string() })?;
    let file = match source {
        WeightSource::Model => MODEL_FILE,
        WeightSource::Ema => EMA_FILE,
    };
    // Both files of a checkpoint are in this project's format.
    load(dir.join(file), stored, WeightSource::Model)
}

/// Loads the checkpoint in `dir` for a run with `config` (which must match
/// the one that wrote it, but for the fields that may change on resume:
/// the step budget, logging, checkpoint and grid cadence, loader threads).
pub fn load_checkpoint<B: AutodiffBackend>(
    dir: &Path,
    config: &RunConfig,
    device: &B::Device,
) -> Result<Checkpoint<B>, CheckpointError> {
    let config_path = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&config_path).map_err(io(&config_path))?;
    let stored: RunConfig = toml::from_str(&text)
        .map_err(|e| CheckpointError::Corrupt { path: config_path.clone(), reason: e.to_string() })?;
    if let Some((field, checkpoint, run)) = first_difference(&stored, config) {
        return Err(CheckpointError::ConfigMismatch { path: dir.to_path_buf(), field, checkpoint, run });
    }

    let state_path = dir.join(STATE_FILE);
    let bytes = fs::read(&state_path).map_err(io(&state_path))?;
    let state: TrainState = serde_json::from_slice(&bytes)
        .map_err(|e| CheckpointError::Corrupt { path: state_path.clone(), reason: e.to_string() })?;
    if state.format != STATE_FORMAT && state.format != STATE_FORMAT_V1 {
        return Err(CheckpointError::Corrupt {
            path: state_path,
            reason: format!("format `{}`, expected `{STATE_FORMAT}` (or `{STATE_FORMAT_V1}`)", state.format),
        });
    }

    let weights = |file: &str| {
        let path = dir.join(file);
        load_weights::<B>(&path, Some(&config.model), WeightSource::Model, device)
            .map_err(|source| CheckpointError::Weights { path, source: Box::new(source) })
    };
    let model = weights(MODEL_FILE)?;
    let ema_path = dir.join(EMA_FILE);
    let ema = load_weights::<B::InnerBackend>(&ema_path, Some(&config.model), WeightSource::Model, device)
        .map_err(|source| CheckpointError::Weights { path: ema_path, source: Box::new(source) })?;

    let opt_path = dir.join(OPTIMIZER_FILE);
    let bytes = fs::read(&opt_path).map_err(io(&opt_path))?;
    let mut opt_state = parse_optimizer(&bytes, &opt_path)?;
    check_optimizer_state(&opt_state, &model, &opt_path)?;
    let mut state = state;
    if state.format == STATE_FORMAT_V1 {
        upgrade_v1_moments(&mut opt_state, &model);
        state.format = STATE_FORMAT.to_string();
    }
    if opt_state.step != state.step {
        return Err(CheckpointError::Corrupt {
            path: opt_path,
            reason: format!("optimizer step {} but state.json says step {}", opt_state.step, state.step),
        });
    }
    let optimizer = AdamW::import(config.train.optimizer, opt_state, device);
    Ok(Checkpoint { path: dir.to_path_buf(), model, ema, optimizer, state })
}

/// Fields of a run config that may differ between a checkpoint and the run
/// that resumes it: none of them changes what the next step computes.
const RESUMABLE_FIELDS: [&str; 8] = [
    "description",
    "train.steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.sample_every",
    "train.grid",
    "train.data.workers",
];

/// The first field (dotted path) in which two configs differ, ignoring the
/// resumable fields, with both values.
pub fn first_difference(checkpoint: &RunConfig, run: &RunConfig) -> Option<(String, String, String)> {
    let a = serde_json::to_value(checkpoint).expect("configs serialise");
    let b = serde_json::to_value(run).expect("configs serialise");
    diff_values("", &a, &b)
}

fn diff_values(path: &str, a: &serde_json::Value, b: &serde_json::Value) -> Option<(String, String, String)> {
    use serde_json::Value;
    if RESUMABLE_FIELDS.iter().any(|f| path == *f || path.starts_with(&format!("{f}."))) {
        return None;
    }
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| {
                let child = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                diff_values(&child, x.get(k).unwrap_or(&Value::Null), y.get(k).unwrap_or(&Value::Null))
            })
        }
        _ if a == b => None,
        _ => Some((path.to_string(), a.to_string(), b.to_string())),
    }
}

fn optimizer_bytes(state: &OptimizerState, path: &Path) -> Result<Vec<u8>, CheckpointError> {
    let to_bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let mut buffers: Vec<(String, Vec<u8>, usize)> = Vec::new();
    for (name, (m, v)) in &state.moments {
        buffers.push((format!("exp_avg.{name}"), to_bytes(m), m.len()));
        buffers.push((format!("exp_avg_sq.{name}"), to_bytes(v), v.len()));
    }
    let views = buffers
        .iter()
        .map(|(k, b, n)| {
            TensorView::new(Dtype::F32, vec![*n], b)
                .map(|v| (k.clone(), v))
                .map_err(|e| CheckpointError::Corrupt { path: path.to_path_buf(), reason: e.to_string() })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = HashMap::from([("step".to_string(), state.step.to_string())]);
    safetensors::serialize(views, &Some(metadata))
        .map_err(|e| CheckpointError::Corrupt { path: path.to_path_buf(), reason: e.to_string() })
}

fn parse_optimizer(bytes: &[u8], path: &Path) -> Result<OptimizerState, CheckpointError> {
    let corrupt = |reason: String| CheckpointError::Corrupt { path: path.to_path_buf(), reason };
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| corrupt(e.to_string()))?;
    let step = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("step"))
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| corrupt("no `step` in the metadata".into()))?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| corrupt(e.to_string()))?;
    // Per parameter, `exp_avg` and `exp_avg_sq` as they are read.
    let mut halves: BTreeMap<String, [Option<Vec<f32>>; 2]> = BTreeMap::new();
    for (key, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(corrupt(format!("`{key}` is {:?}, expected F32", view.dtype())));
        }
        let values: Vec<f32> =
            view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let entry = if let Some(name) = key.strip_prefix("exp_avg_sq.") {
            &mut halves.entry(name.to_string()).or_default()[1]
        } else if let Some(name) = key.strip_prefix("exp_avg.") {
            &mut halves.entry(name.to_string()).or_default()[0]
        } else {
            return Err(corrupt(format!("unexpected tensor `{key}`")));
        };
        *entry = Some(values);
    }
    let mut moments = BTreeMap::new();
    for (name, pair) in halves {
        match pair {
            [Some(m), Some(v)] if m.len() == v.len() => {
                moments.insert(name, (m, v));
            }
            _ => return Err(corrupt(format!("`{name}` needs exp_avg and exp_avg_sq of equal size"))),
        }
    }
    Ok(OptimizerState { step, moments })
}

/// The moments of a `diffmoe-checkpoint-v1` optimizer file in today's
/// parameter layout. In v1 the experts' weight matrices, `[n_experts, a, b]`
/// today (each expert's official `[d_output, d_input]`), were stored
/// `[n_experts, b, a]`; their moments followed, so each expert's block of
/// them is transposed here. Every other parameter kept its layout.
/// [`check_optimizer_state`] must have passed.
fn upgrade_v1_moments<B: Backend>(state: &mut OptimizerState, model: &DiT<B>) {
    for info in param_infos(model) {
        let Some((m, v)) = state.moments.get_mut(&info.name) else { continue };
        if let [experts, a, b] = info.shape[..] {
            if info.name.contains(".experts.") {
                for moment in [m, v] {
                    *moment = moment.chunks_exact(a * b).flat_map(|old| transpose_matrix(old, b, a)).collect();
                    debug_assert_eq!(moment.len(), experts * a * b);
                }
            }
        }
    }
}

fn check_optimizer_state<B: Backend>(
    state: &OptimizerState,
    model: &DiT<B>,
    path: &Path,
) -> Result<(), CheckpointError> {
    let infos: BTreeMap<String, usize> =
        param_infos(model).into_iter().filter(|p| p.trainable).map(|p| (p.name, p.shape.iter().product())).collect();
    for (name, (m, _)) in &state.moments {
        match infos.get(name) {
            None => {
                return Err(CheckpointError::Corrupt {
                    path: path.to_path_buf(),
                    reason: format!("state for `{name}`, which is not a trainable parameter of this model"),
                })
            }
            Some(&n) if n != m.len() => {
                return Err(CheckpointError::Corrupt {
                    path: path.to_path_buf(),
                    reason: format!("`{name}` has {} entries, the model's parameter has {n}", m.len()),
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffmoe_model::preset;

    #[test]
    fn differences_name_the_first_field_and_skip_resumable_ones() {
        let a = preset("diffmoe-tiny-e8-flow").unwrap();
        let mut b = a.clone();
        b.train.steps += 10;
        b.train.grid.cfg_scale = 3.0;
        assert_eq!(first_difference(&a, &b), None);
        b.train.batch_size = 7;
        let (field, _, run) = first_difference(&a, &b).unwrap();
        assert_eq!((field.as_str(), run.as_str()), ("train.batch_size", "7"));
        let mut c = a.clone();
        c.model.hidden_size = 64;
        assert_eq!(first_difference(&a, &c).unwrap().0, "model.hidden_size");
    }

    #[test]
    fn optimizer_state_round_trips() {
        let state = OptimizerState {
            step: 3,
            moments: BTreeMap::from([("a.b".to_string(), (vec![1.0, -2.0], vec![0.5, 0.25]))]),
        };
        let path = Path::new("optimizer.safetensors");
        let bytes = optimizer_bytes(&state, path).unwrap();
        assert_eq!(parse_optimizer(&bytes, path).unwrap(), state);
        assert!(parse_optimizer(&bytes[..bytes.len() / 2], path).is_err());
    }

    #[test]
    fn v1_moments_of_expert_matrices_are_transposed_per_expert() {
        let config = preset("diffmoe-tiny-e8-flow").unwrap().model;
        let model = config.init::<burn::backend::Flex>(&Default::default());
        let infos = param_infos(&model);
        let expert = infos.iter().find(|p| p.name.ends_with(".experts.Gelu.fc1_weight")).expect("an expert matrix");
        let bias = infos.iter().find(|p| p.name.ends_with(".experts.Gelu.fc1_bias")).expect("an expert bias");
        let [experts, a, b] = expert.shape[..] else { panic!("{expert:?}") };
        // Entry (e, i, j) of today's layout is worth 10000 e + 100 i + j; v1
        // held each expert's matrix transposed, `[b, a]`.
        let value = |e: usize, i: usize, j: usize| (10_000 * e + 100 * i + j) as f32;
        let v1: Vec<f32> =
            (0..experts).flat_map(|e| (0..b).flat_map(move |j| (0..a).map(move |i| value(e, i, j)))).collect();
        let today: Vec<f32> =
            (0..experts).flat_map(|e| (0..a).flat_map(move |i| (0..b).map(move |j| value(e, i, j)))).collect();
        let bias_values: Vec<f32> = (0..bias.shape.iter().product::<usize>()).map(|i| i as f32).collect();
        let mut state = OptimizerState {
            step: 1,
            moments: BTreeMap::from([
                (expert.name.clone(), (v1.clone(), v1.iter().map(|x| -x).collect())),
                (bias.name.clone(), (bias_values.clone(), bias_values.clone())),
            ]),
        };
        upgrade_v1_moments(&mut state, &model);
        let (m, v) = &state.moments[&expert.name];
        assert_eq!(m, &today);
        assert_eq!(v, &today.iter().map(|x| -x).collect::<Vec<_>>());
        assert_eq!(state.moments[&bias.name], (bias_values.clone(), bias_values));
    }
}
