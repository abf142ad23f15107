//! Data-parallel training on several devices of one machine: one thread per
//! device, each a `Trainer` with its own model replica and its shard of every
//! batch, joined by an in-process all-reduce (the official DDP setup with
//! `torch.distributed` on one node).
//!
//! Each optimizer step all-reduces the flattened gradients once (a mean, as
//! DDP does), each DiffMoE layer's thresholds after every update (the
//! official `all_reduce(SUM) / world_size`) and the logged losses. The
//! reduction moves tensors to the first device, sums them there and copies
//! the result back (on CUDA, cubecl copies tensors directly between GPUs).
//! Replicas start from the same seed, so their weights are equal without a
//! broadcast, and stay equal because they apply equal updates.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

use burn::tensor::{backend::AutodiffBackend, backend::Backend, Tensor, TensorData};

use diffmoe_core::ThresholdSync;
use diffmoe_model::RunConfig;

use crate::error::TrainError;
use crate::gradient_buffer::GradientBuffer;
use crate::replica::Replica;
use crate::trainer::{Silent, Start, TrainObserver, TrainSummary, Trainer};

/// The state the replicas of one run share.
struct Shared<B: Backend> {
    world: usize,
    state: Mutex<Round<B>>,
    changed: Condvar,
}

/// One all-reduce in flight: contributions, then the result, then release.
struct Round<B: Backend> {
    slots: Vec<Option<Tensor<B, 1>>>,
    result: Option<Tensor<B, 1>>,
    taken: usize,
    generation: u64,
    failed: bool,
}

/// Replica `rank` of `world_size` threads in this process.
pub struct ThreadReplica<B: AutodiffBackend> {
    rank: usize,
    device: B::Device,
    shared: Arc<Shared<B::InnerBackend>>,
}

impl<B: AutodiffBackend> ThreadReplica<B> {
    /// One replica per device; replica `i` runs on `devices[i]`.
    pub fn group(devices: &[B::Device]) -> Vec<Self> {
        let world = devices.len();
        let shared = Arc::new(Shared {
            world,
            state: Mutex::new(Round { slots: vec![None; world], result: None, taken: 0, generation: 0, failed: false }),
            changed: Condvar::new(),
        });
        devices
            .iter()
            .enumerate()
            .map(|(rank, device)| Self { rank, device: device.clone(), shared: shared.clone() })
            .collect()
    }

    /// Marks the group failed: replicas waiting in an all-reduce stop
    /// (panicking with a message that names the cause) instead of hanging.
    pub fn abort(&self) {
        let mut round = self.shared.state.lock().expect("replica lock");
        round.failed = true;
        self.shared.changed.notify_all();
    }

    /// The mean over replicas of a flat tensor (same length on every replica).
    ///
    /// # Panics
    /// If another replica of the group failed.
    pub fn mean(&self, tensor: Tensor<B::InnerBackend, 1>) -> Tensor<B::InnerBackend, 1> {
        let world = self.shared.world;
        if world == 1 {
            return tensor;
        }
        let shared = &self.shared;
        let mut round = shared.state.lock().expect("replica lock");
        // Wait until the previous round has been fully taken.
        while round.result.is_some() && !round.failed {
            round = shared.changed.wait(round).expect("replica lock");
        }
        assert!(!round.failed, "another replica of the data-parallel group failed");
        round.slots[self.rank] = Some(tensor);
        let generation = round.generation;
        if round.slots.iter().all(Option::is_some) {
            let home = round.slots[0].as_ref().expect("slot 0").device();
            let sum = round
                .slots
                .iter_mut()
                .map(|s| s.take().expect("every slot is filled").to_device(&home))
                .reduce(|a, b| a + b)
                .expect("at least one replica");
            round.result = Some(sum.div_scalar(world as f64));
            round.taken = 0;
            round.generation += 1;
            shared.changed.notify_all();
        }
        while round.generation == generation && !round.failed {
            round = shared.changed.wait(round).expect("replica lock");
        }
        assert!(!round.failed, "another replica of the data-parallel group failed");
        let mine = round.result.clone().expect("the round's result").to_device(&self.device);
        round.taken += 1;
        if round.taken == world {
            round.result = None;
            shared.changed.notify_all();
        }
        mine
    }
}

