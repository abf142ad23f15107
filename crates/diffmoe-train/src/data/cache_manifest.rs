//! The manifest of a latent cache directory (`cache.json`): what the cache is
//! a cache of (the images, the crop size, the shard size, the VAE file and
//! architecture), written once, atomically, when the cache is started. Every
//! later run into the directory, resumed or concurrent, must ask for the same
//! settings, so shards encoded with different settings never mix.
//!
//! The file appears complete or not at all: it is written to a temporary
//! file, fsynced, then hard-linked to `cache.json`, which fails if the name
//! exists, so of several processes starting together exactly one creates it
//! and the others compare against it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::cache_error::CacheError;
use super::shard_claim::{publish_exclusively, unique_token};
use super::vae_file::VaeIdentity;

/// The manifest's file name inside the cache directory.
pub const MANIFEST_FILE: &str = "cache.json";

/// The value of the manifest's `format` field.
pub const CACHE_FORMAT: &str = "diffmoe-latent-cache-v1";

/// What a cache directory is a cache of.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheManifest {
    /// Always [`CACHE_FORMAT`].
    pub format: String,
    /// The images, as a data specification with an absolute path.
    pub data: String,
    /// The number of images; shard `i` holds examples `[i * shard_size, (i + 1) * shard_size)`.
    pub examples: usize,
    /// The number of classes of the images.
    pub num_classes: usize,
    /// The pixel size of the ADM centre crop before encoding.
    pub image_size: usize,
    /// Examples per shard (the last shard may hold fewer).
    pub shard_size: usize,
    /// The VAE weight file.
    pub vae: VaeIdentity,
    /// The VAE's `AutoencoderKL` config.
    pub vae_config: serde_json::Value,
}

impl CacheManifest {
    /// The manifest of `dir`, if it has one.
    pub fn read(dir: &Path) -> Result<Option<CacheManifest>, CacheError> {
        let path = dir.join(MANIFEST_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(CacheError::io(path, source)),
        };
        serde_json::from_str(&text).map(Some).map_err(|source| CacheError::ManifestJson { path, source })
    }

