//! Every file of `configs/` parses, validates and equals its preset, so a
//! preset name and its file are interchangeable; bad values name the field.

use std::path::{Path, PathBuf};

use diffmoe_model::{preset, ConfigError, RunConfig};

fn configs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs")
}

#[test]
fn every_config_file_equals_its_preset() {
    let mut n = 0;
    for entry in std::fs::read_dir(configs_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let run = RunConfig::resolve(path.to_str().unwrap()).unwrap();
            let stem = path.file_stem().unwrap().to_str().unwrap();
            assert_eq!(run.name, stem);
            assert_eq!(Some(run), preset(stem), "{} differs from its preset", path.display());
            n += 1;
        }
    }
    assert!(n >= 15, "only {n} config files");
}

fn error_for(text: &str) -> ConfigError {
    RunConfig::from_toml(text, Path::new("test.toml")).unwrap_err()
}

#[test]
fn invalid_values_name_the_field_and_what_is_allowed() {
    let base = preset("diffmoe-tiny-e8-flow").unwrap().to_toml();
    let err = error_for(&base.replace("capacity = 1.0", "capacity = 9.0"));
    let msg = err.to_string();
    assert!(msg.contains("model.moe.capacity") && msg.contains("at most num_experts = 8"), "{msg}");

    let err = error_for(&base.replace("num_heads = 4", "num_heads = 3"));
    assert!(err.to_string().contains("model.num_heads"), "{err}");

    let err = error_for(&base.replace("family = \"diffmoe\"", "family = \"sparse\""));
    assert!(matches!(err, ConfigError::Parse { .. }), "{err}");

    let err = error_for(&base.replace("depth = 6", "depth = 6\ndeepth = 7"));
    assert!(format!("{:?}", err).contains("deepth"), "{err:?}");

    let tc = preset("tc-dit-tiny-e8-flow").unwrap().to_toml();
    let err = error_for(&tc.replace("layout = \"interleaved\"", "layout = \"all\""));
    assert!(err.to_string().contains("model.moe.layout"), "{err}");
}

#[test]
fn unknown_names_list_the_presets() {
    let err = RunConfig::resolve("diffmoe-q-e3-flow").unwrap_err();
    assert!(err.to_string().contains("diffmoe-l-e16-flow"));
}
