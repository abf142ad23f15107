//! Latent shards: pre-computed Stable Diffusion VAE posteriors stored as
//! safetensors files, so that latent-space training (the official
//! `train.py` encodes every ImageNet batch with `vae.encode(x).latent_dist
//! .sample().mul_(0.18215)`) need not run the VAE at every step. The format
//! (`diffmoe-latents-v1`) is specified in `docs/data.md`:
//!
//! - `moments`: f32 `[N, 2C, h, w]`, the posterior mean channels then the
//!   log-variance channels, exactly diffusers' `latent_dist.parameters`;
//! - `moments_flipped` (optional): the same for the horizontally mirrored image;
//! - `labels`: i64 `[N]`;
//! - metadata `format`, `scale_factor`, `num_classes`, `image_size`, optional `vae`.
//!
//! An example is a fresh posterior sample, `(mean + std * eps) * scale_factor`,
//! as the official code draws one per step.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use safetensors::{Dtype, SafeTensors};

use super::{Augment, DataError, Dataset, Example, ImageShape};

/// The value of the `format` metadata key of every shard.
pub const LATENT_FORMAT: &str = "diffmoe-latents-v1";

/// The metadata of a latent shard, stored as safetensors `__metadata__` strings.
#[derive(Clone, Debug, PartialEq)]
pub struct LatentShardMeta {
    /// The latent scale of the VAE (0.18215 for the SD VAE the paper uses).
    pub scale_factor: f32,
    /// The number of classes of the dataset the latents were encoded from.
    pub num_classes: usize,
    /// The pixel size the images were cropped to before encoding.
    pub image_size: usize,
    /// Which VAE encoded them (e.g. "stabilityai/sd-vae-ft-ema"), for provenance.
    pub vae: Option<String>,
}

/// Posterior moments of `N` examples: `values` is `[N, 2C, h, w]` row-major,
/// mean channels first, then log-variance channels.
#[derive(Clone, Copy, Debug)]
pub struct Moments<'a> {
    pub values: &'a [f32],
    /// `[N, 2C, h, w]`.
    pub shape: [usize; 4],
}

