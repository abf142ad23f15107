//! Writing a file so that a crash, a full disk or a kill never leaves a
//! truncated file under its name: the bytes go to a temporary file beside
//! it, which is synced and then renamed over it.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::WriteError;

/// Writes `bytes` to `path` atomically: to a temporary file in the same
/// directory (unique per process and call), synced, then renamed over
/// `path`, and the directory synced so that the rename survives a power
/// loss. On failure the temporary file is removed and `path` keeps what it
/// held before.
///
/// # Errors
/// If the temporary file cannot be created, written or synced (the error
/// names it), or the rename fails (the error names `path`).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    let tmp = temporary_path(path);
    let written =
        write_synced(&tmp, bytes).map_err(|source| WriteError::Io { path: tmp.clone(), source }).and_then(|()| {
            std::fs::rename(&tmp, path).map_err(|source| WriteError::Io { path: path.to_path_buf(), source })
        });
    if written.is_err() {
        // Best effort: the error that matters is the one returned.
        let _ = std::fs::remove_file(&tmp);
        return written;
    }
    sync_parent(path).map_err(|source| WriteError::Io { path: path.to_path_buf(), source })
}

/// `<name>.tmp-<pid>-<n>` beside `path`: two writers of one file, in two
/// processes or two threads, never share a temporary.
fn temporary_path(path: &Path) -> PathBuf {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".tmp-{}-{}", std::process::id(), CALLS.fetch_add(1, Ordering::Relaxed)));
    path.with_file_name(name)
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Syncs the directory holding `path`, which makes a rename into it durable
/// (a no-op where directories cannot be opened as files).
fn sync_parent(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(parent)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("diffmoe_atomic_file_{}_{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn a_write_replaces_the_file_and_leaves_no_temporary() {
        let dir = scratch("replace");
        let path = dir.join("weights.safetensors");
        write_atomically(&path, b"first").unwrap();
        write_atomically(&path, b"second, longer").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second, longer");
        assert_eq!(entries(&dir), ["weights.safetensors"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_rename_keeps_the_old_contents_and_removes_the_temporary() {
        let dir = scratch("failed_rename");
        // A non-empty directory under the name: the temporary is written,
        // the rename over it fails.
        let path = dir.join("occupied");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("kept"), b"old").unwrap();
        let err = write_atomically(&path, b"new").unwrap_err();
        assert!(matches!(&err, WriteError::Io { path: p, .. } if p == &path), "{err:?}");
        assert_eq!(entries(&dir), ["occupied"]);
        assert_eq!(std::fs::read(path.join("kept")).unwrap(), b"old");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_directory_is_named_in_the_error() {
        let dir = scratch("missing_dir");
        let path = dir.join("absent").join("out.json");
        let err = write_atomically(&path, b"{}").unwrap_err();
        assert!(err.to_string().contains("absent"), "{err}");
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn temporaries_are_unique_per_call() {
        let path = Path::new("dir/file.json");
        let (a, b) = (temporary_path(path), temporary_path(path));
        assert_ne!(a, b);
        assert_eq!(a.parent(), Some(Path::new("dir")));
        assert!(a.file_name().unwrap().to_string_lossy().starts_with("file.json.tmp-"));
    }
}
