//! The training loop (official `train.py`), generic over the autodiff
//! backend and over the replica it runs as.
//!
//! One optimizer step is `accumulation` micro-steps, each of which
//!
//! 1. takes the next batch from the loader (batch index = micro-step),
//! 2. sets the capacity of the schedule, if any (official `training_iters`),
//! 3. drops labels to the null class with `class_dropout_prob` (CFG),
//! 4. draws the noise and the times (flow `t ~ U[0,1)` or logit-normal,
//!    DDPM `t ~ U{0..999}`) from generators keyed by the micro-step,
//! 5. computes the loss (regression + weighted capacity-predictor BCE per
//!    DiffMoE layer, + TC's auxiliary loss in the backward pass),
//! 6. backpropagates and sums the gradients,
//! 7. updates every DiffMoE layer's thresholds from the routing statistics,
//!    averaged across replicas (the official `update_threshold` that runs in
//!    every train-mode forward);
//!
//! then the gradients are averaged across replicas, their global norm is
//! taken (and clipped, when asked), AdamW steps at the warmed-up learning
//! rate, and the EMA (thresholds included) moves towards the new weights.
//!
//! Every random draw is keyed by `(seed, micro-step, rank)`, so the state of
//! a run is its checkpoint: a resumed run repeats an uninterrupted one step
//! for step (bit for bit on the CPU with the same thread count).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use burn::tensor::{backend::AutodiffBackend, Int, Tensor, TensorData};
use rand::Rng;

use diffmoe_model::{BadFiles, ConfigError, DiT, Flip, Objective, RunConfig, TimestepSampling};

use crate::checkpoint::{list_checkpoints, load_checkpoint, prune_checkpoints, save_checkpoint, TrainState};
use crate::data::{open_dataset, BadFilePolicy, Batch, DataSpec, Dataset, ImageShape, Loader, LoaderConfig};
use crate::ddpm::{DdpmSchedule, DDPM_STEPS};
use crate::ema::Ema;
use crate::error::TrainError;
use crate::flow::flow_loss;
use crate::gradient_buffer::GradientBuffer;
use crate::image_grid::save_grid;
use crate::loss_terms::LossTerms;
use crate::optimizer::AdamW;
use crate::preview::grid_images;
use crate::replica::Replica;
use crate::sampler::ClipDenoised;
use crate::step_rng::{normal, step_rng, uniform, Stream};
use crate::train_log::{LogRecord, TrainLog, LOG_FILE};

/// The resolved config of a run, written before the first step.
pub const CONFIG_FILE: &str = "config.toml";
/// The sample grids of a run.
pub const SAMPLES_DIR: &str = "samples";

/// Whether a run starts or continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A new run in a new (or empty) directory.
    Fresh,
    /// Continue the run in the directory from its latest complete checkpoint.
    Resume,
}

/// What the observer is told when the loop starts.
#[derive(Debug, Clone)]
pub struct RunInfo {
    /// The run directory.
    pub run_dir: PathBuf,
    /// The checkpoint resumed from, if any.
    pub resumed_from: Option<PathBuf>,
    /// Optimizer steps already done.
    pub start_step: u64,
    /// Optimizer steps the run ends at.
    pub total_steps: u64,
    /// The dataset.
    pub dataset: String,
    /// Model parameters.
    pub parameters: usize,
    /// Replicas.
    pub world_size: usize,
}

/// What the observer is told after every optimizer step.
#[derive(Debug, Clone, Copy)]
pub struct StepProgress {
    /// Optimizer steps done.
    pub step: u64,
    /// Optimizer steps the run ends at.
    pub total_steps: u64,
    /// The reported loss of this step.
    pub loss: f64,
    /// Steps per second over the current logging interval.
    pub steps_per_second: f64,
    /// Images per second (all replicas) over the current logging interval.
    pub images_per_second: f64,
}

/// Receives the progress of a run (the CLI draws a progress bar from it).
pub trait TrainObserver {
    /// The loop is about to start.
    fn started(&mut self, _info: &RunInfo) {}
    /// An optimizer step is done.
    fn stepped(&mut self, _progress: &StepProgress) {}
    /// A log record was written.
    fn logged(&mut self, _record: &LogRecord) {}
    /// A checkpoint is complete.
    fn checkpointed(&mut self, _path: &Path) {}
    /// A sample grid was written.
    fn wrote_grid(&mut self, _path: &Path) {}
}

