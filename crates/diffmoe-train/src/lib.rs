//! Objectives, training, sampling and verification of DiffMoE (Shi et al.,
//! 2025): the rectified flow and DDPM losses exactly as the official code
//! computes them (`diffusion/rectified_flow.py`,
//! `diffusion/gaussian_diffusion.py`), with the capacity-predictor loss of
//! every DiffMoE layer and TC's auxiliary loss; the training loop; the
//! samplers, sample generation and where its compute goes; and the parity
//! checker against the official fixtures.

mod adamw_kernel;
mod capacity_loss;
mod checkpoint;
mod compute;
mod compute_plot;
pub mod data;
mod data_parallel;
mod ddpm;
mod ema;
mod error;
mod flow;
mod generate;
mod gradient_buffer;
mod gradients;
mod image_grid;
mod loss_terms;
mod npz;
mod optimizer;
mod param_path;
pub mod parity;
mod preview;
mod replica;
mod sample_files;
pub mod sampler;
mod step_rng;
mod train_log;
mod trainer;

pub use capacity_loss::{bce_with_logits, capacity_terms, layer_capacity_loss};
pub use checkpoint::{
    checkpoint_dir, first_difference, list_checkpoints, load_checkpoint, load_trained, prune_checkpoints,
    save_checkpoint, Checkpoint, CheckpointError, TrainState, TrainedModel, CHECKPOINTS_DIR,
};
pub use compute::{ClassKey, ClassSeries, ComputeRecorder, ComputeReport, ComputeRow, StepAxis};
pub use compute_plot::{plot_per_class, plot_per_step, plot_xy, PlotError, XySeries};
pub use data_parallel::{train_data_parallel, ThreadReplica};
pub use ddpm::{DdpmSchedule, DDPM_STEPS};
pub use ema::Ema;
pub use error::TrainError;
pub use flow::flow_loss;
pub use generate::{Generator, SampleError, SampleSettings, SamplerChoice};
pub use gradient_buffer::GradientBuffer;
pub use gradients::gradient_model;
pub use image_grid::{save_grid, save_png};
pub use loss_terms::LossTerms;
pub use npz::{read_npz, NpyArray, NpyDtype, NpyElement, NpzWriter};
pub use optimizer::{AdamW, Moments, OptimizerState};
pub use param_path::{param_infos, ParamInfo};
pub use preview::{grid_classes, grid_images, GridImages};
pub use replica::{Replica, SingleProcess};
pub use sample_files::{
    SampleFiles, SampleSpace, SampleWriter, GRID_MAX_COLUMNS, GRID_MAX_TILES, IMAGES_FILE, RAW_FILE,
};
pub use sampler::{
    space_timesteps, CallObserver, DdpmSampler, Denoiser, DiTDenoiser, Dopri5Sampler, FlowSampler, FlowSolver, Record,
};
pub use step_rng::{normal, step_rng, uniform, Stream};
pub use train_log::{LogRecord, TrainLog, LOG_FILE};
pub use trainer::{
    read_run_config, RunInfo, Silent, Start, StepProgress, TrainObserver, TrainSummary, Trainer, CONFIG_FILE,
    SAMPLES_DIR,
};
