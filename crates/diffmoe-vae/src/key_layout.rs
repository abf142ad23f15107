//! The three naming layouts of SD VAE checkpoints and how each names a
//! parameter of diffusers' current layout:
//!
//! - current diffusers (`AutoencoderKL.state_dict()` since diffusers 0.15);
//! - legacy diffusers: the pre-0.15 `AttentionBlock` names `query`, `key`,
//!   `value`, `proj_attn` (diffusers `ModelMixin._fix_state_dict_keys_on_load`
//!   renames them);
//! - original LDM / CompVis (`ldm/modules/diffusionmodules/model.py`, read by
//!   diffusers' `convert_ldm_vae_checkpoint`): `down.{i}.block.{j}`,
//!   `nin_shortcut`, `mid.{block_1, attn_1, block_2}`, `norm_out`, decoder
//!   `up.{levels - 1 - i}`, attention q/k/v/proj_out as 1x1 convs.

use std::fmt;

use crate::error::LoadError;
use crate::state_dict::{ParamKind, ParamSpec};

/// The prefix of the VAE inside a full Stable Diffusion checkpoint.
pub const SD_CHECKPOINT_PREFIX: &str = "first_stage_model.";

/// The first name segments of VAE tensors; anything else in a checkpoint
/// (LDM's `loss.*`, a full checkpoint's UNet and text encoder) is ignored.
pub const VAE_ROOTS: [&str; 4] = ["encoder", "decoder", "quant_conv", "post_quant_conv"];

/// A naming layout of VAE checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLayout {
    /// diffusers' current names (`to_q`, `to_k`, `to_v`, `to_out.0`).
    Diffusers,
    /// diffusers' pre-0.15 attention names (`query`, `key`, `value`, `proj_attn`).
    LegacyDiffusers,
    /// The original LDM / CompVis names.
    Ldm,
}

impl fmt::Display for KeyLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Diffusers => "current diffusers",
            Self::LegacyDiffusers => "legacy diffusers",
            Self::Ldm => "original LDM",
        })
    }
}

/// What one key tells about the layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Evidence {
    Ldm,
    /// diffusers, either attention spelling (`down_blocks`, `mid_block`, ...).
    AnyDiffusers,
    Legacy,
    Current,
}

fn evidence(key: &str) -> Option<Evidence> {
    let parts: Vec<&str> = key.split('.').collect();
    match parts.as_slice() {
        ["encoder" | "decoder", "down" | "up" | "mid" | "norm_out", ..] => Some(Evidence::Ldm),
        ["encoder" | "decoder", "mid_block", "attentions", _, "query" | "key" | "value" | "proj_attn", ..] => {
            Some(Evidence::Legacy)
        }
        ["encoder" | "decoder", "mid_block", "attentions", _, "to_q" | "to_k" | "to_v" | "to_out", ..] => {
            Some(Evidence::Current)
        }
        ["encoder" | "decoder", "down_blocks" | "up_blocks" | "mid_block" | "conv_norm_out", ..] => {
            Some(Evidence::AnyDiffusers)
        }
        _ => None,
    }
}

fn resnet_part(rest: &[&str]) -> String {
    let renamed: Vec<&str> = rest.iter().map(|p| if *p == "conv_shortcut" { "nin_shortcut" } else { p }).collect();
    renamed.join(".")
}

