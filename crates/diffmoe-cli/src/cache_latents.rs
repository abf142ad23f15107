//! `diffmoe cache-latents`: encodes a folder of images once with the Stable
//! Diffusion VAE into the latent shards that `diffmoe train --data
//! latents:DIR` reads (`diffmoe_train::data::cache_latents`), with a progress
//! bar over the whole cache. Resumable, and safe to run as several processes
//! on one directory.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::ProgressBar;

use diffmoe_train::data::{
    cache_latents, CacheObserver, CachePlan, CacheProgress, ClaimOwner, Coordination, DataSpec, Holder,
    LatentCacheConfig, DEFAULT_BATCH_SIZE, DEFAULT_SHARD_SIZE,
};

use crate::backend::Backend;
use crate::device::DeviceSpec;
use crate::progress::{progress_bar, say};

/// Arguments of `diffmoe cache-latents`.
#[derive(clap::Args, Debug)]
pub struct CacheLatentsArgs {
    /// The images: `folder:DIR` (one subfolder per class), or any pixel
    /// dataset (`idx:PATH`, `embedded`, a path).
    #[arg(long)]
    pub data: String,
    /// The VAE weights: `diffusion_pytorch_model.safetensors` (or `.bin`) of
    /// stabilityai/sd-vae-ft-mse or sd-vae-ft-ema from the Hugging Face hub,
    /// or the LDM `vae-ft-mse-840000-ema-pruned.ckpt` / `.safetensors`.
    #[arg(long)]
    pub vae: PathBuf,
    /// The VAE's diffusers `config.json`, for an architecture other than the
    /// SD VAE's (default: sd-vae-ft-mse's).
    #[arg(long)]
    pub vae_config: Option<PathBuf>,
    /// The size of the ADM centre crop before encoding (256 for ImageNet 256x256).
    #[arg(long)]
    pub image_size: usize,
    /// The cache directory (created if needed; rerun into it to resume).
    #[arg(long)]
    pub out: PathBuf,
    /// Images per shard.
    #[arg(long, default_value_t = DEFAULT_SHARD_SIZE)]
    pub shard_size: usize,
    /// Images per VAE call (each is encoded with its mirror image).
    #[arg(long, default_value_t = DEFAULT_BATCH_SIZE)]
    pub batch_size: usize,
    /// cpu, cuda, cuda:N or wgpu (default: the backend this binary was built with).
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// Threads decoding and cropping images ahead of the VAE (default: one per CPU).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Take only shards i with i % N == I, without claim files: run worker
    /// I/N on each of N machines. Without it, every process claims shards
    /// one at a time, so any number can run on one directory.
    #[arg(long, value_name = "I/N")]
    pub worker: Option<String>,
}

/// The progress bar over the whole cache's images, and one line per shard.
struct Progress {
    bar: ProgressBar,
    device: DeviceSpec,
    shards: usize,
    /// Complete shards when last counted.
    complete: usize,
    /// Images this process encoded, and since when, for its rate.
    encoded: usize,
    since: Instant,
}

impl Progress {
    fn new(device: DeviceSpec) -> Self {
        let bar = progress_bar(0, "images");
        Self { bar, device, shards: 0, complete: 0, encoded: 0, since: Instant::now() }
    }

    /// A line above the bar, or on stderr when there is no terminal to draw on.
    fn say(&self, line: String) {
        say(&self.bar, line);
    }

    fn images_per_second(&self) -> f64 {
        self.encoded as f64 / self.since.elapsed().as_secs_f64().max(1e-9)
    }

    /// Updates the message, and the position when the complete shards were recounted.
    fn show(&mut self, progress: Option<CacheProgress>) {
        if let Some(p) = progress {
            self.complete = p.shards;
            self.bar.set_position(p.examples as u64);
        }
        self.bar.set_message(format!(
            "| {} of {} shards | {:.1} img/s",
            self.complete,
            self.shards,
            self.images_per_second()
        ));
    }
}

impl CacheObserver for Progress {
    fn started(&mut self, plan: &CachePlan) {
        self.shards = plan.shards;
        self.bar.set_length(plan.examples as u64);
        self.show(Some(plan.progress));
        self.bar.reset_eta();
        let [c2, h, w] = plan.moments_shape;
        self.say(format!(
            "caching {} into {}\n{} shards of {} images ({} complete, {} for this process), \
             moments [{c2}, {h}, {w}] per image and per mirror image, VAE {} on {}",
            plan.dataset,
            plan.dir.display(),
            plan.shards,
            plan.shard_size,
            plan.progress.shards,
            plan.assigned,
            plan.vae.file,
            self.device,
        ));
        self.since = Instant::now();
    }

    fn shard_started(&mut self, shard: usize, examples: Range<usize>, took_over: Option<&ClaimOwner>) {
        if let Some(owner) = took_over {
            self.say(format!(
                "shard {shard} (images {}..{}): taking over the claim of {owner}, which is gone",
                examples.start, examples.end
            ));
        }
    }

    fn encoded(&mut self, images: usize) {
        self.encoded += images;
        self.bar.inc(images as u64);
        self.show(None);
    }

    fn shard_written(&mut self, shard: usize, path: &Path, progress: CacheProgress) {
        self.show(Some(progress));
        self.say(format!(
            "wrote {} (shard {shard}; {} of {} shards complete, {:.1} img/s)",
            path.display(),
            progress.shards,
            self.shards,
            self.images_per_second()
        ));
    }
}

/// Runs `diffmoe cache-latents`.
pub fn run(args: CacheLatentsArgs) -> Result<()> {
    let spec = args.device.unwrap_or_else(DeviceSpec::default_for_build);
    let device = spec.device()?;
    let data: DataSpec = args.data.parse().with_context(|| format!("--data {}", args.data))?;
    let mut config = LatentCacheConfig::new(data, args.image_size, args.out.clone(), args.vae.clone());
    config.shard_size = args.shard_size;
    config.batch_size = args.batch_size;
    if let Some(workers) = args.workers {
        config.workers = workers;
    }
    config.vae_config = args.vae_config.clone();
    if let Some(worker) = &args.worker {
        config.coordination = worker.parse::<Coordination>()?;
    }

    let mut progress = Progress::new(spec);
    let summary = cache_latents::<Backend>(&config, &device, &mut progress);
    progress.bar.finish_and_clear();
    let summary = summary.with_context(|| format!("cache-latents into {} stopped", args.out.display()))?;

    let rate = progress.images_per_second();
    eprintln!(
        "done: wrote {} shards ({} images, {rate:.1} img/s); the cache has {} of {} shards ({} of {} images)",
        summary.written.len(),
        summary.encoded,
        summary.progress.shards,
        summary.shards,
        summary.progress.examples,
        summary.examples,
    );
    if summary.is_complete() {
        eprintln!("complete: train on it with --data latents:{}", summary.dir.display());
        return Ok(());
    }
    for held in &summary.held {
        match held.holder {
            Holder::Running => eprintln!("shard {} is being written by {}", held.shard, held.owner),
            Holder::Unverifiable => eprintln!(
                "shard {} is claimed by {}, which cannot be checked from here; if that process died, \
                 delete {} and rerun",
                held.shard,
                held.owner,
                held.claim.display()
            ),
        }
    }
    if let Coordination::Worker { index, count } = config.coordination {
        eprintln!("worker {index}/{count} is done; the other workers' shards are theirs to write");
    }
    eprintln!("incomplete: rerun the same command to finish (or wait for the other processes)");
    Ok(())
}
