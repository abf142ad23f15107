//! The `diffmoe` command line: parses arguments and calls the library crates.

mod backend;
mod cache_latents;
mod classifier;
mod compare;
mod device;
mod eval;
mod info;
mod progress;
mod sample;
mod train;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use diffmoe_model::{load_weights, preset_names, save_weights, RunConfig, WeightSource};

/// Tensor buffers come and go by the hundred per step: mimalloc reuses their
/// memory where glibc would unmap it and fault it back in (a third of an
/// inference forward on the CPU). See [`keep_freed_memory`].
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

#[derive(Parser)]
#[command(name = "diffmoe", version, about = "DiffMoE diffusion transformers on burn")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Parameter counts (total, activated per token, per module) of a preset or config file.
    Info {
        /// A preset name (see `diffmoe presets`) or a TOML config file.
        config: String,
        /// Print only the totals.
        #[arg(long)]
        brief: bool,
    },
    /// List the presets.
    Presets,
    /// Train a model (flow or DDPM, any preset) on images or latents; resumable.
    Train(train::TrainArgs),
    /// Encode a folder of images (and their mirror images) with the SD VAE into
    /// latent shards for `train --data latents:DIR`; resumable, parallel-safe.
    CacheLatents(cache_latents::CacheLatentsArgs),
    /// The paper's comparison (Dense, TC, EC, DiffMoE at equal activated
    /// parameters) trained, sampled and scored on one dataset.
    Compare(compare::CompareArgs),
    /// Score samples against a reference set: Frechet distance, precision,
    /// recall and classifier accuracy, or FID and Inception Score with `--fid`.
    Eval(eval::EvalArgs),
    /// Train or test the feature classifier of the Fashion-MNIST evaluation.
    #[command(subcommand)]
    Classifier(classifier::ClassifierCommand),
    /// Sample a trained model: a grid, one PNG per sample, array files, and
    /// where the compute went.
    Sample(sample::SampleArgs),
    /// Convert official weights (`.safetensors` or a `train.py` checkpoint `.pt`)
    /// into this project's safetensors format (the config stored inside).
    Convert {
        /// The official weight file.
        weights: PathBuf,
        /// Preset or config file describing the network.
        #[arg(long)]
        config: String,
        /// Read the EMA weights of a `.pt` checkpoint instead of `model`.
        #[arg(long)]
        ema: bool,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> Result<()> {
    keep_freed_memory();
    match Cli::parse().command {
        Command::Info { config, brief } => {
            let run = RunConfig::resolve(&config)?;
            print!("{}", info::report(&run, !brief));
        }
        Command::Train(args) => train::run(args)?,
        Command::CacheLatents(args) => cache_latents::run(args)?,
        Command::Sample(args) => sample::run(args)?,
        Command::Classifier(command) => classifier::run(command)?,
        Command::Compare(args) => compare::run(args)?,
        Command::Eval(args) => eval::run(args)?,
        Command::Presets => {
            for name in preset_names() {
                println!("{name}");
            }
        }
        Command::Convert { weights, config, ema, out } => {
            let run = RunConfig::resolve(&config)?;
            let source = if ema { WeightSource::Ema } else { WeightSource::Model };
            let device = Default::default();
            let model = load_weights::<backend::Backend>(&weights, Some(&run.model), source, &device)
                .with_context(|| format!("loading {}", weights.display()))?;
            save_weights(&model, &out).with_context(|| format!("writing {}", out.display()))?;
            println!("wrote {} ({} weights of {})", out.display(), if ema { "EMA" } else { "model" }, run.name);
        }
    }
    Ok(())
}
