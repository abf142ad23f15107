//! The benchmarked workloads. Each builds its model and inputs once, then
//! hands back a closure that runs one timed iteration and leaves its work
//! queued on the device (the caller synchronises before reading the clock).

use burn::module::{AutodiffModule, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use clap::ValueEnum;
use serde::Serialize;

use diffmoe_core::{LocalReplica, Routing, RoutingStats};
use diffmoe_model::{BlockMlp, DiT, DiTConfig, Family, MoeConfig, MoeLayout, Objective, RunConfig};
use diffmoe_train::sampler::{
    DdpmGuidance, DdpmMethod, DdpmSampler, DiTDenoiser, FlowGuidance, FlowSampler, FlowSolver, ModelVariance, Record,
    SeededNoise,
};
use diffmoe_train::{flow_loss, layer_capacity_loss, AdamW, DdpmSchedule, GradientBuffer, LossTerms};

/// What one timed iteration does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Forward with training routing, the objective's loss, backward, an
    /// AdamW update and the threshold update: one optimizer step.
    TrainStep,
    /// One forward pass without autodiff, in each inference routing mode.
    EvalForward,
    /// `--sample-steps` sampler steps from noise (Euler for flow models,
    /// respaced ancestral for DDPM), unguided, in each inference routing mode.
    Sample,
    /// The MLP layer alone, forward and backward with training routing and
    /// the layer's own training terms (DiffMoE's capacity loss, TC's
    /// load-balancing loss): a dense MLP against each MoE family at the
    /// preset's experts and capacity (equal activated parameters).
    MlpLayer,
}

impl Workload {
    /// The command-line spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::TrainStep => "train-step",
            Self::EvalForward => "eval-forward",
            Self::Sample => "sample",
            Self::MlpLayer => "mlp-layer",
        }
    }
}

/// One benchmark case, ready to run.
pub struct Case {
    /// `train`, `static`, `dynamic` or, for `mlp-layer`, the family.
    pub variant: String,
    /// The config whose FLOPs are counted (for `mlp-layer`, the layer's model).
    pub config: DiTConfig,
    /// Model calls per iteration (sampler steps; 1 otherwise).
    pub model_calls: usize,
    /// Forward-pass equivalents per model call for the FLOP count (3 for a
    /// training step).
    pub passes: f64,
    /// Expert-token evaluations per model call, summed over MoE blocks.
    pub expert_tokens: Option<f64>,
    /// For `mlp-layer`: FLOPs per iteration, counted for the layer alone.
    pub layer_flops: Option<f64>,
    /// One iteration.
    pub run: Box<dyn FnMut()>,
}

/// Random model inputs: `x`, `t` and `y` for `batch` images.
struct Inputs<B: Backend> {
    x: Tensor<B, 4>,
    noise: Tensor<B, 4>,
    t: Tensor<B, 1>,
    steps: Vec<usize>,
    y: Tensor<B, 1, Int>,
}

fn inputs<B: Backend>(config: &DiTConfig, batch: usize, device: &B::Device) -> Inputs<B> {
    let shape = [batch, config.in_channels, config.input_size, config.input_size];
    let labels: Vec<i64> = (0..batch).map(|i| (i % config.num_classes) as i64).collect();
    let steps: Vec<usize> = (0..batch).map(|i| (i * 997) % 1000).collect();
    Inputs {
        x: Tensor::random(shape, Distribution::Normal(0.0, 1.0), device),
        noise: Tensor::random(shape, Distribution::Normal(0.0, 1.0), device),
        t: Tensor::random([batch], Distribution::Uniform(0.0, 1.0), device),
        steps,
        y: Tensor::from_data(TensorData::new(labels, [batch]), device),
    }
}

/// Expert-token evaluations of one forward, summed over MoE blocks.
fn expert_tokens<B: Backend>(model: &DiT<B>, inputs: &Inputs<B>, routing: Routing) -> Option<f64> {
    let out = model.forward(inputs.x.clone(), inputs.t.clone(), inputs.y.clone(), routing);
    if out.routing.is_empty() {
        return None;
    }
    let total: i64 = out.routing.iter().map(|r| r.stats.tokens_per_expert.clone().sum().into_scalar_i64()).sum();
    Some(total as f64)
}

