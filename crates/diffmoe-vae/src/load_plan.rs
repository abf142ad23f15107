//! The plan of a weight load: which checkpoint tensor fills which parameter,
//! worked out from names and shapes alone and checked completely before any
//! value is read (diffusers' `load_state_dict(strict=True)` after
//! `convert_ldm_vae_checkpoint` or `_fix_state_dict_keys_on_load`).

use std::collections::BTreeMap;

use burn::tensor::backend::Backend;

use crate::autoencoder::AutoencoderKl;
use crate::error::LoadError;
use crate::key_layout::{KeyLayout, SD_CHECKPOINT_PREFIX, VAE_ROOTS};
use crate::state_dict::{ParamKind, ParamSpec};

/// One parameter's source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanEntry {
    /// diffusers' current name of the parameter.
    pub canonical: String,
    /// The checkpoint's key, prefix included.
    pub key: String,
    /// The shape the checkpoint stores (checked against the parameter's).
    pub shape: Vec<usize>,
    /// How the values are laid out.
    pub kind: ParamKind,
}

/// Every parameter's source in a checkpoint, in the model's parameter order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadPlan {
    /// The naming layout the keys are in.
    pub layout: KeyLayout,
    /// The prefix in front of every VAE key: empty, or
    /// [`SD_CHECKPOINT_PREFIX`] for a full Stable Diffusion checkpoint.
    pub prefix: &'static str,
    /// One entry per parameter.
    pub entries: Vec<PlanEntry>,
    /// Keys of the checkpoint that are not VAE tensors and were ignored.
    pub ignored: Vec<String>,
}

impl LoadPlan {
    /// Plans loading the parameters `specs` of a model with `levels`
    /// resolution levels from a checkpoint holding `keys` (name, shape).
    ///
    /// The prefix and the layout are detected from the keys. Keys outside
    /// the VAE (see [`VAE_ROOTS`]; with the SD prefix, every key without it)
    /// are ignored. A missing key or a wrong shape is an error naming the key
    /// and both shapes, and so is a VAE key that no parameter uses.
    pub fn new<'a>(
        specs: &[ParamSpec],
        levels: usize,
        keys: impl IntoIterator<Item = (&'a str, &'a [usize])>,
    ) -> Result<Self, LoadError> {
        let keys: Vec<(&str, &[usize])> = keys.into_iter().collect();
        let prefix =
            if keys.iter().any(|(k, _)| k.starts_with(SD_CHECKPOINT_PREFIX)) { SD_CHECKPOINT_PREFIX } else { "" };
        let mut vae: BTreeMap<&str, &[usize]> = BTreeMap::new();
        let mut ignored = Vec::new();
        for (key, shape) in &keys {
            match key.strip_prefix(prefix) {
                Some(rest) if VAE_ROOTS.contains(&rest.split('.').next().unwrap_or_default()) => {
                    vae.insert(rest, shape);
                }
                _ => ignored.push(key.to_string()),
            }
        }
        let layout = KeyLayout::detect(vae.keys().copied())?;
        let mut entries = Vec::with_capacity(specs.len());
        for spec in specs {
            let name = layout.source_key(&spec.name, levels);
            let accepted = layout.source_shapes(spec);
            let key = format!("{prefix}{name}");
            match vae.remove(name.as_str()) {
                None => {
                    return Err(LoadError::MissingKey {
                        key,
                        canonical: spec.name.clone(),
                        expected: accepted[0].clone(),
                    })
                }
                Some(found) if !accepted.iter().any(|s| s.as_slice() == found) => {
                    return Err(LoadError::ShapeMismatch { key, found: found.to_vec(), expected: accepted[0].clone() })
                }
                Some(found) => entries.push(PlanEntry {
                    canonical: spec.name.clone(),
                    key,
                    shape: found.to_vec(),
                    kind: spec.kind,
                }),
            }
        }
        if let Some((key, shape)) = vae.iter().next() {
            return Err(LoadError::UnexpectedKey {
                key: format!("{prefix}{key}"),
                shape: shape.to_vec(),
                more: vae.len() - 1,
            });
        }
        Ok(Self { layout, prefix, entries, ignored })
    }
}