/// An observer that ignores everything.
#[derive(Debug, Default)]
pub struct Silent;

impl TrainObserver for Silent {}

/// What a finished run leaves behind.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Optimizer steps done.
    pub steps: u64,
    /// The loss of the last step (`NaN` when no step ran in this session).
    pub final_loss: f64,
    /// The last checkpoint.
    pub checkpoint: Option<PathBuf>,
    /// The last sample grid.
    pub grid: Option<PathBuf>,
    /// The JSONL log.
    pub log: PathBuf,
}

/// A training run.
pub struct Trainer<B: AutodiffBackend, R: Replica<B>> {
    config: RunConfig,
    run_dir: PathBuf,
    device: B::Device,
    replica: R,
    /// Taken out only during the optimizer step, so that no other handle
    /// shares the parameters and AdamW updates them in place (with the old
    /// model still held, the CPU kernel copied all of them first).
    model: Option<DiT<B>>,
    ema: Ema<B::InnerBackend>,
    optimizer: AdamW<B>,
    state: TrainState,
    dataset: Arc<dyn Dataset>,
    ddpm: Option<DdpmSchedule>,
    resumed_from: Option<PathBuf>,
}

/// Loss terms of one micro-step, on the host.
#[derive(Debug, Default, Clone)]
struct Scalars {
    loss: f64,
    mse: f64,
    vb: Option<f64>,
    capacity_loss: f64,
    aux_loss: f64,
    capacity_bce: Vec<(usize, f64)>,
}

/// Sums over a logging interval.
#[derive(Debug, Default)]
struct Interval {
    micro_steps: u64,
    steps: u64,
    images: u64,
    sums: Scalars,
    grad_norm: f64,
    skipped: u64,
    started: Option<Instant>,
}

impl Interval {
    fn add(&mut self, s: &Scalars) {
        self.micro_steps += 1;
        self.sums.loss += s.loss;
        self.sums.mse += s.mse;
        if let Some(vb) = s.vb {
            *self.sums.vb.get_or_insert(0.0) += vb;
        }
        self.sums.capacity_loss += s.capacity_loss;
        self.sums.aux_loss += s.aux_loss;
        if self.sums.capacity_bce.is_empty() {
            self.sums.capacity_bce = s.capacity_bce.iter().map(|&(b, _)| (b, 0.0)).collect();
        }
        for (acc, &(_, v)) in self.sums.capacity_bce.iter_mut().zip(&s.capacity_bce) {
            acc.1 += v;
        }
    }

    fn seconds(&self) -> f64 {
        self.started.map_or(0.0, |t| t.elapsed().as_secs_f64()).max(1e-9)
    }
}

fn check_run_dir(run_dir: &Path) -> Result<(), TrainError> {
    if run_dir.join(CONFIG_FILE).exists() {
        return Err(TrainError::RunDir {
            path: run_dir.to_path_buf(),
            reason: format!(
                "it holds another run ({CONFIG_FILE}); continue it with `--resume {}` or choose another --out",
                run_dir.display()
            ),
        });
    }
    if run_dir.is_file() {
        return Err(TrainError::RunDir { path: run_dir.to_path_buf(), reason: "it is a file".into() });
    }
    if run_dir.is_dir() {
        let mut entries =
            std::fs::read_dir(run_dir).map_err(|source| TrainError::Io { path: run_dir.to_path_buf(), source })?;
        if entries.next().is_some() {
            return Err(TrainError::RunDir {
                path: run_dir.to_path_buf(),
                reason: "it is not empty; nothing in it is overwritten, choose a new or empty directory".into(),
            });
        }
    }
    Ok(())
}

/// Writes `text` to `path` through a temporary file and a rename.
fn write_text_atomically(path: &Path, text: &str) -> Result<(), TrainError> {
    Ok(diffmoe_weights::write_atomically(path, text.as_bytes())?)
}

/// Reads the config of the run in `run_dir` (for `--resume`).
pub fn read_run_config(run_dir: &Path) -> Result<RunConfig, TrainError> {
    let path = run_dir.join(CONFIG_FILE);
    if !path.is_file() {
        return Err(TrainError::RunDir {
            path: run_dir.to_path_buf(),
            reason: format!("there is no run to resume here ({CONFIG_FILE} is missing)"),
        });
    }
    let text = std::fs::read_to_string(&path).map_err(|source| TrainError::Io { path: path.clone(), source })?;
    Ok(RunConfig::from_toml(&text, &path)?)
}

