//! DiffMoE routing: the MLP layers of the four model families of the paper
//! (Shi et al., 2025, "DiffMoE: Dynamic Token Selection for Scalable Diffusion
//! Transformers", Sec. 3), each computing exactly what the official PyTorch code
//! (`KwaiVGI/DiffMoE`, `models/*.py`) computes.
//!
//! * [`Mlp`] and [`SwiGluMlp`]: the dense feed-forward layers.
//! * [`ExpertBank`]: the experts of one layer, weights stacked so that all
//!   experts run as one batched matmul.
//! * [`TokenPool`]: gather/scatter dispatch of routed tokens.
//! * [`DiffMoeLayer`]: the batch-level global token pool with capacity predictor.
//! * [`ExpertChoiceLayer`]: expert choice inside each sample (EC-DiT).
//! * [`TokenChoiceLayer`]: token choice with a load-balancing loss (TC-DiT).
//! * [`modulated_layer_norm`], [`gated_residual`]: the adaLN passes of a DiT
//!   block, one op each way on burn's CPU backend.
//! * [`self_attention`]: multi-head attention over packed q, k, v, one op
//!   with its own backward step on burn's CPU backend.
//! * [`gelu_tanh`], [`silu`], [`softmax_last`]: one fused pass, forward and backward,
//!   on burn's CPU backend (its tensors are reached with [`flex_f32`]).
//!
//! No layer mutates itself in `forward`: each returns [`RoutingStats`], and the
//! caller applies the threshold update ([`DiffMoeLayer::with_updated_thresholds`]).

#[cfg(test)]
mod accuracy;
mod activation;
mod adaln;
mod adaln_kernel;
mod attention;
mod attention_kernel;
mod bias;
mod broadcast;
mod capacity;
mod compaction;
mod counting_select;
mod cpu_kernels;
mod dispatch;
mod expert_bank;
mod expert_choice;
mod fused;
mod global_pool;
mod matmul;
mod mlp;
mod routing;
mod row_groups;
mod rows;
mod threshold;
mod token_choice;
mod token_pool;
mod topk;

pub use activation::{gelu_tanh, silu, softmax_last};
pub use adaln::{gated_residual, layer_norm, modulate, modulated_layer_norm};
pub use attention::self_attention;
pub use bias::add_bias;
pub use broadcast::broadcast_middle;
pub use capacity::{capacity_k, CapacityPredictor};
pub use expert_bank::{ExpertBank, ExpertKind, GeluExperts, SwiGluExperts};
pub use expert_choice::{ExpertChoiceConfig, ExpertChoiceLayer};
pub use fused::{flex_contiguous, flex_f32, flex_from_vec, from_flex};
pub use global_pool::{DiffMoeConfig, DiffMoeLayer};
pub use matmul::{linear, matmul};
pub use mlp::{FeedForward, Mlp, SwiGluMlp};
pub use routing::{Routing, RoutingStats};
pub use rows::on_rows;
pub use threshold::{LocalReplica, ThresholdSync, THRESHOLD_EMA_DECAY};
pub use token_choice::{TokenChoiceConfig, TokenChoiceLayer, AUX_LOSS_ALPHA};
pub use token_pool::TokenPool;
pub use topk::topk_last;

pub mod init;
