//! The files of a sampling run (`diffmoe sample`), written batch by batch
//! as samples come:
//!
//! ```text
//! GRID.png                 the first samples, one column per class
//! DIR/000000.png ...       one PNG per sample
//! DIR/samples.npz          arr_0: uint8 [N, H, W, C] images, arr_1: int64 [N] labels
//!                          (the layout of the ADM / DiT sampling scripts and evaluators)
//! DIR/samples_raw.npz      samples: float32 [N, C, H, W] as the sampler returned them,
//!                          labels: int64 [N]
//! ```
//!
//! The images are the samples themselves for pixel models, or the samples
//! decoded by the VAE for latent models (`samples_raw.npz` then holds the
//! latents). Latent samples with no decoder cannot be shown: only
//! `samples_raw.npz` is written, and [`SampleFiles::images`] says so.
//! Every file is written under a temporary name and renamed when complete.

use std::path::{Path, PathBuf};

use diffmoe_model::RunConfig;

use crate::data::DataError;
use crate::image_grid::{save_grid, save_png, to_byte};
use crate::npz::NpzWriter;

/// The most tiles a grid shows; further samples go to the directory only.
pub const GRID_MAX_TILES: usize = 1024;
/// The most columns of a grid (one per class up to this).
pub const GRID_MAX_COLUMNS: usize = 32;

/// The raw array file of a run.
pub const RAW_FILE: &str = "samples_raw.npz";
/// The image array file of a run.
pub const IMAGES_FILE: &str = "samples.npz";

/// What a model's samples are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleSpace {
    /// Images in `[-1, 1]` with 1 or 3 channels.
    Pixels,
    /// Autoencoder latents (a `latents:` training set, or neither 1 nor 3 channels).
    Latents,
}

impl SampleSpace {
    /// The space of a run's samples, from its data and channels.
    pub fn of(config: &RunConfig) -> Self {
        let channels = config.model.in_channels;
        if config.train.data.source.trim().starts_with("latents:") || !(channels == 1 || channels == 3) {
            Self::Latents
        } else {
            Self::Pixels
        }
    }
}

/// What was written.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleFiles {
    /// The grid, when the samples are images.
    pub grid: Option<PathBuf>,
    /// Samples shown in the grid.
    pub grid_tiles: usize,
    /// The per-sample PNGs and the array files.
    pub dir: PathBuf,
    /// Whether the samples are images (1 or 3 channels); latents are not.
    pub images: bool,
    /// The raw samples.
    pub raw: PathBuf,
    /// The uint8 images, when the samples are images.
    pub image_array: Option<PathBuf>,
    /// Samples written.
    pub count: usize,
}

/// Writes the samples of a run in order, batch by batch.
#[derive(Debug)]
pub struct SampleWriter {
    grid_path: PathBuf,
    dir: PathBuf,
    /// `[C, H, W]` of one raw sample.
    raw_shape: [usize; 3],
    /// `[C, H, W]` of one image, when there are images.
    image_shape: Option<[usize; 3]>,
    total: usize,
    columns: usize,
    grid_tiles: usize,
    grid: Vec<f32>,
    raw: NpzWriter,
    images: Option<NpzWriter>,
    written: usize,
}

