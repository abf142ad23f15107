//! The training recipe of a run: optimizer, EMA, timestep sampling, the
//! capacity schedule, data loading, logging, checkpoints and sample grids.
//! Defaults are the official recipe (`train.py` with
//! `config/000_DiffMoE_S_E16_Flow.yaml`): AdamW at a constant 1e-4 with betas
//! (0.9, 0.999) and no weight decay, EMA 0.9999, global batch 256.
//!
//! This is plain data, read from the `[train]` table of a run config and
//! validated once; the loop that follows it lives in `diffmoe-train`.

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// How the training loop draws flow-matching times `t` in `[0, 1]` (DDPM
/// always draws integer steps uniformly from `0..1000`, as officially).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case", tag = "kind", deny_unknown_fields)]
pub enum TimestepSampling {
    /// `t ~ U[0, 1)` (official `torch.rand`).
    #[default]
    Uniform,
    /// `t = sigmoid(mean + std * n)`, `n ~ N(0, 1)` (SD3's logit-normal),
    /// which spends more steps at intermediate noise levels.
    LogitNormal {
        /// Location of the underlying normal.
        mean: f64,
        /// Scale of the underlying normal.
        std: f64,
    },
}

/// The official capacity schedule (`MoE_config.capacity_schedule`): the
/// training capacity is `n_experts` (every expert sees every token) while the
/// micro-step counter is at most `stage_i`, then decays linearly to the
/// configured capacity at `stage_ii`, and stays there.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacitySchedule {
    /// Last micro-step of stage I (capacity `n_experts`).
    pub stage_i: u64,
    /// Micro-step at which the capacity reaches its target.
    pub stage_ii: u64,
}

impl CapacitySchedule {
    /// The capacity at micro-step `iters` (0 for the first step, as the
    /// official `training_iters`, which starts at -1 and is incremented
    /// before every step), for `n_experts` experts and a target `capacity`.
    pub fn capacity_at(&self, iters: u64, n_experts: usize, capacity: f64) -> f64 {
        let e = n_experts as f64;
        if iters <= self.stage_i {
            e
        } else if iters <= self.stage_ii {
            capacity + (e - capacity) * (self.stage_ii - iters) as f64 / (self.stage_ii - self.stage_i) as f64
        } else {
            capacity
        }
    }
}

/// AdamW hyper-parameters (PyTorch's `torch.optim.AdamW` semantics).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    /// Peak learning rate; the paper trains at a constant 1e-4.
    pub learning_rate: f64,
    /// `(beta1, beta2)`; the official (0.9, 0.999), PyTorch's default.
    pub betas: [f64; 2],
    /// Added to the root of the second moment; PyTorch's default 1e-8.
    pub epsilon: f64,
    /// Decoupled weight decay; 0 officially (DiT trains without it).
    pub weight_decay: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self { learning_rate: 1e-4, betas: [0.9, 0.999], epsilon: 1e-8, weight_decay: 0.0 }
    }
}

/// What the loader does with an unreadable or corrupt file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BadFiles {
    /// Stop with an error that names the file.
    #[default]
    Fail,
    /// Replace the example by another, and count it in the log.
    Skip,
}

/// Random horizontal flips of the training images (or the flipped latent
/// posterior, when the shards hold one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Flip {
    /// No augmentation.
    None,
    /// Flip each example with probability 1/2 (the official `RandomHorizontalFlip`).
    #[default]
    Random,
}

/// Where the data comes from and how it is loaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// A data spec: `embedded`, `idx:PATH`, `folder:PATH`, `latents:PATH` or
    /// a path whose kind is detected (see `docs/data.md`).
    pub source: String,
    /// Loader threads; 2 keeps a CPU run fed without stealing its cores.
    pub workers: usize,
    /// Horizontal flips.
    pub flip: Flip,
    /// Unreadable or corrupt files.
    pub bad_files: BadFiles,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self { source: "embedded".into(), workers: 2, flip: Flip::Random, bad_files: BadFiles::Fail }
    }
}

