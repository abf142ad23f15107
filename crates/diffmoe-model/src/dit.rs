//! The DiT backbone shared by the four families (official `DiT` classes of
//! `models_DiT.py`, `models_TCDiT.py`, `models_ECDiT.py`, `models_DiffMoE.py`):
//! patches + fixed positions, timestep + label conditioning, adaLN-Zero blocks
//! with dense or MoE MLPs, final layer, unpatchify.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

use diffmoe_core::ExpertKind;
use diffmoe_core::{
    DiffMoeConfig, ExpertChoiceConfig, FeedForward, Mlp, Routing, RoutingStats, SwiGluMlp, ThresholdSync,
    TokenChoiceConfig,
};

use crate::attention::Attention;
use crate::block::{BlockMlp, DiTBlock, FinalLayer};
use crate::config::{DiTConfig, Family};
use crate::embedding::{sincos_pos_embed_2d, LabelEmbedder, PatchEmbed, TimestepEmbedder};

/// Which output channels classifier-free guidance mixes in [`DiT::forward_with_cfg`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CfgChannels {
    /// All predicted channels (`in_channels`): the standard guidance.
    All,
    /// Only the first `n`: the official `forward_with_cfg` hard-codes 3, so
    /// with 4 latent channels the last one is not guided (a DiT legacy quirk).
    First(usize),
}

/// Routing statistics of one MoE block.
#[derive(Debug, Clone)]
pub struct BlockRouting<B: Backend> {
    /// Index of the block.
    pub block: usize,
    /// What its MoE layer decided.
    pub stats: RoutingStats<B>,
}

/// The output of a forward pass.
#[derive(Debug, Clone)]
pub struct DiTOutput<B: Backend> {
    /// `[batch, out_channels, height, width]`.
    pub output: Tensor<B, 4>,
    /// One entry per MoE block, in block order.
    pub routing: Vec<BlockRouting<B>>,
}

/// Intermediate activations of a forward, for parity checks and inspection.
#[derive(Debug, Clone, Default)]
pub struct Activations<B: Backend> {
    /// `[batch, tokens, d_model]`: the patch embedding (before the positions are added).
    pub patch_embed: Option<Tensor<B, 3>>,
    /// `[batch, d_model]`.
    pub t_emb: Option<Tensor<B, 2>>,
    /// `[batch, d_model]`.
    pub y_emb: Option<Tensor<B, 2>>,
    /// `[batch, tokens, d_model]` after each block.
    pub blocks: Vec<Tensor<B, 3>>,
    /// `[batch, tokens, p * p * out_channels]`: the final layer before unpatchify.
    pub final_layer: Option<Tensor<B, 3>>,
}

/// A Diffusion Transformer of any family.
#[derive(Module, Debug)]
pub struct DiT<B: Backend> {
    /// Official `x_embedder`.
    pub x_embedder: PatchEmbed<B>,
    /// `[1, tokens, d_model]`: fixed sin-cos positions (not trained).
    pub pos_embed: Param<Tensor<B, 3>>,
    /// Official `t_embedder`.
    pub t_embedder: TimestepEmbedder<B>,
    /// Official `y_embedder`.
    pub y_embedder: LabelEmbedder<B>,
    /// Official `blocks`.
    pub blocks: Vec<DiTBlock<B>>,
    /// Official `final_layer`.
    pub final_layer: FinalLayer<B>,
    /// The configuration the model was built from.
    pub config: DiTConfig,
}

