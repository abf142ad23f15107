//! Stable names for the parameters of a module, built from burn's module
//! tree (`blocks.1.mlp.DiffMoe.experts.Gelu.fc1_weight`). The optimizer, the
//! gradient buffer and the EMA key their per-parameter state by these names,
//! not by `ParamId`s (which are fresh for every loaded model), so state saved
//! in a checkpoint finds its parameter again after a restart.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{backend::Backend, Tensor};

/// Visits every float parameter of a module with its dotted name.
pub(crate) trait NamedVisitor<B: Backend> {
    /// Called once per float parameter, in burn's visiting order.
    fn visit<const D: usize>(&mut self, name: String, param: &Param<Tensor<B, D>>);
}

/// Maps every float parameter of a module, knowing its dotted name.
pub(crate) trait NamedMapper<B: Backend> {
    /// Called once per float parameter, in burn's visiting order.
    fn map<const D: usize>(&mut self, name: String, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>>;
}

/// Runs `visitor` over the float parameters of `module`, with their names.
pub(crate) fn visit_named<B: Backend, M: Module<B>>(module: &M, visitor: &mut impl NamedVisitor<B>) {
    module.visit(&mut Named { path: Vec::new(), inner: visitor });
}

/// Runs `mapper` over the float parameters of `module`, with their names.
pub(crate) fn map_named<B: Backend, M: Module<B>>(module: M, mapper: &mut impl NamedMapper<B>) -> M {
    module.map(&mut Named { path: Vec::new(), inner: mapper })
}

/// Tracks the module path from burn's `enter_module` / `exit_module` calls
/// and hands each parameter to the inner visitor or mapper with its name.
struct Named<'a, V> {
    path: Vec<String>,
    inner: &'a mut V,
}

impl<V> Named<'_, V> {
    fn key(&self) -> String {
        self.path.join(".")
    }
}

impl<B: Backend, V: NamedVisitor<B>> ModuleVisitor<B> for Named<'_, V> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let key = self.key();
        self.inner.visit(key, param);
    }
}

impl<B: Backend, V: NamedMapper<B>> ModuleMapper<B> for Named<'_, V> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let key = self.key();
        self.inner.map(key, param)
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

impl<B: Backend> NamedVisitor<B> for Vec<ParamInfo> {
    fn visit<const D: usize>(&mut self, name: String, param: &Param<Tensor<B, D>>) {
        let tensor = param.val();
        self.push(ParamInfo { name, shape: tensor.dims().to_vec(), trainable: tensor.is_require_grad() });
    }
}

/// Every float parameter of `module`, in visiting order.
pub fn param_infos<B: Backend, M: Module<B>>(module: &M) -> Vec<ParamInfo> {
    let mut infos = Vec::new();
    visit_named(module, &mut infos);
    infos
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
