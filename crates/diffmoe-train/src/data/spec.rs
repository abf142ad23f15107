//! `DataSpec`: which dataset to train on, as a user writes it on the command
//! line or in a run config (`embedded`, `idx:PATH`, `folder:PATH`,
//! `latents:PATH`, or a bare path whose kind is detected from its contents).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::idx::is_idx_images_name;
use super::DataError;

/// A dataset to open with `open_dataset`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataSpec {
    /// The Fashion-MNIST test split compiled into the binary.
    Embedded,
    /// MNIST-style IDX files: a directory or the images file itself.
    Idx(PathBuf),
    /// A folder with one subfolder of images per class.
    ImageFolder(PathBuf),
    /// A directory of `diffmoe-latents-v1` safetensors shards.
    Latents(PathBuf),
}

const EMBEDDED: &str = "embedded";
const IDX_PREFIX: &str = "idx:";
const FOLDER_PREFIX: &str = "folder:";
const LATENTS_PREFIX: &str = "latents:";

impl DataSpec {
    /// Detects the kind of dataset at `path` from what it holds: `*.safetensors`
    /// files make latents, an `*-idx3-ubyte[.gz]` file (or a directory holding
    /// one) IDX, subdirectories an image folder.
    pub fn detect(path: &Path) -> Result<DataSpec, DataError> {
        let metadata = std::fs::metadata(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => DataError::NotFound { path: path.to_path_buf() },
            _ => DataError::io(path, source),
        })?;
        let name_of = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if metadata.is_file() {
            if is_idx_images_name(&name_of(path)) {
                return Ok(DataSpec::Idx(path.to_path_buf()));
            }
        } else {
            let mut entries = Vec::new();
            for entry in std::fs::read_dir(path).map_err(|e| DataError::io(path, e))? {
                entries.push(entry.map_err(|e| DataError::io(path, e))?.path());
            }
            let files = || entries.iter().filter(|p| p.is_file()).map(|p| name_of(p));
            if files().any(|n| n.ends_with(".safetensors")) {
                return Ok(DataSpec::Latents(path.to_path_buf()));
            }
            if files().any(|n| is_idx_images_name(&n)) {
                return Ok(DataSpec::Idx(path.to_path_buf()));
            }
            if entries.iter().any(|p| p.is_dir()) {
                return Ok(DataSpec::ImageFolder(path.to_path_buf()));
            }
        }
        Err(DataError::Undetected {
            path: path.to_path_buf(),
            looked_for: "*.safetensors latent shards, *-idx3-ubyte[.gz] IDX files, \
                         or class subdirectories of images",
        })
    }
}

impl FromStr for DataSpec {
    type Err = DataError;

    /// Parses `embedded`, `idx:PATH`, `folder:PATH`, `latents:PATH`, or a bare
    /// path (detected with `DataSpec::detect`). A directory literally named
    /// `embedded` must be written `./embedded`. Prefixed paths are not checked
    /// here; `open_dataset` reports a missing one.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        if spec == EMBEDDED {
            return Ok(DataSpec::Embedded);
        }
        type Make = fn(PathBuf) -> DataSpec;
        let prefixed: [(&str, Make); 3] =
            [(IDX_PREFIX, DataSpec::Idx), (FOLDER_PREFIX, DataSpec::ImageFolder), (LATENTS_PREFIX, DataSpec::Latents)];
        for (prefix, make) in prefixed {
            if let Some(path) = spec.strip_prefix(prefix) {
                if path.is_empty() {
                    return Err(DataError::InvalidSpec {
                        spec: spec.to_string(),
                        reason: "the path after the prefix is empty",
                    });
                }
                return Ok(make(PathBuf::from(path)));
            }
        }
        if spec.is_empty() {
            return Err(DataError::InvalidSpec {
                spec: String::new(),
                reason: "expected embedded, idx:PATH, folder:PATH, latents:PATH or a path",
            });
        }
        DataSpec::detect(Path::new(spec))
    }
}

impl fmt::Display for DataSpec {
    /// Writes the prefixed form, which `FromStr` reads back to the same value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataSpec::Embedded => f.write_str(EMBEDDED),
            DataSpec::Idx(path) => write!(f, "{IDX_PREFIX}{}", path.display()),
            DataSpec::ImageFolder(path) => write!(f, "{FOLDER_PREFIX}{}", path.display()),
            DataSpec::Latents(path) => write!(f, "{LATENTS_PREFIX}{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_dir;

    #[test]
    fn prefixed_forms_round_trip() {
        for spec in [
            DataSpec::Embedded,
            DataSpec::Idx("/data/mnist".into()),
            DataSpec::ImageFolder("rel/imagenet/train".into()),
            DataSpec::Latents("/latents:odd".into()),
        ] {
            assert_eq!(spec.to_string().parse::<DataSpec>().unwrap(), spec);
        }
        assert_eq!("embedded".parse::<DataSpec>().unwrap(), DataSpec::Embedded);
        assert!(matches!("idx:".parse::<DataSpec>(), Err(DataError::InvalidSpec { .. })));
    }

    #[test]
    fn bare_paths_are_detected() {
        let root = test_dir("spec");
        let latents = root.join("latents");
        std::fs::create_dir(&latents).unwrap();
        std::fs::write(latents.join("a.safetensors"), b"").unwrap();
        let idx = root.join("mnist");
        std::fs::create_dir(&idx).unwrap();
        let images = idx.join("train-images-idx3-ubyte.gz");
        std::fs::write(&images, b"").unwrap();
        let folder = root.join("folder");
        std::fs::create_dir_all(folder.join("class0")).unwrap();
        let plain = root.join("plain");
        std::fs::create_dir(&plain).unwrap();
        std::fs::write(plain.join("readme.txt"), b"").unwrap();

        let parse = |p: &Path| p.to_str().unwrap().parse::<DataSpec>();
        assert_eq!(parse(&latents).unwrap(), DataSpec::Latents(latents.clone()));
        assert_eq!(parse(&idx).unwrap(), DataSpec::Idx(idx.clone()));
        assert_eq!(parse(&images).unwrap(), DataSpec::Idx(images.clone()));
        assert_eq!(parse(&folder).unwrap(), DataSpec::ImageFolder(folder.clone()));
        // The root holds subdirectories only, so it reads as an image folder.
        assert_eq!(parse(&root).unwrap(), DataSpec::ImageFolder(root.clone()));

        let error = parse(&plain).unwrap_err();
        assert!(matches!(&error, DataError::Undetected { path, .. } if path == &plain), "{error}");
        assert!(error.to_string().contains("safetensors"), "{error}");
        let missing = root.join("missing");
        let error = parse(&missing).unwrap_err();
        assert!(matches!(&error, DataError::NotFound { path } if path == &missing), "{error}");
        assert!(error.to_string().contains("missing"));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
