//! Parity with the official implementations, the part every checker shares.
//!
//! The fixtures under `shared/fixtures/` (DiT parity, the Stable Diffusion
//! VAE, the FID Inception) share one layout: an `index.json` listing the
//! cases, then per case a `<case>.json` manifest and a `<case>.safetensors`
//! of inputs, weights and reference outputs. [`Fixture`] reads a case;
//! [`ParityRow`] is one line of the report (a case and a group of outputs),
//! [`format_report`] prints them and [`any_failed`] decides the exit code.
//!
//! What each fixture kind computes and how it is compared stays with the
//! crate that computes it (`diffmoe_train::parity`, `diffmoe_vae::parity`,
//! `diffmoe_eval::parity`).

mod error;
mod fixture;
mod report;

pub use error::FixtureError;
pub use fixture::{check_index, index_cases, read_json, Fixture, IndexEntry, Stored};
pub use report::{any_failed, format_report, ParityRow, Status};
