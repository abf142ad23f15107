//! MNIST-style IDX files (`*-images-idx3-ubyte`, `*-labels-idx1-ubyte`, raw
//! or gzipped), the format of MNIST and Fashion-MNIST, and the in-memory
//! dataset built from one images/labels pair.
//!
//! An IDX file is a big-endian header, magic `0x00000803` (unsigned bytes,
//! 3 dimensions) followed by `count, rows, cols` for images, or magic
//! `0x00000801` followed by `count` for labels, then the bytes.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::transform::{check_pixel_target, to_target, PixelImage, Spatial};
use super::{Augment, DataError, Dataset, Example, ImageShape};

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

/// The split prefixes looked for in an IDX directory, in order of preference:
/// the training split wins when both are present, since this is for training.
const SPLITS: [&str; 2] = ["train", "t10k"];

/// Decoded IDX images and labels, `count` images of `rows x cols` bytes.
#[derive(Debug)]
pub(crate) struct IdxData {
    pub rows: usize,
    pub cols: usize,
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
}

impl IdxData {
    /// Parses an images file and a labels file (each raw or gzipped) and
    /// checks that they describe the same number of examples.
    pub fn parse(images: &[u8], images_path: &Path, labels: &[u8], labels_path: &Path) -> Result<Self, DataError> {
        let images = gunzip_if_needed(images, images_path)?;
        let labels = gunzip_if_needed(labels, labels_path)?;
        let (count, rows, cols, pixels) = parse_images(&images, images_path)?;
        let label_bytes = parse_labels(&labels, labels_path)?;
        if label_bytes.len() != count {
            return Err(DataError::corrupt(
                labels_path,
                format!("{} labels but {} holds {count} images", label_bytes.len(), images_path.display()),
            ));
        }
        if count == 0 {
            return Err(DataError::Empty { path: images_path.to_path_buf(), what: "images" });
        }
        Ok(IdxData { rows, cols, images: pixels.to_vec(), labels: label_bytes.to_vec() })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// One more than the largest label, so a subset missing the last class
    /// would report fewer classes; Fashion-MNIST and MNIST hold all ten.
    pub fn num_classes(&self) -> usize {
        self.labels.iter().copied().max().map_or(0, |m| m as usize + 1)
    }

    pub fn image(&self, index: usize) -> PixelImage {
        let size = self.rows * self.cols;
        PixelImage {
            channels: 1,
            height: self.rows,
            width: self.cols,
            data: self.images[index * size..(index + 1) * size].to_vec(),
        }
    }
}

/// Decompresses `bytes` when they start with the gzip magic, whatever the
/// file is called, so a renamed file still reads.
fn gunzip_if_needed<'a>(bytes: &'a [u8], path: &Path) -> Result<std::borrow::Cow<'a, [u8]>, DataError> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(|source| DataError::Decompress { path: path.to_path_buf(), source })?;
        Ok(out.into())
    } else {
        Ok(bytes.into())
    }
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().expect("four bytes"))
}

/// Splits a header of `dims` big-endian u32 dimensions after the magic.
fn parse_header<'a>(
    bytes: &'a [u8],
    path: &Path,
    magic: u32,
    dims: usize,
) -> Result<(Vec<usize>, &'a [u8]), DataError> {
    let header = 4 + 4 * dims;
    if bytes.len() < header {
        return Err(DataError::corrupt(
            path,
            format!("truncated header: {} bytes, expected at least {header}", bytes.len()),
        ));
    }
    let found = read_u32(bytes, 0);
    if found != magic {
        return Err(DataError::corrupt(path, format!("bad magic number {found:#010x}, expected {magic:#010x}")));
    }
    let shape = (0..dims).map(|d| read_u32(bytes, 4 + 4 * d) as usize).collect();
    Ok((shape, &bytes[header..]))
}

/// Returns `(count, rows, cols, pixels)` of an images file.
fn parse_images<'a>(bytes: &'a [u8], path: &Path) -> Result<(usize, usize, usize, &'a [u8]), DataError> {
    let (shape, body) = parse_header(bytes, path, IMAGES_MAGIC, 3)?;
    let (count, rows, cols) = (shape[0], shape[1], shape[2]);
    let expected = count
        .checked_mul(rows)
        .and_then(|n| n.checked_mul(cols))
        .ok_or_else(|| DataError::corrupt(path, "dimensions overflow"))?;
    if body.len() != expected {
        return Err(DataError::corrupt(
            path,
            format!(
                "{count} images of {rows}x{cols} need {expected} bytes after the header, found {}{}",
                body.len(),
                if body.len() < expected { " (truncated)" } else { "" }
            ),
        ));
    }
    if rows == 0 || cols == 0 {
        return Err(DataError::corrupt(path, format!("empty image size {rows}x{cols}")));
    }
    Ok((count, rows, cols, body))
}

