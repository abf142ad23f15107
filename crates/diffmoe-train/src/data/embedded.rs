//! The embedded dataset: the Fashion-MNIST test split (10,000 grey 28x28
//! images of 10 clothing classes, Zalando SE, MIT licence; see
//! `crates/diffmoe-train/data/fashion-mnist/`), compiled into the binary so
//! that a tiny model can be trained and sampled with no download at all.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use super::idx::{IdxData, IdxDataset};
use super::{DataError, ImageShape};

/// The class names of Fashion-MNIST, indexed by label.
pub const FASHION_MNIST_CLASSES: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

const IMAGES: &[u8] = include_bytes!("../../data/fashion-mnist/t10k-images-idx3-ubyte.gz");
const LABELS: &[u8] = include_bytes!("../../data/fashion-mnist/t10k-labels-idx1-ubyte.gz");

/// The path errors name: the embedded files as they lie in the source tree.
const IMAGES_PATH: &str = "<embedded>/fashion-mnist/t10k-images-idx3-ubyte.gz";
const LABELS_PATH: &str = "<embedded>/fashion-mnist/t10k-labels-idx1-ubyte.gz";

/// Decodes the embedded files once per process: decompressing 4 MB takes
/// long enough in a debug build that tests opening it repeatedly would notice.
fn decoded() -> Result<Arc<IdxData>, DataError> {
    static DECODED: OnceLock<Arc<IdxData>> = OnceLock::new();
    if let Some(data) = DECODED.get() {
        return Ok(data.clone());
    }
    let data = Arc::new(IdxData::parse(IMAGES, Path::new(IMAGES_PATH), LABELS, Path::new(LABELS_PATH))?);
    Ok(DECODED.get_or_init(|| data).clone())
}

/// Opens the embedded Fashion-MNIST test split converted to `target`.
pub(crate) fn open_fashion_mnist(target: ImageShape) -> Result<IdxDataset, DataError> {
    let data = decoded()?;
    let description =
        format!("Fashion-MNIST test split (embedded), {} images, {} classes", data.len(), data.num_classes());
    IdxDataset::from_data(data, target, description)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Augment, Dataset};

    #[test]
    fn opens_ten_thousand_padded_examples() {
        let target = ImageShape { channels: 1, height: 32, width: 32 };
        let dataset = open_fashion_mnist(target).unwrap();
        assert_eq!(dataset.len(), 10_000);
        assert_eq!(dataset.num_classes(), 10);
        assert_eq!(dataset.shape(), target);
        assert_eq!(dataset.describe(), "Fashion-MNIST test split (embedded), 10000 images, 10 classes");
        let mut counts = [0usize; 10];
        for index in (0..dataset.len()).step_by(97) {
            let example = dataset.get(index, Augment::default()).unwrap();
            counts[example.label] += 1;
            assert_eq!(example.image.len(), 32 * 32);
            assert!(example.image.iter().all(|v| (-1.0..=1.0).contains(v)));
            // 28 -> 32 pads 2 pixels of background on every side.
            for y in 0..32 {
                for x in 0..32 {
                    if !(2..30).contains(&x) || !(2..30).contains(&y) {
                        assert_eq!(example.image[y * 32 + x], -1.0, "({y}, {x}) of {index}");
                    }
                }
            }
        }
        assert!(counts.iter().all(|&c| c > 0), "{counts:?}");
        // The test split is balanced: 1000 images per class.
        let data = decoded().unwrap();
        assert!((0..10).all(|c| data.labels.iter().filter(|&&l| l == c).count() == 1000));
    }

    #[test]
    fn converts_to_three_channels_and_flips() {
        let target = ImageShape { channels: 3, height: 32, width: 32 };
        let dataset = open_fashion_mnist(target).unwrap();
        let plain = dataset.get(0, Augment::default()).unwrap();
        let flipped = dataset.get(0, Augment { flip: true, seed: 0 }).unwrap();
        let plane = 32 * 32;
        assert_eq!(plain.image[..plane], plain.image[plane..2 * plane]);
        assert_eq!(plain.image[..plane], plain.image[2 * plane..]);
        for y in 0..32 {
            for x in 0..32 {
                assert_eq!(plain.image[y * 32 + x], flipped.image[y * 32 + 31 - x]);
            }
        }
        assert_ne!(plain.image, flipped.image);
    }
}