trait IntoI64 {
    fn into_scalar_i64(self) -> i64;
}

impl<B: Backend> IntoI64 for Tensor<B, 1, Int> {
    fn into_scalar_i64(self) -> i64 {
        self.into_data().convert::<i64>().to_vec::<i64>().expect("an integer count")[0]
    }
}

/// Every case's variant name: the training step, the inference routing
/// modes, the MLP families of `mlp-layer`.
pub const VARIANTS: [&str; 9] =
    ["train", "static", "dynamic", "per-token", "dynamic-all", "dense", "tc", "ec", "diffmoe"];

/// DiffMoE thresholds of an inference case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Thresholds {
    /// [`calibrated`]: about `capacity` experts per token.
    Calibrated,
    /// Below every probability: every token to every expert, the worst case
    /// of the threshold modes' memory (eval-forward only).
    AcceptAll,
}

/// The inference routing modes that differ for a family.
fn inference_routings(config: &DiTConfig, workload: Workload) -> Vec<(String, Routing, Thresholds)> {
    match config.family {
        Family::Diffmoe => {
            let mut modes = vec![
                ("static".into(), Routing::Static, Thresholds::Calibrated),
                ("dynamic".into(), Routing::DYNAMIC, Thresholds::Calibrated),
                ("per-token".into(), Routing::PER_TOKEN, Thresholds::Calibrated),
            ];
            if workload == Workload::EvalForward {
                modes.push(("dynamic-all".into(), Routing::DYNAMIC, Thresholds::AcceptAll));
            }
            modes
        }
        _ => vec![("static".into(), Routing::Static, Thresholds::Calibrated)],
    }
}

/// `model` with every DiffMoE threshold at -1.
fn accept_all<B: Backend>(mut model: DiT<B>) -> DiT<B> {
    for block in &mut model.blocks {
        if let BlockMlp::DiffMoe(layer) = &mut block.mlp {
            let below = layer.expert_threshold.val().zeros_like().sub_scalar(1.0);
            layer.expert_threshold = Param::from_tensor(below).set_require_grad(false);
        }
    }
    model
}

/// A model for inference whose DiffMoE thresholds are the per-expert
/// quantiles of one training-routing forward over the bench inputs: the
/// fixed point of the threshold EMA, as in a trained model, so dynamic
/// routing runs about `capacity` experts per token (freshly zeroed
/// thresholds would send every token to every expert).
fn calibrated<B: Backend>(config: &DiTConfig, inputs: &Inputs<B>, device: &B::Device) -> DiT<B> {
    let mut model = config.init::<B>(device);
    let out = model.forward(inputs.x.clone(), inputs.t.clone(), inputs.y.clone(), Routing::Train);
    for r in out.routing {
        if let (Some(quantile), BlockMlp::DiffMoe(layer)) = (r.stats.threshold_quantile, &mut model.blocks[r.block].mlp)
        {
            layer.expert_threshold = Param::from_tensor(quantile).set_require_grad(false);
        }
    }
    model
}

