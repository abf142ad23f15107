//! Parity with pytorch-fid, DiffMoE and the ADM evaluator: reads a directory
//! of fixtures in the format of `shared/fixtures/inception/README.md` (an
//! `index.json` listing cases, then `<case>.safetensors` + `<case>.json`),
//! recomputes every stored output with this crate and compares.
//!
//! Every output of a case is compared: pool features of every run, logits,
//! logits without bias, softmax, resized images, post-processed images, every
//! activation summary, statistics, every FID value and the Inception Scores.
//! An output nobody computes is a failure, so a new kind of fixture can never
//! pass silently. Before the network runs, every procedural weight is
//! regenerated and checked against its SHA-256 in the manifest.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{backend::Backend, Tensor};
use serde_json::Value;

use diffmoe_model::StateDict;
pub use diffmoe_parity::{any_failed, format_report, ParityRow, Status};
use diffmoe_parity::{check_index, index_cases, Fixture, FixtureError};
use diffmoe_weights::HostTensor;

use crate::frechet::{
    frechet_distance, FeatureStatistics, MeanPrecision, SqrtmOffset, StatisticsError, PYTORCH_FID_EPS,
};
use crate::inception::{diffmoe_images01, resize_input, FcBias, FidInceptionV3, INCEPTION_CLASSES};
use crate::inception_score::{inception_score, softmax_rows, ScoreArithmetic};
use crate::inception_weights::{weights_file_key, weights_file_keys, InceptionWeightsError};
use crate::procedural_weights::{conv_scale_log2, key_seed, procedural_tensor, sha256_f32le, FC_SCALE_LOG2};

/// Float64 statistics (`mu`, `sigma`) of the same float32 features: only the
/// summation order differs from NumPy (pairwise sums, BLAS `dot`), about
/// 1e-15 relative to the largest entry; 1e-10 leaves room for any order.
pub const STATISTICS_RTOL: f64 = 1e-10;

/// DiffMoE's float32 means: NumPy's row-by-row float32 sum is reproduced, so
/// they agree bit for bit; one float32 ulp (6e-8) is allowed for other orders.
pub const F32_MEAN_RTOL: f64 = 1e-6;

/// Absolute tolerance of the activation corners (`act.*.corner`), single
/// elements of intermediate outputs. Their float32 noise grows about 1.5x per
/// Mixed block in any float32 implementation: this port in float32 against
/// itself in float64 differs by up to 4.9e-4 at Mixed_7c (rms 5e-5), the
/// reference against this port in float64 by up to 1.8e-4, so two float32
/// implementations do not stay within the manifest's 1e-4 there. The averaged
/// outputs (channel means, pool features, logits) keep the manifest's
/// tolerance; a semantic mistake (padding, pool kind, BN eps) moves corner
/// elements by far more than this.
pub const CORNER_ATOL: f64 = 1e-3;

/// Why a parity run could not start.
#[derive(Debug, thiserror::Error)]
pub enum ParityError {
    /// A fixture file could not be read, or lacks what a case needs.
    #[error(transparent)]
    Fixture(#[from] FixtureError),
    /// The fixture's network could not be built.
    #[error("case {case}: cannot build the FID Inception")]
    Weights {
        /// The case.
        case: String,
        /// The cause.
        #[source]
        source: Box<InceptionWeightsError>,
    },
    /// Statistics or a distance could not be computed.
    #[error("case {case}: {key}")]
    Statistics {
        /// The case.
        case: String,
        /// The output being computed.
        key: String,
        /// The cause.
        #[source]
        source: Box<StatisticsError>,
    },
}

/// How an output is compared.
#[derive(Debug, Clone, Copy)]
enum Tolerance {
    /// `|port - ref| <= atol + rtol |ref|` elementwise (the fixture's rule).
    Elementwise { atol: f64, rtol: f64 },
    /// `|port - ref| <= rtol max|ref|`.
    RelativeToMax { rtol: f64 },
}

/// What this port computed, under the fixture's key names.
#[derive(Default)]
struct Computed {
    tensors: BTreeMap<String, HostTensor>,
    /// f64 outputs kept at full precision (statistics, distances, scores).
    wide: BTreeMap<String, (Vec<usize>, Vec<f64>)>,
}

impl Computed {
    fn put<B: Backend, const D: usize>(&mut self, key: impl Into<String>, t: Tensor<B, D>) {
        self.tensors.insert(key.into(), HostTensor::from_tensor(t));
    }

