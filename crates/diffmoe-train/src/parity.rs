//! Parity against the official implementation: reads a directory of fixtures
//! in the format of `shared/fixtures/parity/README.md` (an `index.json`, then
//! `<case>.safetensors` + `<case>.json` per case), recomputes every stored
//! output with this crate, and compares.
//!
//! Every output tensor of a case is either compared or reported: outputs the
//! port does not compute yet (the sampling trajectories, which come with the
//! samplers) are listed as not checked, and an output nobody computes is a
//! failure, so a new kind of fixture can never pass silently.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{backend::AutodiffBackend, backend::Backend, Int, Tensor, TensorData};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use serde_json::Value;

use diffmoe_core::{LocalReplica, Routing, RoutingStats};
use diffmoe_model::{
    sincos_pos_embed_2d, timestep_embedding, Activations, BlockMlp, BlockRouting, CfgChannels, DiT, DiTConfig, Family,
    HostTensor, StateDict,
};

use crate::ddpm::DdpmSchedule;
use crate::flow::flow_loss;
use crate::gradients::gradient_model;
use crate::loss_terms::LossTerms;

/// Outputs, losses and gradients must lie within this fraction of the
/// reference's largest magnitude. A correct f32 port lands near 1e-6 on
/// outputs and 1e-5 on gradients (the official code sums in other orders,
/// e.g. SwiGLU's `pretraining_tp` slices and SDPA's fused kernel).
pub const RELATIVE_TOLERANCE: f64 = 1e-4;

/// Why a parity run could not start.
#[derive(Debug, thiserror::Error)]
pub enum ParityError {
    /// A fixture file could not be read.
    #[error("cannot read fixture file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A fixture file is malformed.
    #[error("fixture file {path} is malformed: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The fixture's model could not be built.
    #[error("case {case}: cannot build the model")]
    Model {
        /// The case.
        case: String,
        /// The cause.
        #[source]
        source: diffmoe_model::ImportError,
    },
}

/// The outcome of one group of tensors.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// Within tolerance (masks and counts exact).
    Pass,
    /// Outside tolerance or not computed; says which tensor and why.
    Fail(String),
    /// Not checked by this version of the port.
    NotChecked(String),
}

/// One row of the report: a case and a group of tensors.
#[derive(Debug, Clone)]
pub struct ParityRow {
    /// Case name.
    pub case: String,
    /// Tensor group (`train.out`, `train.moe`, `grad`, ...).
    pub group: String,
    /// Tensors compared.
    pub tensors: usize,
    /// Largest absolute error.
    pub max_abs: f64,
    /// Largest error relative to the reference's largest magnitude.
    pub max_rel: f64,
    /// Outcome.
    pub status: Status,
}

/// A tensor of a fixture, values widened to f64.
#[derive(Debug, Clone)]
struct Stored {
    shape: Vec<usize>,
    values: Vec<f64>,
}

struct Fixture {
    path: PathBuf,
    meta: Value,
    tensors: BTreeMap<String, Stored>,
}

fn read_json(path: &Path) -> Result<Value, ParityError> {
    let text = std::fs::read_to_string(path).map_err(|source| ParityError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|e| ParityError::Malformed { path: path.to_path_buf(), reason: e.to_string() })
}

impl Fixture {
    fn read(dir: &Path, case: &str) -> Result<Self, ParityError> {
        let meta = read_json(&dir.join(format!("{case}.json")))?;
        let path = dir.join(format!("{case}.safetensors"));
        let bytes = std::fs::read(&path).map_err(|source| ParityError::Io { path: path.clone(), source })?;
        let bad = |reason: String| ParityError::Malformed { path: path.clone(), reason };
        let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let b = view.data();
            let values: Vec<f64> = match view.dtype() {
                Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect(),
                Dtype::F64 => b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect(),
                Dtype::I64 => {
                    b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f64).collect()
                }
                Dtype::I32 => b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect(),
                Dtype::BOOL | Dtype::U8 => b.iter().map(|&v| v as f64).collect(),
                other => return Err(bad(format!("tensor `{name}` has unsupported dtype {other:?}"))),
            };
            tensors.insert(name, Stored { shape: view.shape().to_vec(), values });
        }
        Ok(Self { path, meta, tensors })
    }

    fn get(&self, key: &str) -> Result<&Stored, ParityError> {
        self.tensors
            .get(key)
            .ok_or_else(|| ParityError::Malformed { path: self.path.clone(), reason: format!("missing input `{key}`") })
    }

    fn float<B: Backend, const D: usize>(&self, key: &str, device: &B::Device) -> Result<Tensor<B, D>, ParityError> {
        let s = self.get(key)?;
        let data: Vec<f32> = s.values.iter().map(|&v| v as f32).collect();
        Ok(Tensor::from_data(TensorData::new(data, s.shape.clone()), device))
    }

    fn int<B: Backend>(&self, key: &str, device: &B::Device) -> Result<Tensor<B, 1, Int>, ParityError> {
        let s = self.get(key)?;
        let data: Vec<i64> = s.values.iter().map(|&v| v as i64).collect();
        Ok(Tensor::from_data(TensorData::new(data, [s.values.len()]), device))
    }

    fn steps(&self, key: &str) -> Result<Vec<usize>, ParityError> {
        Ok(self.get(key)?.values.iter().map(|&v| v as usize).collect())
    }

    fn is_input(&self, key: &str) -> bool {
        key.starts_with("model.")
            || self.meta["input_keys"].as_array().is_some_and(|a| a.iter().any(|k| k.as_str() == Some(key)))
    }
}