impl<B: AutodiffBackend, R: Replica<B>> Trainer<B, R> {
    /// Prepares a run: validates the config, opens the data, and either
    /// creates the run directory (writing the resolved config before the
    /// first step) or loads the latest complete checkpoint of the run.
    pub fn new(
        config: RunConfig,
        run_dir: &Path,
        start: Start,
        device: B::Device,
        replica: R,
    ) -> Result<Self, TrainError> {
        config.validate()?;
        let world = replica.world_size();
        if !config.train.batch_size.is_multiple_of(world) {
            return Err(ConfigError::Invalid {
                field: "train.batch_size".into(),
                value: config.train.batch_size.to_string(),
                allowed: format!("a multiple of the number of replicas ({world})"),
            }
            .into());
        }
        let spec: DataSpec = config.train.data.source.parse()?;
        let m = &config.model;
        let shape = ImageShape { channels: m.in_channels, height: m.input_size, width: m.input_size };
        let dataset = open_dataset(&spec, shape)?;
        if dataset.num_classes() > m.num_classes {
            return Err(TrainError::Mismatch {
                reason: format!(
                    "{} has {} classes but model.num_classes is {}",
                    dataset.describe(),
                    dataset.num_classes(),
                    m.num_classes
                ),
            });
        }

        let ddpm = (config.objective == Objective::Ddpm).then(|| DdpmSchedule::linear(DDPM_STEPS));
        let leader = replica.rank() == 0;
        let (model, ema, optimizer, state, resumed_from) = match start {
            Start::Fresh => {
                if leader {
                    check_run_dir(run_dir)?;
                    std::fs::create_dir_all(run_dir)
                        .map_err(|source| TrainError::Io { path: run_dir.to_path_buf(), source })?;
                    write_text_atomically(&run_dir.join(CONFIG_FILE), &config.to_toml())?;
                }
                let (model, ema, optimizer, state) = Self::initial(&config, &device, world);
                (model, ema, optimizer, state, None)
            }
            Start::Resume => {
                let stored = read_run_config(run_dir)?;
                if let Some((field, checkpoint, run)) = crate::checkpoint::first_difference(&stored, &config) {
                    return Err(TrainError::RunDir {
                        path: run_dir.to_path_buf(),
                        reason: format!(
                            "the run was started with {field} = {checkpoint}; resuming with {run} would change it"
                        ),
                    });
                }
                match list_checkpoints(run_dir)?.pop() {
                    Some((_, dir)) => {
                        let c = load_checkpoint::<B>(&dir, &config, &device)?;
                        if c.state.world_size != world {
                            return Err(TrainError::RunDir {
                                path: run_dir.to_path_buf(),
                                reason: format!(
                                    "the run trained on {} replicas; resuming on {world} would change its data order",
                                    c.state.world_size
                                ),
                            });
                        }
                        let ema = Ema::new(c.ema, config.train.ema_decay);
                        (c.model, ema, c.optimizer, c.state, Some(dir))
                    }
                    // Stopped before its first checkpoint: starting again
                    // from the seed is the same run.
                    None => {
                        let (model, ema, optimizer, state) = Self::initial(&config, &device, world);
                        (model, ema, optimizer, state, None)
                    }
                }
            }
        };
        if leader {
            write_text_atomically(&run_dir.join(CONFIG_FILE), &config.to_toml())?;
        }
        Ok(Self {
            config,
            run_dir: run_dir.to_path_buf(),
            device,
            replica,
            model: Some(model),
            ema,
            optimizer,
            state,
            dataset,
            ddpm,
            resumed_from,
        })
    }

    fn initial(
        config: &RunConfig,
        device: &B::Device,
        world: usize,
    ) -> (DiT<B>, Ema<B::InnerBackend>, AdamW<B>, TrainState) {
        // Every replica initialises from the same seed, so all start equal
        // (DDP broadcasts rank 0's weights to the same effect).
        B::seed(device, config.train.seed);
        let model = config.model.init::<B>(device);
        let ema = Ema::new(model.valid(), config.train.ema_decay);
        (model, ema, AdamW::new(config.train.optimizer), TrainState::start(world))
    }