    fn wide(&mut self, key: impl Into<String>, shape: Vec<usize>, values: Vec<f64>) {
        self.wide.insert(key.into(), (shape, values));
    }

    fn scalar(&mut self, key: impl Into<String>, v: f64) {
        self.wide(key, vec![], vec![v]);
    }

    fn get(&self, key: &str) -> Option<(Vec<usize>, Vec<f64>)> {
        if let Some((s, v)) = self.wide.get(key) {
            return Some((s.clone(), v.clone()));
        }
        self.tensors.get(key).map(|t| (t.shape.clone(), t.data.iter().map(|&v| f64::from(v)).collect()))
    }
}

/// The kind of a case (`fid_inception_v3`, `fid_is_metrics`), from `dir/index.json`.
fn kind_of(dir: &Path, case: &str) -> Result<String, ParityError> {
    let index = dir.join("index.json");
    let entry = index_cases(dir)?
        .into_iter()
        .find(|e| e.case == case)
        .ok_or_else(|| FixtureError::malformed(&index, format!("no case `{case}`")))?;
    Ok(entry.kind.ok_or_else(|| FixtureError::malformed(&index, format!("case `{case}` has no `kind`")))?)
}

/// Checks one case of `dir` (its kind from `index.json`); every stored
/// output is recomputed and compared.
pub fn check_case<B: Backend>(dir: &Path, case: &str, device: &B::Device) -> Result<Vec<ParityRow>, ParityError> {
    let kind = kind_of(dir, case)?;
    let fixture = Fixture::read(dir, case)?;
    let mut rows = Vec::new();
    let computed = match kind.as_str() {
        "fid_inception_v3" => network::<B>(&fixture, &mut rows, device)?,
        "fid_is_metrics" => metrics(&fixture)?,
        other => {
            let mut row = ParityRow::new(case, "kind");
            row.fail(|| format!("unknown fixture kind `{other}`"));
            rows.push(row);
            return Ok(rows);
        }
    };
    rows.extend(compare(&fixture, &computed, |key| tolerance(&fixture, &kind, key))?);
    Ok(rows)
}

/// Checks every case listed in `dir/index.json`.
pub fn check_dir<B: Backend>(dir: &Path, device: &B::Device) -> Result<Vec<ParityRow>, ParityError> {
    check_index(dir, |case| check_case::<B>(dir, case, device))
}

/// The comparison rule of an output.
fn tolerance(fixture: &Fixture, kind: &str, key: &str) -> Result<Tolerance, ParityError> {
    let tol = |name: &str| fixture.meta_f64(&format!("/suggested_tolerance/{name}"));
    Ok(match kind {
        "fid_inception_v3" => {
            let atol = if key.starts_with("logits") || key.starts_with("softmax") {
                tol("logits_atol")?
            } else if key.starts_with("act.") && key.ends_with(".corner") {
                CORNER_ATOL
            } else {
                tol("atol")?
            };
            Tolerance::Elementwise { atol, rtol: tol("rtol")? }
        }
        _ => {
            let last = key.rsplit('.').next().unwrap_or(key);
            if key.starts_with("is.") {
                Tolerance::Elementwise { atol: 0.0, rtol: tol("is_rtol")? }
            } else if last.starts_with("fid") {
                let case = key.split('.').nth(1).unwrap_or("");
                Tolerance::Elementwise { atol: 0.0, rtol: tol(&format!("fid_{case}_rtol"))? }
            } else if last.ends_with("_f32") {
                Tolerance::RelativeToMax { rtol: F32_MEAN_RTOL }
            } else {
                Tolerance::RelativeToMax { rtol: STATISTICS_RTOL }
            }
        }
    })
}

/// The report group of an output key: `act.<run>` for activation summaries,
/// `fid.<case>` for metrics, else the first component.
fn group_of(key: &str) -> String {
    let mut parts = key.split('.');
    let first = parts.next().unwrap_or(key);
    match first {
        "act" | "fid" => format!("{first}.{}", parts.next().unwrap_or("")),
        _ => first.to_string(),
    }
}

fn compare(
    fixture: &Fixture,
    computed: &Computed,
    tolerance: impl Fn(&str) -> Result<Tolerance, ParityError>,
) -> Result<Vec<ParityRow>, ParityError> {
    let mut groups: BTreeMap<String, ParityRow> = BTreeMap::new();
    for (key, reference) in fixture.outputs() {
        let group = group_of(key);
        let row = groups.entry(group.clone()).or_insert_with(|| ParityRow::new(&fixture.case, &group));
        row.tensors += 1;
        let failure = match computed.get(key) {
            None => Some(format!("`{key}` is not computed")),
            Some((shape, _)) if shape != reference.shape => {
                Some(format!("`{key}` has shape {shape:?}, the reference {:?}", reference.shape))
            }
            Some((_, values)) => {
                let tol = tolerance(key)?;
                let scale = reference.values.iter().fold(0f64, |m, v| m.max(v.abs()));
                let mut worst: Option<(usize, f64)> = None;
                let (mut max_abs, mut used) = (0f64, 0f64);
                for (i, (p, r)) in values.iter().zip(&reference.values).enumerate() {
                    let d = (p - r).abs();
                    let d = if d.is_nan() { f64::INFINITY } else { d };
                    max_abs = max_abs.max(d);
                    let bound = match tol {
                        Tolerance::Elementwise { atol, rtol } => atol + rtol * r.abs(),
                        Tolerance::RelativeToMax { rtol } => rtol * scale,
                    };
                    used = used.max(if d == 0.0 { 0.0 } else { d / bound });
                    if d > bound && worst.is_none_or(|(_, w)| d > w) {
                        worst = Some((i, d));
                    }
                }
                row.record(max_abs, if scale > 0.0 { max_abs / scale } else { max_abs });
                row.tolerance_used = Some(row.tolerance_used.unwrap_or(0.0).max(used));
                worst.map(|(i, d)| {
                    format!("`{key}`[{i}]: {} vs {} (|diff| {d:.3e}, {tol:?})", values[i], reference.values[i])
                })
            }
        };
        if let Some(why) = failure {
            row.fail(|| why);
        }
    }
    Ok(groups.into_values().collect())
}

/// Checks the procedural-weight generator and layout metadata, then
/// assembles the fixture network's state dict from stored and regenerated
/// tensors; `None` when a regenerated tensor does not match its hash (the
/// network is then not run, and its outputs fail as not computed).
fn fixture_state_dict(fixture: &Fixture, rows: &mut Vec<ParityRow>) -> Result<Option<StateDict>, ParityError> {
    let row = |group: &str, tensors: usize, failures: Vec<String>| {
        let mut row = ParityRow::new(&fixture.case, group);
        row.tensors = tensors;
        if let Some(why) = failures.into_iter().next() {
            row.fail(|| why);
        }
        row
    };
    let generator = &fixture.meta["weights"]["procedural_generator"];
    let base_seed = generator["base_seed"].as_u64().ok_or_else(|| fixture.manifest_error("no base_seed"))?;

    // The generator's self-test.
    let mut failures = Vec::new();
    let selftest = &generator["selftest"];
    let (key, seed, scale) = (
        selftest["key"].as_str().unwrap_or_default(),
        selftest["base_seed"].as_u64().unwrap_or(base_seed),
        selftest["scale_log2"].as_i64().unwrap_or(0) as i32,
    );
    let expected_seed = selftest["key_seed"].as_str().unwrap_or_default();
    if format!("{:#018x}", key_seed(key, seed)) != expected_seed {
        failures.push(format!("selftest key seed {:#018x} != {expected_seed}", key_seed(key, seed)));
    }
    let hex: Vec<&str> =
        selftest["values_hex"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    if hex.is_empty() {
        failures.push("the manifest has no generator self-test values".to_string());
    }
    let values = procedural_tensor(key, seed, scale, hex.len());
    for (i, (v, h)) in values.iter().zip(&hex).enumerate() {
        if format!("{:#010x}", v.to_bits()) != *h {
            failures.push(format!("selftest value {i}: {:#010x} != {h}", v.to_bits()));
        }
    }

    // Every procedural tensor: scale rule, hash, first values.
    let mut tensors = BTreeMap::new();
    let procedural = fixture.meta["weights"]["procedural_tensors"]
        .as_object()
        .ok_or_else(|| fixture.manifest_error("no weights.procedural_tensors"))?;
    for (key, spec) in procedural {
        let shape: Vec<usize> = spec["shape"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).map(|d| d as usize).collect())
            .ok_or_else(|| fixture.manifest_error(format!("no shape for `{key}`")))?;
        let scale =
            spec["scale_log2"].as_i64().ok_or_else(|| fixture.manifest_error(format!("no scale for `{key}`")))? as i32;
        let fan_in: usize = shape[1..].iter().product();
        let rule = if key == "fc.weight" { FC_SCALE_LOG2 } else { conv_scale_log2(fan_in) };
        if rule != scale || spec["fan_in"].as_u64() != Some(fan_in as u64) {
            failures.push(format!(
                "`{key}`: scale 2^{scale} / fan_in {} vs the rule's 2^{rule} / {fan_in}",
                spec["fan_in"]
            ));
        }
        let values = procedural_tensor(key, base_seed, scale, shape.iter().product());
        let hash = sha256_f32le(&values);
        if spec["sha256_f32le"].as_str() != Some(hash.as_str()) {
            failures.push(format!("`{key}`: SHA-256 {hash} != {}", spec["sha256_f32le"]));
        }
        let first: Vec<String> = values.iter().take(4).map(|v| format!("{:#010x}", v.to_bits())).collect();
        let stored: Vec<String> = spec["first4_hex"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
            .unwrap_or_default();
        if first != stored {
            failures.push(format!("`{key}`: first values {first:?} != {stored:?}"));
        }
        tensors.insert(key.clone(), HostTensor { shape, data: values });
    }
    let weights_ok = failures.is_empty();
    rows.push(row("weights", procedural.len() + 1, failures));

    // The key layout of the manifest against this port's.
    let mut failures = Vec::new();
    let ours = weights_file_keys();
    let theirs = fixture.meta["weights_file_keys"].as_array().cloned().unwrap_or_default();
    if ours.len() != theirs.len() {
        failures.push(format!("{} weights-file keys here, {} in the manifest", ours.len(), theirs.len()));
    }
    for (k, t) in ours.iter().zip(&theirs) {
        let shape: Vec<usize> = t[1]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).map(|d| d as usize).collect())
            .unwrap_or_default();
        if t[0].as_str() != Some(k.name.as_str()) || shape != k.shape {
            failures.push(format!("key `{}` {:?} here, {} in the manifest", k.name, k.shape, t));
        }
    }
    let map = fixture.meta["inceptionv3_state_dict_to_weights_file"].as_object().cloned().unwrap_or_default();
    for (module, file) in &map {
        if weights_file_key(module).as_deref() != file.as_str() {
            failures.push(format!(
                "module key `{module}` maps to {:?} here, {file} in the manifest",
                weights_file_key(module)
            ));
        }
    }
    rows.push(row("layout", ours.len() + map.len(), failures));

