//! `diffmoe cache-latents` as a user runs it: two processes racing on one
//! directory write every shard exactly once, a rerun has nothing to do, a
//! missing VAE file says which file to bring, and `diffmoe train` trains a
//! latent model on the cache.

use std::path::Path;
use std::process::{Command, Stdio};

mod common;

use common::{diffmoe, scratch, stderr};

/// A two-level VAE (latents at half the image size), small enough to encode
/// a few 16x16 images in milliseconds; diffusers' `config.json` keys.
const VAE_CONFIG: &str = r#"{
  "_class_name": "AutoencoderKL",
  "block_out_channels": [8, 16],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
  "layers_per_block": 1,
  "norm_num_groups": 4,
  "latent_channels": 4
}"#;

/// A latent DiffMoE for 8x8x4 latents of 16x16 images, 2 classes.
const LATENT_CONFIG: &str = r#"
name = "test-latent-diffmoe"
objective = "flow"

[model]
family = "diffmoe"
input_size = 8
patch_size = 2
in_channels = 4
hidden_size = 32
depth = 2
num_heads = 2
mlp_ratio = 2.0
class_dropout_prob = 0.1
num_classes = 2
learn_sigma = false
mlp = "gelu"

[model.moe]
num_experts = 4
capacity = 1.0
layout = "interleaved"
capacity_loss_weight = 1.0

[train]
steps = 2
batch_size = 4
log_every = 1
checkpoint_every = 2
keep_checkpoints = 1
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

/// Two classes of three PNGs each, of sizes other than 16x16.
fn write_images(root: &Path) {
    for (label, class) in ["cats", "dogs"].iter().enumerate() {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..3u32 {
            let k = label as u32 * 5 + i;
            let image = image::RgbImage::from_fn(24 + i, 20, |x, y| {
                image::Rgb([(x * 10 + k * 20) as u8, (y * 12) as u8, (k * 30 + x * y) as u8])
            });
            image.save(root.join(class).join(format!("{i}.png"))).unwrap();
        }
    }
}

/// The shard files a run reports writing.
fn written(out: &std::process::Output) -> Vec<String> {
    stderr(out)
        .lines()
        .filter_map(|l| l.strip_prefix("wrote "))
        .map(|l| l.split_whitespace().next().unwrap().rsplit('/').next().unwrap().to_string())
        .collect()
}