fn parse_labels<'a>(bytes: &'a [u8], path: &Path) -> Result<&'a [u8], DataError> {
    let (shape, body) = parse_header(bytes, path, LABELS_MAGIC, 1)?;
    if body.len() != shape[0] {
        return Err(DataError::corrupt(
            path,
            format!("{} labels need {} bytes after the header, found {}", shape[0], shape[0], body.len()),
        ));
    }
    Ok(body)
}

/// Whether a file name is an IDX images file (`*-idx3-ubyte`, optionally `.gz`).
pub(crate) fn is_idx_images_name(name: &str) -> bool {
    name.ends_with("-idx3-ubyte") || name.ends_with("-idx3-ubyte.gz")
}

/// Finds the images and labels files of `path`: a directory holding
/// `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`, or an images file,
/// whose labels file is found by name beside it.
fn locate(path: &Path) -> Result<(PathBuf, PathBuf), DataError> {
    let metadata = std::fs::metadata(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => DataError::NotFound { path: path.to_path_buf() },
        _ => DataError::io(path, source),
    })?;
    let images = if metadata.is_dir() {
        let candidates = SPLITS.iter().flat_map(|split| {
            let base = format!("{split}-images-idx3-ubyte");
            [path.join(&base), path.join(format!("{base}.gz"))]
        });
        candidates.into_iter().find(|p| p.is_file()).ok_or(DataError::Undetected {
            path: path.to_path_buf(),
            looked_for: "train-images-idx3-ubyte[.gz] or t10k-images-idx3-ubyte[.gz]",
        })?
    } else {
        path.to_path_buf()
    };
    let name = images.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if !is_idx_images_name(name) || !name.contains("images-idx3") {
        return Err(DataError::Undetected {
            path: images.clone(),
            looked_for: "an images file named *-images-idx3-ubyte[.gz]",
        });
    }
    let labels_base = name.replace("images-idx3", "labels-idx1");
    let labels_base = labels_base.trim_end_matches(".gz");
    let labels = [images.with_file_name(labels_base), images.with_file_name(format!("{labels_base}.gz"))]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| DataError::NotFound { path: images.with_file_name(format!("{labels_base}[.gz]")) })?;
    Ok((images, labels))
}

/// An IDX images/labels pair held in memory, converted to the target shape on `get`.
pub(crate) struct IdxDataset {
    data: std::sync::Arc<IdxData>,
    target: ImageShape,
    description: String,
}

impl IdxDataset {
    /// Reads and validates the IDX pair at `path` (see `locate`).
    pub fn open(path: &Path, target: ImageShape) -> Result<Self, DataError> {
        let (images_path, labels_path) = locate(path)?;
        let images = std::fs::read(&images_path).map_err(|e| DataError::io(&images_path, e))?;
        let labels = std::fs::read(&labels_path).map_err(|e| DataError::io(&labels_path, e))?;
        let data = IdxData::parse(&images, &images_path, &labels, &labels_path)?;
        let description = format!(
            "IDX {} ({}x{}), {} images, {} classes",
            images_path.display(),
            data.rows,
            data.cols,
            data.len(),
            data.num_classes()
        );
        Self::from_data(std::sync::Arc::new(data), target, description)
    }

    pub fn from_data(
        data: std::sync::Arc<IdxData>,
        target: ImageShape,
        description: String,
    ) -> Result<Self, DataError> {
        check_pixel_target(&description, target)?;
        Ok(IdxDataset { data, target, description })
    }
}

impl Dataset for IdxDataset {
    fn len(&self) -> usize {
        self.data.len()
    }

    fn num_classes(&self) -> usize {
        self.data.num_classes()
    }

    fn shape(&self) -> ImageShape {
        self.target
    }

    fn get(&self, index: usize, augment: Augment) -> Result<Example, DataError> {
        let image = to_target(self.data.image(index), self.target, Spatial::PadOrCrop, augment.flip);
        Ok(Example { image, label: self.data.labels[index] as usize })
    }

    fn describe(&self) -> String {
        self.description.clone()
    }

    fn is_latent(&self) -> bool {
        false
    }
}