/// The sample grid written during and after training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GridConfig {
    /// Class labels, one column each; empty means the first (up to) 10 classes.
    pub classes: Vec<usize>,
    /// Rows: samples per class.
    pub per_class: usize,
    /// Sampling steps (Euler for flow, respaced ancestral steps for DDPM).
    pub steps: usize,
    /// Classifier-free guidance scale; 1 is no guidance.
    pub cfg_scale: f64,
    /// Seed of the grid's noise, fixed so grids of a run are comparable.
    pub seed: u64,
}

impl Default for GridConfig {
    fn default() -> Self {
        Self { classes: Vec::new(), per_class: 4, steps: 50, cfg_scale: 1.0, seed: 0 }
    }
}

/// The training recipe (`[train]` in a run config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimizer steps; the paper's ImageNet runs go to 700K.
    pub steps: u64,
    /// Global batch (images per micro-step, summed over replicas); 256 officially.
    pub batch_size: usize,
    /// Micro-batches per optimizer step. Their gradients are summed, not
    /// averaged, as the official loop (`loss.backward()` per micro-batch).
    pub accumulation: usize,
    /// AdamW.
    pub optimizer: OptimizerConfig,
    /// Clip the global gradient norm to this value (`clip_grad_norm_`); off officially.
    pub clip_grad_norm: Option<f64>,
    /// Linear learning-rate warm-up over this many optimizer steps; 0 officially.
    pub warmup_steps: u64,
    /// EMA decay of the weights and buffers (thresholds included); 0.9999 officially.
    pub ema_decay: f64,
    /// Flow timesteps.
    pub timesteps: TimestepSampling,
    /// The capacity schedule of DiffMoE and EC layers; off in the shipped config.
    pub capacity_schedule: Option<CapacitySchedule>,
    /// Seed of the initialisation, data order, noise, times and label dropout.
    pub seed: u64,
    /// Optimizer steps between log lines.
    pub log_every: u64,
    /// Optimizer steps between checkpoints (one is always written at the end).
    pub checkpoint_every: u64,
    /// Checkpoints kept; older ones are deleted once a newer one is complete.
    pub keep_checkpoints: usize,
    /// Optimizer steps between sample grids (one is always written at the end); 0 disables the periodic ones.
    pub sample_every: u64,
    /// The sample grid.
    pub grid: GridConfig,
    /// The data.
    pub data: DataConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 400_000,
            batch_size: 256,
            accumulation: 1,
            optimizer: OptimizerConfig::default(),
            clip_grad_norm: None,
            warmup_steps: 0,
            ema_decay: 0.9999,
            timesteps: TimestepSampling::Uniform,
            capacity_schedule: None,
            seed: 0,
            log_every: 100,
            checkpoint_every: 50_000,
            keep_checkpoints: 3,
            sample_every: 10_000,
            grid: GridConfig::default(),
            data: DataConfig::default(),
        }
    }
}

