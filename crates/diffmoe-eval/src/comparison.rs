//! The paper's central comparison (DiffMoE Sec. 4.2, Table 2) at small
//! scale, as one reproducible run (`diffmoe compare`): Dense-DiT, TC-DiT,
//! EC-DiT and DiffMoE with the same activated parameters per token, trained
//! with the flow objective on the same data for the same steps, batch and
//! seed, sampled the same way, and scored in the feature space of the
//! Fashion-MNIST classifier; DiffMoE additionally with static, dynamic and
//! per-token routing and a sweep of the threshold offset (compute against
//! quality).
//!
//! Every model trains into `OUT/runs/<preset>` as `diffmoe train` would, so
//! an interrupted comparison resumes where it stopped and a finished model is
//! not trained again. The results go to `OUT/results.json`, `OUT/results.md`,
//! `OUT/compute_quality.png` and `OUT/grids/<model>.png`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use serde::Serialize;

use diffmoe_core::Routing;
use diffmoe_model::{Family, Objective, ParamReport, RunConfig, WeightSource};
use diffmoe_train::data::{open_dataset, Augment, DataError, DataSpec, Dataset, ImageShape};
use diffmoe_train::sampler::ClipDenoised;
use diffmoe_train::{
    list_checkpoints, load_trained, normal, plot_xy, save_grid, step_rng, ComputeRecorder, Generator, PlotError,
    SampleError, SampleSettings, SamplerChoice, SingleProcess, Start, Stream, TrainError, TrainObserver, Trainer,
    XySeries, LOG_FILE,
};

use crate::classifier::FeatureClassifier;
use crate::frechet::StatisticsError;
use crate::sample_quality::{sample_quality, ClassifierFeatures, SampleQuality};

/// The presets of the comparison: one per family, equal activated parameters.
pub const COMPARISON_PRESETS: [&str; 4] =
    ["dense-dit-mini-flow", "tc-dit-mini-e8-flow", "ec-dit-mini-e8-flow", "diffmoe-mini-e8-flow"];

/// How the comparison runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ComparisonSettings {
    /// The models (preset names or config files), trained with the same recipe.
    pub models: Vec<String>,
    /// Training data (`idx:DIR`, ...).
    pub train_data: String,
    /// Held-out data: the reference set of the scores and of the held-out loss.
    pub test_data: String,
    /// Optimizer steps of every model.
    pub steps: u64,
    /// Global batch of every model.
    pub batch_size: usize,
    /// Seed of every model's initialisation, data order and noise, and of sampling.
    pub seed: u64,
    /// EMA decay of every model (the weights that are sampled).
    pub ema_decay: f64,
    /// Generated samples per class.
    pub samples_per_class: usize,
    /// Euler steps per sample.
    pub sample_steps: usize,
    /// Classifier-free guidance scale of sampling (1: none).
    pub cfg_scale: f64,
    /// Samples per network batch.
    pub sample_batch: usize,
    /// DiffMoE: threshold offsets of the per-token routing sweep.
    pub threshold_offsets: Vec<f64>,
    /// Flow times of the held-out loss.
    pub loss_times: Vec<f64>,
    /// Held-out examples of the loss.
    pub loss_examples: usize,
    /// Held-out examples of the reference features (all when `None`).
    pub reference_examples: Option<usize>,
    /// Neighbourhood size of precision and recall.
    pub k: usize,
    /// Data loader threads.
    pub workers: usize,
}

impl Default for ComparisonSettings {
    /// The run of `docs/results.md`: about two hours on two CPU cores.
    fn default() -> Self {
        Self {
            models: COMPARISON_PRESETS.iter().map(|s| s.to_string()).collect(),
            train_data: "embedded".into(),
            test_data: "embedded".into(),
            steps: 3000,
            batch_size: 32,
            seed: 0,
            ema_decay: 0.999,
            samples_per_class: 100,
            sample_steps: 25,
            cfg_scale: 1.0,
            sample_batch: 100,
            threshold_offsets: vec![-0.1, 0.1, 0.2, 0.3],
            loss_times: vec![0.1, 0.3, 0.5, 0.7, 0.9],
            loss_examples: 2000,
            reference_examples: None,
            k: 3,
            workers: 2,
        }
    }
}

