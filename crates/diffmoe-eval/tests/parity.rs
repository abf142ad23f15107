//! The FID Inception parity suite: every case of `shared/fixtures/inception`
//! (pytorch-fid's network, the FID and Inception Score arithmetic) through
//! [`diffmoe_eval::parity`].

use std::path::PathBuf;

use burn::backend::Flex;
use diffmoe_eval::parity::{any_failed, check_case, format_report};

fn fixtures() -> PathBuf {
    match std::env::var_os("DIFFMOE_INCEPTION_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/inception"),
    }
}

fn run(case: &str) {
    let rows = check_case::<Flex>(&fixtures(), case, &Default::default()).expect("fixture readable");
    let report = format_report(&rows);
    println!("{report}");
    assert!(!rows.is_empty());
    assert!(!any_failed(&rows), "parity failed for {case}:\n{report}");
}

#[test]
fn fid_inception() {
    run("fid_inception");
}

#[test]
fn fid_is_metrics() {
    run("fid_is_metrics");
}
