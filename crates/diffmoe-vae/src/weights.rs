//! Loading VAE weights: from a safetensors file (diffusers'
//! `diffusion_pytorch_model.safetensors`, LDM's `vae-ft-mse-840000-ema-pruned.safetensors`,
//! a full SD checkpoint) or from tensors already on the host, e.g. read from
//! a torch pickle (`.bin`, `.ckpt`) with `diffmoe_model::torch_checkpoint`.
//! Every key and shape is checked (see [`crate::LoadPlan`]) before any parameter is set.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::backend::Backend;
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

use crate::autoencoder::AutoencoderKl;
use crate::config::AutoencoderKlConfig;
use crate::error::LoadError;
use crate::state_dict::entries;

/// A tensor on the host: a shape and its values, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// The shape.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values, row-major.
    pub data: Vec<f32>,
}

impl From<(Vec<usize>, Vec<f32>)> for HostTensor {
    fn from((shape, data): (Vec<usize>, Vec<f32>)) -> Self {
        Self { shape, data }
    }
}

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
    for entry in &plan.entries {
        let dtype = by_name[entry.key.as_str()].dtype();
        if !matches!(dtype, Dtype::F32 | Dtype::F64 | Dtype::F16 | Dtype::BF16) {
            return Err(LoadError::Dtype { path: path.to_path_buf(), key: entry.key.clone(), dtype });
        }
    }
    for (param, entry) in entries(&mut model).iter_mut().zip(&plan.entries) {
        let view = by_name[entry.key.as_str()];
        let data = to_f32(view.dtype(), view.data()).expect("dtypes were checked");
        param.set(data, device);
    }
    Ok(model)
}

/// Little-endian float bytes to f32 values; `None` for other dtypes.
fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F64 => {
            bytes.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32).collect()
        }
        Dtype::F16 => bytes.chunks_exact(2).map(|b| half_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect(),
        Dtype::BF16 => {
            bytes.chunks_exact(2).map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)).collect()
        }
        _ => return None,
    })
}

/// IEEE half to f32, exact (subnormals, infinities and NaN included).
fn half_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as f32;
    sign * match exp {
        0 => frac * 2f32.powi(-24),
        31 if frac == 0.0 => f32::INFINITY,
        31 => f32::NAN,
        e => (1.0 + frac / 1024.0) * 2f32.powi(e - 15),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DownBlockType, UpBlockType};
    use crate::key_layout::{KeyLayout, SD_CHECKPOINT_PREFIX};
    use burn::backend::Flex;
    use burn::tensor::{Int, Tensor};
    use safetensors::tensor::TensorView;

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

    #[test]
    fn half_floats_decode_exactly() {
        let halves: [(u16, f32); 6] = [
            (0x3c00, 1.0),
            (0xc000, -2.0),
            (0x3555, 0.333_251_95),
            (0x0001, 5.960_464_5e-8),
            (0x7bff, 65504.0),
            (0x0000, 0.0),
        ];
        let bytes: Vec<u8> = halves.iter().flat_map(|(h, _)| h.to_le_bytes()).collect();
        let decoded = to_f32(Dtype::F16, &bytes).unwrap();
        for ((_, want), got) in halves.iter().zip(decoded) {
            assert_eq!(got, *want);
        }
        assert_eq!(to_f32(Dtype::BF16, &0x3f80u16.to_le_bytes()).unwrap(), vec![1.0]);
        assert!(to_f32(Dtype::I64, &[0; 8]).is_none());
    }
}
