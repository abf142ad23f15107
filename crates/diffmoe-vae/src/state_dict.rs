//! The parameters of [`AutoencoderKl`] under diffusers' current state-dict
//! names and PyTorch shapes, in `AutoencoderKL.state_dict()` order: the one
//! table that weight loading and its checks use.
//!
//! One layout difference exists: burn's `Linear` stores `[d_input, d_output]`
//! where PyTorch stores `[d_output, d_input]` (the mid-block attention's
//! q/k/v/out); those are transposed on load.

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::nn::Linear;
use burn::tensor::{backend::Backend, Tensor, TensorData};

use diffmoe_weights::transpose_matrix;

use crate::attention::MidBlockAttention;
use crate::autoencoder::AutoencoderKl;
use crate::group_norm::GroupNorm;
use crate::mid_block::MidBlock2d;
use crate::resnet::ResnetBlock2d;

/// How a parameter is stored, beyond its name and shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// Same shape and order here and in PyTorch (convs, norms, biases).
    Tensor,
    /// A `Linear` weight: PyTorch `[out, in]` (LDM: a 1x1 conv `[out, in, 1, 1]`),
    /// burn `[in, out]`.
    LinearWeight,
}

/// A parameter: diffusers' current name, PyTorch shape, kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    /// diffusers' current state-dict key (`encoder.mid_block.attentions.0.to_q.weight`).
    pub name: String,
    /// The shape in PyTorch's layout.
    pub shape: Vec<usize>,
    /// How it is stored.
    pub kind: ParamKind,
}

impl ParamSpec {
    /// Number of values.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parameter of the model, of any rank.
pub(crate) enum Slot<'a, B: Backend> {
    R1(&'a mut Param<Tensor<B, 1>>),
    R4(&'a mut Param<Tensor<B, 4>>),
    Linear(&'a mut Param<Tensor<B, 2>>),
}

/// A parameter of the model with its diffusers name.
pub(crate) struct Entry<'a, B: Backend> {
    pub(crate) name: String,
    slot: Slot<'a, B>,
}

impl<B: Backend> Entry<'_, B> {
    /// Name, PyTorch shape and kind; reads the shape without allocating a
    /// lazily initialised parameter.
    pub(crate) fn spec(&self) -> ParamSpec {
        let (shape, kind) = match &self.slot {
            Slot::R1(p) => (p.lazy_shape().to_vec(), ParamKind::Tensor),
            Slot::R4(p) => (p.lazy_shape().to_vec(), ParamKind::Tensor),
            Slot::Linear(p) => {
                let dims = p.lazy_shape().to_vec(); // [in, out]
                (vec![dims[1], dims[0]], ParamKind::LinearWeight)
            }
        };
        ParamSpec { name: self.name.clone(), shape, kind }
    }

    /// Replaces the parameter by `data`, given row-major in PyTorch's layout
    /// of [`Self::spec`]'s shape. The loaded VAE is frozen: its tensors do not
    /// require gradients.
    ///
    /// # Panics
    /// If `data` does not have the spec's number of values (the loader checks
    /// that first).
    pub(crate) fn set(&mut self, data: Vec<f32>, device: &B::Device) {
        let spec = self.spec();
        assert_eq!(data.len(), spec.numel(), "`{}`: {} values for shape {:?}", spec.name, data.len(), spec.shape);
        fn put<B: Backend, const D: usize>(p: &mut Param<Tensor<B, D>>, data: TensorData, device: &B::Device) {
            *p = Param::initialized(p.id, Tensor::from_data(data, device));
        }
        match &mut self.slot {
            Slot::R1(p) => put(p, TensorData::new(data, spec.shape), device),
            Slot::R4(p) => put(p, TensorData::new(data, spec.shape), device),
            Slot::Linear(p) => {
                let (out, inp) = (spec.shape[0], spec.shape[1]);
                put(p, TensorData::new(transpose_matrix(&data, out, inp), [inp, out]), device)
            }
        }
    }
}

/// Every parameter of the model with its diffusers name, in diffusers' order.
pub(crate) fn entries<B: Backend>(model: &mut AutoencoderKl<B>) -> Vec<Entry<'_, B>> {
    let mut out = Vec::new();
    let AutoencoderKl { encoder, decoder, quant_conv, post_quant_conv } = model;
    conv(&mut out, "encoder.conv_in", &mut encoder.conv_in);
    for (i, block) in encoder.down_blocks.iter_mut().enumerate() {
        for (j, r) in block.resnets.iter_mut().enumerate() {
            resnet(&mut out, &format!("encoder.down_blocks.{i}.resnets.{j}"), r);
        }
        if let Some(down) = &mut block.downsamplers {
            conv(&mut out, &format!("encoder.down_blocks.{i}.downsamplers.0.conv"), &mut down.conv);
        }
    }
    mid_block(&mut out, "encoder.mid_block", &mut encoder.mid_block);
    group_norm(&mut out, "encoder.conv_norm_out", &mut encoder.conv_norm_out);
    conv(&mut out, "encoder.conv_out", &mut encoder.conv_out);
    conv(&mut out, "decoder.conv_in", &mut decoder.conv_in);
    for (i, block) in decoder.up_blocks.iter_mut().enumerate() {
        for (j, r) in block.resnets.iter_mut().enumerate() {
            resnet(&mut out, &format!("decoder.up_blocks.{i}.resnets.{j}"), r);
        }
        if let Some(up) = &mut block.upsamplers {
            conv(&mut out, &format!("decoder.up_blocks.{i}.upsamplers.0.conv"), &mut up.conv);
        }
    }
    mid_block(&mut out, "decoder.mid_block", &mut decoder.mid_block);
    group_norm(&mut out, "decoder.conv_norm_out", &mut decoder.conv_norm_out);
    conv(&mut out, "decoder.conv_out", &mut decoder.conv_out);
    conv(&mut out, "quant_conv", quant_conv);
    conv(&mut out, "post_quant_conv", post_quant_conv);
    out
}

