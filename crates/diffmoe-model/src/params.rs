//! Parameter counts from a config, without building the model: the total
//! (as the official `sum(p.numel() for p in model.parameters())`, which counts
//! the fixed `pos_embed` and not the DiffMoE threshold buffers) and the
//! parameters activated per token at the training capacity.
//!
//! Activated parameters follow the paper's convention of comparing models by
//! what one token passes through: every non-expert parameter, plus for each MoE
//! layer `capacity` experts' worth (DiffMoE and EC: each expert takes
//! `capacity * S / E` tokens, so a token meets `capacity` experts on average;
//! TC: its top-k experts), the shared expert, the gate and, for DiffMoE, the
//! capacity predictor.

use serde::Serialize;

use diffmoe_core::ExpertKind;

use crate::config::{DiTConfig, Family};

/// One row of the breakdown.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParamCount {
    /// Official module name (`blocks.3.mlp`, `x_embedder`, ...).
    pub name: String,
    /// What the module is.
    pub kind: String,
    /// Parameters.
    pub total: usize,
    /// Parameters a token passes through at the training capacity.
    pub activated: f64,
    /// The block of a per-block row (`blocks.<i>.*`).
    pub block: Option<usize>,
    /// MoE rows: parameters of one routed expert (0 elsewhere).
    pub routed_expert: usize,
    /// MoE rows: routed experts a token passes through on average at the
    /// training capacity (the `capacity` of DiffMoE and EC, TC's top-k).
    pub experts_per_token: f64,
}

/// Totals and per-module breakdown of a configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParamReport {
    /// All parameters.
    pub total: usize,
    /// Parameters activated per token.
    pub activated: f64,
    /// The breakdown, in module order.
    pub rows: Vec<ParamCount>,
}

fn linear(i: usize, o: usize, bias: bool) -> usize {
    i * o + if bias { o } else { 0 }
}

fn ffn(kind: ExpertKind, d: usize, h: usize) -> usize {
    match kind {
        ExpertKind::Gelu => linear(d, h, true) + linear(h, d, true),
        ExpertKind::SwiGlu => 3 * d * h,
    }
}

impl ParamReport {
    /// Counts the parameters of `config`.
    pub fn from_config(config: &DiTConfig) -> Self {
        let d = config.hidden_size;
        let h = config.mlp_hidden();
        let p = config.patch_size;
        let mut rows = Vec::new();
        let mut row = |name: String, kind: &str, total: usize, activated: f64, expert: (usize, f64)| {
            let block = name.strip_prefix("blocks.").and_then(|r| r.split('.').next()?.parse().ok());
            rows.push(ParamCount {
                name,
                kind: kind.to_string(),
                total,
                activated,
                block,
                routed_expert: expert.0,
                experts_per_token: expert.1,
            })
        };
        const NOT_MOE: (usize, f64) = (0, 0.0);
        let full = |n: usize| (n, n as f64);
        let (n, a) = full(linear(config.in_channels * p * p, d, true));
        row("x_embedder".into(), "patch embedding", n, a, NOT_MOE);
        let (n, a) = full(config.tokens() * d);
        row("pos_embed".into(), "fixed sin-cos positions", n, a, NOT_MOE);
        let (n, a) = full(linear(256, d, true) + linear(d, d, true));
        row("t_embedder".into(), "timestep MLP", n, a, NOT_MOE);
        let (n, a) = full(config.label_rows() * d);
        row("y_embedder".into(), "label table", n, a, NOT_MOE);
        let attn = linear(d, 3 * config.num_heads * config.head_dim(), true)
            + linear(config.num_heads * config.head_dim(), d, true);
        for i in 0..config.depth {
            row(format!("blocks.{i}.attn"), "attention", attn, attn as f64, NOT_MOE);
            row(
                format!("blocks.{i}.adaLN_modulation"),
                "adaLN",
                linear(d, 6 * d, true),
                linear(d, 6 * d, true) as f64,
                NOT_MOE,
            );
            let name = format!("blocks.{i}.mlp");
            match (&config.moe, config.is_moe_block(i)) {
                (Some(moe), true) => {
                    let e = moe.num_experts;
                    let expert = ffn(config.mlp, d, h);
                    let (gate, routing_extra, shared, per_token) = match config.family {
                        Family::Diffmoe => (
                            e * d,
                            linear(d, d, true) + linear(d, e, true),
                            if moe.n_shared_experts.unwrap_or(0) > 0 { ffn(ExpertKind::Gelu, d, 8 * d) } else { 0 },
                            moe.capacity,
                        ),
                        Family::Ec => (e * d, 0, moe.n_shared_experts.map_or(0, |n| 3 * d * d * n), moe.capacity),
                        Family::Tc => (e * d, 0, moe.n_shared_experts.map_or(0, |n| 3 * d * d * n), moe.capacity),
                        Family::Dense => unreachable!("dense configs have no MoE block"),
                    };
                    let kind = match config.family {
                        Family::Diffmoe => "DiffMoE (experts, gate, capacity predictor, shared)",
                        Family::Ec => "EC MoE (experts, gate, shared)",
                        _ => "TC MoE (experts, gate, shared)",
                    };
                    let total = e * expert + gate + routing_extra + shared;
                    let activated = per_token * expert as f64 + (gate + routing_extra + shared) as f64;
                    row(name, kind, total, activated, (expert, per_token));
                }
                _ => {
                    let n = ffn(config.mlp, d, h);
                    row(name, "dense MLP", n, n as f64, NOT_MOE);
                }
            }
        }
        let fin = linear(d, 2 * d, true) + linear(d, p * p * config.out_channels(), true);
        row("final_layer".into(), "final layer", fin, fin as f64, NOT_MOE);
        let total = rows.iter().map(|r| r.total).sum();
        let activated = rows.iter().map(|r| r.activated).sum();
        Self { total, activated, rows }
    }

