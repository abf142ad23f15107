//! `diffmoe train`: resolves the run config from a preset or file and the
//! command-line overrides, then runs `diffmoe_train::Trainer` with a progress
//! bar.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use indicatif::ProgressBar;

use diffmoe_model::RunConfig;
use diffmoe_train::{
    read_run_config, train_data_parallel, LogRecord, RunInfo, SingleProcess, Start, StepProgress, TrainObserver,
    Trainer,
};

use crate::backend::AutodiffBackend;
use crate::device::DeviceSpec;
use crate::progress::{progress_bar, say};

/// The model `diffmoe train` trains when given no config: DiffMoE at CPU
/// size, on the embedded Fashion-MNIST.
pub const DEFAULT_PRESET: &str = "diffmoe-mini-e8-flow";

/// Arguments of `diffmoe train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// A TOML run config (see `configs/`).
    #[arg(long, conflicts_with_all = ["preset", "resume"])]
    pub config: Option<PathBuf>,
    /// A preset name (`diffmoe presets`); the default is diffmoe-mini-e8-flow.
    #[arg(long, conflicts_with = "resume")]
    pub preset: Option<String>,
    /// The data: `embedded` (default), `idx:DIR`, `folder:DIR`, `latents:DIR`, or a path.
    #[arg(long)]
    pub data: Option<String>,
    /// cpu, cuda, cuda:N or wgpu (default: the backend this binary was built
    /// with). A comma-separated list (`cuda:0,cuda:1`) trains data-parallel,
    /// one replica per device.
    #[arg(long, value_delimiter = ',')]
    pub device: Vec<DeviceSpec>,
    /// The run directory (default: runs/CONFIG_NAME, numbered if taken). Never overwritten.
    #[arg(long, conflicts_with = "resume")]
    pub out: Option<PathBuf>,
    /// Continue the run in this directory from its latest checkpoint.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Train until this many optimizer steps (overrides train.steps).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Global batch size (overrides train.batch_size).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Seed of initialisation, data order and noise (overrides train.seed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Data loader threads (overrides train.data.workers).
    #[arg(long)]
    pub workers: Option<usize>,
}

fn apply_overrides(config: &mut RunConfig, args: &TrainArgs) {
    if let Some(v) = &args.data {
        config.train.data.source = v.clone();
    }
    if let Some(v) = args.max_steps {
        config.train.steps = v;
    }
    if let Some(v) = args.batch_size {
        config.train.batch_size = v;
    }
    if let Some(v) = args.seed {
        config.train.seed = v;
    }
    if let Some(v) = args.workers {
        config.train.data.workers = v;
    }
}

/// `runs/<name>`, or `runs/<name>-2`, `-3`, ... if taken.
fn default_run_dir(name: &str) -> PathBuf {
    let base = Path::new("runs").join(name);
    if !base.exists() {
        return base;
    }
    (2..).map(|i| Path::new("runs").join(format!("{name}-{i}"))).find(|p| !p.exists()).expect("a free name")
}

/// Runs `diffmoe train`.
pub fn run(args: TrainArgs) -> Result<()> {
    let (mut config, run_dir, start) = match &args.resume {
        Some(dir) => (read_run_config(dir)?, dir.clone(), Start::Resume),
        None => {
            let config = match (&args.config, &args.preset) {
                (Some(path), _) => RunConfig::resolve(&path.to_string_lossy())?,
                (None, Some(name)) => RunConfig::resolve(name)?,
                (None, None) => RunConfig::resolve(DEFAULT_PRESET)?,
            };
            let dir = args.out.clone().unwrap_or_else(|| default_run_dir(&config.name));
            (config, dir, Start::Fresh)
        }
    };
    apply_overrides(&mut config, &args);
    config.validate()?;
    let specs = if args.device.is_empty() { vec![DeviceSpec::default_for_build()] } else { args.device.clone() };
    let devices = specs.iter().map(|s| s.device()).collect::<Result<Vec<_>>>()?;
    let label = specs.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    let mut progress = Progress::new(label);
    let summary = if devices.len() == 1 {
        let device = devices.into_iter().next().expect("one device");
        let trainer = Trainer::<AutodiffBackend, _>::new(config, &run_dir, start, device, SingleProcess)
            .with_context(|| format!("cannot start the run in {}", run_dir.display()))?;
        trainer.run(&mut progress)
    } else {
        train_data_parallel::<AutodiffBackend>(config, &run_dir, start, devices, &mut progress)
    };
    progress.bar.finish_and_clear();
    let summary = summary.with_context(|| format!("the run in {} stopped", run_dir.display()))?;
    eprintln!("done: {} steps, loss {:.4}", summary.steps, summary.final_loss);
    if let Some(c) = &summary.checkpoint {
        eprintln!("checkpoint: {}", c.display());
    }
    eprintln!("log:        {}", summary.log.display());
    if let Some(g) = &summary.grid {
        eprintln!("samples:    {}", g.display());
    }
    Ok(())
}

/// The progress bar, and one printed line per log record (so that logs of
/// non-interactive runs show progress too).
struct Progress {
    bar: ProgressBar,
    device: String,
}

impl Progress {
    fn new(device: String) -> Self {
        let bar = progress_bar(0, "");
        Self { bar, device }
    }

    /// A line above the bar, or on stderr when there is no terminal to draw on.
    fn say(&self, line: String) {
        say(&self.bar, line);
    }
}

impl TrainObserver for Progress {
    fn started(&mut self, info: &RunInfo) {
        self.bar.set_length(info.total_steps);
        self.bar.set_position(info.start_step);
        self.bar.reset_eta();
        let from = match &info.resumed_from {
            Some(p) => format!(", resumed from {}", p.display()),
            None => String::new(),
        };
        self.say(format!(
            "training {} parameters on {} ({}), {} -> step {}{from}\nrun directory: {}",
            info.parameters,
            self.device,
            info.dataset,
            info.start_step,
            info.total_steps,
            info.run_dir.display()
        ));
    }

    fn stepped(&mut self, p: &StepProgress) {
        self.bar.set_position(p.step);
        self.bar.set_message(format!(
            "loss {:.4} | {:.2} steps/s | {:.0} img/s",
            p.loss, p.steps_per_second, p.images_per_second
        ));
    }

    fn logged(&mut self, r: &LogRecord) {
        let vb = r.vb.map(|v| format!(" vb {v:.4}")).unwrap_or_default();
        self.say(format!(
            "step {:>7} loss {:.4} mse {:.4}{vb} cp {:.4} aux {:.4} |g| {:.3} lr {:.2e} {:.1} img/s",
            r.step, r.loss, r.mse, r.capacity_loss, r.aux_loss, r.grad_norm, r.lr, r.images_per_second
        ));
    }

    fn checkpointed(&mut self, path: &Path) {
        self.say(format!("checkpoint {}", path.display()));
    }

    fn wrote_grid(&mut self, path: &Path) {
        self.say(format!("samples {}", path.display()));
    }
}
