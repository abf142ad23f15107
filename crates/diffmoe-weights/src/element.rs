//! The element types of weight files and their little-endian decoding to
//! f32: one table for safetensors files (`safetensors::Dtype`) and torch
//! storages (`torch.FloatStorage`, ...), which store the same types.

use safetensors::Dtype;

/// Converts the little-endian bytes of one element to f32.
pub(crate) type Decode = fn(&[u8]) -> f32;

/// An element type a weight file may store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Element {
    /// IEEE binary64, rounded to nearest.
    F64,
    /// IEEE binary32.
    F32,
    /// IEEE binary16, exact.
    F16,
    /// bfloat16, exact.
    BF16,
    /// Signed 64-bit integers (rounded beyond 2^24 in magnitude).
    I64,
    /// Signed 32-bit integers (rounded beyond 2^24 in magnitude).
    I32,
    /// Signed 16-bit integers.
    I16,
    /// Signed 8-bit integers.
    I8,
    /// Unsigned bytes.
    U8,
    /// Booleans as 0 and 1.
    Bool,
}

impl Element {
    /// The element type of a safetensors dtype; `None` for those without an
    /// f32 reading here (unsigned wider than a byte, the float8 types).
    pub fn from_safetensors(dtype: Dtype) -> Option<Self> {
        Some(match dtype {
            Dtype::F64 => Self::F64,
            Dtype::F32 => Self::F32,
            Dtype::F16 => Self::F16,
            Dtype::BF16 => Self::BF16,
            Dtype::I64 => Self::I64,
            Dtype::I32 => Self::I32,
            Dtype::I16 => Self::I16,
            Dtype::I8 => Self::I8,
            Dtype::U8 => Self::U8,
            Dtype::BOOL => Self::Bool,
            _ => return None,
        })
    }

    /// Whether a value of this type is a float (weights are; counters such
    /// as batch norm's `num_batches_tracked` are not).
    pub fn is_float(self) -> bool {
        matches!(self, Self::F64 | Self::F32 | Self::F16 | Self::BF16)
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    /// The decoder of one element (its [`Element::size`] bytes).
    pub(crate) fn decoder(self) -> Decode {
        match self {
            Self::F64 => |b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32,
            Self::F32 => |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            Self::F16 => |b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])),
            Self::BF16 => |b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16),
            Self::I64 => |b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32,
            Self::I32 => |b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32,
            Self::I16 => |b| f32::from(i16::from_le_bytes([b[0], b[1]])),
            Self::I8 => |b| f32::from(b[0] as i8),
            Self::U8 => |b| f32::from(b[0]),
            Self::Bool => |b| if b[0] != 0 { 1.0 } else { 0.0 },
        }
    }

    /// Every element of `bytes` (a whole number of elements, little-endian).
    ///
    /// # Panics
    /// If `bytes` is not a whole number of elements.
    pub fn decode_all(self, bytes: &[u8]) -> Vec<f32> {
        let size = self.size();
        assert!(bytes.len().is_multiple_of(size), "{} bytes are not a whole number of {self:?} elements", bytes.len());
        let decode = self.decoder();
        bytes.chunks_exact(size).map(decode).collect()
    }
}

/// IEEE binary16 to binary32 (exact: subnormals, infinities and NaN included).
fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exponent = u32::from((h >> 10) & 0x1f);
    let mantissa = u32::from(h & 0x3ff);
    match (exponent, mantissa) {
        (0, 0) => f32::from_bits(sign),
        (0, _) => {
            // Subnormal: mantissa * 2^-24, exactly representable in f32.
            let magnitude = mantissa as f32 * f32::from_bits(0x3380_0000);
            if sign != 0 {
                -magnitude
            } else {
                magnitude
            }
        }
        (0x1f, _) => f32::from_bits(sign | 0x7f80_0000 | (mantissa << 13)),
        _ => f32::from_bits(sign | ((exponent + 112) << 23) | (mantissa << 13)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_conversion() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
        assert_eq!(f16_to_f32(0x0001), 5.9604645e-08);
        assert_eq!(f16_to_f32(0x8001), -5.9604645e-08);
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn every_element_decodes_little_endian() {
        let cases: [(Element, Vec<u8>, Vec<f32>); 10] = [
            (Element::F64, [0.1f64, -3.0].iter().flat_map(|v| v.to_le_bytes()).collect(), vec![0.1, -3.0]),
            (Element::F32, [1.5f32, -0.25].iter().flat_map(|v| v.to_le_bytes()).collect(), vec![1.5, -0.25]),
            (Element::F16, vec![0x00, 0x3c, 0x00, 0xc0], vec![1.0, -2.0]),
            (Element::BF16, vec![0x80, 0x3f, 0x40, 0xc0], vec![1.0, -3.0]),
            (
                Element::I64,
                [7i64, -(1 << 40)].iter().flat_map(|v| v.to_le_bytes()).collect(),
                vec![7.0, -1099511627776.0],
            ),
            (Element::I32, [-5i32, 1 << 20].iter().flat_map(|v| v.to_le_bytes()).collect(), vec![-5.0, 1048576.0]),
            (Element::I16, [-300i16, 2].iter().flat_map(|v| v.to_le_bytes()).collect(), vec![-300.0, 2.0]),
            (Element::I8, vec![0xff, 0x7f], vec![-1.0, 127.0]),
            (Element::U8, vec![0xff, 0x07], vec![255.0, 7.0]),
            (Element::Bool, vec![0, 3], vec![0.0, 1.0]),
        ];
        for (element, bytes, expected) in cases {
            assert_eq!(bytes.len(), 2 * element.size(), "{element:?}");
            assert_eq!(element.decode_all(&bytes), expected, "{element:?}");
        }
    }

    #[test]
    fn safetensors_dtypes_map_to_their_elements() {
        assert_eq!(Element::from_safetensors(Dtype::BF16), Some(Element::BF16));
        assert_eq!(Element::from_safetensors(Dtype::BOOL), Some(Element::Bool));
        assert_eq!(Element::from_safetensors(Dtype::U32), None);
        let floats = [Dtype::F64, Dtype::F32, Dtype::F16, Dtype::BF16];
        for dtype in [floats.as_slice(), &[Dtype::I64, Dtype::I32, Dtype::U8]].concat() {
            let element = Element::from_safetensors(dtype).unwrap();
            assert_eq!(element.is_float(), floats.contains(&dtype), "{dtype:?}");
            assert_eq!(element.size(), dtype.size(), "{dtype:?}");
        }
    }

    #[test]
    #[should_panic(expected = "not a whole number")]
    fn a_partial_element_is_a_bug() {
        Element::F32.decode_all(&[0, 0, 0]);
    }
}
