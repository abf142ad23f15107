//! Development tasks: `cargo xtask parity [DIR...]` checks this port against
//! the reference implementations' fixtures (the official DiffMoE code,
//! diffusers' VAE, pytorch-fid's Inception and FID); `cargo xtask bench`
//! times training, inference, sampling and MLP layers; `cargo xtask configs`
//! writes the preset TOML files of `configs/`; `cargo xtask smoke-weights`
//! writes stand-in VAE and Inception weight files of the real architectures.

mod bench;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use diffmoe_parity::{any_failed, format_report};

/// Tensor buffers come and go by the hundred per step: mimalloc reuses their
/// memory where glibc would unmap it and fault it back in (a third of an
/// inference forward on the CPU). See [`keep_freed_memory`]. The bench's
/// memory column counts live bytes through [`bench::CountingAllocator`].
#[global_allocator]
static ALLOCATOR: bench::CountingAllocator<mimalloc::MiMalloc> =
    bench::CountingAllocator { inner: mimalloc::MiMalloc, counters: &bench::memory::COUNTERS };

/// Turns off mimalloc's purging (`mi_option_purge_delay = -1`): by default it
/// hands memory freed 10 ms ago back to the OS, and a training step, whose
/// activations are freed by the backward pass, faulted its buffers back in
/// page by page (a fifth of a CPU step). The process keeps its high-water
/// mark instead, as a GPU caching allocator does.
fn keep_freed_memory() {
    /// `mi_option_purge_delay` of `mimalloc.h` (not exported by the bindings).
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets one integer option of the allocator; valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

#[cfg(feature = "cuda")]
type Backend = burn::backend::Autodiff<burn::backend::Cuda>;
#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
type Backend = burn::backend::Autodiff<burn::backend::Wgpu>;
#[cfg(all(feature = "flex", not(any(feature = "cuda", feature = "wgpu"))))]
type Backend = burn::backend::Autodiff<burn::backend::Flex>;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check every case of each DIR/index.json against this port; exits
    /// non-zero on any failure. The kind of fixtures (DiffMoE models, VAE,
    /// Inception and FID) is read from the index.
    Parity {
        /// Directories in the formats of shared/fixtures/{parity,vae,inception}/README.md.
        #[arg(default_values = ["../shared/fixtures/parity", "../shared/fixtures/vae", "../shared/fixtures/inception"])]
        dirs: Vec<PathBuf>,
        /// Check only these cases (names from the directories' index.json,
        /// comma-separated or repeated); every case when absent.
        #[arg(long = "case", value_delimiter = ',')]
        cases: Vec<String>,
    },
    /// Write VAE (diffusers layout) and FID Inception (pytorch-fid weights-file
    /// layout) safetensors files of the real architectures and sizes with
    /// seeded random weights: stand-ins that exercise `cache-latents`,
    /// `sample --vae` and `eval --fid` where the pretrained files are not at
    /// hand. Their latents and features mean nothing.
    SmokeWeights {
        /// The VAE file to write (sd-vae-ft-mse architecture, 83.7 M parameters).
        #[arg(long)]
        vae: Option<PathBuf>,
        /// The Inception file to write (23.9 M parameters).
        #[arg(long)]
        inception: Option<PathBuf>,
        /// Seed of the weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Time train steps, inference forwards, sampling and MLP layers; print a
    /// table and write JSON.
    Bench(bench::BenchArgs),
    /// Write configs/NAME.toml for the paper's table rows and the tiny presets.
    Configs {
        /// Output directory.
        #[arg(long, default_value = "configs")]
        out: PathBuf,
    },
}

/// The configs/ files: one per row of the paper's tables, and the tiny presets.
const CONFIG_FILES: &[&str] = &[
    "dense-dit-s-flow",
    "dense-dit-b-flow",
    "dense-dit-l-flow",
    "dense-dit-xl-flow",
    "tc-dit-l-e16-flow",
    "ec-dit-l-e16-flow",
    "diffmoe-s-e16-flow",
    "diffmoe-b-e16-flow",
    "diffmoe-l-e8-flow",
    "diffmoe-l-e16-flow",
    "dense-dit-l-ddpm",
    "dense-dit-xl-ddpm",
    "tc-dit-l-e16-ddpm",
    "ec-dit-l-e16-ddpm",
    "diffmoe-l-e16-ddpm",
    "dense-dit-tiny-flow",
    "tc-dit-tiny-e8-flow",
    "ec-dit-tiny-e8-flow",
    "diffmoe-tiny-e8-flow",
    "dense-dit-tiny-ddpm",
    "diffmoe-tiny-e8-ddpm",
    "dense-dit-mini-flow",
    "tc-dit-mini-e8-flow",
    "ec-dit-mini-e8-flow",
    "diffmoe-mini-e8-flow",
];

type Device = burn::tensor::Device<Backend>;

/// Runs the parity checker that fits `dir/index.json` on its cases (those
/// named in `cases`, or all when it is empty) and prints its report;
/// returns whether a group failed and the cases it checked.
fn parity(dir: &std::path::Path, cases: &[String]) -> Result<(bool, Vec<String>)> {
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("index.json"))
            .with_context(|| format!("reading {}/index.json", dir.display()))?,
    )?;
    let device: Device = Default::default();
    let format = index["format"].as_str().unwrap_or_default();
    let chosen: Vec<String> = diffmoe_parity::index_cases(dir)?
        .into_iter()
        .map(|entry| entry.case)
        .filter(|case| cases.is_empty() || cases.contains(case))
        .collect();
    if chosen.is_empty() {
        return Ok((false, chosen));
    }
    println!("== {} ({format})", dir.display());
    let mut rows = Vec::new();
    for case in &chosen {
        rows.extend(if format.starts_with("VAE") {
            diffmoe_vae::parity::check_case::<Backend>(dir, case, &device)?
        } else if format.starts_with("FID Inception") {
            diffmoe_eval::parity::check_case::<Backend>(dir, case, &device)?
        } else {
            diffmoe_train::parity::check_case::<Backend>(dir, case, &device)?
        });
    }
    print!("{}", format_report(&rows));
    Ok((any_failed(&rows), chosen))
}

