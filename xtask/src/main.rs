//! Development tasks: `cargo xtask parity [DIR]` checks this port against the
//! official implementation's fixtures; `cargo xtask bench` times training,
//! inference, sampling and MLP layers; `cargo xtask configs` writes the
//! preset TOML files of `configs/`.

mod bench;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use diffmoe_train::parity::{any_failed, check_dir, format_report};

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
    /// Check every case of DIR/index.json against this port; exits non-zero on any failure.
    Parity {
        /// A directory in the format of shared/fixtures/parity/README.md.
        #[arg(default_value = "../shared/fixtures/parity")]
        dir: PathBuf,
    },
    /// Time train steps, inference forwards, sampling and MLP layers; print a
    /// table and write JSON.
    Bench(bench::BenchArgs),
    /// Write configs/<name>.toml for the paper's table rows and the tiny presets.
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
    match Cli::parse().command {
        Command::Parity { dir } => {
            let device = Default::default();
            let rows = check_dir::<Backend>(&dir, &device).with_context(|| format!("parity on {}", dir.display()))?;
            print!("{}", format_report(&rows));
            if any_failed(&rows) {
                bail!("parity failed");
            }
            println!("parity: all checked groups within tolerance");
        }
        Command::Bench(args) => {
            let device = device(&args.device)?;
            let report = bench::run::<Backend>(&args, &device)?;
            print!("{}", bench::format_table(&report));
            if let Some(dir) = args.json.parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            let json = serde_json::to_string_pretty(&report)?;
            diffmoe_model::write_atomically(&args.json, json.as_bytes())?;
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