/// Builds IDX bytes for tests: an images file of `count` `rows x cols`
/// images whose pixel `p` of image `i` is `(i + p) % 256`, and labels `i % 10`.
#[cfg(test)]
pub(crate) fn synthetic_idx(count: usize, rows: usize, cols: usize) -> (Vec<u8>, Vec<u8>) {
    let mut images = IMAGES_MAGIC.to_be_bytes().to_vec();
    for d in [count, rows, cols] {
        images.extend((d as u32).to_be_bytes());
    }
    for i in 0..count {
        images.extend((0..rows * cols).map(|p| ((i + p) % 256) as u8));
    }
    let mut labels = LABELS_MAGIC.to_be_bytes().to_vec();
    labels.extend((count as u32).to_be_bytes());
    labels.extend((0..count).map(|i| (i % 10) as u8));
    (images, labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_dir;
    use std::io::Write;

    const GREY_28: ImageShape = ImageShape { channels: 1, height: 28, width: 28 };

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn parses_raw_and_gzipped_pairs() {
        let (images, labels) = synthetic_idx(12, 3, 2);
        let p = Path::new("x");
        let raw = IdxData::parse(&images, p, &labels, p).unwrap();
        let gz = IdxData::parse(&gzip(&images), p, &gzip(&labels), p).unwrap();
        for data in [raw, gz] {
            assert_eq!((data.len(), data.rows, data.cols, data.num_classes()), (12, 3, 2, 10));
            assert_eq!(data.image(11).data, vec![11, 12, 13, 14, 15, 16]);
            assert_eq!(data.labels[11], 1);
        }
    }

    #[test]
    fn corrupt_files_are_named() {
        let (images, labels) = synthetic_idx(4, 2, 2);
        let images_path = Path::new("/d/train-images-idx3-ubyte");
        let labels_path = Path::new("/d/train-labels-idx1-ubyte");
        let mut bad_magic = images.clone();
        bad_magic[3] = 0x01;
        let error = IdxData::parse(&bad_magic, images_path, &labels, labels_path).unwrap_err();
        assert_eq!(error.path(), Some(images_path));
        assert!(error.to_string().contains("bad magic"), "{error}");

        let truncated = &images[..images.len() - 1];
        let error = IdxData::parse(truncated, images_path, &labels, labels_path).unwrap_err();
        assert!(error.to_string().contains("truncated"), "{error}");
        assert!(error.to_string().contains("/d/train-images-idx3-ubyte"), "{error}");

        let error = IdxData::parse(&images[..7], images_path, &labels, labels_path).unwrap_err();
        assert!(error.to_string().contains("truncated header"), "{error}");

        let (_, fewer_labels) = synthetic_idx(3, 2, 2);
        let error = IdxData::parse(&images, images_path, &fewer_labels, labels_path).unwrap_err();
        assert_eq!(error.path(), Some(labels_path));

        let broken_gzip = &gzip(&images)[..20];
        let error = IdxData::parse(broken_gzip, images_path, &labels, labels_path).unwrap_err();
        assert!(matches!(error, DataError::Decompress { .. }), "{error}");
    }

    #[test]
    fn opens_directories_and_image_files_preferring_train() {
        let dir = test_dir("idx");
        let (images, labels) = synthetic_idx(5, 28, 28);
        std::fs::write(dir.join("t10k-images-idx3-ubyte"), &images).unwrap();
        std::fs::write(dir.join("t10k-labels-idx1-ubyte.gz"), gzip(&labels)).unwrap();
        let dataset = IdxDataset::open(&dir, GREY_28).unwrap();
        assert_eq!(dataset.len(), 5);
        assert!(dataset.describe().contains("t10k-images"), "{}", dataset.describe());

        let (images, labels) = synthetic_idx(7, 28, 28);
        std::fs::write(dir.join("train-images-idx3-ubyte.gz"), gzip(&images)).unwrap();
        std::fs::write(dir.join("train-labels-idx1-ubyte"), &labels).unwrap();
        assert_eq!(IdxDataset::open(&dir, GREY_28).unwrap().len(), 7);

        let file = dir.join("t10k-images-idx3-ubyte");
        let dataset = IdxDataset::open(&file, GREY_28).unwrap();
        assert_eq!(dataset.len(), 5);
        let example = dataset.get(2, Augment::default()).unwrap();
        assert_eq!(example.label, 2);
        assert_eq!(example.image[0], 2.0 / 127.5 - 1.0);

        std::fs::remove_file(dir.join("t10k-labels-idx1-ubyte.gz")).unwrap();
        let error = IdxDataset::open(&file, GREY_28).err().unwrap();
        assert!(error.to_string().contains("t10k-labels-idx1-ubyte"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
