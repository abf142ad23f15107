//! Objectives and verification of DiffMoE (Shi et al., 2025): the rectified
//! flow and DDPM losses exactly as the official code computes them
//! (`diffusion/rectified_flow.py`, `diffusion/gaussian_diffusion.py`), with
//! the capacity-predictor loss of every DiffMoE layer and TC's auxiliary
//! loss, and the parity checker against the official fixtures.

mod capacity_loss;
mod ddpm;
mod flow;
mod gradients;
mod loss_terms;
pub mod parity;

pub use capacity_loss::{bce_with_logits, capacity_terms};
pub use ddpm::{DdpmSchedule, DDPM_STEPS};
pub use flow::flow_loss;
pub use gradients::gradient_model;
pub use loss_terms::LossTerms;