    // The stored tensors (BatchNorm, fc.bias, num_batches_tracked).
    for (key, stored) in &fixture.tensors {
        if let Some(name) = key.strip_prefix("model.") {
            let data = stored.values.iter().map(|&v| v as f32).collect();
            tensors.insert(name.to_string(), HostTensor { shape: stored.shape.clone(), data });
        }
    }
    Ok(weights_ok.then_some(StateDict { tensors }))
}

/// The network case: every run through the network in one batch.
fn network<B: Backend>(
    fixture: &Fixture,
    rows: &mut Vec<ParityRow>,
    device: &B::Device,
) -> Result<Computed, ParityError> {
    let Some(state_dict) = fixture_state_dict(fixture, rows)? else {
        return Ok(Computed::default());
    };
    let model = FidInceptionV3::<B>::from_state_dict(&state_dict, &fixture.path, device)
        .map_err(|e| ParityError::Weights { case: fixture.case.clone(), source: Box::new(e) })?;
    drop(state_dict);

    let mut out = Computed::default();
    let runs = fixture.meta["runs"].as_array().cloned().ok_or_else(|| fixture.manifest_error("no `runs`"))?;
    let mut batch = Vec::new();
    let mut spans = Vec::new();
    for run in &runs {
        let name = run["name"].as_str().ok_or_else(|| fixture.manifest_error("a run without a name"))?.to_string();
        let input = run["input"].as_str().ok_or_else(|| fixture.manifest_error("a run without an input"))?;
        let images: Tensor<B, 4> = if input == "postproc.images01" {
            let decoded = diffmoe_images01(fixture.float::<B, 4>("inputs.decoded", device)?);
            out.put("postproc.images01", decoded.clone());
            decoded
        } else {
            fixture.float(input, device)?
        };
        let resized = resize_input(images); // [n, 3, 299, 299]
        let [n, c, h, w] = resized.dims();
        out.put(format!("resize.{name}"), resized.clone().slice([0..1, 0..c, 0..h, 0..w]).reshape([c, h, w]));
        let start = spans.last().map_or(0, |(_, _, end)| *end);
        spans.push((name, start, start + n));
        batch.push(resized);
    }
    let images = Tensor::cat(batch, 0); // [all runs, 3, 299, 299]

    let mut taps: Vec<(&'static str, Tensor<B, 2>, Tensor<B, 4>)> = Vec::new();
    let pool = model.forward_inspect(images, &mut |name, x| {
        let [n, c, h, w] = x.dims();
        let chmean = x.clone().reshape([n, c, h * w]).mean_dim(2).reshape([n, c]); // [n, c]
        let corner = x.clone().slice([0..n, 0..c.min(8), 0..h.min(6), 0..w.min(6)]); // [n, 8, 6, 6]
        taps.push((name, chmean, corner));
    });
    let logits = model.logits(pool.clone(), FcBias::Included).expect("the fixture has an fc head");
    let nobias = model.logits(pool.clone(), FcBias::Excluded).expect("the fixture has an fc head");
    let softmax = model.class_probabilities(pool.clone()).expect("the fixture has an fc head");
    for (name, start, end) in &spans {
        let rows_of = |t: Tensor<B, 2>| {
            let cols = t.dims()[1];
            t.slice([*start..*end, 0..cols])
        };
        out.put(format!("pool.{name}"), rows_of(pool.clone()));
        out.put(format!("logits.{name}"), rows_of(logits.clone()));
        out.put(format!("logits_nobias.{name}"), rows_of(nobias.clone()));
        out.put(format!("softmax_nobias.{name}"), rows_of(softmax.clone()));
        for (point, chmean, corner) in &taps {
            out.put(format!("act.{name}.{point}.chmean"), rows_of(chmean.clone()));
            let [_, c, h, w] = corner.dims();
            out.put(format!("act.{name}.{point}.corner"), corner.clone().slice([*start..*end, 0..c, 0..h, 0..w]));
        }
    }
    debug_assert_eq!(logits.dims()[1], INCEPTION_CLASSES);
    Ok(out)
}

/// The branch pytorch-fid's `calculate_frechet_distance` took for a case
/// (`cases.<case>.sqrtm_path`): its `sigma + eps I` fallback when scipy's
/// `sqrtm(s1 s2)` was not finite. The eigen-based trace never needs the
/// fallback by itself, so the fixture says when to apply it.
fn pytorch_fid_branch(fixture: &Fixture, case: &str) -> Result<SqrtmOffset, ParityError> {
    Ok(match fixture.meta_str(&format!("/cases/{case}/sqrtm_path"))? {
        "eps_offset" => SqrtmOffset::Eps(PYTORCH_FID_EPS),
        _ => SqrtmOffset::None,
    })
}

/// The metrics case: statistics, FID values and Inception Scores.
fn metrics(fixture: &Fixture) -> Result<Computed, ParityError> {
    let mut out = Computed::default();
    let stats_error = |key: &str| {
        let case = fixture.case.clone();
        let key = key.to_string();
        move |source| ParityError::Statistics { case, key, source: Box::new(source) }
    };
    for case in ["regular", "rankdef"] {
        let p = format!("fid.{case}");
        let mut stats = Vec::new();
        for i in ["1", "2"] {
            let feats = fixture.get(&format!("{p}.feats{i}"))?;
            let dim = feats.shape[1];
            let values = fixture.f32s(&format!("{p}.feats{i}"))?;
            let s64 = FeatureStatistics::from_features(&values, dim, MeanPrecision::F64)
                .map_err(stats_error(&format!("{p}.mu{i}")))?;
            let s32 = FeatureStatistics::from_features(&values, dim, MeanPrecision::F32)
                .map_err(stats_error(&format!("{p}.mu{i}_f32")))?;
            out.wide(format!("{p}.mu{i}"), vec![dim], s64.mu.clone());
            out.wide(format!("{p}.sigma{i}"), vec![dim, dim], s64.sigma.clone());
            out.wide(format!("{p}.mu{i}_f32"), vec![dim], s32.mu.clone());
            stats.push((s64, s32));
        }
        // pytorch-fid's value follows the branch its scipy `sqrtm` took.
        let branch = pytorch_fid_branch(fixture, case)?;
        let fid = frechet_distance(&stats[0].0, &stats[1].0, branch).map_err(stats_error(&format!("{p}.fid")))?;
        out.scalar(format!("{p}.fid"), fid);
        let eig = frechet_distance(&stats[0].0, &stats[1].0, SqrtmOffset::None)
            .map_err(stats_error(&format!("{p}.fid_eig")))?;
        out.scalar(format!("{p}.fid_eig"), eig);
        let diffmoe = frechet_distance(&stats[0].1, &stats[1].1, branch)
            .map_err(stats_error(&format!("{p}.fid_diffmoe_stats")))?;
        out.scalar(format!("{p}.fid_diffmoe_stats"), diffmoe);
    }

    // The eps case: covariances for which scipy's sqrtm is not finite, so
    // pytorch-fid (recorded in `cases.eps.sqrtm_path`) took its offset branch.
    let stats = |i: &str| -> Result<FeatureStatistics, ParityError> {
        let mu = fixture.get(&format!("fid.eps.mu{i}"))?;
        let sigma = fixture.get(&format!("fid.eps.sigma{i}"))?;
        Ok(FeatureStatistics {
            dim: mu.shape[0],
            mu: mu.values.clone(),
            mu_precision: MeanPrecision::F64,
            sigma: sigma.values.clone(),
        })
    };
    let (a, b) = (stats("1")?, stats("2")?);
    let offset =
        frechet_distance(&a, &b, SqrtmOffset::Eps(PYTORCH_FID_EPS)).map_err(stats_error("fid.eps.fid_eig_offset"))?;
    let plain = frechet_distance(&a, &b, SqrtmOffset::None).map_err(stats_error("fid.eps.fid_eig"))?;
    let fid = match pytorch_fid_branch(fixture, "eps")? {
        SqrtmOffset::None => plain,
        SqrtmOffset::Eps(_) => offset,
    };
    out.scalar("fid.eps.fid", fid);
    out.scalar("fid.eps.fid_eig_offset", offset);
    out.scalar("fid.eps.fid_eig", plain);

    // The Inception Score.
    let logits = fixture.get("is.logits")?;
    let classes = logits.shape[1];
    let softmax = softmax_rows(&fixture.f32s("is.logits")?, classes);
    let split = fixture.scalar("is.split_size")? as usize;
    let f32_score = inception_score(&softmax, classes, split, ScoreArithmetic::F32);
    let f64_score = inception_score(&softmax, classes, split, ScoreArithmetic::F64);
    out.wide("is.softmax", logits.shape.clone(), softmax.iter().map(|&v| f64::from(v)).collect());
    out.wide("is.split_scores", vec![f32_score.split_scores.len()], f32_score.split_scores.clone());
    out.scalar("is.score", f32_score.score);
    out.scalar("is.score_f64", f64_score.score);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups() {
        assert_eq!(group_of("act.x299.Mixed_5b.chmean"), "act.x299");
        assert_eq!(group_of("fid.eps.fid_eig"), "fid.eps");
        assert_eq!(group_of("pool.x_up"), "pool");
        assert_eq!(group_of("is.score"), "is");
    }
}
