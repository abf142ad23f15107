//! Parity against the official implementation: reads a directory of fixtures
//! in the format of `shared/fixtures/parity/README.md` (an `index.json`, then
//! `<case>.safetensors` + `<case>.json` per case), recomputes every stored
//! output with this crate, and compares.
//!
//! Every output tensor of a case is compared, the sampling trajectories
//! included (every model call, every step, the final samples, through the
//! samplers of `crate::sampler`); an output nobody computes is a failure, so
//! a new kind of fixture can never pass silently.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::AutodiffModule;
use burn::tensor::{backend::AutodiffBackend, backend::Backend, ElementConversion, Int, Tensor};
use serde_json::Value;

pub use diffmoe_parity::{any_failed, format_report, ParityRow, Status};
use diffmoe_parity::{check_index, Fixture, FixtureError, Stored};

use diffmoe_core::{LocalReplica, Routing, RoutingStats};
use diffmoe_model::{
    sincos_pos_embed_2d, timestep_embedding, Activations, BlockMlp, BlockRouting, CfgChannels, DiT, DiTConfig, Family,
    StateDict,
};
use diffmoe_weights::HostTensor;

use crate::ddpm::DdpmSchedule;
use crate::flow::flow_loss;
use crate::gradients::gradient_model;
use crate::loss_terms::LossTerms;
use crate::sampler::{
    ClipDenoised, DdpmGuidance, DdpmMethod, DdpmSampler, DdpmStep, DiTDenoiser, FlowGuidance, FlowSampler, FlowSolver,
    GivenNoise, ModelCall, Record,
};

/// Outputs, losses and gradients must lie within this fraction of the
/// reference's largest magnitude. A correct f32 port lands near 1e-6 on
/// outputs and 1e-5 on gradients (the official code sums in other orders,
/// e.g. SwiGLU's `pretraining_tp` slices and SDPA's fused kernel).
/// Sampling trajectories use the same bound, step by step; the errors a
/// sampler adds stay near 1e-6 over the fixtures' 4 flow and 10 DDPM steps
/// (DDIM's clipped `x_0`: 2e-5, see `Computed::ddpm_floors`).
pub const RELATIVE_TOLERANCE: f64 = 1e-4;

/// The share of the `x_0` comparison floor, times the step's coefficient,
/// that a DDPM run's later samples are compared against
/// (`Computed::ddpm_floors`). The `x_0` floor is the size of the terms
/// whose f32 rounding the network's error is amplified from; a correct port's
/// error is near 1e-6 of it, a hundredth of [`RELATIVE_TOLERANCE`]. A tenth
/// of it as the samples' floor keeps ten times that carried error within the
/// tolerance, and still fails a sampler error above 1e-5 of the floor.
pub const CARRIED_FLOOR_SHARE: f64 = 0.1;

/// Why a parity run could not start.
#[derive(Debug, thiserror::Error)]
pub enum ParityError {
    /// A fixture file could not be read, or lacks what a case needs.
    #[error(transparent)]
    Fixture(#[from] FixtureError),
    /// The fixture's model could not be built.
    #[error("case {case}: cannot build the model")]
    Model {
        /// The case.
        case: String,
        /// The cause.
        #[source]
        source: Box<diffmoe_model::ImportError>,
    },
}

/// What this port computed for a case, under the fixture's key names.
#[derive(Default)]
struct Computed {
    tensors: BTreeMap<String, HostTensor>,
    /// For a stacked trajectory, the smallest comparison scale of each step
    /// (see [`Computed::ddpm_floors`]); the reference's own magnitude is
    /// used where it is larger.
    step_floors: BTreeMap<String, Vec<f64>>,
}

impl Computed {
    fn put<B: Backend, const D: usize>(&mut self, key: impl Into<String>, t: Tensor<B, D>) {
        self.tensors.insert(key.into(), HostTensor::from_tensor(t));
    }

    /// A one-element tensor stored as the reference's scalar (shape `[]`);
    /// kept rank 1 on the device, since CUDA tensors cannot be rank 0.
    fn put_scalar<B: Backend>(&mut self, key: impl Into<String>, t: Tensor<B, 1>) {
        let mut host = HostTensor::from_tensor(t);
        host.shape.clear();
        self.tensors.insert(key.into(), host);
    }