impl SampleWriter {
    /// Prepares the files of `labels.len()` samples of `raw_shape`
    /// (`[C, H, W]`) and, when there are images (pixel samples, or decoded
    /// latents), of images of `image_shape` (1 or 3 channels), with `columns`
    /// grid columns (capped at [`GRID_MAX_COLUMNS`]).
    ///
    /// # Errors
    /// If the directory cannot be created or a file cannot be started.
    pub fn create(
        grid_path: &Path,
        dir: &Path,
        raw_shape: [usize; 3],
        image_shape: Option<[usize; 3]>,
        labels: &[usize],
        columns: usize,
    ) -> Result<Self, DataError> {
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        if let Some(parent) = grid_path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
        }
        if let Some([c, ..]) = image_shape.filter(|[c, ..]| *c != 1 && *c != 3) {
            return Err(DataError::corrupt(dir, format!("cannot write {c}-channel images (1 or 3)")));
        }
        let n = labels.len();
        let labels: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
        let mut raw = NpzWriter::create(&dir.join(RAW_FILE))?;
        raw.array("labels", &[n], &labels)?;
        let [c, h, w] = raw_shape;
        raw.begin::<f32>("samples", &[n, c, h, w])?;
        let images = match image_shape {
            Some([c, h, w]) => {
                let mut images = NpzWriter::create(&dir.join(IMAGES_FILE))?;
                images.array("arr_1", &[n], &labels)?;
                images.begin::<u8>("arr_0", &[n, h, w, c])?;
                Some(images)
            }
            None => None,
        };
        let columns = columns.clamp(1, GRID_MAX_COLUMNS);
        let grid_tiles = if n <= GRID_MAX_TILES { n } else { GRID_MAX_TILES / columns * columns };
        Ok(Self {
            grid_path: grid_path.to_path_buf(),
            dir: dir.to_path_buf(),
            raw_shape,
            image_shape,
            total: n,
            columns,
            grid_tiles,
            grid: Vec::new(),
            raw,
            images,
            written: 0,
        })
    }

    /// Whether the samples are images.
    pub fn is_image(&self) -> bool {
        self.images.is_some()
    }

    /// The next samples, `raw` `[n, C, H, W]` in C order, with their images
    /// (`[n, C', H', W']`) when the writer has images.
    ///
    /// # Errors
    /// If the values do not fill whole samples, images are missing or
    /// unexpected, more samples come than were announced, or a file cannot
    /// be written.
    pub fn write(&mut self, raw: &[f32], images: Option<&[f32]>) -> Result<(), DataError> {
        let per = self.raw_shape.iter().product::<usize>();
        let n = raw.len() / per;
        if !raw.len().is_multiple_of(per) || self.written + n > self.total {
            return Err(DataError::corrupt(
                &self.dir,
                format!("{} values do not fit the remaining samples", raw.len()),
            ));
        }
        let images = match (self.image_shape, images) {
            (Some(shape), Some(values)) if values.len() == n * shape.iter().product::<usize>() => Some((shape, values)),
            (None, None) => None,
            _ => return Err(DataError::corrupt(&self.dir, "the images do not match the samples")),
        };
        self.raw.extend(raw)?;
        if let Some(([c, h, w], values)) = images {
            for image in values.chunks_exact(c * h * w) {
                // [C, H, W] -> [H, W, C] bytes.
                let bytes: Vec<u8> =
                    (0..h * w).flat_map(|p| (0..c).map(move |ch| ch * h * w + p)).map(|i| to_byte(image[i])).collect();
                self.images.as_mut().expect("images come with an image file").extend(&bytes)?;
                save_png(&self.dir.join(format!("{:06}.png", self.written)), image, [c, h, w])?;
                if self.written < self.grid_tiles {
                    self.grid.extend_from_slice(image);
                }
                self.written += 1;
            }
        } else {
            self.written += n;
        }
        Ok(())
    }

    /// Completes the array files and writes the grid.
    ///
    /// # Errors
    /// If samples are missing or a file cannot be written.
    pub fn finish(self) -> Result<SampleFiles, DataError> {
        let raw = self.raw.finish()?;
        let image_array = self.images.map(NpzWriter::finish).transpose()?;
        let grid = match self.image_shape {
            Some([c, h, w]) if self.grid_tiles > 0 => {
                save_grid(&self.grid_path, &self.grid, [self.grid_tiles, c, h, w], self.columns)?;
                Some(self.grid_path)
            }
            _ => None,
        };
        Ok(SampleFiles {
            grid,
            grid_tiles: self.grid_tiles,
            dir: self.dir,
            images: image_array.is_some(),
            raw,
            image_array,
            count: self.written,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_dir;
    use crate::npz::read_npz;

    #[test]
    fn images_and_arrays_hold_every_sample_in_order() {
        let dir = test_dir("sample-files");
        let labels = [0usize, 1, 2, 0, 1, 2, 0];
        let mut writer =
            SampleWriter::create(&dir.join("grid.png"), &dir.join("out"), [1, 2, 2], Some([1, 2, 2]), &labels, 3)
                .unwrap();
        let values: Vec<f32> = (0..7 * 4).map(|i| i as f32 / 14.0 - 1.0).collect();
        writer.write(&values[..12], Some(&values[..12])).unwrap();
        assert!(writer.write(&values[12..], None).is_err(), "images are missing");
        writer.write(&values[12..], Some(&values[12..])).unwrap();
        assert!(writer.write(&values[..4], Some(&values[..4])).is_err(), "more samples than announced");
        let files = writer.finish().unwrap();
        assert_eq!(files.count, 7);
        assert_eq!(files.grid_tiles, 7);
        let png = image::open(files.grid.unwrap()).unwrap();
        assert_eq!((png.width(), png.height()), (3 * 4 + 2, 3 * 4 + 2));
        assert!(dir.join("out/000006.png").is_file());
        let raw = read_npz(&files.raw).unwrap();
        assert_eq!(raw["samples"].shape, vec![7, 1, 2, 2]);
        assert_eq!(raw["samples"].values[5], values[5] as f64);
        assert_eq!(raw["labels"].values, labels.iter().map(|&l| l as f64).collect::<Vec<_>>());
        let images = read_npz(&files.image_array.unwrap()).unwrap();
        assert_eq!(images["arr_0"].shape, vec![7, 2, 2, 1]);
        assert_eq!(images["arr_0"].values[0], 0.0);
        assert_eq!(images["arr_0"].values[27], to_byte(values[27]) as f64);

        // Latents without a decoder: raw arrays only.
        let mut latents =
            SampleWriter::create(&dir.join("l.png"), &dir.join("lat"), [4, 1, 1], None, &[3, 5], 2).unwrap();
        assert!(!latents.is_image());
        latents.write(&[0.0; 8], None).unwrap();
        let files = latents.finish().unwrap();
        assert!(files.grid.is_none() && files.image_array.is_none() && !files.images);
        assert!(!dir.join("lat/000000.png").exists());
        assert_eq!(read_npz(&files.raw).unwrap()["samples"].shape, vec![2, 4, 1, 1]);
        // Decoded latents: raw latents and 3-channel images of another size.
        let mut decoded =
            SampleWriter::create(&dir.join("d.png"), &dir.join("dec"), [4, 1, 1], Some([3, 8, 8]), &[3, 5], 2).unwrap();
        decoded.write(&[0.0; 8], Some(&[0.5; 2 * 3 * 64])).unwrap();
        let files = decoded.finish().unwrap();
        assert_eq!(read_npz(&files.raw).unwrap()["samples"].shape, vec![2, 4, 1, 1]);
        assert_eq!(read_npz(files.image_array.as_ref().unwrap()).unwrap()["arr_0"].shape, vec![2, 8, 8, 3]);
        assert!(dir.join("dec/000001.png").is_file() && files.grid.is_some());

        let error =
            SampleWriter::create(&dir.join("g.png"), &dir.join("short"), [1, 1, 1], Some([1, 1, 1]), &[0, 0], 1)
                .unwrap()
                .finish()
                .unwrap_err();
        assert!(error.to_string().contains("missing"), "{error}");
        let mut config = diffmoe_model::preset("diffmoe-s-e16-flow").unwrap();
        assert_eq!(SampleSpace::of(&config), SampleSpace::Latents);
        config.model.in_channels = 3;
        assert_eq!(SampleSpace::of(&config), SampleSpace::Pixels);
        config.train.data.source = "latents:cache".into();
        assert_eq!(SampleSpace::of(&config), SampleSpace::Latents);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
