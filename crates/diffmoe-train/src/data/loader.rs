//! The training data loader: shuffled, sharded across data-parallel
//! replicas, loaded by worker threads, and deterministic in the batch index.
//!
//! Batch `b` is a pure function of (dataset, seed, `b`, rank, world size,
//! batch size): the epoch `b / batches_per_epoch` fixes a permutation of the
//! dataset, the position within the epoch fixes a slice of it, and every
//! example's augmentation is seeded by its place in the permutation. The
//! number of workers and the batch a loader starts at change nothing, which
//! is what lets a resumed run see exactly the batches the interrupted run
//! would have seen (the official `train.py` instead relies on a
//! `DistributedSampler` whose state is lost on resume).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{Augment, DataError, Dataset};

/// What to do when an example cannot be loaded (a corrupt image, say).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BadFilePolicy {
    /// Return the error, which names the file; training stops.
    #[default]
    Fail,
    /// Replace the example by the next one of the permutation and count it
    /// in `Batch::skipped`.
    Skip,
}

/// How a `Loader` draws batches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoaderConfig {
    /// Examples per batch on this replica.
    pub batch_size: usize,
    /// Worker threads; 0 loads on the calling thread.
    pub workers: usize,
    /// Seeds the shuffles and the augmentations.
    pub seed: u64,
    /// Mirror half of the examples horizontally (the official training's
    /// `RandomHorizontalFlip`).
    pub flip: bool,
    pub bad_files: BadFilePolicy,
    /// This replica's index, `0..world_size`.
    pub rank: usize,
    /// The number of data-parallel replicas sharing each global batch.
    pub world_size: usize,
}

/// One batch of one replica.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// The global batch index, counted from the start of training.
    pub index: u64,
    /// `[batch, C, H, W]`, row-major.
    pub images: Vec<f32>,
    /// `[batch]`.
    pub labels: Vec<usize>,
    /// `[batch, C, H, W]`.
    pub shape: [usize; 4],
    /// Examples that failed to load and were replaced (`BadFilePolicy::Skip`).
    pub skipped: usize,
}

/// Combines a seed with two values into a new 64-bit seed: SplitMix64's
/// finaliser applied after folding in each value. The finaliser is a
/// bijection with full avalanche, so nearby inputs (epoch 3 vs 4, position
/// 17 vs 18) give unrelated seeds.
pub fn mix(seed: u64, a: u64, b: u64) -> u64 {
    fn splitmix64(x: u64) -> u64 {
        let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    splitmix64(splitmix64(splitmix64(seed) ^ a) ^ b)
}

/// The second value of `mix` that seeds an epoch's permutation; example
/// seeds use the permutation position there, which is always smaller.
const PERMUTATION_STREAM: u64 = u64::MAX;

/// Batches a worker may hold finished before the consumer takes them.
const PREFETCH_PER_WORKER: usize = 2;

/// Everything needed to compute any batch, shared by the workers.
struct Plan {
    dataset: Arc<dyn Dataset>,
    config: LoaderConfig,
    batches_per_epoch: u64,
}

/// The permutation of the last epoch used, so a worker shuffles once per epoch.
#[derive(Default)]
struct PermutationCache {
    epoch: Option<u64>,
    order: Vec<usize>,
}

impl Plan {
    fn permutation<'a>(&self, epoch: u64, cache: &'a mut PermutationCache) -> &'a [usize] {
        if cache.epoch != Some(epoch) {
            let len = self.dataset.len();
            let mut rng = ChaCha8Rng::seed_from_u64(mix(self.config.seed, epoch, PERMUTATION_STREAM));
            cache.order.clear();
            cache.order.extend(0..len);
            // Fisher-Yates; the bound is drawn as u64 so the result does not
            // depend on the platform's usize.
            for i in (1..len).rev() {
                let j = rng.random_range(0..=i as u64) as usize;
                cache.order.swap(i, j);
            }
            cache.epoch = Some(epoch);
        }
        &cache.order
    }

    /// The augmentation of permutation position `position` of `epoch`. The
    /// flip bit is drawn even when flips are off, so that switching them off
    /// leaves every other seed unchanged.
    fn augment(&self, epoch: u64, position: usize) -> Augment {
        let mut rng = ChaCha8Rng::seed_from_u64(mix(self.config.seed, epoch, position as u64));
        let flip = rng.random::<bool>();
        Augment { flip: self.config.flip && flip, seed: rng.next_u64() }
    }

    /// Computes batch `index` of this replica. Returns early with
    /// `WorkerStopped` when `stop` is raised, since nobody will read the batch.
    fn load(
        &self,
        index: u64,
        cache: &mut PermutationCache,
        stop: &AtomicBool,
        worker: usize,
    ) -> Result<Batch, DataError> {
        let LoaderConfig { batch_size, rank, world_size, bad_files, .. } = self.config;
        let epoch = index / self.batches_per_epoch;
        let position = (index % self.batches_per_epoch) as usize;
        let shape = self.dataset.shape();
        let numel = shape.numel();
        let len = self.dataset.len();
        let order = self.permutation(epoch, cache);
        let start = (position * world_size + rank) * batch_size;
        let mut images = Vec::with_capacity(batch_size * numel);
        let mut labels = Vec::with_capacity(batch_size);
        let mut skipped = 0;
        for slot in start..start + batch_size {
            let mut place = slot;
            let example = loop {
                if stop.load(Ordering::Relaxed) {
                    return Err(DataError::WorkerStopped { worker, batch: index });
                }
                match self.dataset.get(order[place], self.augment(epoch, place)) {
                    Ok(example) => break example,
                    Err(error) if bad_files == BadFilePolicy::Fail => return Err(error),
                    Err(error) => {
                        skipped += 1;
                        // Every example has failed once: nothing is left to substitute.
                        if skipped >= len {
                            return Err(error);
                        }
                        place = (place + 1) % len;
                    }
                }
            };
            assert_eq!(
                example.image.len(),
                numel,
                "{} yielded an example of {} values for shape {shape}",
                self.dataset.describe(),
                example.image.len()
            );
            images.extend_from_slice(&example.image);
            labels.push(example.label);
        }
        Ok(Batch { index, images, labels, shape: [batch_size, shape.channels, shape.height, shape.width], skipped })
    }
}

