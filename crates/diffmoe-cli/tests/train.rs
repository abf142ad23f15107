//! `diffmoe train` as a user runs it: a run killed while writing a checkpoint
//! and resumed repeats an uninterrupted run step for step, and bad input is
//! a clear error that leaves what is on disk alone.

use std::path::Path;

mod common;

use common::{diffmoe, scratch, stderr, CONFIG};

fn log_lines(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("log.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The numbers a resumed run must repeat exactly.
fn trajectory(run: &Path) -> Vec<(u64, f64, f64, f64)> {
    log_lines(run)
        .iter()
        .map(|r| {
            (
                r["step"].as_u64().unwrap(),
                r["loss"].as_f64().unwrap(),
                r["grad_norm"].as_f64().unwrap(),
                r["capacity_loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Equal tensors bit for bit, and equal metadata (whose order in the header
/// is not fixed).
fn assert_same_tensors(a: &[u8], b: &[u8], what: &str) {
    let (ta, tb) =
        (safetensors::SafeTensors::deserialize(a).unwrap(), safetensors::SafeTensors::deserialize(b).unwrap());
    let mut names = ta.names();
    names.sort();
    let mut names_b = tb.names();
    names_b.sort();
    assert_eq!(names, names_b, "{what}");
    for name in names {
        assert!(ta.tensor(name).unwrap().data() == tb.tensor(name).unwrap().data(), "{what}: `{name}` differs");
    }
    let meta = |bytes: &[u8]| safetensors::SafeTensors::read_metadata(bytes).unwrap().1.metadata().clone();
    assert_eq!(meta(a), meta(b), "{what}: metadata");
}

#[test]
fn a_run_killed_while_checkpointing_resumes_to_the_same_losses() {
    let dir = scratch("resume");
    let config = dir.join("config.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let cfg = config.to_str().unwrap();

    let straight = dir.join("straight");
    let out = diffmoe(&["train", "--config", cfg, "--out", straight.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(trajectory(&straight).len(), 6);
    assert!(straight.join("samples/step-00000006.png").is_file());

    // Killed while writing the checkpoint of step 4.
    let broken = dir.join("broken");
    let out = diffmoe(
        &["train", "--config", cfg, "--out", broken.to_str().unwrap()],
        &[("DIFFMOE_FAULT", "abort-in-checkpoint:4")],
    );
    assert!(!out.status.success());
    let ckpts = broken.join("checkpoints");
    assert!(ckpts.join("step-00000002/state.json").is_file(), "the previous checkpoint survives");
    assert!(!ckpts.join("step-00000004").exists(), "no half-written checkpoint under a final name");
    let partial = std::fs::read_dir(&ckpts)
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with(".step-00000004.partial-"));
    assert!(partial, "the kill happened inside the checkpoint write");

    let out = diffmoe(&["train", "--resume", broken.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("resumed from"), "{}", stderr(&out));
    assert_eq!(trajectory(&broken), trajectory(&straight));
    for file in ["model.safetensors", "ema.safetensors", "optimizer.safetensors"] {
        let a = std::fs::read(straight.join("checkpoints/step-00000006").join(file)).unwrap();
        let b = std::fs::read(broken.join("checkpoints/step-00000006").join(file)).unwrap();
        assert_same_tensors(&a, &b, file);
    }
    // Partial directories are cleaned up and only `keep_checkpoints` remain.
    let names: Vec<String> =
        std::fs::read_dir(&ckpts).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    assert_eq!(names.len(), 2, "{names:?}");

    // Resuming a finished run with more steps continues it.
    let out = diffmoe(&["train", "--resume", broken.to_str().unwrap(), "--max-steps", "7"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(trajectory(&broken).len(), 7);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_input_is_a_clear_error_and_nothing_is_overwritten() {
    let dir = scratch("errors");
    let config = dir.join("config.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let cfg = config.to_str().unwrap();

    // An invalid value names the field and what is allowed.
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, CONFIG.replace("batch_size = 8", "batch_size = 0")).unwrap();
    let out = diffmoe(&["train", "--config", bad.to_str().unwrap(), "--out", dir.join("x").to_str().unwrap()], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("train.batch_size"), "{}", stderr(&out));
    let bad_enum = dir.join("bad_enum.toml");
    std::fs::write(&bad_enum, CONFIG.replace("family = \"diffmoe\"", "family = \"diffmo\"")).unwrap();
    let out = diffmoe(&["train", "--config", bad_enum.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("diffmo"), "{}", stderr(&out));

    // A missing dataset is named.
    let missing = dir.join("no-such-data");
    let out = diffmoe(
        &["train", "--config", cfg, "--data", missing.to_str().unwrap(), "--out", dir.join("y").to_str().unwrap()],
        &[],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no-such-data"), "{}", stderr(&out));

    // An output directory holding another run is refused and left alone.
    let run = dir.join("run");
    let out = diffmoe(&["train", "--config", cfg, "--out", run.to_str().unwrap(), "--max-steps", "2"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let before = std::fs::read(run.join("log.jsonl")).unwrap();
    let out = diffmoe(&["train", "--config", cfg, "--out", run.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("another run"), "{}", stderr(&out));
    assert_eq!(std::fs::read(run.join("log.jsonl")).unwrap(), before);

    // Resuming with a setting that changes the run is refused.
    let out = diffmoe(&["train", "--resume", run.to_str().unwrap(), "--batch-size", "4"], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("train.batch_size"), "{}", stderr(&out));

    // A checkpoint from another configuration is refused, naming the field.
    let edited =
        std::fs::read_to_string(run.join("config.toml")).unwrap().replace("hidden_size = 32", "hidden_size = 64");
    std::fs::write(run.join("config.toml"), edited).unwrap();
    let out = diffmoe(&["train", "--resume", run.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("model.hidden_size"), "{}", stderr(&out));
    assert_eq!(std::fs::read(run.join("log.jsonl")).unwrap(), before);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn two_replicas_train_data_parallel_on_the_cpu() {
    let dir = scratch("ddp");
    let config = dir.join("config.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let run = dir.join("run");
    let out = diffmoe(
        &["train", "--config", config.to_str().unwrap(), "--out", run.to_str().unwrap(), "--device", "cpu,cpu"],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let log = log_lines(&run);
    assert_eq!(log.len(), 6);
    assert!(log.iter().all(|r| r["loss"].as_f64().unwrap().is_finite()));
    // Each replica routes its own half of the batch: 4 images x 16 tokens, 4 experts, capacity 1.
    assert_eq!(log[0]["tokens_per_expert"]["1"], serde_json::json!([16, 16, 16, 16]));
    assert!(run.join("checkpoints/step-00000006/model.safetensors").is_file());
    let _ = std::fs::remove_dir_all(&dir);
}
