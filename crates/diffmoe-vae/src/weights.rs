//! Loading VAE weights: from a safetensors file (diffusers'
//! `diffusion_pytorch_model.safetensors`, LDM's `vae-ft-mse-840000-ema-pruned.safetensors`,
//! a full SD checkpoint) or from tensors already on the host, e.g. read from
//! a torch pickle (`.bin`, `.ckpt`) with [`diffmoe_weights::read_state_dict`].
//! Every key and shape is checked (see [`crate::LoadPlan`]) before any parameter is set.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::backend::Backend;
use diffmoe_weights::{Element, HostTensor};
use safetensors::SafeTensors;

use crate::autoencoder::AutoencoderKl;
use crate::config::AutoencoderKlConfig;
use crate::error::LoadError;
use crate::state_dict::entries;

/// Checkpoint tensors by name.
pub type TensorMap = BTreeMap<String, HostTensor>;

/// Builds a model of `config` from `tensors`, in any of the three key
/// layouts (see [`crate::KeyLayout`]), with or without the SD checkpoint prefix.
/// Unrelated tensors are ignored. Nothing is set unless every tensor the
/// model needs is present with the right shape and value count.
pub fn load_tensor_map<B: Backend>(
    config: &AutoencoderKlConfig,
    mut tensors: TensorMap,
    device: &B::Device,
) -> Result<AutoencoderKl<B>, LoadError> {
    config.validate()?;
    let mut model = config.init::<B>(device);
    let plan = model.load_plan(tensors.iter().map(|(k, t)| (k.as_str(), t.shape.as_slice())))?;
    for entry in &plan.entries {
        let t = &tensors[&entry.key];
        let expected: usize = entry.shape.iter().product();
        if t.data.len() != expected {
            return Err(LoadError::DataLength { key: entry.key.clone(), shape: t.shape.clone(), len: t.data.len() });
        }
    }
    for (param, entry) in entries(&mut model).iter_mut().zip(&plan.entries) {
        let t = tensors.remove(&entry.key).expect("the plan only names present keys");
        param.set(t.data, device);
    }
    Ok(model)
}

