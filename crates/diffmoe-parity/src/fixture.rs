//! One case of a fixture directory: its JSON manifest and its tensors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::error::FixtureError;
use crate::report::ParityRow;

/// A tensor of a fixture, values widened to f64 (exact for every stored dtype).
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// The shape.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values, row-major.
    pub values: Vec<f64>,
    /// Stored as integers or booleans (labels, steps, counts, masks): such
    /// outputs are compared exactly.
    pub integer: bool,
}

impl Stored {
    /// The values narrowed to f32, the precision the ports compute in.
    pub fn f32s(&self) -> Vec<f32> {
        self.values.iter().map(|&v| v as f32).collect()
    }
}

/// A case: `<case>.json` (the manifest) and `<case>.safetensors`.
#[derive(Debug, Clone)]
pub struct Fixture {
    /// The case name.
    pub case: String,
    /// `<case>.json`, named by errors about the manifest.
    pub manifest: PathBuf,
    /// `<case>.safetensors`, named by errors about the tensors.
    pub path: PathBuf,
    /// The manifest.
    pub meta: Value,
    /// Every stored tensor: inputs, `model.*` weights and reference outputs.
    pub tensors: BTreeMap<String, Stored>,
}

/// An entry of `index.json`'s `cases` list.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexEntry {
    /// The case name, the stem of its files.
    pub case: String,
    /// The entry's `kind`, where the index gives one.
    pub kind: Option<String>,
}

/// Reads a JSON file.
pub fn read_json(path: &Path) -> Result<Value, FixtureError> {
    let text = std::fs::read_to_string(path).map_err(|source| FixtureError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|source| FixtureError::Json { path: path.to_path_buf(), source })
}

/// The cases `dir/index.json` lists, in its order.
pub fn index_cases(dir: &Path) -> Result<Vec<IndexEntry>, FixtureError> {
    let path = dir.join("index.json");
    let index = read_json(&path)?;
    let cases = index["cases"].as_array().ok_or_else(|| FixtureError::malformed(&path, "no `cases` array"))?;
    cases
        .iter()
        .map(|entry| {
            let case = entry["case"]
                .as_str()
                .ok_or_else(|| FixtureError::malformed(&path, format!("a case without a `case` name: {entry}")))?;
            Ok(IndexEntry { case: case.to_string(), kind: entry["kind"].as_str().map(str::to_string) })
        })
        .collect()
}

/// Runs `check` on every case `dir/index.json` lists, in its order, and
/// joins their rows: the `check_dir` of every checker.
pub fn check_index<E: From<FixtureError>>(
    dir: &Path,
    mut check: impl FnMut(&str) -> Result<Vec<ParityRow>, E>,
) -> Result<Vec<ParityRow>, E> {
    let mut rows = Vec::new();
    for entry in index_cases(dir)? {
        rows.extend(check(&entry.case)?);
    }
    Ok(rows)
}

/// The values of a safetensors view, widened to f64; `None` for a dtype
/// fixtures do not use.
fn widened(dtype: Dtype, b: &[u8]) -> Option<Vec<f64>> {
    let eight = |c: &[u8]| -> [u8; 8] { c.try_into().expect("chunks of 8 bytes") };
    Some(match dtype {
        Dtype::F64 => b.chunks_exact(8).map(|c| f64::from_le_bytes(eight(c))).collect(),
        Dtype::F32 => b.chunks_exact(4).map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| f64::from(f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)))
            .collect(),
        Dtype::I64 => b.chunks_exact(8).map(|c| i64::from_le_bytes(eight(c)) as f64).collect(),
        Dtype::I32 => b.chunks_exact(4).map(|c| f64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect(),
        Dtype::BOOL | Dtype::U8 => b.iter().map(|&v| f64::from(v)).collect(),
        _ => return None,
    })
}

impl Fixture {
    /// Reads `dir/<case>.json` and `dir/<case>.safetensors`.
    pub fn read(dir: &Path, case: &str) -> Result<Self, FixtureError> {
        let meta = read_json(&dir.join(format!("{case}.json")))?;
        Self::with_manifest(dir, case, meta)
    }