/// The per-example clamp of the log-variance, as diffusers'
/// `DiagonalGaussianDistribution` applies before taking the standard deviation.
const LOGVAR_RANGE: (f32, f32) = (-30.0, 20.0);

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Writes one shard atomically: to `<path>.tmp`, fsynced, then renamed over
/// `path`, so that an interrupted `cache-latents` never leaves a truncated
/// shard that a later training run would read.
pub fn write_latent_shard(
    path: &Path,
    moments: Moments<'_>,
    moments_flipped: Option<Moments<'_>>,
    labels: &[i64],
    meta: &LatentShardMeta,
) -> Result<(), DataError> {
    let [n, two_c, h, w] = moments.shape;
    let check = |m: Moments<'_>, name: &str| -> Result<(), DataError> {
        if m.shape != moments.shape || m.values.len() != m.shape.iter().product::<usize>() {
            return Err(DataError::corrupt(
                path,
                format!("{name} has shape {:?} and {} values, expected {:?}", m.shape, m.values.len(), moments.shape),
            ));
        }
        Ok(())
    };
    check(moments, "moments")?;
    if let Some(flipped) = moments_flipped {
        check(flipped, "moments_flipped")?;
    }
    if two_c == 0 || two_c % 2 != 0 || h == 0 || w == 0 {
        return Err(DataError::corrupt(
            path,
            format!("moments shape {:?} needs an even, non-zero channel count", moments.shape),
        ));
    }
    if labels.len() != n {
        return Err(DataError::corrupt(path, format!("{} labels for {n} moments", labels.len())));
    }
    if let Some(bad) = labels.iter().find(|&&l| l < 0 || l as usize >= meta.num_classes) {
        return Err(DataError::corrupt(path, format!("label {bad} outside 0..{}", meta.num_classes)));
    }
    let label_bytes: Vec<u8> = labels.iter().flat_map(|v| v.to_le_bytes()).collect();
    let moment_bytes = f32_bytes(moments.values);
    let flipped_bytes = moments_flipped.map(|m| f32_bytes(m.values));
    fn view(dtype: Dtype, shape: Vec<usize>, data: &[u8]) -> safetensors::tensor::TensorView<'_> {
        safetensors::tensor::TensorView::new(dtype, shape, data).expect("sizes checked above")
    }
    let mut tensors = vec![
        ("moments".to_string(), view(Dtype::F32, moments.shape.to_vec(), &moment_bytes)),
        ("labels".to_string(), view(Dtype::I64, vec![n], &label_bytes)),
    ];
    if let Some(bytes) = &flipped_bytes {
        tensors.push(("moments_flipped".to_string(), view(Dtype::F32, moments.shape.to_vec(), bytes)));
    }
    let mut metadata = HashMap::from([
        ("format".to_string(), LATENT_FORMAT.to_string()),
        ("scale_factor".to_string(), meta.scale_factor.to_string()),
        ("num_classes".to_string(), meta.num_classes.to_string()),
        ("image_size".to_string(), meta.image_size.to_string()),
    ]);
    if let Some(vae) = &meta.vae {
        metadata.insert("vae".to_string(), vae.clone());
    }
    let bytes = safetensors::serialize(tensors, &Some(metadata))
        .map_err(|source| DataError::Safetensors { path: path.to_path_buf(), source })?;

    // Not `diffmoe_weights::write_atomically`, whose temporaries are unique
    // per call: a shard has one writer at a time (its claim), and a fixed
    // temporary name lets the writer that takes over a killed one's shard
    // overwrite what the killed one left.
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut file = std::fs::File::create(&tmp).map_err(|e| DataError::io(&tmp, e))?;
    file.write_all(&bytes).map_err(|e| DataError::io(&tmp, e))?;
    file.sync_all().map_err(|e| DataError::io(&tmp, e))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(|e| DataError::io(path, e))
}

/// One shard held in memory.
struct Shard {
    path: PathBuf,
    /// `[n, 2C, h, w]`.
    moments: Vec<f32>,
    flipped: Option<Vec<f32>>,
    labels: Vec<usize>,
}

/// Every shard of a directory, read whole at open.
pub(crate) struct LatentShards {
    root: PathBuf,
    shards: Vec<Shard>,
    /// `starts[i]` is the index of the first example of shard `i`.
    starts: Vec<usize>,
    len: usize,
    meta: LatentShardMeta,
    shape: ImageShape,
}

fn parse_meta(metadata: &HashMap<String, String>, path: &Path) -> Result<LatentShardMeta, DataError> {
    let get = |key: &str| {
        metadata.get(key).ok_or_else(|| DataError::corrupt(path, format!("metadata key {key:?} is missing")))
    };
    let format = get("format")?;
    if format != LATENT_FORMAT {
        return Err(DataError::corrupt(path, format!("format {format:?}, expected {LATENT_FORMAT:?}")));
    }
    let number = |key: &str| {
        get(key)?
            .parse::<usize>()
            .map_err(|e| DataError::corrupt(path, format!("metadata {key:?} is not a count: {e}")))
    };
    let scale = get("scale_factor")?;
    let scale_factor = scale
        .parse::<f32>()
        .map_err(|e| DataError::corrupt(path, format!("metadata \"scale_factor\" {scale:?} is not a number: {e}")))?;
    Ok(LatentShardMeta {
        scale_factor,
        num_classes: number("num_classes")?,
        image_size: number("image_size")?,
        vae: metadata.get("vae").cloned(),
    })
}

/// A tensor read from a shard: its shape and its f32 values.
type ShapedValues = (Vec<usize>, Vec<f32>);

