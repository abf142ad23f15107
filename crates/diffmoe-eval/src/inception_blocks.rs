//! The building blocks of pytorch-fid's FID Inception (`pytorch_fid/inception.py`
//! and torchvision `models/inception.py`): `BasicConv2d`, the FID variants of
//! the Inception blocks A, C and E and torchvision's unchanged B and D, plus
//! the table of their 94 convolutions under the weights-file names.
//!
//! Field names are the torchvision module names, so that a parameter's path
//! is its key in `pt_inception-2015-12-05-6726825d.pth`
//! (`Mixed_5b.branch5x5_2.conv.weight` is `mixed_5b.branch5x5_2.conv_weight`).

use burn::module::{Module, Param};
use burn::tensor::module::{avg_pool2d, conv2d, max_pool2d};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{activation, backend::Backend, Tensor};

/// BatchNorm epsilon of torchvision's `BasicConv2d` (`BatchNorm2d(eps=0.001)`,
/// the value of the TF graph the weights were converted from).
pub const BATCH_NORM_EPS: f32 = 1e-3;

/// One `BasicConv2d`: its weights-file name and hyper-parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvSpec {
    /// Weights-file module name, e.g. `Mixed_6b.branch7x7_2`.
    pub name: String,
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// `[kh, kw]`.
    pub kernel: [usize; 2],
    /// `[sh, sw]`.
    pub stride: [usize; 2],
    /// Zero padding `[ph, pw]` on both sides.
    pub padding: [usize; 2],
}

impl ConvSpec {
    fn new(name: String, in_channels: usize, out_channels: usize, kernel: [usize; 2]) -> Self {
        Self { name, in_channels, out_channels, kernel, stride: [1, 1], padding: [0, 0] }
    }

    fn stride(mut self, stride: usize) -> Self {
        self.stride = [stride, stride];
        self
    }

    fn pad(mut self, padding: [usize; 2]) -> Self {
        self.padding = padding;
        self
    }

    /// `[out, in, kh, kw]`, the PyTorch weight shape.
    pub fn weight_shape(&self) -> [usize; 4] {
        [self.out_channels, self.in_channels, self.kernel[0], self.kernel[1]]
    }
}

/// Supplies the parameters of each `BasicConv2d` while a network is built.
pub trait ConvSource<B: Backend> {
    /// The convolution named `spec.name` with the hyper-parameters of `spec`.
    fn conv(&mut self, spec: &ConvSpec) -> BasicConv2d<B>;
}

/// `BatchNorm2d` in eval mode: `(x - running_mean) / sqrt(running_var + eps) * weight + bias`.
#[derive(Module, Debug)]
pub struct BatchNorm2d<B: Backend> {
    /// `bn.weight` `[channels]`.
    pub weight: Param<Tensor<B, 1>>,
    /// `bn.bias` `[channels]`.
    pub bias: Param<Tensor<B, 1>>,
    /// `bn.running_mean` `[channels]`: a buffer, never trained here.
    pub running_mean: Param<Tensor<B, 1>>,
    /// `bn.running_var` `[channels]`: a buffer, never trained here.
    pub running_var: Param<Tensor<B, 1>>,
}

impl<B: Backend> BatchNorm2d<B> {
    /// As PyTorch's CPU kernel: `alpha = weight / sqrt(var + eps)`,
    /// `beta = bias - mean * alpha`, `y = x * alpha + beta`.
    ///
    /// # Shapes
    /// - `x`: `[batch, channels, height, width]` -> same
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [channels] = self.weight.dims();
        let invstd = self.running_var.val().add_scalar(BATCH_NORM_EPS).sqrt().recip();
        let alpha = self.weight.val() * invstd; // [channels]
        let beta = self.bias.val() - self.running_mean.val() * alpha.clone();
        x * alpha.reshape([1, channels, 1, 1]) + beta.reshape([1, channels, 1, 1])
    }
}

