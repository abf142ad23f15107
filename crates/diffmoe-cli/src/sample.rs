//! `diffmoe sample`: samples images (or latents) from a trained model with
//! the chosen sampler, guidance and routing, writes them as a grid, one PNG
//! per sample and array files, and reports where the compute went.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use indicatif::ProgressBar;

use burn::tensor::{Tensor, TensorData};
use diffmoe_core::Routing;
use diffmoe_model::{CfgChannels, DiTOutput, Objective, ParamReport, RunConfig, WeightSource};
use diffmoe_train::data::{load_vae, read_vae_config};
use diffmoe_train::{
    load_trained, plot_per_class, plot_per_step, sampler::ClipDenoised, CallObserver, ComputeRecorder, Generator,
    SampleSettings, SampleSpace, SampleWriter, SamplerChoice,
};
use diffmoe_vae::AutoencoderKlConfig;
use diffmoe_weights::write_atomically;

use crate::backend::Backend;
use crate::device::DeviceSpec;
use crate::progress::progress_bar;

/// The samplers by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SamplerName {
    /// Flow: Euler steps (the official default).
    Euler,
    /// Flow: Heun steps (two evaluations per step).
    Heun,
    /// Flow: adaptive Dormand-Prince (see --atol, --rtol).
    Dopri5,
    /// DDPM: respaced ancestral sampling with the learned variance.
    Ddpm,
    /// DDPM: DDIM (see --eta).
    Ddim,
}

/// How DiffMoE's experts choose tokens at inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoutingName {
    /// Training routing: every expert takes its top-k of the batch pool.
    Static,
    /// The official rule: expert e takes as many tokens of the batch as have
    /// a predicted probability above its threshold, the best by gate score.
    Dynamic,
    /// A token goes to expert e when its predicted probability is above the
    /// threshold; images do not depend on their batch.
    PerToken,
}

/// Which channels classifier-free guidance mixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CfgChannelsName {
    /// Every channel (correct).
    All,
    /// The first 3 only (the official DDPM `forward_with_cfg` quirk).
    #[value(name = "3")]
    Three,
}

/// Arguments of `diffmoe sample`.
#[derive(clap::Args, Debug)]
pub struct SampleArgs {
    /// A run directory (its latest checkpoint), a checkpoint directory, or a
    /// weights file (this project's safetensors or official weights, with --config).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The run config of a weights file (a preset name or TOML file).
    #[arg(long)]
    pub config: Option<String>,
    /// Sample from the EMA weights (what papers report) instead of the trained ones.
    #[arg(long)]
    pub ema: bool,
    /// Class labels, comma-separated (default: every class of the model).
    #[arg(long, value_delimiter = ',')]
    pub classes: Vec<usize>,
    /// Samples per class.
    #[arg(long, default_value_t = 4)]
    pub per_class: usize,
    /// The sampler (default: euler for flow models, ddpm for DDPM models).
    #[arg(long, value_enum)]
    pub sampler: Option<SamplerName>,
    /// Steps (default: 50 for flow, 250 respaced steps for DDPM); for dopri5,
    /// the number of time bins of the per-step statistics.
    #[arg(long)]
    pub steps: Option<usize>,
    /// DDIM stochasticity (0 is deterministic).
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    /// dopri5 absolute tolerance (SiT's default).
    #[arg(long, default_value_t = 1e-6)]
    pub atol: f64,
    /// dopri5 relative tolerance (SiT's default).
    #[arg(long, default_value_t = 1e-3)]
    pub rtol: f64,
    /// Classifier-free guidance scale (1: no guidance).
    #[arg(long, default_value_t = 1.0)]
    pub cfg_scale: f64,
    /// Guided channels: all, or 3 (the official DDPM quirk).
    #[arg(long, value_enum, default_value_t = CfgChannelsName::All)]
    pub cfg_channels: CfgChannelsName,
    /// How DiffMoE routes tokens (other families route the same way in all modes).
    #[arg(long, value_enum, default_value_t = RoutingName::Dynamic)]
    pub routing: RoutingName,
    /// Added to every expert threshold (dynamic and per-token routing):
    /// positive values spend less compute, negative ones more.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub threshold_offset: f64,
    /// Samples per network batch.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Seed of the noise: sample i's noise depends only on (seed, i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu, cuda, cuda:N or wgpu (default: the backend this binary was built with).
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// The grid PNG.
    #[arg(long)]
    pub out: PathBuf,
    /// Where the per-sample PNGs and the array files go (default: the grid's
    /// path without its extension).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Write where the compute went (per step and per class) as JSON, and
    /// plot it as PNGs next to it.
    #[arg(long)]
    pub stats: Option<PathBuf>,
    /// Decode latent samples to images with this VAE (diffusers
    /// `diffusion_pytorch_model.safetensors` of stabilityai/sd-vae-ft-mse or
    /// -ema, its `.bin`, or the LDM `.ckpt`), as `vae.decode(z / 0.18215)`.
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// The VAE's diffusers `config.json`, for another architecture than the SD VAE.
    #[arg(long, requires = "vae")]
    pub vae_config: Option<PathBuf>,
}