/// Why the comparison stopped.
#[derive(Debug, thiserror::Error)]
pub enum ComparisonError {
    /// A model's config is invalid or unknown.
    #[error("model {model}")]
    Config {
        /// The model.
        model: String,
        /// The cause.
        #[source]
        source: Box<diffmoe_model::ConfigError>,
    },
    /// A model's input does not fit the classifier that scores it.
    #[error("model {model} makes {model_shape:?} images, but the classifier reads {classifier_shape:?}")]
    Shape {
        /// The model.
        model: String,
        /// `[channels, size, size]` of the model.
        model_shape: [usize; 3],
        /// `[channels, size, size]` of the classifier.
        classifier_shape: [usize; 3],
    },
    /// A model is not a flow model.
    #[error("model {model} uses the {objective:?} objective; the comparison trains flow models")]
    Objective {
        /// The model.
        model: String,
        /// Its objective.
        objective: Objective,
    },
    /// Training failed.
    #[error("training {model}")]
    Train {
        /// The model.
        model: String,
        /// The cause.
        #[source]
        source: Box<TrainError>,
    },
    /// The trained model could not be read back.
    #[error("reading the trained {model}")]
    Checkpoint {
        /// The model.
        model: String,
        /// The cause.
        #[source]
        source: Box<diffmoe_train::CheckpointError>,
    },
    /// Data could not be read or written.
    #[error(transparent)]
    Data(#[from] DataError),
    /// Sampling failed.
    #[error(transparent)]
    Sample(#[from] SampleError),
    /// Scores could not be computed.
    #[error(transparent)]
    Statistics(#[from] StatisticsError),
    /// A plot could not be written.
    #[error(transparent)]
    Plot(#[from] PlotError),
    /// The output directory could not be created.
    #[error("cannot create {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A results file could not be written.
    #[error(transparent)]
    Write(#[from] diffmoe_weights::WriteError),
}

/// One row of the results: a model sampled one way.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ComparisonRow {
    /// The preset.
    pub model: String,
    /// The paper's name of its family.
    pub family: String,
    /// All parameters.
    pub total_parameters: usize,
    /// Parameters activated per token at the training capacity.
    pub activated_parameters: f64,
    /// Parameters activated per token while sampling (measured).
    pub sampling_activated_parameters: f64,
    /// Routed experts per token while sampling, mean over MoE blocks (0 for dense).
    pub experts_per_token: f64,
    /// How the model trained (its MoE routing).
    pub training_strategy: String,
    /// How it routed while sampling.
    pub inference_strategy: String,
    /// The scores.
    pub quality: SampleQuality,
    /// Held-out flow MSE at each of `loss_times`.
    pub held_out_loss: Vec<f64>,
    /// Training images per second (median over the log).
    pub train_images_per_second: f64,
    /// Sampling images per second.
    pub sample_images_per_second: f64,
}

/// The results of a comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ComparisonResults {
    /// The settings.
    pub settings: ComparisonSettings,
    /// Where the training and reference data came from.
    pub train_data: String,
    /// The reference set.
    pub test_data: String,
    /// The rows.
    pub rows: Vec<ComparisonRow>,
    /// The files written.
    pub files: Vec<PathBuf>,
}

/// Receives the progress of a comparison.
pub trait ComparisonObserver: TrainObserver {
    /// A stage begins.
    fn stage(&mut self, _message: &str) {}
}

/// A trained model and how it sampled.
struct SamplingRun {
    label: String,
    routing: Routing,
}

fn sampling_runs(family: Family, offsets: &[f64]) -> Vec<SamplingRun> {
    let run = |label: &str, routing| SamplingRun { label: label.to_string(), routing };
    match family {
        Family::Diffmoe => {
            let mut runs = vec![
                run("static", Routing::Static),
                run("dynamic", Routing::DYNAMIC),
                run("per-token", Routing::PER_TOKEN),
            ];
            for &offset in offsets {
                runs.push(run(&format!("per-token {offset:+}"), Routing::PerToken { threshold_offset: offset }));
            }
            runs
        }
        Family::Dense => vec![run("dense", Routing::Static)],
        Family::Tc => vec![run("token choice (top-k experts per token)", Routing::Static)],
        Family::Ec => vec![run("expert choice within each image", Routing::Static)],
    }
}

fn training_strategy(family: Family) -> &'static str {
    match family {
        Family::Dense => "dense MLP",
        Family::Tc => "token choice, load-balancing loss",
        Family::Ec => "expert choice within each image",
        Family::Diffmoe => "expert choice over the batch pool, capacity predictor",
    }
}

/// Runs the comparison into `out`.
///
/// # Errors
/// If a model cannot be trained, sampled or scored, or a file cannot be
/// written; the error names the model or file.
pub fn run_comparison<A: AutodiffBackend>(
    settings: &ComparisonSettings,
    classifier: &FeatureClassifier<A::InnerBackend>,
    out: &Path,
    device: &A::Device,
    observer: &mut dyn ComparisonObserver,
) -> Result<ComparisonResults, ComparisonError> {
    type I<A> = <A as AutodiffBackend>::InnerBackend;
    let create_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ComparisonError::CreateDir { path, source }
    };
    std::fs::create_dir_all(out).map_err(create_error(out))?;
    let scored = classifier.config();
    let shape = ImageShape { channels: scored.channels, height: scored.input_size, width: scored.input_size };
    let image = [shape.channels, shape.height, shape.width];
    let test_spec: DataSpec = settings.test_data.parse()?;
    let test = open_dataset(&test_spec, shape)?;
    observer.stage(&format!("reference features of {}", test.describe()));
    let (reference, _) = ClassifierFeatures::of_dataset(classifier, test.as_ref(), settings.reference_examples)?;
    let reference_stats = reference.statistics()?;
    let classes = test.num_classes();
    let labels: Vec<usize> = (0..classes * settings.samples_per_class).map(|i| i % classes).collect();

    let mut rows = Vec::new();
    let mut files = Vec::new();
    let grids = out.join("grids");
    std::fs::create_dir_all(&grids).map_err(create_error(&grids))?;
    for name in &settings.models {
        let config = comparison_config(name, settings)?;
        let model_shape = [config.model.in_channels, config.model.input_size, config.model.input_size];
        if model_shape != image {
            return Err(ComparisonError::Shape { model: name.clone(), model_shape, classifier_shape: image });
        }
        let family = config.model.family;
        let run_dir = out.join("runs").join(&config.name);
        let start = if list_checkpoints(&run_dir).map(|c| !c.is_empty()).unwrap_or(false) {
            Start::Resume
        } else {
            Start::Fresh
        };
        observer.stage(&format!("training {} ({:?})", config.name, start));
        let train = |source| ComparisonError::Train { model: config.name.clone(), source: Box::new(source) };
        let trainer =
            Trainer::<A, _>::new(config.clone(), &run_dir, start, device.clone(), SingleProcess).map_err(train)?;
        trainer.run(observer).map_err(train)?;
        let train_speed = median_images_per_second(&run_dir.join(LOG_FILE));

        let trained = load_trained::<I<A>>(&run_dir, WeightSource::Ema, None, device)
            .map_err(|source| ComparisonError::Checkpoint { model: config.name.clone(), source: Box::new(source) })?;
        observer.stage(&format!("held-out loss of {}", config.name));
        let held_out = held_out_loss(&trained.model, test.as_ref(), settings)?;
        let params = ParamReport::from_config(&config.model);
        for (i, sampling) in sampling_runs(family, &settings.threshold_offsets).into_iter().enumerate() {
            observer.stage(&format!("sampling {} ({})", config.name, sampling.label));
            let generator = Generator::new(
                &trained.model,
                Objective::Flow,
                SampleSettings {
                    sampler: SamplerChoice::Euler { steps: settings.sample_steps },
                    cfg_scale: settings.cfg_scale,
                    cfg_channels: diffmoe_model::CfgChannels::All,
                    routing: sampling.routing,
                    seed: settings.seed,
                    clip: ClipDenoised::UnitRange,
                },
            )?;
            let recorder = ComputeRecorder::new(&config.model, SamplerChoice::Euler { steps: 1 }.step_axis(1));
            let mut images = Vec::with_capacity(labels.len() * shape.numel());
            let started = Instant::now();
            generator.generate_batches(&labels, settings.sample_batch, Some(&recorder), |_, values| {
                images.extend(values);
                Ok::<(), SampleError>(())
            })?;
            let seconds = started.elapsed().as_secs_f64();
            if i == 0 {
                let grid = grids.join(format!("{}.png", config.name));
                let tiles = classes * 8.min(settings.samples_per_class);
                save_grid(&grid, &images[..tiles * shape.numel()], [tiles, image[0], image[1], image[2]], classes)?;
                files.push(grid);
            }
            let features = ClassifierFeatures::of_images(classifier, &images, image);
            let quality = sample_quality::<I<A>>(&features, &labels, &reference, &reference_stats, settings.k, device)?;
            let compute = recorder.report(&params);
            let experts = if compute.experts_per_token.is_empty() {
                0.0
            } else {
                compute.experts_per_token.iter().sum::<f64>() / compute.experts_per_token.len() as f64
            };
            rows.push(ComparisonRow {
                model: config.name.clone(),
                family: family.paper_name().to_string(),
                total_parameters: params.total,
                activated_parameters: params.activated,
                sampling_activated_parameters: compute.activated_parameters_per_token,
                experts_per_token: experts,
                training_strategy: training_strategy(family).to_string(),
                inference_strategy: sampling.label,
                quality,
                held_out_loss: held_out.clone(),
                train_images_per_second: train_speed,
                sample_images_per_second: labels.len() as f64 / seconds.max(1e-9),
            });
        }
    }
    let results = ComparisonResults {
        settings: settings.clone(),
        train_data: settings.train_data.clone(),
        test_data: test.describe(),
        rows,
        files,
    };
    write_results(&results, out)
}

/// A model's run config: its preset with the comparison's common recipe.
fn comparison_config(name: &str, settings: &ComparisonSettings) -> Result<RunConfig, ComparisonError> {
    let config_error = |source| ComparisonError::Config { model: name.to_string(), source: Box::new(source) };
    let mut config = RunConfig::resolve(name).map_err(config_error)?;
    if config.objective != Objective::Flow {
        return Err(ComparisonError::Objective { model: name.to_string(), objective: config.objective });
    }
    let t = &mut config.train;
    t.steps = settings.steps;
    t.batch_size = settings.batch_size;
    t.seed = settings.seed;
    t.ema_decay = settings.ema_decay;
    t.data.source = settings.train_data.clone();
    t.data.workers = settings.workers;
    // One grid at the end, one checkpoint every 500 steps for resumption.
    t.sample_every = 0;
    t.checkpoint_every = 500;
    t.keep_checkpoints = 1;
    config.validate().map_err(config_error)?;
    Ok(config)
}

/// The flow MSE on the first `loss_examples` held-out images at each time of
/// `loss_times`, with noise fixed by the seed (the same for every model);
/// the network routes as in training.
fn held_out_loss<B: Backend>(
    model: &diffmoe_model::DiT<B>,
    data: &dyn Dataset,
    settings: &ComparisonSettings,
) -> Result<Vec<f64>, DataError> {
    let device = model.pos_embed.val().device();
    let n = settings.loss_examples.min(data.len());
    let shape = data.shape();
    let batch = settings.sample_batch.max(1);
    let mut sums = vec![0.0; settings.loss_times.len()];
    for start in (0..n).step_by(batch) {
        let m = batch.min(n - start);
        let mut x = Vec::with_capacity(m * shape.numel());
        let mut y = Vec::with_capacity(m);
        for i in start..start + m {
            let e = data.get(i, Augment::default())?;
            x.extend(e.image);
            y.push(e.label as i64);
        }
        let dims = [m, shape.channels, shape.height, shape.width];
        let x1 = Tensor::<B, 4>::from_data(TensorData::new(x, dims), &device);
        let y = Tensor::<B, 1, Int>::from_data(TensorData::new(y, [m]), &device);
        let noise = normal(&mut step_rng(settings.seed, start as u64, 0, Stream::Noise), m * shape.numel());
        let z0 = Tensor::<B, 4>::from_data(TensorData::new(noise, dims), &device);
        for (j, &t) in settings.loss_times.iter().enumerate() {
            let terms =
                diffmoe_train::flow_loss(model, x1.clone(), y.clone(), z0.clone(), Tensor::full([m], t, &device));
            let mse: f64 = terms.mse.sum().into_data().iter::<f64>().next().unwrap_or(f64::NAN);
            sums[j] += mse;
        }
    }
    Ok(sums.into_iter().map(|s| s / n.max(1) as f64).collect())
}

/// The median of `images_per_second` over a run's log (NaN without records).
fn median_images_per_second(log: &Path) -> f64 {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut speeds: Vec<f64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["images_per_second"].as_f64())
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    if speeds.is_empty() {
        return f64::NAN;
    }
    speeds.sort_by(f64::total_cmp);
    speeds[speeds.len() / 2]
}