/// What this port computed for a case, under the fixture's key names.
#[derive(Default)]
struct Computed(BTreeMap<String, HostTensor>);

impl Computed {
    fn put<B: Backend, const D: usize>(&mut self, key: impl Into<String>, t: Tensor<B, D>) {
        self.0.insert(key.into(), HostTensor::from_tensor(t));
    }

    fn scalar(&mut self, key: impl Into<String>, v: f64) {
        self.0.insert(key.into(), HostTensor { shape: vec![], data: vec![v as f32] });
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
                self.put(format!("{p}.aux_loss"), aux.clone().reshape([0usize; 0]));
            }
            if let (Some(q), BlockMlp::DiffMoe(layer)) = (&s.threshold_quantile, &model.blocks[r.block].mlp) {
                self.put(format!("{p}.threshold_quantile"), q.clone());
                self.put(format!("{p}.expert_threshold_after"), layer.updated_thresholds(q.clone(), &LocalReplica));
            }
        }
    }

    fn loss_terms<B: Backend>(&mut self, prefix: &str, model: &DiT<B>, terms: &LossTerms<B>, t_in: Tensor<B, 1>) {
        let scalar = |t: Tensor<B, 1>| t.reshape([0usize; 0]);
        self.put(format!("{prefix}.mse"), terms.mse.clone());
        if let Some(vb) = &terms.vb {
            self.put(format!("{prefix}.vb"), vb.clone());
        }
        self.put(format!("{prefix}.loss"), scalar(terms.loss.clone()));
        self.put(format!("{prefix}.cp_loss"), scalar(terms.capacity_loss.clone()));
        self.put(format!("{prefix}.aux_loss_sum"), scalar(terms.aux_loss.clone()));
        for (block, bce) in &terms.capacity {
            self.put(format!("{prefix}.Capacity_Pred_loss.L{block}"), scalar(bce.clone()));
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
    let malformed = |reason: String| ParityError::Malformed { path: fx.path.clone(), reason };
    let family = family_of(case, &fx.meta).ok_or_else(|| malformed("unknown `family`".into()))?;
    let kwargs = &fx.meta["config"]["constructor_kwargs"];
    let config = DiTConfig::from_official_kwargs(family, kwargs)
        .map_err(|e| malformed(format!("config.constructor_kwargs: {e}")))?;
    let mut sd = StateDict::default();
    for (k, v) in fx.tensors.iter().filter(|(k, _)| k.starts_with("model.")) {
        let data = v.values.iter().map(|&x| x as f32).collect();
        sd.tensors.insert(k["model.".len()..].to_string(), HostTensor { shape: v.shape.clone(), data });
    }
    let model: DiT<B> =
        sd.to_model(&config, device).map_err(|source| ParityError::Model { case: case.to_string(), source })?;
    let mut c = Computed::default();
    let t_input = |fx: &Fixture, key: &str| fx.float::<B, 1>(key, device);

    // Forwards: train, eval (dynamic routing for DiffMoE), static.
    let (x, t, y) = (fx.float::<B, 4>("inputs.x", device)?, t_input(fx, "inputs.t")?, fx.int::<B>("inputs.y", device)?);
    let mut modes = vec![("train", Routing::Train), ("eval", Routing::Dynamic)];
    if family == Family::Diffmoe {
        modes.push(("static", Routing::Static));
    }
    for (prefix, routing) in modes {
        let (out, act) = model.forward_traced(x.clone(), t.clone(), y.clone(), routing);
        c.put(format!("{prefix}.out"), out.output.clone());
        c.activations(prefix, act);
        c.routing(prefix, &model, &out.routing);
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
        let steps = fx.steps("ddpm.t")?;
        let terms = schedule.training_loss(
            &model,
            fx.float("ddpm.x_start", device)?,
            fx.int("ddpm.y", device)?,
            &steps,
            fx.float("ddpm.noise", device)?,
        );
        c.loss_terms("ddpm", &model, &terms, t_input(fx, "ddpm.t")?);
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
            c.0.insert(format!("ddpm.schedule.{name}"), HostTensor { shape: vec![a.len()], data });
        }
        Some(terms.total.backward())
    } else {
        grads
    };
    if let Some(grads) = grads {
        for (name, t) in StateDict::from_model(&gradient_model(&model, &grads)).tensors {
            c.0.insert(format!("grad.{name}"), t);
        }
    }

    // Classifier-free guidance as the official `forward_with_cfg` (3 channels).
    if fx.tensors.contains_key("cfg.x") {
        let scale = fx.meta["cfg_scale"].as_f64().ok_or_else(|| malformed("missing `cfg_scale`".into()))?;
        let out = model.forward_with_cfg(
            fx.float("cfg.x", device)?,
            t_input(fx, "cfg.t")?,
            fx.int("cfg.y", device)?,
            scale,
            CfgChannels::First(3),
            Routing::Dynamic,
        );
        c.put("cfg.out", out);
    }
    Ok(c)
}

