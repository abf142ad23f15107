//! Named presets: every model of the paper (Dense-DiT, TC-DiT, EC-DiT and
//! DiffMoE at S, B, L and XL, with 8 and 16 experts, flow and DDPM) on
//! ImageNet-256 latents, plus tiny presets for CPU work. Names are
//! lower-case: `dense-dit-l-flow`, `tc-dit-l-e16-ddpm`, `ec-dit-b-e8-flow`,
//! `diffmoe-l-e16-flow`, `diffmoe-tiny-e8-flow`.

use diffmoe_core::ExpertKind;

use crate::config::{DiTConfig, Family, MoeConfig, MoeLayout, Objective, RunConfig};
use crate::recipe::{GridConfig, TrainConfig};

/// The DiT sizes of the paper: (name, hidden size, depth, heads).
pub const SIZES: [(&str, usize, usize, usize); 4] =
    [("s", 384, 12, 6), ("b", 768, 12, 12), ("l", 1024, 24, 16), ("xl", 1152, 28, 16)];

/// Expert counts of the paper.
pub const EXPERT_COUNTS: [usize; 2] = [8, 16];

const FAMILIES: [(Family, &str); 4] =
    [(Family::Dense, "dense-dit"), (Family::Tc, "tc-dit"), (Family::Ec, "ec-dit"), (Family::Diffmoe, "diffmoe")];

const OBJECTIVES: [(Objective, &str); 2] = [(Objective::Flow, "flow"), (Objective::Ddpm, "ddpm")];

/// The MoE table of the paper's models at equal activated parameters:
/// interleaved GELU experts at capacity 1 (one expert per token on average;
/// top-1 for TC), no shared expert, capacity-loss weight 1 (the shipped
/// `000_DiffMoE_S_E16_Flow.yaml`).
fn paper_moe(num_experts: usize) -> MoeConfig {
    MoeConfig {
        num_experts,
        capacity: 1.0,
        n_shared_experts: None,
        layout: MoeLayout::Interleaved,
        capacity_loss_weight: 1.0,
    }
}

fn objective_name(objective: Objective) -> &'static str {
    match objective {
        Objective::Flow => "flow",
        Objective::Ddpm => "ddpm",
    }
}

fn run(name: String, description: String, objective: Objective, model: DiTConfig) -> RunConfig {
    RunConfig { name, description, objective, model, train: TrainConfig::default() }
}

/// The recipe of the tiny presets: a few thousand steps on a laptop CPU.
/// The learning rate is higher than the paper's 1e-4 (small models at small
/// batch tolerate it and get far sooner), a short warm-up keeps the first
/// steps stable at that rate, and the EMA decay is short enough (a horizon
/// of ~500 steps) to be useful within such a run.
fn cpu_recipe() -> TrainConfig {
    TrainConfig {
        steps: 5_000,
        batch_size: 64,
        warmup_steps: 100,
        ema_decay: 0.998,
        log_every: 50,
        checkpoint_every: 500,
        sample_every: 1_000,
        optimizer: crate::recipe::OptimizerConfig { learning_rate: 3e-4, ..Default::default() },
        grid: GridConfig { per_class: 4, steps: 50, cfg_scale: 2.0, ..GridConfig::default() },
        ..TrainConfig::default()
    }
}

/// Every preset, in a fixed order.
pub fn presets() -> Vec<RunConfig> {
    let mut out = Vec::new();
    for &(family, prefix) in &FAMILIES {
        for &(objective, obj) in &OBJECTIVES {
            for &(size, hidden, depth, heads) in &SIZES {
                let base = DiTConfig {
                    family,
                    input_size: 32,
                    patch_size: 2,
                    in_channels: 4,
                    hidden_size: hidden,
                    depth,
                    num_heads: heads,
                    head_dim: None,
                    mlp_ratio: 4.0,
                    class_dropout_prob: 0.1,
                    num_classes: 1000,
                    learn_sigma: true,
                    mlp: ExpertKind::Gelu,
                    moe: None,
                };
                let paper = family.paper_name();
                let upper = size.to_uppercase();
                if family == Family::Dense {
                    let description = format!("{paper}-{upper}/2, ImageNet 256 (32x32x4 SD-VAE latents), {obj}");
                    out.push(run(format!("{prefix}-{size}-{obj}"), description, objective, base));
                } else {
                    for e in EXPERT_COUNTS {
                        let description =
                            format!("{paper}-{upper}-E{e}, ImageNet 256 (32x32x4 SD-VAE latents), {obj}, capacity 1");
                        let model = DiTConfig { moe: Some(paper_moe(e)), ..base.clone() };
                        out.push(run(format!("{prefix}-{size}-e{e}-{obj}"), description, objective, model));
                    }
                }
            }
            out.push(tiny(family, prefix, objective));
            out.push(mini(family, prefix, objective));
        }
    }
    out
}