/// torchvision `BasicConv2d`: `Conv2d(bias=False)` -> `BatchNorm2d(eps=0.001)` -> ReLU.
#[derive(Module, Debug)]
pub struct BasicConv2d<B: Backend> {
    /// `conv.weight` `[out, in, kh, kw]`.
    pub conv_weight: Param<Tensor<B, 4>>,
    /// `bn`.
    pub bn: BatchNorm2d<B>,
    /// `[sh, sw]`.
    pub stride: [usize; 2],
    /// `[ph, pw]`.
    pub padding: [usize; 2],
}

impl<B: Backend> BasicConv2d<B> {
    /// # Shapes
    /// - `x`: `[batch, in, height, width]` -> `[batch, out, height', width']`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let options = ConvOptions::new(self.stride, self.padding, [1, 1], 1);
        activation::relu(self.bn.forward(conv2d(x, self.conv_weight.val(), None, options)))
    }
}

/// `max_pool2d(3, stride 2)` without padding (stem, InceptionB, InceptionD).
///
/// # Shapes
/// - `x`: `[batch, channels, h, w]` -> `[batch, channels, (h - 3) / 2 + 1, (w - 3) / 2 + 1]`
pub fn max_pool_3x3_s2<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    max_pool2d(x, [3, 3], [2, 2], [0, 0], [1, 1], false)
}

/// `avg_pool2d(3, stride 1, padding 1, count_include_pad=False)`: each window
/// divides by its number of real pixels (4 at corners, 6 on edges, 9 inside).
/// burn's `count_include_pad = false` has exactly this meaning.
///
/// # Shapes
/// - `x`: `[batch, channels, h, w]` -> same
pub fn avg_pool_3x3_exclude_pad<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    avg_pool2d(x, [3, 3], [1, 1], [1, 1], false, false)
}

/// `max_pool2d(3, stride 1, padding 1)`; burn's max pool skips padded
/// positions, i.e. pads with -inf, as PyTorch does.
///
/// # Shapes
/// - `x`: `[batch, channels, h, w]` -> same
pub fn max_pool_3x3_same<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    max_pool2d(x, [3, 3], [1, 1], [1, 1], [1, 1], false)
}

/// The convolutions of the stem, in weights-file order.
pub fn stem_specs() -> Vec<ConvSpec> {
    let n = |s: &str| s.to_string();
    vec![
        ConvSpec::new(n("Conv2d_1a_3x3"), 3, 32, [3, 3]).stride(2),
        ConvSpec::new(n("Conv2d_2a_3x3"), 32, 32, [3, 3]),
        ConvSpec::new(n("Conv2d_2b_3x3"), 32, 64, [3, 3]).pad([1, 1]),
        ConvSpec::new(n("Conv2d_3b_1x1"), 64, 80, [1, 1]),
        ConvSpec::new(n("Conv2d_4a_3x3"), 80, 192, [3, 3]),
    ]
}

fn named(prefix: &str, branch: &str) -> String {
    format!("{prefix}.{branch}")
}

/// `FIDInceptionA(in_channels, pool_features)`: outputs `224 + pool_features` channels.
pub fn inception_a_specs(prefix: &str, in_channels: usize, pool_features: usize) -> Vec<ConvSpec> {
    let n = |b: &str| named(prefix, b);
    vec![
        ConvSpec::new(n("branch1x1"), in_channels, 64, [1, 1]),
        ConvSpec::new(n("branch5x5_1"), in_channels, 48, [1, 1]),
        ConvSpec::new(n("branch5x5_2"), 48, 64, [5, 5]).pad([2, 2]),
        ConvSpec::new(n("branch3x3dbl_1"), in_channels, 64, [1, 1]),
        ConvSpec::new(n("branch3x3dbl_2"), 64, 96, [3, 3]).pad([1, 1]),
        ConvSpec::new(n("branch3x3dbl_3"), 96, 96, [3, 3]).pad([1, 1]),
        ConvSpec::new(n("branch_pool"), in_channels, pool_features, [1, 1]),
    ]
}