impl SampleArgs {
    fn sampler(&self, objective: Objective) -> SamplerChoice {
        let name = self.sampler.unwrap_or(match objective {
            Objective::Flow => SamplerName::Euler,
            Objective::Ddpm => SamplerName::Ddpm,
        });
        let steps = self.steps.unwrap_or(match objective {
            Objective::Flow => 50,
            Objective::Ddpm => 250,
        });
        match name {
            SamplerName::Euler => SamplerChoice::Euler { steps },
            SamplerName::Heun => SamplerChoice::Heun { steps },
            SamplerName::Dopri5 => SamplerChoice::Dopri5 { atol: self.atol, rtol: self.rtol },
            SamplerName::Ddpm => SamplerChoice::Ddpm { steps },
            SamplerName::Ddim => SamplerChoice::Ddim { steps, eta: self.eta },
        }
    }

    fn routing(&self) -> Result<Routing> {
        let threshold_offset = self.threshold_offset;
        Ok(match self.routing {
            RoutingName::Static if threshold_offset != 0.0 => {
                bail!("--threshold-offset applies to dynamic and per-token routing, not to --routing static")
            }
            RoutingName::Static => Routing::Static,
            RoutingName::Dynamic => Routing::Dynamic { threshold_offset },
            RoutingName::PerToken => Routing::PerToken { threshold_offset },
        })
    }
}

/// Forwards every network call to the compute recorder and moves the bar.
struct Observer<'a> {
    recorder: &'a ComputeRecorder,
    bar: &'a ProgressBar,
}

impl CallObserver<Backend> for Observer<'_> {
    fn observe(
        &self,
        t: &burn::tensor::Tensor<Backend, 1>,
        y: &burn::tensor::Tensor<Backend, 1, burn::tensor::Int>,
        out: &DiTOutput<Backend>,
    ) {
        CallObserver::<Backend>::observe(self.recorder, t, y, out);
        let calls = self.recorder.calls();
        self.bar.set_message(format!("{calls} network calls"));
    }
}

