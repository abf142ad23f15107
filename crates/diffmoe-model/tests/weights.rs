//! Weight import and export: official `train.py` checkpoints, official
//! safetensors, the project's own format, and the errors of bad files.

use std::path::PathBuf;

use burn::backend::Flex;
use diffmoe_model::{load_weights, preset, save_weights, DiTConfig, Family, ImportError, StateDict, WeightSource};
use diffmoe_weights::{read_state_dict, HostTensor};

fn shared() -> PathBuf {
    match std::env::var_os("DIFFMOE_SHARED") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"),
    }
}

fn checkpoint() -> PathBuf {
    shared().join("fixtures/checkpoints/official_train_checkpoint.pt")
}

/// The configuration of the checkpoint (that of the `diffmoe_flow` parity case).
fn config() -> DiTConfig {
    let text = std::fs::read_to_string(shared().join("fixtures/parity/diffmoe_flow.json")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&text).unwrap();
    DiTConfig::from_official_kwargs(Family::Diffmoe, &meta["config"]["constructor_kwargs"]).unwrap()
}

fn official(entry: &str) -> StateDict {
    StateDict { tensors: read_state_dict(&checkpoint(), entry).unwrap().into_iter().collect() }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("diffmoe-weights-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn official_checkpoint_loads_model_and_ema_exactly() {
    let device = Default::default();
    for (source, entry) in [(WeightSource::Model, "model"), (WeightSource::Ema, "ema")] {
        let model = load_weights::<Flex>(&checkpoint(), Some(&config()), source, &device).unwrap();
        assert_eq!(StateDict::from_model(&model), official(entry), "{entry}");
    }
    assert_ne!(official("model"), official("ema"));
}

#[test]
fn own_format_round_trips_with_its_config() {
    let device = Default::default();
    let model = load_weights::<Flex>(&checkpoint(), Some(&config()), WeightSource::Ema, &device).unwrap();
    let path = scratch("roundtrip.safetensors");
    save_weights(&model, &path).unwrap();
    let back = load_weights::<Flex>(&path, None, WeightSource::Model, &device).unwrap();
    assert_eq!(back.config, config());
    assert_eq!(StateDict::from_model(&back), StateDict::from_model(&model));
}

#[test]
fn bad_state_dicts_name_the_key_and_shapes() {
    let device = Default::default();
    let good = official("model");

    let mut missing = good.clone();
    missing.tensors.remove("blocks.1.mlp.experts.3.fc1.weight");
    match missing.to_model::<Flex>(&config(), &device) {
        Err(ImportError::MissingKey { key, expected }) => {
            assert_eq!(key, "blocks.1.mlp.experts.3.fc1.weight");
            assert_eq!(expected, vec![128, 32]);
        }
        other => panic!("expected a missing key, got {:?}", other.err()),
    }

    let mut extra = good.clone();
    extra.tensors.insert("blocks.0.mlp.bogus".into(), HostTensor { shape: vec![2], data: vec![0.0; 2] });
    match extra.to_model::<Flex>(&config(), &device) {
        Err(ImportError::UnexpectedKey { key, shape, .. }) => {
            assert_eq!(key, "blocks.0.mlp.bogus");
            assert_eq!(shape, vec![2]);
        }
        other => panic!("expected an unexpected key, got {:?}", other.err()),
    }

    let mut wrong = good.clone();
    wrong.tensors.insert("blocks.1.mlp.gate_weight".into(), HostTensor { shape: vec![4, 32], data: vec![0.0; 128] });
    let err = wrong.to_model::<Flex>(&config(), &device).err().unwrap();
    assert!(matches!(&err, ImportError::ShapeMismatch { key, found, expected }
        if key == "blocks.1.mlp.gate_weight" && found == &vec![4, 32] && expected == &vec![8, 32]));
    assert!(err.to_string().contains("[4, 32]") && err.to_string().contains("[8, 32]"));

    let dense = DiTConfig { family: Family::Dense, moe: None, ..config() };
    let err = good.to_model::<Flex>(&dense, &device).err().unwrap();
    assert!(matches!(err, ImportError::WrongFamily { .. }), "{err}");
}

#[test]
fn official_weights_without_a_config_are_refused() {
    let err = load_weights::<Flex>(&checkpoint(), None, WeightSource::Model, &Default::default()).err().unwrap();
    assert!(err.to_string().contains("no model config"), "{err}");
}

#[test]
fn a_config_for_another_network_is_refused_and_the_file_kept() {
    let device = Default::default();
    let model = load_weights::<Flex>(&checkpoint(), Some(&config()), WeightSource::Model, &device).unwrap();
    let path = scratch("kept.safetensors");
    save_weights(&model, &path).unwrap();
    let before = std::fs::read(&path).unwrap();
    let other = preset("diffmoe-tiny-e8-flow").unwrap().model;
    assert!(load_weights::<Flex>(&path, Some(&other), WeightSource::Model, &device).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), before);
}