/// The cases of `workload` for `run` at `batch` images.
pub fn cases<B: AutodiffBackend>(
    workload: Workload,
    run: &RunConfig,
    batch: usize,
    sample_steps: usize,
    device: &B::Device,
) -> Vec<Case> {
    let config = run.model.clone();
    match workload {
        Workload::TrainStep => vec![train_step::<B>(run, batch, device)],
        Workload::EvalForward | Workload::Sample => {
            let inputs = inputs::<B::InnerBackend>(&config, batch, device);
            let model = calibrated(&config, &inputs, device);
            let objective = run.objective;
            inference_routings(&config, workload)
                .into_iter()
                .map(|(variant, routing, thresholds)| {
                    let model = match thresholds {
                        Thresholds::Calibrated => model.clone(),
                        Thresholds::AcceptAll => accept_all(model.clone()),
                    };
                    let inputs = inputs.clone_all();
                    let expert_tokens = expert_tokens(&model, &inputs, routing);
                    let (model_calls, run): (usize, Box<dyn FnMut()>) = match workload {
                        Workload::Sample => {
                            (sample_steps, Box::new(move || sample(&model, &inputs, routing, objective, sample_steps)))
                        }
                        _ => (
                            1,
                            Box::new(move || {
                                let out = model.forward(inputs.x.clone(), inputs.t.clone(), inputs.y.clone(), routing);
                                std::hint::black_box(out.output);
                            }),
                        ),
                    };
                    Case {
                        variant,
                        config: config.clone(),
                        model_calls,
                        passes: 1.0,
                        expert_tokens,
                        layer_flops: None,
                        run,
                    }
                })
                .collect()
        }
        Workload::MlpLayer => mlp_layer_cases::<B>(&config, batch, device),
    }
}

fn sample<B: Backend>(model: &DiT<B>, inputs: &Inputs<B>, routing: Routing, objective: Objective, steps: usize) {
    let denoiser = DiTDenoiser::new(model, routing);
    let z = inputs.noise.clone();
    let y = inputs.y.clone();
    let out = match objective {
        Objective::Flow => {
            let sampler = FlowSampler::new(steps, FlowSolver::Euler);
            sampler.sample(&denoiser, z, y, &FlowGuidance::Unguided, Record::FinalOnly).sample
        }
        Objective::Ddpm => {
            let variance =
                if model.config.learn_sigma { ModelVariance::LearnedRange } else { ModelVariance::FixedLarge };
            let sampler = DdpmSampler::new(&DdpmSchedule::linear(1000), &steps.to_string(), DdpmMethod::Ancestral)
                .expect("a positive step count is a valid respacing")
                .with_variance(variance);
            let mut noise = SeededNoise::new(0);
            sampler.sample(&denoiser, z, y, &DdpmGuidance::Unguided, &mut noise, Record::FinalOnly).sample
        }
    };
    std::hint::black_box(out);
}

impl<B: Backend> Inputs<B> {
    fn clone_all(&self) -> Self {
        Self {
            x: self.x.clone(),
            noise: self.noise.clone(),
            t: self.t.clone(),
            steps: self.steps.clone(),
            y: self.y.clone(),
        }
    }
}

fn train_step<B: AutodiffBackend>(run: &RunConfig, batch: usize, device: &B::Device) -> Case {
    let config = run.model.clone();
    let inputs = inputs::<B>(&config, batch, device);
    let expert_tokens = expert_tokens(&config.init::<B::InnerBackend>(device), &inputs.inner(), Routing::Train);
    let mut model = Some(config.init::<B>(device));
    let mut optimizer = AdamW::<B>::new(run.train.optimizer);
    let objective = run.objective;
    let schedule = DdpmSchedule::linear(1000);
    let lr = run.train.optimizer.learning_rate;
    Case {
        variant: "train".into(),
        config,
        model_calls: 1,
        passes: 3.0,
        expert_tokens,
        layer_flops: None,
        run: Box::new(move || {
            let m = model.take().expect("the model between steps");
            let terms: LossTerms<B> = match objective {
                Objective::Flow => {
                    flow_loss(&m, inputs.x.clone(), inputs.y.clone(), inputs.noise.clone(), inputs.t.clone())
                }
                Objective::Ddpm => {
                    schedule.training_loss(&m, inputs.x.clone(), inputs.y.clone(), &inputs.steps, inputs.noise.clone())
                }
            };
            let backward = terms.total.backward();
            let mut grads = GradientBuffer::<B>::new();
            grads.accumulate(&m, &backward);
            let m = optimizer.step(m, grads, lr);
            model = Some(m.with_updated_thresholds(&terms.output.routing, &LocalReplica));
        }),
    }
}

