//! Generated samples as `diffmoe sample` (and the ADM / DiT sampling
//! scripts) write them, read back for evaluation: `samples_raw.npz`
//! (`samples` float32 `[N, C, H, W]` in `[-1, 1]`, `labels`) or an ADM-style
//! `samples.npz` (`arr_0` uint8 `[N, H, W, C]`, optional `arr_1` labels).

use std::path::{Path, PathBuf};

use diffmoe_train::data::DataError;
use diffmoe_train::read_npz;

/// How the values of a sample set were stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleEncoding {
    /// Floats as the sampler returned them, about `[-1, 1]`.
    Float,
    /// Bytes `0..=255` (already rounded as a PNG would be).
    Bytes,
}

/// Samples to evaluate.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleSet {
    /// `[N, C, H, W]` in `[-1, 1]` (bytes mapped by `v / 127.5 - 1`).
    pub images: Vec<f32>,
    /// `[C, H, W]`.
    pub shape: [usize; 3],
    /// The requested labels, when the file has them.
    pub labels: Option<Vec<usize>>,
    /// How the file stored them.
    pub encoding: SampleEncoding,
}

/// Why a sample file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SampleSetError {
    /// The file could not be read.
    #[error(transparent)]
    Read(#[from] DataError),
    /// The file holds neither layout.
    #[error("{path} holds neither `samples` (float32 [N, C, H, W], as diffmoe sample writes samples_raw.npz) nor `arr_0` (uint8 [N, H, W, C], as samples.npz); it has {keys}")]
    Layout {
        /// The file.
        path: PathBuf,
        /// The arrays it has.
        keys: String,
    },
    /// The samples are latents, which must be decoded first.
    #[error("{path} holds {channels}-channel samples: latents must be decoded to images first (diffmoe sample --vae FILE writes samples.npz)")]
    Latents {
        /// The file.
        path: PathBuf,
        /// Their channels.
        channels: usize,
    },
    /// An array has the wrong shape.
    #[error("{path}: `{key}` has shape {shape:?}, {expected}")]
    Shape {
        /// The file.
        path: PathBuf,
        /// The array.
        key: String,
        /// Its shape.
        shape: Vec<usize>,
        /// What was expected.
        expected: &'static str,
    },
}