/// A tiny model for CPU work: 32x32 single-channel images (Fashion-MNIST
/// padded), 10 classes, width 128, depth 6, 4 heads, patch 2 (256 tokens),
/// 8 interleaved experts at capacity 1. The flow presets skip the learned
/// sigma (the flow loss ignores it); DDPM keeps it for the variational bound.
fn tiny(family: Family, prefix: &str, objective: Objective) -> RunConfig {
    let obj = objective_name(objective);
    let model = DiTConfig {
        family,
        input_size: 32,
        patch_size: 2,
        in_channels: 1,
        hidden_size: 128,
        depth: 6,
        num_heads: 4,
        head_dim: None,
        mlp_ratio: 4.0,
        class_dropout_prob: 0.1,
        num_classes: 10,
        learn_sigma: objective == Objective::Ddpm,
        mlp: ExpertKind::Gelu,
        moe: (family != Family::Dense).then(|| paper_moe(8)),
    };
    let (name, experts) = if family == Family::Dense {
        (format!("{prefix}-tiny-{obj}"), String::new())
    } else {
        (format!("{prefix}-tiny-e8-{obj}"), ", 8 experts".to_string())
    };
    let description = format!("tiny {} for CPU work, 32x32x1 pixels{experts}, {obj}", family.paper_name());
    RunConfig { train: cpu_recipe(), ..run(name, description, objective, model) }
}

/// The mini presets: the tiny model with 4x4 patches (64 tokens), about 6x
/// cheaper per image, so that a laptop CPU learns recognisable Fashion-MNIST
/// classes in minutes (`diffmoe train` trains `diffmoe-mini-e8-flow` by
/// default). The recipe is short: 600 steps of 32 at a warmed-up 2e-3 with an
/// EMA horizon of ~100 steps. Measured on an H100 with grids every 200
/// steps: at 2e-3 every class is recognisable by step 600, at 1e-3 only by
/// step ~1000, and a batch of 64 at 1.5e-3 is no better per image.
fn mini(family: Family, prefix: &str, objective: Objective) -> RunConfig {
    let tiny = tiny(family, prefix, objective);
    let obj = objective_name(objective);
    let name = tiny.name.replacen("-tiny", "-mini", 1);
    let experts = if family == Family::Dense { "" } else { ", 8 experts" };
    let description = format!("mini {} for a laptop CPU, 32x32x1 pixels, patch 4{experts}, {obj}", family.paper_name());
    let model = DiTConfig { patch_size: 4, ..tiny.model };
    let train = TrainConfig {
        steps: 600,
        batch_size: 32,
        warmup_steps: 50,
        ema_decay: 0.99,
        log_every: 25,
        checkpoint_every: 200,
        sample_every: 300,
        optimizer: crate::recipe::OptimizerConfig { learning_rate: 2e-3, ..Default::default() },
        grid: GridConfig { per_class: 4, steps: 25, cfg_scale: 2.0, ..GridConfig::default() },
        ..TrainConfig::default()
    };
    RunConfig { name, description, objective, model, train }
}

/// The preset of that name (case-insensitive), if any.
pub fn preset(name: &str) -> Option<RunConfig> {
    let name = name.to_ascii_lowercase();
    presets().into_iter().find(|p| p.name == name)
}

/// All preset names.
pub fn preset_names() -> Vec<String> {
    presets().into_iter().map(|p| p.name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_is_valid_and_named_uniquely() {
        let all = presets();
        assert_eq!(all.len(), 2 * (4 + 3 * 4 * 2) + 16);
        let mut names = preset_names();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len());
        for p in all {
            p.validate().unwrap_or_else(|e| panic!("{}: {e}", p.name));
        }
    }

    #[test]
    fn names_resolve_case_insensitively() {
        assert!(preset("DiffMoE-L-E16-Flow").is_some());
        assert!(preset("diffmoe-l-e32-flow").is_none());
    }
}