impl<B: AutodiffBackend> Inputs<B> {
    fn inner(&self) -> Inputs<B::InnerBackend> {
        Inputs {
            x: self.x.clone().inner(),
            noise: self.noise.clone().inner(),
            t: self.t.clone().inner(),
            steps: self.steps.clone(),
            y: self.y.clone().inner(),
        }
    }
}

/// What a MoE layer adds to the training loss: the capacity predictor's
/// BCE (DiffMoE) and the load-balancing loss (TC). Without them the
/// predictor's forward would be timed with no backward, and its graph, which
/// hangs off parameters that live across iterations, would never be freed:
/// the case would grow by megabytes per iteration and fault fresh pages.
///
/// # Shapes
/// -> `[1]`
fn layer_training_terms<B: Backend>(stats: RoutingStats<B>) -> Tensor<B, 1> {
    let device = stats.selection_mask.device();
    [layer_capacity_loss(&stats), stats.aux_loss]
        .into_iter()
        .flatten()
        .fold(Tensor::zeros([1], &device), |acc, term| acc + term)
}

/// The dense MLP and the MoE layer of each family at the experts and
/// capacity of `config` (a dense preset is compared with 8 experts at
/// capacity 1).
fn mlp_layer_cases<B: AutodiffBackend>(config: &DiTConfig, batch: usize, device: &B::Device) -> Vec<Case> {
    let moe = config.moe.clone().unwrap_or(MoeConfig {
        num_experts: 8,
        capacity: 1.0,
        n_shared_experts: None,
        layout: MoeLayout::All,
        capacity_loss_weight: 1.0,
    });
    let block = 0;
    let all_moe = MoeConfig { layout: MoeLayout::All, ..moe.clone() };
    let variants = [
        ("dense", DiTConfig { family: Family::Dense, moe: None, ..config.clone() }),
        ("tc", DiTConfig { family: Family::Tc, moe: Some(all_moe.clone()), ..config.clone() }),
        ("ec", DiTConfig { family: Family::Ec, moe: Some(all_moe.clone()), ..config.clone() }),
        ("diffmoe", DiTConfig { family: Family::Diffmoe, moe: Some(all_moe), ..config.clone() }),
    ];
    let tokens = config.tokens();
    let d = config.hidden_size;
    variants
        .into_iter()
        .map(|(name, layer_config)| {
            let mlp: BlockMlp<B> = layer_config.block_mlp(block, device);
            let x = Tensor::<B, 3>::random([batch, tokens, d], Distribution::Normal(0.0, 1.0), device).require_grad();
            let evals = {
                let (_, stats) = mlp.valid().forward(x.clone().inner(), Routing::Train);
                stats.map(|s| s.tokens_per_expert.sum().into_scalar_i64() as f64)
            };
            let ffn = match layer_config.mlp {
                diffmoe_core::ExpertKind::Gelu => 2 * d * layer_config.mlp_hidden(),
                diffmoe_core::ExpertKind::SwiGlu => 3 * d * layer_config.mlp_hidden(),
            } as f64;
            let n_tokens = (batch * tokens) as f64;
            let routing_weights = match layer_config.family {
                Family::Dense => 0.0,
                Family::Diffmoe => (d * moe.num_experts + d * d + d * moe.num_experts) as f64,
                _ => (d * moe.num_experts) as f64,
            };
            let forward = 2.0 * (evals.unwrap_or(n_tokens) * ffn + n_tokens * routing_weights);
            Case {
                variant: name.into(),
                config: layer_config,
                model_calls: 1,
                passes: 3.0,
                expert_tokens: evals,
                layer_flops: Some(3.0 * forward),
                run: Box::new(move || {
                    let (y, stats) = mlp.forward(x.clone(), Routing::Train);
                    let loss = stats.map_or(y.clone().sum(), |stats| y.sum() + layer_training_terms(stats));
                    let grads = loss.backward();
                    std::hint::black_box(x.grad(&grads));
                }),
            }
        })
        .collect()
}