impl DiTConfig {
    /// A model with the official initialisation (`initialize_weights`):
    /// Xavier-uniform linears with zero biases, patch embedding like a linear,
    /// label table and timestep MLP `N(0, 0.02)`, adaLN and final layers zero
    /// (so every block starts as the identity and the output is zero), MoE
    /// gates `N(0, 0.006)` (TC: Kaiming-uniform).
    ///
    /// # Panics
    /// If the config is invalid: call [`DiTConfig::validate`] first.
    pub fn init<B: Backend>(&self, device: &B::Device) -> DiT<B> {
        if let Err(e) = self.validate() {
            panic!("invalid model config: {e}");
        }
        let d = self.hidden_size;
        let grid = self.input_size / self.patch_size;
        let pos = TensorData::new(sincos_pos_embed_2d(d, grid), [1, grid * grid, d]);
        let zero_linear = |i: usize, o: usize| Linear {
            weight: Param::from_tensor(Tensor::zeros([i, o], device)),
            bias: Some(Param::from_tensor(Tensor::zeros([o], device))),
        };
        let blocks = (0..self.depth)
            .map(|i| DiTBlock {
                adaln_modulation: zero_linear(d, 6 * d),
                attn: Attention::new(d, self.num_heads, self.head_dim(), device),
                mlp: self.block_mlp(i, device),
            })
            .collect();
        DiT {
            x_embedder: PatchEmbed::new(self.in_channels, self.patch_size, d, device),
            pos_embed: Param::from_tensor(Tensor::from_data(pos, device)).set_require_grad(false),
            t_embedder: TimestepEmbedder::new(d, device),
            y_embedder: LabelEmbedder::new(self.label_rows(), d, device),
            blocks,
            final_layer: FinalLayer {
                adaln_modulation: zero_linear(d, 2 * d),
                linear: zero_linear(d, self.patch_size * self.patch_size * self.out_channels()),
            },
            config: self.clone(),
        }
    }

    /// The freshly initialised MLP of block `i`: dense, or the MoE layer of the
    /// family where block `i` is an MoE block.
    pub fn block_mlp<B: Backend>(&self, i: usize, device: &B::Device) -> BlockMlp<B> {
        let (d, h) = (self.hidden_size, self.mlp_hidden());
        let moe = match (&self.moe, self.is_moe_block(i)) {
            (Some(moe), true) => moe,
            _ => {
                return BlockMlp::Dense(match self.mlp {
                    ExpertKind::Gelu => FeedForward::Gelu(Mlp::new(d, h, device)),
                    ExpertKind::SwiGlu => FeedForward::SwiGlu(SwiGluMlp::new(d, h, device)),
                })
            }
        };
        match self.family {
            Family::Dense => unreachable!("dense models have no MoE block"),
            Family::Tc => BlockMlp::TokenChoice(
                TokenChoiceConfig::new(d, h, moe.num_experts, moe.capacity as usize, self.mlp)
                    .with_n_shared_experts(moe.n_shared_experts)
                    .init(device),
            ),
            Family::Ec => BlockMlp::ExpertChoice(
                ExpertChoiceConfig::new(d, h, moe.num_experts, moe.capacity, self.mlp)
                    .with_n_shared_experts(moe.n_shared_experts.unwrap_or(0))
                    .init(device),
            ),
            Family::Diffmoe => BlockMlp::DiffMoe(
                DiffMoeConfig::new(d, h, moe.num_experts, moe.capacity, self.mlp)
                    .with_shared_expert(moe.n_shared_experts.unwrap_or(0) > 0)
                    .init(device),
            ),
        }
    }
}

impl<B: Backend> DiT<B> {
    /// Runs the network.
    ///
    /// # Shapes
    /// - `x`: `[batch, in_channels, input_size, input_size]`
    /// - `t`: `[batch]` (flow: `t` in `[0, 1]`; DDPM: the integer step as a float)
    /// - `y`: `[batch]` class labels; `num_classes` is the null label
    /// - output: `[batch, out_channels, input_size, input_size]`
    pub fn forward(&self, x: Tensor<B, 4>, t: Tensor<B, 1>, y: Tensor<B, 1, Int>, routing: Routing) -> DiTOutput<B> {
        self.run(x, t, y, routing, None)
    }

    /// [`Self::forward`], also returning the intermediate activations.
    pub fn forward_traced(
        &self,
        x: Tensor<B, 4>,
        t: Tensor<B, 1>,
        y: Tensor<B, 1, Int>,
        routing: Routing,
    ) -> (DiTOutput<B>, Activations<B>) {
        let mut trace = Activations::default();
        let out = self.run(x, t, y, routing, Some(&mut trace));
        (out, trace)
    }