    fn scalar(&mut self, key: impl Into<String>, v: f64) {
        self.tensors.insert(key.into(), HostTensor { shape: vec![], data: vec![v as f32] });
    }

    /// The output, activations and routing of one forward of `model`.
    fn forward<B: Backend>(
        &mut self,
        prefix: &str,
        model: &DiT<B>,
        x: Tensor<B, 4>,
        t: Tensor<B, 1>,
        y: Tensor<B, 1, Int>,
        routing: Routing,
    ) {
        let (out, act) = model.forward_traced(x, t, y, routing);
        self.put(format!("{prefix}.out"), out.output.clone());
        self.activations(prefix, act);
        self.routing(prefix, model, &out.routing);
    }

    fn activations<B: Backend>(&mut self, prefix: &str, a: Activations<B>) {
        let items = [("patch_embed", a.patch_embed), ("final_layer", a.final_layer)];
        for (name, t) in items {
            if let Some(t) = t {
                self.put(format!("{prefix}.act.{name}"), t);
            }
        }
        if let Some(t) = a.t_emb {
            self.put(format!("{prefix}.act.t_emb"), t);
        }
        if let Some(t) = a.y_emb {
            self.put(format!("{prefix}.act.y_emb"), t);
        }
        for (i, t) in a.blocks.into_iter().enumerate() {
            self.put(format!("{prefix}.act.block.{i}"), t);
        }
    }

    fn routing<B: Backend>(&mut self, prefix: &str, model: &DiT<B>, routing: &[BlockRouting<B>]) {
        for r in routing {
            let p = format!("{prefix}.moe.L{}", r.block);
            let s: &RoutingStats<B> = &r.stats;
            self.put(format!("{p}.ones"), s.selection_mask.clone());
            self.put(format!("{p}.combine_weights"), s.combine_weights.clone());
            self.put(format!("{p}.tokens_per_expert"), s.tokens_per_expert.clone().float());
            if let Some(k) = s.k {
                self.scalar(format!("{p}.k"), k as f64);
            }
            if let Some(t) = &s.capacity_logits {
                self.put(format!("{p}.capacity_logits"), t.clone());
            }
            if let Some(aux) = &s.aux_loss {
                self.put_scalar(format!("{p}.aux_loss"), aux.clone());
            }
            if let (Some(q), BlockMlp::DiffMoe(layer)) = (&s.threshold_quantile, &model.blocks[r.block].mlp) {
                self.put(format!("{p}.threshold_quantile"), q.clone());
                self.put(format!("{p}.expert_threshold_after"), layer.updated_thresholds(q.clone(), &LocalReplica));
            }
        }
    }

    /// Every model call of a sampler, stacked along a new leading axis:
    /// `{prefix}.x`, `.t`, `.y`, `.out` of shapes `[calls, batch, ...]`.
    fn calls<B: Backend>(&mut self, prefix: &str, calls: &[ModelCall<B>]) {
        if calls.is_empty() {
            return;
        }
        let stack4 =
            |f: &dyn Fn(&ModelCall<B>) -> Tensor<B, 4>| Tensor::<B, 4>::stack::<5>(calls.iter().map(f).collect(), 0);
        self.put(format!("{prefix}.x"), stack4(&|c| c.x.clone()));
        self.put(format!("{prefix}.out"), stack4(&|c| c.out.clone()));
        self.put(format!("{prefix}.t"), Tensor::<B, 1>::stack::<2>(calls.iter().map(|c| c.t.clone()).collect(), 0));
        let y = Tensor::<B, 1, Int>::stack::<2>(calls.iter().map(|c| c.y.clone()).collect(), 0);
        self.put(format!("{prefix}.y"), y.float());
    }

