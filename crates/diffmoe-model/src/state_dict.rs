//! State dicts under the official PyTorch names: the one table that maps
//! every parameter and buffer of [`DiT`] to its official key and layout.
//!
//! Two layout differences exist: burn's `Linear` stores `[d_input, d_output]`
//! where PyTorch stores `[d_output, d_input]`, and experts are stacked here
//! (`[n_experts, d_model, d_hidden]`) where the official code keeps one module
//! per expert (`experts.{i}.fc1.weight`, `[d_hidden, d_model]`).

use std::collections::BTreeMap;

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::{backend::Backend, Tensor, TensorData};

use diffmoe_core::{
    CapacityPredictor, DiffMoeLayer, ExpertBank, ExpertChoiceLayer, FeedForward, Mlp, SwiGluMlp, TokenChoiceLayer,
};
use diffmoe_weights::{transpose_matrix, HostTensor};

use crate::block::BlockMlp;
use crate::config::{family_key, DiTConfig, Family};
use crate::dit::DiT;
use crate::error::ImportError;

/// Named tensors under the official names.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StateDict {
    /// Name to tensor.
    pub tensors: BTreeMap<String, HostTensor>,
}

impl StateDict {
    /// The official state dict of a model (what `model.state_dict()` of the
    /// official code holds).
    pub fn from_model<B: Backend>(model: &DiT<B>) -> Self {
        let mut model = model.clone();
        let mut out = Self::default();
        for entry in entries(&mut model) {
            entry.export(&mut out);
        }
        out
    }

    /// Builds a model of `config` from these tensors. Every key the model needs
    /// must be present with the right shape and no other key may be present;
    /// otherwise the error names the key and both shapes and nothing is built.
    pub fn to_model<B: Backend>(&self, config: &DiTConfig, device: &B::Device) -> Result<DiT<B>, ImportError> {
        config.validate()?;
        check_family(self, config.family)?;
        let mut model = config.init::<B>(device);
        let mut used = 0usize;
        {
            let mut all = entries(&mut model);
            // Validate everything before touching a parameter.
            for entry in &all {
                used += entry.check(self)?;
            }
            if used != self.tensors.len() {
                let expected: std::collections::HashSet<String> = all.iter().flat_map(|e| e.names()).collect();
                let mut extra = self.tensors.iter().filter(|(k, _)| !expected.contains(*k));
                if let Some((key, t)) = extra.next() {
                    return Err(ImportError::UnexpectedKey {
                        key: key.clone(),
                        shape: t.shape.clone(),
                        more: extra.count(),
                    });
                }
            }
            for entry in &mut all {
                entry.import(self, device);
            }
        }
        Ok(model)
    }

    /// The tensor of that name.
    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        self.tensors.get(name)
    }

    /// Total number of values.
    pub fn numel(&self) -> usize {
        self.tensors.values().map(|t| t.data.len()).sum()
    }
}

/// Which family a state dict's keys reveal, with the revealing key.
pub(crate) fn sniff_family(sd: &StateDict) -> (Family, Option<String>) {
    for key in sd.tensors.keys() {
        if key.contains(".mlp.capacity_predictor.") {
            return (Family::Diffmoe, Some(key.clone()));
        }
    }
    for key in sd.tensors.keys() {
        if key.ends_with(".mlp.gate.weight") {
            return (Family::Tc, Some(key.clone()));
        }
        if key.ends_with(".mlp.gate_weight") {
            return (Family::Ec, Some(key.clone()));
        }
    }
    (Family::Dense, None)
}

fn check_family(sd: &StateDict, expected: Family) -> Result<(), ImportError> {
    let (found, key) = sniff_family(sd);
    if found != expected {
        let key = key.unwrap_or_else(|| "blocks.*.mlp (no expert keys)".to_string());
        return Err(ImportError::WrongFamily {
            expected: family_key(expected).to_string(),
            found: family_key(found).to_string(),
            key,
        });
    }
    Ok(())
}

