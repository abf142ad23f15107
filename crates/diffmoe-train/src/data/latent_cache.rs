//! `cache-latents`: encodes a dataset of images once with the Stable
//! Diffusion VAE into `diffmoe-latents-v1` shards (see `latent_shards.rs`
//! and `docs/data.md`), so that latent training draws posterior samples from
//! disk instead of running the VAE at every step as the official `train.py`
//! does (`vae.encode(x).latent_dist.sample().mul_(0.18215)`).
//!
//! Every image is prepared exactly as pixel training prepares it (the
//! dataset's own conversion: ADM `center_crop_arr` to `image_size`, RGB,
//! `x / 127.5 - 1`), then it and its horizontal mirror (`RandomHorizontalFlip`)
//! are encoded, and their posterior moments (`latent_dist.parameters`: the
//! mean channels, then the log-variance channels) are stored as `moments`
//! and `moments_flipped`.
//!
//! The cache is deterministic and resumable: shard `i` holds examples
//! `[i * shard_size, (i + 1) * shard_size)` of the dataset's fixed order,
//! shards appear only complete (written to a temporary file, fsynced,
//! renamed), a shard that exists is never redone, and the directory's
//! manifest (`cache_manifest.rs`) makes a rerun with other settings an
//! error. Several processes can fill one directory at once: each claims a
//! shard before encoding it (`shard_claim.rs`), or takes its share of a
//! fixed `--worker I/N` split.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use burn::tensor::{backend::Backend, Tensor, TensorData};
use diffmoe_vae::{downsampled_size, AutoencoderKl, AutoencoderKlConfig, SCALING_FACTOR};

use super::cache_error::CacheError;
use super::cache_manifest::{CacheManifest, CACHE_FORMAT};
use super::shard_claim::{sweep_claims, try_claim, ClaimAttempt, ClaimOwner, Holder};
use super::vae_file::{identify_vae_file, load_vae, read_vae_config, VaeIdentity};
use super::{
    open_dataset, write_latent_shard, Augment, DataError, DataSpec, Dataset, ImageShape, LatentShardMeta, Moments,
};

/// Examples per shard unless told otherwise: ImageNet's 1.28 M images make
/// 1282 shards of 65 MB each at 256x256 (8 x 32 x 32 f32 moments, twice).
pub const DEFAULT_SHARD_SIZE: usize = 1000;

/// Images per VAE call unless told otherwise (each is encoded with its
/// mirror, so the VAE sees twice as many).
pub const DEFAULT_BATCH_SIZE: usize = 16;

/// Batches a preparation thread may hold finished before the encoder takes them.
const PREFETCH_PER_WORKER: usize = 2;

/// The RGB channels the VAE encodes.
const IMAGE_CHANNELS: usize = 3;

/// How the processes that fill one cache directory share its shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coordination {
    /// Every shard is claimed with a claim file before it is encoded, so any
    /// number of processes, on any hosts sharing the directory, can run.
    Claims,
    /// Only shards `i` with `i % count == index`, without claim files: one
    /// process per index, e.g. one per machine.
    Worker { index: usize, count: usize },
}

impl FromStr for Coordination {
    type Err = CacheError;

    /// Parses `I/N` (worker `I` of `N`, `I < N`).
    fn from_str(s: &str) -> Result<Self, CacheError> {
        let invalid = || CacheError::Setting {
            field: "worker",
            value: s.to_string(),
            allowed: "I/N with N >= 1 and 0 <= I < N, e.g. 0/4".to_string(),
        };
        let (index, count) = s.split_once('/').ok_or_else(invalid)?;
        let (index, count) = (
            index.trim().parse::<usize>().map_err(|_| invalid())?,
            count.trim().parse::<usize>().map_err(|_| invalid())?,
        );
        if count == 0 || index >= count {
            return Err(invalid());
        }
        Ok(Coordination::Worker { index, count })
    }
}

impl std::fmt::Display for Coordination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Coordination::Claims => f.write_str("claims"),
            Coordination::Worker { index, count } => write!(f, "worker {index}/{count}"),
        }
    }
}

