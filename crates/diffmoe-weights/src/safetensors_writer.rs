//! Writing float32 tensors as a safetensors file, atomically.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::atomic_file::write_atomically;
use crate::error::WriteError;

/// Writes float32 tensors `(name, shape, values)` and string `metadata` as a
/// safetensors file, atomically ([`write_atomically`]).
///
/// # Errors
/// If a tensor's values do not fill its shape (the error names it), or the
/// file cannot be written.
pub fn write_f32_safetensors(
    path: &Path,
    tensors: impl IntoIterator<Item = (String, Vec<usize>, Vec<f32>)>,
    metadata: HashMap<String, String>,
) -> Result<(), WriteError> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(k, shape, values)| (k, shape, values.iter().flat_map(|v| v.to_le_bytes()).collect()))
        .collect();
    let views = bytes
        .iter()
        .map(|(k, s, b)| {
            TensorView::new(Dtype::F32, s.clone(), b).map(|v| (k.clone(), v)).map_err(|e| WriteError::Tensor {
                path: path.to_path_buf(),
                key: k.clone(),
                source: Box::new(e),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = (!metadata.is_empty()).then_some(metadata);
    let out = safetensors::serialize(views, &metadata)
        .map_err(|e| WriteError::Safetensors { path: path.to_path_buf(), source: Box::new(e) })?;
    write_atomically(path, &out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::element::Element;
    use safetensors::SafeTensors;

    #[test]
    fn tensors_and_metadata_read_back_exactly() {
        let dir = std::env::temp_dir().join(format!("diffmoe_safetensors_writer_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.safetensors");
        let metadata = HashMap::from([("format".to_string(), "test".to_string())]);
        let tensors =
            vec![("a".to_string(), vec![2, 2], vec![1.0, -2.5, 1e-30, 3.0]), ("s".to_string(), vec![], vec![7.0])];
        write_f32_safetensors(&path, tensors.clone(), metadata.clone()).unwrap();

        let bytes = std::fs::read(&path).unwrap();
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(header.metadata().as_ref(), Some(&metadata));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (name, shape, values) in tensors {
            let view = st.tensor(&name).unwrap();
            assert_eq!((view.dtype(), view.shape()), (Dtype::F32, shape.as_slice()));
            assert_eq!(Element::F32.decode_all(view.data()), values);
        }

        // Values that do not fill the shape name the tensor and leave the file as it was.
        let err =
            write_f32_safetensors(&path, [("short".to_string(), vec![3], vec![0.0; 2])], HashMap::new()).unwrap_err();
        assert!(matches!(&err, WriteError::Tensor { key, .. } if key == "short"), "{err:?}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