    /// Checks that `self`, the settings of this run, equal `cached`'s, naming
    /// the first setting that differs.
    pub fn check_against(&self, cached: &CacheManifest, dir: &Path) -> Result<(), CacheError> {
        let (c, r) = (cached, self);
        // (setting, differs, cached value, requested value), in the order reported.
        let fields: [(&'static str, bool, String, String); 8] = [
            ("format", c.format != r.format, c.format.clone(), r.format.clone()),
            ("data", c.data != r.data, c.data.clone(), r.data.clone()),
            ("image_size", c.image_size != r.image_size, c.image_size.to_string(), r.image_size.to_string()),
            ("shard_size", c.shard_size != r.shard_size, c.shard_size.to_string(), r.shard_size.to_string()),
            // The same bytes under another name give the same latents.
            ("vae", (c.vae.bytes, &c.vae.sha256) != (r.vae.bytes, &r.vae.sha256), c.vae.to_string(), r.vae.to_string()),
            ("vae_config", c.vae_config != r.vae_config, c.vae_config.to_string(), r.vae_config.to_string()),
            ("examples (images)", c.examples != r.examples, c.examples.to_string(), r.examples.to_string()),
            ("num_classes", c.num_classes != r.num_classes, c.num_classes.to_string(), r.num_classes.to_string()),
        ];
        if let Some((setting, _, cached, requested)) = fields.into_iter().find(|f| f.1) {
            return Err(CacheError::Mismatch { manifest: dir.join(MANIFEST_FILE), setting, cached, requested });
        }
        Ok(())
    }

    /// Checks `dir` before any work: its manifest, if any, must match `self`;
    /// without one, the directory must hold no `*.safetensors` file.
    /// Returns the manifest on disk, if there is one.
    pub fn precheck(&self, dir: &Path) -> Result<Option<CacheManifest>, CacheError> {
        match CacheManifest::read(dir)? {
            Some(cached) => {
                self.check_against(&cached, dir)?;
                Ok(Some(cached))
            }
            None => {
                refuse_foreign_shards(dir)?;
                Ok(None)
            }
        }
    }

    /// Creates `dir/cache.json` from `self` unless it exists, and returns the
    /// manifest on disk, which matches `self` (else the error names the
    /// differing setting). Creates `dir` if needed.
    pub fn create_or_check(&self, dir: &Path) -> Result<CacheManifest, CacheError> {
        std::fs::create_dir_all(dir).map_err(|e| CacheError::io(dir, e))?;
        if let Some(cached) = self.precheck(dir)? {
            return Ok(cached);
        }
        let mut text = serde_json::to_string_pretty(self).expect("a manifest serialises");
        text.push('\n');
        if publish_exclusively(&dir.join(MANIFEST_FILE), text.as_bytes(), &unique_token())? {
            return Ok(self.clone());
        }
        // Another process created it first: compare against theirs.
        let cached = CacheManifest::read(dir)?.expect("cache.json exists");
        self.check_against(&cached, dir)?;
        Ok(cached)
    }
}

/// `NotACache` if `dir` holds a `*.safetensors` file.
fn refuse_foreign_shards(dir: &Path) -> Result<(), CacheError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(CacheError::io(dir, source)),
    };
    for entry in entries {
        let path: PathBuf = entry.map_err(|e| CacheError::io(dir, e))?.path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            return Err(CacheError::NotACache { path: dir.to_path_buf() });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_dir;

    fn manifest() -> CacheManifest {
        CacheManifest {
            format: CACHE_FORMAT.into(),
            data: "folder:/data/images".into(),
            examples: 10,
            num_classes: 2,
            image_size: 16,
            shard_size: 4,
            vae: VaeIdentity { file: "vae.safetensors".into(), bytes: 100, sha256: "ab".repeat(32) },
            vae_config: serde_json::json!({"block_out_channels": [8, 16]}),
        }
    }

    #[test]
    fn created_once_then_compared_setting_by_setting() {
        let dir = test_dir("manifest").join("cache");
        assert_eq!(manifest().create_or_check(&dir).unwrap(), manifest());
        assert_eq!(CacheManifest::read(&dir).unwrap(), Some(manifest()));
        assert_eq!(manifest().create_or_check(&dir).unwrap(), manifest());
        // A renamed copy of the same VAE is the same VAE.
        let mut renamed = manifest();
        renamed.vae.file = "copy.safetensors".into();
        assert_eq!(renamed.create_or_check(&dir).unwrap().vae.file, "vae.safetensors");

        let mut other = manifest();
        other.image_size = 32;
        let e = other.create_or_check(&dir).unwrap_err();
        assert!(matches!(&e, CacheError::Mismatch { setting: "image_size", .. }), "{e}");
        assert!(e.to_string().contains("image_size = 16") && e.to_string().contains("32"), "{e}");
        let mut other = manifest();
        other.vae.sha256 = "cd".repeat(32);
        let e = other.precheck(&dir).unwrap_err();
        assert!(matches!(&e, CacheError::Mismatch { setting: "vae", .. }), "{e}");
        let mut other = manifest();
        other.examples = 11;
        assert!(
            matches!(other.precheck(&dir).unwrap_err(), CacheError::Mismatch { setting, .. } if setting.starts_with("examples"))
        );
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [MANIFEST_FILE]);
        std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
    }

    #[test]
    fn shards_without_a_manifest_are_refused() {
        let dir = test_dir("manifest-foreign");
        std::fs::write(dir.join("part-0.safetensors"), b"").unwrap();
        let e = manifest().create_or_check(&dir).unwrap_err();
        assert!(matches!(&e, CacheError::NotACache { path } if path == &dir), "{e}");
        std::fs::write(dir.join(MANIFEST_FILE), b"{not json").unwrap();
        assert!(matches!(manifest().precheck(&dir).unwrap_err(), CacheError::ManifestJson { .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