fn conv<'a, B: Backend>(out: &mut Vec<Entry<'a, B>>, name: &str, c: &'a mut Conv2d<B>) {
    out.push(Entry { name: format!("{name}.weight"), slot: Slot::R4(&mut c.weight) });
    if let Some(b) = &mut c.bias {
        out.push(Entry { name: format!("{name}.bias"), slot: Slot::R1(b) });
    }
}

fn group_norm<'a, B: Backend>(out: &mut Vec<Entry<'a, B>>, name: &str, n: &'a mut GroupNorm<B>) {
    out.push(Entry { name: format!("{name}.weight"), slot: Slot::R1(&mut n.weight) });
    out.push(Entry { name: format!("{name}.bias"), slot: Slot::R1(&mut n.bias) });
}

fn linear<'a, B: Backend>(out: &mut Vec<Entry<'a, B>>, name: &str, l: &'a mut Linear<B>) {
    out.push(Entry { name: format!("{name}.weight"), slot: Slot::Linear(&mut l.weight) });
    if let Some(b) = &mut l.bias {
        out.push(Entry { name: format!("{name}.bias"), slot: Slot::R1(b) });
    }
}

fn resnet<'a, B: Backend>(out: &mut Vec<Entry<'a, B>>, name: &str, r: &'a mut ResnetBlock2d<B>) {
    group_norm(out, &format!("{name}.norm1"), &mut r.norm1);
    conv(out, &format!("{name}.conv1"), &mut r.conv1);
    group_norm(out, &format!("{name}.norm2"), &mut r.norm2);
    conv(out, &format!("{name}.conv2"), &mut r.conv2);
    if let Some(s) = &mut r.conv_shortcut {
        conv(out, &format!("{name}.conv_shortcut"), s);
    }
}

fn attention<'a, B: Backend>(out: &mut Vec<Entry<'a, B>>, name: &str, a: &'a mut MidBlockAttention<B>) {
    group_norm(out, &format!("{name}.group_norm"), &mut a.group_norm);
    linear(out, &format!("{name}.to_q"), &mut a.to_q);
    linear(out, &format!("{name}.to_k"), &mut a.to_k);
    linear(out, &format!("{name}.to_v"), &mut a.to_v);
    linear(out, &format!("{name}.to_out.0"), &mut a.to_out);
}

fn mid_block<'a, B: Backend>(out: &mut Vec<Entry<'a, B>>, name: &str, m: &'a mut MidBlock2d<B>) {
    // diffusers registers `attentions` before `resnets`.
    for (i, a) in m.attentions.iter_mut().enumerate() {
        attention(out, &format!("{name}.attentions.{i}"), a);
    }
    for (i, r) in m.resnets.iter_mut().enumerate() {
        resnet(out, &format!("{name}.resnets.{i}"), r);
    }
}

impl<B: Backend> AutoencoderKl<B> {
    /// Every parameter's diffusers name, PyTorch shape and kind, in
    /// `state_dict()` order. Reads shapes only: a lazily initialised model
    /// (fresh from [`crate::AutoencoderKlConfig::init`]) allocates nothing.
    pub fn parameter_specs(&self) -> Vec<ParamSpec> {
        let mut model = self.clone();
        entries(&mut model).iter().map(Entry::spec).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AutoencoderKlConfig;
    use burn::backend::Flex;

    type B = Flex;

    #[test]
    fn sd_vae_has_248_tensors_and_83_653_863_parameters() {
        let model = AutoencoderKlConfig::sd_vae_ft_mse().init::<B>(&Default::default());
        let specs = model.parameter_specs();
        assert_eq!(specs.len(), 248);
        let count = |f: &dyn Fn(&str) -> bool| specs.iter().filter(|s| f(&s.name)).map(ParamSpec::numel).sum::<usize>();
        assert_eq!(count(&|n| n.starts_with("encoder.") || n.starts_with("quant_conv.")), 34_163_664);
        assert_eq!(count(&|n| n.starts_with("decoder.") || n.starts_with("post_quant_conv.")), 49_490_199);
        let q = specs.iter().find(|s| s.name == "decoder.mid_block.attentions.0.to_q.weight").unwrap();
        assert_eq!((q.shape.clone(), q.kind), (vec![512, 512], ParamKind::LinearWeight));
        let s = specs.iter().find(|s| s.name == "decoder.up_blocks.3.resnets.0.conv_shortcut.weight").unwrap();
        assert_eq!(s.shape, vec![128, 256, 1, 1]);
    }

    #[test]
    fn set_transposes_linear_weights() {
        let device = Default::default();
        let mut model = AutoencoderKlConfig::new(
            vec![crate::config::DownBlockType::DownEncoderBlock2D],
            vec![crate::config::UpBlockType::UpDecoderBlock2D],
            vec![2],
        )
        .with_norm_num_groups(1)
        .init::<B>(&device);
        {
            let mut all = entries(&mut model);
            let e = all.iter_mut().find(|e| e.name == "encoder.mid_block.attentions.0.to_k.weight").unwrap();
            e.set(vec![1.0, 2.0, 3.0, 4.0], &device); // PyTorch [[1, 2], [3, 4]] = [out, in]
        }
        let w: Vec<f32> = model.encoder.mid_block.attentions[0].to_k.weight.val().into_data().to_vec().unwrap();
        assert_eq!(w, vec![1.0, 3.0, 2.0, 4.0]); // burn [in, out]
    }
}