/// torchvision `InceptionB(in_channels)`: outputs `480 + in_channels` channels.
pub fn inception_b_specs(prefix: &str, in_channels: usize) -> Vec<ConvSpec> {
    let n = |b: &str| named(prefix, b);
    vec![
        ConvSpec::new(n("branch3x3"), in_channels, 384, [3, 3]).stride(2),
        ConvSpec::new(n("branch3x3dbl_1"), in_channels, 64, [1, 1]),
        ConvSpec::new(n("branch3x3dbl_2"), 64, 96, [3, 3]).pad([1, 1]),
        ConvSpec::new(n("branch3x3dbl_3"), 96, 96, [3, 3]).stride(2),
    ]
}

/// `FIDInceptionC(in_channels, channels_7x7)`: outputs 768 channels.
pub fn inception_c_specs(prefix: &str, in_channels: usize, c7: usize) -> Vec<ConvSpec> {
    let n = |b: &str| named(prefix, b);
    let (row, col) = (([1, 7], [0, 3]), ([7, 1], [3, 0])); // (kernel, padding) of 1x7 and 7x1
    vec![
        ConvSpec::new(n("branch1x1"), in_channels, 192, [1, 1]),
        ConvSpec::new(n("branch7x7_1"), in_channels, c7, [1, 1]),
        ConvSpec::new(n("branch7x7_2"), c7, c7, row.0).pad(row.1),
        ConvSpec::new(n("branch7x7_3"), c7, 192, col.0).pad(col.1),
        ConvSpec::new(n("branch7x7dbl_1"), in_channels, c7, [1, 1]),
        ConvSpec::new(n("branch7x7dbl_2"), c7, c7, col.0).pad(col.1),
        ConvSpec::new(n("branch7x7dbl_3"), c7, c7, row.0).pad(row.1),
        ConvSpec::new(n("branch7x7dbl_4"), c7, c7, col.0).pad(col.1),
        ConvSpec::new(n("branch7x7dbl_5"), c7, 192, row.0).pad(row.1),
        ConvSpec::new(n("branch_pool"), in_channels, 192, [1, 1]),
    ]
}

/// torchvision `InceptionD(in_channels)`: outputs `512 + in_channels` channels.
pub fn inception_d_specs(prefix: &str, in_channels: usize) -> Vec<ConvSpec> {
    let n = |b: &str| named(prefix, b);
    vec![
        ConvSpec::new(n("branch3x3_1"), in_channels, 192, [1, 1]),
        ConvSpec::new(n("branch3x3_2"), 192, 320, [3, 3]).stride(2),
        ConvSpec::new(n("branch7x7x3_1"), in_channels, 192, [1, 1]),
        ConvSpec::new(n("branch7x7x3_2"), 192, 192, [1, 7]).pad([0, 3]),
        ConvSpec::new(n("branch7x7x3_3"), 192, 192, [7, 1]).pad([3, 0]),
        ConvSpec::new(n("branch7x7x3_4"), 192, 192, [3, 3]).stride(2),
    ]
}

/// `FIDInceptionE_1` / `FIDInceptionE_2(in_channels)`: outputs 2048 channels.
pub fn inception_e_specs(prefix: &str, in_channels: usize) -> Vec<ConvSpec> {
    let n = |b: &str| named(prefix, b);
    vec![
        ConvSpec::new(n("branch1x1"), in_channels, 320, [1, 1]),
        ConvSpec::new(n("branch3x3_1"), in_channels, 384, [1, 1]),
        ConvSpec::new(n("branch3x3_2a"), 384, 384, [1, 3]).pad([0, 1]),
        ConvSpec::new(n("branch3x3_2b"), 384, 384, [3, 1]).pad([1, 0]),
        ConvSpec::new(n("branch3x3dbl_1"), in_channels, 448, [1, 1]),
        ConvSpec::new(n("branch3x3dbl_2"), 448, 384, [3, 3]).pad([1, 1]),
        ConvSpec::new(n("branch3x3dbl_3a"), 384, 384, [1, 3]).pad([0, 1]),
        ConvSpec::new(n("branch3x3dbl_3b"), 384, 384, [3, 1]).pad([1, 0]),
        ConvSpec::new(n("branch_pool"), in_channels, 192, [1, 1]),
    ]
}

