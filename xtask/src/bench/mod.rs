//! `cargo xtask bench`: timings of training steps, inference forwards,
//! sampling and MLP layers, for any preset or shape, on the backend the
//! binary was built with. Every case is warmed up first; the device is
//! synchronised before the clock is read. A table goes to stdout and every
//! figure to a JSON file (see docs/benchmarks.md).

pub mod flops;
pub mod memory;
pub mod workload;

pub use memory::CountingAllocator;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Tensor};
use clap::Args;
use serde::Serialize;

use diffmoe_model::{Family, RunConfig};

use workload::{cases, Workload};

/// Arguments of `cargo xtask bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Presets or config files to run (comma-separated or repeated).
    #[arg(long, value_delimiter = ',', default_value = "dense-dit-tiny-flow,diffmoe-tiny-e8-flow")]
    pub preset: Vec<String>,
    /// Workloads (comma-separated or repeated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "train-step,eval-forward,sample,mlp-layer")]
    pub workload: Vec<Workload>,
    /// Images per iteration.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Input side in pixels or latent cells (default: the preset's).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Input channels (default: the preset's).
    #[arg(long)]
    pub channels: Option<usize>,
    /// Patch size (default: the preset's).
    #[arg(long)]
    pub patch_size: Option<usize>,
    /// `cpu`, `cuda`, `cuda:N` or `wgpu`; it must match the backend the
    /// binary was built with (`--features cuda`, `--features wgpu`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Timed iterations per case (after the warm-up).
    #[arg(long, default_value_t = 10)]
    pub repeat: usize,
    /// Untimed iterations per case before timing.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Only these variants (comma-separated or repeated): routing modes of
    /// `eval-forward` and `sample` (`static`, `dynamic`, `per-token`,
    /// `dynamic-all`), `train`, or MLP families of `mlp-layer` (`dense`,
    /// `tc`, `ec`, `diffmoe`); all by default.
    #[arg(long, value_delimiter = ',')]
    pub variant: Vec<String>,
    /// Sampler steps of the `sample` workload.
    #[arg(long, default_value_t = 4)]
    pub sample_steps: usize,
    /// Where the JSON report goes.
    #[arg(long, default_value = "target/bench/bench.json")]
    pub json: PathBuf,
}

/// One measured case.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Preset name.
    pub preset: String,
    /// Model family.
    pub family: String,
    /// Workload.
    pub workload: Workload,
    /// `train`, `static`, `dynamic`, or the MLP family of `mlp-layer`.
    pub variant: String,
    /// Images per iteration.
    pub batch: usize,
    /// Tokens per image.
    pub tokens_per_image: usize,
    /// Timed iterations.
    pub repeat: usize,
    /// Median seconds per iteration.
    pub median_s: f64,
    /// Fastest iteration.
    pub min_s: f64,
    /// Slowest iteration.
    pub max_s: f64,
    /// Tokens through the model per second (per model call times calls).
    pub tokens_per_s: f64,
    /// Images per second.
    pub images_per_s: f64,
    /// Heap bytes the case holds at its worst: what its preset holds between
    /// iterations plus the most one iteration allocates (CPU only; `memory.rs`).
    pub peak_memory_bytes: Option<u64>,
    /// Model FLOPs of one iteration (see `flops.rs`).
    pub flops: f64,
    /// Achieved FLOP/s over the device's measured matmul peak.
    pub mfu: f64,
    /// Expert-token evaluations per model call over all MoE blocks, over
    /// tokens times MoE blocks: the experts a token meets on average.
    pub experts_per_token: Option<f64>,
    /// Median over the median of the dense row of the same workload in this
    /// run, where there is one.
    pub vs_dense: Option<f64>,
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The working tree's commit, `-dirty` if tracked files were changed
    /// (`git describe`), where git and the repository are at hand.
    pub commit: Option<String>,
    /// The backend and device.
    pub device: String,
    /// Measured f32 matmul rate used for MFU, FLOP/s (the better of before
    /// and after the cases).
    pub matmul_peak_flops: f64,
    /// The side of the square matmul that measured it.
    pub matmul_peak_size: usize,
    /// The command line.
    pub command: String,
    /// One row per case.
    pub rows: Vec<Row>,
}