impl<B: Backend> AutoencoderKl<B> {
    /// [`LoadPlan::new`] for this model's parameters.
    pub fn load_plan<'a>(&self, keys: impl IntoIterator<Item = (&'a str, &'a [usize])>) -> Result<LoadPlan, LoadError> {
        LoadPlan::new(&self.parameter_specs(), self.decoder.up_blocks.len(), keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AutoencoderKlConfig;
    use burn::backend::Flex;

    type B = Flex;

    /// The real SD VAE's keys in `layout`, from the model's own table.
    fn keys(layout: KeyLayout, prefix: &str) -> Vec<(String, Vec<usize>)> {
        let model = AutoencoderKlConfig::sd_vae_ft_mse().init::<B>(&Default::default());
        model
            .parameter_specs()
            .iter()
            .map(|s| (format!("{prefix}{}", layout.source_key(&s.name, 4)), layout.source_shapes(s)[0].clone()))
            .collect()
    }

    fn plan(keys: &[(String, Vec<usize>)]) -> Result<LoadPlan, LoadError> {
        let model = AutoencoderKlConfig::sd_vae_ft_mse().init::<B>(&Default::default());
        model.load_plan(keys.iter().map(|(k, s)| (k.as_str(), s.as_slice())))
    }

    #[test]
    fn every_layout_is_detected_and_fully_mapped() {
        for layout in [KeyLayout::Diffusers, KeyLayout::LegacyDiffusers, KeyLayout::Ldm] {
            let p = plan(&keys(layout, "")).unwrap();
            assert_eq!(p.layout, layout);
            assert_eq!(p.entries.len(), 248);
            assert!(p.ignored.is_empty());
        }
    }

    #[test]
    fn full_sd_checkpoints_are_read_under_their_prefix() {
        let mut k = keys(KeyLayout::Ldm, SD_CHECKPOINT_PREFIX);
        k.push(("model.diffusion_model.input_blocks.0.0.weight".into(), vec![320, 4, 3, 3]));
        k.push(("first_stage_model.loss.logvar".into(), vec![]));
        // A text encoder with a VAE-like name outside the prefix must not count.
        k.push(("cond_stage_model.encoder.layers.0.weight".into(), vec![2]));
        let p = plan(&k).unwrap();
        assert_eq!((p.layout, p.prefix, p.ignored.len()), (KeyLayout::Ldm, SD_CHECKPOINT_PREFIX, 3));
        assert_eq!(p.entries[0].key, "first_stage_model.encoder.conv_in.weight");
    }

    #[test]
    fn squeezed_ldm_attention_weights_are_accepted() {
        let k: Vec<_> = keys(KeyLayout::Ldm, "")
            .into_iter()
            .map(|(n, s)| if n.ends_with("attn_1.q.weight") { (n, s[..2].to_vec()) } else { (n, s) })
            .collect();
        assert!(plan(&k).is_ok());
    }

    #[test]
    fn a_truncated_checkpoint_names_the_missing_key() {
        let mut k = keys(KeyLayout::Ldm, SD_CHECKPOINT_PREFIX);
        k.retain(|(n, _)| n != "first_stage_model.decoder.up.3.block.2.conv1.weight");
        let e = plan(&k).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("first_stage_model.decoder.up.3.block.2.conv1.weight")
                && text.contains("decoder.up_blocks.0.resnets.2.conv1.weight")
                && text.contains("[512, 512, 3, 3]"),
            "{text}"
        );
        let mut k = keys(KeyLayout::Diffusers, "");
        k.truncate(100);
        assert!(matches!(plan(&k).unwrap_err(), LoadError::MissingKey { .. }));
    }

    #[test]
    fn a_renamed_key_is_missing_and_unexpected() {
        let mut k = keys(KeyLayout::Diffusers, "");
        for (n, _) in &mut k {
            if n == "encoder.conv_out.bias" {
                *n = "encoder.conv_out.b".into();
            }
        }
        let e = plan(&k).unwrap_err();
        assert!(matches!(&e, LoadError::MissingKey { key, .. } if key == "encoder.conv_out.bias"), "{e}");
        // With the right key present too, the extra one is reported.
        k.push(("encoder.conv_out.bias".into(), vec![8]));
        let e = plan(&k).unwrap_err();
        assert!(matches!(&e, LoadError::UnexpectedKey { key, more: 0, .. } if key == "encoder.conv_out.b"), "{e}");
    }

    #[test]
    fn a_misshapen_key_names_both_shapes() {
        let mut k = keys(KeyLayout::LegacyDiffusers, "");
        for (n, s) in &mut k {
            if n == "decoder.mid_block.attentions.0.query.weight" {
                *s = vec![512, 256];
            }
        }
        let e = plan(&k).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("decoder.mid_block.attentions.0.query.weight") && text.contains("[512, 256]"), "{text}");
        assert!(text.contains("[512, 512]"), "{text}");
    }

    #[test]
    fn another_config_is_reported() {
        // A 3-level checkpoint for the 4-level model: the 4th level is missing.
        let mut small = AutoencoderKlConfig::sd_vae_ft_mse();
        small.block_out_channels.truncate(3);
        small.down_block_types.truncate(3);
        small.up_block_types.truncate(3);
        let model = small.init::<B>(&Default::default());
        let k: Vec<(String, Vec<usize>)> = model.parameter_specs().into_iter().map(|s| (s.name, s.shape)).collect();
        assert!(plan(&k).is_err());
    }
}