    fn run(
        &self,
        x: Tensor<B, 4>,
        t: Tensor<B, 1>,
        y: Tensor<B, 1, Int>,
        routing: Routing,
        mut trace: Option<&mut Activations<B>>,
    ) -> DiTOutput<B> {
        let patches = self.x_embedder.forward(x); // [N, T, D]
        if let Some(tr) = trace.as_deref_mut() {
            tr.patch_embed = Some(patches.clone());
        }
        // As `[N, T * D] + [1, T * D]`: burn-flex broadcasts a leading axis
        // in its vectorised path, and a stride-0 axis before two real ones
        // element by element.
        let [n, tokens, d] = patches.dims();
        let pos = self.pos_embed.val().reshape([1, tokens * d]);
        let mut h = (patches.reshape([n, tokens * d]) + pos).reshape([n, tokens, d]); // [N, T, D]
        let t_emb = self.t_embedder.forward(t); // [N, D]
        let y_emb = self.y_embedder.forward(y); // [N, D]
        if let Some(tr) = trace.as_deref_mut() {
            tr.t_emb = Some(t_emb.clone());
            tr.y_emb = Some(y_emb.clone());
        }
        let c = t_emb + y_emb; // [N, D]
        let mut stats = Vec::new();
        for (i, block) in self.blocks.iter().enumerate() {
            let (out, s) = block.forward(h, c.clone(), routing);
            h = out;
            if let Some(tr) = trace.as_deref_mut() {
                tr.blocks.push(h.clone());
            }
            if let Some(s) = s {
                stats.push(BlockRouting { block: i, stats: s });
            }
        }
        let h = self.final_layer.forward(h, c); // [N, T, p*p*C_out]
        if let Some(tr) = trace {
            tr.final_layer = Some(h.clone());
        }
        DiTOutput { output: self.unpatchify(h), routing: stats }
    }

    /// Tokens back to an image; within a token the channel varies fastest:
    /// `(row_in_patch * p + col_in_patch) * C + c`.
    ///
    /// # Shapes
    /// - `x`: `[batch, tokens, p * p * C]` -> `[batch, C, h * p, w * p]`
    pub fn unpatchify(&self, x: Tensor<B, 3>) -> Tensor<B, 4> {
        let [n, tokens, _] = x.dims();
        let c = self.config.out_channels();
        let p = self.config.patch_size;
        let g = (tokens as f64).sqrt().round() as usize;
        assert_eq!(g * g, tokens, "unpatchify needs a square token grid");
        x.reshape([n, g, g, p, p, c])
            .permute([0, 5, 1, 3, 2, 4]) // [N, C, h, p, w, p]
            .reshape([n, c, g * p, g * p])
    }

    /// The official `forward_with_cfg`: the first half of `x` is duplicated
    /// (the second half is ignored), `t` and `y` are used as given, and the
    /// guided prediction `uncond + scale * (cond - uncond)` of the chosen
    /// channels is copied into both halves; other channels stay raw. The
    /// routing statistics are those of the one batched forward (both halves).
    ///
    /// # Shapes
    /// - `x`: `[2n, in_channels, H, W]`, `t`: `[2n]`, `y`: `[2n]` (cond labels, then null labels)
    /// - output: `[2n, out_channels, H, W]`
    pub fn forward_with_cfg(
        &self,
        x: Tensor<B, 4>,
        t: Tensor<B, 1>,
        y: Tensor<B, 1, Int>,
        cfg_scale: f64,
        channels: CfgChannels,
        routing: Routing,
    ) -> DiTOutput<B> {
        let [batch, ..] = x.dims();
        let half = x.narrow(0, 0, batch / 2);
        let DiTOutput { output: out, routing } = self.forward(Tensor::cat(vec![half.clone(), half], 0), t, y, routing);
        let [_, out_channels, ..] = out.dims();
        let guided = match channels {
            CfgChannels::All => self.config.in_channels,
            CfgChannels::First(n) => n,
        }
        .min(out_channels);
        let eps = out.clone().narrow(1, 0, guided);
        let cond = eps.clone().narrow(0, 0, batch / 2);
        let uncond = eps.narrow(0, batch / 2, batch / 2);
        let mixed = uncond.clone() + (cond - uncond).mul_scalar(cfg_scale);
        let eps = Tensor::cat(vec![mixed.clone(), mixed], 0);
        let output = if guided == out_channels {
            eps
        } else {
            Tensor::cat(vec![eps, out.narrow(1, guided, out_channels - guided)], 1)
        };
        DiTOutput { output, routing }
    }

