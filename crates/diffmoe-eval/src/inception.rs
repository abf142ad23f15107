//! pytorch-fid's FID Inception network (`pytorch_fid/inception.py`,
//! `InceptionV3([3])` with `resize_input=True`, `normalize_input=True` and
//! the FID blocks; DiffMoE copies it as `evaluation/inception.py`): the
//! 2048-d pool features that FID and the Inception Score are computed on,
//! and the 1008-class `fc` logits of the weights file.
//!
//! The network is torchvision's `Inception3(num_classes=1008,
//! aux_logits=False)` with Mixed_5b/5c/5d = `FIDInceptionA`, Mixed_6b..6e =
//! `FIDInceptionC`, Mixed_7b = `FIDInceptionE_1` and Mixed_7c =
//! `FIDInceptionE_2` (see `shared/docs/vae-inception-semantics.md`, section 3).

use burn::module::{Module, Param};
use burn::tensor::{activation, backend::Backend, Tensor};

use crate::inception_blocks::{
    inception_a_specs, inception_b_specs, inception_c_specs, inception_d_specs, inception_e_specs, max_pool_3x3_s2,
    stem_specs, BasicConv2d, ConvSource, ConvSpec, EBlockPool, InceptionA, InceptionB, InceptionC, InceptionD,
    InceptionE,
};
use crate::resize::bilinear_resize;

/// The input size of the network; pytorch-fid resizes every image to it.
pub const INCEPTION_SIZE: usize = 299;
/// Dimension of the pool features.
pub const POOL_FEATURES: usize = 2048;
/// Classes of the `fc` head of the weights file (1000 ImageNet classes plus
/// 8 unused ones of the TF graph).
pub const INCEPTION_CLASSES: usize = 1008;

/// The 94 `BasicConv2d` of the network, in weights-file order.
pub fn conv_specs() -> Vec<ConvSpec> {
    let mut specs = stem_specs();
    specs.extend(inception_a_specs("Mixed_5b", 192, 32));
    specs.extend(inception_a_specs("Mixed_5c", 256, 64));
    specs.extend(inception_a_specs("Mixed_5d", 288, 64));
    specs.extend(inception_b_specs("Mixed_6a", 288));
    for (name, c7) in [("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)] {
        specs.extend(inception_c_specs(name, 768, c7));
    }
    specs.extend(inception_d_specs("Mixed_7a", 768));
    specs.extend(inception_e_specs("Mixed_7b", 1280));
    specs.extend(inception_e_specs("Mixed_7c", 2048));
    specs
}

/// The `fc` layer of the weights file (`Linear(2048, 1008)`), kept in the
/// PyTorch layout.
#[derive(Module, Debug)]
pub struct InceptionFc<B: Backend> {
    /// `fc.weight` `[1008, 2048]`.
    pub weight: Param<Tensor<B, 2>>,
    /// `fc.bias` `[1008]`.
    pub bias: Param<Tensor<B, 1>>,
}

/// Whether the logits include the `fc` bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FcBias {
    /// `pool W^T + b`: torchvision's `Inception3.fc`.
    Included,
    /// `pool W^T`: what the Inception Score uses (the ADM evaluator multiplies
    /// by the weight of the TF graph's `softmax/logits/MatMul`, no bias).
    Excluded,
}

/// One recorded intermediate output of [`FidInceptionV3::forward_traced`].
#[derive(Debug, Clone)]
pub struct InceptionTap<B: Backend> {
    /// The torchvision module name (`Conv2d_1a_3x3`, `maxpool1`, `Mixed_5b`, ...).
    pub name: &'static str,
    /// Its output `[batch, channels, height, width]`.
    pub output: Tensor<B, 4>,
}

