//! Pixel conversions from a decoded 8-bit image to the model's input: channel
//! conversion (grey <-> RGB), the ADM centre crop of the official `train.py`
//! (`center_crop_arr`, itself from guided-diffusion), centred padding for
//! small images, a horizontal flip, and the `Normalize(0.5)` value mapping to
//! [-1, 1].
//!
//! The crop resamples with a port of Pillow's separable resampler
//! (`libImaging/Resample.c`: `precompute_coeffs`, 8-bit fixed point with 22
//! fractional bits), so that the BOX halving and the BICUBIC (a = -0.5) resize
//! are meant to produce the same bytes as `PIL.Image.resize` rather than
//! merely similar ones (the `image` crate's CatmullRom is the same kernel but
//! rounds differently). The port has not been compared against Pillow's
//! output byte for byte yet.

use super::ImageShape;

/// An 8-bit image with interleaved channels (HWC), as decoders produce it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PixelImage {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// `height * width * channels` bytes, row-major, channels interleaved.
    pub data: Vec<u8>,
}

/// How a pixel dataset reaches the target size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Spatial {
    /// Pad centred with black (-1 after normalisation) when the target is at
    /// least as large as the image, else the ADM centre crop. Used for the
    /// 28x28 IDX images, whose objects fill the frame, so that 28 -> 32 keeps
    /// every pixel instead of upsampling.
    PadOrCrop,
    /// Always the ADM centre crop, as the official training does for ImageNet.
    CenterCrop,
}

impl PixelImage {
    /// Converts to `channels` (1 or 3). Grey -> RGB replicates the channel;
    /// RGB -> grey is ITU-R 601-2 luma with Pillow's fixed-point rounding
    /// (`L = (19595 R + 38470 G + 7471 B + 2^15) >> 16`), which is what
    /// `Image.convert("L")` computes.
    ///
    /// # Panics
    /// If `channels` or `self.channels` is neither 1 nor 3 (callers check).
    pub fn with_channels(self, channels: usize) -> PixelImage {
        match (self.channels, channels) {
            (a, b) if a == b => self,
            (1, 3) => PixelImage { channels: 3, data: self.data.iter().flat_map(|&v| [v, v, v]).collect(), ..self },
            (3, 1) => PixelImage {
                channels: 1,
                data: self
                    .data
                    .chunks_exact(3)
                    .map(|rgb| {
                        let luma = 19595 * rgb[0] as u32 + 38470 * rgb[1] as u32 + 7471 * rgb[2] as u32;
                        ((luma + 0x8000) >> 16) as u8
                    })
                    .collect(),
                ..self
            },
            (from, to) => panic!("channel conversion {from} -> {to} is not supported"),
        }
    }

    /// Pads to `size x size`, centred (offset `floor((size - side) / 2)`), with zeros.
    ///
    /// # Panics
    /// If the image is larger than `size` in either dimension.
    pub fn pad_center(&self, size: usize) -> PixelImage {
        assert!(self.height <= size && self.width <= size, "pad_center to a smaller size");
        let c = self.channels;
        let top = (size - self.height) / 2;
        let left = (size - self.width) / 2;
        let mut data = vec![0u8; size * size * c];
        for y in 0..self.height {
            let src = &self.data[y * self.width * c..(y + 1) * self.width * c];
            let start = ((y + top) * size + left) * c;
            data[start..start + src.len()].copy_from_slice(src);
        }
        PixelImage { channels: c, height: size, width: size, data }
    }

    /// The ADM centre crop to `size x size`:
    ///
    /// ```python
    /// while min(*pil_image.size) >= 2 * image_size:
    ///     pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    /// scale = image_size / min(*pil_image.size)
    /// pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    /// crop_y = (arr.shape[0] - image_size) // 2; crop_x = (arr.shape[1] - image_size) // 2
    /// ```
    pub fn center_crop_adm(&self, size: usize) -> PixelImage {
        let mut image = self.clone();
        while image.width.min(image.height) >= 2 * size {
            image = image.resample(image.width / 2, image.height / 2, Filter::Box);
        }
        let scale = size as f64 / image.width.min(image.height) as f64;
        // Python's round() rounds halves to even.
        let width = (image.width as f64 * scale).round_ties_even() as usize;
        let height = (image.height as f64 * scale).round_ties_even() as usize;
        image = image.resample(width.max(size), height.max(size), Filter::Bicubic);
        let top = (image.height - size) / 2;
        let left = (image.width - size) / 2;
        let c = image.channels;
        let mut data = Vec::with_capacity(size * size * c);
        for y in top..top + size {
            let row = (y * image.width + left) * c;
            data.extend_from_slice(&image.data[row..row + size * c]);
        }
        PixelImage { channels: c, height: size, width: size, data }
    }