/// Builds the convolutions of one block from `specs` in order.
fn take<B: Backend, const N: usize>(specs: Vec<ConvSpec>, source: &mut dyn ConvSource<B>) -> [BasicConv2d<B>; N] {
    let convs: Vec<BasicConv2d<B>> = specs.iter().map(|s| source.conv(s)).collect();
    convs.try_into().unwrap_or_else(|v: Vec<_>| panic!("a block has {} convolutions, not {N}", v.len()))
}

/// `FIDInceptionA`: the torchvision block with a count-excluding average pool.
#[derive(Module, Debug)]
pub struct InceptionA<B: Backend> {
    /// 1x1 -> 64.
    pub branch1x1: BasicConv2d<B>,
    /// 1x1 -> 48.
    pub branch5x5_1: BasicConv2d<B>,
    /// 5x5 p2 -> 64.
    pub branch5x5_2: BasicConv2d<B>,
    /// 1x1 -> 64.
    pub branch3x3dbl_1: BasicConv2d<B>,
    /// 3x3 p1 -> 96.
    pub branch3x3dbl_2: BasicConv2d<B>,
    /// 3x3 p1 -> 96.
    pub branch3x3dbl_3: BasicConv2d<B>,
    /// 1x1 -> pool_features after the average pool.
    pub branch_pool: BasicConv2d<B>,
}

impl<B: Backend> InceptionA<B> {
    /// The block `prefix` (`Mixed_5b`, ...).
    pub fn new(prefix: &str, in_channels: usize, pool_features: usize, source: &mut dyn ConvSource<B>) -> Self {
        let [branch1x1, branch5x5_1, branch5x5_2, branch3x3dbl_1, branch3x3dbl_2, branch3x3dbl_3, branch_pool] =
            take(inception_a_specs(prefix, in_channels, pool_features), source);
        Self { branch1x1, branch5x5_1, branch5x5_2, branch3x3dbl_1, branch3x3dbl_2, branch3x3dbl_3, branch_pool }
    }

    /// # Shapes
    /// - `x`: `[batch, in, 35, 35]` -> `[batch, 224 + pool_features, 35, 35]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let branch1x1 = self.branch1x1.forward(x.clone());
        let branch5x5 = self.branch5x5_2.forward(self.branch5x5_1.forward(x.clone()));
        let branch3x3dbl =
            self.branch3x3dbl_3.forward(self.branch3x3dbl_2.forward(self.branch3x3dbl_1.forward(x.clone())));
        let branch_pool = self.branch_pool.forward(avg_pool_3x3_exclude_pad(x));
        Tensor::cat(vec![branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)
    }
}

/// torchvision `InceptionB` (grid reduction 35 -> 17).
#[derive(Module, Debug)]
pub struct InceptionB<B: Backend> {
    /// 3x3 s2 -> 384.
    pub branch3x3: BasicConv2d<B>,
    /// 1x1 -> 64.
    pub branch3x3dbl_1: BasicConv2d<B>,
    /// 3x3 p1 -> 96.
    pub branch3x3dbl_2: BasicConv2d<B>,
    /// 3x3 s2 -> 96.
    pub branch3x3dbl_3: BasicConv2d<B>,
}

impl<B: Backend> InceptionB<B> {
    /// The block `prefix` (`Mixed_6a`).
    pub fn new(prefix: &str, in_channels: usize, source: &mut dyn ConvSource<B>) -> Self {
        let [branch3x3, branch3x3dbl_1, branch3x3dbl_2, branch3x3dbl_3] =
            take(inception_b_specs(prefix, in_channels), source);
        Self { branch3x3, branch3x3dbl_1, branch3x3dbl_2, branch3x3dbl_3 }
    }

