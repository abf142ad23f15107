//! Model FLOPs of a DiT forward pass, counted from the config: two FLOPs per
//! multiply-add of every matmul, attention's two `T x T` products included,
//! elementwise work left out (the usual convention for model-FLOPs
//! utilisation). A training step counts three forwards (forward, and the two
//! matmuls per weight of the backward); the optimizer is left out.

use diffmoe_core::ExpertKind;
use diffmoe_model::{DiTConfig, Family};

/// Matmul weights of one feed-forward network.
fn ffn_weights(kind: ExpertKind, d: usize, h: usize) -> f64 {
    let n = match kind {
        ExpertKind::Gelu => 2 * d * h,
        ExpertKind::SwiGlu => 3 * d * h,
    };
    n as f64
}

/// FLOPs of one forward pass over `batch` images.
///
/// `expert_tokens` is the number of (expert, token) evaluations summed over
/// every MoE block, as the routing statistics report it; `None` for a model
/// without MoE blocks.
pub fn forward_flops(config: &DiTConfig, batch: usize, expert_tokens: Option<f64>) -> f64 {
    let d = config.hidden_size as f64;
    let t = config.tokens() as f64;
    let n = batch as f64;
    let p = config.patch_size as f64;
    let inner = (config.num_heads * config.head_dim()) as f64;
    let ffn = ffn_weights(config.mlp, config.hidden_size, config.mlp_hidden());

    let patch = t * (config.in_channels as f64 * p * p) * d;
    let timestep = 256.0 * d + d * d;
    let final_layer = d * 2.0 * d + t * d * p * p * config.out_channels() as f64;
    let mut per_image = patch + timestep + final_layer;
    for i in 0..config.depth {
        let adaln = d * 6.0 * d;
        let attention = t * d * 3.0 * inner + 2.0 * t * t * inner + t * inner * d;
        per_image += adaln + attention;
        match (&config.moe, config.is_moe_block(i)) {
            (Some(moe), true) => {
                let e = moe.num_experts as f64;
                let gate = t * d * e;
                let predictor = if config.family == Family::Diffmoe { t * (d * d + d * e) } else { 0.0 };
                per_image += gate + predictor;
            }
            _ => per_image += t * ffn,
        }
    }
    let experts = expert_tokens.unwrap_or(0.0) * ffn;
    2.0 * (n * per_image + experts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffmoe_model::preset;

    #[test]
    fn a_moe_model_at_one_expert_per_token_costs_about_a_dense_one() {
        let dense = preset("dense-dit-s-flow").unwrap().model;
        let moe = preset("diffmoe-s-e16-flow").unwrap().model;
        let (n, t) = (4, dense.tokens() as f64);
        let moe_blocks = moe.moe_blocks().len() as f64;
        let a = forward_flops(&dense, n, None);
        let b = forward_flops(&moe, n, Some(moe_blocks * n as f64 * t));
        // Only the gates and capacity predictors differ.
        assert!(b > a && b < 1.25 * a, "{a} vs {b}");
    }

    #[test]
    fn dense_dit_s_matches_a_hand_count() {
        // DiT-S/2 on 32x32x4 latents: 256 tokens, d 384, 12 blocks, 6 heads.
        let c = preset("dense-dit-s-flow").unwrap().model;
        let (t, d) = (c.tokens() as f64, c.hidden_size as f64);
        let block = d * 6.0 * d + t * 4.0 * d * d + 2.0 * t * t * d + t * 8.0 * d * d;
        let rest = t * 16.0 * d + 256.0 * d + d * d + 2.0 * d * d + t * d * 4.0 * c.out_channels() as f64;
        let expected = 2.0 * (c.depth as f64 * block + rest);
        assert!((forward_flops(&c, 1, None) - expected).abs() < 1e-6 * expected);
    }
}