/// pytorch-fid's `InceptionV3([3])` with the FID blocks, plus the optional
/// `fc` head of the weights file.
#[derive(Module, Debug)]
pub struct FidInceptionV3<B: Backend> {
    /// 3 -> 32, 3x3 stride 2.
    pub conv2d_1a_3x3: BasicConv2d<B>,
    /// 32 -> 32, 3x3.
    pub conv2d_2a_3x3: BasicConv2d<B>,
    /// 32 -> 64, 3x3 pad 1.
    pub conv2d_2b_3x3: BasicConv2d<B>,
    /// 64 -> 80, 1x1.
    pub conv2d_3b_1x1: BasicConv2d<B>,
    /// 80 -> 192, 3x3.
    pub conv2d_4a_3x3: BasicConv2d<B>,
    /// `FIDInceptionA(192, 32)`.
    pub mixed_5b: InceptionA<B>,
    /// `FIDInceptionA(256, 64)`.
    pub mixed_5c: InceptionA<B>,
    /// `FIDInceptionA(288, 64)`.
    pub mixed_5d: InceptionA<B>,
    /// `InceptionB(288)`.
    pub mixed_6a: InceptionB<B>,
    /// `FIDInceptionC(768, 128)`.
    pub mixed_6b: InceptionC<B>,
    /// `FIDInceptionC(768, 160)`.
    pub mixed_6c: InceptionC<B>,
    /// `FIDInceptionC(768, 160)`.
    pub mixed_6d: InceptionC<B>,
    /// `FIDInceptionC(768, 192)`.
    pub mixed_6e: InceptionC<B>,
    /// `InceptionD(768)`.
    pub mixed_7a: InceptionD<B>,
    /// `FIDInceptionE_1(1280)`.
    pub mixed_7b: InceptionE<B>,
    /// `FIDInceptionE_2(2048)`.
    pub mixed_7c: InceptionE<B>,
    /// The 1008-class head; absent when the weights came under pytorch-fid's
    /// module names, which drop it.
    pub fc: Option<InceptionFc<B>>,
}

impl<B: Backend> FidInceptionV3<B> {
    /// Builds the network from `source` (which hands out every convolution
    /// of [`conv_specs`]) and an optional head.
    pub fn build(source: &mut dyn ConvSource<B>, fc: Option<InceptionFc<B>>) -> Self {
        let stem = stem_specs();
        let mut stem = stem.iter().map(|s| source.conv(s));
        let mut next = || stem.next().expect("five stem convolutions");
        let (conv2d_1a_3x3, conv2d_2a_3x3, conv2d_2b_3x3, conv2d_3b_1x1, conv2d_4a_3x3) =
            (next(), next(), next(), next(), next());
        Self {
            conv2d_1a_3x3,
            conv2d_2a_3x3,
            conv2d_2b_3x3,
            conv2d_3b_1x1,
            conv2d_4a_3x3,
            mixed_5b: InceptionA::new("Mixed_5b", 192, 32, source),
            mixed_5c: InceptionA::new("Mixed_5c", 256, 64, source),
            mixed_5d: InceptionA::new("Mixed_5d", 288, 64, source),
            mixed_6a: InceptionB::new("Mixed_6a", 288, source),
            mixed_6b: InceptionC::new("Mixed_6b", 768, 128, source),
            mixed_6c: InceptionC::new("Mixed_6c", 768, 160, source),
            mixed_6d: InceptionC::new("Mixed_6d", 768, 160, source),
            mixed_6e: InceptionC::new("Mixed_6e", 768, 192, source),
            mixed_7a: InceptionD::new("Mixed_7a", 768, source),
            mixed_7b: InceptionE::new("Mixed_7b", 1280, EBlockPool::AverageExcludingPad, source),
            mixed_7c: InceptionE::new("Mixed_7c", 2048, EBlockPool::Max, source),
            fc,
        }
    }