#[test]
fn racing_processes_fill_a_cache_that_trains() {
    let dir = scratch("cache-latents");
    let images = dir.join("images");
    write_images(&images);
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, VAE_CONFIG).unwrap();
    let vae_config = diffmoe_train::data::read_vae_config(&config_path).unwrap();
    let vae = dir.join("vae.safetensors");
    diffmoe_train::data::write_procedural_vae::<burn::backend::Flex>(&vae_config, &vae, 7).unwrap();
    let cache = dir.join("cache");
    let data = format!("folder:{}", images.display());
    let args = [
        "cache-latents",
        "--data",
        &data,
        "--vae",
        vae.to_str().unwrap(),
        "--vae-config",
        config_path.to_str().unwrap(),
        "--image-size",
        "16",
        "--out",
        cache.to_str().unwrap(),
        "--shard-size",
        "1",
        "--batch-size",
        "2",
        "--workers",
        "1",
    ];

    // A missing VAE file is named, with the file a user brings.
    let mut missing = args.to_vec();
    let absent = dir.join("diffusion_pytorch_model.safetensors");
    missing[4] = absent.to_str().unwrap();
    let out = diffmoe(&missing, &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("diffusion_pytorch_model.safetensors"), "{}", stderr(&out));
    assert!(stderr(&out).contains("stabilityai/sd-vae-ft-mse"), "{}", stderr(&out));
    assert!(!cache.join("cache.json").exists(), "a failed start records nothing");

    // Two processes at once: every shard is written by exactly one of them.
    let racers: Vec<_> = (0..2)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_diffmoe"))
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("the diffmoe binary runs")
        })
        .collect();
    let outputs: Vec<_> = racers.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    let mut shards: Vec<String> = Vec::new();
    for out in &outputs {
        assert!(out.status.success(), "{}", stderr(out));
        shards.extend(written(out));
    }
    shards.sort();
    let expected: Vec<String> = (0..6).map(|i| format!("shard-{i:05}.safetensors")).collect();
    assert_eq!(shards, expected, "each shard once:\n{}\n---\n{}", stderr(&outputs[0]), stderr(&outputs[1]));
    let mut files: Vec<String> =
        std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    assert_eq!(files.len(), 7, "six shards and cache.json, no claim left: {files:?}");

    // A rerun has nothing to do and says the cache is complete.
    let out = diffmoe(&args, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(written(&out).is_empty() && stderr(&out).contains("complete"), "{}", stderr(&out));
    // Another crop size into the same directory is refused, naming the setting.
    let mut other = args.to_vec();
    other[8] = "32";
    let out = diffmoe(&other, &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("image_size"), "{}", stderr(&out));

    // A latent model trains on the cache.
    let train_config = dir.join("latent.toml");
    std::fs::write(&train_config, LATENT_CONFIG).unwrap();
    let run = dir.join("run");
    let latents = format!("latents:{}", cache.display());
    let out = diffmoe(
        &["train", "--config", train_config.to_str().unwrap(), "--data", &latents, "--out", run.to_str().unwrap()],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let log = std::fs::read_to_string(run.join("log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 2, "{log}");

    // The rest of the latent pipeline: sample, decode with the VAE, and
    // score with FID against the image folder (stand-in Inception weights
    // of the real architecture).
    let grid = dir.join("samples/grid.png");
    let out = diffmoe(
        &[
            "sample",
            "--checkpoint",
            run.to_str().unwrap(),
            "--ema",
            "--per-class",
            "2",
            "--steps",
            "2",
            "--vae",
            vae.to_str().unwrap(),
            "--vae-config",
            config_path.to_str().unwrap(),
            "--out",
            grid.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let png = image::open(&grid).unwrap();
    assert_eq!((png.width(), png.height()), (2 * 18 + 2, 2 * 18 + 2), "two classes of two 16x16 decoded images");
    let arrays = diffmoe_train::read_npz(&dir.join("samples/grid/samples.npz")).unwrap();
    assert_eq!(arrays["arr_0"].shape, vec![4, 16, 16, 3]);
    let raw = diffmoe_train::read_npz(&dir.join("samples/grid/samples_raw.npz")).unwrap();
    assert_eq!(raw["samples"].shape, vec![4, 4, 8, 8], "the latents themselves");

    let inception = dir.join("inception.safetensors");
    diffmoe_eval::procedural_weights::write_procedural_inception(&inception, 3).unwrap();
    let scores = dir.join("scores.json");
    let folder = format!("folder:{}", images.display());
    let out = diffmoe(
        &[
            "eval",
            "--fid",
            "--inception",
            inception.to_str().unwrap(),
            "--samples",
            dir.join("samples/grid/samples.npz").to_str().unwrap(),
            "--reference",
            &folder,
            "--write-reference-stats",
            dir.join("reference.npz").to_str().unwrap(),
            "--json",
            scores.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let scores: serde_json::Value = serde_json::from_slice(&std::fs::read(&scores).unwrap()).unwrap();
    assert!(scores["frechet_distance"].as_f64().unwrap().is_finite(), "{scores}");
    assert!(scores["inception_score"].as_f64().unwrap() >= 1.0, "{scores}");
    let reference = diffmoe_train::read_npz(&dir.join("reference.npz")).unwrap();
    assert_eq!(reference["sigma"].shape, vec![2048, 2048]);
    // The saved statistics give the same FID.
    let again = diffmoe(
        &[
            "eval",
            "--fid",
            "--inception",
            inception.to_str().unwrap(),
            "--samples",
            dir.join("samples/grid/samples.npz").to_str().unwrap(),
            "--reference-stats",
            dir.join("reference.npz").to_str().unwrap(),
        ],
        &[],
    );
    assert!(again.status.success(), "{}", stderr(&again));
    let printed: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    let (a, b) = (printed["frechet_distance"].as_f64().unwrap(), scores["frechet_distance"].as_f64().unwrap());
    assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
    // A missing Inception file names the file users bring.
    let out = diffmoe(
        &[
            "eval",
            "--fid",
            "--inception",
            dir.join("nope.pth").to_str().unwrap(),
            "--samples",
            "x.npz",
            "--reference",
            "embedded",
        ],
        &[],
    );
    assert!(!out.status.success());
    let _ = std::fs::remove_dir_all(&dir);
}
