//! Stable names for the parameters of a module, built from burn's module
//! tree (`blocks.1.mlp.DiffMoe.experts.Gelu.fc1_weight`). The optimizer, the
//! gradient buffer and the EMA key their per-parameter state by these names,
//! not by `ParamId`s (which are fresh for every loaded model), so state saved
//! in a checkpoint finds its parameter again after a restart.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{backend::Backend, Tensor};

/// The path of the module being visited, maintained from burn's
/// `enter_module` / `exit_module` calls.
#[derive(Debug, Default, Clone)]
pub(crate) struct PathStack {
    parts: Vec<String>,
}

impl PathStack {
    pub(crate) fn enter(&mut self, name: &str) {
        self.parts.push(name.to_string());
    }

    pub(crate) fn exit(&mut self) {
        self.parts.pop();
    }

    /// The dotted name of the current parameter.
    pub(crate) fn key(&self) -> String {
        self.parts.join(".")
    }
}

/// The name, shape and trainability of one float parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    /// Dotted path in the module tree.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Whether the parameter is trained (buffers such as thresholds and
    /// `pos_embed` are not).
    pub trainable: bool,
}

struct InfoVisitor {
    path: PathStack,
    out: Vec<ParamInfo>,
}

impl<B: Backend> ModuleVisitor<B> for InfoVisitor {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.enter(name);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let tensor = param.val();
        self.out.push(ParamInfo {
            name: self.path.key(),
            shape: tensor.dims().to_vec(),
            trainable: tensor.is_require_grad(),
        });
    }
}

/// Every float parameter of `module`, in visiting order.
pub fn param_infos<B: Backend, M: Module<B>>(module: &M) -> Vec<ParamInfo> {
    let mut visitor = InfoVisitor { path: PathStack::default(), out: Vec::new() };
    module.visit(&mut visitor);
    visitor.out
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use diffmoe_model::preset;

    #[test]
    fn names_are_unique_and_buffers_are_not_trainable() {
        let config = preset("diffmoe-tiny-e8-flow").unwrap().model;
        let model = config.init::<Autodiff<Flex>>(&Default::default());
        let infos = param_infos(&model);
        let mut names: Vec<_> = infos.iter().map(|p| p.name.clone()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), infos.len());
        let threshold = infos.iter().find(|p| p.name.ends_with("expert_threshold")).expect("a threshold buffer");
        assert!(!threshold.trainable, "{threshold:?}");
        let pos = infos.iter().find(|p| p.name == "pos_embed").expect("pos_embed");
        assert!(!pos.trainable);
        assert!(infos.iter().any(|p| p.name.starts_with("blocks.1.mlp") && p.trainable));
    }
}