/// What to cache, where, and how.
#[derive(Clone, Debug)]
pub struct LatentCacheConfig {
    /// The images: `folder:DIR` or any other pixel dataset.
    pub data: DataSpec,
    /// The size of the ADM centre crop before encoding (256 for the paper's ImageNet).
    pub image_size: usize,
    /// The cache directory; created if needed.
    pub out: PathBuf,
    /// Examples per shard.
    pub shard_size: usize,
    /// Images per VAE call.
    pub batch_size: usize,
    /// Threads decoding and cropping images ahead of the VAE; 0 does it on
    /// the calling thread.
    pub workers: usize,
    /// The VAE weight file (see `vae_file.rs`).
    pub vae: PathBuf,
    /// The VAE's diffusers `config.json`; `None` is `stabilityai/sd-vae-ft-mse`'s architecture.
    pub vae_config: Option<PathBuf>,
    /// How concurrent processes share the shards.
    pub coordination: Coordination,
}

impl LatentCacheConfig {
    /// The defaults: shards of [`DEFAULT_SHARD_SIZE`], batches of
    /// [`DEFAULT_BATCH_SIZE`], one preparation thread per CPU, the SD VAE
    /// architecture, claims.
    pub fn new(data: DataSpec, image_size: usize, out: PathBuf, vae: PathBuf) -> Self {
        LatentCacheConfig {
            data,
            image_size,
            out,
            shard_size: DEFAULT_SHARD_SIZE,
            batch_size: DEFAULT_BATCH_SIZE,
            workers: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            vae,
            vae_config: None,
            coordination: Coordination::Claims,
        }
    }

    fn validate(&self) -> Result<(), CacheError> {
        let at_least_one = |field: &'static str, value: usize| {
            if value == 0 {
                return Err(CacheError::Setting { field, value: "0".into(), allowed: "at least 1".into() });
            }
            Ok(())
        };
        at_least_one("image_size", self.image_size)?;
        at_least_one("shard_size", self.shard_size)?;
        at_least_one("batch_size", self.batch_size)?;
        if let Coordination::Worker { index, count } = self.coordination {
            if count == 0 || index >= count {
                return Err(CacheError::Setting {
                    field: "worker",
                    value: format!("{index}/{count}"),
                    allowed: "I/N with N >= 1 and 0 <= I < N".into(),
                });
            }
        }
        Ok(())
    }
}

/// What a run is about to do, for progress displays.
#[derive(Clone, Debug)]
pub struct CachePlan {
    /// The dataset, in words.
    pub dataset: String,
    /// The cache directory.
    pub dir: PathBuf,
    /// Images in the dataset.
    pub examples: usize,
    /// Classes of the dataset.
    pub num_classes: usize,
    /// Shards of the whole cache.
    pub shards: usize,
    /// Examples per shard.
    pub shard_size: usize,
    /// Shards this process may write (all, or its worker's share).
    pub assigned: usize,
    /// The cache's progress when the run starts.
    pub progress: CacheProgress,
    /// `[2 * latent_channels, h, w]`: the moments of one image.
    pub moments_shape: [usize; 3],
    /// The VAE file.
    pub vae: VaeIdentity,
}

/// How much of a cache exists, whoever wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheProgress {
    /// Complete shards.
    pub shards: usize,
    /// The examples they hold.
    pub examples: usize,
}

/// Callbacks of [`cache_latents`] for progress displays; all do nothing by default.
pub trait CacheObserver {
    /// The settings are checked, the VAE loaded, encoding begins.
    fn started(&mut self, _plan: &CachePlan) {}
    /// This process has claimed shard `shard`, examples `examples`;
    /// `took_over` is the owner of a claim left by a process that is gone.
    fn shard_started(&mut self, _shard: usize, _examples: Range<usize>, _took_over: Option<&ClaimOwner>) {}
    /// `images` more images (each with its mirror) went through the VAE.
    fn encoded(&mut self, _images: usize) {}
    /// Shard `shard` is on disk at `path`; `progress` counts every complete shard now.
    fn shard_written(&mut self, _shard: usize, _path: &Path, _progress: CacheProgress) {}
}

/// No progress display.
impl CacheObserver for () {}

/// What a run did, and what is left.
#[derive(Clone, Debug)]
pub struct CacheSummary {
    /// The cache directory.
    pub dir: PathBuf,
    /// Shards of the whole cache.
    pub shards: usize,
    /// Images of the whole cache.
    pub examples: usize,
    /// The shards this run wrote, in order.
    pub written: Vec<usize>,
    /// Images this run encoded.
    pub encoded: usize,
    /// The cache when the run ended.
    pub progress: CacheProgress,
    /// Shards that other processes held when this run came to them.
    pub held: Vec<HeldShard>,
}

/// A shard another process held when this run came to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldShard {
    /// The shard index.
    pub shard: usize,
    /// Who holds it.
    pub owner: ClaimOwner,
    /// The claim file, to delete by hand if its owner died on another host.
    pub claim: PathBuf,
    /// Whether the holder is known to run.
    pub holder: Holder,
}