    /// The comparison floors of a DDPM run's steps, for its `x_0`
    /// predictions and its samples.
    ///
    /// `x_0 = sqrt(1/acp_t) x_t - sqrt(1/acp_t - 1) eps` multiplies the
    /// network's `eps`, and with it the f32 error that the network's own
    /// check (`calls.out`) allows, by `sqrt(1/acp_t - 1)`: 157 at `t = 999`,
    /// where two terms of a few hundred cancel to a value in `[-1, 1]` once
    /// clipped. So each `x_0` is compared relative to `sqrt(1/acp_t - 1) *
    /// max|eps_t|` where that exceeds the reference's magnitude (only the
    /// first steps of a clipped run: unclipped predictions are themselves
    /// that large).
    ///
    /// That error of `x_0` reaches the sample times the step's
    /// [`DdpmSampler::xstart_coefficient`], and a deterministic (DDIM) run
    /// carries it to the end, where a clipped run's samples are of order 1:
    /// with a first step from `t = 999` to 500 (respacing `"3,2"`) the
    /// coefficient is 0.27, and an f32 port's final samples differ from the
    /// official ones by about 1.2e-4 of their magnitude. So each step adds
    /// [`CARRIED_FLOOR_SHARE`] of `|coefficient| * sqrt(1/acp_t - 1) *
    /// max|eps_t|` to a floor that the later samples carry, and an `x_0` is
    /// compared relative to at least `sqrt(1/acp_t)` times the floor its
    /// `x_t` carries. Where the first step is small (respacing `"10"`:
    /// coefficient 0.03), the floors stay below the samples' own magnitude
    /// and change nothing.
    fn ddpm_floors<B: Backend>(&mut self, prefix: &str, sampler: &DdpmSampler, steps: &[DdpmStep<B>]) {
        let (mut xstart, mut samples) = (Vec::new(), Vec::new());
        let mut carried = 0.0f64;
        for (i, step) in steps.iter().enumerate() {
            let index = sampler.steps() - 1 - i; // the loop runs down from the last index
            let acp = sampler.schedule().alphas_cumprod[index];
            let channels = step.pred_xstart.dims()[1];
            let eps: f32 = step.call.out.clone().narrow(1, 0, channels).abs().max().into_scalar().elem();
            let amplified = (1.0 / acp - 1.0).sqrt() * eps as f64;
            xstart.push(amplified.max((1.0 / acp).sqrt() * carried));
            carried += CARRIED_FLOOR_SHARE * sampler.xstart_coefficient(index).abs() * amplified;
            samples.push(carried);
        }
        self.step_floors.insert(format!("{prefix}.pred_xstart"), xstart);
        self.step_floors.insert(format!("{prefix}.samples"), samples);
    }

    fn schedule(&mut self, prefix: &str, schedule: &DdpmSchedule) {
        let arrays: [(&str, &Vec<f64>); 7] = [
            ("betas", &schedule.betas),
            ("alphas_cumprod", &schedule.alphas_cumprod),
            ("alphas_cumprod_prev", &schedule.alphas_cumprod_prev),
            ("posterior_variance", &schedule.posterior_variance),
            ("posterior_log_variance_clipped", &schedule.posterior_log_variance_clipped),
            ("posterior_mean_coef1", &schedule.posterior_mean_coef1),
            ("posterior_mean_coef2", &schedule.posterior_mean_coef2),
        ];
        for (name, a) in arrays {
            let data = a.iter().map(|&v| v as f32).collect();
            self.tensors.insert(format!("{prefix}.{name}"), HostTensor { shape: vec![a.len()], data });
        }
    }

