//! `diffmoe eval`: scores a sample array file against a reference set, in
//! the feature space of the Fashion-MNIST classifier (Frechet distance,
//! precision, recall, accuracy on the requested labels) or, with `--fid`, of
//! pytorch-fid's Inception (FID as published papers compute it, Inception
//! Score, precision and recall).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use diffmoe_eval::{
    frechet_distance, inception_score, load_fid_inception, precision_recall, ClassifierFeatures, FeatureClassifier,
    FeatureStatistics, InceptionFeatures, MeanPrecision, PrecisionRecall, SampleSet, ScoreArithmetic, SqrtmOffset,
    ADM_SPLIT_SIZE, INCEPTION_CLASSES, POOL_FEATURES, WEIGHTS_FILE_NAME, WEIGHTS_FILE_URL,
};
use diffmoe_train::data::{open_dataset, DataSpec, ImageShape};
use diffmoe_weights::write_atomically;

use crate::backend::Backend;
use crate::device::DeviceSpec;
use crate::progress::progress_bar;

/// Arguments of `diffmoe eval`.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// The samples: `samples_raw.npz` or `samples.npz` as `diffmoe sample` writes them
    /// (or any ADM-style npz with `arr_0` uint8 [N, H, W, C]).
    #[arg(long)]
    pub samples: PathBuf,
    /// The reference images (`embedded`, `idx:DIR`, `folder:DIR`, ...).
    #[arg(long, conflicts_with = "reference_stats")]
    pub reference: Option<String>,
    /// Reference statistics (`.npz` with `mu` and `sigma`, e.g. ADM's
    /// `VIRTUAL_imagenet256_labeled.npz`); FID only.
    #[arg(long, requires = "fid")]
    pub reference_stats: Option<PathBuf>,
    /// At most this many reference images.
    #[arg(long)]
    pub reference_examples: Option<usize>,
    /// Score with pytorch-fid's Inception: FID, Inception Score, precision and recall.
    #[arg(long, requires = "inception")]
    pub fid: bool,
    /// pytorch-fid's weights, `pt_inception-2015-12-05-6726825d.pth` (or a safetensors copy).
    #[arg(long)]
    pub inception: Option<PathBuf>,
    /// Write the reference statistics computed here (`mu`, `sigma`) to this `.npz`.
    #[arg(long)]
    pub write_reference_stats: Option<PathBuf>,
    /// Classifier weights (default: the Fashion-MNIST classifier built in).
    #[arg(long, conflicts_with = "fid")]
    pub classifier: Option<PathBuf>,
    /// Neighbourhood size of precision and recall.
    #[arg(long, default_value_t = diffmoe_eval::DEFAULT_K)]
    pub k: usize,
    /// Images per network batch.
    #[arg(long, default_value_t = 50)]
    pub batch_size: usize,
    /// Write the scores as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// cpu, cuda, cuda:N or wgpu.
    #[arg(long)]
    pub device: Option<DeviceSpec>,
}

/// The scores, as printed and written.
#[derive(Debug, Serialize)]
struct Scores {
    samples: PathBuf,
    count: usize,
    features: &'static str,
    reference: String,
    frechet_distance: f64,
    precision_recall: Option<PrecisionRecall>,
    inception_score: Option<f64>,
    accuracy: Option<f64>,
}