    /// # Shapes
    /// - `x`: `[batch, in, 35, 35]` -> `[batch, 480 + in, 17, 17]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let branch3x3 = self.branch3x3.forward(x.clone());
        let branch3x3dbl =
            self.branch3x3dbl_3.forward(self.branch3x3dbl_2.forward(self.branch3x3dbl_1.forward(x.clone())));
        let branch_pool = max_pool_3x3_s2(x);
        Tensor::cat(vec![branch3x3, branch3x3dbl, branch_pool], 1)
    }
}

/// `FIDInceptionC`: factorised 7x7 convolutions, count-excluding average pool.
#[derive(Module, Debug)]
pub struct InceptionC<B: Backend> {
    /// 1x1 -> 192.
    pub branch1x1: BasicConv2d<B>,
    /// 1x1 -> c7.
    pub branch7x7_1: BasicConv2d<B>,
    /// (1,7) -> c7.
    pub branch7x7_2: BasicConv2d<B>,
    /// (7,1) -> 192.
    pub branch7x7_3: BasicConv2d<B>,
    /// 1x1 -> c7.
    pub branch7x7dbl_1: BasicConv2d<B>,
    /// (7,1) -> c7.
    pub branch7x7dbl_2: BasicConv2d<B>,
    /// (1,7) -> c7.
    pub branch7x7dbl_3: BasicConv2d<B>,
    /// (7,1) -> c7.
    pub branch7x7dbl_4: BasicConv2d<B>,
    /// (1,7) -> 192.
    pub branch7x7dbl_5: BasicConv2d<B>,
    /// 1x1 -> 192 after the average pool.
    pub branch_pool: BasicConv2d<B>,
}

impl<B: Backend> InceptionC<B> {
    /// The block `prefix` (`Mixed_6b`, ...).
    pub fn new(prefix: &str, in_channels: usize, channels_7x7: usize, source: &mut dyn ConvSource<B>) -> Self {
        let [branch1x1, branch7x7_1, branch7x7_2, branch7x7_3, branch7x7dbl_1, branch7x7dbl_2, branch7x7dbl_3, branch7x7dbl_4, branch7x7dbl_5, branch_pool] =
            take(inception_c_specs(prefix, in_channels, channels_7x7), source);
        Self {
            branch1x1,
            branch7x7_1,
            branch7x7_2,
            branch7x7_3,
            branch7x7dbl_1,
            branch7x7dbl_2,
            branch7x7dbl_3,
            branch7x7dbl_4,
            branch7x7dbl_5,
            branch_pool,
        }
    }

    /// # Shapes
    /// - `x`: `[batch, 768, 17, 17]` -> `[batch, 768, 17, 17]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let branch1x1 = self.branch1x1.forward(x.clone());
        let branch7x7 = self.branch7x7_3.forward(self.branch7x7_2.forward(self.branch7x7_1.forward(x.clone())));
        let mut dbl = self.branch7x7dbl_1.forward(x.clone());
        for conv in [&self.branch7x7dbl_2, &self.branch7x7dbl_3, &self.branch7x7dbl_4, &self.branch7x7dbl_5] {
            dbl = conv.forward(dbl);
        }
        let branch_pool = self.branch_pool.forward(avg_pool_3x3_exclude_pad(x));
        Tensor::cat(vec![branch1x1, branch7x7, dbl, branch_pool], 1)
    }
}

/// torchvision `InceptionD` (grid reduction 17 -> 8).
#[derive(Module, Debug)]
pub struct InceptionD<B: Backend> {
    /// 1x1 -> 192.
    pub branch3x3_1: BasicConv2d<B>,
    /// 3x3 s2 -> 320.
    pub branch3x3_2: BasicConv2d<B>,
    /// 1x1 -> 192.
    pub branch7x7x3_1: BasicConv2d<B>,
    /// (1,7) -> 192.
    pub branch7x7x3_2: BasicConv2d<B>,
    /// (7,1) -> 192.
    pub branch7x7x3_3: BasicConv2d<B>,
    /// 3x3 s2 -> 192.
    pub branch7x7x3_4: BasicConv2d<B>,
}