    fn loss_terms<B: Backend>(&mut self, prefix: &str, model: &DiT<B>, terms: &LossTerms<B>, t_in: Tensor<B, 1>) {
        self.put(format!("{prefix}.mse"), terms.mse.clone());
        if let Some(vb) = &terms.vb {
            self.put(format!("{prefix}.vb"), vb.clone());
        }
        self.put_scalar(format!("{prefix}.loss"), terms.loss.clone());
        self.put_scalar(format!("{prefix}.cp_loss"), terms.capacity_loss.clone());
        self.put_scalar(format!("{prefix}.aux_loss_sum"), terms.aux_loss.clone());
        for (block, bce) in &terms.capacity {
            self.put_scalar(format!("{prefix}.Capacity_Pred_loss.L{block}"), bce.clone());
        }
        self.put(format!("{prefix}.model_in.x"), terms.model_input.clone());
        self.put(format!("{prefix}.model_in.t"), t_in);
        self.put(format!("{prefix}.model_out"), terms.output.output.clone());
        self.routing(prefix, model, &terms.output.routing);
    }
}

fn family_of(case: &str, meta: &Value) -> Option<Family> {
    match meta["family"].as_str()? {
        "dit" | "dense" => Some(Family::Dense),
        "tc" => Some(Family::Tc),
        "ec" => Some(Family::Ec),
        "diffmoe" => Some(Family::Diffmoe),
        _ => {
            let _ = case;
            None
        }
    }
}

/// Recomputes every output of a model case.
fn compute_model_case<B: AutodiffBackend>(
    case: &str,
    fx: &Fixture,
    device: &B::Device,
) -> Result<Computed, ParityError> {
    let malformed = |reason: String| ParityError::from(fx.manifest_error(reason));
    let family = family_of(case, &fx.meta).ok_or_else(|| malformed("unknown `family`".into()))?;
    let kwargs = &fx.meta["config"]["constructor_kwargs"];
    let config = DiTConfig::from_official_kwargs(family, kwargs)
        .map_err(|e| malformed(format!("config.constructor_kwargs: {e}")))?;
    let mut sd = StateDict::default();
    for (k, v) in fx.tensors.iter().filter(|(k, _)| k.starts_with("model.")) {
        let data = v.values.iter().map(|&x| x as f32).collect();
        sd.tensors.insert(k["model.".len()..].to_string(), HostTensor { shape: v.shape.clone(), data });
    }
    let model: DiT<B> = sd
        .to_model(&config, device)
        .map_err(|source| ParityError::Model { case: case.to_string(), source: Box::new(source) })?;
    let mut c = Computed::default();
    let t_input = |fx: &Fixture, key: &str| fx.float::<B, 1>(key, device);

    // Inference runs as `diffmoe sample` and `eval` run it: on the backend
    // without autodiff (where the CPU backend skips the experts' padding).
    let inference = model.valid();

    // Forwards: train, eval (dynamic routing for DiffMoE), static.
    let (x, t, y) = (fx.float::<B, 4>("inputs.x", device)?, t_input(fx, "inputs.t")?, fx.int::<B>("inputs.y", device)?);
    c.forward("train", &model, x.clone(), t.clone(), y.clone(), Routing::Train);
    c.forward("eval", &inference, x.clone().inner(), t.clone().inner(), y.clone().inner(), Routing::DYNAMIC);
    if family == Family::Diffmoe {
        c.forward("static", &model, x, t, y, Routing::Static);
    }

    // The training loss and the gradient of every parameter.
    let grads = if fx.tensors.contains_key("loss.x1") {
        let terms = flow_loss(
            &model,
            fx.float("loss.x1", device)?,
            fx.int("loss.y", device)?,
            fx.float("loss.z0", device)?,
            t_input(fx, "loss.t")?,
        );
        c.loss_terms("loss", &model, &terms, t_input(fx, "loss.t")?);
        c.put("loss.ut", terms.target.clone());
        Some(terms.total.backward())
    } else {
        None
    };
    let grads = if fx.tensors.contains_key("ddpm.x_start") {
        let schedule = DdpmSchedule::linear(crate::ddpm::DDPM_STEPS);
        let steps = fx.indices("ddpm.t")?;
        let terms = schedule.training_loss(
            &model,
            fx.float("ddpm.x_start", device)?,
            fx.int("ddpm.y", device)?,
            &steps,
            fx.float("ddpm.noise", device)?,
        );
        c.loss_terms("ddpm", &model, &terms, t_input(fx, "ddpm.t")?);
        c.schedule("ddpm.schedule", &schedule);
        Some(terms.total.backward())
    } else {
        grads
    };
    if let Some(grads) = grads {
        for (name, t) in StateDict::from_model(&gradient_model(&model, &grads)).tensors {
            c.tensors.insert(format!("grad.{name}"), t);
        }
    }

    // Classifier-free guidance as the official `forward_with_cfg` (3 channels).
    if fx.tensors.contains_key("cfg.x") {
        let scale = fx.meta["cfg_scale"].as_f64().ok_or_else(|| malformed("missing `cfg_scale`".into()))?;
        let out = inference.forward_with_cfg(
            fx.float("cfg.x", device)?,
            fx.float("cfg.t", device)?,
            fx.int("cfg.y", device)?,
            scale,
            CfgChannels::First(3),
            Routing::DYNAMIC,
        );
        c.put("cfg.out", out.output);
    }

    compute_flow_sampling(fx, &inference, &mut c, device)?;
    compute_ddpm_sampling(fx, &inference, &mut c, device)?;
    Ok(c)
}

/// The names of the sampling runs stored under `{prefix}.<run>.{marker}`.
fn runs(fx: &Fixture, prefix: &str, marker: &str) -> Vec<String> {
    fx.tensors
        .keys()
        .filter_map(|k| k.strip_prefix(prefix)?.strip_prefix('.')?.strip_suffix(marker)?.strip_suffix('.'))
        .map(str::to_string)
        .collect()
}

/// Flow sampling runs `sample.<run>` as the official `RectifiedFlow.sample`
/// made them. The run name carries the mode: the official code picks the
/// solver by substring (`'euler' in mode` is tested first), `*_cfg` runs
/// guide with `sample.y_null`, and `static_*` runs (DiffMoE) were made in
/// train mode, i.e. static top-K routing; the others in eval mode, i.e.
/// dynamic routing. A run this does not recognise is left out and so fails
/// as "not computed".
fn compute_flow_sampling<B: Backend>(
    fx: &Fixture,
    model: &DiT<B>,
    c: &mut Computed,
    device: &B::Device,
) -> Result<(), ParityError> {
    let runs = runs(fx, "sample", "final");
    if runs.is_empty() {
        return Ok(());
    }
    let malformed = |reason: &str| ParityError::from(fx.manifest_error(reason));
    let steps = fx.meta["sample_steps"].as_u64().ok_or_else(|| malformed("missing `sample_steps`"))? as usize;
    for run in runs {
        let solver = if run.contains("euler") {
            FlowSolver::Euler
        } else if run.contains("heun") {
            FlowSolver::Heun
        } else {
            continue;
        };
        let guidance = if run.ends_with("_cfg") {
            let scale = fx.meta["cfg_scale"].as_f64().ok_or_else(|| malformed("missing `cfg_scale`"))?;
            FlowGuidance::Cfg { scale, channels: CfgChannels::All, null_labels: fx.int("sample.y_null", device)? }
        } else {
            FlowGuidance::Unguided
        };
        let routing = if run.starts_with("static") { Routing::Static } else { Routing::DYNAMIC };
        let result = FlowSampler::new(steps, solver).sample(
            &DiTDenoiser::new(model, routing),
            fx.float("sample.z", device)?,
            fx.int("sample.y", device)?,
            &guidance,
            Record::Trajectory,
        );
        c.put(format!("sample.{run}.final"), result.sample);
        c.calls(&format!("sample.{run}.calls"), &result.calls);
    }
    Ok(())
}

/// Respaced DDPM sampling runs `ddpm_sample.<run>` in eval mode (dynamic
/// routing), with the fixture's fixed per-step noise: `p*` runs are
/// `p_sample_loop` without clipping (as the official sampler script calls
/// it), `ddim*` runs are `ddim_sample_loop` with `eta = 0` and clipping
/// (their noise is drawn but multiplied by 0; the fixture reuses the `p`
/// noise), and `*_cfg` runs use `forward_with_cfg` on `cat([z, z])` with
/// labels `cat([y, y_null])`, guiding channels 0..2 only.
fn compute_ddpm_sampling<B: Backend>(
    fx: &Fixture,
    model: &DiT<B>,
    c: &mut Computed,
    device: &B::Device,
) -> Result<(), ParityError> {
    let runs = runs(fx, "ddpm_sample", "samples");
    if runs.is_empty() {
        return Ok(());
    }
    let malformed = |reason: String| ParityError::from(fx.manifest_error(reason));
    let respacing = fx.meta["ddpm_respacing"].as_str().ok_or_else(|| malformed("missing `ddpm_respacing`".into()))?;
    let base = DdpmSchedule::linear(crate::ddpm::DDPM_STEPS);
    let spaced =
        |method| DdpmSampler::new(&base, respacing, method).map_err(|e| malformed(format!("ddpm_respacing: {e}")));
    let reference = spaced(DdpmMethod::Ancestral)?;
    c.schedule("ddpm_sample.schedule", reference.schedule());
    let map: Vec<f32> = reference.timestep_map().iter().map(|&t| t as f32).collect();
    c.tensors.insert("ddpm_sample.timestep_map".into(), HostTensor { shape: vec![map.len()], data: map });

    let denoiser = DiTDenoiser::new(model, Routing::DYNAMIC);
    for run in runs {
        let (sampler, plain_noise) = if run.starts_with("ddim") {
            (spaced(DdpmMethod::Ddim { eta: 0.0 })?.with_clip(ClipDenoised::UnitRange), "p")
        } else if run.starts_with('p') {
            (spaced(DdpmMethod::Ancestral)?.with_clip(ClipDenoised::Off), "p")
        } else {
            continue;
        };
        let cfg = run.ends_with("_cfg");
        let guidance = if cfg {
            let scale = fx.meta["cfg_scale"].as_f64().ok_or_else(|| malformed("missing `cfg_scale`".into()))?;
            // The official `forward_with_cfg` hard-codes 3 guided channels.
            DdpmGuidance::Cfg {
                scale,
                channels: CfgChannels::First(3),
                null_labels: fx.int("ddpm_sample.y_null", device)?,
            }
        } else {
            DdpmGuidance::Unguided
        };
        let own_noise = format!("ddpm_sample.{run}.step_noise");
        let noise_key = if fx.tensors.contains_key(&own_noise) {
            own_noise
        } else {
            format!("ddpm_sample.{plain_noise}{}.step_noise", if cfg { "_cfg" } else { "" })
        };
        let mut noise = GivenNoise::from_stacked(fx.float::<B, 5>(&noise_key, device)?);
        let result = sampler.sample(
            &denoiser,
            fx.float("ddpm_sample.z", device)?,
            fx.int("ddpm_sample.y", device)?,
            &guidance,
            &mut noise,
            Record::Trajectory,
        );
        let stack = |f: &dyn Fn(&DdpmStep<B>) -> Tensor<B, 4>| {
            Tensor::<B, 4>::stack::<5>(result.steps.iter().map(f).collect(), 0)
        };
        c.put(format!("ddpm_sample.{run}.samples"), stack(&|s| s.sample.clone()));
        c.put(format!("ddpm_sample.{run}.pred_xstart"), stack(&|s| s.pred_xstart.clone()));
        c.ddpm_floors(&format!("ddpm_sample.{run}"), &sampler, &result.steps);
        let calls: Vec<ModelCall<B>> = result.steps.iter().map(|s| s.call.clone()).collect();
        c.calls(&format!("ddpm_sample.{run}.calls"), &calls);
    }
    Ok(())
}

/// Recomputes the standalone embedding tables.
fn compute_embeddings<B: Backend>(fx: &Fixture, device: &B::Device) -> Result<Computed, ParityError> {
    let mut c = Computed::default();
    for (key, stored) in &fx.tensors {
        if let Some(spec) = key.strip_prefix("pos_embed.d") {
            let (d, g) = spec.split_once("_g").ok_or_else(|| fx.tensors_error(format!("cannot parse `{key}`")))?;
            let (d, g): (usize, usize) = (d.parse().unwrap_or(0), g.parse().unwrap_or(0));
            c.tensors.insert(key.clone(), HostTensor { shape: stored.shape.clone(), data: sincos_pos_embed_2d(d, g) });
        } else if let Some(dim) = key.strip_prefix("timestep_embedding.d") {
            let dim: usize = dim.parse().unwrap_or(0);
            c.put(key.clone(), timestep_embedding(fx.float::<B, 1>("timestep.t", device)?, dim));
        }
    }
    Ok(c)
}

fn group_of(key: &str) -> String {
    let parts: Vec<&str> = key.split('.').collect();
    match parts.as_slice() {
        // Sampling: one group per run and kind (`sample.heun.calls`,
        // `ddpm_sample.p.pred_xstart`); the respaced schedule and its
        // timestep map together.
        ["ddpm_sample", "schedule" | "timestep_map", ..] => "ddpm_sample.schedule".into(),
        [a @ ("sample" | "ddpm_sample"), run, kind, ..] => format!("{a}.{run}.{kind}"),
        ["grad", ..] => "grad".into(),
        [a, "act", ..] | [a, "moe", ..] | [a, "schedule", ..] | [a, "model_in", ..] => {
            format!("{a}.{}", parts[1])
        }
        [a, "out"] => format!("{a}.out"),
        ["pos_embed", ..] | ["timestep_embedding", ..] => parts[0].into(),
        [a, ..] => format!("{a}.terms"),
        [] => String::new(),
    }
}

/// Largest absolute error, and that error relative to the larger of the
/// reference's largest magnitude and `floor`.
fn compare(ours: &[f32], reference: &[f64], floor: f64) -> (f64, f64) {
    let scale = reference.iter().fold(floor, |m, v| m.max(v.abs()));
    let abs = ours.iter().zip(reference).fold(0.0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
    (abs, if scale > 0.0 { abs / scale } else { abs })
}

/// Sampling trajectories stacked over model calls or steps (`[steps, batch,
/// ...]`): each step is compared at its own magnitude, so that the small
/// early steps of a growing trajectory are not judged against its largest.
fn per_step(key: &str) -> bool {
    (key.starts_with("sample.") || key.starts_with("ddpm_sample."))
        && (key.contains(".calls.") || key.ends_with(".samples") || key.ends_with(".pred_xstart"))
}

/// [`compare`] step by step along the leading axis, with an optional floor
/// of the scale per step; returns the worst step.
fn compare_steps(ours: &[f32], stored: &Stored, floors: Option<&Vec<f64>>) -> (f64, f64) {
    let steps = stored.shape.first().copied().unwrap_or(1).max(1);
    let per = stored.values.len() / steps;
    (0..steps).fold((0.0, 0.0), |(abs, rel), i| {
        let floor = floors.and_then(|f| f.get(i)).copied().unwrap_or(0.0);
        let range = i * per..(i + 1) * per;
        let (a, r) = compare(&ours[range.clone()], &stored.values[range], floor);
        (f64::max(abs, a), f64::max(rel, r))
    })
}

fn exact(key: &str) -> bool {
    key.ends_with(".ones") || key.ends_with(".tokens_per_expert") || key.ends_with(".k")
}

/// Compares one case; rows are grouped by tensor family.
pub fn check_case<B: AutodiffBackend>(
    dir: &Path,
    case: &str,
    device: &B::Device,
) -> Result<Vec<ParityRow>, ParityError> {
    let fx = Fixture::read(dir, case)?;
    let computed = if case == "embeddings" || fx.meta["family"].is_null() {
        compute_embeddings::<B>(&fx, device)?
    } else {
        compute_model_case::<B>(case, &fx, device)?
    };
    let mut groups: BTreeMap<String, ParityRow> = BTreeMap::new();
    for (key, stored) in fx.outputs().filter(|(key, _)| *key != "timestep.t") {
        let group = group_of(key);
        let row = groups.entry(group.clone()).or_insert_with(|| ParityRow::new(case, &group));
        row.tensors += 1;
        let Some(ours) = computed.tensors.get(key) else {
            row.fail(|| format!("`{key}` is not computed"));
            continue;
        };
        if ours.data.len() != stored.values.len() || (ours.shape != stored.shape && !ours.shape.is_empty()) {
            row.fail(|| format!("`{key}`: shape {:?}, expected {:?}", ours.shape, stored.shape));
            continue;
        }
        let (abs, rel) = if per_step(key) {
            compare_steps(&ours.data, stored, computed.step_floors.get(key))
        } else {
            compare(&ours.data, &stored.values, 0.0)
        };
        row.record(abs, rel);
        let ok = if exact(key) || stored.integer { abs == 0.0 } else { rel <= RELATIVE_TOLERANCE };
        if !ok {
            row.fail(|| format!("`{key}`: max abs {abs:.3e}, rel {rel:.3e}"));
        }
    }
    Ok(groups.into_values().collect())
}

/// Checks every case listed in `dir/index.json`.
pub fn check_dir<B: AutodiffBackend>(dir: &Path, device: &B::Device) -> Result<Vec<ParityRow>, ParityError> {
    check_index(dir, |case| check_case::<B>(dir, case, device))
}
