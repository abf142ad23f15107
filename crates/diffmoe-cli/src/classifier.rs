//! `diffmoe classifier`: trains and tests the feature classifier of the
//! Fashion-MNIST evaluation (`diffmoe_eval::FeatureClassifier`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;

use diffmoe_eval::{
    accuracy, train_classifier, ClassifierConfig, ClassifierObserver, ClassifierTraining, EpochReport,
    FeatureClassifier,
};
use diffmoe_train::data::{open_dataset, DataSpec, ImageShape};

use crate::backend::{AutodiffBackend, Backend};
use crate::device::DeviceSpec;
use crate::progress::{progress_bar, say};

/// `diffmoe classifier ...`.
#[derive(clap::Subcommand, Debug)]
pub enum ClassifierCommand {
    /// Train a classifier on a labelled image dataset and write its weights.
    Train(TrainArgs),
    /// The accuracy of a classifier on a labelled image dataset.
    Test(TestArgs),
}

/// Arguments of `diffmoe classifier train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// The training data (`idx:DIR`, `folder:DIR`, `embedded`, ...).
    #[arg(long)]
    pub data: String,
    /// The test data, scored after every epoch.
    #[arg(long)]
    pub test: String,
    /// The weights file to write (safetensors, config in the metadata).
    #[arg(long)]
    pub out: PathBuf,
    /// Side of the input the images are converted to (Fashion-MNIST is padded from 28).
    #[arg(long, default_value_t = 32)]
    pub input_size: usize,
    /// Input channels.
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    /// Channels of the first convolutions.
    #[arg(long, default_value_t = 32)]
    pub width: usize,
    /// Width of the feature layer.
    #[arg(long, default_value_t = 128)]
    pub features: usize,
    /// Passes over the training data.
    #[arg(long, default_value_t = ClassifierTraining::default().epochs)]
    pub epochs: usize,
    /// Images per step.
    #[arg(long, default_value_t = ClassifierTraining::default().batch_size)]
    pub batch_size: usize,
    /// Peak learning rate (cosine decay).
    #[arg(long, default_value_t = ClassifierTraining::default().learning_rate)]
    pub lr: f64,
    /// Seed of initialisation, data order and flips.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu, cuda, cuda:N or wgpu.
    #[arg(long)]
    pub device: Option<DeviceSpec>,
}

/// Arguments of `diffmoe classifier test`.
#[derive(clap::Args, Debug)]
pub struct TestArgs {
    /// The weights (default: the Fashion-MNIST classifier built into this binary).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// The labelled data to score.
    #[arg(long)]
    pub data: String,
    /// cpu, cuda, cuda:N or wgpu.
    #[arg(long)]
    pub device: Option<DeviceSpec>,
}

struct Progress {
    bar: ProgressBar,
}

impl ClassifierObserver for Progress {
    fn stepped(&mut self, step: usize, total: usize, loss: f64) {
        self.bar.set_length(total as u64);
        self.bar.set_position(step as u64);
        self.bar.set_message(format!("loss {loss:.4}"));
    }

    fn epoch(&mut self, r: &EpochReport) {
        let line = format!(
            "epoch {}: train loss {:.4}, train accuracy {:.2}%, test accuracy {:.2}% ({:.0} s)",
            r.epoch,
            r.train_loss,
            100.0 * r.train_accuracy,
            100.0 * r.test_accuracy,
            r.seconds
        );
        say(&self.bar, line);
    }
}

/// Runs `diffmoe classifier`.
pub fn run(command: ClassifierCommand) -> Result<()> {
    match command {
        ClassifierCommand::Train(args) => train(args),
        ClassifierCommand::Test(args) => test(args),
    }
}

fn open(spec: &str, shape: ImageShape) -> Result<std::sync::Arc<dyn diffmoe_train::data::Dataset>> {
    let parsed: DataSpec = spec.parse().with_context(|| format!("cannot open {spec}"))?;
    let data = open_dataset(&parsed, shape).with_context(|| format!("cannot open {spec}"))?;
    if data.is_latent() {
        bail!("{spec} holds latents; the classifier reads images");
    }
    Ok(data)
}

fn train(args: TrainArgs) -> Result<()> {
    if args.input_size == 0 || !args.input_size.is_multiple_of(8) {
        bail!("--input-size {} must be a positive multiple of 8 (three 2x2 poolings)", args.input_size);
    }
    let device = args.device.unwrap_or_else(DeviceSpec::default_for_build).device()?;
    let shape = ImageShape { channels: args.channels, height: args.input_size, width: args.input_size };
    let train_data = open(&args.data, shape)?;
    let test_data = open(&args.test, shape)?;
    let config = ClassifierConfig::new()
        .with_channels(args.channels)
        .with_input_size(args.input_size)
        .with_width(args.width)
        .with_features(args.features)
        .with_num_classes(train_data.num_classes().max(test_data.num_classes()));
    let settings = ClassifierTraining {
        epochs: args.epochs,
        batch_size: args.batch_size,
        learning_rate: args.lr,
        seed: args.seed,
        ..ClassifierTraining::default()
    };
    eprintln!("training on {}\ntesting on {}", train_data.describe(), test_data.describe());
    let bar = progress_bar(0, "");
    let mut progress = Progress { bar };
    let (model, reports) =
        train_classifier::<AutodiffBackend>(&config, train_data, test_data.as_ref(), settings, &device, &mut progress)?;
    progress.bar.finish_and_clear();
    model.save(&args.out)?;
    let last = reports.last().map(|r| r.test_accuracy).unwrap_or(f64::NAN);
    eprintln!("wrote {} (test accuracy {:.2}%)", args.out.display(), 100.0 * last);
    Ok(())
}

fn test(args: TestArgs) -> Result<()> {
    let device = args.device.unwrap_or_else(DeviceSpec::default_for_build).device()?;
    let model = match &args.weights {
        Some(path) => FeatureClassifier::<Backend>::load(path, &device)?,
        None => FeatureClassifier::<Backend>::fashion_mnist(&device),
    };
    let config = model.config();
    let shape = ImageShape { channels: config.channels, height: config.input_size, width: config.input_size };
    let data = open(&args.data, shape)?;
    let acc = accuracy(&model, data.as_ref(), 500)?;
    println!("accuracy {:.2}% on {}", 100.0 * acc, data.describe());
    Ok(())
}