/// The device named by `--device`, which must belong to the compiled backend.
fn device(spec: &str) -> Result<Device> {
    let (kind, index) = match spec.split_once(':') {
        Some((kind, i)) => (kind, i.parse::<usize>().with_context(|| format!("--device {spec}: bad index"))?),
        None => (spec, 0),
    };
    let compiled = if cfg!(feature = "cuda") {
        "cuda"
    } else if cfg!(feature = "wgpu") {
        "wgpu"
    } else {
        "cpu"
    };
    if kind != compiled {
        bail!("--device {spec}: this xtask was built for {compiled} (build with --features cuda or wgpu for a GPU)");
    }
    #[cfg(feature = "cuda")]
    return Ok(burn::backend::cuda::CudaDevice::new(index));
    #[cfg(not(feature = "cuda"))]
    {
        if index != 0 {
            bail!("--device {spec}: only device 0 is supported for {compiled}");
        }
        Ok(Default::default())
    }
}

fn main() -> Result<()> {
    keep_freed_memory();
    match Cli::parse().command {
        Command::Parity { dirs, cases } => {
            let (mut failed, mut checked) = (false, Vec::new());
            for dir in &dirs {
                let (f, c) = parity(dir, &cases).with_context(|| format!("parity on {}", dir.display()))?;
                failed |= f;
                checked.extend(c);
            }
            if let Some(missing) = cases.iter().find(|case| !checked.contains(case)) {
                bail!("--case {missing}: no such case in the index.json of {dirs:?}");
            }
            if failed {
                bail!("parity failed");
            }
            println!("parity: all checked groups within tolerance");
        }
        Command::SmokeWeights { vae, inception, seed } => {
            if let Some(path) = vae {
                let config = diffmoe_vae::AutoencoderKlConfig::sd_vae_ft_mse();
                diffmoe_train::data::write_procedural_vae::<Backend>(&config, &path, seed)?;
                println!("wrote {} (random sd-vae-ft-mse architecture, diffusers key names)", path.display());
            }
            if let Some(path) = inception {
                diffmoe_eval::procedural_weights::write_procedural_inception(&path, seed)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("wrote {} (random FID Inception, pytorch-fid weights-file key names)", path.display());
            }
        }
        Command::Bench(args) => {
            let device = device(&args.device)?;
            let report = bench::run::<Backend>(&args, &device)?;
            print!("{}", bench::format_table(&report));
            if let Some(dir) = args.json.parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            let json = serde_json::to_string_pretty(&report)?;
            diffmoe_weights::write_atomically(&args.json, json.as_bytes())?;
            println!("wrote {}", args.json.display());
        }
        Command::Configs { out } => {
            std::fs::create_dir_all(&out)?;
            for name in CONFIG_FILES {
                let run = diffmoe_model::preset(name).with_context(|| format!("no preset {name}"))?;
                let path = out.join(format!("{name}.toml"));
                std::fs::write(&path, run.to_toml())?;
                println!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}