/// Runs the benchmark on backend `B`.
pub fn run<B: AutodiffBackend>(args: &BenchArgs, device: &B::Device) -> Result<Report> {
    if args.repeat == 0 || args.batch == 0 || args.sample_steps == 0 {
        bail!("--repeat, --batch and --sample-steps must be at least 1");
    }
    let runs = args
        .preset
        .iter()
        .map(|name| {
            let mut run = RunConfig::resolve(name).with_context(|| format!("--preset {name}"))?;
            if let Some(s) = args.image_size {
                run.model.input_size = s;
            }
            if let Some(c) = args.channels {
                run.model.in_channels = c;
            }
            if let Some(p) = args.patch_size {
                run.model.patch_size = p;
            }
            run.model.validate().with_context(|| format!("--preset {name} with the given shape"))?;
            Ok(run)
        })
        .collect::<Result<Vec<_>>>()?;

    if let Some(unknown) = args.variant.iter().find(|v| !workload::VARIANTS.contains(&v.as_str())) {
        bail!("--variant {unknown}: not one of {}", workload::VARIANTS.join(", "));
    }

    let (peak_before, size) = matmul_peak::<B::InnerBackend>(device);
    let device_name = B::name(device);
    eprintln!("{device_name}: f32 matmul {size}^3 at {:.1} GFLOP/s", peak_before / 1e9);

    let cpu = device_name.contains("flex");
    let sync = || B::sync(device).map_err(|e| anyhow::anyhow!("device sync: {e:?}"));
    let mut rows = Vec::new();
    for &workload in &args.workload {
        // Every preset's cases of this workload, warmed up, then timed in
        // turns (one iteration of each per round), so that drifts of the
        // machine's speed fall on all of them alike.
        let mut timed = Vec::new();
        for run in &runs {
            let before = memory::live_bytes();
            let mut group = Vec::new();
            let all = cases::<B>(workload, run, args.batch, args.sample_steps, device);
            for mut case in all.into_iter().filter(|c| args.variant.is_empty() || args.variant.contains(&c.variant)) {
                eprintln!("{} {} {}: warming up", run.name, workload.name(), case.variant);
                for _ in 0..args.warmup {
                    (case.run)();
                }
                sync()?;
                group.push(case);
            }
            // What the preset's cases hold between iterations.
            let resident = memory::live_bytes().saturating_sub(before);
            timed.extend(group.into_iter().map(|case| Timed { run, case, resident, times: Vec::new(), transient: 0 }));
        }
        for _ in 0..args.repeat {
            for t in &mut timed {
                let live = memory::live_bytes();
                memory::reset_peak();
                let start = Instant::now();
                (t.case.run)();
                sync()?;
                t.times.push(start.elapsed().as_secs_f64());
                t.transient = t.transient.max(memory::peak_bytes().saturating_sub(live));
            }
        }
        for Timed { run, case, resident, mut times, transient } in timed {
            let peak_memory_bytes = cpu.then_some(resident + transient);
            times.sort_by(f64::total_cmp);
            let median = times[times.len() / 2];
            eprintln!("{} {} {}: {median:.4} s", run.name, workload.name(), case.variant);
            let tokens = case.config.tokens();
            let flops = case.layer_flops.unwrap_or_else(|| {
                case.passes
                    * case.model_calls as f64
                    * flops::forward_flops(&case.config, args.batch, case.expert_tokens)
            });
            let moe_blocks = match workload {
                Workload::MlpLayer => 1,
                _ => case.config.moe_blocks().len(),
            };
            let experts_per_token =
                case.expert_tokens.filter(|_| moe_blocks > 0).map(|e| e / (args.batch * tokens * moe_blocks) as f64);
            rows.push(Row {
                preset: run.name.clone(),
                family: format!("{:?}", case.config.family).to_lowercase(),
                workload,
                variant: case.variant,
                batch: args.batch,
                tokens_per_image: tokens,
                repeat: args.repeat,
                median_s: median,
                min_s: times[0],
                max_s: times[times.len() - 1],
                tokens_per_s: (args.batch * tokens * case.model_calls) as f64 / median,
                images_per_s: args.batch as f64 / median,
                peak_memory_bytes,
                flops,
                mfu: flops / median, // over the peak below
                experts_per_token,
                vs_dense: None,
            });
        }
    }
    // The peak again after the cases, the better of the two kept: a machine
    // whose speed drifts (shared CPUs) may have been slow at the start.
    let peak = peak_before.max(matmul_peak::<B::InnerBackend>(device).0);
    for row in &mut rows {
        row.mfu /= peak;
    }
    relate_to_dense(&mut rows, &runs);
    Ok(Report {
        commit: git_commit(),
        device: device_name,
        matmul_peak_flops: peak,
        matmul_peak_size: size,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        rows,
    })
}