    /// Resamples to `width x height` like Pillow: a horizontal pass, then a
    /// vertical one, each rounded to 8 bits. A pass whose size does not
    /// change is skipped, as in Pillow.
    fn resample(&self, width: usize, height: usize, filter: Filter) -> PixelImage {
        let mut image = self.clone();
        if width != image.width {
            let coeffs = Coefficients::new(image.width, width, filter);
            let c = image.channels;
            let mut data = vec![0u8; image.height * width * c];
            for y in 0..image.height {
                let row = &image.data[y * image.width * c..(y + 1) * image.width * c];
                for x in 0..width {
                    let (start, weights) = coeffs.get(x);
                    for ch in 0..c {
                        let taps = weights.iter().enumerate().map(|(i, &w)| (row[(start + i) * c + ch], w));
                        data[(y * width + x) * c + ch] = convolve(taps);
                    }
                }
            }
            image = PixelImage { width, data, ..image };
        }
        if height != image.height {
            let coeffs = Coefficients::new(image.height, height, filter);
            let c = image.channels;
            let stride = image.width * c;
            let mut data = vec![0u8; height * stride];
            for y in 0..height {
                let (start, weights) = coeffs.get(y);
                for i in 0..stride {
                    let taps = weights.iter().enumerate().map(|(k, &w)| (image.data[(start + k) * stride + i], w));
                    data[y * stride + i] = convolve(taps);
                }
            }
            image = PixelImage { height, data, ..image };
        }
        image
    }

    /// Converts to CHW floats in [-1, 1] (`x / 127.5 - 1`, i.e. `ToTensor`
    /// then `Normalize(0.5, 0.5)`), mirrored horizontally when `flip`.
    pub fn to_chw(&self, flip: bool) -> Vec<f32> {
        let (c, h, w) = (self.channels, self.height, self.width);
        let mut out = vec![0f32; c * h * w];
        for y in 0..h {
            for x in 0..w {
                let source_x = if flip { w - 1 - x } else { x };
                for ch in 0..c {
                    let value = self.data[(y * w + source_x) * c + ch];
                    out[(ch * h + y) * w + x] = value as f32 / 127.5 - 1.0;
                }
            }
        }
        out
    }
}

/// Converts a decoded image to the target shape and flips it if asked.
///
/// # Panics
/// If `target` is not square with 1 or 3 channels; `check_pixel_target`
/// rejects such targets when a dataset is opened.
pub(crate) fn to_target(image: PixelImage, target: ImageShape, spatial: Spatial, flip: bool) -> Vec<f32> {
    let size = target.height;
    let image = image.with_channels(target.channels);
    let fits = image.height <= size && image.width <= size;
    let image = match spatial {
        Spatial::PadOrCrop if fits => image.pad_center(size),
        _ => image.center_crop_adm(size),
    };
    image.to_chw(flip)
}

/// Checks that pixels can be converted to `target`: square, 1 or 3 channels.
pub(crate) fn check_pixel_target(dataset: &str, target: ImageShape) -> Result<(), super::DataError> {
    let reason = if target.channels != 1 && target.channels != 3 {
        "pixel datasets give 1 or 3 channels; a model with other input channels needs latents"
    } else if target.height != target.width {
        "the centre crop produces square images only"
    } else if target.height == 0 {
        "the input size is zero"
    } else {
        return Ok(());
    };
    Err(super::DataError::UnsupportedTarget { dataset: dataset.to_string(), target, reason })
}

/// Pillow's resampling filters used by the ADM crop.
#[derive(Clone, Copy, Debug)]
enum Filter {
    Box,
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Box => 0.5,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                // Pillow's bicubic_filter with a = -0.5 (Catmull-Rom).
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// Fractional bits of Pillow's 8-bit fixed-point coefficients (`PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per-output-pixel filter taps of one resampling pass (`precompute_coeffs`
/// followed by `normalize_coeffs_8bpc`).
struct Coefficients {
    /// First input pixel of each output pixel.
    starts: Vec<usize>,
    /// Fixed-point weights, `taps` per output pixel.
    weights: Vec<i64>,
    counts: Vec<usize>,
    taps: usize,
}

impl Coefficients {
    fn new(in_size: usize, out_size: usize, filter: Filter) -> Self {
        let scale = in_size as f64 / out_size as f64;
        let filter_scale = scale.max(1.0);
        let support = filter.support() * filter_scale;
        let taps = support.ceil() as usize * 2 + 1;
        let mut starts = Vec::with_capacity(out_size);
        let mut counts = Vec::with_capacity(out_size);
        let mut weights = vec![0i64; out_size * taps];
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            // Pillow truncates towards zero here (C casts), then clamps.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let count = xmax.saturating_sub(xmin);
            // Multiplying by the reciprocal, as Pillow does, keeps BOX taps
            // that fall exactly on +-0.5 on the same side of the boundary.
            let ss = 1.0 / filter_scale;
            let mut k: Vec<f64> =
                (0..count).map(|x| filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss)).collect();
            let total: f64 = k.iter().sum();
            if total != 0.0 {
                k.iter_mut().for_each(|w| *w /= total);
            }
            for (x, w) in k.iter().enumerate() {
                let fixed = w * (1i64 << PRECISION_BITS) as f64;
                weights[xx * taps + x] = if *w < 0.0 { (fixed - 0.5) as i64 } else { (fixed + 0.5) as i64 };
            }
            starts.push(xmin);
            counts.push(count);
        }
        Coefficients { starts, weights, counts, taps }
    }

    fn get(&self, out: usize) -> (usize, &[i64]) {
        let row = &self.weights[out * self.taps..out * self.taps + self.counts[out]];
        (self.starts[out], row)
    }
}