/// A parameter of any rank.
enum Slot<'a, B: Backend> {
    R1(&'a mut Param<Tensor<B, 1>>),
    R2(&'a mut Param<Tensor<B, 2>>),
    R3(&'a mut Param<Tensor<B, 3>>),
    R4(&'a mut Param<Tensor<B, 4>>),
}

/// How the official tensor relates to ours.
#[derive(Clone, Copy)]
enum Layout {
    /// Same shape and order.
    Same,
    /// A 2-D tensor transposed (burn `Linear` weights).
    Transposed,
    /// `[n_experts, ...]` stacked here, one official key per expert, each
    /// in the official shape and order.
    PerExpert,
}

struct Entry<'a, B: Backend> {
    /// Official name; for `PerExpert`, `prefix|suffix` around the expert index.
    name: String,
    slot: Slot<'a, B>,
    layout: Layout,
}

impl<B: Backend> Entry<'_, B> {
    fn host(&self) -> HostTensor {
        match &self.slot {
            Slot::R1(p) => HostTensor::from_tensor(p.val()),
            Slot::R2(p) => HostTensor::from_tensor(p.val()),
            Slot::R3(p) => HostTensor::from_tensor(p.val()),
            Slot::R4(p) => HostTensor::from_tensor(p.val()),
        }
    }

    fn shape(&self) -> Vec<usize> {
        match &self.slot {
            Slot::R1(p) => p.dims().to_vec(),
            Slot::R2(p) => p.dims().to_vec(),
            Slot::R3(p) => p.dims().to_vec(),
            Slot::R4(p) => p.dims().to_vec(),
        }
    }

    /// The official keys and shapes of this entry.
    fn official(&self) -> Vec<(String, Vec<usize>)> {
        let shape = self.shape();
        match self.layout {
            Layout::Same => vec![(self.name.clone(), shape)],
            Layout::Transposed => vec![(self.name.clone(), vec![shape[1], shape[0]])],
            Layout::PerExpert => {
                let (prefix, suffix) = self.name.split_once('|').expect("per-expert names hold a '|'");
                (0..shape[0]).map(|i| (format!("{prefix}.{i}.{suffix}"), shape[1..].to_vec())).collect()
            }
        }
    }

    fn names(&self) -> Vec<String> {
        self.official().into_iter().map(|(n, _)| n).collect()
    }

    fn export(&self, out: &mut StateDict) {
        let host = self.host();
        match self.layout {
            Layout::Same => {
                out.tensors.insert(self.name.clone(), host);
            }
            Layout::Transposed => {
                let (r, c) = (host.shape[0], host.shape[1]);
                out.tensors.insert(
                    self.name.clone(),
                    HostTensor { shape: vec![c, r], data: transpose_matrix(&host.data, r, c) },
                );
            }
            Layout::PerExpert => {
                let per = host.data.len() / host.shape[0];
                for ((name, shape), chunk) in self.official().into_iter().zip(host.data.chunks(per)) {
                    out.tensors.insert(name, HostTensor { shape, data: chunk.to_vec() });
                }
            }
        }
    }

    /// Checks presence and shapes; returns how many keys this entry uses.
    fn check(&self, sd: &StateDict) -> Result<usize, ImportError> {
        let official = self.official();
        for (key, expected) in &official {
            match sd.get(key) {
                None => return Err(ImportError::MissingKey { key: key.clone(), expected: expected.clone() }),
                Some(t) if &t.shape != expected => {
                    return Err(ImportError::ShapeMismatch {
                        key: key.clone(),
                        found: t.shape.clone(),
                        expected: expected.clone(),
                    })
                }
                Some(_) => {}
            }
        }
        Ok(official.len())
    }

    /// Copies the tensors in; [`Self::check`] must have passed.
    fn import(&mut self, sd: &StateDict, device: &B::Device) {
        let shape = self.shape();
        let data: Vec<f32> = match self.layout {
            Layout::Same => sd.tensors[&self.name].data.clone(),
            Layout::Transposed => transpose_matrix(&sd.tensors[&self.name].data, shape[1], shape[0]),
            Layout::PerExpert => {
                self.official().iter().flat_map(|(key, _)| sd.tensors[key].data.iter().copied()).collect()
            }
        };
        let data = TensorData::new(data, shape);
        fn set<B: Backend, const D: usize>(p: &mut Param<Tensor<B, D>>, data: TensorData, device: &B::Device) {
            let grad = p.val().is_require_grad();
            *p = p.clone().map(|_| Tensor::from_data(data, device).set_require_grad(grad));
        }
        match &mut self.slot {
            Slot::R1(p) => set(p, data, device),
            Slot::R2(p) => set(p, data, device),
            Slot::R3(p) => set(p, data, device),
            Slot::R4(p) => set(p, data, device),
        }
    }
}

/// Every tensor of the model with its official name, in official order.
fn entries<B: Backend>(model: &mut DiT<B>) -> Vec<Entry<'_, B>> {
    let mut out = Vec::new();
    let DiT { x_embedder, pos_embed, t_embedder, y_embedder, blocks, final_layer, .. } = model;
    out.push(Entry { name: "pos_embed".into(), slot: Slot::R3(pos_embed), layout: Layout::Same });
    out.push(Entry {
        name: "x_embedder.proj.weight".into(),
        slot: Slot::R4(&mut x_embedder.proj_weight),
        layout: Layout::Same,
    });
    out.push(Entry {
        name: "x_embedder.proj.bias".into(),
        slot: Slot::R1(&mut x_embedder.proj_bias),
        layout: Layout::Same,
    });
    linear(&mut out, "t_embedder.mlp.0", &mut t_embedder.fc1);
    linear(&mut out, "t_embedder.mlp.2", &mut t_embedder.fc2);
    out.push(Entry {
        name: "y_embedder.embedding_table.weight".into(),
        slot: Slot::R2(&mut y_embedder.embedding_table),
        layout: Layout::Same,
    });
    for (i, block) in blocks.iter_mut().enumerate() {
        let p = format!("blocks.{i}");
        linear(&mut out, &format!("{p}.attn.qkv"), &mut block.attn.qkv);
        linear(&mut out, &format!("{p}.attn.proj"), &mut block.attn.proj);
        let m = format!("{p}.mlp");
        match &mut block.mlp {
            BlockMlp::Dense(ff) => feed_forward(&mut out, &m, ff),
            BlockMlp::TokenChoice(TokenChoiceLayer { gate, experts, shared_experts, .. }) => {
                out.push(Entry { name: format!("{m}.gate.weight"), slot: Slot::R2(gate), layout: Layout::Same });
                expert_bank(&mut out, &m, experts);
                if let Some(s) = shared_experts {
                    swiglu(&mut out, &format!("{m}.shared_experts"), s);
                }
            }
            BlockMlp::ExpertChoice(ExpertChoiceLayer { gate_weight, experts, shared_experts, .. }) => {
                out.push(Entry { name: format!("{m}.gate_weight"), slot: Slot::R2(gate_weight), layout: Layout::Same });
                expert_bank(&mut out, &m, experts);
                if let Some(s) = shared_experts {
                    swiglu(&mut out, &format!("{m}.shared_experts"), s);
                }
            }
            BlockMlp::DiffMoe(DiffMoeLayer {
                gate_weight,
                experts,
                capacity_predictor,
                shared_experts,
                expert_threshold,
                ema_decay,
                ..
            }) => {
                out.push(Entry { name: format!("{m}.gate_weight"), slot: Slot::R2(gate_weight), layout: Layout::Same });
                expert_bank(&mut out, &m, experts);
                let CapacityPredictor { fc1, fc2 } = capacity_predictor;
                linear(&mut out, &format!("{m}.capacity_predictor.0"), fc1);
                linear(&mut out, &format!("{m}.capacity_predictor.2"), fc2);
                if let Some(s) = shared_experts {
                    mlp(&mut out, &format!("{m}.shared_experts"), s);
                }
                out.push(Entry {
                    name: format!("{m}.expert_threshold"),
                    slot: Slot::R1(expert_threshold),
                    layout: Layout::Same,
                });
                out.push(Entry { name: format!("{m}.ema_decay"), slot: Slot::R1(ema_decay), layout: Layout::Same });
            }
        }
        linear(&mut out, &format!("{p}.adaLN_modulation.1"), &mut block.adaln_modulation);
    }
    linear(&mut out, "final_layer.linear", &mut final_layer.linear);
    linear(&mut out, "final_layer.adaLN_modulation.1", &mut final_layer.adaln_modulation);
    out
}