impl SampleSet {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.images.len() / self.shape.iter().product::<usize>().max(1)
    }

    /// Whether there is no sample.
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// Reads a sample array file.
    ///
    /// # Errors
    /// If the file cannot be read, holds neither layout, holds latents, or
    /// its labels do not match its samples; the error names the file.
    pub fn read(path: &Path) -> Result<Self, SampleSetError> {
        let mut arrays = read_npz(path)?;
        let shape_error = |key: &str, shape: &[usize], expected| SampleSetError::Shape {
            path: path.to_path_buf(),
            key: key.to_string(),
            shape: shape.to_vec(),
            expected,
        };
        let (images, shape, encoding, label_key) = if let Some(raw) = arrays.remove("samples") {
            let [_, c, h, w] = raw.shape[..] else {
                return Err(shape_error("samples", &raw.shape, "expected [N, C, H, W]"));
            };
            (raw.values.iter().map(|&v| v as f32).collect::<Vec<f32>>(), [c, h, w], SampleEncoding::Float, "labels")
        } else if let Some(bytes) = arrays.remove("arr_0") {
            let [n, h, w, c] = bytes.shape[..] else {
                return Err(shape_error("arr_0", &bytes.shape, "expected [N, H, W, C]"));
            };
            // [N, H, W, C] bytes -> [N, C, H, W] in [-1, 1].
            let mut images = vec![0.0f32; n * c * h * w];
            for i in 0..n {
                for p in 0..h * w {
                    for ch in 0..c {
                        images[(i * c + ch) * h * w + p] = bytes.values[(i * h * w + p) * c + ch] as f32 / 127.5 - 1.0;
                    }
                }
            }
            (images, [c, h, w], SampleEncoding::Bytes, "arr_1")
        } else {
            let keys = arrays.keys().cloned().collect::<Vec<_>>().join(", ");
            return Err(SampleSetError::Layout { path: path.to_path_buf(), keys });
        };
        if !(shape[0] == 1 || shape[0] == 3) {
            return Err(SampleSetError::Latents { path: path.to_path_buf(), channels: shape[0] });
        }
        let set = Self { images, shape, labels: None, encoding };
        let labels = match arrays.remove(label_key) {
            Some(l) if l.shape == [set.len()] => Some(l.values.iter().map(|&v| v as usize).collect()),
            Some(l) => return Err(shape_error(label_key, &l.shape, "expected one label per sample")),
            None => None,
        };
        Ok(Self { labels, ..set })
    }

    /// The images as the FID Inception takes them: RGB in `[0, 1]`. Float
    /// samples go through DiffMoE's `clamp(127.5 x + 128, 0, 255) / 255`
    /// (`sample_ddp_feature.py`); bytes are `v / 255`; grey is replicated to RGB.
    pub fn inception_input(&self) -> Vec<f32> {
        let [c, h, w] = self.shape;
        let plane = h * w;
        let to01 = |x: f32| match self.encoding {
            SampleEncoding::Float => (127.5 * x + 128.0).clamp(0.0, 255.0) / 255.0,
            SampleEncoding::Bytes => (x + 1.0) * 127.5 / 255.0,
        };
        let mut out = Vec::with_capacity(self.len() * 3 * plane);
        for sample in self.images.chunks_exact(c * plane) {
            for ch in 0..3 {
                let source = if c == 1 { 0 } else { ch };
                out.extend(sample[source * plane..(source + 1) * plane].iter().map(|&x| to01(x)));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffmoe_train::NpzWriter;

    #[test]
    fn both_layouts_read_back_to_the_same_images() {
        let dir = std::env::temp_dir().join(format!("diffmoe-sample-set-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Two 1x2x2 samples.
        let bytes: [u8; 8] = [0, 255, 128, 64, 1, 2, 3, 4];
        let adm = dir.join("samples.npz");
        let mut npz = NpzWriter::create(&adm).unwrap();
        npz.array("arr_0", &[2, 2, 2, 1], &bytes).unwrap();
        npz.array("arr_1", &[2], &[3i64, 7]).unwrap();
        npz.finish().unwrap();
        let set = SampleSet::read(&adm).unwrap();
        assert_eq!((set.len(), set.shape, set.labels.clone()), (2, [1, 2, 2], Some(vec![3, 7])));
        assert_eq!(set.images[1], 1.0);
        let rgb = set.inception_input();
        assert_eq!(rgb.len(), 2 * 3 * 4);
        assert!((rgb[1] - 1.0).abs() < 1e-6 && (rgb[4 + 1] - 1.0).abs() < 1e-6, "grey replicated");

        let raw = dir.join("samples_raw.npz");
        let mut npz = NpzWriter::create(&raw).unwrap();
        npz.array("labels", &[2], &[3i64, 7]).unwrap();
        npz.array("samples", &[2, 1, 2, 2], &set.images).unwrap();
        npz.finish().unwrap();
        let float = SampleSet::read(&raw).unwrap();
        assert_eq!(float.images, set.images);
        assert_eq!(float.encoding, SampleEncoding::Float);
        // DiffMoE's +128 offset: -1 maps to 0.5 / 255, not 0.
        assert!((float.inception_input()[0] - 0.5 / 255.0).abs() < 1e-7);

        let latents = dir.join("latents.npz");
        let mut npz = NpzWriter::create(&latents).unwrap();
        npz.array("samples", &[1, 4, 1, 1], &[0.0f32; 4]).unwrap();
        npz.finish().unwrap();
        let error = SampleSet::read(&latents).unwrap_err();
        assert!(error.to_string().contains("decoded"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