impl TrainConfig {
    /// Checks every value, naming the field and what is allowed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = |field: &str, v: u64| {
            if v == 0 {
                Err(ConfigError::invalid(field, v, "must be at least 1"))
            } else {
                Ok(())
            }
        };
        positive("train.steps", self.steps)?;
        positive("train.batch_size", self.batch_size as u64)?;
        positive("train.accumulation", self.accumulation as u64)?;
        positive("train.log_every", self.log_every)?;
        positive("train.checkpoint_every", self.checkpoint_every)?;
        positive("train.keep_checkpoints", self.keep_checkpoints as u64)?;
        positive("train.grid.per_class", self.grid.per_class as u64)?;
        positive("train.grid.steps", self.grid.steps as u64)?;
        let o = &self.optimizer;
        if !(o.learning_rate.is_finite() && o.learning_rate > 0.0) {
            return Err(ConfigError::invalid("train.optimizer.learning_rate", o.learning_rate, "must be > 0"));
        }
        for (i, b) in o.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                return Err(ConfigError::invalid(&format!("train.optimizer.betas[{i}]"), b, "must be in [0, 1)"));
            }
        }
        if !(o.epsilon.is_finite() && o.epsilon > 0.0) {
            return Err(ConfigError::invalid("train.optimizer.epsilon", o.epsilon, "must be > 0"));
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return Err(ConfigError::invalid("train.optimizer.weight_decay", o.weight_decay, "must be >= 0"));
        }
        if let Some(c) = self.clip_grad_norm {
            if !(c.is_finite() && c > 0.0) {
                return Err(ConfigError::invalid("train.clip_grad_norm", c, "must be > 0 (leave it out to disable)"));
            }
        }
        if !(0.0..=1.0).contains(&self.ema_decay) {
            return Err(ConfigError::invalid("train.ema_decay", self.ema_decay, "must be in [0, 1]"));
        }
        if let TimestepSampling::LogitNormal { mean, std } = self.timesteps {
            if !(mean.is_finite() && std.is_finite() && std > 0.0) {
                return Err(ConfigError::invalid(
                    "train.timesteps",
                    format!("logit-normal mean {mean} std {std}"),
                    "needs a finite mean and std > 0",
                ));
            }
        }
        if let Some(s) = self.capacity_schedule {
            if s.stage_ii <= s.stage_i {
                return Err(ConfigError::invalid(
                    "train.capacity_schedule.stage_ii",
                    s.stage_ii,
                    format!("must be greater than stage_i ({})", s.stage_i),
                ));
            }
        }
        if !(self.grid.cfg_scale.is_finite() && self.grid.cfg_scale >= 0.0) {
            return Err(ConfigError::invalid("train.grid.cfg_scale", self.grid.cfg_scale, "must be >= 0"));
        }
        if self.data.source.trim().is_empty() {
            return Err(ConfigError::invalid("train.data.source", "\"\"", "a data spec such as `embedded`"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_schedule_follows_the_official_rule() {
        let s = CapacitySchedule { stage_i: 10, stage_ii: 20 };
        assert_eq!(s.capacity_at(0, 8, 1.0), 8.0);
        assert_eq!(s.capacity_at(10, 8, 1.0), 8.0);
        assert_eq!(s.capacity_at(15, 8, 1.0), 4.5);
        assert_eq!(s.capacity_at(20, 8, 1.0), 1.0);
        assert_eq!(s.capacity_at(1000, 8, 1.0), 1.0);
    }

    #[test]
    fn invalid_values_name_their_field() {
        let mut c = TrainConfig { batch_size: 0, ..TrainConfig::default() };
        assert!(c.validate().unwrap_err().to_string().contains("train.batch_size"));
        c.batch_size = 4;
        c.optimizer.betas[1] = 1.5;
        assert!(c.validate().unwrap_err().to_string().contains("train.optimizer.betas[1]"));
        c.optimizer.betas[1] = 0.999;
        c.capacity_schedule = Some(CapacitySchedule { stage_i: 5, stage_ii: 5 });
        assert!(c.validate().unwrap_err().to_string().contains("stage_ii"));
    }

    #[test]
    fn toml_round_trips_and_rejects_unknown_fields() {
        let c = TrainConfig {
            timesteps: TimestepSampling::LogitNormal { mean: 0.0, std: 1.0 },
            capacity_schedule: Some(CapacitySchedule { stage_i: 1, stage_ii: 2 }),
            clip_grad_norm: Some(1.0),
            ..TrainConfig::default()
        };
        let text = toml::to_string_pretty(&c).unwrap();
        assert_eq!(toml::from_str::<TrainConfig>(&text).unwrap(), c);
        assert!(toml::from_str::<TrainConfig>("stepz = 3").is_err());
    }
}