/// Runs `diffmoe sample`.
pub fn run(args: SampleArgs) -> Result<()> {
    let spec = args.device.unwrap_or_else(DeviceSpec::default_for_build);
    let device = spec.device()?;
    let config = match &args.config {
        Some(name) if args.checkpoint.is_dir() => bail!(
            "--config {name}: {} is a run or checkpoint directory, which carries its own config; --config is for weights files",
            args.checkpoint.display()
        ),
        Some(name) => Some(RunConfig::resolve(name)?),
        None => None,
    };
    let source = if args.ema { WeightSource::Ema } else { WeightSource::Model };
    let trained = load_trained::<Backend>(&args.checkpoint, source, config, &device)
        .with_context(|| format!("cannot load a model from {}", args.checkpoint.display()))?;
    let run = &trained.config;
    let m = &run.model;

    let classes: Vec<usize> = if args.classes.is_empty() { (0..m.num_classes).collect() } else { args.classes.clone() };
    if let Some(c) = classes.iter().find(|&&c| c >= m.num_classes) {
        bail!(
            "--classes: class {c} is out of range; {} has {} classes (0 to {})",
            run.name,
            m.num_classes,
            m.num_classes - 1
        );
    }
    if args.per_class == 0 {
        bail!("--per-class must be at least 1");
    }
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let space = SampleSpace::of(run);
    let settings = SampleSettings {
        sampler: args.sampler(run.objective),
        cfg_scale: args.cfg_scale,
        cfg_channels: match args.cfg_channels {
            CfgChannelsName::All => CfgChannels::All,
            CfgChannelsName::Three => CfgChannels::First(3),
        },
        routing: args.routing()?,
        seed: args.seed,
        clip: match space {
            SampleSpace::Pixels => ClipDenoised::UnitRange,
            SampleSpace::Latents => ClipDenoised::Off,
        },
    };
    let generator = Generator::new(&trained.model, run.objective, settings).context("cannot sample this model")?;

    let labels: Vec<usize> = (0..classes.len() * args.per_class).map(|i| classes[i % classes.len()]).collect();
    let out_dir = args.out_dir.clone().unwrap_or_else(|| args.out.with_extension(""));
    if out_dir == args.out {
        bail!(
            "--out-dir {} is the grid file itself; give the grid a .png extension or another --out-dir",
            out_dir.display()
        );
    }
    let shape = [m.in_channels, m.input_size, m.input_size];
    let vae = match (&args.vae, space) {
        (Some(path), SampleSpace::Latents) => {
            let config = match &args.vae_config {
                Some(config) => read_vae_config(config)?,
                None => AutoencoderKlConfig::sd_vae_ft_mse(),
            };
            let vae = load_vae::<Backend>(path, &config, &device)?;
            if config.latent_channels != m.in_channels {
                bail!(
                    "--vae {}: its latents have {} channels, the model's {}",
                    path.display(),
                    config.latent_channels,
                    m.in_channels
                );
            }
            Some((vae, config.downsampling_factor()))
        }
        (Some(path), SampleSpace::Pixels) => {
            bail!("--vae {}: {} samples pixels, there is nothing to decode", path.display(), run.name)
        }
        (None, _) => None,
    };
    let image_shape = match (&vae, space) {
        (Some((_, factor)), _) => Some([3, m.input_size * factor, m.input_size * factor]),
        (None, SampleSpace::Pixels) => Some(shape),
        (None, SampleSpace::Latents) => None,
    };
    let mut writer = SampleWriter::create(&args.out, &out_dir, shape, image_shape, &labels, classes.len())?;
    let bins = args.steps.unwrap_or(50);
    let recorder = ComputeRecorder::new(m, settings.sampler.step_axis(bins));

    eprintln!(
        "sampling {} images of {} ({:?}, {} weights of {}) with {}, cfg {}, {} routing, on {spec}",
        labels.len(),
        run.name,
        run.objective,
        if args.ema { "EMA" } else { "trained" },
        trained.weights.display(),
        describe(settings.sampler),
        args.cfg_scale,
        describe_routing(settings.routing),
    );
    let batches = labels.len().div_ceil(args.batch_size);
    let bar = progress_bar(labels.len() as u64, "images");
    let observer = Observer { recorder: &recorder, bar: &bar };
    let started = Instant::now();
    generator.generate_batches(&labels, args.batch_size, Some(&observer), |first, values| -> Result<()> {
        match (&vae, image_shape) {
            (Some((vae, _)), Some([c, h, w])) => {
                let n = values.len() / shape.iter().product::<usize>();
                let z = Tensor::<Backend, 4>::from_data(
                    TensorData::new(values.clone(), [n, shape[0], shape[1], shape[2]]),
                    &device,
                );
                let decoded: Vec<f32> = vae
                    .decode_latents(z)
                    .into_data()
                    .convert::<f32>()
                    .to_vec()
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                debug_assert_eq!(decoded.len(), n * c * h * w);
                writer.write(&values, Some(&decoded))?;
            }
            (None, Some(_)) => writer.write(&values, Some(&values))?,
            _ => writer.write(&values, None)?,
        }
        let done = first + values.len() / shape.iter().product::<usize>();
        bar.set_position(done as u64);
        if bar.is_hidden() {
            let batch = first / args.batch_size + 1;
            eprintln!("batch {batch}/{batches}: {done} images, {:.1} s", started.elapsed().as_secs_f64());
        }
        Ok(())
    })?;
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let files = writer.finish()?;

    let params = ParamReport::from_config(m);
    let report = recorder.report(&params);
    eprintln!(
        "done: {} images in {seconds:.1} s ({:.2} img/s), {} network calls, {:.1} network evaluations per image",
        files.count,
        files.count as f64 / seconds.max(1e-9),
        report.network_calls,
        report.evaluations as f64 / files.count.max(1) as f64
    );
    eprintln!(
        "activated parameters per token: {:.3} M on average (training capacity: {:.3} M, total {:.3} M)",
        report.activated_parameters_per_token / 1e6,
        report.activated_parameters_at_training_capacity / 1e6,
        params.total as f64 / 1e6
    );
    match &files.grid {
        Some(grid) => eprintln!("grid:    {} ({} samples)", grid.display(), files.grid_tiles),
        None => eprintln!(
            "latent samples ({} channels) are saved raw; pass --vae FILE (the Stable Diffusion VAE, \
             stabilityai/sd-vae-ft-mse) to decode them to images; no grid or PNGs were written",
            m.in_channels
        ),
    }
    if files.images {
        eprintln!("images:  {}/NNNNNN.png", files.dir.display());
    }
    if let Some(path) = &files.image_array {
        eprintln!("arrays:  {} (arr_0 uint8 images, arr_1 labels)", path.display());
    }
    eprintln!("raw:     {} (samples float32, labels)", files.raw.display());
    if let Some(path) = &args.stats {
        write_stats(path, &report, &run.name)?;
    }
    Ok(())
}

