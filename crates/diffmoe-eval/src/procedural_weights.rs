//! The procedural weight generator of the FID Inception parity fixtures
//! (`shared/fixtures/inception/README.md`, "Weights"): the conv weights and
//! `fc.weight` of the fixture network are not stored but regenerated from
//! their weights-file key with exact integer and float32 arithmetic.
//!
//! This is test support: real FID runs load pytorch-fid's
//! `pt_inception-2015-12-05-6726825d.pth`. It is public because the parity
//! checker ([`crate::parity`]) is library code that any fixture directory in
//! the same format can be run through, and because
//! [`write_procedural_inception`] writes a stand-in weights file of the real
//! architecture for smoke runs of the whole FID path where the real file is
//! not at hand.

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::inception_weights::{weights_file_keys, KeyPresence};

/// FNV-1a 64 offset basis.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64 prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
/// The golden-ratio increment of splitmix64.
const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
/// `2^24`: the generator draws 24-bit integers, exact in float32.
const TWO_POW_24: f32 = 16_777_216.0;

/// FNV-1a 64 of `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME))
}

/// The seed of one tensor: `fnv1a64(utf8(key)) XOR base_seed`.
pub fn key_seed(key: &str, base_seed: u64) -> u64 {
    fnv1a64(key.as_bytes()) ^ base_seed
}

/// The `i`-th value (0-based, C order) of the tensor seeded by `seed`:
/// a splitmix64-like mix to a 24-bit integer `u`, then
/// `(2u + 1 - 2^24) / 2^24 * 2^scale_log2`, every step exact in float32.
pub fn procedural_value(seed: u64, index: u64, scale_log2: i32) -> f32 {
    let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(GOLDEN_GAMMA));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let u = (z >> 40) as i64; // 24-bit
    ((2 * u + 1 - (1 << 24)) as f32) / TWO_POW_24 * 2f32.powi(scale_log2)
}

/// The `numel` values of the tensor `key`, in C order over its PyTorch shape.
pub fn procedural_tensor(key: &str, base_seed: u64, scale_log2: i32, numel: usize) -> Vec<f32> {
    let seed = key_seed(key, base_seed);
    (0..numel as u64).map(|i| procedural_value(seed, i, scale_log2)).collect()
}

/// The fixture's scale rule for a conv weight: `round(log2(sqrt(6 / fan_in)))`
/// with `fan_in = in * kh * kw` (a He-uniform-like bound rounded to a power
/// of two, so that every value is exact). Python's `round` rounds halves to
/// even: fan_in 192 gives `log2 = -2.5` and the scale `2^-2`.
pub fn conv_scale_log2(fan_in: usize) -> i32 {
    (6.0f64 / fan_in as f64).sqrt().log2().round_ties_even() as i32
}

/// The fixture's scale of `fc.weight`: `2^-3`.
pub const FC_SCALE_LOG2: i32 = -3;

/// Lower-case hex SHA-256 of the little-endian float32 bytes of `values`.
pub fn sha256_f32le(values: &[f32]) -> String {
    let mut hasher = Sha256::new();
    for v in values {
        hasher.update(v.to_le_bytes());
    }
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes an Inception weights file of the real architecture and key names
/// (safetensors, weights-file layout) with procedural conv and `fc` weights
/// and identity BatchNorms (weight 1, bias 0, running mean 0, variance 1):
/// a stand-in whose features mean nothing, for exercising the FID path.
///
/// # Errors
/// If the file cannot be written.
pub fn write_procedural_inception(path: &Path, base_seed: u64) -> std::io::Result<()> {
    let mut tensors = Vec::new();
    for key in weights_file_keys().into_iter().filter(|k| k.presence == KeyPresence::Required) {
        let numel: usize = key.shape.iter().product();
        let values: Vec<f32> = if key.name.ends_with("conv.weight") {
            let fan_in = key.shape[1..].iter().product();
            procedural_tensor(&key.name, base_seed, conv_scale_log2(fan_in), numel)
        } else if key.name == "fc.weight" {
            procedural_tensor(&key.name, base_seed, FC_SCALE_LOG2, numel)
        } else if key.name.ends_with("bn.weight") || key.name.ends_with("running_var") {
            vec![1.0; numel]
        } else {
            vec![0.0; numel]
        };
        tensors.push((key.name, key.shape, values));
    }
    diffmoe_weights::write_f32_safetensors(path, tensors, Default::default()).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The self-test of the fixture manifest (`weights.procedural_generator.selftest`).
    #[test]
    fn selftest_values_of_the_manifest() {
        assert_eq!(key_seed("selftest", 4101), 0x7ee7_58bb_fced_23e6);
        let bits = [0x3ec17289u32, 0x3ca06270, 0xbdc46f2c, 0xbee3a2d3, 0xbea2e673, 0xbd651868, 0x3eb79cbb, 0xbed4080f];
        let values = procedural_tensor("selftest", 4101, -1, 8);
        assert_eq!(values.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), bits);
    }

    #[test]
    fn scale_rule_and_hash() {
        assert_eq!(conv_scale_log2(27), -1);
        assert_eq!(conv_scale_log2(288), -3);
        assert_eq!(conv_scale_log2(2592), -4);
        assert_eq!(conv_scale_log2(192), -2, "a tie rounds to even");
        // SHA-256 of the empty input.
        assert_eq!(sha256_f32le(&[]), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }
}