    /// The model being trained.
    pub fn model(&self) -> &DiT<B> {
        self.model.as_ref().expect("the model is in place between optimizer steps")
    }

    /// The model, out of the trainer until it is put back.
    fn take_model(&mut self) -> DiT<B> {
        self.model.take().expect("the model is in place between optimizer steps")
    }

    /// The EMA model.
    pub fn ema(&self) -> &DiT<B::InnerBackend> {
        &self.ema.model
    }

    /// The learning rate of optimizer step `step` (1-based): linear warm-up,
    /// then constant (the paper's schedule).
    pub fn learning_rate(&self, step: u64) -> f64 {
        let lr = self.config.train.optimizer.learning_rate;
        match self.config.train.warmup_steps {
            0 => lr,
            w => lr * (step as f64 / w as f64).min(1.0),
        }
    }

    /// Runs until `train.steps`, checkpointing, logging and sampling on the way.
    pub fn run(mut self, observer: &mut dyn TrainObserver) -> Result<TrainSummary, TrainError> {
        let train = self.config.train.clone();
        let world = self.replica.world_size();
        let rank = self.replica.rank();
        let leader = rank == 0;
        let loader_config = LoaderConfig {
            batch_size: train.batch_size / world,
            workers: train.data.workers,
            seed: train.seed,
            flip: train.data.flip == Flip::Random,
            bad_files: match train.data.bad_files {
                BadFiles::Fail => BadFilePolicy::Fail,
                BadFiles::Skip => BadFilePolicy::Skip,
            },
            rank,
            world_size: world,
        };
        let mut loader = Loader::new(self.dataset.clone(), loader_config, self.state.micro_step)?;
        let mut log = if leader { Some(TrainLog::open(&self.run_dir, self.state.step)?) } else { None };
        observer.started(&RunInfo {
            run_dir: self.run_dir.clone(),
            resumed_from: self.resumed_from.clone(),
            start_step: self.state.step,
            total_steps: train.steps,
            dataset: self.dataset.describe(),
            parameters: self.model().num_params(),
            world_size: world,
        });

        let mut summary = TrainSummary {
            steps: self.state.step,
            final_loss: f64::NAN,
            checkpoint: list_checkpoints(&self.run_dir)?.pop().map(|(_, p)| p),
            grid: None,
            log: self.run_dir.join(LOG_FILE),
        };
        let mut interval = Interval { started: Some(Instant::now()), ..Interval::default() };
        let session_start = Instant::now();
        let elapsed_before = self.state.elapsed_seconds;
        while self.state.step < train.steps {
            let step = self.state.step + 1;
            let lr = self.learning_rate(step);
            let mut grads = GradientBuffer::<B>::new();
            let mut step_loss = 0.0;
            let mut routing_counts = Vec::new();
            let mut capacity = None;
            for _ in 0..train.accumulation {
                let batch = loader.next_batch()?;
                interval.skipped += batch.skipped as u64;
                interval.images += (batch.labels.len() * world) as u64;
                if let (Some(schedule), Some(moe)) = (train.capacity_schedule, &self.config.model.moe) {
                    let c = schedule.capacity_at(self.state.micro_step, moe.num_experts, moe.capacity);
                    let model = self.take_model();
                    self.model = Some(model.with_capacity(c));
                    capacity = Some(c);
                }
                let terms = self.loss(batch);
                let scalars = host_scalars(&terms);
                step_loss += scalars.loss / train.accumulation as f64;
                interval.add(&scalars);
                let backward = terms.total.backward();
                grads.accumulate(self.model(), &backward);
                routing_counts = terms
                    .output
                    .routing
                    .iter()
                    .map(|r| (r.block, r.stats.tokens_per_expert.clone()))
                    .collect::<Vec<(usize, Tensor<B, 1, Int>)>>();
                let model = self.take_model();
                self.model = Some(model.with_updated_thresholds(&terms.output.routing, &self.replica));
                self.state.micro_step += 1;
            }
            self.replica.mean_gradients(&mut grads);
            let grad_norm = grads
                .squared_norm()
                .map_or(0.0, |sq| sq.into_data().convert::<f64>().to_vec::<f64>().expect("an f64 norm")[0].sqrt());
            if let Some(max) = train.clip_grad_norm {
                // torch.nn.utils.clip_grad_norm_: scale by max / (norm + 1e-6) when below 1.
                let coef = max / (grad_norm + 1e-6);
                if coef < 1.0 {
                    grads.scale(coef);
                }
            }
            let model = self.take_model();
            self.model = Some(self.optimizer.step(model, grads, lr));
            self.ema.update(&self.model().valid());
            self.state.step = step;
            self.state.images_seen += (train.batch_size * train.accumulation) as u64;
            self.state.elapsed_seconds = elapsed_before + session_start.elapsed().as_secs_f64();
            interval.steps += 1;
            interval.grad_norm += grad_norm;
            summary.steps = step;
            summary.final_loss = step_loss;
            if !step_loss.is_finite() {
                return Err(TrainError::NonFinite { step, value: step_loss });
            }
            let seconds = interval.seconds();
            observer.stepped(&StepProgress {
                step,
                total_steps: train.steps,
                loss: step_loss,
                steps_per_second: interval.steps as f64 / seconds,
                images_per_second: interval.images as f64 / seconds,
            });

            let last = step == train.steps;
            if step.is_multiple_of(train.log_every) || last {
                let record = self.record(&interval, lr, routing_counts, capacity);
                if let Some(log) = &mut log {
                    log.append(&record)?;
                }
                observer.logged(&record);
                interval = Interval { started: Some(Instant::now()), ..Interval::default() };
            }
            if leader && (step.is_multiple_of(train.checkpoint_every) || last) {
                let dir = save_checkpoint(
                    &self.run_dir,
                    &self.config,
                    self.model(),
                    &self.ema.model,
                    &self.optimizer,
                    &self.state,
                )?;
                prune_checkpoints(&self.run_dir, train.keep_checkpoints)?;
                observer.checkpointed(&dir);
                summary.checkpoint = Some(dir);
            }
            if leader && ((train.sample_every > 0 && step.is_multiple_of(train.sample_every)) || last) {
                let path = self.write_grid(step)?;
                observer.wrote_grid(&path);
                summary.grid = Some(path);
            }
        }
        Ok(summary)
    }