/// Reads tensor `name`, when the shard has it.
fn read_f32(tensors: &SafeTensors<'_>, name: &str, path: &Path) -> Result<Option<ShapedValues>, DataError> {
    let Ok(view) = tensors.tensor(name) else {
        return Ok(None);
    };
    if view.dtype() != Dtype::F32 {
        return Err(DataError::corrupt(path, format!("{name} is {:?}, expected F32", view.dtype())));
    }
    let values = view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("four bytes"))).collect();
    Ok(Some((view.shape().to_vec(), values)))
}

impl LatentShards {
    /// Reads every `*.safetensors` file of `root` in name order and checks
    /// that all share the latent shape `target`, the scale and the classes.
    pub fn open(root: &Path, target: ImageShape) -> Result<Self, DataError> {
        if !root.exists() {
            return Err(DataError::NotFound { path: root.to_path_buf() });
        }
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(root).map_err(|e| DataError::io(root, e))? {
            let path = entry.map_err(|e| DataError::io(root, e))?.path();
            if path.is_file() && path.extension().is_some_and(|e| e == "safetensors") {
                paths.push(path);
            }
        }
        paths.sort();
        if paths.is_empty() {
            return Err(DataError::Empty { path: root.to_path_buf(), what: "*.safetensors latent shards" });
        }
        let mut shards = Vec::with_capacity(paths.len());
        let mut first_meta: Option<LatentShardMeta> = None;
        for path in paths {
            let bytes = std::fs::read(&path).map_err(|e| DataError::io(&path, e))?;
            let st_error = |source| DataError::Safetensors { path: path.clone(), source };
            let (_, header) = SafeTensors::read_metadata(&bytes).map_err(st_error)?;
            let meta = parse_meta(header.metadata().as_ref().unwrap_or(&HashMap::new()), &path)?;
            let tensors = SafeTensors::deserialize(&bytes).map_err(st_error)?;
            let (shape, moments) = read_f32(&tensors, "moments", &path)?
                .ok_or_else(|| DataError::corrupt(&path, "tensor \"moments\" is missing"))?;
            let &[n, two_c, h, w] = shape.as_slice() else {
                return Err(DataError::corrupt(&path, format!("moments has shape {shape:?}, expected [N, 2C, h, w]")));
            };
            let found = ImageShape { channels: two_c / 2, height: h, width: w };
            if two_c % 2 != 0 || found != target {
                return Err(DataError::ShapeMismatch { path, expected: target, found });
            }
            let flipped = match read_f32(&tensors, "moments_flipped", &path)? {
                Some((flipped_shape, values)) if flipped_shape == shape => Some(values),
                Some((flipped_shape, _)) => {
                    return Err(DataError::corrupt(
                        &path,
                        format!("moments_flipped has shape {flipped_shape:?}, moments {shape:?}"),
                    ))
                }
                None => None,
            };
            let labels_view =
                tensors.tensor("labels").map_err(|_| DataError::corrupt(&path, "tensor \"labels\" is missing"))?;
            if labels_view.dtype() != Dtype::I64 || labels_view.shape() != [n] {
                return Err(DataError::corrupt(
                    &path,
                    format!("labels is {:?} {:?}, expected I64 [{n}]", labels_view.dtype(), labels_view.shape()),
                ));
            }
            let mut labels = Vec::with_capacity(n);
            for chunk in labels_view.data().chunks_exact(8) {
                let label = i64::from_le_bytes(chunk.try_into().expect("eight bytes"));
                if label < 0 || label as usize >= meta.num_classes {
                    return Err(DataError::corrupt(&path, format!("label {label} outside 0..{}", meta.num_classes)));
                }
                labels.push(label as usize);
            }
            match &first_meta {
                None => first_meta = Some(meta),
                Some(first) if first.scale_factor != meta.scale_factor || first.num_classes != meta.num_classes || first.image_size != meta.image_size => {
                    return Err(DataError::corrupt(
                        &path,
                        format!(
                            "scale_factor {} / num_classes {} / image_size {} differ from the first shard's {} / {} / {}",
                            meta.scale_factor, meta.num_classes, meta.image_size, first.scale_factor, first.num_classes, first.image_size
                        ),
                    ))
                }
                Some(_) => {}
            }
            shards.push(Shard { path, moments, flipped, labels });
        }
        let mut starts = Vec::with_capacity(shards.len());
        let mut len = 0;
        for shard in &shards {
            starts.push(len);
            len += shard.labels.len();
        }
        if len == 0 {
            return Err(DataError::Empty { path: root.to_path_buf(), what: "latents (every shard has zero examples)" });
        }
        Ok(LatentShards {
            root: root.to_path_buf(),
            shards,
            starts,
            len,
            meta: first_meta.expect("at least one shard"),
            shape: target,
        })
    }
}

