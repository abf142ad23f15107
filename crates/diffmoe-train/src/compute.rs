//! Where the compute of a sampling run goes (DiffMoE Sec. 4, Fig. 1(c) and
//! 1(d)): for every sampling step and every class, how many expert-token
//! evaluations the MoE layers made and how many parameters a token passed
//! through on average.
//!
//! A [`ComputeRecorder`] watches every network call of a sampler (it is a
//! [`CallObserver`]) and reads each sample's share of the routing: the
//! selection mask summed over the sample's tokens and the experts, per MoE
//! block (one small host read per call). Counts are aggregated as they come,
//! by step and label, so memory does not grow with the number of samples.
//! [`ComputeRecorder::report`] turns them into [`ComputeReport`]: activated
//! parameters per token are every non-expert parameter plus, per MoE block,
//! the routed experts a token met on average times one expert's parameters
//! ([`ParamReport::activated_with`]).
//!
//! Rows are keyed by the label the network received: with classifier-free
//! guidance the unconditional passes are their own row (`unconditional`).

use std::cell::RefCell;
use std::collections::BTreeMap;

use burn::tensor::{backend::Backend, Int, Tensor};
use serde::Serialize;

use diffmoe_model::{DiTConfig, DiTOutput, ParamReport};

use crate::sampler::CallObserver;

/// How network calls are grouped into sampling steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepAxis {
    /// Every distinct time the network receives is a step, in sampling
    /// order: ascending for flow (`t = 0` is noise), descending for DDPM
    /// (the step counts down). A Heun step's second evaluation is the next
    /// step's time.
    Times {
        /// Whether sampling runs from high to low times (DDPM).
        descending: bool,
    },
    /// `n` equal bins of the flow time `[0, 1]`, for adaptive solvers whose
    /// samples each take their own times.
    Bins(usize),
}

/// The label a row of the report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClassKey {
    /// A class label.
    Class(usize),
    /// The null label of classifier-free guidance's unconditional passes.
    Unconditional,
}

/// Counts of one group of sample evaluations.
#[derive(Debug, Clone, Default)]
struct Tally {
    /// (sample, network call) pairs.
    evaluations: usize,
    /// Sum of the times the network received.
    t_sum: f64,
    /// Expert-token evaluations per MoE block.
    expert_tokens: Vec<f64>,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.evaluations += other.evaluations;
        self.t_sum += other.t_sum;
        if self.expert_tokens.len() < other.expert_tokens.len() {
            self.expert_tokens.resize(other.expert_tokens.len(), 0.0);
        }
        for (a, b) in self.expert_tokens.iter_mut().zip(&other.expert_tokens) {
            *a += b;
        }
    }
}

/// A step key that orders like the time: the f32 bits of a non-negative
/// time, or a bin index.
type StepKey = u64;

/// Records the routing of every network call of a sampling run.
#[derive(Debug)]
pub struct ComputeRecorder {
    axis: StepAxis,
    num_classes: usize,
    tokens: usize,
    state: RefCell<Recorded>,
}

#[derive(Debug, Default)]
struct Recorded {
    /// The MoE blocks, in the order of the routing statistics.
    blocks: Vec<usize>,
    tallies: BTreeMap<(StepKey, ClassKey), Tally>,
    calls: usize,
}

impl ComputeRecorder {
    /// A recorder for a model of `config`, grouping steps by `axis`.
    pub fn new(config: &DiTConfig, axis: StepAxis) -> Self {
        Self { axis, num_classes: config.num_classes, tokens: config.tokens(), state: RefCell::default() }
    }

    fn step_key(&self, t: f64) -> StepKey {
        match self.axis {
            StepAxis::Times { .. } => (t.max(0.0) as f32).to_bits() as u64,
            StepAxis::Bins(n) => ((t.clamp(0.0, 1.0) * n as f64) as u64).min(n.max(1) as u64 - 1),
        }
    }

    /// Network calls seen so far.
    pub fn calls(&self) -> usize {
        self.state.borrow().calls
    }