    /// The 2048-d pool features of images in `[0, 1]`, as pytorch-fid's
    /// `InceptionV3([3])(images)[0].squeeze(3).squeeze(2)` (and DiffMoE's
    /// `evaluation/inception.py`) returns them: bilinear resize to 299x299
    /// (`align_corners=False`, no antialias), `2x - 1`, the network, and the
    /// mean over the final 8x8 positions.
    ///
    /// # Shapes
    /// - `images`: `[batch, 3, height, width]`, RGB in `[0, 1]` -> `[batch, 2048]`
    pub fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        self.forward_inspect(images, &mut |_, _| {})
    }

    /// [`Self::forward`], also returning the output of each stem conv, both
    /// stem max pools and every Mixed block, in execution order.
    ///
    /// # Shapes
    /// - `images`: `[batch, 3, height, width]` -> `[batch, 2048]` and the taps
    pub fn forward_traced(&self, images: Tensor<B, 4>) -> (Tensor<B, 2>, Vec<InceptionTap<B>>) {
        let mut taps = Vec::new();
        let pool =
            self.forward_inspect(images, &mut |name, output| taps.push(InceptionTap { name, output: output.clone() }));
        (pool, taps)
    }

    /// [`Self::forward`], handing each intermediate output of
    /// [`Self::forward_traced`] to `inspect` as soon as it is computed (so
    /// that summaries need not keep every activation alive).
    ///
    /// # Shapes
    /// - `images`: `[batch, 3, height, width]` -> `[batch, 2048]`; `inspect`
    ///   sees `[batch, channels, h, w]` tensors
    pub fn forward_inspect(
        &self,
        images: Tensor<B, 4>,
        inspect: &mut dyn FnMut(&'static str, &Tensor<B, 4>),
    ) -> Tensor<B, 2> {
        let tap = inspect;
        let [batch, channels, _, _] = images.dims();
        assert_eq!(channels, 3, "the FID Inception takes RGB images, got {channels} channels");
        let mut x = normalize_input(resize_input(images)); // [batch, 3, 299, 299]
        let mut step = |name: &'static str, x: Tensor<B, 4>| {
            tap(name, &x);
            x
        };
        x = step("Conv2d_1a_3x3", self.conv2d_1a_3x3.forward(x)); // [batch, 32, 149, 149]
        x = step("Conv2d_2a_3x3", self.conv2d_2a_3x3.forward(x)); // [batch, 32, 147, 147]
        x = step("Conv2d_2b_3x3", self.conv2d_2b_3x3.forward(x)); // [batch, 64, 147, 147]
        x = step("maxpool1", max_pool_3x3_s2(x)); // [batch, 64, 73, 73]
        x = step("Conv2d_3b_1x1", self.conv2d_3b_1x1.forward(x)); // [batch, 80, 73, 73]
        x = step("Conv2d_4a_3x3", self.conv2d_4a_3x3.forward(x)); // [batch, 192, 71, 71]
        x = step("maxpool2", max_pool_3x3_s2(x)); // [batch, 192, 35, 35]
        x = step("Mixed_5b", self.mixed_5b.forward(x)); // [batch, 256, 35, 35]
        x = step("Mixed_5c", self.mixed_5c.forward(x)); // [batch, 288, 35, 35]
        x = step("Mixed_5d", self.mixed_5d.forward(x)); // [batch, 288, 35, 35]
        x = step("Mixed_6a", self.mixed_6a.forward(x)); // [batch, 768, 17, 17]
        x = step("Mixed_6b", self.mixed_6b.forward(x)); // [batch, 768, 17, 17]
        x = step("Mixed_6c", self.mixed_6c.forward(x)); // [batch, 768, 17, 17]
        x = step("Mixed_6d", self.mixed_6d.forward(x)); // [batch, 768, 17, 17]
        x = step("Mixed_6e", self.mixed_6e.forward(x)); // [batch, 768, 17, 17]
        x = step("Mixed_7a", self.mixed_7a.forward(x)); // [batch, 1280, 8, 8]
        x = step("Mixed_7b", self.mixed_7b.forward(x)); // [batch, 2048, 8, 8]
        x = step("Mixed_7c", self.mixed_7c.forward(x)); // [batch, 2048, 8, 8]
        let [_, features, h, w] = x.dims();
        // AdaptiveAvgPool2d((1, 1)): the mean over the h*w positions.
        x.reshape([batch, features, h * w]).mean_dim(2).reshape([batch, features])
        // [batch, 2048]
    }

    /// The `fc` logits of pool features, `None` when the network was loaded
    /// without its head (pytorch-fid's module names).
    ///
    /// # Shapes
    /// - `pool`: `[batch, 2048]` -> `[batch, 1008]`
    pub fn logits(&self, pool: Tensor<B, 2>, bias: FcBias) -> Option<Tensor<B, 2>> {
        let fc = self.fc.as_ref()?;
        let logits = pool.matmul(fc.weight.val().transpose()); // [batch, 1008]
        Some(match bias {
            FcBias::Included => logits + fc.bias.val().unsqueeze_dim(0),
            FcBias::Excluded => logits,
        })
    }

    /// The class probabilities of the Inception Score: `softmax(pool W^T)`
    /// over the 1008 classes, `None` without a head.
    ///
    /// # Shapes
    /// - `pool`: `[batch, 2048]` -> `[batch, 1008]`
    pub fn class_probabilities(&self, pool: Tensor<B, 2>) -> Option<Tensor<B, 2>> {
        self.logits(pool, FcBias::Excluded).map(|l| activation::softmax(l, 1))
    }
}

