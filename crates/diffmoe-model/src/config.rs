//! Model and run configuration. Field names mirror the keyword arguments of
//! the official `DiT` constructors (`models/models_*.py`), in snake case, with
//! enums where the official code uses flags.

use std::path::Path;

use serde::{Deserialize, Serialize};

use diffmoe_core::{capacity_k, ExpertKind};

use crate::error::ConfigError;
use crate::preset;
use crate::recipe::TrainConfig;

/// The MLP family of the paper's comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Dense DiT (`models_DiT.py`).
    Dense,
    /// Token choice, TC-DiT (`models_TCDiT.py`).
    Tc,
    /// Expert choice inside each sample, EC-DiT (`models_ECDiT.py`).
    Ec,
    /// Expert choice over the batch-level global token pool (`models_DiffMoE.py`).
    Diffmoe,
}

impl Family {
    /// The name used in the paper.
    pub fn paper_name(self) -> &'static str {
        match self {
            Self::Dense => "Dense-DiT",
            Self::Tc => "TC-DiT",
            Self::Ec => "EC-DiT",
            Self::Diffmoe => "DiffMoE",
        }
    }
}

/// Which blocks have a MoE MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MoeLayout {
    /// The odd blocks (`i % 2 == 1`), dense MLPs elsewhere (official `interleave=True`).
    Interleaved,
    /// Every block (official `interleave=False`; not available for TC-DiT,
    /// whose official constructor fails without interleaving).
    All,
}

/// The diffusion objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Rectified flow (official `diffusion/rectified_flow.py`): t = 0 is noise.
    Flow,
    /// DDPM with 1000 linear betas and a learned-range variance
    /// (official `diffusion/gaussian_diffusion.py`).
    Ddpm,
}

/// MoE hyper-parameters (the official `MoE_config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeConfig {
    /// Routed experts per MoE layer.
    pub num_experts: usize,
    /// DiffMoE and EC: each expert takes `int((tokens / E) * capacity)` tokens
    /// (tokens of the batch pool for DiffMoE, of one sample for EC). TC: the
    /// number of experts per token (an integer).
    pub capacity: f64,
    /// Shared expert. DiffMoE reads it as a flag (any value > 0 adds a GELU
    /// `Mlp(D, 8D)`); TC and EC add a SwiGLU `MoeMLP(D, D * n)`. TC's official
    /// code crashes on 0: leave it out instead.
    #[serde(default)]
    pub n_shared_experts: Option<usize>,
    /// Which blocks are MoE.
    #[serde(default = "default_layout")]
    pub layout: MoeLayout,
    /// DiffMoE: weight of each layer's capacity-predictor loss (official
    /// `CapacityPred_loss_weight`, constructor default 0.01, 1.0 in the
    /// shipped S-E16 config).
    #[serde(default = "default_capacity_loss_weight")]
    pub capacity_loss_weight: f64,
}

fn default_layout() -> MoeLayout {
    MoeLayout::Interleaved
}

fn default_capacity_loss_weight() -> f64 {
    0.01
}

fn default_mlp_ratio() -> f64 {
    4.0
}

fn default_class_dropout() -> f64 {
    0.1
}

fn default_learn_sigma() -> bool {
    true
}

fn default_expert() -> ExpertKind {
    ExpertKind::Gelu
}

/// The DiT backbone (official `DiT(...)` keyword arguments).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiTConfig {
    /// Which MLP family.
    pub family: Family,
    /// Side of the (square) input in pixels or latent cells.
    pub input_size: usize,
    /// Side of a patch.
    pub patch_size: usize,
    /// Input channels (4 for SD-VAE latents, 1 or 3 for pixels).
    pub in_channels: usize,
    /// Model width `D`.
    pub hidden_size: usize,
    /// Number of blocks.
    pub depth: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Width of each head; `hidden_size / num_heads` when absent.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// MLP hidden width is `int(hidden_size * mlp_ratio)`.
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// Label dropout for classifier-free guidance; > 0 adds the null-label row.
    #[serde(default = "default_class_dropout")]
    pub class_dropout_prob: f64,
    /// Number of classes.
    pub num_classes: usize,
    /// Doubles the output channels to predict a variance (used by DDPM; the
    /// flow objective ignores the second half, as the official code does).
    #[serde(default = "default_learn_sigma")]
    pub learn_sigma: bool,
    /// GELU or SwiGLU MLPs and experts (official `use_swiglu`).
    #[serde(default = "default_expert")]
    pub mlp: ExpertKind,
    /// MoE settings; absent for the dense family.
    #[serde(default)]
    pub moe: Option<MoeConfig>,
}