impl KeyLayout {
    /// Which layout `keys` (VAE keys, prefix removed) are in. Keys that tell
    /// nothing (`conv_in`, `quant_conv`) leave the default, current diffusers.
    pub fn detect<'a>(keys: impl IntoIterator<Item = &'a str>) -> Result<Self, LoadError> {
        let mut first: [Option<&str>; 4] = [None; 4];
        for key in keys {
            if let Some(e) = evidence(key) {
                first[e as usize].get_or_insert(key);
            }
        }
        let [ldm, any, legacy, current] = first;
        let diffusers = legacy.map(|k| (Self::LegacyDiffusers, k)).or(current.map(|k| (Self::Diffusers, k)));
        let mixed = |a: (Self, &str), b: (Self, &str)| LoadError::MixedLayout {
            first: a.0,
            first_key: a.1.to_string(),
            second: b.0,
            second_key: b.1.to_string(),
        };
        if let Some(l) = ldm {
            if let Some(d) = diffusers.or(any.map(|k| (Self::Diffusers, k))) {
                return Err(mixed((Self::Ldm, l), d));
            }
            return Ok(Self::Ldm);
        }
        match (legacy, current) {
            (Some(l), Some(c)) => Err(mixed((Self::LegacyDiffusers, l), (Self::Diffusers, c))),
            (Some(_), None) => Ok(Self::LegacyDiffusers),
            _ => Ok(Self::Diffusers),
        }
    }

    /// This layout's name for the parameter diffusers currently calls
    /// `canonical`, in a model of `levels` resolution levels.
    pub fn source_key(self, canonical: &str, levels: usize) -> String {
        let parts: Vec<&str> = canonical.split('.').collect();
        match self {
            Self::Diffusers => canonical.to_string(),
            Self::LegacyDiffusers => match parts.as_slice() {
                [side, "mid_block", "attentions", i, rest @ ..] => {
                    let rest = match rest {
                        ["to_q", p] => format!("query.{p}"),
                        ["to_k", p] => format!("key.{p}"),
                        ["to_v", p] => format!("value.{p}"),
                        ["to_out", "0", p] => format!("proj_attn.{p}"),
                        other => other.join("."),
                    };
                    format!("{side}.mid_block.attentions.{i}.{rest}")
                }
                _ => canonical.to_string(),
            },
            Self::Ldm => {
                let up =
                    |i: &str| i.parse::<usize>().map(|i| levels - 1 - i).expect("diffusers block indices are numbers");
                match parts.as_slice() {
                    ["encoder", "down_blocks", i, "resnets", j, rest @ ..] => {
                        format!("encoder.down.{i}.block.{j}.{}", resnet_part(rest))
                    }
                    ["encoder", "down_blocks", i, "downsamplers", "0", rest @ ..] => {
                        format!("encoder.down.{i}.downsample.{}", rest.join("."))
                    }
                    ["decoder", "up_blocks", i, "resnets", j, rest @ ..] => {
                        format!("decoder.up.{}.block.{j}.{}", up(i), resnet_part(rest))
                    }
                    ["decoder", "up_blocks", i, "upsamplers", "0", rest @ ..] => {
                        format!("decoder.up.{}.upsample.{}", up(i), rest.join("."))
                    }
                    [side, "mid_block", "resnets", i, rest @ ..] => {
                        let i: usize = i.parse().expect("diffusers block indices are numbers");
                        format!("{side}.mid.block_{}.{}", i + 1, resnet_part(rest))
                    }
                    [side, "mid_block", "attentions", "0", rest @ ..] => {
                        let rest = match rest {
                            ["group_norm", p] => format!("norm.{p}"),
                            ["to_q", p] => format!("q.{p}"),
                            ["to_k", p] => format!("k.{p}"),
                            ["to_v", p] => format!("v.{p}"),
                            ["to_out", "0", p] => format!("proj_out.{p}"),
                            other => other.join("."),
                        };
                        format!("{side}.mid.attn_1.{rest}")
                    }
                    [side, "conv_norm_out", rest @ ..] => format!("{side}.norm_out.{}", rest.join(".")),
                    _ => canonical.to_string(),
                }
            }
        }
    }

    /// The shapes this layout may store `spec` with, the usual one first:
    /// LDM's attention weights are 1x1 convs `[out, in, 1, 1]`, and converted
    /// files sometimes hold them squeezed to `[out, in]`.
    pub fn source_shapes(self, spec: &ParamSpec) -> Vec<Vec<usize>> {
        match (self, spec.kind) {
            (Self::Ldm, ParamKind::LinearWeight) => {
                let mut conv = spec.shape.clone();
                conv.extend([1, 1]);
                vec![conv, spec.shape.clone()]
            }
            _ => vec![spec.shape.clone()],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldm_names_reverse_the_decoder_levels_and_rename_the_mid_block() {
        let l = KeyLayout::Ldm;
        assert_eq!(
            l.source_key("decoder.up_blocks.0.upsamplers.0.conv.weight", 4),
            "decoder.up.3.upsample.conv.weight"
        );
        assert_eq!(
            l.source_key("decoder.up_blocks.3.resnets.0.conv_shortcut.bias", 4),
            "decoder.up.0.block.0.nin_shortcut.bias"
        );
        assert_eq!(
            l.source_key("encoder.down_blocks.2.downsamplers.0.conv.bias", 4),
            "encoder.down.2.downsample.conv.bias"
        );
        assert_eq!(l.source_key("encoder.mid_block.resnets.1.norm2.weight", 4), "encoder.mid.block_2.norm2.weight");
        assert_eq!(
            l.source_key("decoder.mid_block.attentions.0.to_out.0.weight", 4),
            "decoder.mid.attn_1.proj_out.weight"
        );
        assert_eq!(l.source_key("decoder.mid_block.attentions.0.group_norm.bias", 4), "decoder.mid.attn_1.norm.bias");
        assert_eq!(l.source_key("encoder.conv_norm_out.weight", 4), "encoder.norm_out.weight");
        assert_eq!(l.source_key("post_quant_conv.weight", 4), "post_quant_conv.weight");
    }

    #[test]
    fn legacy_names_only_touch_the_attention() {
        let l = KeyLayout::LegacyDiffusers;
        assert_eq!(
            l.source_key("encoder.mid_block.attentions.0.to_v.bias", 3),
            "encoder.mid_block.attentions.0.value.bias"
        );
        assert_eq!(
            l.source_key("encoder.mid_block.attentions.0.to_out.0.weight", 3),
            "encoder.mid_block.attentions.0.proj_attn.weight"
        );
        assert_eq!(
            l.source_key("encoder.mid_block.attentions.0.group_norm.weight", 3),
            "encoder.mid_block.attentions.0.group_norm.weight"
        );
    }

    #[test]
    fn detection_and_mixed_layouts() {
        assert_eq!(
            KeyLayout::detect(["encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight"]).unwrap(),
            KeyLayout::Ldm
        );
        assert_eq!(
            KeyLayout::detect([
                "decoder.mid_block.attentions.0.query.weight",
                "decoder.up_blocks.0.resnets.0.conv1.bias"
            ])
            .unwrap(),
            KeyLayout::LegacyDiffusers
        );
        assert_eq!(KeyLayout::detect(["quant_conv.weight"]).unwrap(), KeyLayout::Diffusers);
        let e = KeyLayout::detect([
            "encoder.mid_block.attentions.0.to_q.weight",
            "encoder.mid_block.attentions.0.key.weight",
        ])
        .unwrap_err();
        assert!(e.to_string().contains("to_q") && e.to_string().contains(".key."), "{e}");
        let e =
            KeyLayout::detect(["encoder.mid.attn_1.q.weight", "decoder.up_blocks.0.resnets.0.conv1.bias"]).unwrap_err();
        assert!(matches!(e, LoadError::MixedLayout { first: KeyLayout::Ldm, .. }), "{e}");
    }
}
