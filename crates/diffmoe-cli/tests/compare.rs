//! `diffmoe classifier` and `diffmoe compare` as a user runs them, at a size
//! that takes seconds: the results table, its files, resumption, and the
//! shipped classifier's accuracy on the Fashion-MNIST test split.

use std::path::Path;

mod common;

use common::{diffmoe, scratch, stderr};

/// A tiny model of `family` on 32x32 Fashion-MNIST (16 tokens of 8x8).
fn tiny(family: &str) -> String {
    let moe = match family {
        "dense" => String::new(),
        "tc" => "[model.moe]\nnum_experts = 4\ncapacity = 1.0\nlayout = \"interleaved\"\n".to_string(),
        _ => "[model.moe]\nnum_experts = 4\ncapacity = 1.0\nlayout = \"interleaved\"\ncapacity_loss_weight = 1.0\n"
            .to_string(),
    };
    format!(
        "name = \"tiny-{family}\"\nobjective = \"flow\"\n\n[model]\nfamily = \"{family}\"\ninput_size = 32\npatch_size = 8\n\
         in_channels = 1\nhidden_size = 32\ndepth = 2\nnum_heads = 2\nmlp_ratio = 2.0\nnum_classes = 10\nlearn_sigma = false\n\n{moe}\n\
         [train]\nlog_every = 1\n\n[train.optimizer]\nlearning_rate = 0.001\n"
    )
}

#[test]
fn the_shipped_classifier_reaches_ninety_percent_on_the_test_split() {
    let out = diffmoe(&["classifier", "test", "--data", "embedded"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let accuracy: f64 = text.split_whitespace().nth(1).unwrap().trim_end_matches('%').parse().unwrap();
    assert!(accuracy >= 90.0, "{text}");
}

#[test]
fn a_classifier_trains_and_is_tested() {
    let dir = scratch("classifier");
    let weights = dir.join("c.safetensors");
    let out = diffmoe(
        &[
            "classifier",
            "train",
            "--data",
            "embedded",
            "--test",
            "embedded",
            "--epochs",
            "1",
            "--width",
            "4",
            "--features",
            "16",
            "--batch-size",
            "250",
            "--out",
            weights.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("epoch 1:"), "{}", stderr(&out));
    let out = diffmoe(&["classifier", "test", "--weights", weights.to_str().unwrap(), "--data", "embedded"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("accuracy "));
    let missing = dir.join("missing.safetensors");
    let out = diffmoe(&["classifier", "test", "--weights", missing.to_str().unwrap(), "--data", "embedded"], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("missing.safetensors"), "{}", stderr(&out));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn compare_trains_samples_scores_and_resumes() {
    let dir = scratch("compare");
    let mut models = Vec::new();
    for family in ["dense", "tc", "ec", "diffmoe"] {
        let path = dir.join(format!("{family}.toml"));
        std::fs::write(&path, tiny(family)).unwrap();
        models.push(path.to_str().unwrap().to_string());
    }
    let models = models.join(",");
    let out_dir = dir.join("results");
    let args = |steps: &str| {
        vec![
            "compare".to_string(),
            "--models".into(),
            models.clone(),
            "--out".into(),
            out_dir.to_str().unwrap().into(),
            "--steps".into(),
            steps.into(),
            "--batch-size".into(),
            "8".into(),
            "--samples-per-class".into(),
            "1".into(),
            "--sample-steps".into(),
            "2".into(),
            "--threshold-offsets".into(),
            "0.1".into(),
            "--loss-examples".into(),
            "16".into(),
            "--reference-examples".into(),
            "200".into(),
            "--workers".into(),
            "1".into(),
        ]
    };
    let run = |steps: &str| {
        let a = args(steps);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        diffmoe(&refs, &[])
    };
    let out = run("2");
    assert!(out.status.success(), "{}", stderr(&out));
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("results.json")).unwrap()).unwrap();
    let rows = results["rows"].as_array().unwrap();
    // Dense, TC, EC, and DiffMoE static, dynamic, per-token and one offset.
    assert_eq!(rows.len(), 7);
    let strategies: Vec<&str> = rows.iter().map(|r| r["inference_strategy"].as_str().unwrap()).collect();
    assert_eq!(&strategies[3..], &["static", "dynamic", "per-token", "per-token +0.1"]);
    for row in rows {
        let fd = row["quality"]["frechet_distance"].as_f64().unwrap();
        assert!(fd.is_finite() && fd >= 0.0, "{row}");
        assert_eq!(row["held_out_loss"].as_array().unwrap().len(), 5);
    }
    let table = std::fs::read_to_string(out_dir.join("results.md")).unwrap();
    assert_eq!(table.lines().count(), 2 + 7, "{table}");
    for file in ["compute_quality.png", "grids/tiny-diffmoe.png", "grids/tiny-dense.png"] {
        assert!(out_dir.join(file).is_file(), "{file}");
    }
    // A rerun with more steps continues the trained models.
    let out = run("3");
    assert!(out.status.success(), "{}", stderr(&out));
    let log = std::fs::read_to_string(out_dir.join("runs/tiny-ec/log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 3, "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn compare_refuses_a_model_the_classifier_cannot_score() {
    let dir = scratch("compare-shape");
    let path = dir.join("small.toml");
    std::fs::write(&path, tiny("dense").replace("input_size = 32", "input_size = 16")).unwrap();
    let out = diffmoe(
        &["compare", "--models", path.to_str().unwrap(), "--out", dir.join("r").to_str().unwrap(), "--steps", "1"],
        &[],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("classifier reads"), "{}", stderr(&out));
    let _ = std::fs::remove_dir_all(Path::new(&dir));
}