impl DiTConfig {
    /// Output channels: `2 * in_channels` with a learned sigma.
    pub fn out_channels(&self) -> usize {
        if self.learn_sigma {
            2 * self.in_channels
        } else {
            self.in_channels
        }
    }

    /// Tokens per sample.
    pub fn tokens(&self) -> usize {
        (self.input_size / self.patch_size).pow(2)
    }

    /// Width of each attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_heads.max(1))
    }

    /// Hidden width of the MLPs and experts: `int(hidden_size * mlp_ratio)`.
    pub fn mlp_hidden(&self) -> usize {
        (self.hidden_size as f64 * self.mlp_ratio) as usize
    }

    /// Rows of the label table: one more (the null label) when label dropout is on.
    pub fn label_rows(&self) -> usize {
        self.num_classes + usize::from(self.class_dropout_prob > 0.0)
    }

    /// Whether block `i` has a MoE MLP.
    pub fn is_moe_block(&self, i: usize) -> bool {
        match (&self.family, &self.moe) {
            (Family::Dense, _) | (_, None) => false,
            (_, Some(moe)) => match moe.layout {
                MoeLayout::All => true,
                MoeLayout::Interleaved => i % 2 == 1,
            },
        }
    }

    /// Indices of the MoE blocks.
    pub fn moe_blocks(&self) -> Vec<usize> {
        (0..self.depth).filter(|&i| self.is_moe_block(i)).collect()
    }

    /// Checks every field; the error names the field and what is allowed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = |field: &str, v: usize| {
            if v == 0 {
                Err(ConfigError::invalid(field, v, "must be at least 1"))
            } else {
                Ok(())
            }
        };
        positive("model.input_size", self.input_size)?;
        positive("model.patch_size", self.patch_size)?;
        positive("model.in_channels", self.in_channels)?;
        positive("model.hidden_size", self.hidden_size)?;
        positive("model.depth", self.depth)?;
        positive("model.num_heads", self.num_heads)?;
        positive("model.num_classes", self.num_classes)?;
        if !self.input_size.is_multiple_of(self.patch_size) {
            return Err(ConfigError::invalid(
                "model.input_size",
                self.input_size,
                format!("must be a multiple of model.patch_size = {}", self.patch_size),
            ));
        }
        if !self.hidden_size.is_multiple_of(4) {
            return Err(ConfigError::invalid(
                "model.hidden_size",
                self.hidden_size,
                "must be a multiple of 4 (the 2-D sin-cos position table)",
            ));
        }
        match self.head_dim {
            Some(0) => return Err(ConfigError::invalid("model.head_dim", 0, "must be at least 1 when given")),
            None if !self.hidden_size.is_multiple_of(self.num_heads) => {
                return Err(ConfigError::invalid(
                    "model.num_heads",
                    self.num_heads,
                    format!("must divide model.hidden_size = {} unless model.head_dim is given", self.hidden_size),
                ))
            }
            _ => {}
        }
        if !(self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0) || self.mlp_hidden() == 0 {
            return Err(ConfigError::invalid(
                "model.mlp_ratio",
                self.mlp_ratio,
                "must be a positive number with int(hidden_size * mlp_ratio) >= 1",
            ));
        }
        if !(0.0..1.0).contains(&self.class_dropout_prob) {
            return Err(ConfigError::invalid("model.class_dropout_prob", self.class_dropout_prob, "must be in [0, 1)"));
        }
        match (self.family, &self.moe) {
            (Family::Dense, None) => Ok(()),
            (Family::Dense, Some(_)) => {
                Err(ConfigError::invalid("model.moe", "a [model.moe] table", "must be absent for family = \"dense\""))
            }
            (family, None) => Err(ConfigError::invalid(
                "model.moe",
                "nothing",
                format!("a [model.moe] table is required for family = \"{}\"", family_key(family)),
            )),
            (family, Some(moe)) => self.validate_moe(family, moe),
        }
    }

    fn validate_moe(&self, family: Family, moe: &MoeConfig) -> Result<(), ConfigError> {
        if moe.num_experts < 1 {
            return Err(ConfigError::invalid("model.moe.num_experts", moe.num_experts, "must be at least 1"));
        }
        let e = moe.num_experts as f64;
        if !(moe.capacity.is_finite() && moe.capacity > 0.0) {
            return Err(ConfigError::invalid("model.moe.capacity", moe.capacity, "must be a positive number"));
        }
        if !(moe.capacity_loss_weight.is_finite() && moe.capacity_loss_weight >= 0.0) {
            return Err(ConfigError::invalid(
                "model.moe.capacity_loss_weight",
                moe.capacity_loss_weight,
                "must be a number >= 0",
            ));
        }
        match family {
            Family::Tc => {
                if moe.capacity.fract() != 0.0 || moe.capacity > e {
                    return Err(ConfigError::invalid(
                        "model.moe.capacity",
                        moe.capacity,
                        format!(
                            "for TC-DiT it is the number of experts per token: an integer in 1..={}",
                            moe.num_experts
                        ),
                    ));
                }
                if moe.n_shared_experts == Some(0) {
                    return Err(ConfigError::invalid(
                        "model.moe.n_shared_experts",
                        0,
                        "TC-DiT takes a positive number or no value (0 crashes the official forward)",
                    ));
                }
                if moe.layout == MoeLayout::All {
                    return Err(ConfigError::invalid(
                        "model.moe.layout",
                        "\"all\"",
                        "TC-DiT supports only \"interleaved\" (the official constructor fails otherwise)",
                    ));
                }
            }
            Family::Ec => {
                let k = capacity_k(self.tokens(), moe.num_experts, moe.capacity);
                if k < 1 || k > self.tokens() {
                    return Err(ConfigError::invalid(
                        "model.moe.capacity",
                        moe.capacity,
                        format!(
                            "EC-DiT needs 1 <= int((tokens / num_experts) * capacity) <= tokens, with {} tokens and {} experts",
                            self.tokens(),
                            moe.num_experts
                        ),
                    ));
                }
            }
            Family::Diffmoe => {
                if moe.capacity > e {
                    return Err(ConfigError::invalid(
                        "model.moe.capacity",
                        moe.capacity,
                        format!("must be at most num_experts = {} (k cannot exceed the pool)", moe.num_experts),
                    ));
                }
            }
            Family::Dense => unreachable!("dense configs have no MoE table"),
        }
        Ok(())
    }
}

