//! Input embeddings of DiT (official `models/modules.py`, timm `PatchEmbed`):
//! patches, fixed 2-D sin-cos positions, timesteps and class labels.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

use diffmoe_core::{add_bias, init, linear, matmul, on_rows, silu};

/// Size of the sinusoidal timestep features fed to the timestep MLP.
pub const FREQUENCY_EMBEDDING_SIZE: usize = 256;

/// timm `PatchEmbed`: a `Conv2d(C, D, kernel = stride = patch)` with bias,
/// computed as one matmul over the flattened patches.
#[derive(Module, Debug)]
pub struct PatchEmbed<B: Backend> {
    /// `[d_model, in_channels, patch, patch]` (official `x_embedder.proj.weight`).
    pub proj_weight: Param<Tensor<B, 4>>,
    /// `[d_model]` (official `x_embedder.proj.bias`).
    pub proj_bias: Param<Tensor<B, 1>>,
}

impl<B: Backend> PatchEmbed<B> {
    /// The official initialisation: Xavier-uniform over the flattened kernel
    /// ("like nn.Linear instead of nn.Conv2d"), zero bias.
    pub fn new(in_channels: usize, patch: usize, d_model: usize, device: &B::Device) -> Self {
        let fan_in = in_channels * patch * patch;
        Self {
            proj_weight: Param::from_tensor(init::xavier_uniform(
                [d_model, in_channels, patch, patch],
                fan_in,
                d_model,
                device,
            )),
            proj_bias: Param::from_tensor(Tensor::zeros([d_model], device)),
        }
    }

    /// Patch size.
    pub fn patch_size(&self) -> usize {
        self.proj_weight.dims()[2]
    }

    /// Tokens in row-major patch order (`token = row * W/p + col`).
    ///
    /// # Shapes
    /// - `x`: `[batch, in_channels, height, width]` -> `[batch, tokens, d_model]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 3> {
        let [n, c, h, w] = x.dims();
        let p = self.patch_size();
        let [d_model, ..] = self.proj_weight.dims();
        let (gh, gw) = (h / p, w / p);
        let patches = x
            .reshape([n, c, gh, p, gw, p])
            .permute([0, 2, 4, 1, 3, 5]) // [N, gh, gw, C, p, p]
            .reshape([n, gh * gw, c * p * p]);
        let weight = self.proj_weight.val().reshape([d_model, c * p * p]).transpose(); // [C*p*p, D]
        on_rows(patches, |p| add_bias(matmul(p, weight), self.proj_bias.val()))
    }
}

/// The fixed 2-D sin-cos position table of MAE/DiT (`get_2d_sincos_pos_embed`),
/// computed in f64 and rounded to f32 as the official numpy code does.
/// Channels `[0, D/2)` encode the column, `[D/2, D)` the row; each half is
/// `[sin(pos * w), cos(pos * w)]` with `w_i = 1 / 10000^(i / (D/4))`.
///
/// # Shapes
/// - returns `grid_size * grid_size` rows of `d_model` values, row-major
///
/// # Panics
/// If `d_model` is not a multiple of 4.
pub fn sincos_pos_embed_2d(d_model: usize, grid_size: usize) -> Vec<f32> {
    assert!(d_model.is_multiple_of(4), "the 2-D sin-cos table needs d_model % 4 == 0, got {d_model}");
    let quarter = d_model / 4;
    let omega: Vec<f64> = (0..quarter).map(|i| 1.0 / 10000f64.powf(i as f64 / (d_model as f64 / 4.0))).collect();
    let mut table = Vec::with_capacity(grid_size * grid_size * d_model);
    for row in 0..grid_size {
        for col in 0..grid_size {
            for pos in [col as f64, row as f64] {
                table.extend(omega.iter().map(|w| (pos * w).sin() as f32));
                table.extend(omega.iter().map(|w| (pos * w).cos() as f32));
            }
        }
    }
    table
}

/// The sinusoidal timestep features of GLIDE/DiT: `[cos(t f), sin(t f)]`
/// (cos first), `f_i = exp(-ln(10000) * i / half)` computed in f32, with a
/// zero column appended for an odd `dim`.
///
/// # Shapes
/// - `t`: `[batch]` -> `[batch, dim]`
pub fn timestep_embedding<B: Backend>(t: Tensor<B, 1>, dim: usize) -> Tensor<B, 2> {
    let half = dim / 2;
    let ln = -(10000f64.ln() as f32);
    let freqs: Vec<f32> = (0..half).map(|i| (ln * i as f32 / half as f32).exp()).collect();
    let [n] = t.dims();
    let freqs = Tensor::<B, 1>::from_data(TensorData::new(freqs, [half]), &t.device());
    let args = t.unsqueeze_dim::<2>(1) * freqs.unsqueeze_dim(0); // [N, half]
    let mut parts = vec![args.clone().cos(), args.sin()];
    if dim % 2 == 1 {
        parts.push(Tensor::zeros([n, 1], &parts[0].device()));
    }
    Tensor::cat(parts, 1)
}

/// Timestep embedder: sinusoidal features, then `Linear(256, D) - SiLU - Linear(D, D)`.
#[derive(Module, Debug)]
pub struct TimestepEmbedder<B: Backend> {
    /// Official `t_embedder.mlp.0`.
    pub fc1: Linear<B>,
    /// Official `t_embedder.mlp.2`.
    pub fc2: Linear<B>,
}

impl<B: Backend> TimestepEmbedder<B> {
    /// The official initialisation: weights `N(0, 0.02)`, zero biases.
    pub fn new(d_model: usize, device: &B::Device) -> Self {
        let linear = |i: usize, o: usize| Linear {
            weight: Param::from_tensor(init::normal([i, o], 0.02, device)),
            bias: Some(Param::from_tensor(Tensor::zeros([o], device))),
        };
        Self { fc1: linear(FREQUENCY_EMBEDDING_SIZE, d_model), fc2: linear(d_model, d_model) }
    }

    /// Flow models receive `t` in `[0, 1]` as is; DDPM models the integer step.
    ///
    /// # Shapes
    /// - `t`: `[batch]` -> `[batch, d_model]`
    pub fn forward(&self, t: Tensor<B, 1>) -> Tensor<B, 2> {
        let features = timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE);
        linear(silu(linear(features, &self.fc1)), &self.fc2)
    }
}

/// Class-label embedding table; row `num_classes` is the null label of
/// classifier-free guidance (present when `class_dropout_prob > 0`).
/// Label dropout is not done here: the training step replaces labels by the
/// null label before the forward, so the forward stays pure.
#[derive(Module, Debug)]
pub struct LabelEmbedder<B: Backend> {
    /// `[num_classes (+1), d_model]` (official `y_embedder.embedding_table.weight`).
    pub embedding_table: Param<Tensor<B, 2>>,
}

impl<B: Backend> LabelEmbedder<B> {
    /// The official initialisation: `N(0, 0.02)`.
    pub fn new(rows: usize, d_model: usize, device: &B::Device) -> Self {
        Self { embedding_table: Param::from_tensor(init::normal([rows, d_model], 0.02, device)) }
    }

    /// # Shapes
    /// - `labels`: `[batch]` -> `[batch, d_model]`
    pub fn forward(&self, labels: Tensor<B, 1, Int>) -> Tensor<B, 2> {
        self.embedding_table.val().select(0, labels)
    }
}