/// A case being timed.
struct Timed<'a> {
    run: &'a RunConfig,
    case: workload::Case,
    /// Bytes the case's preset holds between iterations.
    resident: u64,
    /// Seconds of each timed iteration.
    times: Vec<f64>,
    /// The most bytes one iteration allocated beyond those alive at its start.
    transient: u64,
}

/// Fills `vs_dense`: against the dense variant for `mlp-layer`, and against
/// the dense preset's row of the same workload otherwise.
fn relate_to_dense(rows: &mut [Row], runs: &[RunConfig]) {
    let dense_presets: Vec<&str> =
        runs.iter().filter(|r| r.model.family == Family::Dense).map(|r| r.name.as_str()).collect();
    let reference: Vec<(Workload, String, f64)> = rows
        .iter()
        .filter(|r| match r.workload {
            Workload::MlpLayer => r.variant == "dense",
            _ => dense_presets.contains(&r.preset.as_str()),
        })
        .map(|r| (r.workload, r.preset.clone(), r.median_s))
        .collect();
    for row in rows.iter_mut() {
        let dense = reference
            .iter()
            .find(|(w, preset, _)| *w == row.workload && (row.workload != Workload::MlpLayer || *preset == row.preset));
        row.vs_dense = dense.map(|(_, _, m)| row.median_s / m);
    }
}

/// The f32 matmul rate of the device: the best of five square products,
/// 1024^2 on the CPU, 8192^2 on CUDA, 4096^2 on wgpu (whose adapters often
/// cap a storage buffer at 128 MiB or 256 MiB).
fn matmul_peak<B: Backend>(device: &B::Device) -> (f64, usize) {
    let name = B::name(device);
    let size = if name.contains("flex") {
        1024
    } else if name.contains("cuda") {
        8192
    } else {
        4096
    };
    let a = Tensor::<B, 2>::random([size, size], Distribution::Normal(0.0, 1.0), device);
    let b = Tensor::<B, 2>::random([size, size], Distribution::Normal(0.0, 1.0), device);
    let mut best = f64::INFINITY;
    for i in 0..7 {
        let start = Instant::now();
        std::hint::black_box(a.clone().matmul(b.clone()));
        B::sync(device).expect("device sync");
        if i >= 2 {
            best = best.min(start.elapsed().as_secs_f64());
        }
    }
    (2.0 * (size as f64).powi(3) / best, size)
}