    /// The report, with activated parameters from `params` (the report of
    /// the same config).
    pub fn report(&self, params: &ParamReport) -> ComputeReport {
        let state = self.state.borrow();
        let layers = state.blocks.len();
        let row = |tally: &Tally, step: Option<usize>, class: Option<ClassKey>| {
            let tokens = (tally.evaluations * self.tokens) as f64;
            let per_token: Vec<f64> =
                (0..layers).map(|l| tally.expert_tokens.get(l).copied().unwrap_or(0.0) / tokens.max(1.0)).collect();
            let by_block: BTreeMap<usize, f64> = state.blocks.iter().copied().zip(per_token.iter().copied()).collect();
            ComputeRow {
                step,
                t: step.map(|_| tally.t_sum / tally.evaluations.max(1) as f64),
                class,
                evaluations: tally.evaluations,
                expert_token_evaluations: tally.expert_tokens.iter().sum(),
                experts_per_token: per_token,
                activated_parameters_per_token: params.activated_with(|b| by_block.get(&b).copied()),
            }
        };

        let mut steps: BTreeMap<StepKey, Tally> = BTreeMap::new();
        let mut classes: BTreeMap<ClassKey, Tally> = BTreeMap::new();
        let mut total = Tally::default();
        for ((step, class), tally) in &state.tallies {
            steps.entry(*step).or_default().add(tally);
            classes.entry(*class).or_default().add(tally);
            total.add(tally);
        }
        let mut step_keys: Vec<StepKey> = steps.keys().copied().collect();
        if matches!(self.axis, StepAxis::Times { descending: true }) {
            step_keys.reverse();
        }
        let index: BTreeMap<StepKey, usize> = step_keys.iter().enumerate().map(|(i, k)| (*k, i)).collect();
        let per_step = step_keys.iter().enumerate().map(|(i, k)| row(&steps[k], Some(i), None)).collect();
        let per_class = classes.iter().map(|(c, tally)| row(tally, None, Some(*c))).collect();
        let per_class_per_step = classes
            .keys()
            .map(|&class| {
                let mut activated = vec![None; step_keys.len()];
                for ((step, c), tally) in &state.tallies {
                    if *c == class {
                        activated[index[step]] = Some(row(tally, None, None).activated_parameters_per_token);
                    }
                }
                ClassSeries { class, activated_parameters_per_token: activated }
            })
            .collect();
        let overall = row(&total, None, None);
        ComputeReport {
            step_axis: self.axis,
            tokens_per_image: self.tokens,
            moe_blocks: state.blocks.clone(),
            total_parameters: params.total,
            activated_parameters_at_training_capacity: params.activated,
            network_calls: state.calls,
            evaluations: total.evaluations,
            expert_token_evaluations: overall.expert_token_evaluations,
            experts_per_token: overall.experts_per_token,
            activated_parameters_per_token: overall.activated_parameters_per_token,
            per_step,
            per_class,
            per_class_per_step,
        }
    }
}

impl<B: Backend> CallObserver<B> for ComputeRecorder {
    fn observe(&self, t: &Tensor<B, 1>, y: &Tensor<B, 1, Int>, out: &DiTOutput<B>) {
        let [batch] = t.dims();
        let times: Vec<f64> = t.to_data().iter::<f64>().collect();
        let labels: Vec<i64> = y.to_data().iter::<i64>().collect();
        let layers = out.routing.len();
        // Each sample's expert-token evaluations per MoE block: one host read.
        let counts: Vec<f64> = if layers == 0 {
            Vec::new()
        } else {
            let per_layer = out
                .routing
                .iter()
                .map(|r| r.stats.selection_mask.clone().sum_dim(2).sum_dim(1).reshape([batch, 1]))
                .collect();
            Tensor::cat(per_layer, 1).into_data().iter::<f64>().collect() // [batch, layers]
        };
        let mut state = self.state.borrow_mut();
        if state.blocks.is_empty() {
            state.blocks = out.routing.iter().map(|r| r.block).collect();
        }
        state.calls += 1;
        for i in 0..batch {
            let class = match usize::try_from(labels[i]) {
                Ok(c) if c < self.num_classes => ClassKey::Class(c),
                _ => ClassKey::Unconditional,
            };
            let tally = state.tallies.entry((self.step_key(times[i]), class)).or_default();
            tally.evaluations += 1;
            tally.t_sum += times[i];
            tally.expert_tokens.resize(layers, 0.0);
            for l in 0..layers {
                tally.expert_tokens[l] += counts[i * layers + l];
            }
        }
    }
}

/// One row of a [`ComputeReport`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ComputeRow {
    /// The step, in sampling order (per-step rows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<usize>,
    /// The mean time the network received in this step (per-step rows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub t: Option<f64>,
    /// The label (per-class rows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<ClassKey>,
    /// (sample, network call) pairs.
    pub evaluations: usize,
    /// Tokens processed by a routed expert, summed over experts and MoE blocks.
    pub expert_token_evaluations: f64,
    /// Per MoE block: routed experts a token passed through on average.
    pub experts_per_token: Vec<f64>,
    /// Parameters a token passed through on average.
    pub activated_parameters_per_token: f64,
}

