//! Writing model inputs and samples as PNG files: one image, or a grid of a
//! batch (like `torchvision.utils.save_image(..., nrow, normalize=True,
//! value_range=(-1, 1))` in the official `sample.py`, with 2 pixels of
//! padding between tiles). Files are written atomically so that a viewer or a
//! crash never sees half a PNG.

use std::path::Path;

use crate::data::DataError;

/// The gap between tiles, in pixels, as `save_image`'s default `padding=2`.
const PADDING: usize = 2;

/// Maps a value in [-1, 1] (clamped) to a byte, rounding like
/// `save_image`'s `mul(255).add_(0.5).clamp_(0, 255)` on `(x + 1) / 2`.
pub(crate) fn to_byte(value: f32) -> u8 {
    let unit = (value.clamp(-1.0, 1.0) + 1.0) / 2.0;
    (unit * 255.0 + 0.5).clamp(0.0, 255.0) as u8
}

/// Saves a batch `images` of shape `[batch, C, H, W]` (C = 1 or 3, values in
/// [-1, 1]) as one PNG grid of `columns` tiles per row, 2-pixel black padding
/// between and around tiles. One channel gives a grey PNG, three an RGB one.
pub fn save_grid(path: &Path, images: &[f32], shape: [usize; 4], columns: usize) -> Result<(), DataError> {
    let [batch, channels, height, width] = shape;
    check(path, images, shape)?;
    if columns == 0 {
        return Err(DataError::corrupt(path, "a grid needs at least one column"));
    }
    let columns = columns.min(batch.max(1));
    let rows = batch.div_ceil(columns);
    let grid_width = columns * (width + PADDING) + PADDING;
    let grid_height = rows * (height + PADDING) + PADDING;
    let mut pixels = vec![0u8; grid_width * grid_height * channels];
    let plane = height * width;
    for (tile, image) in images.chunks_exact(channels * plane).enumerate() {
        let top = PADDING + (tile / columns) * (height + PADDING);
        let left = PADDING + (tile % columns) * (width + PADDING);
        for y in 0..height {
            for x in 0..width {
                for c in 0..channels {
                    let target = ((top + y) * grid_width + left + x) * channels + c;
                    pixels[target] = to_byte(image[c * plane + y * width + x]);
                }
            }
        }
    }
    write_png(path, pixels, grid_width, grid_height, channels)
}

/// Saves one image of shape `[C, H, W]` (C = 1 or 3, values in [-1, 1]) as a PNG.
pub fn save_png(path: &Path, image: &[f32], shape: [usize; 3]) -> Result<(), DataError> {
    let [channels, height, width] = shape;
    check(path, image, [1, channels, height, width])?;
    let plane = height * width;
    let pixels =
        (0..plane).flat_map(|p| (0..channels).map(move |c| c * plane + p)).map(|i| to_byte(image[i])).collect();
    write_png(path, pixels, width, height, channels)
}

fn check(path: &Path, values: &[f32], [batch, channels, height, width]: [usize; 4]) -> Result<(), DataError> {
    if channels != 1 && channels != 3 {
        return Err(DataError::corrupt(path, format!("cannot write {channels}-channel images as PNG (1 or 3)")));
    }
    if values.len() != batch * channels * height * width || height == 0 || width == 0 {
        return Err(DataError::corrupt(
            path,
            format!("{} values do not fill shape {:?}", values.len(), [batch, channels, height, width]),
        ));
    }
    Ok(())
}

/// Encodes interleaved 8-bit pixels as a PNG and writes it to `path`
/// atomically ([`diffmoe_weights::write_atomically`]).
pub(crate) fn write_png(
    path: &Path,
    pixels: Vec<u8>,
    width: usize,
    height: usize,
    channels: usize,
) -> Result<(), DataError> {
    let colour = if channels == 1 { image::ExtendedColorType::L8 } else { image::ExtendedColorType::Rgb8 };
    let mut png = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut png),
        &pixels,
        width as u32,
        height as u32,
        colour,
    )
    .map_err(|source| DataError::Image { path: path.to_path_buf(), source })?;
    Ok(diffmoe_weights::write_atomically(path, &png)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_dir;

    #[test]
    fn grid_round_trips_through_png() {
        let dir = test_dir("grid");
        // Three 2x3 RGB tiles: tile i has red = -1 + i, green 1, blue -1.
        let (h, w) = (2, 3);
        let images: Vec<f32> =
            (0..3).flat_map(|i| [vec![-1.0 + i as f32; h * w], vec![1.0; h * w], vec![-5.0; h * w]].concat()).collect();
        let path = dir.join("grid.png");
        save_grid(&path, &images, [3, 3, h, w], 2).unwrap();
        let png = image::open(&path).unwrap().to_rgb8();
        // Two columns and two rows of tiles with 2 pixels of padding.
        assert_eq!((png.width(), png.height()), (2 * (3 + 2) + 2, 2 * (2 + 2) + 2));
        assert_eq!(png.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(png.get_pixel(2, 2).0, [0, 255, 0]);
        assert_eq!(png.get_pixel(7 + 2, 3).0, [128, 255, 0]);
        assert_eq!(png.get_pixel(2, 6 + 1).0, [255, 255, 0]);
        // The empty fourth tile stays black.
        assert_eq!(png.get_pixel(8, 7).0, [0, 0, 0]);
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["grid.png"], "no temporary file is left");

        let grey: Vec<f32> = vec![-1.0, 0.0, 1.0, 0.5];
        save_png(&dir.join("one.png"), &grey, [1, 2, 2]).unwrap();
        let png = image::open(dir.join("one.png")).unwrap();
        assert_eq!(png.color(), image::ColorType::L8);
        assert_eq!(png.to_luma8().into_raw(), vec![0, 128, 255, 191]);

        let error = save_grid(&dir.join("bad.png"), &grey, [1, 4, 1, 1], 1).unwrap_err();
        assert!(error.to_string().contains("bad.png"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