/// The working tree's commit, abbreviated, with "-dirty" where tracked files
/// differ from it.
fn git_commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=7", "--exclude=*"])
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The table printed after a run.
pub fn format_table(report: &Report) -> String {
    let mut s = format!(
        "device {} (f32 matmul peak {:.1} GFLOP/s), commit {}\n",
        report.device,
        report.matmul_peak_flops / 1e9,
        report.commit.as_deref().unwrap_or("?")
    );
    s += &format!(
        "{:<26} {:<13} {:<8} {:>10} {:>10} {:>10} {:>7} {:>9} {:>8} {:>9}\n",
        "preset", "workload", "variant", "median s", "img/s", "tok/s", "MFU", "peak MB", "exp/tok", "vs dense"
    );
    for r in &report.rows {
        let opt = |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |v| format!("{v:.prec$}"));
        s += &format!(
            "{:<26} {:<13} {:<8} {:>10.4} {:>10.1} {:>10.0} {:>6.1}% {:>9} {:>8} {:>9}\n",
            r.preset,
            r.workload.name(),
            r.variant,
            r.median_s,
            r.images_per_s,
            r.tokens_per_s,
            100.0 * r.mfu,
            r.peak_memory_bytes.map_or("-".to_string(), |b| format!("{:.0}", b as f64 / (1 << 20) as f64)),
            opt(r.experts_per_token, 2),
            opt(r.vs_dense, 2),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    type Ad = burn::backend::Autodiff<burn::backend::Flex>;

    #[test]
    fn every_case_of_every_preset_gets_a_row_related_to_dense() {
        let args = BenchArgs {
            preset: vec!["dense-dit-tiny-flow".into(), "diffmoe-tiny-e8-flow".into()],
            workload: vec![Workload::TrainStep, Workload::EvalForward],
            batch: 2,
            image_size: Some(8),
            channels: None,
            patch_size: None,
            device: "cpu".into(),
            repeat: 2,
            warmup: 1,
            sample_steps: 1,
            variant: Vec::new(),
            json: PathBuf::new(),
        };
        let report = run::<Ad>(&args, &Default::default()).expect("bench runs");
        let cases: Vec<(&str, &str)> = report.rows.iter().map(|r| (r.preset.as_str(), r.variant.as_str())).collect();
        assert_eq!(
            cases,
            [
                ("dense-dit-tiny-flow", "train"),
                ("diffmoe-tiny-e8-flow", "train"),
                ("dense-dit-tiny-flow", "static"),
                ("diffmoe-tiny-e8-flow", "static"),
                ("diffmoe-tiny-e8-flow", "dynamic"),
                ("diffmoe-tiny-e8-flow", "per-token"),
                ("diffmoe-tiny-e8-flow", "dynamic-all"),
            ]
        );
        for row in &report.rows {
            assert!(workload::VARIANTS.contains(&row.variant.as_str()), "{row:?}");
            assert!(row.min_s > 0.0 && row.min_s <= row.median_s && row.median_s <= row.max_s, "{row:?}");
            assert!(row.mfu.is_finite() && row.mfu > 0.0, "{row:?}");
            // The model alone is resident between iterations.
            assert!(row.peak_memory_bytes.expect("counted on the CPU") > 100_000, "{row:?}");
            let dense = report
                .rows
                .iter()
                .find(|d| d.preset == "dense-dit-tiny-flow" && d.workload == row.workload)
                .expect("a dense row per workload");
            assert_eq!(row.vs_dense, Some(row.median_s / dense.median_s));
        }
    }

    #[test]
    fn variants_select_cases_and_unknown_ones_are_refused() {
        let mut args = BenchArgs {
            preset: vec!["diffmoe-tiny-e8-flow".into()],
            workload: vec![Workload::EvalForward, Workload::MlpLayer],
            batch: 2,
            image_size: Some(8),
            channels: None,
            patch_size: None,
            device: "cpu".into(),
            repeat: 1,
            warmup: 0,
            sample_steps: 1,
            variant: vec!["dynamic".into(), "dense".into(), "diffmoe".into()],
            json: PathBuf::new(),
        };
        let report = run::<Ad>(&args, &Default::default()).expect("bench runs");
        let cases: Vec<(Workload, &str)> = report.rows.iter().map(|r| (r.workload, r.variant.as_str())).collect();
        assert_eq!(
            cases,
            [(Workload::EvalForward, "dynamic"), (Workload::MlpLayer, "dense"), (Workload::MlpLayer, "diffmoe")]
        );
        args.variant = vec!["dynamic".into(), "fast".into()];
        let err = run::<Ad>(&args, &Default::default()).expect_err("an unknown variant");
        assert!(err.to_string().contains("--variant fast"), "{err}");
    }
}