/// `results.json`, `results.md` and the compute-quality plot.
fn write_results(results: &ComparisonResults, out: &Path) -> Result<ComparisonResults, ComparisonError> {
    let mut results = results.clone();
    let write = |path: PathBuf, bytes: &[u8]| -> Result<PathBuf, ComparisonError> {
        diffmoe_weights::write_atomically(&path, bytes)?;
        Ok(path)
    };
    let plot = out.join("compute_quality.png");
    let mut series: Vec<XySeries> = Vec::new();
    for row in &results.rows {
        let point = (row.sampling_activated_parameters / 1e6, row.quality.frechet_distance);
        let name = if row.family == "DiffMoE" && row.inference_strategy.starts_with("per-token") {
            "DiffMoE per-token (threshold offsets)".to_string()
        } else {
            format!("{} ({})", row.family, row.inference_strategy.split(' ').next().unwrap_or(""))
        };
        match series.iter_mut().find(|s| s.name == name) {
            Some(s) => s.points.push(point),
            None => series.push(XySeries { name, points: vec![point], line: false }),
        }
    }
    for s in &mut series {
        if s.points.len() > 1 {
            s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
            s.line = true;
        }
    }
    plot_xy(
        &plot,
        "Frechet distance (classifier features) against compute",
        "activated parameters per token while sampling (M)",
        "Frechet distance (lower is better)",
        &series,
    )?;
    results.files.push(plot);
    let json = serde_json::to_vec_pretty(&results).expect("results serialise");
    results.files.push(write(out.join("results.json"), &json)?);
    let md = markdown_table(&results);
    results.files.push(write(out.join("results.md"), md.as_bytes())?);
    Ok(results)
}