impl<B: AutodiffBackend> ThresholdSync<B> for ThreadReplica<B> {
    fn mean_across_replicas(&self, thresholds: Tensor<B, 1>) -> Tensor<B, 1> {
        Tensor::from_inner(self.mean(thresholds.inner()))
    }
}

impl<B: AutodiffBackend> Replica<B> for ThreadReplica<B> {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn mean_gradients(&self, grads: &mut GradientBuffer<B>) {
        // One reduction for all gradients: flatten in name order (the same
        // on every replica), reduce, split back.
        let sizes: Vec<(String, usize)> = grads.iter_mut().map(|(k, g)| (k.clone(), g.dims()[0])).collect();
        if sizes.is_empty() {
            return;
        }
        let flat = Tensor::cat(grads.iter_mut().map(|(_, g)| g.clone()).collect(), 0);
        let mean = self.mean(flat);
        let mut offset = 0;
        for ((_, g), (_, n)) in grads.iter_mut().zip(&sizes) {
            *g = mean.clone().narrow(0, offset, *n);
            offset += n;
        }
    }

    fn mean_metrics(&self, values: Vec<f64>) -> Vec<f64> {
        let n = values.len();
        let data = TensorData::new(values.iter().map(|&v| v as f32).collect::<Vec<_>>(), [n]);
        let reduced = self.mean(Tensor::from_data(data, &self.device));
        reduced.into_data().convert::<f64>().to_vec().expect("f64 metrics")
    }
}

/// Trains on every device of `devices` at once (one replica per device).
/// Rank 0 writes the run directory, logs, checkpoints and grids and reports
/// to `observer`; an error on any replica stops them all.
pub fn train_data_parallel<B: AutodiffBackend>(
    config: RunConfig,
    run_dir: &Path,
    start: Start,
    devices: Vec<B::Device>,
    observer: &mut dyn TrainObserver,
) -> Result<TrainSummary, TrainError> {
    assert!(!devices.is_empty(), "data-parallel training needs at least one device");
    let mut replicas = ThreadReplica::<B>::group(&devices).into_iter();
    let leader = replicas.next().expect("rank 0");
    // Rank 0 validates the config and prepares the run directory before any
    // other replica starts, so that a bad run fails before threads block.
    let leader_aborter = ThreadReplica::<B> { rank: 0, device: devices[0].clone(), shared: leader.shared.clone() };
    let first = Trainer::<B, _>::new(config.clone(), run_dir, start, devices[0].clone(), leader)?;
    let resume = Start::Resume;
    std::thread::scope(|scope| {
        let handles: Vec<_> = replicas
            .map(|replica| {
                let config = config.clone();
                let device = replica.device.clone();
                let aborter =
                    ThreadReplica::<B> { rank: replica.rank, device: device.clone(), shared: replica.shared.clone() };
                // Rank 0 has created the run directory (and its config), so
                // the others open it as a resumed run: the latest checkpoint,
                // or the seed when there is none.
                let start = if start == Start::Fresh { resume } else { start };
                scope.spawn(move || {
                    let result =
                        Trainer::<B, _>::new(config, run_dir, start, device, replica).and_then(|t| t.run(&mut Silent));
                    if result.is_err() {
                        aborter.abort();
                    }
                    result
                })
            })
            .collect();
        let result = first.run(observer);
        if result.is_err() {
            leader_aborter.abort();
        }
        for handle in handles {
            match handle.join() {
                Ok(Err(e)) if result.is_ok() => return Err(e),
                Err(panic) if result.is_ok() => std::panic::resume_unwind(panic),
                _ => {}
            }
        }
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};

    type B = Autodiff<Flex>;

    #[test]
    fn replicas_agree_on_the_mean() {
        let device = Default::default();
        let group = ThreadReplica::<B>::group(&[device, device, device]);
        let results: Vec<Vec<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .iter()
                .map(|r| {
                    s.spawn(move || {
                        // Two rounds in a row: the second must not mix with the first.
                        let x = Tensor::<Flex, 1>::from_floats([r.rank as f32, 1.0], &Default::default());
                        let first = r.mean(x.clone());
                        let second = r.mean(x.mul_scalar(2.0));
                        let mut v: Vec<f32> = first.into_data().to_vec().unwrap();
                        v.extend(second.into_data().to_vec::<f32>().unwrap());
                        v
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in results {
            assert_eq!(r, vec![1.0, 1.0, 2.0, 2.0]);
        }
    }
}
