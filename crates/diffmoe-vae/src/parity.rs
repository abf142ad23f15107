//! Parity with diffusers' `AutoencoderKL`: reads a directory of VAE fixtures
//! in the format of `shared/fixtures/vae/README.md` (an `index.json`, then
//! `<case>.json` + `<case>.safetensors` per case, or a JSON-only
//! architecture case), recomputes every stored output with this crate, and
//! compares.
//!
//! Every output tensor of a case is compared; an output nobody computes is a
//! failure, and so is an unknown section of an architecture case, so a new
//! kind of fixture can never pass silently.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{backend::Backend, Tensor};
use serde_json::Value;

pub use diffmoe_parity::{any_failed, format_report, ParityRow, Status};
use diffmoe_parity::{check_index, read_json, Fixture, FixtureError};
use diffmoe_weights::HostTensor;

use crate::activations::Activations;
use crate::autoencoder::{from_diffusion_scale, to_diffusion_scale};
use crate::config::{AutoencoderKlConfig, SCALING_FACTOR};
use crate::error::{ConfigError, LoadError};
use crate::group_norm::GROUP_NORM_EPS;
use crate::key_layout::{KeyLayout, SD_CHECKPOINT_PREFIX};
use crate::posterior::DiagonalGaussian;
use crate::state_dict::{ParamKind, ParamSpec};
use crate::weights::{load_tensor_map, TensorMap};

/// Relative tolerance when a fixture suggests none: the VAE fixtures'
/// `suggested_tolerance`. A float32 port that sums in another order lands
/// near 2e-5 absolute on the O(1) decoder outputs (their residual stream is
/// ~10x larger) and 5e-6 on the encoder's.
pub const DEFAULT_RTOL: f64 = 1e-4;
/// Absolute tolerance when a fixture suggests none (see [`DEFAULT_RTOL`]).
pub const DEFAULT_ATOL: f64 = 1e-4;

/// Why a parity run could not start.
#[derive(Debug, thiserror::Error)]
pub enum ParityError {
    /// A fixture file could not be read, or lacks what a case needs.
    #[error(transparent)]
    Fixture(#[from] FixtureError),
    /// The fixture's constructor arguments cannot be built.
    #[error("fixture {path}: unusable constructor arguments")]
    Config {
        /// The manifest.
        path: PathBuf,
        /// The cause.
        #[source]
        source: ConfigError,
    },
    /// The fixture's `model.*` weights cannot be loaded.
    #[error("case {case}: cannot load the model weights")]
    Load {
        /// The case.
        case: String,
        /// The cause.
        #[source]
        source: Box<LoadError>,
    },
}

/// The elementwise tolerance `|ours - ref| <= atol + rtol * |ref|`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Relative part.
    pub rtol: f64,
    /// Absolute part.
    pub atol: f64,
}

impl Tolerance {
    /// The fixture's `suggested_tolerance`, or the defaults.
    fn of(meta: &Value) -> Self {
        let t = &meta["suggested_tolerance"];
        Self { rtol: t["rtol"].as_f64().unwrap_or(DEFAULT_RTOL), atol: t["atol"].as_f64().unwrap_or(DEFAULT_ATOL) }
    }
}

/// Compares one case of `dir`; one row per group of outputs.
pub fn check_case<B: Backend>(dir: &Path, case: &str, device: &B::Device) -> Result<Vec<ParityRow>, ParityError> {
    let path = dir.join(format!("{case}.json"));
    let meta = read_json(&path)?;
    let format = meta["format"].as_str().unwrap_or_default();
    if format.starts_with("VAE parity fixture") {
        autoencoder_case::<B>(Fixture::with_manifest(dir, case, meta)?, device)
    } else if format.starts_with("SD VAE architecture") {
        architecture_case::<B>(case, &path, &meta, device)
    } else {
        Err(FixtureError::malformed(path, format!("unknown fixture format {:?}", meta["format"])).into())
    }
}

/// Checks every case listed in `dir/index.json`.
pub fn check_dir<B: Backend>(dir: &Path, device: &B::Device) -> Result<Vec<ParityRow>, ParityError> {
    check_index(dir, |case| check_case::<B>(dir, case, device))
}