pub(crate) fn family_key(family: Family) -> &'static str {
    match family {
        Family::Dense => "dense",
        Family::Tc => "tc",
        Family::Ec => "ec",
        Family::Diffmoe => "diffmoe",
    }
}

/// A model with its objective: one row of the paper's tables, or a small
/// preset for CPU work. This is the content of a `configs/*.toml` file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Preset-style name, e.g. `diffmoe-l-e16-flow`.
    pub name: String,
    /// One line on what this configuration is.
    #[serde(default)]
    pub description: String,
    /// The diffusion objective.
    pub objective: Objective,
    /// The network.
    pub model: DiTConfig,
    /// The training recipe (the official one when the table is absent).
    #[serde(default)]
    pub train: TrainConfig,
}

impl RunConfig {
    /// Validates the config.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.model.validate()?;
        self.train.validate()?;
        if let Some(&class) = self.train.grid.classes.iter().find(|&&c| c >= self.model.num_classes) {
            return Err(ConfigError::invalid(
                "train.grid.classes",
                class,
                format!("every class must be below model.num_classes = {}", self.model.num_classes),
            ));
        }
        Ok(())
    }

    /// Parses and validates TOML text; `origin` names the source in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let config: Self =
            toml::from_str(text).map_err(|source| ConfigError::Parse { path: origin.to_path_buf(), source })?;
        config.validate()?;
        Ok(config)
    }

    /// The TOML text of this config.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a RunConfig always serialises")
    }

    /// A preset name or the path of a TOML config file.
    pub fn resolve(name_or_path: &str) -> Result<Self, ConfigError> {
        if let Some(config) = preset::preset(name_or_path) {
            return Ok(config);
        }
        let path = Path::new(name_or_path);
        if path.is_file() {
            let text =
                std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.to_path_buf(), source })?;
            return Self::from_toml(&text, path);
        }
        Err(ConfigError::Unknown { name: name_or_path.to_string(), presets: preset::preset_names().join(", ") })
    }
}

