//! Weight files on the host, for every network of the project (the DiT, the
//! Stable Diffusion VAE, the FID Inception, the evaluation classifier):
//!
//! - [`HostTensor`], the shape and f32 values every reader returns;
//! - [`read_state_dict`] and [`checkpoint_entries`], `torch.save` files (zip
//!   or legacy) read without executing their pickles;
//! - [`Element`], the element types of safetensors files and torch storages,
//!   decoded to f32 by one table;
//! - [`write_atomically`] and [`write_f32_safetensors`]: every file the
//!   project writes replaces its name only once complete.
//!
//! Which keys a network needs, and in which layout, stays with the crate of
//! that network (`diffmoe_model::StateDict`, `diffmoe_vae::LoadPlan`,
//! `diffmoe_eval::inception_weights`).

mod atomic_file;
mod element;
mod error;
mod host_tensor;
mod safetensors_writer;
mod torch_checkpoint;

pub use atomic_file::write_atomically;
pub use element::Element;
pub use error::WriteError;
pub use host_tensor::{transpose_matrix, HostTensor};
pub use safetensors_writer::write_f32_safetensors;
pub use torch_checkpoint::{
    checkpoint_entries, is_torch_save, is_torch_save_file, read_state_dict, TorchCheckpointError,
};
