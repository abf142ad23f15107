//! Module outputs recorded during a forward, under diffusers' module paths
//! (`encoder.down_blocks.0.resnets.1`, `quant_conv`, ...): what the VAE
//! fixtures store from forward hooks.

use burn::tensor::{backend::Backend, Tensor};

/// Named module outputs in execution order.
#[derive(Debug, Clone)]
pub struct Activations<B: Backend> {
    /// `(module path, output)` pairs.
    pub outputs: Vec<(String, Tensor<B, 4>)>,
}

impl<B: Backend> Default for Activations<B> {
    fn default() -> Self {
        Self { outputs: Vec::new() }
    }
}

impl<B: Backend> Activations<B> {
    /// No outputs yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The output of the module at `path`.
    pub fn get(&self, path: &str) -> Option<&Tensor<B, 4>> {
        self.outputs.iter().find(|(name, _)| name == path).map(|(_, t)| t)
    }
}

/// Where a forward sends its module outputs: nowhere, or an [`Activations`].
pub(crate) struct Recorder<'a, B: Backend>(Option<&'a mut Activations<B>>);

impl<'a, B: Backend> Recorder<'a, B> {
    /// Records nothing.
    pub(crate) fn off() -> Self {
        Self(None)
    }

    /// Records into `activations`.
    pub(crate) fn on(activations: &'a mut Activations<B>) -> Self {
        Self(Some(activations))
    }

    /// Keeps `t` under `path()` when recording; `path` is only built then.
    pub(crate) fn record(&mut self, path: impl FnOnce() -> String, t: &Tensor<B, 4>) {
        if let Some(a) = self.0.as_deref_mut() {
            a.outputs.push((path(), t.clone()));
        }
    }
}
