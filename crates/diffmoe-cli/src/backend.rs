//! The compute backend chosen by cargo feature: `cuda`, else `wgpu`, else
//! `flex` (the default CPU backend).

#[cfg(feature = "cuda")]
mod chosen {
    /// The backend.
    pub type Backend = burn::backend::Cuda;
}

#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
mod chosen {
    /// The backend.
    pub type Backend = burn::backend::Wgpu;
}

#[cfg(all(feature = "flex", not(any(feature = "cuda", feature = "wgpu"))))]
mod chosen {
    /// The backend.
    pub type Backend = burn::backend::Flex;
}

#[cfg(not(any(feature = "flex", feature = "cuda", feature = "wgpu")))]
compile_error!("enable one backend feature: flex (default), cuda or wgpu");

pub use chosen::Backend;

/// The backend with automatic differentiation, for training and gradients.
pub type AutodiffBackend = burn::backend::Autodiff<Backend>;