    /// Parameters activated per token when MoE block `b` sends a token
    /// through `experts_per_token(b)` routed experts on average instead of
    /// its training capacity (dynamic inference); `None` keeps the training
    /// figure. Gates, capacity predictors and shared experts count in full.
    pub fn activated_with(&self, experts_per_token: impl Fn(usize) -> Option<f64>) -> f64 {
        self.rows
            .iter()
            .map(|r| match r.block.filter(|_| r.routed_expert > 0).and_then(&experts_per_token) {
                Some(e) => r.activated + (e - r.experts_per_token) * r.routed_expert as f64,
                None => r.activated,
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preset::{preset, presets};
    use crate::state_dict::StateDict;
    use burn::backend::Flex;

    #[test]
    fn totals_equal_the_official_implementation() {
        // Numbers of the official code: 1000 classes, learned sigma, 32x32 latents.
        assert_eq!(ParamReport::from_config(&preset("dense-dit-l-flow").unwrap().model).total, 458_102_816);
        assert_eq!(ParamReport::from_config(&preset("diffmoe-l-e16-flow").unwrap().model).total, 1_981_962_464);
    }

    #[test]
    fn counts_equal_the_built_models() {
        for run in presets().into_iter().filter(|p| p.name.contains("tiny")) {
            let model = run.model.init::<Flex>(&Default::default());
            let sd = StateDict::from_model(&model);
            // Buffers (thresholds, EMA decay) are in the state dict, not in the parameters.
            let buffers: usize = sd
                .tensors
                .iter()
                .filter(|(k, _)| k.ends_with("expert_threshold") || k.ends_with("ema_decay"))
                .map(|(_, t)| t.data.len())
                .sum();
            assert_eq!(ParamReport::from_config(&run.model).total, sd.numel() - buffers, "{}", run.name);
        }
    }

    #[test]
    fn activated_parameters_follow_the_experts_per_token() {
        let report = ParamReport::from_config(&preset("diffmoe-s-e16-flow").unwrap().model);
        assert_eq!(report.activated_with(|_| None), report.activated);
        assert!((report.activated_with(|_| Some(1.0)) - report.activated).abs() < 1e-6, "capacity 1");
        let expert = ffn(ExpertKind::Gelu, 384, 4 * 384) as f64;
        // One MoE block (block 1) at 2.5 experts per token adds 1.5 experts.
        let more = report.activated_with(|b| (b == 1).then_some(2.5));
        assert!((more - report.activated - 1.5 * expert).abs() < 1e-6);
        // No expert at all in any of the 6 MoE blocks.
        let none = report.activated_with(|_| Some(0.0));
        assert!((report.activated - none - 6.0 * expert).abs() < 1e-6);
        let dense = ParamReport::from_config(&preset("dense-dit-s-flow").unwrap().model);
        assert_eq!(dense.activated_with(|_| Some(3.0)), dense.activated);
    }

    #[test]
    fn moe_at_capacity_one_activates_as_much_as_dense_plus_routing() {
        let dense = ParamReport::from_config(&preset("dense-dit-l-flow").unwrap().model);
        let ec = ParamReport::from_config(&preset("ec-dit-l-e16-flow").unwrap().model);
        // 12 MoE layers each add only a 16 x 1024 gate per token.
        assert_eq!(ec.activated - dense.activated, (12 * 16 * 1024) as f64);
    }
}