fn linear<'a, B: Backend>(out: &mut Vec<Entry<'a, B>>, name: &str, l: &'a mut Linear<B>) {
    out.push(Entry { name: format!("{name}.weight"), slot: Slot::R2(&mut l.weight), layout: Layout::Transposed });
    if let Some(b) = &mut l.bias {
        out.push(Entry { name: format!("{name}.bias"), slot: Slot::R1(b), layout: Layout::Same });
    }
}

fn mlp<'a, B: Backend>(out: &mut Vec<Entry<'a, B>>, name: &str, m: &'a mut Mlp<B>) {
    linear(out, &format!("{name}.fc1"), &mut m.fc1);
    linear(out, &format!("{name}.fc2"), &mut m.fc2);
}

fn swiglu<'a, B: Backend>(out: &mut Vec<Entry<'a, B>>, name: &str, m: &'a mut SwiGluMlp<B>) {
    linear(out, &format!("{name}.gate_proj"), &mut m.gate_proj);
    linear(out, &format!("{name}.up_proj"), &mut m.up_proj);
    linear(out, &format!("{name}.down_proj"), &mut m.down_proj);
}

fn feed_forward<'a, B: Backend>(out: &mut Vec<Entry<'a, B>>, name: &str, ff: &'a mut FeedForward<B>) {
    match ff {
        FeedForward::Gelu(m) => mlp(out, name, m),
        FeedForward::SwiGlu(m) => swiglu(out, name, m),
    }
}

fn expert_bank<'a, B: Backend>(out: &mut Vec<Entry<'a, B>>, mlp: &str, bank: &'a mut ExpertBank<B>) {
    let prefix = format!("{mlp}.experts");
    let mut per = |suffix: &str, slot: Slot<'a, B>| {
        out.push(Entry { name: format!("{prefix}|{suffix}"), slot, layout: Layout::PerExpert })
    };
    match bank {
        ExpertBank::Gelu(e) => {
            per("fc1.weight", Slot::R3(&mut e.fc1_weight));
            per("fc1.bias", Slot::R2(&mut e.fc1_bias));
            per("fc2.weight", Slot::R3(&mut e.fc2_weight));
            per("fc2.bias", Slot::R2(&mut e.fc2_bias));
        }
        ExpertBank::SwiGlu(e) => {
            per("gate_proj.weight", Slot::R3(&mut e.gate_proj));
            per("up_proj.weight", Slot::R3(&mut e.up_proj));
            per("down_proj.weight", Slot::R3(&mut e.down_proj));
        }
    }
}