/// One label's activated parameters per token at every step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassSeries {
    /// The label.
    pub class: ClassKey,
    /// By step (`None` where the label had no evaluation at that step).
    pub activated_parameters_per_token: Vec<Option<f64>>,
}

/// Where the compute of a sampling run went (`diffmoe sample --stats`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ComputeReport {
    /// How calls were grouped into steps.
    pub step_axis: StepAxis,
    /// Tokens per image.
    pub tokens_per_image: usize,
    /// The MoE blocks, in the order of `experts_per_token`.
    pub moe_blocks: Vec<usize>,
    /// All parameters of the model.
    pub total_parameters: usize,
    /// Parameters activated per token at the training capacity.
    pub activated_parameters_at_training_capacity: f64,
    /// Forward passes of the network.
    pub network_calls: usize,
    /// (sample, network call) pairs.
    pub evaluations: usize,
    /// Tokens processed by a routed expert, over the whole run.
    pub expert_token_evaluations: f64,
    /// Per MoE block: routed experts a token passed through on average.
    pub experts_per_token: Vec<f64>,
    /// Parameters a token passed through on average over the whole run.
    pub activated_parameters_per_token: f64,
    /// By sampling step (all labels).
    pub per_step: Vec<ComputeRow>,
    /// By label (all steps).
    pub per_class: Vec<ComputeRow>,
    /// By label and step.
    pub per_class_per_step: Vec<ClassSeries>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, TensorData};
    use diffmoe_core::Routing;
    use diffmoe_model::preset;

    type B = Flex;

    #[test]
    fn counts_follow_the_routing_and_group_by_step_and_label() {
        let config = preset("diffmoe-tiny-e8-flow").unwrap().model;
        let device = Default::default();
        let model = config.init::<B>(&device);
        let recorder = ComputeRecorder::new(&config, StepAxis::Times { descending: false });
        let x = Tensor::<B, 4>::random([3, 1, 32, 32], Distribution::Default, &device);
        for step in 0..2 {
            let t = Tensor::<B, 1>::full([3], step as f64 / 2.0, &device);
            let y = Tensor::<B, 1, Int>::from_data(TensorData::new(vec![1i64, 4, 10], [3]), &device);
            let out = model.forward(x.clone(), t.clone(), y.clone(), Routing::Static);
            recorder.observe(&t, &y, &out);
        }
        let params = ParamReport::from_config(&config);
        let report = recorder.report(&params);
        assert_eq!(report.network_calls, 2);
        assert_eq!(report.evaluations, 6);
        assert_eq!(report.moe_blocks, vec![1, 3, 5]);
        // Static routing at capacity 1: every expert takes S / E tokens, so a
        // token meets one expert per block on average over the batch.
        for e in &report.experts_per_token {
            assert!((e - 1.0).abs() < 1e-9, "{e}");
        }
        assert!((report.activated_parameters_per_token - params.activated).abs() < 1e-3);
        assert_eq!(report.per_step.len(), 2);
        assert_eq!(report.per_step[1].t, Some(0.5));
        let classes: Vec<ClassKey> = report.per_class.iter().map(|r| r.class.unwrap()).collect();
        assert_eq!(classes, vec![ClassKey::Class(1), ClassKey::Class(4), ClassKey::Unconditional]);
        assert_eq!(report.per_class_per_step.len(), 3);
        assert!(report.per_class_per_step.iter().all(|s| s.activated_parameters_per_token.iter().all(Option::is_some)));
        let total: f64 = report.per_class.iter().map(|r| r.expert_token_evaluations).sum();
        assert!((total - report.expert_token_evaluations).abs() < 1e-9);
        // 2 calls x 3 samples x 16 tokens... per block, S tokens are taken once each.
        assert!((report.expert_token_evaluations - 2.0 * 3.0 * 3.0 * 256.0).abs() < 1e-9);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["per_class"][2]["class"], "unconditional");
        assert_eq!(json["per_class"][0]["class"]["class"], 1);
    }

    #[test]
    fn bins_and_descending_times_order_steps_as_sampling_runs() {
        let config = preset("dense-dit-tiny-flow").unwrap().model;
        let bins = ComputeRecorder::new(&config, StepAxis::Bins(4));
        assert_eq!(bins.step_key(0.0), 0);
        assert_eq!(bins.step_key(0.26), 1);
        assert_eq!(bins.step_key(1.0), 3);
        let times = ComputeRecorder::new(&config, StepAxis::Times { descending: true });
        assert!(times.step_key(999.0) > times.step_key(111.0));
    }
}