/// The JSON report and its two plots (`<stem>-per-step.png`, `<stem>-per-class.png`).
fn write_stats(path: &Path, report: &diffmoe_train::ComputeReport, name: &str) -> Result<()> {
    let json = serde_json::to_vec_pretty(report).expect("a compute report serialises");
    write_atomically(path, &json).with_context(|| format!("cannot write {}", path.display()))?;
    let stem = path.file_stem().unwrap_or_default().to_string_lossy().to_string();
    let sibling = |suffix: &str| path.with_file_name(format!("{stem}-{suffix}.png"));
    let (steps, classes) = (sibling("per-step"), sibling("per-class"));
    plot_per_step(report, &format!("{name}: activated parameters per token by step"), &steps)?;
    plot_per_class(report, &format!("{name}: activated parameters per token by class"), &classes)?;
    eprintln!("stats:   {} (plots {}, {})", path.display(), steps.display(), classes.display());
    Ok(())
}

fn describe(sampler: SamplerChoice) -> String {
    match sampler {
        SamplerChoice::Euler { steps } => format!("euler, {steps} steps"),
        SamplerChoice::Heun { steps } => format!("heun, {steps} steps"),
        SamplerChoice::Dopri5 { atol, rtol } => format!("dopri5, atol {atol:e}, rtol {rtol:e}"),
        SamplerChoice::Ddpm { steps } => format!("ddpm, {steps} respaced steps"),
        SamplerChoice::Ddim { steps, eta } => format!("ddim, {steps} respaced steps, eta {eta}"),
    }
}

fn describe_routing(routing: Routing) -> String {
    match routing {
        Routing::Train | Routing::Static => "static".to_string(),
        Routing::Dynamic { threshold_offset: 0.0 } => "dynamic".to_string(),
        Routing::Dynamic { threshold_offset } => format!("dynamic (threshold offset {threshold_offset:+})"),
        Routing::PerToken { threshold_offset: 0.0 } => "per-token".to_string(),
        Routing::PerToken { threshold_offset } => format!("per-token (threshold offset {threshold_offset:+})"),
    }
}