/// Runs `diffmoe eval`.
pub fn run(args: EvalArgs) -> Result<()> {
    let device = args.device.unwrap_or_else(DeviceSpec::default_for_build).device()?;
    let samples = SampleSet::read(&args.samples)?;
    if samples.len() <= args.k {
        bail!(
            "{} holds {} samples; precision and recall need more than k = {}",
            args.samples.display(),
            samples.len(),
            args.k
        );
    }
    eprintln!("{} samples {:?} from {}", samples.len(), samples.shape, args.samples.display());
    let scores = if args.fid { inception(&args, &samples, &device)? } else { classifier(&args, &samples, &device)? };
    println!("{}", serde_json::to_string_pretty(&scores).expect("scores serialise"));
    if let Some(path) = &args.json {
        let json = serde_json::to_vec_pretty(&scores).expect("scores serialise");
        write_atomically(path, &json).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn classifier(args: &EvalArgs, samples: &SampleSet, device: &burn::tensor::Device<Backend>) -> Result<Scores> {
    let model = match &args.classifier {
        Some(path) => FeatureClassifier::<Backend>::load(path, device)?,
        None => FeatureClassifier::<Backend>::fashion_mnist(device),
    };
    let config = model.config();
    let wanted = [config.channels, config.input_size, config.input_size];
    if samples.shape != wanted {
        bail!(
            "{} holds {:?} samples but the classifier reads {wanted:?}; pass --classifier for another one, or --fid",
            args.samples.display(),
            samples.shape
        );
    }
    let reference = args.reference.clone().unwrap_or_else(|| "embedded".to_string());
    let spec: DataSpec = reference.parse().with_context(|| format!("--reference {reference}"))?;
    let shape = ImageShape { channels: config.channels, height: config.input_size, width: config.input_size };
    let data = open_dataset(&spec, shape).with_context(|| format!("--reference {reference}"))?;
    let (real, _) = ClassifierFeatures::of_dataset(&model, data.as_ref(), args.reference_examples)?;
    let fake = ClassifierFeatures::of_images(&model, &samples.images, samples.shape);
    let real_stats = real.statistics()?;
    if let Some(path) = &args.write_reference_stats {
        real_stats.write_npz(path)?;
    }
    let fd = frechet_distance(&fake.statistics()?, &real_stats, SqrtmOffset::None)?;
    let pr = precision_recall::<Backend>(&real.features, &fake.features, fake.dim, args.k, device);
    let accuracy = samples.labels.as_ref().map(|labels| {
        labels.iter().zip(&fake.predictions).filter(|(l, p)| l == p).count() as f64 / labels.len().max(1) as f64
    });
    Ok(Scores {
        samples: args.samples.clone(),
        count: samples.len(),
        features: "Fashion-MNIST classifier (128-d)",
        reference: format!("{} ({} images)", data.describe(), real.len()),
        frechet_distance: fd,
        precision_recall: Some(pr),
        inception_score: None,
        accuracy,
    })
}

fn inception(args: &EvalArgs, samples: &SampleSet, device: &burn::tensor::Device<Backend>) -> Result<Scores> {
    let path = args.inception.as_ref().expect("clap requires --inception with --fid");
    if !path.is_file() {
        bail!(
            "--inception {}: no such file; bring pytorch-fid's {WEIGHTS_FILE_NAME} ({WEIGHTS_FILE_URL})",
            path.display()
        );
    }
    let model = load_fid_inception::<Backend>(path, device)?;
    let progress = progress_bar(samples.len() as u64, "samples");
    let fake = InceptionFeatures::of_images01(
        &model,
        &samples.inception_input(),
        [3, samples.shape[1], samples.shape[2]],
        args.batch_size,
        &mut |done| progress.set_position(done as u64),
    );
    progress.finish_and_clear();
    let fake_stats = FeatureStatistics::from_features(&fake.pool, POOL_FEATURES, MeanPrecision::F32)?;
    let (real_stats, real_pool, reference) = match (&args.reference_stats, &args.reference) {
        (Some(stats), _) => (FeatureStatistics::read_npz(stats)?, None, stats.display().to_string()),
        (None, Some(reference)) => {
            let spec: DataSpec = reference.parse().with_context(|| format!("--reference {reference}"))?;
            let shape = ImageShape { channels: 3, height: samples.shape[1], width: samples.shape[2] };
            let data = open_dataset(&spec, shape).with_context(|| format!("--reference {reference}"))?;
            let n = args.reference_examples.map_or(data.len(), |l| l.min(data.len()));
            let progress = progress_bar(n as u64, "reference images");
            let real = InceptionFeatures::of_dataset(
                &model,
                data.as_ref(),
                args.reference_examples,
                args.batch_size,
                &mut |d| progress.set_position(d as u64),
            )?;
            progress.finish_and_clear();
            let stats = FeatureStatistics::from_features(&real.pool, POOL_FEATURES, MeanPrecision::F32)?;
            (stats, Some(real.pool), data.describe())
        }
        (None, None) => bail!("--fid needs --reference IMAGES or --reference-stats FILE.npz"),
    };
    if let Some(path) = &args.write_reference_stats {
        real_stats.write_npz(path)?;
    }
    let fid = frechet_distance(&fake_stats, &real_stats, SqrtmOffset::None)?;
    let precision_recall =
        real_pool.map(|real| precision_recall::<Backend>(&real, &fake.pool, POOL_FEATURES, args.k, device));
    let inception_score = fake
        .probabilities
        .as_ref()
        .map(|p| inception_score(p, INCEPTION_CLASSES, ADM_SPLIT_SIZE, ScoreArithmetic::F32).score);
    Ok(Scores {
        samples: args.samples.clone(),
        count: samples.len(),
        features: "pytorch-fid InceptionV3 pool (2048-d)",
        reference,
        frechet_distance: fid,
        precision_recall,
        inception_score,
        accuracy: None,
    })
}