/// Yields batches `first_batch, first_batch + 1, ...` forever, wrapping
/// around epochs. Dropping it stops its worker threads.
pub struct Loader {
    plan: Arc<Plan>,
    first_batch: u64,
    next: u64,
    /// Used when there are no workers.
    cache: PermutationCache,
    /// Worker `w` computes batches `first_batch + w + k * workers`, in order,
    /// so reading the receivers round-robin delivers batches in order with no
    /// reorder buffer.
    receivers: Vec<Receiver<Result<Batch, DataError>>>,
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl Loader {
    /// Starts loading at batch `first_batch` (the step a resumed run
    /// continues from).
    pub fn new(dataset: Arc<dyn Dataset>, config: LoaderConfig, first_batch: u64) -> Result<Self, DataError> {
        if config.batch_size == 0 {
            return Err(DataError::InvalidLoader { field: "batch_size", reason: "must be at least 1" });
        }
        if config.world_size == 0 || config.rank >= config.world_size {
            return Err(DataError::InvalidLoader {
                field: "rank",
                reason: "must be below world_size, which must be at least 1",
            });
        }
        let len = dataset.len();
        let too_small = DataError::TooSmall { len, batch_size: config.batch_size, world_size: config.world_size };
        let global = config.batch_size.checked_mul(config.world_size);
        let Some(global) = global.filter(|&g| g <= len) else {
            return Err(too_small);
        };
        let workers = config.workers;
        let plan = Arc::new(Plan { dataset, batches_per_epoch: (len / global) as u64, config });
        let stop = Arc::new(AtomicBool::new(false));
        let mut receivers = Vec::with_capacity(workers);
        let mut threads = Vec::with_capacity(workers);
        for worker in 0..workers {
            let (sender, receiver) = sync_channel(PREFETCH_PER_WORKER);
            let (plan, stop) = (plan.clone(), stop.clone());
            let thread = std::thread::Builder::new()
                .name(format!("diffmoe-data-{worker}"))
                .spawn(move || {
                    let mut cache = PermutationCache::default();
                    let mut index = first_batch + worker as u64;
                    while !stop.load(Ordering::Relaxed) {
                        let batch = plan.load(index, &mut cache, &stop, worker);
                        // A closed channel means the loader was dropped.
                        if sender.send(batch).is_err() {
                            break;
                        }
                        index += workers as u64;
                    }
                })
                .map_err(|e| DataError::io("<data loader thread>", e))?;
            receivers.push(receiver);
            threads.push(thread);
        }
        Ok(Loader {
            plan,
            first_batch,
            next: first_batch,
            cache: PermutationCache::default(),
            receivers,
            threads,
            stop,
        })
    }

    /// The next batch. An error (a bad file under `BadFilePolicy::Fail`, a
    /// panicked worker) is returned in place of its batch; calling again
    /// moves on to the following batch.
    pub fn next_batch(&mut self) -> Result<Batch, DataError> {
        let index = self.next;
        self.next += 1;
        if self.receivers.is_empty() {
            return self.plan.load(index, &mut self.cache, &AtomicBool::new(false), 0);
        }
        let worker = ((index - self.first_batch) % self.receivers.len() as u64) as usize;
        // The only way a worker's channel closes while the loader lives is a
        // panic in it (in a `Dataset::get`, say): report it instead of hanging.
        self.receivers[worker].recv().unwrap_or(Err(DataError::WorkerStopped { worker, batch: index }))
    }

    /// Full global batches per epoch; the remainder of each shuffled epoch is dropped.
    pub fn batches_per_epoch(&self) -> u64 {
        self.plan.batches_per_epoch
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Closing every channel first unblocks workers waiting to send, then
        // each finishes at its next check of `stop`.
        self.receivers.clear();
        for thread in self.threads.drain(..) {
            // A worker that panicked has already been reported by `next_batch`.
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("dataset", &self.plan.dataset.describe())
            .field("config", &self.plan.config)
            .field("next", &self.next)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::image_folder::write_test_png;
    use crate::data::{open_dataset, test_dir, DataSpec, Example, ImageShape};
    use std::collections::HashSet;
    use std::path::PathBuf;

    /// Example `i` is `[i, flip, seed as f32]`; `failing` indices return a
    /// corrupt-file error and `panicking` ones panic.
    struct Numbers {
        len: usize,
        failing: HashSet<usize>,
        panicking: Option<usize>,
    }

    fn numbers(len: usize) -> Arc<Numbers> {
        Arc::new(Numbers { len, failing: HashSet::new(), panicking: None })
    }

    impl Dataset for Numbers {
        fn len(&self) -> usize {
            self.len
        }
        fn num_classes(&self) -> usize {
            1
        }
        fn shape(&self) -> ImageShape {
            ImageShape { channels: 3, height: 1, width: 1 }
        }
        fn get(&self, index: usize, augment: Augment) -> Result<Example, DataError> {
            assert_ne!(self.panicking, Some(index), "a test panic in Dataset::get");
            if self.failing.contains(&index) {
                return Err(DataError::corrupt(PathBuf::from(format!("file-{index}.png")), "test"));
            }
            Ok(Example { image: vec![index as f32, augment.flip as u8 as f32, augment.seed as f32], label: 0 })
        }
        fn describe(&self) -> String {
            format!("{} numbers", self.len)
        }
        fn is_latent(&self) -> bool {
            false
        }
    }

    fn config(batch_size: usize, workers: usize) -> LoaderConfig {
        LoaderConfig {
            batch_size,
            workers,
            seed: 42,
            flip: true,
            bad_files: BadFilePolicy::Fail,
            rank: 0,
            world_size: 1,
        }
    }

    fn take(loader: &mut Loader, n: usize) -> Vec<Batch> {
        (0..n).map(|_| loader.next_batch().unwrap()).collect()
    }

    fn indices(batch: &Batch) -> Vec<usize> {
        batch.images.chunks(3).map(|e| e[0] as usize).collect()
    }

    #[test]
    fn batches_do_not_depend_on_workers_or_the_first_batch() {
        let data = numbers(23);
        let mut inline = Loader::new(data.clone(), config(4, 0), 0).unwrap();
        assert_eq!(inline.batches_per_epoch(), 5);
        // Three epochs, crossing the wrap-around twice.
        let reference = take(&mut inline, 15);
        for workers in [1, 3] {
            let mut loader = Loader::new(data.clone(), config(4, workers), 0).unwrap();
            assert_eq!(take(&mut loader, 15), reference, "{workers} workers");
        }
        let mut resumed = Loader::new(data.clone(), config(4, 2), 5).unwrap();
        assert_eq!(take(&mut resumed, 10), reference[5..]);
        assert_eq!(reference[7].index, 7);
        assert_eq!(reference[7].shape, [4, 3, 1, 1]);

        // Each epoch visits distinct examples, in a new order, and flips some.
        for epoch in reference.chunks(5) {
            let seen: Vec<usize> = epoch.iter().flat_map(indices).collect();
            assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 20);
        }
        assert_ne!(indices(&reference[0]), indices(&reference[5]));
        let flips = reference.iter().flat_map(|b| b.images.chunks(3).map(|e| e[1])).filter(|&f| f == 1.0).count();
        assert!((15..45).contains(&flips), "{flips} of 60 flipped");

        // Another seed shuffles differently.
        let mut other = Loader::new(data, LoaderConfig { seed: 43, ..config(4, 0) }, 0).unwrap();
        assert_ne!(other.next_batch().unwrap(), reference[0]);
    }

    #[test]
    fn replicas_take_disjoint_slices_of_the_global_batch() {
        let data = numbers(24);
        let replica = |rank| {
            let mut loader =
                Loader::new(data.clone(), LoaderConfig { rank, world_size: 3, ..config(2, 1) }, 0).unwrap();
            take(&mut loader, 4)
        };
        let ranks: Vec<_> = (0..3).map(replica).collect();
        let mut single = Loader::new(data.clone(), config(6, 0), 0).unwrap();
        for b in 0..4 {
            // The three replicas together see exactly the single-replica batch of 6.
            let union: Vec<usize> = ranks.iter().flat_map(|r| indices(&r[b])).collect();
            assert_eq!(union, indices(&single.next_batch().unwrap()));
        }
        // With flips off, the example seeds stay the same.
        let mut plain = Loader::new(data, LoaderConfig { flip: false, ..config(6, 0) }, 0).unwrap();
        let batch = plain.next_batch().unwrap();
        let mut flipping = Loader::new(numbers(24), config(6, 0), 0).unwrap();
        let reference = flipping.next_batch().unwrap();
        for (a, b) in batch.images.chunks(3).zip(reference.images.chunks(3)) {
            assert_eq!((a[0], a[1], a[2]), (b[0], 0.0, b[2]));
        }
    }

    #[test]
    fn bad_files_fail_or_are_skipped() {
        let failing: HashSet<usize> = (0..10).filter(|i| i % 3 == 0).collect();
        let data = Arc::new(Numbers { len: 10, failing: failing.clone(), panicking: None });
        let mut strict = Loader::new(data.clone(), config(5, 0), 0).unwrap();
        let error = strict.next_batch().unwrap_err();
        assert!(error.to_string().contains("file-"), "{error}");

        for workers in [0, 2] {
            let skip = LoaderConfig { bad_files: BadFilePolicy::Skip, ..config(5, workers) };
            let mut lenient = Loader::new(data.clone(), skip, 0).unwrap();
            let batches = take(&mut lenient, 4);
            let skipped: usize = batches.iter().map(|b| b.skipped).sum();
            assert!(skipped > 0);
            for batch in &batches {
                assert_eq!(batch.labels.len(), 5);
                assert!(indices(batch).iter().all(|i| !failing.contains(i)));
            }
        }

        let all_bad = Arc::new(Numbers { len: 4, failing: (0..4).collect(), panicking: None });
        let skip = LoaderConfig { bad_files: BadFilePolicy::Skip, ..config(2, 0) };
        assert!(Loader::new(all_bad, skip, 0).unwrap().next_batch().is_err());
    }

    #[test]
    fn corrupt_image_in_a_folder_is_named_or_skipped() {
        let root = test_dir("loader-folder");
        std::fs::create_dir(root.join("a")).unwrap();
        std::fs::create_dir(root.join("b")).unwrap();
        write_test_png(&root.join("a/0.png"), 4, 4, [255, 255, 255]);
        write_test_png(&root.join("b/0.png"), 4, 4, [0, 0, 0]);
        std::fs::write(root.join("b/1.png"), b"garbage").unwrap();
        let target = ImageShape { channels: 3, height: 4, width: 4 };
        let folder = open_dataset(&DataSpec::ImageFolder(root.clone()), target).unwrap();
        let mut strict = Loader::new(folder.clone(), config(3, 1), 0).unwrap();
        let error = strict.next_batch().unwrap_err();
        assert!(error.path().unwrap().ends_with("b/1.png"), "{error}");

        let skip = LoaderConfig { bad_files: BadFilePolicy::Skip, ..config(3, 1) };
        let batch = Loader::new(folder, skip, 0).unwrap().next_batch().unwrap();
        assert_eq!(batch.skipped, 1);
        assert_eq!(batch.images.len(), 3 * 48);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_loader_can_move_to_another_thread() {
        fn assert_send<T: Send>() {}
        assert_send::<Loader>();
    }

    #[test]
    fn too_small_datasets_and_bad_settings_are_rejected() {
        let error = Loader::new(numbers(5), LoaderConfig { world_size: 2, ..config(3, 0) }, 0).unwrap_err();
        assert!(matches!(error, DataError::TooSmall { len: 5, batch_size: 3, world_size: 2 }));
        assert!(error.to_string().contains("= 6"), "{error}");
        assert!(Loader::new(numbers(5), config(0, 0), 0).is_err());
        assert!(Loader::new(numbers(5), LoaderConfig { rank: 1, ..config(1, 0) }, 0).is_err());
    }

    #[test]
    fn a_panicking_worker_is_reported_and_dropping_does_not_hang() {
        let data = Arc::new(Numbers { len: 8, failing: HashSet::new(), panicking: Some(3) });
        // A batch of the whole dataset always contains example 3.
        let mut loader = Loader::new(data, config(8, 2), 0).unwrap();
        let error = loader.next_batch().unwrap_err();
        assert!(matches!(error, DataError::WorkerStopped { worker: 0, batch: 0 }), "{error}");
        drop(loader);

        // Workers blocked on full prefetch queues stop when the loader goes.
        let loader = Loader::new(numbers(1000), config(10, 3), 0).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        drop(loader);
    }
}