/// The report group of an output key: its first segment, plus `.act` for
/// module activations (`encode.act.encoder.conv_in` -> `encode.act`).
fn group_of(key: &str) -> String {
    let mut parts = key.split('.');
    let first = parts.next().unwrap_or_default();
    match parts.next() {
        Some("act") => format!("{first}.act"),
        _ => first.to_string(),
    }
}

/// What this port computed for a case, under the fixture's key names.
struct Computed<B: Backend> {
    tensors: BTreeMap<String, HostTensor>,
    _backend: std::marker::PhantomData<B>,
}

impl<B: Backend> Computed<B> {
    fn put<const D: usize>(&mut self, key: impl Into<String>, t: Tensor<B, D>) {
        self.tensors.insert(key.into(), HostTensor::from_tensor(t));
    }

    fn activations(&mut self, prefix: &str, acts: Activations<B>) {
        for (name, t) in acts.outputs {
            self.put(format!("{prefix}.act.{name}"), t);
        }
    }

    /// `mean`, `logvar`, `std`, `var`, `kl`, `mode` of a posterior.
    fn posterior(&mut self, prefix: &str, dist: &DiagonalGaussian<B>) {
        self.put(format!("{prefix}.mean"), dist.mean.clone());
        self.put(format!("{prefix}.logvar"), dist.logvar.clone());
        self.put(format!("{prefix}.std"), dist.std.clone());
        self.put(format!("{prefix}.var"), dist.var.clone());
        self.put(format!("{prefix}.kl"), dist.kl());
        self.put(format!("{prefix}.mode"), dist.mode());
    }
}

fn autoencoder_case<B: Backend>(fixture: Fixture, device: &B::Device) -> Result<Vec<ParityRow>, ParityError> {
    let (case, manifest, meta) = (fixture.case.as_str(), &fixture.manifest, &fixture.meta);
    let config = AutoencoderKlConfig::from_constructor_kwargs(&meta["config"]["constructor_kwargs"])
        .map_err(|source| ParityError::Config { path: manifest.to_path_buf(), source })?;
    let weights: TensorMap = fixture
        .tensors
        .iter()
        .filter_map(|(k, t)| {
            k.strip_prefix("model.")
                .map(|name| (name.to_string(), HostTensor { shape: t.shape.clone(), data: t.f32s() }))
        })
        .collect();
    let model = load_tensor_map::<B>(&config, weights, device)
        .map_err(|source| ParityError::Load { case: case.into(), source: Box::new(source) })?;
    let input = |key: &str| -> Result<Option<Tensor<B, 4>>, ParityError> {
        match fixture.tensors.contains_key(key) {
            true => Ok(Some(fixture.float::<B, 4>(key, device)?)),
            false => Ok(None),
        }
    };
    let mut c = Computed::<B> { tensors: BTreeMap::new(), _backend: std::marker::PhantomData };

    if let Some(x) = input("inputs.x")? {
        let mut acts = Activations::new();
        let moments = model.encode_recorded(x, &mut acts);
        c.activations("encode", acts);
        c.put("encode.moments", moments.clone());
        let dist = DiagonalGaussian::from_moments(moments);
        c.posterior("encode", &dist);
        c.put("recon.mode", model.decode(dist.mode()));
        if let Some(noise) = input("inputs.noise")? {
            let sample = dist.sample(noise);
            c.put("encode.sample", sample.clone());
            c.put("encode.latents_scaled", to_diffusion_scale(sample.clone()));
            c.put("recon.sample", model.decode(sample));
        }
    }
    if let Some(x) = input("inputs.x_odd")? {
        let mut acts = Activations::new();
        let moments = model.encode_recorded(x, &mut acts);
        c.activations("encode_odd", acts);
        c.put("encode_odd.moments", moments.clone());
        c.posterior("encode_odd", &DiagonalGaussian::from_moments(moments));
    }
    if let Some(z_scaled) = input("inputs.z_scaled")? {
        let z = from_diffusion_scale(z_scaled);
        c.put("decode.z", z.clone());
        let mut acts = Activations::new();
        let out = model.decode_recorded(z, &mut acts);
        c.activations("decode", acts);
        c.put("decode.out", out);
    }
    if let Some(moments) = input("inputs.dist_moments")? {
        let dist = DiagonalGaussian::from_moments(moments);
        c.posterior("dist", &dist);
        if let Some(noise) = input("inputs.dist_noise")? {
            c.put("dist.sample", dist.sample(noise));
        }
    }

    let tol = Tolerance::of(meta);
    let mut groups: BTreeMap<String, ParityRow> = BTreeMap::new();
    for (key, reference) in &fixture.tensors {
        if key.starts_with("model.") || key.starts_with("inputs.") {
            continue;
        }
        let group = group_of(key);
        let row = groups.entry(group.clone()).or_insert_with(|| ParityRow::new(case, &group));
        row.tensors += 1;
        let Some(ours) = c.tensors.get(key) else {
            row.fail(|| format!("`{key}` is not computed"));
            continue;
        };
        if ours.shape != reference.shape {
            row.fail(|| format!("`{key}`: shape {:?}, expected {:?}", ours.shape, reference.shape));
            continue;
        }
        let (abs, rel, ratio) = compare(&ours.data, &reference.values, tol);
        row.record(abs, rel);
        row.tolerance_used = Some(row.tolerance_used.unwrap_or(0.0).max(ratio));
        if ratio > 1.0 || ratio.is_nan() {
            row.fail(|| format!("`{key}`: max abs {abs:.3e}, {ratio:.2}x the tolerance"));
        }
    }
    Ok(groups.into_values().collect())
}