impl<B: Backend> InceptionD<B> {
    /// The block `prefix` (`Mixed_7a`).
    pub fn new(prefix: &str, in_channels: usize, source: &mut dyn ConvSource<B>) -> Self {
        let [branch3x3_1, branch3x3_2, branch7x7x3_1, branch7x7x3_2, branch7x7x3_3, branch7x7x3_4] =
            take(inception_d_specs(prefix, in_channels), source);
        Self { branch3x3_1, branch3x3_2, branch7x7x3_1, branch7x7x3_2, branch7x7x3_3, branch7x7x3_4 }
    }

    /// # Shapes
    /// - `x`: `[batch, in, 17, 17]` -> `[batch, 512 + in, 8, 8]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let branch3x3 = self.branch3x3_2.forward(self.branch3x3_1.forward(x.clone()));
        let mut branch7x7x3 = self.branch7x7x3_1.forward(x.clone());
        for conv in [&self.branch7x7x3_2, &self.branch7x7x3_3, &self.branch7x7x3_4] {
            branch7x7x3 = conv.forward(branch7x7x3);
        }
        let branch_pool = max_pool_3x3_s2(x);
        Tensor::cat(vec![branch3x3, branch7x7x3, branch_pool], 1)
    }
}

/// The pool of an E block's pool branch: the one place where pytorch-fid's
/// `FIDInceptionE_1` and `FIDInceptionE_2` differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EBlockPool {
    /// `FIDInceptionE_1` (`Mixed_7b`): `avg_pool2d(3, 1, 1, count_include_pad=False)`.
    AverageExcludingPad,
    /// `FIDInceptionE_2` (`Mixed_7c`): `max_pool2d(3, 1, 1)`, a quirk of the
    /// TF graph (the paper's Inception uses an average pool there).
    Max,
}

/// `FIDInceptionE_1` / `FIDInceptionE_2`: expanded filter banks at 8x8.
#[derive(Module, Debug)]
pub struct InceptionE<B: Backend> {
    /// 1x1 -> 320.
    pub branch1x1: BasicConv2d<B>,
    /// 1x1 -> 384.
    pub branch3x3_1: BasicConv2d<B>,
    /// (1,3) -> 384.
    pub branch3x3_2a: BasicConv2d<B>,
    /// (3,1) -> 384.
    pub branch3x3_2b: BasicConv2d<B>,
    /// 1x1 -> 448.
    pub branch3x3dbl_1: BasicConv2d<B>,
    /// 3x3 p1 -> 384.
    pub branch3x3dbl_2: BasicConv2d<B>,
    /// (1,3) -> 384.
    pub branch3x3dbl_3a: BasicConv2d<B>,
    /// (3,1) -> 384.
    pub branch3x3dbl_3b: BasicConv2d<B>,
    /// 1x1 -> 192 after the pool.
    pub branch_pool: BasicConv2d<B>,
    /// Which pool the pool branch uses.
    pub pool: EBlockPool,
}

impl<B: Backend> InceptionE<B> {
    /// The block `prefix` (`Mixed_7b`, `Mixed_7c`).
    pub fn new(prefix: &str, in_channels: usize, pool: EBlockPool, source: &mut dyn ConvSource<B>) -> Self {
        let [branch1x1, branch3x3_1, branch3x3_2a, branch3x3_2b, branch3x3dbl_1, branch3x3dbl_2, branch3x3dbl_3a, branch3x3dbl_3b, branch_pool] =
            take(inception_e_specs(prefix, in_channels), source);
        Self {
            branch1x1,
            branch3x3_1,
            branch3x3_2a,
            branch3x3_2b,
            branch3x3dbl_1,
            branch3x3dbl_2,
            branch3x3dbl_3a,
            branch3x3dbl_3b,
            branch_pool,
            pool,
        }
    }

