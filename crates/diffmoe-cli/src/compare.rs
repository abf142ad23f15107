//! `diffmoe compare`: the paper's comparison of Dense-DiT, TC-DiT, EC-DiT and
//! DiffMoE at equal activated parameters, trained and scored on one dataset
//! (`diffmoe_eval::run_comparison`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use indicatif::ProgressBar;

use diffmoe_eval::{run_comparison, ComparisonObserver, ComparisonSettings, FeatureClassifier};
use diffmoe_train::{LogRecord, RunInfo, StepProgress, TrainObserver};

use crate::backend::{AutodiffBackend, Backend};
use crate::device::DeviceSpec;
use crate::progress::{progress_bar, say};

/// Arguments of `diffmoe compare`.
#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// Training data of every model.
    #[arg(long, default_value = "embedded")]
    pub data: String,
    /// Held-out data: the reference of the scores and of the held-out loss.
    #[arg(long, default_value = "embedded")]
    pub test: String,
    /// The results directory (models train into OUT/runs; rerunning resumes).
    #[arg(long)]
    pub out: PathBuf,
    /// The models, comma-separated presets or config files (default: the four mini presets).
    #[arg(long, value_delimiter = ',')]
    pub models: Vec<String>,
    /// Optimizer steps of every model.
    #[arg(long, default_value_t = ComparisonSettings::default().steps)]
    pub steps: u64,
    /// Global batch of every model.
    #[arg(long, default_value_t = ComparisonSettings::default().batch_size)]
    pub batch_size: usize,
    /// Seed of every model and of sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Generated samples per class.
    #[arg(long, default_value_t = ComparisonSettings::default().samples_per_class)]
    pub samples_per_class: usize,
    /// Euler steps per sample.
    #[arg(long, default_value_t = ComparisonSettings::default().sample_steps)]
    pub sample_steps: usize,
    /// Classifier-free guidance scale of sampling (1: none).
    #[arg(long, default_value_t = 1.0)]
    pub cfg_scale: f64,
    /// DiffMoE per-token threshold offsets to sweep, comma-separated.
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub threshold_offsets: Option<Vec<f64>>,
    /// Held-out images of the loss.
    #[arg(long, default_value_t = ComparisonSettings::default().loss_examples)]
    pub loss_examples: usize,
    /// Held-out images of the reference features (default: all).
    #[arg(long)]
    pub reference_examples: Option<usize>,
    /// Classifier weights (default: the Fashion-MNIST classifier built in).
    #[arg(long)]
    pub classifier: Option<PathBuf>,
    /// Data loader threads.
    #[arg(long, default_value_t = ComparisonSettings::default().workers)]
    pub workers: usize,
    /// cpu, cuda, cuda:N or wgpu.
    #[arg(long)]
    pub device: Option<DeviceSpec>,
}

struct Progress {
    bar: ProgressBar,
}

impl Progress {
    fn say(&self, line: String) {
        say(&self.bar, line);
    }
}

impl TrainObserver for Progress {
    fn started(&mut self, info: &RunInfo) {
        self.bar.set_length(info.total_steps);
        self.bar.set_position(info.start_step);
        self.bar.reset_eta();
    }

    fn stepped(&mut self, p: &StepProgress) {
        self.bar.set_position(p.step);
        self.bar.set_message(format!("loss {:.4} | {:.0} img/s", p.loss, p.images_per_second));
    }

    fn logged(&mut self, r: &LogRecord) {
        if self.bar.is_hidden() && r.step.is_multiple_of(500) {
            eprintln!("  step {} loss {:.4} {:.1} img/s", r.step, r.loss, r.images_per_second);
        }
    }
}

impl ComparisonObserver for Progress {
    fn stage(&mut self, message: &str) {
        self.say(format!("== {message}"));
    }
}

/// Runs `diffmoe compare`.
pub fn run(args: CompareArgs) -> Result<()> {
    let device = args.device.unwrap_or_else(DeviceSpec::default_for_build).device()?;
    let defaults = ComparisonSettings::default();
    let settings = ComparisonSettings {
        models: if args.models.is_empty() { defaults.models.clone() } else { args.models.clone() },
        train_data: args.data.clone(),
        test_data: args.test.clone(),
        steps: args.steps,
        batch_size: args.batch_size,
        seed: args.seed,
        samples_per_class: args.samples_per_class,
        sample_steps: args.sample_steps,
        cfg_scale: args.cfg_scale,
        threshold_offsets: args.threshold_offsets.clone().unwrap_or(defaults.threshold_offsets.clone()),
        loss_examples: args.loss_examples,
        reference_examples: args.reference_examples,
        workers: args.workers,
        ..defaults
    };
    let classifier = match &args.classifier {
        Some(path) => FeatureClassifier::<Backend>::load(path, &device)?,
        None => FeatureClassifier::<Backend>::fashion_mnist(&device),
    };
    let bar = progress_bar(0, "");
    let mut progress = Progress { bar };
    let results = run_comparison::<AutodiffBackend>(&settings, &classifier, &args.out, &device, &mut progress)
        .with_context(|| format!("the comparison in {} stopped", args.out.display()))?;
    progress.bar.finish_and_clear();
    print!("{}", diffmoe_eval::markdown_table(&results));
    for file in &results.files {
        eprintln!("wrote {}", file.display());
    }
    Ok(())
}