impl CacheSummary {
    /// Whether every shard of the cache exists.
    pub fn is_complete(&self) -> bool {
        self.progress.shards == self.shards
    }
}

/// The file of shard `index` of `shards`: `shard-00007.safetensors`, with
/// at least five digits and as many as the largest index needs, so that the
/// name order that training reads is the index order.
pub fn shard_file_name(index: usize, shards: usize) -> String {
    let width = shards.saturating_sub(1).to_string().len().max(5);
    format!("shard-{index:0width$}.safetensors")
}

/// The examples of shard `index`.
fn shard_examples(index: usize, shard_size: usize, examples: usize) -> Range<usize> {
    index * shard_size..((index + 1) * shard_size).min(examples)
}

/// `[2 * latent_channels, h, w]` for `image_size` pixels: each level but the
/// last halves the size, rounding down as `Downsample2D` does.
fn moments_shape(config: &AutoencoderKlConfig, image_size: usize) -> Result<[usize; 3], CacheError> {
    let levels = config.block_out_channels.len();
    let mut size = image_size;
    for _ in 1..levels {
        if size < 2 {
            return Err(CacheError::Setting {
                field: "image_size",
                value: image_size.to_string(),
                allowed: format!("at least {} for a VAE with {levels} levels", 1usize << (levels - 1)),
            });
        }
        size = downsampled_size(size);
    }
    Ok([2 * config.latent_channels, size, size])
}

/// Opens the images of `spec` as training would at `image_size` in RGB,
/// with the data specification written with an absolute path.
fn open_images(spec: &DataSpec, image_size: usize) -> Result<(Arc<dyn Dataset>, DataSpec), CacheError> {
    if let DataSpec::Latents(_) = spec {
        return Err(CacheError::NotPixels { spec: spec.to_string() });
    }
    let target = ImageShape { channels: IMAGE_CHANNELS, height: image_size, width: image_size };
    let dataset = open_dataset(spec, target)?;
    let absolute = |path: &Path| std::fs::canonicalize(path).map_err(|e| CacheError::io(path, e));
    let canonical = match spec {
        DataSpec::Idx(path) => DataSpec::Idx(absolute(path)?),
        DataSpec::ImageFolder(path) => DataSpec::ImageFolder(absolute(path)?),
        other => other.clone(),
    };
    Ok((dataset, canonical))
}

/// The pixels and labels of a run of consecutive examples.
struct Prepared {
    /// `[n, 3, image_size, image_size]`, in [-1, 1].
    pixels: Vec<f32>,
    /// `[n]`.
    labels: Vec<i64>,
}

/// Decodes and converts examples `range` as training does, unflipped.
fn prepare(dataset: &dyn Dataset, range: Range<usize>) -> Result<Prepared, DataError> {
    let mut pixels = Vec::with_capacity(range.len() * dataset.shape().numel());
    let mut labels = Vec::with_capacity(range.len());
    for index in range {
        let example = dataset.get(index, Augment::default())?;
        pixels.extend_from_slice(&example.image);
        labels.push(example.label as i64);
    }
    Ok(Prepared { pixels, labels })
}

/// The moments of one shard, filled batch by batch.
struct EncodedShard {
    /// `[n, 2C, h, w]`.
    moments: Vec<f32>,
    /// `[n, 2C, h, w]`, of the mirrored images.
    flipped: Vec<f32>,
    /// `[n]`.
    labels: Vec<i64>,
}

/// Encodes a batch and its mirror image in one VAE call and appends both
/// moments to `shard`.
///
/// # Shapes
/// - `prepared.pixels`: `[n, 3, image_size, image_size]`; appends
///   `[n, moments_shape...]` to `shard.moments` and `shard.flipped`
///
/// # Panics
/// If the VAE's output is not `[2n, moments_shape...]`.
fn encode_batch<B: Backend>(
    vae: &AutoencoderKl<B>,
    prepared: Prepared,
    image_size: usize,
    moments_shape: [usize; 3],
    device: &B::Device,
    shard: &mut EncodedShard,
) {
    let n = prepared.labels.len();
    let data = TensorData::new(prepared.pixels, [n, IMAGE_CHANNELS, image_size, image_size]);
    let images = Tensor::<B, 4>::from_data(data, device); // [n, 3, S, S]
    let mirrored = images.clone().flip([3]); // [n, 3, S, S], left-right
    let moments = vae.encode(Tensor::cat(vec![images, mirrored], 0)); // [2n, 2C, h, w]
    let [c2, h, w] = moments_shape;
    assert_eq!(moments.dims(), [2 * n, c2, h, w], "the VAE's moments have an unexpected shape");
    let values = moments.into_data().convert::<f32>().to_vec::<f32>().expect("converted to f32");
    let (straight, flipped) = values.split_at(n * c2 * h * w);
    shard.moments.extend_from_slice(straight);
    shard.flipped.extend_from_slice(flipped);
    shard.labels.extend_from_slice(&prepared.labels);
}

