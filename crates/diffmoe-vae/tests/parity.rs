//! The VAE parity suite: every case of `shared/fixtures/vae` (diffusers
//! `AutoencoderKL` outputs, and the real SD VAE's key lists) through
//! `diffmoe_vae::parity`.

use std::path::PathBuf;

use burn::backend::Flex;
use diffmoe_vae::parity::{any_failed, check_case, check_dir, format_report, ParityRow};

fn fixtures() -> PathBuf {
    match std::env::var_os("DIFFMOE_VAE_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/vae"),
    }
}

fn assert_passes(what: &str, rows: &[ParityRow]) {
    let report = format_report(rows);
    println!("{report}");
    assert!(!rows.is_empty(), "{what}: no rows");
    assert!(!any_failed(rows), "parity failed for {what}:\n{report}");
}

fn run(case: &str) {
    let rows = check_case::<Flex>(&fixtures(), case, &Default::default()).expect("fixture readable");
    assert_passes(case, &rows);
}

#[test]
fn vae_kl_small() {
    run("vae_kl_small");
}

#[test]
fn sd_vae_ft_mse_architecture() {
    run("sd_vae_ft_mse_architecture");
}

#[test]
fn every_case_of_the_index() {
    let rows = check_dir::<Flex>(&fixtures(), &Default::default()).expect("fixtures readable");
    assert_passes("index.json", &rows);
    assert!(rows.iter().any(|r| r.case == "vae_kl_small" && r.group == "decode"));
}