    /// Writes the sample grid of the EMA model at `step`.
    pub fn write_grid(&self, step: u64) -> Result<PathBuf, TrainError> {
        let dir = self.run_dir.join(SAMPLES_DIR);
        std::fs::create_dir_all(&dir).map_err(|source| TrainError::Io { path: dir.clone(), source })?;
        let path = dir.join(format!("step-{step:08}.png"));
        let clip = if self.dataset.is_latent() { ClipDenoised::Off } else { ClipDenoised::UnitRange };
        let grid = grid_images(&self.ema.model, &self.config, clip)?;
        let [n, c, h, w] = grid.shape;
        if c == 1 || c == 3 {
            save_grid(&path, &grid.images, grid.shape, grid.columns)?;
        } else {
            // Latents cannot be shown until they are decoded: the preview
            // shows their first three channels.
            let plane = h * w;
            let rgb: Vec<f32> =
                grid.images.chunks(c * plane).flat_map(|img| img[..3.min(c) * plane].iter().copied()).collect();
            save_grid(&path, &rgb, [n, 3.min(c), h, w], grid.columns)?;
        }
        Ok(path)
    }

    /// The loss of one micro-batch, with the micro-step's random draws.
    fn loss(&self, batch: Batch) -> LossTerms<B> {
        let seed = self.config.train.seed;
        let micro = self.state.micro_step;
        let rank = self.replica.rank();
        let [n, c, h, w] = batch.shape;
        let device = &self.device;
        let x = Tensor::<B, 4>::from_data(TensorData::new(batch.images, batch.shape), device);

        // Classifier-free guidance: labels replaced by the null class with
        // probability class_dropout_prob (official LabelEmbedder.token_drop).
        let m = &self.config.model;
        let mut drop = step_rng(seed, micro, rank, Stream::LabelDropout);
        let labels: Vec<i64> = batch
            .labels
            .iter()
            .zip(uniform(&mut drop, n))
            .map(
                |(&l, u)| {
                    if m.class_dropout_prob > 0.0 && f64::from(u) < m.class_dropout_prob {
                        m.num_classes
                    } else {
                        l
                    }
                },
            )
            .map(|l| l as i64)
            .collect();
        let y = Tensor::<B, 1, Int>::from_data(TensorData::new(labels, [n]), device);

        let noise = normal(&mut step_rng(seed, micro, rank, Stream::Noise), n * c * h * w);
        let noise = Tensor::<B, 4>::from_data(TensorData::new(noise, [n, c, h, w]), device);
        let mut times = step_rng(seed, micro, rank, Stream::Time);
        match &self.ddpm {
            None => {
                let t: Vec<f32> = match self.config.train.timesteps {
                    TimestepSampling::Uniform => uniform(&mut times, n),
                    TimestepSampling::LogitNormal { mean, std } => normal(&mut times, n)
                        .into_iter()
                        .map(|z| (1.0 / (1.0 + (-(mean + std * f64::from(z))).exp())) as f32)
                        .collect(),
                };
                let t = Tensor::<B, 1>::from_data(TensorData::new(t, [n]), device);
                flow_loss(self.model(), x, y, noise, t)
            }
            Some(schedule) => {
                let t: Vec<usize> = (0..n).map(|_| times.random_range(0..schedule.steps())).collect();
                schedule.training_loss(self.model(), x, y, &t, noise)
            }
        }
    }