/// Everything one shard's encoding needs besides the examples.
struct Encoder<'a, B: Backend> {
    dataset: &'a dyn Dataset,
    vae: &'a AutoencoderKl<B>,
    image_size: usize,
    moments_shape: [usize; 3],
    batch_size: usize,
    workers: usize,
    device: &'a B::Device,
}

impl<B: Backend> Encoder<'_, B> {
    /// Encodes `examples`; `workers` threads prepare batches ahead of the VAE.
    fn shard(&self, examples: Range<usize>, observer: &mut dyn CacheObserver) -> Result<EncodedShard, CacheError> {
        let batches: Vec<Range<usize>> = examples
            .clone()
            .step_by(self.batch_size)
            .map(|start| start..(start + self.batch_size).min(examples.end))
            .collect();
        let mut shard = EncodedShard { moments: Vec::new(), flipped: Vec::new(), labels: Vec::new() };
        let mut encode = |prepared: Prepared| {
            let n = prepared.labels.len();
            encode_batch(self.vae, prepared, self.image_size, self.moments_shape, self.device, &mut shard);
            observer.encoded(n);
        };
        if self.workers == 0 {
            for batch in batches {
                encode(prepare(self.dataset, batch)?);
            }
            return Ok(shard);
        }
        let workers = self.workers.min(batches.len().max(1));
        std::thread::scope(|scope| -> Result<(), CacheError> {
            let mut receivers: Vec<Receiver<Result<Prepared, DataError>>> = Vec::with_capacity(workers);
            let mut handles = Vec::with_capacity(workers);
            for worker in 0..workers {
                let (sender, receiver) = sync_channel(PREFETCH_PER_WORKER);
                let mine: Vec<Range<usize>> = batches.iter().skip(worker).step_by(workers).cloned().collect();
                let dataset = self.dataset;
                handles.push(scope.spawn(move || {
                    for batch in mine {
                        // The encoder stopped (an error): nobody reads further batches.
                        if sender.send(prepare(dataset, batch)).is_err() {
                            break;
                        }
                    }
                }));
                receivers.push(receiver);
            }
            let mut result = Ok(());
            for index in 0..batches.len() {
                let worker = index % workers;
                // A channel closes early only if its thread panicked (in a `Dataset::get`).
                let stopped = DataError::WorkerStopped { worker, batch: index as u64 };
                match receivers[worker].recv().unwrap_or(Err(stopped)) {
                    Ok(prepared) => encode(prepared),
                    Err(e) => {
                        result = Err(e.into());
                        break;
                    }
                }
            }
            // Unblock and join the threads; a panic is already reported as `WorkerStopped`.
            drop(receivers);
            for handle in handles {
                let _ = handle.join();
            }
            result
        })?;
        Ok(shard)
    }
}

/// Counts the complete shards of the cache.
fn progress(dir: &Path, shards: usize, shard_size: usize, examples: usize) -> CacheProgress {
    let mut progress = CacheProgress { shards: 0, examples: 0 };
    for index in 0..shards {
        if dir.join(shard_file_name(index, shards)).exists() {
            progress.shards += 1;
            progress.examples += shard_examples(index, shard_size, examples).len();
        }
    }
    progress
}