/// Largest absolute error, that error over the reference's largest
/// magnitude, and the largest error over its elementwise tolerance. A NaN on
/// either side counts as an infinite error.
fn compare(ours: &[f32], reference: &[f64], tol: Tolerance) -> (f64, f64, f64) {
    let mut abs = 0.0f64;
    let mut ratio = 0.0f64;
    let mut scale = 0.0f64;
    for (&a, &r) in ours.iter().zip(reference) {
        let a = f64::from(a);
        let d = if a.is_nan() || r.is_nan() {
            f64::INFINITY
        } else if a == r {
            0.0
        } else {
            (a - r).abs()
        };
        abs = abs.max(d);
        ratio = ratio.max(d / (tol.atol + tol.rtol * r.abs()));
        scale = scale.max(r.abs());
    }
    (abs, if scale > 0.0 { abs / scale } else { abs }, ratio)
}

/// The sections of an architecture manifest this checker knows; any other
/// is reported as unchecked.
const ARCHITECTURE_SECTIONS: [&str; 17] = [
    "format",
    "generator",
    "generator_version",
    "library_versions",
    "model",
    "constructor_kwargs",
    "resolved_config",
    "config_notes",
    "latent_scaling_factor",
    "downsampling_factor",
    "parameter_counts",
    "mid_block_attention",
    "state_dict_keys",
    "key_families_notes",
    "ldm_to_current",
    "legacy_to_current",
    "checks",
];

/// The layout of a `state_dict_keys` entry.
fn layout_named(name: &str) -> Option<KeyLayout> {
    match name {
        "current_diffusers" => Some(KeyLayout::Diffusers),
        "legacy_diffusers" => Some(KeyLayout::LegacyDiffusers),
        "ldm_original" => Some(KeyLayout::Ldm),
        _ => None,
    }
}

