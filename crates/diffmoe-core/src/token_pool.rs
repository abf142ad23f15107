//! The token pool: a batch `[batch, tokens, d_model]` flattened into
//! `[batch * tokens, d_model]` rows in token-major order (`s = n * tokens + t`),
//! as the official DiffMoE `forward_train` does, with the gather/scatter
//! dispatch shared by every expert-routed layer.

use burn::tensor::{backend::Backend, IndexingUpdateOp, Int, Tensor};

use crate::dispatch::{combine, gather_rows};
use crate::expert_bank::ExpertBank;
use crate::routing::RoutingStats;

/// A flattened batch of tokens.
#[derive(Debug, Clone)]
pub struct TokenPool<B: Backend> {
    /// `[batch * tokens, d_model]`.
    pub x: Tensor<B, 2>,
    /// Samples in the batch.
    pub batch: usize,
    /// Tokens per sample.
    pub tokens: usize,
}

impl<B: Backend> TokenPool<B> {
    /// # Shapes
    /// - `x`: `[batch, tokens, d_model]`
    pub fn new(x: Tensor<B, 3>) -> Self {
        let [batch, tokens, d_model] = x.dims();
        Self { x: x.reshape([batch * tokens, d_model]), batch, tokens }
    }

    /// Number of tokens in the pool (`S = batch * tokens`).
    pub fn len(&self) -> usize {
        self.batch * self.tokens
    }

    /// Whether the pool is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Gathers the rows `indices[e]` for expert `e`, runs all experts in one
    /// batched matmul, weights each output row and sums the rows back into
    /// their tokens. Memory grows with `n_experts * k * d_model`, never with
    /// `n_experts * S * d_model`.
    ///
    /// # Shapes
    /// - `indices`: `[n_experts, k]` pool rows, `weights`: `[n_experts, k]`
    /// - returns `[batch * tokens, d_model]`
    pub fn dispatch(&self, experts: &ExpertBank<B>, indices: Tensor<B, 2, Int>, weights: Tensor<B, 2>) -> Tensor<B, 2> {
        let d_model = self.x.dims()[1];
        let zeros = Tensor::zeros([self.len(), d_model], &self.x.device());
        self.dispatch_into(zeros, indices, weights, |inputs| experts.forward(inputs))
    }

    /// [`Self::dispatch`] over padded slots: expert `e` holds its tokens in
    /// its first `filled[e]` slots, and the slots past them are weighted by
    /// zero. Runs over the slot axis in chunks of at most `chunk` slots,
    /// each one batched matmul over all experts, summed into one output: in
    /// inference the intermediates of a chunk are `n_experts * chunk` rows
    /// whatever `k` is (under autodiff every chunk's are kept for the
    /// backward pass: pass `chunk = k`). A chunk where every expert's slots
    /// are padding is skipped, and in inference on the CPU backend the
    /// padding of the others is not computed ([`ExpertBank::forward_filled`]).
    ///
    /// # Shapes
    /// - `indices`: `[n_experts, k]` pool rows, `weights`: `[n_experts, k]`,
    ///   `filled`: `n_experts` counts `<= k`
    /// - returns `[batch * tokens, d_model]`
    pub fn dispatch_padded(
        &self,
        experts: &ExpertBank<B>,
        indices: Tensor<B, 2, Int>,
        weights: Tensor<B, 2>,
        filled: &[usize],
        chunk: usize,
    ) -> Tensor<B, 2> {
        let [_, k] = indices.dims();
        let d_model = self.x.dims()[1];
        let chunk = chunk.max(1);
        (0..k).step_by(chunk).fold(Tensor::zeros([self.len(), d_model], &self.x.device()), |acc, start| {
            let len = chunk.min(k - start);
            let filled: Vec<usize> = filled.iter().map(|&f| f.saturating_sub(start).min(len)).collect();
            if filled.iter().all(|&f| f == 0) {
                return acc;
            }
            self.dispatch_into(
                acc,
                indices.clone().narrow(1, start, len),
                weights.clone().narrow(1, start, len),
                |inputs| experts.forward_filled(inputs, &filled),
            )
        })
    }

    /// `acc` plus the weighted outputs of `experts` on the rows `indices`,
    /// summed into their tokens.
    fn dispatch_into(
        &self,
        acc: Tensor<B, 2>,
        indices: Tensor<B, 2, Int>,
        weights: Tensor<B, 2>,
        experts: impl FnOnce(Tensor<B, 3>) -> Tensor<B, 3>,
    ) -> Tensor<B, 2> {
        let [n_experts, k] = indices.dims();
        let d_model = self.x.dims()[1];
        let flat = indices.reshape([n_experts * k]);
        let inputs = gather_rows(self.x.clone(), flat.clone()).reshape([n_experts, k, d_model]);
        let outputs = experts(inputs).reshape([n_experts * k, d_model]);
        combine(acc, flat, outputs, weights.reshape([n_experts * k]))
    }

    /// Scatters per-expert values into an expert-major `[n_experts, S]` map
    /// (zeros elsewhere).
    ///
    /// # Shapes
    /// - `indices`, `values`: `[n_experts, k]` -> `[n_experts, batch * tokens]`
    pub fn scatter_expert_major(&self, indices: Tensor<B, 2, Int>, values: Tensor<B, 2>) -> Tensor<B, 2> {
        let n_experts = indices.dims()[0];
        Tensor::zeros([n_experts, self.len()], &self.x.device()).scatter(1, indices, values, IndexingUpdateOp::Add)
    }