impl Dataset for LatentShards {
    fn len(&self) -> usize {
        self.len
    }

    fn num_classes(&self) -> usize {
        self.meta.num_classes
    }

    fn shape(&self) -> ImageShape {
        self.shape
    }

    /// Draws `(mean + exp(0.5 * clamp(logvar, -30, 20)) * eps) * scale_factor`
    /// with `eps ~ N(0, 1)` from a ChaCha8 stream seeded by `augment.seed`,
    /// from `moments_flipped` when `augment.flip` and the shard has it.
    fn get(&self, index: usize, augment: Augment) -> Result<Example, DataError> {
        let shard_index = self.starts.partition_point(|&s| s <= index) - 1;
        let shard = &self.shards[shard_index];
        let local = index - self.starts[shard_index];
        let numel = self.shape.numel();
        let moments = match (&shard.flipped, augment.flip) {
            (Some(flipped), true) => flipped,
            _ => &shard.moments,
        };
        let example = &moments[local * 2 * numel..(local + 1) * 2 * numel];
        let (mean, logvar) = example.split_at(numel);
        let mut rng = ChaCha8Rng::seed_from_u64(augment.seed);
        let image = mean
            .iter()
            .zip(logvar)
            .map(|(&m, &lv)| {
                let eps: f32 = StandardNormal.sample(&mut rng);
                let std = (0.5 * lv.clamp(LOGVAR_RANGE.0, LOGVAR_RANGE.1)).exp();
                (m + std * eps) * self.meta.scale_factor
            })
            .collect();
        Ok(Example { image, label: shard.labels[local] })
    }

    fn describe(&self) -> String {
        let flipped = self.shards.iter().filter(|s| s.flipped.is_some()).count();
        format!(
            "latent shards {} ({} shards, {} with flips), {} latents of {}, {} classes, scale {}{}",
            self.root.display(),
            self.shards.len(),
            flipped,
            self.len,
            self.shape,
            self.meta.num_classes,
            self.meta.scale_factor,
            self.meta.vae.as_ref().map(|v| format!(", VAE {v}")).unwrap_or_default()
        )
    }

    fn is_latent(&self) -> bool {
        true
    }
}