/// pytorch-fid's `resize_input`: `F.interpolate(x, (299, 299), "bilinear",
/// align_corners=False)`. At 299x299 that is an exact identity (every
/// source coordinate is an integer), so the input is returned as is.
///
/// # Shapes
/// - `images`: `[batch, channels, height, width]` -> `[batch, channels, 299, 299]`
pub fn resize_input<B: Backend>(images: Tensor<B, 4>) -> Tensor<B, 4> {
    let [_, _, h, w] = images.dims();
    if [h, w] == [INCEPTION_SIZE, INCEPTION_SIZE] {
        images
    } else {
        bilinear_resize(images, [INCEPTION_SIZE, INCEPTION_SIZE])
    }
}

/// pytorch-fid's `normalize_input`: `2x - 1`, from `[0, 1]` to `[-1, 1]`
/// (torchvision's `transform_input` is off).
///
/// # Shapes
/// - `x`: any -> same
pub fn normalize_input<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.mul_scalar(2.0).sub_scalar(1.0)
}

/// DiffMoE's conversion of decoded samples before the Inception
/// (`sample_ddp_feature.py`): `clamp(127.5 x + 128, 0, 255) / 255`, kept in
/// float (no uint8 rounding). The offset is +128, not +127.5, a quirk
/// inherited from DiT's PNG writer where a truncating uint8 cast followed.
///
/// # Shapes
/// - `decoded`: any, values about `[-1, 1]` -> same, values in `[0, 1]`
pub fn diffmoe_images01<B: Backend, const D: usize>(decoded: Tensor<B, D>) -> Tensor<B, D> {
    decoded.mul_scalar(127.5).add_scalar(128.0).clamp(0.0, 255.0).div_scalar(255.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    #[test]
    fn ninety_four_convolutions_with_unique_names() {
        let specs = conv_specs();
        assert_eq!(specs.len(), 94);
        let names: std::collections::BTreeSet<_> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names.len(), 94);
        let conv_params: usize = specs.iter().map(|s| s.weight_shape().iter().product::<usize>()).sum();
        assert_eq!(conv_params, 21_751_136);
    }

    #[test]
    fn postprocessing_offsets_by_128() {
        let x = Tensor::<Flex, 1>::from_data(TensorData::new(vec![-1.2f32, -1.0, 0.0, 1.0], [4]), &Default::default());
        let y = diffmoe_images01(x).into_data().to_vec::<f32>().unwrap();
        assert_eq!(y, vec![0.0, 0.5 / 255.0, 128.0 / 255.0, 1.0]);
    }
}