/// Encodes the images of `config.data` into the latent cache `config.out`,
/// doing only the shards that are missing and not claimed by another live
/// process (or, with `Coordination::Worker`, only this worker's share).
///
/// Order: the settings, the dataset and the VAE file are checked against the
/// directory's manifest before the VAE is loaded, and the manifest is
/// created only once the VAE has loaded, so a wrong file records nothing.
pub fn cache_latents<B: Backend>(
    config: &LatentCacheConfig,
    device: &B::Device,
    observer: &mut dyn CacheObserver,
) -> Result<CacheSummary, CacheError> {
    config.validate()?;
    let (dataset, data) = open_images(&config.data, config.image_size)?;
    let vae_config = match &config.vae_config {
        Some(path) => read_vae_config(path)?,
        None => AutoencoderKlConfig::sd_vae_ft_mse(),
    };
    let moments_shape = moments_shape(&vae_config, config.image_size)?;
    let requested = CacheManifest {
        format: CACHE_FORMAT.to_string(),
        data: data.to_string(),
        examples: dataset.len(),
        num_classes: dataset.num_classes(),
        image_size: config.image_size,
        shard_size: config.shard_size,
        vae: identify_vae_file(&config.vae)?,
        vae_config: serde_json::to_value(&vae_config).expect("a config serialises"),
    };
    let dir = &config.out;
    requested.precheck(dir)?;
    let vae = load_vae::<B>(&config.vae, &vae_config, device)?;
    let manifest = requested.create_or_check(dir)?;

    let (examples, shard_size) = (manifest.examples, manifest.shard_size);
    let shards = examples.div_ceil(shard_size);
    let complete = |stem: &str| dir.join(format!("{stem}.safetensors")).exists();
    sweep_claims(dir, &complete)?;
    let assigned: Vec<usize> = match config.coordination {
        Coordination::Claims => (0..shards).collect(),
        Coordination::Worker { index, count } => (0..shards).filter(|i| i % count == index).collect(),
    };
    observer.started(&CachePlan {
        dataset: dataset.describe(),
        dir: dir.clone(),
        examples,
        num_classes: manifest.num_classes,
        shards,
        shard_size,
        assigned: assigned.len(),
        progress: progress(dir, shards, shard_size, examples),
        moments_shape,
        vae: manifest.vae.clone(),
    });

    let meta = LatentShardMeta {
        scale_factor: SCALING_FACTOR,
        num_classes: manifest.num_classes,
        image_size: manifest.image_size,
        vae: Some(manifest.vae.file.clone()),
    };
    let encoder = Encoder {
        dataset: dataset.as_ref(),
        vae: &vae,
        image_size: config.image_size,
        moments_shape,
        batch_size: config.batch_size,
        workers: config.workers,
        device,
    };
    let me = ClaimOwner::this_process();
    let mut summary = CacheSummary {
        dir: dir.clone(),
        shards,
        examples,
        written: Vec::new(),
        encoded: 0,
        progress: CacheProgress { shards: 0, examples: 0 },
        held: Vec::new(),
    };
    for index in assigned {
        let path = dir.join(shard_file_name(index, shards));
        let range = shard_examples(index, shard_size, examples);
        let claim = match config.coordination {
            Coordination::Claims => match try_claim(&path, &me)? {
                ClaimAttempt::Done => continue,
                ClaimAttempt::Held { owner, path, holder } => {
                    summary.held.push(HeldShard { shard: index, owner, claim: path, holder });
                    continue;
                }
                ClaimAttempt::Claimed { claim, took_over } => {
                    observer.shard_started(index, range.clone(), took_over.as_ref());
                    Some(claim)
                }
            },
            Coordination::Worker { .. } if path.exists() => continue,
            Coordination::Worker { .. } => {
                observer.shard_started(index, range.clone(), None);
                None
            }
        };
        let shard = encoder.shard(range.clone(), observer)?;
        let shape = [range.len(), moments_shape[0], moments_shape[1], moments_shape[2]];
        write_latent_shard(
            &path,
            Moments { values: &shard.moments, shape },
            Some(Moments { values: &shard.flipped, shape }),
            &shard.labels,
            &meta,
        )?;
        if let Some(claim) = claim {
            claim.finish();
        }
        summary.written.push(index);
        summary.encoded += range.len();
        observer.shard_written(index, &path, progress(dir, shards, shard_size, examples));
    }
    summary.progress = progress(dir, shards, shard_size, examples);
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_dir;
    use burn::backend::Flex;
    use diffmoe_vae::{DownBlockType, UpBlockType};
    use safetensors::SafeTensors;

    use super::super::vae_file::write_procedural_vae;

    type B = Flex;

    /// Moments of the same image encoded alone or in a batch of ten differ
    /// by float reassociation only.
    const BATCH_TOLERANCE: f32 = 1e-4;

    /// A two-level VAE (latents at half the image size), 4 groups.
    fn tiny_vae() -> AutoencoderKlConfig {
        AutoencoderKlConfig::new(
            vec![DownBlockType::DownEncoderBlock2D; 2],
            vec![UpBlockType::UpDecoderBlock2D; 2],
            vec![8, 16],
        )
        .with_norm_num_groups(4)
        .with_layers_per_block(1)
    }

    /// A folder of `per_class` PNGs in each of two classes, each a distinct,
    /// left-right asymmetric gradient of a size other than 16x16, and a VAE
    /// with its config file.
    struct Fixture {
        root: PathBuf,
        images: PathBuf,
        vae: PathBuf,
        vae_config: PathBuf,
    }

    impl Fixture {
        fn new(name: &str, per_class: u32) -> Self {
            let root = test_dir(name);
            let images = root.join("images");
            for (label, class) in ["a_cats", "b_dogs"].iter().enumerate() {
                std::fs::create_dir_all(images.join(class)).unwrap();
                for i in 0..per_class {
                    let k = label as u32 * 7 + i * 3;
                    let image = image::RgbImage::from_fn(20 + i, 18, |x, y| {
                        image::Rgb([(x * 12 + k * 9) as u8, (y * 13 + x * x) as u8, (k * 40 + x * y) as u8])
                    });
                    image.save(images.join(class).join(format!("{i}.png"))).unwrap();
                }
            }
            let vae = root.join("vae.safetensors");
            write_procedural_vae::<B>(&tiny_vae(), &vae, 11).unwrap();
            let vae_config = root.join("config.json");
            std::fs::write(&vae_config, serde_json::to_string(&tiny_vae()).unwrap()).unwrap();
            Fixture { root, images, vae, vae_config }
        }

        fn config(&self, out: &str, shard_size: usize) -> LatentCacheConfig {
            let mut config = LatentCacheConfig::new(
                DataSpec::ImageFolder(self.images.clone()),
                16,
                self.root.join(out),
                self.vae.clone(),
            );
            config.shard_size = shard_size;
            config.batch_size = 3;
            config.workers = 2;
            config.vae_config = Some(self.vae_config.clone());
            config
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    fn run(config: &LatentCacheConfig) -> Result<CacheSummary, CacheError> {
        cache_latents::<B>(config, &Default::default(), &mut ())
    }

    fn f32s(tensors: &SafeTensors<'_>, name: &str) -> (Vec<usize>, Vec<f32>) {
        let view = tensors.tensor(name).unwrap();
        let values = view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        (view.shape().to_vec(), values)
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// Equal tensors bit for bit and equal metadata (whose order in the
    /// safetensors header is not fixed, so the bytes may differ).
    fn assert_same_shard(a: &Path, b: &Path) {
        let (a_bytes, b_bytes) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
        let (ta, tb) = (SafeTensors::deserialize(&a_bytes).unwrap(), SafeTensors::deserialize(&b_bytes).unwrap());
        let mut names = ta.names();
        names.sort();
        for name in &names {
            assert!(ta.tensor(name).unwrap().data() == tb.tensor(name).unwrap().data(), "{}: {name}", a.display());
        }
        assert_eq!(names.len(), tb.names().len());
        let meta = |bytes: &[u8]| SafeTensors::read_metadata(bytes).unwrap().1.metadata().clone();
        assert_eq!(meta(&a_bytes), meta(&b_bytes), "{}", a.display());
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn shards_hold_the_moments_of_each_image_and_its_mirror() {
        let fixture = Fixture::new("cache-contents", 5);
        let config = fixture.config("cache", 4);
        let summary = run(&config).unwrap();
        assert_eq!((summary.shards, summary.examples, summary.encoded), (3, 10, 10));
        assert_eq!(summary.written, [0, 1, 2]);
        assert!(summary.is_complete() && summary.held.is_empty());
        assert_eq!(
            files(&config.out),
            ["cache.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
        );

        // Reference: each image prepared by the dataset, flipped or not, encoded alone.
        let target = ImageShape { channels: 3, height: 16, width: 16 };
        let images = open_dataset(&config.data, target).unwrap();
        let vae = load_vae::<B>(&fixture.vae, &tiny_vae(), &Default::default()).unwrap();
        let encode_one = |index: usize, flip: bool| -> Vec<f32> {
            let example = images.get(index, Augment { flip, seed: 0 }).unwrap();
            let x = Tensor::<B, 4>::from_data(TensorData::new(example.image, [1, 3, 16, 16]), &Default::default());
            vae.encode(x).into_data().to_vec().unwrap()
        };
        for shard in 0..3 {
            let bytes = std::fs::read(config.out.join(shard_file_name(shard, 3))).unwrap();
            let tensors = SafeTensors::deserialize(&bytes).unwrap();
            let n = if shard == 2 { 2 } else { 4 };
            let (shape, moments) = f32s(&tensors, "moments");
            assert_eq!(shape, [n, 8, 8, 8]);
            let (flipped_shape, flipped) = f32s(&tensors, "moments_flipped");
            assert_eq!(flipped_shape, shape);
            let labels: Vec<i64> = tensors
                .tensor("labels")
                .unwrap()
                .data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect();
            let expected: Vec<i64> = (shard * 4..shard * 4 + n).map(|i| (i / 5) as i64).collect();
            assert_eq!(labels, expected);
            let per = 8 * 8 * 8;
            for local in 0..n {
                let index = shard * 4 + local;
                let slot = local * per..(local + 1) * per;
                assert!(max_diff(&moments[slot.clone()], &encode_one(index, false)) < BATCH_TOLERANCE);
                assert!(max_diff(&flipped[slot.clone()], &encode_one(index, true)) < BATCH_TOLERANCE);
                assert!(max_diff(&moments[slot.clone()], &flipped[slot]) > 1e-3, "the images are asymmetric");
            }
            let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
            let metadata = header.metadata().clone().unwrap();
            assert_eq!(metadata["scale_factor"], "0.18215");
            assert_eq!((metadata["num_classes"].as_str(), metadata["image_size"].as_str()), ("2", "16"));
            assert_eq!(metadata["vae"], "vae.safetensors");
        }

        // Training's latent dataset reads the cache.
        let latents =
            open_dataset(&DataSpec::Latents(config.out.clone()), ImageShape { channels: 4, height: 8, width: 8 })
                .unwrap();
        assert_eq!((latents.len(), latents.num_classes()), (10, 2));
        assert!(latents.describe().contains("3 with flips"), "{}", latents.describe());
        assert_eq!(latents.get(7, Augment { flip: true, seed: 1 }).unwrap().label, 1);

        // Without preparation threads the shards are the same.
        let mut inline = fixture.config("inline", 4);
        inline.workers = 0;
        run(&inline).unwrap();
        for shard in 0..3 {
            let name = shard_file_name(shard, 3);
            assert_same_shard(&inline.out.join(&name), &config.out.join(&name));
        }
    }

    #[test]
    fn a_rerun_does_only_the_missing_shards() {
        let fixture = Fixture::new("cache-resume", 3);
        let config = fixture.config("cache", 2);
        run(&config).unwrap();
        let name = |i| config.out.join(shard_file_name(i, 3));
        let before = fixture.root.join("before");
        std::fs::create_dir(&before).unwrap();
        for i in 0..3 {
            std::fs::copy(name(i), before.join(shard_file_name(i, 3))).unwrap();
        }
        let untouched = std::fs::metadata(name(0)).unwrap().modified().unwrap();

        // Killed while writing shard 1 (its temporary file and claim are
        // left behind), and shard 2 lost.
        std::fs::rename(name(1), config.out.join("shard-00001.safetensors.tmp")).unwrap();
        std::fs::remove_file(name(2)).unwrap();
        let gone = {
            let mut child = std::process::Command::new("true").spawn().unwrap();
            let pid = child.id();
            child.wait().unwrap();
            pid
        };
        let claim = ClaimOwner { pid: gone, process_start: None, ..ClaimOwner::this_process() };
        std::fs::write(config.out.join("shard-00001.claim-0"), serde_json::to_vec(&claim).unwrap()).unwrap();

        struct Seen(Vec<(usize, Option<ClaimOwner>)>);
        impl CacheObserver for Seen {
            fn shard_started(&mut self, shard: usize, _: Range<usize>, took_over: Option<&ClaimOwner>) {
                self.0.push((shard, took_over.cloned()));
            }
        }
        let mut seen = Seen(Vec::new());
        let summary = cache_latents::<B>(&config, &Default::default(), &mut seen).unwrap();
        assert_eq!(summary.written, [1, 2]);
        assert_eq!(seen.0, [(1, Some(claim)), (2, None)]);
        assert!(summary.is_complete());
        for i in 0..3 {
            assert_same_shard(&name(i), &before.join(shard_file_name(i, 3)));
        }
        assert_eq!(std::fs::metadata(name(0)).unwrap().modified().unwrap(), untouched, "shard 0 is not redone");
        assert_eq!(files(&config.out).len(), 4, "no claim or temporary file is left: {:?}", files(&config.out));

        // A complete cache: nothing to do.
        let summary = run(&config).unwrap();
        assert!(summary.written.is_empty() && summary.is_complete());
    }

    #[test]
    fn a_rerun_with_other_settings_is_refused() {
        let fixture = Fixture::new("cache-mismatch", 2);
        let config = fixture.config("cache", 2);
        run(&config).unwrap();
        let refused = |config: LatentCacheConfig, setting: &str| {
            let e = run(&config).unwrap_err();
            assert!(matches!(&e, CacheError::Mismatch { setting: s, .. } if s.starts_with(setting)), "{e}");
            assert!(e.to_string().contains("cache.json"), "{e}");
        };
        refused(LatentCacheConfig { image_size: 8, ..config.clone() }, "image_size");
        refused(LatentCacheConfig { shard_size: 3, ..config.clone() }, "shard_size");
        let other_vae = fixture.root.join("other.safetensors");
        write_procedural_vae::<B>(&tiny_vae(), &other_vae, 12).unwrap();
        refused(LatentCacheConfig { vae: other_vae, ..config.clone() }, "vae");
        image::RgbImage::new(16, 16).save(fixture.images.join("b_dogs").join("9.png")).unwrap();
        refused(config.clone(), "examples");
        assert_eq!(files(&config.out).len(), 3, "nothing was written: {:?}", files(&config.out));

        // A missing VAE names the file and what to bring; latents are not images.
        let e =
            run(&LatentCacheConfig { vae: fixture.root.join("missing.safetensors"), ..config.clone() }).unwrap_err();
        assert!(e.to_string().contains("missing.safetensors") && e.to_string().contains("sd-vae-ft-mse"), "{e}");
        let e = run(&LatentCacheConfig { data: DataSpec::Latents(config.out.clone()), ..config.clone() }).unwrap_err();
        assert!(matches!(e, CacheError::NotPixels { .. }), "{e}");
        assert!(matches!("3/3".parse::<Coordination>(), Err(CacheError::Setting { field: "worker", .. })));
    }

    #[test]
    fn racing_processes_write_every_shard_exactly_once() {
        let fixture = Fixture::new("cache-race", 4);
        let config = fixture.config("cache", 1);
        // Several rounds on fresh directories, so that the racers meet at
        // different points of the claim protocol.
        for round in 0..4 {
            let out = fixture.root.join(format!("race-{round}"));
            let config = LatentCacheConfig { out, ..config.clone() };
            let racers = 3;
            let barrier = std::sync::Barrier::new(racers);
            let summaries: Vec<CacheSummary> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..racers)
                    .map(|_| {
                        scope.spawn(|| {
                            barrier.wait();
                            run(&config).unwrap()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let mut written: Vec<usize> = summaries.iter().flat_map(|s| s.written.clone()).collect();
            written.sort();
            assert_eq!(written, (0..8).collect::<Vec<_>>(), "each shard written exactly once: {summaries:?}");
            assert_eq!(files(&config.out).len(), 9, "no claim is left: {:?}", files(&config.out));
            // A racer that finished while another still wrote saw an
            // incomplete cache; once all are done it is complete.
            let after = run(&config).unwrap();
            assert!(after.is_complete() && after.written.is_empty() && after.held.is_empty());
            let latents =
                open_dataset(&DataSpec::Latents(config.out.clone()), ImageShape { channels: 4, height: 8, width: 8 });
            assert_eq!(latents.unwrap().len(), 8);
        }
        let config = LatentCacheConfig { out: fixture.root.join("race-0"), ..config };

        // The same cache, split between two workers without claims.
        for worker in ["1/2", "0/2"] {
            let split = LatentCacheConfig {
                coordination: worker.parse().unwrap(),
                out: fixture.root.join("split"),
                ..config.clone()
            };
            let summary = run(&split).unwrap();
            let share: Vec<usize> = if worker == "1/2" { vec![1, 3, 5, 7] } else { vec![0, 2, 4, 6] };
            assert_eq!(summary.written, share);
            assert_eq!(summary.is_complete(), worker == "0/2");
        }
        for shard in 0..8 {
            let name = shard_file_name(shard, 8);
            assert_same_shard(&fixture.root.join("split").join(&name), &config.out.join(&name));
        }
    }

    #[test]
    fn shard_names_sort_in_index_order() {
        assert_eq!(shard_file_name(7, 10), "shard-00007.safetensors");
        assert_eq!(shard_file_name(7, 200_000), "shard-000007.safetensors");
        assert!(shard_file_name(99_999, 200_000) < shard_file_name(100_000, 200_000));
        assert_eq!(moments_shape(&AutoencoderKlConfig::sd_vae_ft_mse(), 256).unwrap(), [8, 32, 32]);
        assert!(matches!(moments_shape(&AutoencoderKlConfig::sd_vae_ft_mse(), 3), Err(CacheError::Setting { .. })));
        assert_eq!("2/4".parse::<Coordination>().unwrap(), Coordination::Worker { index: 2, count: 4 });
    }
}