    /// Routing statistics of an expert-choice routing: expert `e` processed
    /// pool row `indices[e, j]` where `valid[e, j]` is 1, with weight
    /// `weights[e, j]`. Only `selection_mask`, `combine_weights` and
    /// `tokens_per_expert` are filled in.
    ///
    /// # Shapes
    /// - `indices`, `weights`, `valid`: `[n_experts, k]`
    pub fn expert_choice_stats(
        &self,
        indices: Tensor<B, 2, Int>,
        weights: Tensor<B, 2>,
        valid: Tensor<B, 2>,
    ) -> RoutingStats<B> {
        let n_experts = indices.dims()[0];
        let mask = self.scatter_expert_major(indices.clone(), valid); // [E, S]
        let combine = self.scatter_expert_major(indices, weights.detach()); // [E, S]
        let tokens_per_expert = mask.clone().sum_dim(1).reshape([n_experts]).int();
        RoutingStats {
            selection_mask: self.token_major(mask),
            combine_weights: self.token_major(combine),
            tokens_per_expert,
            k: None,
            capacity_logits: None,
            threshold_quantile: None,
            aux_loss: None,
        }
    }

    /// # Shapes
    /// - `y`: `[batch * tokens, d]` -> `[batch, tokens, d]`
    pub fn unflatten(&self, y: Tensor<B, 2>) -> Tensor<B, 3> {
        let d = y.dims()[1];
        y.reshape([self.batch, self.tokens, d])
    }

    /// An expert-major map back to the token-major layout of the fixtures.
    ///
    /// # Shapes
    /// - `m`: `[n_experts, batch * tokens]` -> `[batch, tokens, n_experts]`
    pub fn token_major(&self, m: Tensor<B, 2>) -> Tensor<B, 3> {
        self.unflatten(m.transpose())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::expert_bank::{ExpertBank, ExpertKind};
    use burn::backend::{Autodiff, Flex};
    use burn::module::AutodiffModule;
    use burn::tensor::TensorData;

    #[test]
    fn dispatch_sums_each_expert_output_into_its_token() {
        let device = Default::default();
        let experts = ExpertBank::<Flex>::new(ExpertKind::Gelu, 2, 4, 8, &device);
        let x = Tensor::<Flex, 3>::random([1, 3, 4], burn::tensor::Distribution::Default, &device);
        let pool = TokenPool::new(x.clone());
        // Expert 0 takes tokens {2, 0}, expert 1 takes {0, 1}.
        let idx = Tensor::<Flex, 2, Int>::from_data(TensorData::from([[2i64, 0], [0, 1]]), &device);
        let w = Tensor::<Flex, 2>::from_data(TensorData::from([[0.5f32, 0.25], [1.0, 2.0]]), &device);
        let y = pool.dispatch(&experts, idx, w);
        // Reference: run every expert on every token, weight densely.
        let all = experts.forward(pool.x.clone().unsqueeze_dim::<3>(0).repeat_dim(0, 2)); // [2, 3, 4]
        let dense_w = Tensor::<Flex, 2>::from_data(TensorData::from([[0.25f32, 0.0, 0.5], [1.0, 2.0, 0.0]]), &device);
        let expected = (all * dense_w.unsqueeze_dim(2)).sum_dim(0).squeeze_dim::<2>(0);
        y.into_data().assert_approx_eq::<f32>(&expected.clone().into_data(), burn::tensor::Tolerance::default());
        for chunk in [1, 2, 5] {
            let idx = Tensor::<Flex, 2, Int>::from_data(TensorData::from([[2i64, 0], [0, 1]]), &device);
            let w = Tensor::<Flex, 2>::from_data(TensorData::from([[0.5f32, 0.25], [1.0, 2.0]]), &device);
            let y = pool.dispatch_padded(&experts, idx, w, &[2, 2], chunk);
            y.into_data().assert_approx_eq::<f32>(&expected.clone().into_data(), burn::tensor::Tolerance::default());
        }
    }

    #[test]
    fn padded_dispatch_skips_the_padding_on_every_backend_path() {
        type Ad = Autodiff<Flex>;
        let device = Default::default();
        let ad_experts = ExpertBank::<Ad>::new(ExpertKind::SwiGlu, 3, 4, 8, &device);
        let experts = ad_experts.valid();
        let x = Tensor::<Flex, 3>::random([2, 3, 4], burn::tensor::Distribution::Default, &device);
        // Expert 0 takes tokens {4, 1, 5}, expert 1 {3}, expert 2 none; the
        // other slots are padding (row 0, weight 0). With one slot per chunk
        // the last chunk is padding only.
        let idx = Tensor::<Flex, 2, Int>::from_data(TensorData::from([[4i64, 1, 5, 0], [3, 0, 0, 0], [0; 4]]), &device);
        let w = Tensor::<Flex, 2>::from_data(
            TensorData::from([[0.5f32, 0.25, 2.0, 0.0], [1.5, 0.0, 0.0, 0.0], [0.0; 4]]),
            &device,
        );
        let filled = [3, 1, 0];
        let pool = TokenPool::new(x.clone());
        let expected = pool.dispatch(&experts, idx.clone(), w.clone()).into_data();
        for chunk in [1, 2, 3, 4] {
            let y = pool.dispatch_padded(&experts, idx.clone(), w.clone(), &filled, chunk);
            y.into_data().assert_approx_eq::<f32>(&expected, burn::tensor::Tolerance::default());
        }
        // Under autodiff the products are whole.
        let ad_pool = TokenPool::new(Tensor::<Ad, 3>::from_inner(x));
        let y = ad_pool.dispatch_padded(&ad_experts, Tensor::from_inner(idx), Tensor::from_inner(w), &filled, 2);
        y.inner().into_data().assert_approx_eq::<f32>(&expected, burn::tensor::Tolerance::default());
    }
}