impl DiTConfig {
    /// The config of an official `DiT(**kwargs)` of the given family, from its
    /// keyword arguments as JSON (as the parity fixtures and the official YAML
    /// configs hold them: `hidden_size`, `use_swiglu`, `MoE_config`,
    /// `CapacityPred_loss_weight`, ...). Official defaults fill absent keys.
    pub fn from_official_kwargs(family: Family, kwargs: &serde_json::Value) -> Result<Self, ConfigError> {
        let get = |k: &str| kwargs.get(k).filter(|v| !v.is_null());
        let uint = |k: &str, default: Option<usize>| -> Result<usize, ConfigError> {
            match get(k) {
                Some(v) => v
                    .as_u64()
                    .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0).map(|f| f as u64))
                    .map(|u| u as usize)
                    .ok_or_else(|| ConfigError::invalid(k, v, "must be a non-negative integer")),
                None => default.ok_or_else(|| ConfigError::invalid(k, "nothing", "is required")),
            }
        };
        let float = |k: &str, default: f64| -> Result<f64, ConfigError> {
            match get(k) {
                Some(v) => v.as_f64().ok_or_else(|| ConfigError::invalid(k, v, "must be a number")),
                None => Ok(default),
            }
        };
        let flag = |k: &str, default: bool| -> Result<bool, ConfigError> {
            match get(k) {
                Some(v) => v.as_bool().ok_or_else(|| ConfigError::invalid(k, v, "must be true or false")),
                None => Ok(default),
            }
        };
        let moe = match (family, get("MoE_config")) {
            (Family::Dense, _) => None,
            (_, None) => return Err(ConfigError::invalid("MoE_config", "nothing", "is required for MoE families")),
            (_, Some(m)) => {
                let num_experts = m
                    .get("num_experts")
                    .and_then(|v| v.as_u64())
                    .ok_or_else(|| ConfigError::invalid("MoE_config.num_experts", m, "must be a positive integer"))?;
                let capacity = m
                    .get("capacity")
                    .and_then(|v| v.as_f64())
                    .ok_or_else(|| ConfigError::invalid("MoE_config.capacity", m, "must be a number"))?;
                let n_shared = m.get("n_shared_experts").and_then(|v| v.as_u64()).map(|v| v as usize);
                let interleave = m.get("interleave").and_then(|v| v.as_bool()).unwrap_or(false);
                Some(MoeConfig {
                    num_experts: num_experts as usize,
                    capacity,
                    n_shared_experts: n_shared,
                    layout: if interleave { MoeLayout::Interleaved } else { MoeLayout::All },
                    capacity_loss_weight: float("CapacityPred_loss_weight", default_capacity_loss_weight())?,
                })
            }
        };
        let config = Self {
            family,
            input_size: uint("input_size", Some(32))?,
            patch_size: uint("patch_size", Some(2))?,
            in_channels: uint("in_channels", Some(4))?,
            hidden_size: uint("hidden_size", Some(1152))?,
            depth: uint("depth", Some(28))?,
            num_heads: uint("num_heads", Some(16))?,
            head_dim: match get("head_dim") {
                Some(_) => Some(uint("head_dim", None)?),
                None => None,
            },
            mlp_ratio: float("mlp_ratio", 4.0)?,
            class_dropout_prob: float("class_dropout_prob", 0.1)?,
            num_classes: uint("num_classes", Some(1000))?,
            learn_sigma: flag("learn_sigma", true)?,
            mlp: if flag("use_swiglu", false)? { ExpertKind::SwiGlu } else { ExpertKind::Gelu },
            moe,
        };
        config.validate()?;
        Ok(config)
    }
}
