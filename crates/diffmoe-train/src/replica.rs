//! A training replica's view of its peers: its rank, and the reductions that
//! data-parallel training needs (gradients averaged as DDP does, thresholds
//! averaged as the official `all_reduce(SUM) / world_size`, log metrics
//! averaged as the official logging does).
//!
//! `SingleProcess` is the one-replica case; the multi-GPU implementation
//! lives beside the backend that provides the collective (see
//! `docs/training.md`).

use burn::tensor::{backend::AutodiffBackend, Tensor};

use diffmoe_core::ThresholdSync;

use crate::gradient_buffer::GradientBuffer;

/// One of `world_size` data-parallel replicas.
pub trait Replica<B: AutodiffBackend>: ThresholdSync<B> {
    /// This replica's index, `0..world_size`.
    fn rank(&self) -> usize;
    /// Number of replicas.
    fn world_size(&self) -> usize;
    /// Replaces every gradient by its mean over the replicas.
    fn mean_gradients(&self, grads: &mut GradientBuffer<B>);
    /// The mean over replicas of a few scalars (logged losses).
    fn mean_metrics(&self, values: Vec<f64>) -> Vec<f64>;
}

/// A single process on a single device.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl<B: AutodiffBackend> ThresholdSync<B> for SingleProcess {
    fn mean_across_replicas(&self, thresholds: Tensor<B, 1>) -> Tensor<B, 1> {
        thresholds
    }
}

impl<B: AutodiffBackend> Replica<B> for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn mean_gradients(&self, _grads: &mut GradientBuffer<B>) {}

    fn mean_metrics(&self, values: Vec<f64>) -> Vec<f64> {
        values
    }
}