    /// Applies the threshold EMA of every DiffMoE block from a train-routing
    /// forward's statistics, averaged across replicas by `sync`; other blocks
    /// are left as they are.
    pub fn with_updated_thresholds(mut self, routing: &[BlockRouting<B>], sync: &impl ThresholdSync<B>) -> Self {
        for r in routing {
            let block = self.blocks.remove(r.block);
            let block = DiTBlock {
                mlp: match block.mlp {
                    BlockMlp::DiffMoe(layer) => BlockMlp::DiffMoe(layer.with_updated_thresholds(&r.stats, sync)),
                    other => other,
                },
                ..block
            };
            self.blocks.insert(r.block, block);
        }
        self
    }

    /// The per-expert thresholds of every DiffMoE block, by block index.
    ///
    /// # Shapes
    /// - each: `[n_experts]`
    pub fn thresholds(&self) -> Vec<(usize, Tensor<B, 1>)> {
        self.blocks
            .iter()
            .enumerate()
            .filter_map(|(i, block)| match &block.mlp {
                BlockMlp::DiffMoe(layer) => Some((i, layer.expert_threshold.val())),
                _ => None,
            })
            .collect()
    }

    /// Sets the training capacity of every DiffMoE and EC layer (the official
    /// capacity schedule writes it to every block before each step).
    pub fn with_capacity(mut self, capacity: f64) -> Self {
        for block in &mut self.blocks {
            match &mut block.mlp {
                BlockMlp::DiffMoe(layer) => layer.capacity = capacity,
                BlockMlp::ExpertChoice(layer) => layer.capacity = capacity,
                _ => {}
            }
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preset::preset;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    #[test]
    fn official_init_makes_the_output_zero() {
        let config = preset("diffmoe-tiny-e8-ddpm").unwrap().model;
        let model = config.init::<Flex>(&Default::default());
        let device = Default::default();
        let x = Tensor::<Flex, 4>::random([2, 1, 32, 32], Distribution::Default, &device);
        let t = Tensor::<Flex, 1>::from_floats([3.0, 500.0], &device);
        let y = Tensor::<Flex, 1, Int>::from_ints([1, 10], &device);
        let out = model.forward(x, t, y, Routing::Train);
        assert_eq!(out.output.dims(), [2, 2, 32, 32]);
        assert_eq!(out.routing.len(), 3);
        let max: f32 = out.output.abs().max().into_scalar();
        assert_eq!(max, 0.0);
    }

    #[test]
    fn unpatchify_inverts_patch_order() {
        let config = preset("dense-dit-tiny-flow").unwrap().model;
        let model = config.init::<Flex>(&Default::default());
        let device = Default::default();
        // Token j holds value j in every entry: each p x p patch of the image is constant.
        let tokens = config.tokens();
        let p = config.patch_size;
        let vals: Vec<f32> = (0..tokens).flat_map(|j| std::iter::repeat_n(j as f32, p * p)).collect();
        let img = model.unpatchify(Tensor::<Flex, 3>::from_data(TensorData::new(vals, [1, tokens, p * p]), &device));
        let g = config.input_size / p;
        let data: Vec<f32> = img.into_data().to_vec().unwrap();
        for r in 0..config.input_size {
            for c in 0..config.input_size {
                assert_eq!(data[r * config.input_size + c], ((r / p) * g + c / p) as f32);
            }
        }
    }
}