    fn record(
        &self,
        interval: &Interval,
        lr: f64,
        routing_counts: Vec<(usize, Tensor<B, 1, Int>)>,
        capacity: Option<f64>,
    ) -> LogRecord {
        let k = interval.micro_steps.max(1) as f64;
        let seconds = interval.seconds();
        let mean = |v: f64| v / k;
        let local = {
            let s = &interval.sums;
            let mut v = vec![s.loss, s.mse, s.vb.unwrap_or(0.0), s.capacity_loss, s.aux_loss];
            v.extend(s.capacity_bce.iter().map(|&(_, x)| x));
            v
        };
        // Losses are averaged across replicas, as the official logging does.
        let all = self.replica.mean_metrics(local);
        let s = &interval.sums;
        let tokens_per_expert: BTreeMap<String, Vec<i64>> = routing_counts
            .into_iter()
            .map(|(b, t)| (b.to_string(), t.into_data().convert::<i64>().to_vec().expect("integer counts")))
            .collect();
        let thresholds = self
            .model()
            .thresholds()
            .into_iter()
            .map(|(b, t)| (b.to_string(), t.into_data().convert::<f32>().to_vec().expect("f32 thresholds")))
            .collect();
        LogRecord {
            step: self.state.step,
            images_seen: self.state.images_seen,
            lr,
            loss: mean(all[0]),
            mse: mean(all[1]),
            vb: s.vb.map(|_| mean(all[2])),
            capacity_loss: mean(all[3]),
            aux_loss: mean(all[4]),
            capacity_bce: s.capacity_bce.iter().zip(&all[5..]).map(|(&(b, _), &v)| (b.to_string(), mean(v))).collect(),
            grad_norm: interval.grad_norm / interval.steps.max(1) as f64,
            tokens_per_expert,
            thresholds,
            capacity,
            images_per_second: interval.images as f64 / seconds,
            steps_per_second: interval.steps as f64 / seconds,
            elapsed_seconds: self.state.elapsed_seconds,
            skipped_files: interval.skipped,
        }
    }
}

/// The scalar loss terms of a micro-step, read from the device at once.
fn host_scalars<B: AutodiffBackend>(terms: &LossTerms<B>) -> Scalars {
    let mut parts = vec![
        terms.loss.clone().detach(),
        terms.mse.clone().detach().mean(),
        terms.capacity_loss.clone().detach(),
        terms.aux_loss.clone().detach(),
    ];
    if let Some(vb) = &terms.vb {
        parts.push(vb.clone().detach().mean());
    }
    parts.extend(terms.capacity.iter().map(|(_, bce)| bce.clone().detach()));
    let values: Vec<f64> = Tensor::cat(parts, 0).into_data().convert::<f64>().to_vec().expect("f64 scalars");
    let vb_offset = usize::from(terms.vb.is_some());
    Scalars {
        loss: values[0],
        mse: values[1],
        capacity_loss: values[2],
        aux_loss: values[3],
        vb: terms.vb.as_ref().map(|_| values[4]),
        capacity_bce: terms.capacity.iter().enumerate().map(|(i, (b, _))| (*b, values[4 + vb_offset + i])).collect(),
    }
}