    /// Reads `dir/<case>.safetensors` for a case whose manifest
    /// (`dir/<case>.json`) was read already, as `meta`.
    pub fn with_manifest(dir: &Path, case: &str, meta: Value) -> Result<Self, FixtureError> {
        let manifest = dir.join(format!("{case}.json"));
        let path = dir.join(format!("{case}.safetensors"));
        let bytes = std::fs::read(&path).map_err(|source| FixtureError::Io { path: path.clone(), source })?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|source| FixtureError::Safetensors { path: path.clone(), source })?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let values = widened(view.dtype(), view.data()).ok_or_else(|| {
                FixtureError::malformed(&path, format!("tensor `{name}` has unsupported dtype {:?}", view.dtype()))
            })?;
            let integer = matches!(view.dtype(), Dtype::I64 | Dtype::I32 | Dtype::BOOL | Dtype::U8);
            tensors.insert(name, Stored { shape: view.shape().to_vec(), values, integer });
        }
        Ok(Self { case: case.to_string(), manifest, path, meta, tensors })
    }

    /// A [`FixtureError::Malformed`] naming the manifest.
    pub fn manifest_error(&self, reason: impl Into<String>) -> FixtureError {
        FixtureError::malformed(&self.manifest, reason)
    }

    /// A [`FixtureError::Malformed`] naming the tensors file.
    pub fn tensors_error(&self, reason: impl Into<String>) -> FixtureError {
        FixtureError::malformed(&self.path, reason)
    }

    /// A stored tensor; an error names a missing one.
    pub fn get(&self, key: &str) -> Result<&Stored, FixtureError> {
        self.tensors.get(key).ok_or_else(|| self.tensors_error(format!("missing tensor `{key}`")))
    }

    /// A stored tensor's values as f32.
    pub fn f32s(&self, key: &str) -> Result<Vec<f32>, FixtureError> {
        Ok(self.get(key)?.f32s())
    }

    /// The first value of a stored tensor (a scalar).
    pub fn scalar(&self, key: &str) -> Result<f64, FixtureError> {
        self.get(key)?.values.first().copied().ok_or_else(|| self.tensors_error(format!("`{key}` is empty")))
    }

    /// A stored tensor as integers (steps, counts).
    pub fn indices(&self, key: &str) -> Result<Vec<usize>, FixtureError> {
        Ok(self.get(key)?.values.iter().map(|&v| v as usize).collect())
    }

    /// A stored tensor on `device`, as f32, with its stored shape of rank `D`.
    pub fn float<B: Backend, const D: usize>(
        &self,
        key: &str,
        device: &B::Device,
    ) -> Result<Tensor<B, D>, FixtureError> {
        let s = self.get(key)?;
        if s.shape.len() != D {
            return Err(self.tensors_error(format!("`{key}` has shape {:?}, expected rank {D}", s.shape)));
        }
        Ok(Tensor::from_data(TensorData::new(s.f32s(), s.shape.clone()), device))
    }

    /// A stored tensor on `device` as a flat integer tensor (labels).
    pub fn int<B: Backend>(&self, key: &str, device: &B::Device) -> Result<Tensor<B, 1, Int>, FixtureError> {
        let s = self.get(key)?;
        let data: Vec<i64> = s.values.iter().map(|&v| v as i64).collect();
        Ok(Tensor::from_data(TensorData::new(data, [s.values.len()]), device))
    }

    /// A number of the manifest at a JSON pointer (`/suggested_tolerance/rtol`).
    pub fn meta_f64(&self, pointer: &str) -> Result<f64, FixtureError> {
        self.meta
            .pointer(pointer)
            .and_then(Value::as_f64)
            .ok_or_else(|| self.manifest_error(format!("no number at {pointer}")))
    }

    /// A string of the manifest at a JSON pointer.
    pub fn meta_str(&self, pointer: &str) -> Result<&str, FixtureError> {
        self.meta
            .pointer(pointer)
            .and_then(Value::as_str)
            .ok_or_else(|| self.manifest_error(format!("no string at {pointer}")))
    }

    /// Whether `key` is an input: a `model.*` weight or one of the manifest's `input_keys`.
    fn is_input(&self, key: &str) -> bool {
        key.starts_with("model.")
            || self.meta["input_keys"].as_array().is_some_and(|a| a.iter().any(|k| k.as_str() == Some(key)))
    }

    /// The reference outputs: every stored tensor that is not an input.
    pub fn outputs(&self) -> impl Iterator<Item = (&str, &Stored)> {
        self.tensors.iter().filter(|(k, _)| !self.is_input(k)).map(|(k, s)| (k.as_str(), s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use safetensors::tensor::TensorView;

    /// A fresh directory under the system's temporary directory.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("diffmoe-parity-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write_case(dir: &Path, case: &str, meta: &str, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
        std::fs::write(dir.join(format!("{case}.json")), meta).unwrap();
        let views: Vec<(String, TensorView<'_>)> =
            tensors.iter().map(|(k, d, s, b)| (k.to_string(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
        std::fs::write(dir.join(format!("{case}.safetensors")), safetensors::serialize(views, &None).unwrap()).unwrap();
    }

    fn le<T: Copy, const N: usize>(values: &[T], bytes: fn(T) -> [u8; N]) -> Vec<u8> {
        values.iter().flat_map(|&v| bytes(v)).collect()
    }

    #[test]
    fn reads_every_dtype_exactly_and_separates_inputs_from_outputs() {
        let dir = scratch("read");
        write_case(
            &dir,
            "c",
            r#"{"input_keys": ["x"], "suggested_tolerance": {"rtol": 1e-4}, "family": "DiffMoE"}"#,
            &[
                ("x", Dtype::F32, vec![2, 2], le(&[1.5f32, -2.0, 0.1, 3.0], f32::to_le_bytes)),
                ("model.w", Dtype::F32, vec![1], le(&[7.0f32], f32::to_le_bytes)),
                ("out.wide", Dtype::F64, vec![2], le(&[0.1f64, 1e-300], f64::to_le_bytes)),
                ("out.steps", Dtype::I64, vec![3], le(&[0i64, 5, 9], i64::to_le_bytes)),
                ("out.mask", Dtype::BOOL, vec![2], vec![1, 0]),
            ],
        );
        let fx = Fixture::read(&dir, "c").unwrap();
        assert_eq!(fx.case, "c");
        assert_eq!(fx.get("x").unwrap().values, vec![1.5, -2.0, f64::from(0.1f32), 3.0]);
        assert_eq!(fx.get("out.wide").unwrap().values, vec![0.1, 1e-300]);
        assert!(fx.get("out.steps").unwrap().integer && fx.get("out.mask").unwrap().integer);
        assert!(!fx.get("x").unwrap().integer);
        assert_eq!(fx.indices("out.steps").unwrap(), vec![0, 5, 9]);
        assert_eq!(fx.scalar("model.w").unwrap(), 7.0);
        assert_eq!(fx.meta_f64("/suggested_tolerance/rtol").unwrap(), 1e-4);
        assert_eq!(fx.meta_str("/family").unwrap(), "DiffMoE");
        assert!(fx.is_input("x") && fx.is_input("model.w") && !fx.is_input("out.wide"));
        let outputs: Vec<&str> = fx.outputs().map(|(k, _)| k).collect();
        assert_eq!(outputs, vec!["out.mask", "out.steps", "out.wide"]);

        let device = Default::default();
        let x = fx.float::<Flex, 2>("x", &device).unwrap();
        assert_eq!(x.dims(), [2, 2]);
        assert_eq!(x.into_data().to_vec::<f32>().unwrap(), vec![1.5, -2.0, 0.1, 3.0]);
        assert_eq!(
            fx.int::<Flex>("out.steps", &device).unwrap().into_data().convert::<i64>().to_vec::<i64>().unwrap(),
            vec![0, 5, 9]
        );

        let err = fx.float::<Flex, 1>("x", &device).unwrap_err().to_string();
        assert!(err.contains("c.safetensors") && err.contains("expected rank 1"), "{err}");
        let err = fx.get("nope").unwrap_err().to_string();
        assert!(err.contains("c.safetensors") && err.contains("missing tensor `nope`"), "{err}");
        let err = fx.meta_f64("/family").unwrap_err().to_string();
        assert!(err.contains("c.json") && err.contains("no number at /family"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_files_are_named() {
        let dir = scratch("bad");
        let err = Fixture::read(&dir, "absent").unwrap_err();
        assert!(matches!(&err, FixtureError::Io { path, .. } if path.ends_with("absent.json")), "{err}");

        std::fs::write(dir.join("broken.json"), "{").unwrap();
        let err = Fixture::read(&dir, "broken").unwrap_err();
        assert!(matches!(&err, FixtureError::Json { path, .. } if path.ends_with("broken.json")), "{err}");

        std::fs::write(dir.join("garbled.json"), "{}").unwrap();
        std::fs::write(dir.join("garbled.safetensors"), b"not safetensors").unwrap();
        let err = Fixture::read(&dir, "garbled").unwrap_err();
        assert!(matches!(&err, FixtureError::Safetensors { path, .. } if path.ends_with("garbled.safetensors")));

        write_case(&dir, "f16", "{}", &[("h", Dtype::F16, vec![1], vec![0, 60])]);
        let err = Fixture::read(&dir, "f16").unwrap_err().to_string();
        assert!(err.contains("tensor `h` has unsupported dtype F16"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_index_lists_cases_in_order_with_their_kinds() {
        let dir = scratch("index");
        std::fs::write(
            dir.join("index.json"),
            r#"{"cases": [{"case": "b", "kind": "fid_is_metrics"}, {"case": "a"}]}"#,
        )
        .unwrap();
        assert_eq!(
            index_cases(&dir).unwrap(),
            vec![
                IndexEntry { case: "b".into(), kind: Some("fid_is_metrics".into()) },
                IndexEntry { case: "a".into(), kind: None },
            ]
        );
        let rows = check_index(&dir, |case| Ok::<_, FixtureError>(vec![ParityRow::new(case, "g")])).unwrap();
        assert_eq!(rows.iter().map(|r| r.case.as_str()).collect::<Vec<_>>(), vec!["b", "a"]);
        let failing = check_index(&dir, |case| match case {
            "a" => Err(FixtureError::malformed(dir.join("a.json"), "bad")),
            _ => Ok(vec![]),
        });
        assert!(failing.unwrap_err().to_string().contains("a.json"));
        std::fs::write(dir.join("index.json"), r#"{"cases": [{"kind": "x"}]}"#).unwrap();
        let err = index_cases(&dir).unwrap_err().to_string();
        assert!(err.contains("index.json") && err.contains("without a `case` name"), "{err}");
        std::fs::write(dir.join("index.json"), r#"{"runs": []}"#).unwrap();
        assert!(index_cases(&dir).unwrap_err().to_string().contains("no `cases` array"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