/// Recomputes the standalone embedding tables.
fn compute_embeddings<B: Backend>(fx: &Fixture, device: &B::Device) -> Result<Computed, ParityError> {
    let mut c = Computed::default();
    for (key, stored) in &fx.tensors {
        if let Some(spec) = key.strip_prefix("pos_embed.d") {
            let (d, g) = spec.split_once("_g").ok_or_else(|| ParityError::Malformed {
                path: fx.path.clone(),
                reason: format!("cannot parse `{key}`"),
            })?;
            let (d, g): (usize, usize) = (d.parse().unwrap_or(0), g.parse().unwrap_or(0));
            c.0.insert(key.clone(), HostTensor { shape: stored.shape.clone(), data: sincos_pos_embed_2d(d, g) });
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
    for (key, stored) in &fx.tensors {
        if fx.is_input(key) || key == "timestep.t" {
            continue;
        }
        let group = group_of(key);
        let row = groups.entry(group.clone()).or_insert_with(|| ParityRow {
            case: case.to_string(),
            group: group.clone(),
            tensors: 0,
            max_abs: 0.0,
            max_rel: 0.0,
            status: Status::Pass,
        });
        if key.starts_with("sample.") || key.starts_with("ddpm_sample.") {
            row.status = Status::NotChecked("sampling trajectories come with the samplers".into());
            continue;
        }
        let Some(ours) = computed.0.get(key) else {
            row.status = Status::Fail(format!("`{key}` is not computed"));
            continue;
        };
        row.tensors += 1;
        if ours.data.len() != stored.values.len() || (ours.shape != stored.shape && !ours.shape.is_empty()) {
            row.status = Status::Fail(format!("`{key}`: shape {:?}, expected {:?}", ours.shape, stored.shape));
            continue;
        }
        let scale = stored.values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let abs = ours.data.iter().zip(&stored.values).fold(0.0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
        let rel = if scale > 0.0 { abs / scale } else { abs };
        row.max_abs = row.max_abs.max(abs);
        row.max_rel = row.max_rel.max(rel);
        let ok = if exact(key) { abs == 0.0 } else { rel <= RELATIVE_TOLERANCE };
        if !ok && matches!(row.status, Status::Pass) {
            row.status = Status::Fail(format!("`{key}`: max abs {abs:.3e}, rel {rel:.3e}"));
        }
    }
    Ok(groups.into_values().collect())
}

/// Checks every case listed in `dir/index.json`.
pub fn check_dir<B: AutodiffBackend>(dir: &Path, device: &B::Device) -> Result<Vec<ParityRow>, ParityError> {
    let index = read_json(&dir.join("index.json"))?;
    let cases = index["cases"]
        .as_array()
        .ok_or_else(|| ParityError::Malformed { path: dir.join("index.json"), reason: "no `cases` array".into() })?;
    let mut rows = Vec::new();
    for case in cases {
        let name = case["case"].as_str().ok_or_else(|| ParityError::Malformed {
            path: dir.join("index.json"),
            reason: "a case without a `case` name".into(),
        })?;
        rows.extend(check_case::<B>(dir, name, device)?);
    }
    Ok(rows)
}

/// The report as a table, one row per case and group.
pub fn format_report(rows: &[ParityRow]) -> String {
    let mut out =
        format!("{:<28} {:<20} {:>5} {:>11} {:>11}  {}\n", "case", "group", "n", "max abs", "max rel", "status");
    for r in rows {
        let status = match &r.status {
            Status::Pass => "ok".to_string(),
            Status::Fail(why) => format!("FAIL {why}"),
            Status::NotChecked(why) => format!("not checked ({why})"),
        };
        out.push_str(&format!(
            "{:<28} {:<20} {:>5} {:>11.3e} {:>11.3e}  {}\n",
            r.case, r.group, r.tensors, r.max_abs, r.max_rel, status
        ));
    }
    out
}

/// Whether any row failed.
pub fn any_failed(rows: &[ParityRow]) -> bool {
    rows.iter().any(|r| matches!(r.status, Status::Fail(_)))
}