impl std::fmt::Debug for LatentShards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let paths: Vec<_> = self.shards.iter().map(|s| &s.path).collect();
        f.debug_struct("LatentShards").field("shards", &paths).field("meta", &self.meta).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_dir;

    const LATENT: ImageShape = ImageShape { channels: 2, height: 2, width: 3 };

    fn meta() -> LatentShardMeta {
        LatentShardMeta { scale_factor: 0.5, num_classes: 3, image_size: 16, vae: Some("test-vae".into()) }
    }

    /// `n` examples whose mean is `base + i` and log-variance `logvar`.
    fn moments(n: usize, base: f32, logvar: f32) -> Vec<f32> {
        let numel = LATENT.numel();
        (0..n).flat_map(|i| (0..2 * numel).map(move |j| if j < numel { base + i as f32 } else { logvar })).collect()
    }

    #[test]
    fn round_trip_and_sampling_formula() {
        let dir = test_dir("latents");
        let shape = [3, 4, 2, 3];
        let a = moments(3, 10.0, -2.0);
        let a_flipped = moments(3, -10.0, -2.0);
        write_latent_shard(
            &dir.join("shard-000.safetensors"),
            Moments { values: &a, shape },
            Some(Moments { values: &a_flipped, shape }),
            &[0, 1, 2],
            &meta(),
        )
        .unwrap();
        // Without flips, and with a log-variance the clamp cuts to 20.
        let b = moments(2, 100.0, 50.0);
        write_latent_shard(
            &dir.join("shard-001.safetensors"),
            Moments { values: &b, shape: [2, 4, 2, 3] },
            None,
            &[2, 1],
            &meta(),
        )
        .unwrap();
        assert!(!dir.join("shard-000.safetensors.tmp").exists());

        let data = LatentShards::open(&dir, LATENT).unwrap();
        assert_eq!((data.len(), data.num_classes(), data.shape()), (5, 3, LATENT));
        assert!(data.is_latent());
        assert!(data.describe().contains("1 with flips"), "{}", data.describe());

        let augment = Augment { flip: false, seed: 7 };
        let example = data.get(1, augment).unwrap();
        assert_eq!(example.label, 1);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let std = (0.5f32 * -2.0).exp();
        for value in &example.image {
            let eps: f32 = StandardNormal.sample(&mut rng);
            assert_eq!(*value, (11.0 + std * eps) * 0.5);
        }
        // The same seed gives the same sample; another seed another one.
        assert_eq!(data.get(1, augment).unwrap(), example);
        assert_ne!(data.get(1, Augment { flip: false, seed: 8 }).unwrap(), example);
        // Flipping reads moments_flipped with the same noise.
        let flipped = data.get(1, Augment { flip: true, seed: 7 }).unwrap();
        for (f, e) in flipped.image.iter().zip(&example.image) {
            // Means 11 and -9, scaled by 0.5, differ by 10.
            assert!((f - (e - 10.0)).abs() < 1e-4, "{f} vs {e}");
        }
        // The second shard has no flips and clamps its log-variance to 20.
        let last = data.get(4, Augment { flip: true, seed: 3 }).unwrap();
        assert_eq!(last.label, 1);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let eps: f32 = StandardNormal.sample(&mut rng);
        assert_eq!(last.image[0], (101.0 + 10f32.exp() * eps) * 0.5);

        // A model expecting 4 channels is told which shard and both shapes.
        let four = ImageShape { channels: 4, ..LATENT };
        let error = LatentShards::open(&dir, four).unwrap_err();
        assert!(
            matches!(&error, DataError::ShapeMismatch { path, found, .. } if path.ends_with("shard-000.safetensors") && *found == LATENT)
        );
        assert!(error.to_string().contains("[4, 2, 3]"), "{error}");

        // A shard with another scale factor is named.
        let other = LatentShardMeta { scale_factor: 0.25, ..meta() };
        write_latent_shard(
            &dir.join("shard-002.safetensors"),
            Moments { values: &b, shape: [2, 4, 2, 3] },
            None,
            &[0, 0],
            &other,
        )
        .unwrap();
        let error = LatentShards::open(&dir, LATENT).unwrap_err();
        assert!(error.path().unwrap().ends_with("shard-002.safetensors"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_bad_shards() {
        let dir = test_dir("latents-bad");
        let values = moments(1, 0.0, 0.0);
        let error = write_latent_shard(
            &dir.join("x.safetensors"),
            Moments { values: &values, shape: [1, 4, 2, 3] },
            None,
            &[3],
            &meta(),
        )
        .unwrap_err();
        assert!(error.to_string().contains("label 3"), "{error}");
        std::fs::write(dir.join("y.safetensors"), b"not safetensors").unwrap();
        let error = LatentShards::open(&dir, LATENT).unwrap_err();
        assert!(matches!(error, DataError::Safetensors { .. }), "{error}");
        assert!(error.to_string().contains("y.safetensors"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