/// The results as a Markdown table.
pub fn markdown_table(results: &ComparisonResults) -> String {
    let s = &results.settings;
    let times: Vec<String> = s.loss_times.iter().map(|t| format!("{t}")).collect();
    let mut md = format!(
        "| model | family | total params | activated params (train) | activated params (sampling) | experts/token | training | inference | FD | precision | recall | accuracy | held-out MSE at t = {} | train img/s | sample img/s |\n",
        times.join(", ")
    );
    md.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in &results.rows {
        let loss: Vec<String> = r.held_out_loss.iter().map(|l| format!("{l:.4}")).collect();
        md.push_str(&format!(
            "| {} | {} | {:.3} M | {:.3} M | {:.3} M | {:.3} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {:.1} | {:.1} |\n",
            r.model,
            r.family,
            r.total_parameters as f64 / 1e6,
            r.activated_parameters / 1e6,
            r.sampling_activated_parameters / 1e6,
            r.experts_per_token,
            r.training_strategy,
            r.inference_strategy,
            r.quality.frechet_distance,
            r.quality.precision_recall.precision,
            r.quality.precision_recall.recall,
            r.quality.accuracy,
            loss.join(" / "),
            r.train_images_per_second,
            r.sample_images_per_second,
        ));
    }
    md
}