/// Builds a model of `config` from a safetensors file (F32, F64, F16 or
/// BF16 tensors), as [`load_tensor_map`] does.
pub fn load_safetensors<B: Backend>(
    config: &AutoencoderKlConfig,
    path: &Path,
    device: &B::Device,
) -> Result<AutoencoderKl<B>, LoadError> {
    config.validate()?;
    let bytes = std::fs::read(path).map_err(|source| LoadError::Io { path: path.to_path_buf(), source })?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|source| LoadError::Safetensors { path: path.to_path_buf(), source })?;
    let views = st.tensors();
    let mut model = config.init::<B>(device);
    let plan = model.load_plan(views.iter().map(|(k, v)| (k.as_str(), v.shape())))?;
    let by_name: BTreeMap<&str, &safetensors::tensor::TensorView<'_>> =
        views.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut elements = Vec::with_capacity(plan.entries.len());
    for entry in &plan.entries {
        let dtype = by_name[entry.key.as_str()].dtype();
        match Element::from_safetensors(dtype).filter(|e| e.is_float()) {
            Some(element) => elements.push(element),
            None => return Err(LoadError::Dtype { path: path.to_path_buf(), key: entry.key.clone(), dtype }),
        }
    }
    for ((param, entry), element) in entries(&mut model).iter_mut().zip(&plan.entries).zip(elements) {
        param.set(element.decode_all(by_name[entry.key.as_str()].data()), device);
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DownBlockType, UpBlockType};
    use crate::key_layout::{KeyLayout, SD_CHECKPOINT_PREFIX};
    use burn::backend::Flex;
    use burn::tensor::{Int, Tensor};
    use safetensors::tensor::{Dtype, TensorView};

    type B = Flex;

    fn tiny() -> AutoencoderKlConfig {
        AutoencoderKlConfig::new(
            vec![DownBlockType::DownEncoderBlock2D; 2],
            vec![UpBlockType::UpDecoderBlock2D; 2],
            vec![4, 8],
        )
        .with_norm_num_groups(2)
    }

    /// Distinct values for every parameter, keyed in `layout` (LDM attention
    /// weights as 1x1 convs).
    fn checkpoint(layout: KeyLayout, prefix: &str) -> TensorMap {
        let model = tiny().init::<B>(&Default::default());
        let mut next = 0.0f32;
        model
            .parameter_specs()
            .iter()
            .map(|s| {
                let data = (0..s.numel())
                    .map(|_| {
                        next += 1.0;
                        (next * 0.618).fract() - 0.5
                    })
                    .collect();
                let key = format!("{prefix}{}", layout.source_key(&s.name, 2));
                (key, HostTensor { shape: layout.source_shapes(s)[0].clone(), data })
            })
            .collect()
    }

    fn output(model: &AutoencoderKl<B>) -> Vec<f32> {
        let device = Default::default();
        let x = Tensor::<B, 1, Int>::arange(0..192, &device).float().reshape([1, 3, 8, 8]).div_scalar(192.0);
        let moments = model.encode(x);
        model.decode(moments.narrow(1, 0, 4)).into_data().to_vec().unwrap()
    }

    #[test]
    fn the_three_layouts_load_the_same_model() {
        let device = Default::default();
        let current = load_tensor_map::<B>(&tiny(), checkpoint(KeyLayout::Diffusers, ""), &device).unwrap();
        let reference = output(&current);
        for (layout, prefix) in [(KeyLayout::LegacyDiffusers, ""), (KeyLayout::Ldm, SD_CHECKPOINT_PREFIX)] {
            let mut map = checkpoint(layout, prefix);
            map.insert("loss.discriminator.main.0.weight".into(), (vec![2], vec![0.0, 0.0]).into());
            let model = load_tensor_map::<B>(&tiny(), map, &device).unwrap();
            assert_eq!(output(&model), reference, "{layout}");
        }
        // The loaded parameters are the given values (Linear weights transposed).
        let q: Vec<f32> = current.encoder.mid_block.attentions[0].to_q.weight.val().into_data().to_vec().unwrap();
        let given = &checkpoint(KeyLayout::Diffusers, "")["encoder.mid_block.attentions.0.to_q.weight"].data;
        assert_eq!(q[1], given[8], "burn [in, out][0][1] is PyTorch [out, in][1][0]");
    }

    #[test]
    fn a_short_value_list_is_an_error() {
        let mut map = checkpoint(KeyLayout::Diffusers, "");
        map.get_mut("decoder.conv_out.bias").unwrap().data.pop();
        let e = load_tensor_map::<B>(&tiny(), map, &Default::default()).unwrap_err();
        assert!(matches!(&e, LoadError::DataLength { key, len: 2, .. } if key == "decoder.conv_out.bias"), "{e}");
    }

    #[test]
    fn safetensors_files_load_and_integer_tensors_are_refused() {
        let device = Default::default();
        let map = checkpoint(KeyLayout::Ldm, "");
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = map
            .iter()
            .map(|(k, t)| (k.clone(), t.data.iter().flat_map(|v| v.to_le_bytes()).collect(), t.shape.clone()))
            .collect();
        let views: Vec<(String, TensorView<'_>)> =
            bytes.iter().map(|(k, b, s)| (k.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
        let dir = std::env::temp_dir().join(format!("diffmoe-vae-weights-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vae.safetensors");
        std::fs::write(&path, safetensors::serialize(views.clone(), &None).unwrap()).unwrap();
        let from_file = load_safetensors::<B>(&tiny(), &path, &device).unwrap();
        let from_map = load_tensor_map::<B>(&tiny(), map, &device).unwrap();
        assert_eq!(output(&from_file), output(&from_map));

        let ints: Vec<u8> = vec![0; 8 * 4];
        let mut bad = views;
        let i = bad.iter().position(|(k, _)| k == "quant_conv.bias").unwrap();
        bad[i].1 = TensorView::new(Dtype::I32, vec![8], &ints).unwrap();
        std::fs::write(&path, safetensors::serialize(bad, &None).unwrap()).unwrap();
        let e = load_safetensors::<B>(&tiny(), &path, &device).unwrap_err();
        assert!(matches!(&e, LoadError::Dtype { key, .. } if key == "quant_conv.bias"), "{e}");
        let e = load_safetensors::<B>(&tiny(), &dir.join("absent.safetensors"), &device).unwrap_err();
        assert!(matches!(e, LoadError::Io { .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
