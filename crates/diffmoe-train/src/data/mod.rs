//! The training data pipeline: datasets of pixels (the embedded
//! Fashion-MNIST test split, MNIST-style IDX files, folders of images) or of
//! pre-computed VAE latents, converted to the model's input shape the way the
//! official `train.py` does (ADM centre crop, random horizontal flip,
//! `Normalize(0.5)`), and a deterministic multi-threaded loader whose batch
//! `b` depends only on the seed and `b`, so that a resumed run sees exactly
//! the batches it would have seen. The formats and guarantees are written up
//! in `docs/data.md`.

mod cache_error;
mod cache_manifest;
mod embedded;
mod error;
mod idx;
mod image_folder;
mod latent_cache;
mod latent_shards;
mod loader;
mod shard_claim;
mod spec;
mod transform;
mod vae_file;

use std::fmt;
use std::sync::Arc;

pub use cache_error::CacheError;
pub use cache_manifest::{CacheManifest, CACHE_FORMAT, MANIFEST_FILE};
pub use embedded::FASHION_MNIST_CLASSES;
pub use error::DataError;
pub use latent_cache::{
    cache_latents, shard_file_name, CacheObserver, CachePlan, CacheProgress, CacheSummary, Coordination, HeldShard,
    LatentCacheConfig, DEFAULT_BATCH_SIZE, DEFAULT_SHARD_SIZE,
};
pub use latent_shards::{write_latent_shard, LatentShardMeta, Moments, LATENT_FORMAT};
pub use loader::{mix, BadFilePolicy, Batch, Loader, LoaderConfig};
pub use shard_claim::{ClaimOwner, Holder};
pub use spec::DataSpec;
pub use vae_file::{
    identify_vae_file, load_vae, read_vae_config, write_procedural_vae, VaeFileError, VaeIdentity, VAE_FILE_HINT,
};

/// The shape of one example, channels first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageShape {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl ImageShape {
    /// The number of values in one example.
    pub fn numel(&self) -> usize {
        self.channels * self.height * self.width
    }
}

impl fmt::Display for ImageShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {}, {}]", self.channels, self.height, self.width)
    }
}

/// One training example.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// `channels * height * width` values, CHW, in [-1, 1] for pixels.
    pub image: Vec<f32>,
    pub label: usize,
}

/// Per-example randomness, derived deterministically by the loader.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Augment {
    /// Mirror the example horizontally.
    pub flip: bool,
    /// Seeds any other randomness of the example (the posterior sample of a
    /// latent dataset).
    pub seed: u64,
}

/// A finite, indexable set of labelled examples of one shape.
///
/// `get` is called from loader worker threads, so implementations decode
/// lazily there when decoding is expensive (image folders) and must be
/// deterministic in `(index, augment)`.
pub trait Dataset: Send + Sync {
    /// The number of examples.
    fn len(&self) -> usize;
    /// The number of classes; labels lie in `0..num_classes()`.
    fn num_classes(&self) -> usize;
    /// The shape of the examples `get` yields (the target shape of `open_dataset`).
    fn shape(&self) -> ImageShape;
    /// Example `index` (`< len()`), with the given augmentation applied.
    fn get(&self, index: usize, augment: Augment) -> Result<Example, DataError>;
    /// One line for logs, e.g. "Fashion-MNIST test split (embedded), 10000 images, 10 classes".
    fn describe(&self) -> String;
    /// Whether the examples are VAE latents rather than pixels.
    fn is_latent(&self) -> bool;
    /// Whether the dataset holds no example (never true for an opened dataset).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Opens the dataset `spec` names, converting its examples to `target`, the
/// model's input shape `(in_channels, input_size, input_size)`.
///
/// Pixel datasets convert channels (1 <-> 3), size and value range (see
/// `docs/data.md`); latent datasets must already have exactly `target`'s shape.
pub fn open_dataset(spec: &DataSpec, target: ImageShape) -> Result<Arc<dyn Dataset>, DataError> {
    Ok(match spec {
        DataSpec::Embedded => Arc::new(embedded::open_fashion_mnist(target)?),
        DataSpec::Idx(path) => Arc::new(idx::IdxDataset::open(path, target)?),
        DataSpec::ImageFolder(path) => Arc::new(image_folder::ImageFolder::open(path, target)?),
        DataSpec::Latents(path) => Arc::new(latent_shards::LatentShards::open(path, target)?),
    })
}

/// A unique, not yet existing directory under the system temporary directory
/// for a test; the caller removes it.
#[cfg(test)]
pub(crate) fn test_dir(name: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let unique = format!("diffmoe-data-{name}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
    let dir = std::env::temp_dir().join(unique);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a test directory");
    dir
}
