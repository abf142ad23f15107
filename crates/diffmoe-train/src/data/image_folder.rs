//! A folder of images with one subfolder per class, the layout of
//! `torchvision.datasets.ImageFolder` that the official `train.py` reads
//! ImageNet from: classes are the subfolders sorted by name (label = index),
//! examples are the `.png`/`.jpg`/`.jpeg` files in each, sorted by name. Files
//! are decoded lazily in `get`, so in the loader's worker threads.

use std::path::{Path, PathBuf};

use super::transform::{check_pixel_target, to_target, PixelImage, Spatial};
use super::{Augment, DataError, Dataset, Example, ImageShape};

/// The extensions read, compared case-insensitively.
const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

pub(crate) struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    /// Every image and its label, classes in order, files sorted within a class.
    files: Vec<(PathBuf, usize)>,
    target: ImageShape,
}

/// The sorted entries of a directory.
fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        entries.push(entry.map_err(|e| DataError::io(dir, e))?.path());
    }
    entries.sort();
    Ok(entries)
}

fn is_image(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

impl ImageFolder {
    /// Lists the classes and files under `root`; decodes nothing.
    pub fn open(root: &Path, target: ImageShape) -> Result<Self, DataError> {
        if !root.exists() {
            return Err(DataError::NotFound { path: root.to_path_buf() });
        }
        let mut classes = Vec::new();
        let mut files = Vec::new();
        for class_dir in sorted_entries(root)?.into_iter().filter(|p| p.is_dir()) {
            let label = classes.len();
            classes.push(class_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
            let images: Vec<_> =
                sorted_entries(&class_dir)?.into_iter().filter(|p| p.is_file() && is_image(p)).collect();
            // A class without images would shift no label but would never be
            // seen in training; it is more likely a mistake than intended.
            if images.is_empty() {
                return Err(DataError::Empty { path: class_dir, what: "images (.png, .jpg, .jpeg)" });
            }
            files.extend(images.into_iter().map(|p| (p, label)));
        }
        if classes.is_empty() {
            return Err(DataError::Empty { path: root.to_path_buf(), what: "class subfolders" });
        }
        let folder = ImageFolder { root: root.to_path_buf(), classes, files, target };
        check_pixel_target(&folder.describe(), target)?;
        Ok(folder)
    }

    /// The class names, indexed by label.
    #[cfg(test)]
    pub fn classes(&self) -> &[String] {
        &self.classes
    }
}

/// Decodes an image file to 8-bit RGB, dropping any alpha channel as
/// `PIL.Image.convert("RGB")` does.
fn decode(path: &Path) -> Result<PixelImage, DataError> {
    let image = image::ImageReader::open(path)
        .map_err(|e| DataError::io(path, e))?
        .with_guessed_format()
        .map_err(|e| DataError::io(path, e))?
        .decode()
        .map_err(|source| DataError::Image { path: path.to_path_buf(), source })?
        .into_rgb8();
    Ok(PixelImage {
        channels: 3,
        height: image.height() as usize,
        width: image.width() as usize,
        data: image.into_raw(),
    })
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn num_classes(&self) -> usize {
        self.classes.len()
    }

    fn shape(&self) -> ImageShape {
        self.target
    }

    fn get(&self, index: usize, augment: Augment) -> Result<Example, DataError> {
        let (path, label) = &self.files[index];
        let image = decode(path)?;
        Ok(Example { image: to_target(image, self.target, Spatial::CenterCrop, augment.flip), label: *label })
    }

    fn describe(&self) -> String {
        format!("image folder {}, {} images, {} classes", self.root.display(), self.files.len(), self.classes.len())
    }

    fn is_latent(&self) -> bool {
        false
    }
}

/// Writes a `width x height` RGB PNG filled with `rgb`, for tests.
#[cfg(test)]
pub(crate) fn write_test_png(path: &Path, width: u32, height: u32, rgb: [u8; 3]) {
    image::RgbImage::from_pixel(width, height, image::Rgb(rgb)).save(path).expect("write a test PNG");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_dir;

    const RGB_8: ImageShape = ImageShape { channels: 3, height: 8, width: 8 };

    #[test]
    fn two_classes_sorted_and_decoded() {
        let root = test_dir("folder");
        for (class, colour) in [("b_cats", [200, 10, 10]), ("a_dogs", [10, 200, 10])] {
            std::fs::create_dir(root.join(class)).unwrap();
            write_test_png(&root.join(class).join("2.png"), 12, 9, colour);
            write_test_png(&root.join(class).join("1.PNG"), 9, 12, colour);
            std::fs::write(root.join(class).join("notes.txt"), "not an image").unwrap();
        }
        let folder = ImageFolder::open(&root, RGB_8).unwrap();
        assert_eq!(folder.classes(), ["a_dogs", "b_cats"]);
        assert_eq!(folder.len(), 4);
        assert!(folder.files[0].0.ends_with("a_dogs/1.PNG"));
        let example = folder.get(3, Augment::default()).unwrap();
        assert_eq!(example.label, 1);
        assert_eq!(example.image.len(), 3 * 64);
        // A flat colour survives the crop exactly: red plane 200, green 10.
        assert!((example.image[0] - (200.0 / 127.5 - 1.0)).abs() < 1e-6);
        assert!((example.image[64] - (10.0 / 127.5 - 1.0)).abs() < 1e-6);

        let grey = ImageFolder::open(&root, ImageShape { channels: 1, ..RGB_8 }).unwrap();
        let luma = ((19595 * 10 + 38470 * 200 + 7471 * 10 + 0x8000) >> 16) as f32;
        assert_eq!(grey.get(0, Augment::default()).unwrap().image[0], luma / 127.5 - 1.0);

        std::fs::write(root.join("a_dogs").join("0.png"), b"\x89PNG truncated").unwrap();
        let folder = ImageFolder::open(&root, RGB_8).unwrap();
        let error = folder.get(0, Augment::default()).unwrap_err();
        assert!(matches!(error, DataError::Image { .. }), "{error}");
        assert!(error.to_string().contains("0.png"), "{error}");

        let four = ImageFolder::open(&root, ImageShape { channels: 4, ..RGB_8 });
        assert!(matches!(four.err().unwrap(), DataError::UnsupportedTarget { .. }));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn empty_folders_are_errors_naming_the_path() {
        let root = test_dir("folder-empty");
        let error = ImageFolder::open(&root, RGB_8).err().unwrap();
        assert!(matches!(&error, DataError::Empty { path, .. } if path == &root), "{error}");
        std::fs::create_dir(root.join("class")).unwrap();
        let error = ImageFolder::open(&root, RGB_8).err().unwrap();
        assert_eq!(error.path(), Some(root.join("class").as_path()));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