    /// # Shapes
    /// - `x`: `[batch, in, 8, 8]` -> `[batch, 2048, 8, 8]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let branch1x1 = self.branch1x1.forward(x.clone());
        let b3 = self.branch3x3_1.forward(x.clone());
        let branch3x3 = Tensor::cat(vec![self.branch3x3_2a.forward(b3.clone()), self.branch3x3_2b.forward(b3)], 1);
        let dbl = self.branch3x3dbl_2.forward(self.branch3x3dbl_1.forward(x.clone()));
        let branch3x3dbl =
            Tensor::cat(vec![self.branch3x3dbl_3a.forward(dbl.clone()), self.branch3x3dbl_3b.forward(dbl)], 1);
        let pooled = match self.pool {
            EBlockPool::AverageExcludingPad => avg_pool_3x3_exclude_pad(x),
            EBlockPool::Max => max_pool_3x3_same(x),
        };
        let branch_pool = self.branch_pool.forward(pooled);
        Tensor::cat(vec![branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    type B = Flex;

    fn tensor(values: Vec<f32>, shape: [usize; 4]) -> Tensor<B, 4> {
        Tensor::from_data(TensorData::new(values, shape), &Default::default())
    }

    #[test]
    fn average_pool_divides_by_real_pixels() {
        let x = tensor(vec![1.0; 16], [1, 1, 4, 4]);
        let y = avg_pool_3x3_exclude_pad(x).into_data().to_vec::<f32>().unwrap();
        assert!(y.iter().all(|&v| (v - 1.0).abs() < 1e-7), "count_include_pad=True would give 4/9 at corners: {y:?}");
        let x = tensor((0..9).map(|v| v as f32).collect(), [1, 1, 3, 3]);
        let y = avg_pool_3x3_exclude_pad(x).into_data().to_vec::<f32>().unwrap();
        assert_eq!(y[0], (0.0 + 1.0 + 3.0 + 4.0) / 4.0);
        assert_eq!(y[1], (0.0 + 1.0 + 2.0 + 3.0 + 4.0 + 5.0) / 6.0);
        assert_eq!(y[4], 4.0);
    }

    #[test]
    fn max_pool_pads_with_minus_infinity() {
        let x = tensor(vec![-1.0, -2.0, -3.0, -4.0], [1, 1, 2, 2]);
        let y = max_pool_3x3_same(x).into_data().to_vec::<f32>().unwrap();
        assert_eq!(y, vec![-1.0; 4], "zero padding would give 0");
    }

    #[test]
    fn batch_norm_uses_eps_1e_3() {
        let d = Default::default();
        let one = |v: f32| Param::from_tensor(Tensor::<B, 1>::from_data(TensorData::new(vec![v], [1]), &d));
        let bn = BatchNorm2d { weight: one(2.0), bias: one(0.5), running_mean: one(1.0), running_var: one(0.999) };
        let y = bn.forward(tensor(vec![3.0], [1, 1, 1, 1])).into_data().to_vec::<f32>().unwrap();
        assert!((y[0] - 4.5).abs() < 1e-6, "{y:?}");
    }

    #[test]
    fn block_output_channels() {
        let sum = |s: Vec<ConvSpec>, names: &[&str]| -> usize {
            s.iter().filter(|c| names.iter().any(|n| c.name.ends_with(n))).map(|c| c.out_channels).sum()
        };
        let a = inception_a_specs("A", 192, 32);
        assert_eq!(sum(a, &["branch1x1", "branch5x5_2", "branch3x3dbl_3", "branch_pool"]), 256);
        let e = inception_e_specs("E", 1280);
        assert_eq!(sum(e, &["branch1x1", "_2a", "_2b", "_3a", "_3b", "branch_pool"]), 2048);
    }
}
