//! The parity suite: every case of `shared/fixtures/parity` through the same
//! code as `cargo xtask parity`.

use std::path::PathBuf;

use burn::backend::{Autodiff, Flex, NdArray};
use burn::tensor::backend::Backend;
use diffmoe_train::parity::{any_failed, check_case, check_dir, format_report};

fn fixtures() -> PathBuf {
    match std::env::var_os("DIFFMOE_PARITY_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/parity"),
    }
}

fn run(case: &str) {
    let rows = check_case::<Autodiff<Flex>>(&fixtures(), case, &Default::default()).expect("fixture readable");
    let report = format_report(&rows);
    println!("{report}");
    assert!(!rows.is_empty());
    assert!(!any_failed(&rows), "parity failed for {case}:\n{report}");
}

/// Every case on a backend other than Flex: the code paths of GPU backends
/// (burn's own products and activations, top-k and threshold selections by
/// counting on the device instead of the CPU kernel) against the same
/// fixtures.
#[test]
fn every_case_on_the_generic_backend_path() {
    type B = Autodiff<NdArray>;
    let rows = check_dir::<B>(&fixtures(), &Default::default()).expect("fixtures readable");
    let report = format_report(&rows);
    println!("{report}");
    assert!(!rows.is_empty());
    assert!(!any_failed(&rows), "parity failed on {}:\n{report}", B::name(&Default::default()));
}

#[test]
fn embeddings() {
    run("embeddings");
}

#[test]
fn dit_flow() {
    run("dit_flow");
}

#[test]
fn dit_ddpm() {
    run("dit_ddpm");
}

#[test]
fn tcdit_flow() {
    run("tcdit_flow");
}

#[test]
fn ecdit_flow() {
    run("ecdit_flow");
}

#[test]
fn diffmoe_flow() {
    run("diffmoe_flow");
}

#[test]
fn diffmoe_flow_swiglu_shared() {
    run("diffmoe_flow_swiglu_shared");
}

#[test]
fn diffmoe_ddpm() {
    run("diffmoe_ddpm");
}