/// One fixed-point tap sum, rounded and clipped to 8 bits like Pillow's `clip8`.
fn convolve(taps: impl Iterator<Item = (u8, i64)>) -> u8 {
    let sum: i64 = (1i64 << (PRECISION_BITS - 1)) + taps.map(|(v, w)| v as i64 * w).sum::<i64>();
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grey(width: usize, height: usize, f: impl Fn(usize, usize) -> u8) -> PixelImage {
        PixelImage {
            channels: 1,
            height,
            width,
            data: (0..height).flat_map(|y| (0..width).map(move |x| (y, x))).map(|(y, x)| f(x, y)).collect(),
        }
    }

    #[test]
    fn box_halving_averages_two_by_two_blocks() {
        let image = grey(4, 2, |x, y| (x * 10 + y * 100) as u8);
        let half = image.resample(2, 1, Filter::Box);
        // Block means: (0+10+100+110)/4 = 55 and (20+30+120+130)/4 = 75.
        assert_eq!(half.data, vec![55, 75]);
    }

    #[test]
    fn bicubic_keeps_constant_images_and_same_size_is_identity() {
        let flat = grey(7, 5, |_, _| 77);
        let resized = flat.resample(3, 9, Filter::Bicubic);
        assert_eq!((resized.width, resized.height), (3, 9));
        assert!(resized.data.iter().all(|&v| v == 77));
        let image = grey(6, 6, |x, y| (x * 40 + y) as u8);
        assert_eq!(image.resample(6, 6, Filter::Bicubic), image);
    }

    #[test]
    fn adm_center_crop_halves_then_resizes_then_crops_the_centre() {
        // 20 x 10 -> size 4: min side 10 >= 8, so one box halving to 10 x 5;
        // 5 < 8 stops; scale 4/5 gives round(8.0) x round(4.0) = 8 x 4
        // bicubic; the crop takes columns 2..6.
        let image = grey(20, 10, |x, _| if x < 10 { 0 } else { 200 });
        let out = image.center_crop_adm(4);
        assert_eq!((out.width, out.height, out.channels), (4, 4, 1));
        // Left half dark, right half bright, every row the same.
        for row in out.data.chunks(4) {
            assert_eq!(row, out.data[..4].to_vec().as_slice());
            assert!(row[0] < 30 && row[3] > 170, "{row:?}");
        }
        // An exactly square image of the target size is returned unchanged.
        let square = grey(4, 4, |x, y| (x * 50 + y) as u8);
        assert_eq!(square.center_crop_adm(4), square);
    }

    #[test]
    fn adm_crop_offsets_floor_the_margin() {
        // 7 x 4 -> size 4: bicubic is skipped (same size), crop_x = (7-4)//2 = 1.
        let image = grey(7, 4, |x, _| x as u8 * 10);
        let out = image.center_crop_adm(4);
        assert_eq!(&out.data[..4], &[10, 20, 30, 40]);
    }

    #[test]
    fn padding_is_centred_and_black() {
        let image = grey(2, 2, |_, _| 255);
        let padded = image.pad_center(5);
        // Offset floor(3/2) = 1: rows and columns 1..3 are white.
        let expected: Vec<u8> = (0..5)
            .flat_map(|y| (0..5).map(move |x| if (1..3).contains(&x) && (1..3).contains(&y) { 255 } else { 0 }))
            .collect();
        assert_eq!(padded.data, expected);
        let values = padded.to_chw(false);
        assert_eq!(values[0], -1.0);
        assert_eq!(values[6], 1.0);
    }

    #[test]
    fn channels_and_flip() {
        let rgb = PixelImage { channels: 3, height: 1, width: 2, data: vec![255, 0, 0, 10, 10, 10] };
        // 601 luma of pure red is 76; grey stays grey.
        assert_eq!(rgb.clone().with_channels(1).data, vec![76, 10]);
        let back = rgb.with_channels(1).with_channels(3);
        assert_eq!(back.data, vec![76, 76, 76, 10, 10, 10]);
        let image = grey(3, 1, |x, _| [0, 255, 51][x]);
        assert_eq!(image.to_chw(false), vec![-1.0, 1.0, 51.0 / 127.5 - 1.0]);
        assert_eq!(image.to_chw(true), vec![51.0 / 127.5 - 1.0, 1.0, -1.0]);
    }
}
