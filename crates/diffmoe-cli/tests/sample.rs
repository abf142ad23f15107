//! `diffmoe sample` as a user runs it on a freshly trained checkpoint: the
//! files it writes, reproducibility across batch sizes, every sampler, and
//! clear errors.

use std::path::Path;

mod common;

use common::{diffmoe, scratch, stderr, CONFIG};
use diffmoe_train::read_npz;

/// Trains the small model of `config` for a few steps into `dir/run`.
fn train(dir: &Path, config: &str, name: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    let run = dir.join(name);
    let out = diffmoe(
        &["train", "--config", path.to_str().unwrap(), "--out", run.to_str().unwrap(), "--max-steps", "2"],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    run
}

fn sample(args: &[&str]) -> std::process::Output {
    diffmoe(&[&["sample"], args].concat(), &[])
}

fn raw(dir: &Path) -> Vec<f64> {
    read_npz(&dir.join("samples_raw.npz")).unwrap().remove("samples").unwrap().values
}

#[test]
fn writes_grid_images_arrays_and_compute_stats() {
    let dir = scratch("sample-files");
    let run = train(&dir, CONFIG, "flow");
    let grid = dir.join("out/grid.png");
    let stats = dir.join("out/stats.json");
    let out = sample(&[
        "--checkpoint",
        run.to_str().unwrap(),
        "--ema",
        "--classes",
        "0,3,7",
        "--per-class",
        "2",
        "--steps",
        "3",
        "--cfg-scale",
        "2",
        "--batch-size",
        "4",
        "--out",
        grid.to_str().unwrap(),
        "--stats",
        stats.to_str().unwrap(),
    ]);
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("activated parameters per token"), "{log}");
    // One column per class, two rows: 3 x (16 + 2) + 2 pixels wide.
    let png = image::open(&grid).unwrap();
    assert_eq!((png.width(), png.height()), (3 * 18 + 2, 2 * 18 + 2));
    let files = dir.join("out/grid");
    assert!(files.join("000005.png").is_file() && !files.join("000006.png").exists());
    let arrays = read_npz(&files.join("samples.npz")).unwrap();
    assert_eq!(arrays["arr_0"].shape, vec![6, 16, 16, 1]);
    assert_eq!(arrays["arr_1"].values, vec![0.0, 3.0, 7.0, 0.0, 3.0, 7.0]);
    let raw = read_npz(&files.join("samples_raw.npz")).unwrap();
    assert_eq!(raw["samples"].shape, vec![6, 1, 16, 16]);

    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
    // Euler with guidance: 3 steps x 2 calls per batch, 2 batches.
    assert_eq!(report["network_calls"], 12);
    assert_eq!(report["per_step"].as_array().unwrap().len(), 3);
    // Three classes and the unconditional passes of guidance.
    let classes: Vec<String> = report["per_class"].as_array().unwrap().iter().map(|r| r["class"].to_string()).collect();
    assert_eq!(classes.len(), 4, "{classes:?}");
    assert!(classes[3].contains("unconditional"));
    assert_eq!(report["moe_blocks"], serde_json::json!([1]));
    let evaluations: f64 = report["expert_token_evaluations"].as_f64().unwrap();
    assert!(evaluations >= 0.0);
    assert!(dir.join("out/stats-per-step.png").is_file() && dir.join("out/stats-per-class.png").is_file());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn per_token_samples_do_not_depend_on_the_batch_size() {
    let dir = scratch("sample-batches");
    let run = train(&dir, CONFIG, "flow");
    let run_with = |batch: &str, routing: &str, sampler: &str| {
        let grid = dir.join(format!("b{batch}-{routing}-{sampler}.png"));
        let out = sample(&[
            "--checkpoint",
            run.to_str().unwrap(),
            "--classes",
            "1,2,5",
            "--per-class",
            "1",
            "--steps",
            "2",
            "--sampler",
            sampler,
            "--routing",
            routing,
            "--threshold-offset",
            "-0.01",
            "--batch-size",
            batch,
            "--seed",
            "9",
            "--out",
            grid.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        raw(&grid.with_extension(""))
    };
    for sampler in ["euler", "heun"] {
        let whole = run_with("3", "per-token", sampler);
        let single = run_with("1", "per-token", sampler);
        let diff = whole.iter().zip(&single).fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff < 1e-5, "{sampler}: batch 3 and batch 1 differ by {diff}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ddpm_models_sample_with_ddpm_and_ddim() {
    let dir = scratch("sample-ddpm");
    let config = CONFIG
        .replace("objective = \"flow\"", "objective = \"ddpm\"")
        .replace("learn_sigma = false", "learn_sigma = true");
    let run = train(&dir, &config, "ddpm");
    for (sampler, extra) in [("ddpm", vec!["--cfg-channels", "3"]), ("ddim", vec!["--eta", "0.5"])] {
        let grid = dir.join(format!("{sampler}.png"));
        let args = [
            vec!["--checkpoint", run.to_str().unwrap(), "--classes", "0,1", "--per-class", "1", "--steps", "4"],
            vec!["--sampler", sampler, "--cfg-scale", "3", "--routing", "per-token", "--out", grid.to_str().unwrap()],
            extra,
        ]
        .concat();
        let out = sample(&args);
        assert!(out.status.success(), "{sampler}: {}", stderr(&out));
        let values = raw(&grid.with_extension(""));
        assert_eq!(values.len(), 2 * 16 * 16);
        // Pixel DDPM predictions are clipped: samples stay near [-1, 1].
        assert!(values.iter().all(|v| v.is_finite() && v.abs() < 3.0), "{sampler}");
    }
    // dopri5 is a flow solver.
    let out = sample(&["--checkpoint", run.to_str().unwrap(), "--sampler", "dopri5", "--out", "x.png"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("dopri5 sampler needs a Flow model"), "{}", stderr(&out));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = scratch("sample-errors");
    let run = train(&dir, CONFIG, "flow");
    let run_str = run.to_str().unwrap();
    let grid = dir.join("g.png");
    let g = grid.to_str().unwrap();
    let fails = |args: &[&str], expected: &str| {
        let out = sample(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr(&out).contains(expected), "{args:?}: {}", stderr(&out));
    };
    fails(&["--checkpoint", run_str, "--classes", "3,12", "--out", g], "class 12 is out of range");
    fails(&["--checkpoint", run_str, "--sampler", "ddim", "--out", g], "ddim sampler needs a Ddpm model");
    fails(
        &["--checkpoint", run_str, "--routing", "static", "--threshold-offset", "0.1", "--out", g],
        "--threshold-offset",
    );
    fails(&["--checkpoint", run_str, "--sampler", "dopri5", "--rtol", "0", "--out", g], "rtol");
    let missing = dir.join("no-such-run");
    fails(&["--checkpoint", missing.to_str().unwrap(), "--out", g], "no-such-run");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    fails(&["--checkpoint", empty.to_str().unwrap(), "--out", g], "holds no complete checkpoint");
    let weights = run.join("checkpoints/step-00000002/ema.safetensors");
    fails(&["--checkpoint", weights.to_str().unwrap(), "--out", g], "give the run config");
    // With its config, a weights file samples.
    let config = run.join("config.toml");
    let out = sample(&[
        "--checkpoint",
        weights.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--classes",
        "4",
        "--per-class",
        "1",
        "--steps",
        "1",
        "--out",
        g,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(grid.is_file());
    let _ = std::fs::remove_dir_all(&dir);
}