/// An architecture manifest: the config, the parameter counts, and that the
/// loader's plan accepts the real checkpoint's key lists in every layout
/// (names and shapes only; no weights are allocated).
fn architecture_case<B: Backend>(
    case: &str,
    manifest: &Path,
    meta: &Value,
    device: &B::Device,
) -> Result<Vec<ParityRow>, ParityError> {
    let malformed = |reason: String| ParityError::from(FixtureError::malformed(manifest, reason));
    let config_of = |v: &Value| {
        AutoencoderKlConfig::from_constructor_kwargs(v)
            .map_err(|source| ParityError::Config { path: manifest.to_path_buf(), source })
    };
    let config = config_of(&meta["constructor_kwargs"])?;
    let model = config.init::<B>(device);
    let specs = model.parameter_specs();
    let levels = config.levels();
    let mut rows = Vec::new();

    let sections = meta.as_object().ok_or_else(|| malformed("not a JSON object".into()))?;
    rows.push(ParityRow::checks(
        case,
        "sections",
        sections.keys().map(|k| (format!("section `{k}` is not checked"), ARCHITECTURE_SECTIONS.contains(&k.as_str()))),
    ));

    let mut config_checks = vec![(
        "constructor_kwargs differ from the sd-vae-ft-mse preset".to_string(),
        config == AutoencoderKlConfig::sd_vae_ft_mse(),
    )];
    if !meta["resolved_config"].is_null() {
        config_checks.push((
            "resolved_config differs from constructor_kwargs".into(),
            config_of(&meta["resolved_config"])? == config,
        ));
    }
    if let Some(f) = meta["latent_scaling_factor"].as_f64() {
        config_checks.push((format!("latent_scaling_factor {f} != {SCALING_FACTOR}"), f as f32 == SCALING_FACTOR));
    }
    if let Some(f) = meta["downsampling_factor"].as_u64() {
        config_checks.push((
            format!("downsampling_factor {f} != {}", config.downsampling_factor()),
            f as usize == config.downsampling_factor(),
        ));
    }
    rows.push(ParityRow::checks(case, "config", config_checks));

    if let Some(counts) = meta["parameter_counts"].as_object() {
        let sum = |f: &dyn Fn(&ParamSpec) -> bool| specs.iter().filter(|s| f(s)).map(ParamSpec::numel).sum::<usize>();
        let side = |s: &ParamSpec, roots: [&str; 2]| roots.iter().any(|r| s.name.split('.').next() == Some(r));
        let ours = |name: &str| match name {
            "encoder_plus_quant_conv" => Some(sum(&|s| side(s, ["encoder", "quant_conv"]))),
            "decoder_plus_post_quant_conv" => Some(sum(&|s| side(s, ["decoder", "post_quant_conv"]))),
            "total" => Some(sum(&|_| true)),
            _ => None,
        };
        rows.push(ParityRow::checks(
            case,
            "parameter_counts",
            counts.iter().map(|(name, v)| {
                let ours = ours(name);
                (format!("{name}: ours {ours:?}, fixture {v}"), ours.is_some() && ours.map(|n| n as u64) == v.as_u64())
            }),
        ));
    }

    if let Some(attn) = meta["mid_block_attention"].as_object() {
        let channels = *config.block_out_channels.last().expect("validated configs have levels");
        let scale = 1.0 / (channels as f64).sqrt();
        rows.push(ParityRow::checks(
            case,
            "mid_block_attention",
            attn.iter().map(|(name, v)| {
                let ok = match name.as_str() {
                    "heads" => v.as_u64() == Some(1),
                    "dim_head" => v.as_u64() == Some(channels as u64),
                    "scale" => v.as_f64().is_some_and(|s| (s - scale).abs() < 1e-15),
                    "group_norm_groups" => v.as_u64() == Some(config.norm_num_groups as u64),
                    "group_norm_eps" => v.as_f64() == Some(GROUP_NORM_EPS),
                    "residual_connection" => v.as_bool() == Some(true),
                    "rescale_output_factor" => v.as_f64() == Some(1.0),
                    "processor" => v.as_str() == Some("AttnProcessor2_0"),
                    _ => false,
                };
                (format!("mid_block_attention.{name} = {v} is not what this port computes"), ok)
            }),
        ));
    }

    let key_lists = meta["state_dict_keys"].as_object().ok_or_else(|| malformed("no `state_dict_keys`".into()))?;
    for (name, list) in key_lists {
        let keys: Vec<(String, Vec<usize>)> =
            serde_json::from_value(list.clone()).map_err(|e| malformed(format!("state_dict_keys.{name}: {e}")))?;
        for prefix in ["", SD_CHECKPOINT_PREFIX] {
            let group = if prefix.is_empty() { format!("keys.{name}") } else { format!("keys.{name}+prefix") };
            let mut row = ParityRow::new(case, &group);
            row.tensors = keys.len();
            let mut all: Vec<(String, Vec<usize>)> =
                keys.iter().map(|(k, s)| (format!("{prefix}{k}"), s.clone())).collect();
            if !prefix.is_empty() {
                // What else a full SD checkpoint or an LDM VAE file holds.
                all.push(("model.diffusion_model.out.2.weight".into(), vec![4, 320, 3, 3]));
                all.push(("cond_stage_model.transformer.text_model.final_layer_norm.weight".into(), vec![768]));
                all.push((format!("{prefix}loss.logvar"), vec![]));
            }
            match (layout_named(name), model.load_plan(all.iter().map(|(k, s)| (k.as_str(), s.as_slice())))) {
                (None, _) => row.fail(|| format!("unknown key layout `{name}`")),
                (_, Err(e)) => row.fail(|| e.to_string()),
                (Some(expected), Ok(plan)) if plan.layout != expected => {
                    row.fail(|| format!("detected {}, expected {expected}", plan.layout))
                }
                (Some(_), Ok(plan)) if plan.entries.len() != specs.len() || plan.entries.len() != keys.len() => row
                    .fail(|| {
                        format!("{} of {} keys planned for {} parameters", plan.entries.len(), keys.len(), specs.len())
                    }),
                (Some(_), Ok(_)) => {}
            }
            rows.push(row);
        }
    }

    let kind_of: BTreeMap<&str, ParamKind> = specs.iter().map(|s| (s.name.as_str(), s.kind)).collect();
    if let Some(map) = meta["ldm_to_current"].as_object() {
        rows.push(ParityRow::checks(
            case,
            "renames.ldm_to_current",
            map.iter().map(|(ldm, target)| {
                let current = target["diffusers"].as_str().unwrap_or_default();
                let squeeze = target["squeeze_1x1"].as_bool();
                let ours = KeyLayout::Ldm.source_key(current, levels);
                let our_squeeze = kind_of.get(current).map(|k| *k == ParamKind::LinearWeight);
                (
                    format!("`{ldm}` -> `{current}` (squeeze {squeeze:?}); ours `{ours}` (squeeze {our_squeeze:?})"),
                    ours == *ldm && our_squeeze.is_some() && our_squeeze == squeeze,
                )
            }),
        ));
    }
    if let Some(map) = meta["legacy_to_current"].as_object() {
        rows.push(ParityRow::checks(
            case,
            "renames.legacy_to_current",
            map.iter().map(|(legacy, current)| {
                let current = current.as_str().unwrap_or_default();
                let ours = KeyLayout::LegacyDiffusers.source_key(current, levels);
                (format!("`{legacy}` -> `{current}`; ours `{ours}`"), ours == *legacy && kind_of.contains_key(current))
            }),
        ));
    }
    if let Some(checks) = meta["checks"].as_object() {
        rows.push(ParityRow::checks(
            case,
            "generator_checks",
            checks
                .iter()
                .map(|(name, v)| (format!("the generator's check `{name}` is {v}"), v.as_bool() == Some(true))),
        ));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_split_activations_from_outputs() {
        assert_eq!(group_of("encode.act.encoder.conv_in"), "encode.act");
        assert_eq!(group_of("encode.moments"), "encode");
        assert_eq!(group_of("encode_odd.act.encoder.mid_block"), "encode_odd.act");
        assert_eq!(group_of("dist.kl"), "dist");
    }

    #[test]
    fn tolerance_is_elementwise_and_nan_fails() {
        let tol = Tolerance { rtol: 1e-4, atol: 1e-4 };
        // |d| = 1.5e-4 is allowed at |ref| = 1 (2e-4) but not at |ref| = 0 (1e-4).
        let (_, _, ratio) = compare(&[1.00015], &[1.0], tol);
        assert!(ratio < 1.0, "{ratio}");
        let (abs, _, ratio) = compare(&[0.00015], &[0.0], tol);
        assert!(ratio > 1.0 && (abs - 1.5e-4).abs() < 1e-9, "{ratio}");
        let (_, _, ratio) = compare(&[f32::NAN], &[0.0], tol);
        assert!(ratio.is_infinite());
        let (abs, _, _) = compare(&[f32::INFINITY], &[f64::INFINITY], tol);
        assert_eq!(abs, 0.0);
    }
}
