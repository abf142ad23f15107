//! The bilinear resize of pytorch-fid's `InceptionV3.forward`:
//! `F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)`
//! without antialiasing (also when downsampling), as PyTorch's
//! `upsample_bilinear2d` computes it (`aten/src/ATen/native/UpSample.h`,
//! `area_pixel_compute_source_index` and `guard_index_and_lambda`).
//!
//! Written as index arithmetic on the host and two gathers per axis on the
//! device rather than burn's `interpolate`, so that the source coordinates
//! are exactly PyTorch's float32 ones on every backend.

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

/// The source taps of one output axis.
#[derive(Debug, Clone, PartialEq)]
pub struct AxisTaps {
    /// Lower source index of each output position.
    pub i0: Vec<i64>,
    /// Upper source index (`min(i0 + 1, in - 1)`).
    pub i1: Vec<i64>,
    /// Weight of `i0` (`1 - l1`).
    pub l0: Vec<f32>,
    /// Weight of `i1` (the fractional part of the source coordinate).
    pub l1: Vec<f32>,
}

/// PyTorch's taps for resizing an axis of `input` samples to `output`
/// (`align_corners=False`, no scale factor given): `scale = in / out` and
/// `src = max((dst + 0.5) * scale - 0.5, 0)`, both in float32, the latter
/// as one fused multiply-add.
///
/// # Panics
/// If either size is zero.
pub fn axis_taps(input: usize, output: usize) -> AxisTaps {
    assert!(input > 0 && output > 0, "cannot resize an axis of {input} samples to {output}");
    let scale = input as f32 / output as f32;
    let last = input as i64 - 1;
    let mut taps = AxisTaps {
        i0: Vec::with_capacity(output),
        i1: Vec::with_capacity(output),
        l0: Vec::with_capacity(output),
        l1: Vec::with_capacity(output),
    };
    for dst in 0..output {
        // PyTorch: `scale * (dst + 0.5) - 0.5`, negative values clamped to 0.
        // Its compiled CPU kernel contracts this into one fused multiply-add
        // (one rounding); the fused form matches the fixtures to 2e-7, the
        // twice-rounded one only to 6e-6.
        let src = scale.mul_add(dst as f32 + 0.5, -0.5).max(0.0);
        let i0 = (src.floor() as i64).min(last);
        let i1 = (i0 + 1).min(last);
        let l1 = (src - i0 as f32).clamp(0.0, 1.0);
        taps.i0.push(i0);
        taps.i1.push(i1);
        taps.l0.push(1.0 - l1);
        taps.l1.push(l1);
    }
    taps
}

/// Bilinear resize with `align_corners=False` and no antialiasing, equal to
/// `F.interpolate(x, size, mode="bilinear", align_corners=False)`:
/// `out = l0h (l0w x[i0h, i0w] + l1w x[i0h, i1w]) + l1h (l0w x[i1h, i0w] + l1w x[i1h, i1w])`.
///
/// # Shapes
/// - `x`: `[batch, channels, in_height, in_width]` -> `[batch, channels, height, width]`
pub fn bilinear_resize<B: Backend>(x: Tensor<B, 4>, size: [usize; 2]) -> Tensor<B, 4> {
    let [_, _, in_h, in_w] = x.dims();
    let device = x.device();
    let index = |v: Vec<i64>| Tensor::<B, 1, Int>::from_data(TensorData::new(v.clone(), [v.len()]), &device);
    let weight = |v: Vec<f32>, shape: [usize; 4]| Tensor::<B, 4>::from_data(TensorData::new(v, shape), &device);

    let w = axis_taps(in_w, size[1]);
    let rows = x.clone().select(3, index(w.i0)) * weight(w.l0, [1, 1, 1, size[1]])
        + x.select(3, index(w.i1)) * weight(w.l1, [1, 1, 1, size[1]]); // [batch, channels, in_height, width]

    let h = axis_taps(in_h, size[0]);
    rows.clone().select(2, index(h.i0)) * weight(h.l0, [1, 1, size[0], 1])
        + rows.select(2, index(h.i1)) * weight(h.l1, [1, 1, size[0], 1]) // [batch, channels, height, width]
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn same_size_is_the_identity_tap() {
        let taps = axis_taps(299, 299);
        assert!(taps.i0.iter().enumerate().all(|(i, &j)| j == i as i64));
        assert!(taps.l1.iter().all(|&l| l == 0.0));
    }

    #[test]
    fn upsampling_taps_match_pytorch() {
        // F.interpolate(torch.arange(4.)[None, None, None], size=(1, 8), mode="bilinear")
        // = [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3].
        let x = Tensor::<Flex, 4>::from_data(
            TensorData::new(vec![0.0f32, 1.0, 2.0, 3.0], [1, 1, 1, 4]),
            &Default::default(),
        );
        let y = bilinear_resize(x, [1, 8]).into_data().to_vec::<f32>().unwrap();
        assert_eq!(y, vec![0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0]);
    }

    #[test]
    fn downsampling_has_no_antialias() {
        // 8 -> 2: scale 4, src = 1.5 and 5.5: the mean of two neighbours only.
        let x = Tensor::<Flex, 4>::from_data(
            TensorData::new((0..8).map(|v| v as f32).collect::<Vec<_>>(), [1, 1, 8, 1]),
            &Default::default(),
        );
        let y = bilinear_resize(x, [2, 1]).into_data().to_vec::<f32>().unwrap();
        assert_eq!(y, vec![1.5, 5.5]);
    }
}
