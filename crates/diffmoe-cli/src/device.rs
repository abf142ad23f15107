//! `--device`: which device of the compiled backend to run on.

use std::str::FromStr;

use anyhow::{bail, Result};

use crate::backend::Backend;

/// A device as the user names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU (the `flex` backend).
    Cpu,
    /// A CUDA GPU by index (the `cuda` backend).
    Cuda(usize),
    /// The default wgpu adapter (the `wgpu` backend).
    Wgpu,
}

impl FromStr for DeviceSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            "wgpu" => Ok(Self::Wgpu),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(Self::Cuda(i)),
                _ => bail!("--device {s}: expected cpu, cuda, cuda:N or wgpu"),
            },
        }
    }
}

impl DeviceSpec {
    /// The device of the backend this binary was built with.
    pub fn default_for_build() -> Self {
        if cfg!(feature = "cuda") {
            Self::Cuda(0)
        } else if cfg!(feature = "wgpu") {
            Self::Wgpu
        } else {
            Self::Cpu
        }
    }

    /// The burn device, or an error saying which feature the binary lacks.
    pub fn device(self) -> Result<burn::tensor::Device<Backend>> {
        let built = Self::default_for_build();
        let feature = |d: Self| match d {
            Self::Cpu => "flex",
            Self::Cuda(_) => "cuda",
            Self::Wgpu => "wgpu",
        };
        if std::mem::discriminant(&self) != std::mem::discriminant(&built) {
            bail!(
                "--device {self}: this binary was built with the `{}` backend; rebuild with `--features {}` to use it",
                feature(built),
                feature(self)
            );
        }
        Ok(self.burn_device())
    }

    #[cfg(feature = "cuda")]
    fn burn_device(self) -> burn::tensor::Device<Backend> {
        match self {
            Self::Cuda(i) => burn::backend::cuda::CudaDevice::new(i),
            _ => Default::default(),
        }
    }

    #[cfg(not(feature = "cuda"))]
    fn burn_device(self) -> burn::tensor::Device<Backend> {
        Default::default()
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
            Self::Wgpu => write!(f, "wgpu"),
        }
    }
}
