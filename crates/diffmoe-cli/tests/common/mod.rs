//! What the command-line tests share: a model small enough to train in
//! seconds, scratch directories, and running the real binary.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

/// A DiffMoE small enough to train a few steps in seconds: 16x16 Fashion-MNIST
/// (the embedded set, centre-cropped and resized), 16 tokens, 4 experts.
pub const CONFIG: &str = r#"
name = "test-diffmoe"
objective = "flow"

[model]
family = "diffmoe"
input_size = 16
patch_size = 4
in_channels = 1
hidden_size = 32
depth = 2
num_heads = 2
mlp_ratio = 2.0
class_dropout_prob = 0.1
num_classes = 10
learn_sigma = false
mlp = "gelu"

[model.moe]
num_experts = 4
capacity = 1.0
layout = "interleaved"
capacity_loss_weight = 1.0

[train]
steps = 6
batch_size = 8
log_every = 1
checkpoint_every = 2
keep_checkpoints = 2
sample_every = 0
ema_decay = 0.9

[train.optimizer]
learning_rate = 0.001

[train.grid]
per_class = 1
steps = 2
classes = [0, 1]

[train.data]
workers = 1
"#;

pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("diffmoe-cli-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn diffmoe(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_diffmoe"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the diffmoe binary runs")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}
