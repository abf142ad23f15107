//! Reader for PyTorch `torch.save` checkpoints, in both of its formats.
//!
//! The zip format (torch >= 1.6) is an archive holding `<archive>/data.pkl`, a pickle
//! (protocol 2) that describes the saved object, and one `<archive>/data/<key>` file of raw
//! little-endian bytes per tensor storage.
//!
//! The legacy format (torch < 1.6, or `_use_new_zipfile_serialization=False`; e.g. pytorch-fid's
//! `pt_inception-2015-12-05-6726825d.pth`) is what torch's `serialization.py` writes in
//! `_legacy_save` and reads in `_legacy_load`: five consecutive pickles (the magic number
//! `0x1950a86a20f9469cfc6c`, the protocol version 1001, a `sys_info` dict, the object, and the
//! list of storage keys), then for each listed key in that order an 8-byte little-endian element
//! count and the storage's raw little-endian elements. Its persistent ids are
//! `('storage', StorageClass, root_key, location, numel, view_metadata)`, where a non-`None`
//! `view_metadata = (view_key, offset, view_size)` makes the storage a slice of the root
//! storage (old torch versions saved such views; newer ones always write `None`). The format is told apart by the first bytes: `PK`
//! is a zip, a pickle `PROTO` opcode (`0x80`) a legacy file.
//!
//! Pickle is a small stack machine whose `GLOBAL`/`STACK_GLOBAL` opcodes
//! import arbitrary Python names and whose `REDUCE`/`NEWOBJ`/`BUILD` opcodes call them, which is
//! why `torch.load` of an untrusted file can run arbitrary code.
//!
//! This module interprets the opcodes itself and never imports, calls or executes anything: a
//! global is only a symbolic `module.name` reference. A handful of references get a meaning of
//! their own: `torch._utils._rebuild_tensor_v2` (and `_rebuild_tensor`, `_rebuild_parameter`)
//! describe a tensor as a strided view of a storage, `collections.OrderedDict` builds a dict, and
//! the `torch.*Storage` classes in the persistent ids of `BINPERSID` give a storage's dtype. Any
//! other global (e.g. the `argparse.Namespace` that the official DiffMoE `train.py` stores under
//! `args`) only produces opaque values, so such objects never make reading fail; they just cannot
//! be requested as a state dict. Storage bytes are read only for the tensors of the requested
//! entry, and converted to contiguous row-major `f32`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use zip::result::ZipError;
use zip::{CompressionMethod, ZipArchive};

use crate::element::{Decode, Element};
use crate::host_tensor::HostTensor;

/// Why a torch checkpoint could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TorchCheckpointError {
    /// The file could not be opened or read.
    #[error("cannot read torch checkpoint {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// The file is neither a zip archive nor a pickle (truncated, garbage, or another format).
    #[error(
        "{} is not a torch checkpoint: neither a zip archive (torch.save of torch >= 1.6) nor a \
         legacy torch.save file (which starts with a pickle): {source}",
        path.display()
    )]
    NotZip { path: PathBuf, source: ZipError },
    /// The zip archive has no `<archive>/data.pkl` entry.
    #[error("{} is a zip archive without the `<archive>/data.pkl` of a torch checkpoint", path.display())]
    NoPickle { path: PathBuf },
    /// A zip entry the pickle refers to (a storage file) is absent.
    #[error("{}: zip entry `{name}` is missing", path.display())]
    MissingZipEntry { path: PathBuf, name: String },
    /// A zip entry could not be read.
    #[error("{}: cannot read zip entry `{name}`: {source}", path.display())]
    Zip { path: PathBuf, name: String, source: ZipError },
    /// A zip entry is compressed; `torch.save` writes uncompressed (STORED) entries only.
    #[error(
        "{}: zip entry `{name}` is compressed ({method}); only uncompressed (STORED) entries, as \
         torch.save writes them, are supported",
        path.display()
    )]
    CompressedEntry { path: PathBuf, name: String, method: String },
    /// The pickle is truncated or inconsistent.
    #[error("{}: malformed pickle at byte {offset}: {reason}", path.display())]
    Malformed { path: PathBuf, offset: usize, reason: String },
    /// The pickle uses an opcode this reader does not implement.
    #[error("{}: unsupported pickle opcode 0x{opcode:02x} at byte {offset}", path.display())]
    UnknownOpcode { path: PathBuf, opcode: u8, offset: usize },
    /// The checkpoint's top-level object is not a dict.
    #[error("{}: the top-level object is {found}, not a dict", path.display())]
    TopLevelNotDict { path: PathBuf, found: String },
    /// The requested top-level entry does not exist.
    #[error(
        "{}: no entry `{entry}` in the checkpoint; entries present: [{}]",
        path.display(),
        present.join(", ")
    )]
    MissingEntry { path: PathBuf, entry: String, present: Vec<String> },
    /// The requested entry is not a dict with string keys.
    #[error("{}: {} is {found}, not a dict of tensors", path.display(), entry_label(entry))]
    NotADict { path: PathBuf, entry: String, found: String },
    /// A value of the requested entry is not a (readable) tensor.
    #[error("{}: {}, key `{key}` is {found}, not a tensor", path.display(), entry_label(entry))]
    NotATensor { path: PathBuf, entry: String, key: String, found: String },
    /// A tensor's storage has a dtype that cannot be converted to f32.
    #[error(
        "{}: {}, tensor `{tensor}` has unsupported storage type {dtype}",
        path.display(),
        entry_label(entry)
    )]
    UnsupportedDtype { path: PathBuf, entry: String, tensor: String, dtype: String },
    /// A tensor's view reaches past the end of its storage file.
    #[error(
        "{}: {}, tensor `{tensor}` needs {needed} elements of storage `{storage}`, which holds \
         {available}",
        path.display(),
        entry_label(entry)
    )]
    StorageOutOfBounds { path: PathBuf, entry: String, tensor: String, storage: String, needed: u64, available: u64 },
    /// A file starting with a pickle whose first pickle is not torch's magic number.
    #[error(
        "{}: not a legacy torch.save file (or a corrupt one): its first pickle is {found}, not torch's \
         magic number 0x1950a86a20f9469cfc6c",
        path.display()
    )]
    LegacyMagic { path: PathBuf, found: String },
    /// A legacy file whose second pickle is not the protocol version 1001.
    #[error("{}: legacy torch.save protocol version is {found}; only 1001 is supported", path.display())]
    LegacyProtocol { path: PathBuf, found: String },
    /// A legacy file written on a big-endian machine.
    #[error(
        "{}: legacy torch.save file written on a big-endian machine (sys_info little_endian=False), \
         which is not supported",
        path.display()
    )]
    LegacyBigEndian { path: PathBuf },
    /// The fifth pickle of a legacy file is not the list of storage keys.
    #[error("{}: the storage key list of the legacy torch.save file is {found}, not a list of strings", path.display())]
    LegacyStorageList { path: PathBuf, found: String },
    /// A tensor's storage is not among the storages whose data the legacy file holds.
    #[error("{}: storage `{storage}` is used by a tensor but absent from the legacy file's storage list", path.display())]
    LegacyStorageUnlisted { path: PathBuf, storage: String },
    /// A listed storage no persistent id describes, so its element size (and the position of
    /// the storages after it) is unknown.
    #[error(
        "{}: storage `{storage}` is in the legacy file's storage list but no persistent id gives its \
         type, so the data of the storages from it on cannot be located",
        path.display()
    )]
    LegacyStorageUndescribed { path: PathBuf, storage: String },
    /// Two persistent ids give one storage different element types.
    #[error("{}: legacy storage `{storage}` is referred to both as {first} and as {second}", path.display())]
    LegacyStorageConflict { path: PathBuf, storage: String, first: String, second: String },
    /// A listed storage of a class whose element size is unknown, so the data of the storages
    /// from it on cannot be located.
    #[error(
        "{}: legacy storage `{storage}` has the unsupported storage type {dtype} of unknown element size, \
         so the data of the storages from it on cannot be located",
        path.display()
    )]
    LegacyElementSize { path: PathBuf, storage: String, dtype: String },
    /// A storage's data record disagrees with its persistent id on the element count.
    #[error(
        "{}: legacy storage `{storage}` has a data record of {found} elements, its persistent id says {expected}",
        path.display()
    )]
    LegacyStorageCount { path: PathBuf, storage: String, expected: u64, found: u64 },
    /// A storage's data record reaches past the end of the file.
    #[error(
        "{}: truncated legacy torch.save file: the data of storage `{storage}` ends at byte {end}, the file \
         has {file_len} bytes",
        path.display()
    )]
    LegacyTruncated { path: PathBuf, storage: String, end: u64, file_len: u64 },
}

type Error = TorchCheckpointError;

/// How error messages name a top-level entry; `""` stands for the top-level object itself.
fn entry_label(entry: &str) -> String {
    if entry.is_empty() {
        "the top-level object".to_owned()
    } else {
        format!("entry `{entry}`")
    }
}

/// Whether a file starting with `head` (its first 9 bytes or fewer) is a
/// `torch.save` file: a zip archive (`PK`, torch >= 1.6), or a legacy one,
/// which starts with a pickle (`0x80`). A safetensors file starts with an
/// 8-byte header length followed by its JSON header's `{`, which tells it
/// apart from a legacy pickle whose first byte happens to be the same.
pub fn is_torch_save(head: &[u8]) -> bool {
    head.starts_with(b"PK") || (head.first() == Some(&0x80) && head.get(8) != Some(&b'{'))
}

/// [`is_torch_save`] of the file at `path`.
///
/// # Errors
/// If the file cannot be opened or read.
pub fn is_torch_save_file(path: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let mut head = [0u8; 9];
    let mut file = std::fs::File::open(path)?;
    let mut read = 0;
    while read < head.len() {
        match file.read(&mut head[read..])? {
            0 => break,
            n => read += n,
        }
    }
    Ok(is_torch_save(&head[..read]))
}

/// The top-level keys of the checkpoint's dict (e.g. `["model", "ema", "opt", "args"]`), in
/// file order. Non-string keys are rendered as text (integers in decimal).
pub fn checkpoint_entries(path: &Path) -> Result<Vec<String>, TorchCheckpointError> {
    let checkpoint = Checkpoint::open(path)?;
    let dict = checkpoint.top_level_dict()?;
    let entries = dict.borrow().iter().map(|(key, _)| key_text(key)).collect();
    Ok(entries)
}

/// The state dict under top-level key `entry` (e.g. `"model"` or `"ema"`), in file order.
///
/// With `entry == ""` the top-level object itself is taken as the state dict, which reads a
/// plain `torch.save(model.state_dict())` file.
///
/// Errors: file missing/unreadable, not a torch checkpoint (zip or legacy), entry missing (the error lists
/// the entries present), entry not a dict of tensors, unsupported dtype. Storages of float16,
/// bfloat16, float64, int64, int32, int16, int8, uint8 and bool are converted to f32 (integers
/// beyond 2^24 in magnitude are rounded).
pub fn read_state_dict(path: &Path, entry: &str) -> Result<Vec<(String, HostTensor)>, TorchCheckpointError> {
    let mut checkpoint = Checkpoint::open(path)?;
    let value = if entry.is_empty() {
        checkpoint.root.clone()
    } else {
        let dict = checkpoint.top_level_dict()?;
        let found = dict
            .borrow()
            .iter()
            .find(|(key, _)| matches!(key, Value::Str(s) if s == entry))
            .map(|(_, value)| value.clone());
        found.ok_or_else(|| Error::MissingEntry {
            path: path.to_path_buf(),
            entry: entry.to_owned(),
            present: dict.borrow().iter().map(|(key, _)| key_text(key)).collect(),
        })?
    };
    let tensors = tensor_refs(path, entry, &value)?;

    // Storages used by several tensors (views of one buffer) are read once.
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for (_, tensor) in &tensors {
        *uses.entry(tensor.storage.key.as_str()).or_default() += 1;
    }
    let mut shared: HashMap<String, Rc<Vec<u8>>> = HashMap::new();
    let mut out = Vec::with_capacity(tensors.len());
    for (name, tensor) in &tensors {
        let key = tensor.storage.key.as_str();
        // An unsupported dtype is reported before the storage is looked for: in a legacy file an
        // unknown element size would otherwise surface as an unlocatable storage.
        if let Err(dtype) = tensor.storage.dtype.decoder() {
            return Err(Error::UnsupportedDtype {
                path: path.to_path_buf(),
                entry: entry.to_owned(),
                tensor: name.clone(),
                dtype,
            });
        }
        let bytes = match shared.get(key) {
            Some(bytes) => bytes.clone(),
            None => {
                let bytes = Rc::new(checkpoint.storage_bytes(key)?);
                if uses.get(key).copied().unwrap_or(0) > 1 {
                    shared.insert(key.to_owned(), bytes.clone());
                }
                bytes
            }
        };
        let data = tensor_data(tensor, &bytes).map_err(|failure| match failure {
            GatherError::Dtype(dtype) => Error::UnsupportedDtype {
                path: path.to_path_buf(),
                entry: entry.to_owned(),
                tensor: name.clone(),
                dtype,
            },
            GatherError::OutOfBounds { needed, available } => Error::StorageOutOfBounds {
                path: path.to_path_buf(),
                entry: entry.to_owned(),
                tensor: name.clone(),
                storage: key.to_owned(),
                needed,
                available,
            },
        })?;
        out.push((name.clone(), HostTensor { shape: tensor.shape.clone(), data }));
    }
    Ok(out)
}

/// The names and tensor references of a state dict value, in dict order.
fn tensor_refs(path: &Path, entry: &str, value: &Value) -> Result<Vec<(String, Rc<TensorRef>)>, Error> {
    let Value::Dict(dict) = value else {
        return Err(Error::NotADict { path: path.to_path_buf(), entry: entry.to_owned(), found: value.describe() });
    };
    let dict = dict.borrow();
    dict.iter()
        .map(|(key, value)| {
            let Value::Str(name) = key else {
                return Err(Error::NotADict {
                    path: path.to_path_buf(),
                    entry: entry.to_owned(),
                    found: format!("a dict with the non-string key `{}`", key_text(key)),
                });
            };
            match value {
                Value::Tensor(tensor) => Ok((name.clone(), tensor.clone())),
                other => Err(Error::NotATensor {
                    path: path.to_path_buf(),
                    entry: entry.to_owned(),
                    key: name.clone(),
                    found: other.describe(),
                }),
            }
        })
        .collect()
}

/// An open checkpoint with its unpickled top-level object.
struct Checkpoint {
    path: PathBuf,
    root: Value,
    storages: StorageSource,
}

/// Where the storage bytes of a checkpoint live.
enum StorageSource {
    Zip(ZipStorages),
    Legacy(LegacyStorages),
}

impl Checkpoint {
    /// Opens a zip (first bytes `PK`, or anything but a pickle) or legacy (first byte `0x80`,
    /// the pickle `PROTO` opcode) checkpoint and unpickles its object.
    fn open(path: &Path) -> Result<Self, Error> {
        let io_error = |source| Error::Io { path: path.to_path_buf(), source };
        let mut file = File::open(path).map_err(io_error)?;
        let file_len = file.metadata().map_err(io_error)?.len();
        let mut head = Vec::with_capacity(1);
        (&mut file).take(1).read_to_end(&mut head).map_err(io_error)?;
        file.seek(SeekFrom::Start(0)).map_err(io_error)?;
        if head.first() == Some(&op::PROTO) {
            let (storages, root) = LegacyStorages::open(path, file, file_len)?;
            return Ok(Checkpoint { path: path.to_path_buf(), root, storages: StorageSource::Legacy(storages) });
        }
        let (storages, root) = ZipStorages::open(path, file, file_len)?;
        Ok(Checkpoint { path: path.to_path_buf(), root, storages: StorageSource::Zip(storages) })
    }

    fn top_level_dict(&self) -> Result<Dict, Error> {
        match &self.root {
            Value::Dict(dict) => Ok(dict.clone()),
            other => Err(Error::TopLevelNotDict { path: self.path.clone(), found: other.describe() }),
        }
    }

    /// The raw bytes of the (root) storage `key`.
    fn storage_bytes(&mut self, key: &str) -> Result<Vec<u8>, Error> {
        match &mut self.storages {
            StorageSource::Zip(zip) => zip.storage_bytes(key),
            StorageSource::Legacy(legacy) => legacy.storage_bytes(key),
        }
    }
}

/// The storages of a zip checkpoint: one archive entry each.
struct ZipStorages {
    path: PathBuf,
    archive: ZipArchive<BufReader<File>>,
    file_len: u64,
    /// `<archive>/`, the directory of `data.pkl` inside the zip.
    prefix: String,
}

impl ZipStorages {
    fn open(path: &Path, file: File, file_len: u64) -> Result<(Self, Value), Error> {
        let archive = ZipArchive::new(BufReader::new(file))
            .map_err(|source| Error::NotZip { path: path.to_path_buf(), source })?;
        let pickle_name = archive
            .file_names()
            .find(|name| name.ends_with("/data.pkl") && name.matches('/').count() == 1)
            .map(str::to_owned)
            .ok_or_else(|| Error::NoPickle { path: path.to_path_buf() })?;
        let prefix = pickle_name[..pickle_name.len() - "data.pkl".len()].to_owned();
        let mut zip = ZipStorages { path: path.to_path_buf(), archive, file_len, prefix };
        let pickle = zip.read_entry(&pickle_name)?;
        let root = Unpickler::new(&pickle).load().map_err(|e| e.with_path(path))?;
        Ok((zip, root))
    }

    fn storage_bytes(&mut self, key: &str) -> Result<Vec<u8>, Error> {
        let name = format!("{}data/{key}", self.prefix);
        self.read_entry(&name)
    }

    /// The bytes of one zip entry, refusing compressed entries.
    fn read_entry(&mut self, name: &str) -> Result<Vec<u8>, Error> {
        let zip_error = |source| Error::Zip { path: self.path.clone(), name: name.to_owned(), source };
        let index = self
            .archive
            .index_for_name(name)
            .ok_or_else(|| Error::MissingZipEntry { path: self.path.clone(), name: name.to_owned() })?;
        let method = self.archive.by_index_raw(index).map_err(zip_error)?.compression();
        if method != CompressionMethod::Stored {
            return Err(Error::CompressedEntry {
                path: self.path.clone(),
                name: name.to_owned(),
                method: if method == CompressionMethod::DEFLATE { "DEFLATE".to_owned() } else { method.to_string() },
            });
        }
        let mut file = self.archive.by_index(index).map_err(zip_error)?;
        let capacity = usize::try_from(file.size().min(self.file_len)).unwrap_or(0);
        let mut bytes = Vec::with_capacity(capacity);
        file.read_to_end(&mut bytes).map_err(|source| Error::Io { path: self.path.clone(), source })?;
        Ok(bytes)
    }
}

/// torch's `MAGIC_NUMBER` (`0x1950a86a20f9469cfc6c`) as minimal little-endian two's complement
/// bytes, the form `LONG1` stores it in.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
/// torch's legacy `PROTOCOL_VERSION`.
const LEGACY_PROTOCOL: i64 = 1001;
/// How much of a legacy file is read first to find its pickles; quadrupled until they fit.
/// A state dict's pickle is a few hundred bytes per tensor, so 1 MiB covers thousands.
const LEGACY_FIRST_READ: u64 = 1 << 20;

/// What the persistent ids of a legacy file say about one root storage.
struct LegacyRoot {
    dtype: DType,
    /// Elements, as the persistent id gives them; checked against the data record.
    numel: Option<u64>,
    /// A second persistent id of the same key with another type: (first, second) class names.
    conflict: Option<(String, String)>,
}

/// The storages of a legacy checkpoint: sequential records after the pickles, located lazily.
struct LegacyStorages {
    path: PathBuf,
    file: File,
    file_len: u64,
    roots: HashMap<String, LegacyRoot>,
    /// Storage keys in the order their records follow the pickles.
    order: Vec<String>,
    /// How many records of `order` have been located, and where the next one starts.
    walked: usize,
    next_record: u64,
    /// Key to (first data byte, data bytes) of the records located so far.
    located: HashMap<String, (u64, u64)>,
}

impl LegacyStorages {
    /// Reads the five pickles (growing the read until they fit) and checks the header.
    fn open(path: &Path, mut file: File, file_len: u64) -> Result<(Self, Value), Error> {
        let io_error = |source| Error::Io { path: path.to_path_buf(), source };
        let mut bytes = Vec::new();
        loop {
            let target = if bytes.is_empty() { LEGACY_FIRST_READ } else { bytes.len() as u64 * 4 }.min(file_len);
            let have = bytes.len() as u64;
            (&mut file).take(target - have).read_to_end(&mut bytes).map_err(io_error)?;
            if (bytes.len() as u64) < target {
                // The file shrank while being read.
                return Err(io_error(std::io::ErrorKind::UnexpectedEof.into()));
            }
            let complete = target == file_len;
            match LegacyHeader::parse(&bytes) {
                Ok(header) => return Self::from_header(path, file, file_len, header),
                Err(LegacyParseError::Pickle(PickleError::Truncated { .. })) if !complete => continue,
                Err(e) => return Err(e.with_path(path)),
            }
        }
    }

    fn from_header(path: &Path, file: File, file_len: u64, header: LegacyHeader) -> Result<(Self, Value), Error> {
        let mut roots: HashMap<String, LegacyRoot> = HashMap::new();
        for storage in &header.storages {
            match roots.get_mut(&storage.key) {
                None => {
                    let root = LegacyRoot { dtype: storage.dtype.clone(), numel: storage.numel, conflict: None };
                    roots.insert(storage.key.clone(), root);
                }
                Some(root) if root.dtype != storage.dtype && root.conflict.is_none() => {
                    root.conflict = Some((root.dtype.class_name(), storage.dtype.class_name()));
                }
                Some(_) => {}
            }
        }
        let storages = LegacyStorages {
            path: path.to_path_buf(),
            file,
            file_len,
            roots,
            order: header.storage_keys,
            walked: 0,
            next_record: header.data_start as u64,
            located: HashMap::new(),
        };
        Ok((storages, header.root))
    }

    fn storage_bytes(&mut self, key: &str) -> Result<Vec<u8>, Error> {
        let (start, len) = self.locate(key)?;
        let io_error = |source| Error::Io { path: self.path.clone(), source };
        self.file.seek(SeekFrom::Start(start)).map_err(io_error)?;
        // `locate` checked that the record lies inside the file, which bounds the allocation.
        let mut bytes = vec![0u8; usize::try_from(len).map_err(|_| io_error(std::io::ErrorKind::OutOfMemory.into()))?];
        self.file.read_exact(&mut bytes).map_err(io_error)?;
        Ok(bytes)
    }

    /// The data position of storage `key`, walking the records in file order up to it, as
    /// `_legacy_load` reads them: an 8-byte little-endian element count, then the elements.
    fn locate(&mut self, key: &str) -> Result<(u64, u64), Error> {
        while !self.located.contains_key(key) {
            let Some(record_key) = self.order.get(self.walked).cloned() else {
                return Err(Error::LegacyStorageUnlisted { path: self.path.clone(), storage: key.to_owned() });
            };
            let (start, len) = self.read_record_header(&record_key)?;
            // torch lists each key once (the sorted keys of a dict); a repeat would be a later record.
            self.located.insert(record_key, (start, len));
            self.walked += 1;
            self.next_record = start + len;
        }
        Ok(self.located[key])
    }

    /// Checks the record of `key` at `next_record`: its element count and its extent.
    fn read_record_header(&mut self, key: &str) -> Result<(u64, u64), Error> {
        let path = || self.path.clone();
        let storage = || key.to_owned();
        let root =
            self.roots.get(key).ok_or_else(|| Error::LegacyStorageUndescribed { path: path(), storage: storage() })?;
        if let Some((first, second)) = &root.conflict {
            return Err(Error::LegacyStorageConflict {
                path: path(),
                storage: storage(),
                first: first.clone(),
                second: second.clone(),
            });
        }
        let element_size = root.dtype.element_size().ok_or_else(|| Error::LegacyElementSize {
            path: path(),
            storage: storage(),
            dtype: root.dtype.class_name(),
        })?;
        let truncated =
            |end: u64| Error::LegacyTruncated { path: path(), storage: storage(), end, file_len: self.file_len };
        let start = self.next_record.checked_add(8).ok_or_else(|| truncated(u64::MAX))?;
        if start > self.file_len {
            return Err(truncated(start));
        }
        let mut count = [0u8; 8];
        let io_error = |source| Error::Io { path: path(), source };
        self.file.seek(SeekFrom::Start(self.next_record)).map_err(io_error)?;
        self.file.read_exact(&mut count).map_err(io_error)?;
        let count = u64::from_le_bytes(count);
        if let Some(expected) = root.numel {
            if expected != count {
                return Err(Error::LegacyStorageCount { path: path(), storage: storage(), expected, found: count });
            }
        }
        let len = count.checked_mul(element_size as u64).ok_or_else(|| truncated(u64::MAX))?;
        let end = start.checked_add(len).ok_or_else(|| truncated(u64::MAX))?;
        if end > self.file_len {
            return Err(truncated(end));
        }
        Ok((start, len))
    }
}

/// Why the pickles of a legacy file could not be read: a pickle error (possibly only because
/// too little of the file was read) or a header that is not torch's.
enum LegacyParseError {
    Pickle(PickleError),
    /// The magic number pickle holds this value instead.
    Magic(String),
    /// The protocol version pickle holds this value instead.
    Protocol(String),
    BigEndian,
    /// The storage key pickle holds this value instead.
    StorageList(String),
}

impl From<PickleError> for LegacyParseError {
    fn from(e: PickleError) -> Self {
        LegacyParseError::Pickle(e)
    }
}

impl LegacyParseError {
    fn with_path(self, path: &Path) -> Error {
        let path = path.to_path_buf();
        match self {
            LegacyParseError::Pickle(e) => e.with_path(&path),
            LegacyParseError::Magic(found) => Error::LegacyMagic { path, found },
            LegacyParseError::Protocol(found) => Error::LegacyProtocol { path, found },
            LegacyParseError::BigEndian => Error::LegacyBigEndian { path },
            LegacyParseError::StorageList(found) => Error::LegacyStorageList { path, found },
        }
    }
}

/// The five pickles of a legacy file.
struct LegacyHeader {
    root: Value,
    /// Every storage persistent id of the object pickle, in order.
    storages: Vec<Rc<StorageRef>>,
    storage_keys: Vec<String>,
    /// Offset of the first storage record.
    data_start: usize,
}

impl LegacyHeader {
    /// Parses the pickles at the start of `bytes`, mirroring `_legacy_load`.
    fn parse(bytes: &[u8]) -> Result<LegacyHeader, LegacyParseError> {
        let (magic, _, pos) = Unpickler::at(bytes, 0).load_with_storages()?;
        if !matches!(&magic, Value::BigInt(le) if le.as_slice() == LEGACY_MAGIC) {
            return Err(LegacyParseError::Magic(magic.describe()));
        }
        let (protocol, _, pos) = Unpickler::at(bytes, pos).load_with_storages()?;
        if !matches!(protocol, Value::Int(LEGACY_PROTOCOL)) {
            return Err(LegacyParseError::Protocol(protocol.describe()));
        }
        // torch itself ignores `sys_info` and its recent writers store records little-endian on
        // any machine, but old writers may have stored the element count natively, so a file
        // that declares a big-endian origin is refused rather than guessed at.
        let (sys_info, _, pos) = Unpickler::at(bytes, pos).load_with_storages()?;
        if let Value::Dict(info) = &sys_info {
            let big_endian = info
                .borrow()
                .iter()
                .any(|(k, v)| matches!((k, v), (Value::Str(k), Value::Bool(false)) if k == "little_endian"));
            if big_endian {
                return Err(LegacyParseError::BigEndian);
            }
        }
        let (root, storages, pos) = Unpickler::at(bytes, pos).load_with_storages()?;
        let (keys, _, data_start) = Unpickler::at(bytes, pos).load_with_storages()?;
        let storage_keys = match &keys {
            Value::List(list) => list
                .borrow()
                .iter()
                .map(|key| match key {
                    Value::Str(key) => Some(key.clone()),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>(),
            _ => None,
        };
        let storage_keys = storage_keys.ok_or_else(|| LegacyParseError::StorageList(keys.describe()))?;
        Ok(LegacyHeader { root, storages, storage_keys, data_start })
    }
}

/// Element type of a torch storage, from its pickled class (`torch.FloatStorage`, ...).
#[derive(Debug, Clone, PartialEq)]
enum DType {
    Known(Element),
    /// A class this reader cannot convert (complex, quantized, unknown), by name.
    Unsupported(String),
}

/// The storage classes of the elements this reader converts.
const STORAGE_CLASSES: [(&str, Element); 10] = [
    ("FloatStorage", Element::F32),
    ("HalfStorage", Element::F16),
    ("BFloat16Storage", Element::BF16),
    ("DoubleStorage", Element::F64),
    ("LongStorage", Element::I64),
    ("IntStorage", Element::I32),
    ("ShortStorage", Element::I16),
    ("CharStorage", Element::I8),
    ("ByteStorage", Element::U8),
    ("BoolStorage", Element::Bool),
];

impl DType {
    fn from_storage_class(module: &str, name: &str) -> DType {
        let known = STORAGE_CLASSES.iter().find(|(class, _)| *class == name).map(|&(_, element)| element);
        match (module, known, name) {
            ("torch", Some(element), _) => DType::Known(element),
            ("torch", None, "UntypedStorage") => DType::Known(Element::U8),
            _ => DType::Unsupported(format!("{module}.{name}")),
        }
    }

    /// The storage class, as it appears in the pickle (`torch.FloatStorage`).
    fn class_name(&self) -> String {
        match self {
            DType::Known(element) => {
                let (class, _) = STORAGE_CLASSES.iter().find(|(_, e)| e == element).expect("every element has a class");
                format!("torch.{class}")
            }
            DType::Unsupported(class) => class.clone(),
        }
    }

    /// Bytes per element, also for the storage classes torch saves but this reader cannot convert
    /// (complex and quantized), so that a legacy file's records can be walked past them.
    fn element_size(&self) -> Option<usize> {
        match self {
            DType::Known(element) => Some(element.size()),
            DType::Unsupported(class) => match class.as_str() {
                "torch.ComplexDoubleStorage" => Some(16),
                "torch.ComplexFloatStorage" => Some(8),
                "torch.QInt32Storage" => Some(4),
                "torch.QInt8Storage" | "torch.QUInt8Storage" | "torch.QUInt4x2Storage" | "torch.QUInt2x4Storage" => {
                    Some(1)
                }
                _ => None,
            },
        }
    }

    /// Element size in bytes and the little-endian decoder, or the unsupported class name.
    fn decoder(&self) -> Result<(usize, Decode), String> {
        match self {
            DType::Known(element) => Ok((element.size(), element.decoder())),
            DType::Unsupported(class) => Err(class.clone()),
        }
    }
}

/// A storage named by a persistent id: its key (zip entry name or legacy root key), element
/// type and, for a legacy storage view, the slice of the root storage it covers.
#[derive(Debug, Clone, PartialEq)]
struct StorageRef {
    key: String,
    dtype: DType,
    /// Elements of the root storage, as the persistent id gives them.
    numel: Option<u64>,
    /// First element of the root storage this storage starts at (0 unless a legacy view).
    view_offset: usize,
    /// Elements of a legacy view; `None` for the whole root storage.
    view_len: Option<usize>,
}

/// A strided view of a storage, as `_rebuild_tensor_v2` describes it (offsets in elements).
#[derive(Debug, Clone, PartialEq)]
struct TensorRef {
    storage: Rc<StorageRef>,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
    numel: usize,
}

enum GatherError {
    Dtype(String),
    OutOfBounds { needed: u64, available: u64 },
}

/// The tensor's elements in row-major order, honouring offset and strides.
fn tensor_data(tensor: &TensorRef, bytes: &[u8]) -> Result<Vec<f32>, GatherError> {
    let (size, decode) = tensor.storage.dtype.decoder().map_err(GatherError::Dtype)?;
    if tensor.numel == 0 {
        return Ok(Vec::new());
    }
    // Largest element index the view touches; overflow was ruled out by `rebuild_tensor`.
    let last = tensor.offset + tensor.shape.iter().zip(&tensor.stride).map(|(&n, &s)| (n - 1) * s).sum::<usize>();
    // A legacy storage view is the slice [view_offset, view_offset + view_len) of its root.
    let base = tensor.storage.view_offset;
    let root_available = bytes.len() / size;
    let mut available = root_available.saturating_sub(base);
    if let Some(view_len) = tensor.storage.view_len {
        available = available.min(view_len);
    }
    if last >= available {
        return Err(GatherError::OutOfBounds { needed: last as u64 + 1, available: available as u64 });
    }
    // In range: base + i <= base + last < root_available.
    let read = |i: usize| decode(&bytes[(base + i) * size..(base + i + 1) * size]);
    let mut data = Vec::with_capacity(tensor.numel);
    let mut index = vec![0usize; tensor.shape.len()];
    let mut position = tensor.offset;
    for _ in 0..tensor.numel {
        data.push(read(position));
        // Odometer step over the multi-index, last dimension fastest. Wrapping arithmetic: a
        // size-1 dimension may carry any stride, and the in-range result is exact regardless.
        for dim in (0..index.len()).rev() {
            index[dim] += 1;
            position = position.wrapping_add(tensor.stride[dim]);
            if index[dim] < tensor.shape[dim] {
                break;
            }
            position = position.wrapping_sub(tensor.stride[dim].wrapping_mul(tensor.shape[dim]));
            index[dim] = 0;
        }
    }
    Ok(data)
}

type Dict = Rc<RefCell<Vec<(Value, Value)>>>;
type List = Rc<RefCell<Vec<Value>>>;

/// A value on the unpickler's stack. Mutable containers are shared (`Rc`) so that memo
/// references see later `SETITEM`/`APPEND`s, as in Python.
#[derive(Debug, Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An int wider than 64 bits (torch's legacy magic number), as minimal little-endian two's
    /// complement bytes.
    BigInt(Rc<Vec<u8>>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Rc<Vec<Value>>),
    List(List),
    Dict(Dict),
    Set(List),
    /// A symbolic reference to `module.name`; never imported.
    Global {
        module: String,
        name: String,
    },
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
    /// Anything this reader gives no meaning to, described for error messages.
    Opaque(String),
}

impl Value {
    fn describe(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(b) => format!("the bool {}", if *b { "True" } else { "False" }),
            Value::Int(i) => format!("the int {i}"),
            Value::BigInt(le) => {
                let hex: String = le.iter().rev().map(|b| format!("{b:02x}")).collect();
                format!("an int wider than 64 bits (two's complement 0x{hex})")
            }
            Value::Float(f) => format!("the float {f}"),
            Value::Str(_) => "a string".into(),
            Value::Bytes(b) => format!("a bytes object of {} bytes", b.len()),
            Value::Tuple(_) => "a tuple".into(),
            Value::List(_) => "a list".into(),
            Value::Dict(_) => "a dict".into(),
            Value::Set(_) => "a set".into(),
            Value::Global { module, name } => format!("the global `{module}.{name}`"),
            Value::Storage(_) => "a bare storage".into(),
            Value::Tensor(_) => "a tensor".into(),
            Value::Opaque(what) => what.clone(),
        }
    }

    fn new_dict() -> Value {
        Value::Dict(Rc::new(RefCell::new(Vec::new())))
    }
}

/// A dict key as text: strings as they are, integers in decimal, anything else described.
fn key_text(key: &Value) -> String {
    match key {
        Value::Str(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        other => other.describe(),
    }
}

/// Python dict semantics for the key types that occur in checkpoints: a repeated key replaces.
fn dict_insert(entries: &mut Vec<(Value, Value)>, key: Value, value: Value) {
    let same = |k: &Value| match (k, &key) {
        (Value::Str(a), Value::Str(b)) => a == b,
        (Value::Int(a), Value::Int(b)) => a == b,
        _ => false,
    };
    match entries.iter_mut().find(|(k, _)| same(k)) {
        Some(slot) => slot.1 = value,
        None => entries.push((key, value)),
    }
}

/// `REDUCE`: gives meaning to the few known callables, never calls anything.
fn reduce(callable: &Value, args: &Value) -> Value {
    let Value::Global { module, name } = callable else {
        return Value::Opaque(format!("the result of calling {}", callable.describe()));
    };
    let args_empty = matches!(args, Value::Tuple(items) if items.is_empty());
    match (module.as_str(), name.as_str()) {
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => rebuild_tensor(args)
            .unwrap_or_else(|reason| Value::Opaque(format!("an unreadable `{module}.{name}` tensor ({reason})"))),
        ("torch._utils", "_rebuild_parameter") => match args {
            Value::Tuple(items) if matches!(items.first(), Some(Value::Tensor(_))) => items[0].clone(),
            _ => Value::Opaque("an unreadable `torch._utils._rebuild_parameter` tensor".into()),
        },
        ("collections", "OrderedDict") if args_empty => Value::new_dict(),
        // Python 2 pickles an `OrderedDict` as `OrderedDict([[key, value], ...])`.
        ("collections", "OrderedDict") => ordered_dict_from_pairs(args)
            .unwrap_or_else(|| Value::Opaque(format!("an opaque `{module}.{name}(...)` value"))),
        _ => Value::Opaque(format!("an opaque `{module}.{name}(...)` value")),
    }
}

/// `OrderedDict(pairs)` for a single argument that is a list of `[key, value]` lists or tuples.
fn ordered_dict_from_pairs(args: &Value) -> Option<Value> {
    let Value::Tuple(items) = args else { return None };
    let [Value::List(pairs)] = items.as_slice() else { return None };
    let mut entries = Vec::new();
    for pair in pairs.borrow().iter() {
        let (key, value) = match pair {
            Value::List(kv) => match kv.borrow().as_slice() {
                [k, v] => (k.clone(), v.clone()),
                _ => return None,
            },
            Value::Tuple(kv) => match kv.as_slice() {
                [k, v] => (k.clone(), v.clone()),
                _ => return None,
            },
            _ => return None,
        };
        dict_insert(&mut entries, key, value);
    }
    Some(Value::Dict(Rc::new(RefCell::new(entries))))
}

/// `NEWOBJ`: `cls.__new__(cls, ...)`, again only symbolically.
fn new_object(class: &Value) -> Value {
    match class {
        Value::Global { module, name } if module == "collections" && name == "OrderedDict" => Value::new_dict(),
        Value::Global { module, name } => Value::Opaque(format!("an opaque `{module}.{name}` object")),
        other => Value::Opaque(format!("an object of {}", other.describe())),
    }
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, ...)`.
fn rebuild_tensor(args: &Value) -> Result<Value, String> {
    let Value::Tuple(items) = args else {
        return Err(format!("arguments are {}", args.describe()));
    };
    let [storage, offset, size, stride, ..] = items.as_slice() else {
        return Err(format!("{} arguments instead of at least 4", items.len()));
    };
    let Value::Storage(storage) = storage else {
        return Err(format!("the storage argument is {}", storage.describe()));
    };
    let as_usize = |v: &Value| match v {
        Value::Int(i) => usize::try_from(*i).map_err(|_| format!("negative value {i}")),
        other => Err(format!("{} instead of an int", other.describe())),
    };
    let as_usizes = |v: &Value| match v {
        Value::Tuple(items) => items.iter().map(as_usize).collect::<Result<Vec<_>, _>>(),
        Value::List(items) => items.borrow().iter().map(as_usize).collect(),
        other => Err(format!("{} instead of a tuple of ints", other.describe())),
    };
    let offset = as_usize(offset)?;
    let shape = as_usizes(size)?;
    let stride = as_usizes(stride)?;
    if shape.len() != stride.len() {
        return Err(format!("{} sizes but {} strides", shape.len(), stride.len()));
    }
    let overflow = || "sizes overflow".to_string();
    let numel = shape.iter().try_fold(1usize, |acc, &n| acc.checked_mul(n)).ok_or_else(overflow)?;
    if numel > 0 {
        // Make sure the largest index (and its byte position) fits in usize.
        shape
            .iter()
            .zip(&stride)
            .try_fold(offset, |acc, (&n, &s)| acc.checked_add((n - 1).checked_mul(s)?))
            .and_then(|last| last.checked_add(1)?.checked_mul(8))
            .ok_or_else(overflow)?;
    }
    Ok(Value::Tensor(Rc::new(TensorRef { storage: storage.clone(), offset, shape, stride, numel })))
}

/// `BINPERSID`: torch's storage persistent ids: `('storage', StorageClass, key, location, numel)`
/// in zip files, `('storage', StorageClass, root_key, location, numel, view_metadata)` in legacy
/// ones, where `view_metadata` is `None` or `(view_key, offset, view_size)` in elements.
fn persistent_load(pid: &Value) -> Value {
    if let Value::Tuple(items) = pid {
        if let [Value::Str(tag), Value::Global { module, name }, Value::Str(key), rest @ ..] = items.as_slice() {
            if tag == "storage" {
                let numel = match rest.get(1) {
                    Some(Value::Int(n)) => u64::try_from(*n).ok(),
                    _ => None,
                };
                let (view_offset, view_len) = match rest.get(2) {
                    None | Some(Value::None) => (0, None),
                    Some(Value::Tuple(view)) => match view.as_slice() {
                        [Value::Str(_), Value::Int(offset), Value::Int(len)] => {
                            match (usize::try_from(*offset), usize::try_from(*len)) {
                                (Ok(offset), Ok(len)) => (offset, Some(len)),
                                _ => {
                                    return Value::Opaque(format!(
                                        "a storage view with negative bounds ({offset}, {len})"
                                    ))
                                }
                            }
                        }
                        _ => return Value::Opaque("a storage with unreadable view metadata".into()),
                    },
                    Some(other) => {
                        return Value::Opaque(format!("a storage whose view metadata is {}", other.describe()))
                    }
                };
                return Value::Storage(Rc::new(StorageRef {
                    key: key.clone(),
                    dtype: DType::from_storage_class(module, name),
                    numel,
                    view_offset,
                    view_len,
                }));
            }
        }
    }
    Value::Opaque(format!("an unsupported persistent id ({})", pid.describe()))
}

/// Pickle opcodes (see CPython's `Lib/pickletools.py`).
mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const BINFLOAT: u8 = b'G';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const BINSTRING: u8 = b'T';
    pub const SHORT_BINSTRING: u8 = b'U';
    pub const BINUNICODE: u8 = b'X';
    pub const EMPTY_LIST: u8 = b']';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const DICT: u8 = b'd';
    pub const APPENDS: u8 = b'e';
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const LIST: u8 = b'l';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const SETITEMS: u8 = b'u';
    pub const EMPTY_DICT: u8 = b'}';
    pub const PROTO: u8 = 0x80;
    pub const NEWOBJ: u8 = 0x81;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES8: u8 = 0x8e;
    pub const EMPTY_SET: u8 = 0x8f;
    pub const ADDITEMS: u8 = 0x90;
    pub const FROZENSET: u8 = 0x91;
    pub const NEWOBJ_EX: u8 = 0x92;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
}

/// A pickle that could not be interpreted; gets the file path in [`PickleError::with_path`].
#[derive(Debug)]
enum PickleError {
    Malformed {
        offset: usize,
        reason: String,
    },
    /// The pickle runs past the end of the bytes given (which may be only a prefix of the file).
    Truncated {
        offset: usize,
        reason: String,
    },
    UnknownOpcode {
        opcode: u8,
        offset: usize,
    },
}

impl PickleError {
    fn with_path(self, path: &Path) -> Error {
        let path = path.to_path_buf();
        match self {
            PickleError::Malformed { offset, reason } | PickleError::Truncated { offset, reason } => {
                Error::Malformed { path, offset, reason }
            }
            PickleError::UnknownOpcode { opcode, offset } => Error::UnknownOpcode { path, opcode, offset },
        }
    }
}

/// The opcode interpreter: a value stack, a stack of mark positions and the memo.
struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being interpreted, for error messages.
    op_start: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    /// Every storage a `BINPERSID` produced, reachable from the result or not.
    storages: Vec<Rc<StorageRef>>,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self::at(data, 0)
    }

    /// An unpickler for the pickle starting at `pos` of `data` (error offsets count from the
    /// start of `data`).
    fn at(data: &'a [u8], pos: usize) -> Self {
        Unpickler {
            data,
            pos,
            op_start: pos,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            storages: Vec::new(),
        }
    }

    fn malformed(&self, reason: impl Into<String>) -> PickleError {
        PickleError::Malformed { offset: self.op_start, reason: reason.into() }
    }

    fn truncated(&self, reason: impl Into<String>) -> PickleError {
        PickleError::Truncated { offset: self.op_start, reason: reason.into() }
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], PickleError> {
        let left = self.data.len() - self.pos;
        match usize::try_from(n) {
            Ok(n) if n <= left => {
                let bytes = &self.data[self.pos..self.pos + n];
                self.pos += n;
                Ok(bytes)
            }
            _ => Err(self.truncated(format!("truncated: needs {n} bytes, {left} left"))),
        }
    }

    fn take_array<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        let mut array = [0u8; N];
        array.copy_from_slice(self.take(N as u64)?);
        Ok(array)
    }

    fn byte(&mut self) -> Result<u8, PickleError> {
        Ok(self.take_array::<1>()?[0])
    }

    fn u32_le(&mut self) -> Result<u32, PickleError> {
        Ok(u32::from_le_bytes(self.take_array()?))
    }

    fn u64_le(&mut self) -> Result<u64, PickleError> {
        Ok(u64::from_le_bytes(self.take_array()?))
    }

    /// A newline-terminated text argument (of `GLOBAL`).
    fn line(&mut self) -> Result<String, PickleError> {
        let rest = &self.data[self.pos..];
        let end = rest.iter().position(|&b| b == b'\n').ok_or_else(|| self.truncated("unterminated GLOBAL name"))?;
        let text = std::str::from_utf8(&rest[..end]).map_err(|_| self.malformed("GLOBAL name is not UTF-8"))?;
        self.pos += end + 1;
        Ok(text.to_owned())
    }

    fn text(&mut self, len: u64) -> Result<Value, PickleError> {
        let bytes = self.take(len)?;
        let text = std::str::from_utf8(bytes).map_err(|_| self.malformed("string is not UTF-8"))?;
        Ok(Value::Str(text.to_owned()))
    }

    /// Python 2 `str`: decoded as UTF-8 like `torch.load` does, else kept as bytes.
    fn legacy_string(&mut self, len: u64) -> Result<Value, PickleError> {
        let bytes = self.take(len)?.to_vec();
        Ok(match String::from_utf8(bytes) {
            Ok(text) => Value::Str(text),
            Err(e) => Value::Bytes(e.into_bytes()),
        })
    }

    /// Little-endian two's complement integer of `LONG1`/`LONG4`.
    fn long(&mut self, len: u64) -> Result<Value, PickleError> {
        let bytes = self.take(len)?;
        Ok(match bytes.len() {
            0 => Value::Int(0),
            n @ 1..=8 => {
                let fill = if bytes[n - 1] & 0x80 != 0 { 0xff } else { 0 };
                let mut le = [fill; 8];
                le[..n].copy_from_slice(bytes);
                Value::Int(i64::from_le_bytes(le))
            }
            _ => {
                // Drop sign-extension bytes that Python's minimal encoding would not write.
                let mut le = bytes.to_vec();
                while le.len() > 1 {
                    let (last, previous) = (le[le.len() - 1], le[le.len() - 2]);
                    if (last == 0 && previous & 0x80 == 0) || (last == 0xff && previous & 0x80 != 0) {
                        le.pop();
                    } else {
                        break;
                    }
                }
                if le.len() <= 8 {
                    let fill = if le[le.len() - 1] & 0x80 != 0 { 0xff } else { 0 };
                    let mut bytes = [fill; 8];
                    bytes[..le.len()].copy_from_slice(&le);
                    Value::Int(i64::from_le_bytes(bytes))
                } else {
                    Value::BigInt(Rc::new(le))
                }
            }
        })
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        if self.marks.last().is_some_and(|&mark| mark >= self.stack.len()) {
            return Err(self.malformed("stack underflow (popping past a MARK)"));
        }
        self.stack.pop().ok_or_else(|| self.malformed("stack underflow"))
    }

    fn top(&self) -> Result<Value, PickleError> {
        self.stack.last().cloned().ok_or_else(|| self.malformed("stack underflow"))
    }

    /// The values pushed since the last `MARK`, removing the mark.
    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let mark = self.marks.pop().ok_or_else(|| self.malformed("no MARK"))?;
        Ok(self.stack.split_off(mark))
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        if items.len() % 2 == 1 {
            return Err(self.malformed("odd number of values for dict items"));
        }
        match self.top()? {
            Value::Dict(dict) => {
                let mut dict = dict.borrow_mut();
                let mut items = items.into_iter();
                while let (Some(key), Some(value)) = (items.next(), items.next()) {
                    dict_insert(&mut dict, key, value);
                }
                Ok(())
            }
            Value::Opaque(_) => Ok(()),
            other => Err(self.malformed(format!("dict items set on {}", other.describe()))),
        }
    }

    fn append_items(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        match self.top()? {
            Value::List(list) | Value::Set(list) => {
                list.borrow_mut().extend(items);
                Ok(())
            }
            Value::Opaque(_) => Ok(()),
            other => Err(self.malformed(format!("items appended to {}", other.describe()))),
        }
    }

    /// The length argument of a length-prefixed opcode (strings, bytes, `LONG1`/`LONG4`).
    fn length(&mut self, opcode: u8) -> Result<u64, PickleError> {
        match opcode {
            op::SHORT_BINUNICODE | op::SHORT_BINSTRING | op::SHORT_BINBYTES | op::LONG1 => Ok(self.byte()?.into()),
            op::BINUNICODE | op::BINBYTES => Ok(self.u32_le()?.into()),
            op::BINSTRING | op::LONG4 => {
                let len = i32::from_le_bytes(self.take_array()?);
                u64::try_from(len).map_err(|_| self.malformed("negative length"))
            }
            _ => self.u64_le(),
        }
    }

    /// Runs the pickle up to `STOP` and returns the object it built.
    fn load(self) -> Result<Value, PickleError> {
        Ok(self.load_with_storages()?.0)
    }

    /// Runs the pickle up to `STOP`; returns the object it built, every storage its persistent
    /// ids named, and the offset just past the `STOP`.
    fn load_with_storages(mut self) -> Result<(Value, Vec<Rc<StorageRef>>, usize), PickleError> {
        loop {
            self.op_start = self.pos;
            if self.pos >= self.data.len() {
                return Err(self.truncated("pickle ends without STOP"));
            }
            let opcode = self.byte()?;
            // Each arm yields the value to push, or `continue`s after acting on the stack.
            let value = match opcode {
                op::STOP => {
                    let value = self.pop()?;
                    return Ok((value, self.storages, self.pos));
                }
                op::PROTO => {
                    self.byte()?;
                    continue;
                }
                op::FRAME => {
                    self.u64_le()?;
                    continue;
                }
                op::MARK => {
                    self.marks.push(self.stack.len());
                    continue;
                }
                op::POP => {
                    if self.marks.last() == Some(&self.stack.len()) {
                        self.marks.pop();
                    } else {
                        self.pop()?;
                    }
                    continue;
                }
                op::POP_MARK => {
                    self.pop_mark()?;
                    continue;
                }
                op::DUP => self.top()?,
                op::NONE => Value::None,
                op::NEWTRUE => Value::Bool(true),
                op::NEWFALSE => Value::Bool(false),
                op::BININT => Value::Int(i32::from_le_bytes(self.take_array()?).into()),
                op::BININT1 => Value::Int(self.byte()?.into()),
                op::BININT2 => Value::Int(u16::from_le_bytes(self.take_array()?).into()),
                op::BINFLOAT => Value::Float(f64::from_be_bytes(self.take_array()?)),
                op::LONG1 | op::LONG4 => {
                    let len = self.length(opcode)?;
                    self.long(len)?
                }
                op::SHORT_BINUNICODE | op::BINUNICODE | op::BINUNICODE8 => {
                    let len = self.length(opcode)?;
                    self.text(len)?
                }
                op::SHORT_BINSTRING | op::BINSTRING => {
                    let len = self.length(opcode)?;
                    self.legacy_string(len)?
                }
                op::SHORT_BINBYTES | op::BINBYTES | op::BINBYTES8 => {
                    let len = self.length(opcode)?;
                    Value::Bytes(self.take(len)?.to_vec())
                }
                op::EMPTY_TUPLE => Value::Tuple(Rc::new(Vec::new())),
                op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                    let n = usize::from(opcode - op::TUPLE1) + 1;
                    let mut items = (0..n).map(|_| self.pop()).collect::<Result<Vec<_>, _>>()?;
                    items.reverse();
                    Value::Tuple(Rc::new(items))
                }
                op::TUPLE => Value::Tuple(Rc::new(self.pop_mark()?)),
                op::EMPTY_LIST => Value::List(Rc::new(RefCell::new(Vec::new()))),
                op::LIST => Value::List(Rc::new(RefCell::new(self.pop_mark()?))),
                op::EMPTY_SET => Value::Set(Rc::new(RefCell::new(Vec::new()))),
                op::FROZENSET => Value::Set(Rc::new(RefCell::new(self.pop_mark()?))),
                op::EMPTY_DICT => Value::new_dict(),
                op::DICT => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::new_dict());
                    self.set_items(items)?;
                    continue;
                }
                op::SETITEM => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.set_items(vec![key, value])?;
                    continue;
                }
                op::SETITEMS => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                    continue;
                }
                op::APPEND => {
                    let value = self.pop()?;
                    self.append_items(vec![value])?;
                    continue;
                }
                op::APPENDS | op::ADDITEMS => {
                    let items = self.pop_mark()?;
                    self.append_items(items)?;
                    continue;
                }
                op::BINPUT | op::LONG_BINPUT | op::MEMOIZE => {
                    let index = match opcode {
                        op::BINPUT => self.byte()?.into(),
                        op::LONG_BINPUT => self.u32_le()?.into(),
                        _ => self.memo.len() as u64,
                    };
                    let value = self.top()?;
                    self.memo.insert(index, value);
                    continue;
                }
                op::BINGET | op::LONG_BINGET => {
                    let index: u64 = match opcode {
                        op::BINGET => self.byte()?.into(),
                        _ => self.u32_le()?.into(),
                    };
                    self.memo
                        .get(&index)
                        .cloned()
                        .ok_or_else(|| self.malformed(format!("memo entry {index} is missing")))?
                }
                op::GLOBAL => {
                    let module = self.line()?;
                    let name = self.line()?;
                    Value::Global { module, name }
                }
                op::STACK_GLOBAL => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return Err(self.malformed("STACK_GLOBAL needs two strings"));
                    };
                    Value::Global { module, name }
                }
                op::REDUCE => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    reduce(&callable, &args)
                }
                op::NEWOBJ | op::NEWOBJ_EX => {
                    if opcode == op::NEWOBJ_EX {
                        self.pop()?; // keyword arguments
                    }
                    self.pop()?; // positional arguments
                    let class = self.pop()?;
                    new_object(&class)
                }
                op::BUILD => {
                    // `__setstate__`: object state (e.g. a state dict's `_metadata`) is ignored.
                    self.pop()?;
                    self.top()?;
                    continue;
                }
                op::BINPERSID => {
                    let pid = self.pop()?;
                    let storage = persistent_load(&pid);
                    if let Value::Storage(storage) = &storage {
                        self.storages.push(storage.clone());
                    }
                    storage
                }
                _ => return Err(PickleError::UnknownOpcode { opcode, offset: self.op_start }),
            };
            self.stack.push(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Write};

    fn shared_dir() -> PathBuf {
        match std::env::var_os("DIFFMOE_SHARED") {
            Some(dir) => PathBuf::from(dir),
            None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared")),
        }
    }

    fn fixture(name: &str) -> PathBuf {
        shared_dir().join("fixtures/checkpoints").join(name)
    }

    /// A fresh scratch directory under the system temp dir.
    fn temp_dir(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("diffmoe_torch_checkpoint_{}_{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Emits the pickle opcodes of a hand-built checkpoint.
    #[derive(Default)]
    struct Pickle(Vec<u8>);

    impl Pickle {
        fn op(&mut self, opcode: u8) -> &mut Self {
            self.0.push(opcode);
            self
        }
        fn str(&mut self, text: &str) -> &mut Self {
            self.op(op::BINUNICODE);
            self.0.extend((text.len() as u32).to_le_bytes());
            self.0.extend(text.as_bytes());
            self
        }
        fn int(&mut self, value: i32) -> &mut Self {
            self.op(op::BININT);
            self.0.extend(value.to_le_bytes());
            self
        }
        fn global(&mut self, module: &str, name: &str) -> &mut Self {
            self.op(op::GLOBAL);
            self.0.extend(format!("{module}\n{name}\n").as_bytes());
            self
        }
        fn ints(&mut self, values: &[i32]) -> &mut Self {
            self.op(op::MARK);
            for &v in values {
                self.int(v);
            }
            self.op(op::TUPLE)
        }
        /// `_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`.
        fn tensor(&mut self, class: &str, key: &str, offset: i32, size: &[i32], stride: &[i32]) {
            self.rebuild(offset, size, stride, |p| {
                p.op(op::MARK).str("storage").global("torch", class).str(key).str("cpu");
                p.int(0).op(op::TUPLE);
            });
        }
        /// A tensor of a legacy file: its persistent id is
        /// `('storage', torch.<class>, root, 'cpu', numel, view_metadata)`.
        #[allow(clippy::too_many_arguments)]
        fn legacy_tensor(
            &mut self,
            class: &str,
            root: &str,
            numel: i32,
            view: Option<(&str, i32, i32)>,
            offset: i32,
            size: &[i32],
            stride: &[i32],
        ) {
            self.rebuild(offset, size, stride, |p| {
                p.op(op::MARK).str("storage").global("torch", class).str(root).str("cuda:0").int(numel);
                match view {
                    None => p.op(op::NONE),
                    Some((key, offset, len)) => p.str(key).int(offset).int(len).op(op::TUPLE3),
                };
                p.op(op::TUPLE);
            });
        }
        fn rebuild(&mut self, offset: i32, size: &[i32], stride: &[i32], pid: impl FnOnce(&mut Self)) {
            self.global("torch._utils", "_rebuild_tensor_v2").op(op::MARK);
            pid(self);
            self.op(op::BINPERSID);
            self.int(offset).ints(size).ints(stride).op(op::NEWFALSE);
            self.global("collections", "OrderedDict").op(op::EMPTY_TUPLE).op(op::REDUCE);
            self.op(op::TUPLE).op(op::REDUCE);
        }
        /// An `OrderedDict` state dict exercising strides, offsets, 0-dim and dtypes.
        fn state_dict(&mut self) {
            self.global("collections", "OrderedDict").op(op::BINPUT).op(0);
            self.op(op::EMPTY_TUPLE).op(op::REDUCE).op(op::MARK);
            self.str("strided");
            self.tensor("FloatStorage", "0", 1, &[2, 3], &[1, 4]);
            self.str("scalar");
            self.tensor("FloatStorage", "0", 7, &[], &[]);
            self.str("broadcast");
            self.tensor("FloatStorage", "0", 2, &[2, 1, 2], &[0, 1000, 3]);
            self.str("half");
            self.tensor("HalfStorage", "1", 1, &[2], &[1]);
            self.str("long");
            self.tensor("LongStorage", "2", 0, &[2], &[1]);
            self.op(op::SETITEMS);
            // A state dict's `_metadata` attribute arrives through BUILD.
            self.op(op::EMPTY_DICT).str("_metadata").op(op::BINGET).op(0);
            self.op(op::EMPTY_TUPLE).op(op::REDUCE).op(op::SETITEM).op(op::BUILD);
        }
        /// `{"model": state_dict, "args": Namespace(lr=0.5), "evil": os.system("...")}`.
        fn checkpoint(&mut self) {
            self.op(op::PROTO).op(2).op(op::EMPTY_DICT).op(op::MARK);
            self.str("model");
            self.state_dict();
            self.str("args").global("argparse", "Namespace");
            self.op(op::EMPTY_TUPLE).op(op::NEWOBJ).op(op::EMPTY_DICT).str("lr");
            self.op(op::BINFLOAT).0.extend(0.5f64.to_be_bytes());
            self.op(op::SETITEM).op(op::BUILD);
            self.str("evil").global("os", "system").str("touch /tmp/pwned");
            self.op(op::TUPLE1).op(op::REDUCE);
            self.op(op::SETITEMS).op(op::STOP);
        }
    }

    fn storages() -> Vec<(&'static str, Vec<u8>)> {
        let floats: Vec<u8> = (0..12).flat_map(|i| (i as f32).to_le_bytes()).collect();
        // f16: 1.0, -2.0, 6.1035156e-05 (min normal), 5.9604645e-08 (min subnormal).
        let halves: Vec<u8> = [0x3c00u16, 0xc000, 0x0400, 0x0001].iter().flat_map(|h| h.to_le_bytes()).collect();
        let longs: Vec<u8> = [-3i64, 1 << 20].iter().flat_map(|v| v.to_le_bytes()).collect();
        vec![("0", floats), ("1", halves), ("2", longs)]
    }

    fn write_zip(path: &Path, entries: &[(String, Vec<u8>)]) {
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default().compression_method(CompressionMethod::Stored);
        for (name, bytes) in entries {
            zip.start_file(name.as_str(), options).unwrap();
            zip.write_all(bytes).unwrap();
        }
        std::fs::write(path, zip.finish().unwrap().into_inner()).unwrap();
    }

    fn write_checkpoint(path: &Path, pickle: &[u8]) {
        let mut entries =
            vec![("ckpt/data.pkl".to_string(), pickle.to_vec()), ("ckpt/version".to_string(), b"3\n".to_vec())];
        for (key, bytes) in storages() {
            entries.push((format!("ckpt/data/{key}"), bytes));
        }
        write_zip(path, &entries);
    }

    fn check_hand_built_state_dict(tensors: &[(String, HostTensor)]) {
        let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["strided", "scalar", "broadcast", "half", "long"]);
        let t = |shape: &[usize], data: &[f32]| HostTensor { shape: shape.to_vec(), data: data.to_vec() };
        // element [i][j] = storage[1 + i + 4 j]
        assert_eq!(tensors[0].1, t(&[2, 3], &[1., 5., 9., 2., 6., 10.]));
        assert_eq!(tensors[1].1, t(&[], &[7.]));
        assert_eq!(tensors[2].1, t(&[2, 1, 2], &[2., 5., 2., 5.]));
        assert_eq!(tensors[3].1, t(&[2], &[-2., 6.1035156e-05]));
        assert_eq!(tensors[4].1, t(&[2], &[-3., 1048576.]));
    }

    #[test]
    fn ema_matches_safetensors_export() {
        let tensors = read_state_dict(&fixture("official_train_checkpoint.pt"), "ema").unwrap();
        let bytes = std::fs::read(fixture("official_train_checkpoint.ema.safetensors")).unwrap();
        let expected = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(tensors.len(), expected.len());
        let mut seen = std::collections::HashSet::new();
        for (name, tensor) in &tensors {
            assert!(seen.insert(name.as_str()), "duplicate tensor {name}");
            let view = expected.tensor(name).unwrap();
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            assert_eq!(tensor.shape, view.shape(), "{name}");
            let data: Vec<f32> =
                view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&tensor.data), bits(&data), "{name}");
        }
        // `model` holds the unperturbed weights: same names, different trainable values.
        let model = read_state_dict(&fixture("official_train_checkpoint.pt"), "model").unwrap();
        let model_names: Vec<&String> = model.iter().map(|(n, _)| n).collect();
        let ema_names: Vec<&String> = tensors.iter().map(|(n, _)| n).collect();
        assert_eq!(model_names, ema_names);
        assert!(model.iter().zip(&tensors).any(|(m, e)| m.1 != e.1));
    }

    #[test]
    fn lists_official_entries() {
        let entries = checkpoint_entries(&fixture("official_train_checkpoint.pt")).unwrap();
        assert_eq!(entries, ["model", "ema", "opt", "args"]);
    }

    #[test]
    fn missing_entry_lists_present_ones() {
        let path = fixture("official_train_checkpoint.pt");
        let err = read_state_dict(&path, "ema_model").unwrap_err();
        match &err {
            TorchCheckpointError::MissingEntry { entry, present, .. } => {
                assert_eq!(entry, "ema_model");
                assert_eq!(present, &["model", "ema", "opt", "args"]);
            }
            other => panic!("unexpected error {other:?}"),
        }
        assert!(err.to_string().contains("model, ema, opt, args"), "{err}");
        // Present but not a state dict: `args` is an opaque Namespace, `opt` nests dicts.
        let err = read_state_dict(&path, "args").unwrap_err();
        assert!(matches!(err, TorchCheckpointError::NotADict { .. }), "{err}");
        assert!(err.to_string().contains("argparse.Namespace"), "{err}");
        let err = read_state_dict(&path, "opt").unwrap_err();
        assert!(matches!(err, TorchCheckpointError::NotATensor { .. }), "{err}");
    }

    #[test]
    fn truncated_and_garbage_files_are_errors() {
        let dir = temp_dir("truncated");
        let full = std::fs::read(fixture("official_train_checkpoint.pt")).unwrap();
        let truncated = dir.join("truncated.pt");
        std::fs::write(&truncated, &full[..full.len() / 2]).unwrap();
        let err = read_state_dict(&truncated, "ema").unwrap_err();
        assert!(matches!(err, TorchCheckpointError::NotZip { .. }), "{err}");

        let garbage = dir.join("garbage.pt");
        std::fs::write(&garbage, b"this is neither a zip archive nor a pickle").unwrap();
        let err = checkpoint_entries(&garbage).unwrap_err();
        assert!(matches!(err, TorchCheckpointError::NotZip { .. }), "{err}");
        // A pickle that is not torch's legacy header.
        std::fs::write(&garbage, b"\x80\x02}q\x00.this is not a zip archive").unwrap();
        let err = checkpoint_entries(&garbage).unwrap_err();
        assert!(matches!(err, TorchCheckpointError::LegacyMagic { .. }), "{err}");

        let missing = dir.join("missing.pt");
        let err = read_state_dict(&missing, "ema").unwrap_err();
        assert!(matches!(err, TorchCheckpointError::Io { .. }), "{err}");

        // A valid zip whose pickle is cut short.
        let mut pickle = Pickle::default();
        pickle.checkpoint();
        let cut = dir.join("cut_pickle.pt");
        write_checkpoint(&cut, &pickle.0[..pickle.0.len() / 2]);
        let err = read_state_dict(&cut, "model").unwrap_err();
        assert!(matches!(err, TorchCheckpointError::Malformed { .. }), "{err}");

        // A zip without data.pkl.
        let other = dir.join("other.zip");
        write_zip(&other, &[("readme.txt".to_string(), b"hi".to_vec())]);
        let err = checkpoint_entries(&other).unwrap_err();
        assert!(matches!(err, TorchCheckpointError::NoPickle { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hand_built_checkpoint_with_strides_and_offsets() {
        let dir = temp_dir("hand_built");
        let mut pickle = Pickle::default();
        pickle.checkpoint();
        let path = dir.join("ckpt.pt");
        write_checkpoint(&path, &pickle.0);
        assert_eq!(checkpoint_entries(&path).unwrap(), ["model", "args", "evil"]);
        check_hand_built_state_dict(&read_state_dict(&path, "model").unwrap());
        // The `os.system` call was never executed, only recorded as an opaque value.
        let err = read_state_dict(&path, "evil").unwrap_err();
        assert!(err.to_string().contains("os.system"), "{err}");

        // A plain `torch.save(model.state_dict())` file is read with entry "".
        let mut plain = Pickle::default();
        plain.op(op::PROTO).op(2);
        plain.state_dict();
        plain.op(op::STOP);
        let plain_path = dir.join("plain.pt");
        write_checkpoint(&plain_path, &plain.0);
        check_hand_built_state_dict(&read_state_dict(&plain_path, "").unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn out_of_bounds_view_and_unsupported_dtype_are_errors() {
        let dir = temp_dir("bounds");
        let mut pickle = Pickle::default();
        pickle.op(op::PROTO).op(2).op(op::EMPTY_DICT);
        pickle.str("w").tensor("FloatStorage", "0", 10, &[3], &[1]);
        pickle.op(op::SETITEM).op(op::STOP);
        let path = dir.join("bounds.pt");
        write_checkpoint(&path, &pickle.0);
        let err = read_state_dict(&path, "").unwrap_err();
        assert!(matches!(err, TorchCheckpointError::StorageOutOfBounds { needed: 13, available: 12, .. }), "{err}");

        let mut pickle = Pickle::default();
        pickle.op(op::PROTO).op(2).op(op::EMPTY_DICT);
        pickle.str("w").tensor("ComplexFloatStorage", "0", 0, &[3], &[1]);
        pickle.op(op::SETITEM).op(op::STOP);
        write_checkpoint(&path, &pickle.0);
        let err = read_state_dict(&path, "").unwrap_err();
        assert!(matches!(err, TorchCheckpointError::UnsupportedDtype { .. }), "{err}");
        assert!(err.to_string().contains("torch.ComplexFloatStorage"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn compressed_entry_is_refused() {
        let dir = temp_dir("deflate");
        let mut pickle = Pickle::default();
        pickle.op(op::PROTO).op(2).op(op::EMPTY_DICT).op(op::STOP);
        let path = dir.join("deflated.pt");
        write_zip(&path, &[("ckpt/data.pkl".to_string(), pickle.0)]);
        // Mark the entry DEFLATE in its local and central headers.
        let mut bytes = std::fs::read(&path).unwrap();
        for (signature, field) in [(b"PK\x03\x04", 8), (b"PK\x01\x02", 10)] {
            let at = bytes.windows(4).position(|w| w == signature).unwrap();
            bytes[at + field..at + field + 2].copy_from_slice(&8u16.to_le_bytes());
        }
        std::fs::write(&path, bytes).unwrap();
        let err = checkpoint_entries(&path).unwrap_err();
        assert!(matches!(err, TorchCheckpointError::CompressedEntry { .. }), "{err}");
        assert!(err.to_string().contains("`ckpt/data.pkl` is compressed (DEFLATE)"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unpickler_opcodes() {
        // STACK_GLOBAL, MEMOIZE, LONG1, DUP, POP, POP_MARK, LIST, DICT, FROZENSET, SHORT_BINUNICODE.
        let mut p = Pickle::default();
        p.op(op::PROTO).op(4).op(op::MARK);
        p.op(op::SHORT_BINUNICODE).op(1).op(b'k').op(op::MEMOIZE);
        p.op(op::LONG1).op(2).op(0x00).op(0xff); // -256
        p.op(op::SHORT_BINUNICODE).op(3).0.extend(b"set");
        p.op(op::MARK).op(op::NONE).op(op::NEWTRUE).op(op::FROZENSET);
        p.op(op::SHORT_BINUNICODE).op(1).op(b'g');
        p.op(op::SHORT_BINUNICODE).op(8).0.extend(b"builtins");
        p.op(op::SHORT_BINUNICODE).op(4).0.extend(b"eval");
        p.op(op::STACK_GLOBAL).op(op::DUP).op(op::POP);
        p.op(op::MARK).op(op::NONE).op(op::POP_MARK);
        p.op(op::DICT).op(op::STOP);
        let value = Unpickler::new(&p.0).load().unwrap();
        let Value::Dict(dict) = value else { panic!("{value:?}") };
        let dict = dict.borrow();
        assert_eq!(dict.len(), 3);
        assert!(matches!((&dict[0].0, &dict[0].1), (Value::Str(k), Value::Int(-256)) if k == "k"));
        assert!(matches!(&dict[1].1, Value::Set(s) if s.borrow().len() == 2));
        assert!(matches!(&dict[2].1, Value::Global { module, name } if module == "builtins" && name == "eval"));

        // Unknown opcode: named with its offset.
        let err = Unpickler::new(b"\x80\x02N\xffN.").load().unwrap_err();
        assert!(matches!(err, PickleError::UnknownOpcode { opcode: 0xff, offset: 3 }), "{err:?}");
        // Missing STOP is truncated; memo miss and stack underflow are malformed.
        let err = Unpickler::new(b"\x80\x02N").load().unwrap_err();
        assert!(matches!(err, PickleError::Truncated { offset: 3, .. }), "{err:?}");
        for bad in [&b"h\x05."[..], b"\x80\x02s."] {
            let err = Unpickler::new(bad).load().unwrap_err();
            assert!(matches!(err, PickleError::Malformed { .. }), "{err:?}");
        }
        // Ints wider than 64 bits: kept exactly, sign extension trimmed.
        let wide = Unpickler::new(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.").load().unwrap();
        assert!(matches!(&wide, Value::BigInt(le) if le.as_slice() == LEGACY_MAGIC), "{wide:?}");
        let padded = Unpickler::new(b"\x8a\x0a\xfe\xff\xff\xff\xff\xff\xff\xff\xff\xff.").load().unwrap();
        assert!(matches!(padded, Value::Int(-2)), "{padded:?}");
    }

    /// The three header pickles `_legacy_save` writes: magic number, protocol version, sys_info.
    fn legacy_header(magic: &[u8], protocol: u16, little_endian: bool) -> Pickle {
        let mut p = Pickle::default();
        p.op(op::PROTO).op(2).op(op::LONG1).op(magic.len() as u8).0.extend(magic);
        p.op(op::STOP);
        p.op(op::PROTO).op(2).op(op::BININT2).0.extend(protocol.to_le_bytes());
        p.op(op::STOP);
        p.op(op::PROTO).op(2).op(op::EMPTY_DICT).op(op::MARK);
        p.str("protocol_version").op(op::BININT2).0.extend(1001u16.to_le_bytes());
        p.str("little_endian").op(if little_endian { op::NEWTRUE } else { op::NEWFALSE });
        p.str("type_sizes").op(op::EMPTY_DICT).op(op::MARK);
        p.str("short").int(2).str("int").int(4).str("long").int(8).op(op::SETITEMS);
        p.op(op::SETITEMS).op(op::STOP);
        p
    }

    /// A whole legacy file: `header`, the object pickle, the storage key list, and for each
    /// listed `(key, count, data)` the 8-byte little-endian count and the data.
    fn legacy_file(header: Pickle, object: &Pickle, records: &[(&str, u64, Vec<u8>)]) -> Vec<u8> {
        let mut bytes = header.0;
        bytes.extend(&object.0);
        let mut keys = Pickle::default();
        keys.op(op::PROTO).op(2).op(op::EMPTY_LIST).op(op::MARK);
        for (key, _, _) in records {
            keys.str(key);
        }
        keys.op(op::APPENDS).op(op::STOP);
        bytes.extend(keys.0);
        for (_, count, data) in records {
            bytes.extend(count.to_le_bytes());
            bytes.extend(data);
        }
        bytes
    }

    fn good_header() -> Pickle {
        legacy_header(&LEGACY_MAGIC, 1001, true)
    }

    fn f32_bytes(values: impl IntoIterator<Item = f32>) -> Vec<u8> {
        values.into_iter().flat_map(f32::to_le_bytes).collect()
    }

    /// pytorch-fid's layout: an `OrderedDict` of float32 tensors and an int64
    /// `num_batches_tracked` scalar, plus a view and two tensors sharing one storage.
    fn legacy_state_dict(p: &mut Pickle) {
        p.global("collections", "OrderedDict").op(op::BINPUT).op(0);
        p.op(op::EMPTY_TUPLE).op(op::REDUCE).op(op::MARK);
        p.str("conv.weight").legacy_tensor("FloatStorage", "7001", 6, None, 0, &[2, 3], &[3, 1]);
        p.str("bn.num_batches_tracked").legacy_tensor("LongStorage", "7002", 1, None, 0, &[], &[]);
        // A view of elements [2, 10) of root 7003, and the tensor at offset 1 of the view.
        p.str("view").legacy_tensor("FloatStorage", "7003", 12, Some(("7004", 2, 8)), 1, &[2, 3], &[1, 2]);
        p.str("shared_a").legacy_tensor("FloatStorage", "7003", 12, None, 0, &[4], &[1]);
        p.str("shared_b").legacy_tensor("FloatStorage", "7003", 12, None, 10, &[2], &[1]);
        p.op(op::SETITEMS);
        p.op(op::EMPTY_DICT).str("_metadata").op(op::BINGET).op(0);
        p.op(op::EMPTY_TUPLE).op(op::REDUCE).op(op::SETITEM).op(op::BUILD);
    }

    /// Records in list order (not key order, which the reader must not assume).
    fn legacy_records() -> Vec<(&'static str, u64, Vec<u8>)> {
        vec![
            ("7003", 12, f32_bytes((10..22).map(|i| i as f32))),
            ("7001", 6, f32_bytes((0..6).map(|i| i as f32))),
            ("7002", 1, 123_456_789_012i64.to_le_bytes().to_vec()),
        ]
    }

    fn check_legacy_state_dict(tensors: &[(String, HostTensor)]) {
        let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["conv.weight", "bn.num_batches_tracked", "view", "shared_a", "shared_b"]);
        let t = |shape: &[usize], data: &[f32]| HostTensor { shape: shape.to_vec(), data: data.to_vec() };
        assert_eq!(tensors[0].1, t(&[2, 3], &[0., 1., 2., 3., 4., 5.]));
        assert_eq!(tensors[1].1, t(&[], &[123_456_789_012i64 as f32]));
        // element [i][j] = root[2 + 1 + i + 2 j] = 13 + i + 2 j
        assert_eq!(tensors[2].1, t(&[2, 3], &[13., 15., 17., 14., 16., 18.]));
        assert_eq!(tensors[3].1, t(&[4], &[10., 11., 12., 13.]));
        assert_eq!(tensors[4].1, t(&[2], &[20., 21.]));
    }

    #[test]
    fn legacy_state_dict_with_views_shared_storages_and_scalars() {
        let dir = temp_dir("legacy_plain");
        let mut object = Pickle::default();
        object.op(op::PROTO).op(2);
        legacy_state_dict(&mut object);
        object.op(op::STOP);
        let path = dir.join("pt_inception.pth");
        std::fs::write(&path, legacy_file(good_header(), &object, &legacy_records())).unwrap();
        check_legacy_state_dict(&read_state_dict(&path, "").unwrap());
        let entries = checkpoint_entries(&path).unwrap();
        assert_eq!(entries, ["conv.weight", "bn.num_batches_tracked", "view", "shared_a", "shared_b"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn legacy_nested_checkpoints() {
        let dir = temp_dir("legacy_nested");
        // `{"model": sd, "ema": sd, "epoch": 3, "notes": <3 MiB string>}`: the string pushes the
        // pickles past the first read, so the read has to grow.
        let mut object = Pickle::default();
        object.op(op::PROTO).op(2).op(op::EMPTY_DICT).op(op::MARK);
        object.str("model");
        legacy_state_dict(&mut object);
        object.str("ema");
        legacy_state_dict(&mut object);
        object.str("epoch").int(3);
        object.str("notes").str(&"x".repeat(3 << 20));
        object.op(op::SETITEMS).op(op::STOP);
        let path = dir.join("model.ckpt");
        std::fs::write(&path, legacy_file(good_header(), &object, &legacy_records())).unwrap();
        assert_eq!(checkpoint_entries(&path).unwrap(), ["model", "ema", "epoch", "notes"]);
        check_legacy_state_dict(&read_state_dict(&path, "ema").unwrap());
        check_legacy_state_dict(&read_state_dict(&path, "model").unwrap());
        let err = read_state_dict(&path, "epoch").unwrap_err();
        assert!(matches!(err, TorchCheckpointError::NotADict { .. }), "{err}");

        // `{"state_dict": OrderedDict([["w", tensor]])}` as Python 2 pickles it: BINSTRING keys
        // and an OrderedDict built from a list of pairs.
        let mut object = Pickle::default();
        object.op(op::PROTO).op(2).op(op::EMPTY_DICT);
        object.op(op::SHORT_BINSTRING).op(10).0.extend(b"state_dict");
        object.global("collections", "OrderedDict").op(op::MARK).op(op::MARK);
        object.op(op::SHORT_BINSTRING).op(1).op(b'w');
        object.legacy_tensor("FloatStorage", "7001", 6, None, 2, &[2, 2], &[2, 1]);
        object.op(op::LIST).op(op::LIST).op(op::TUPLE1).op(op::REDUCE);
        object.op(op::SETITEM).op(op::STOP);
        let path = dir.join("vae.bin");
        std::fs::write(&path, legacy_file(good_header(), &object, &legacy_records()[1..2])).unwrap();
        assert_eq!(checkpoint_entries(&path).unwrap(), ["state_dict"]);
        let tensors = read_state_dict(&path, "state_dict").unwrap();
        assert_eq!(tensors, [("w".to_string(), HostTensor { shape: vec![2, 2], data: vec![2., 3., 4., 5.] })]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A legacy file written by CPython's own `pickle.Pickler` with a `persistent_id` and
    /// `__reduce_ex__` stand-ins for torch's storages and tensors, laid out as `_legacy_save`
    /// does (root keys like `str(storage._cdata)`, location `cuda:0`, a storage view, an
    /// `OrderedDict` state dict with `_metadata`): an independent writer to check against.
    /// It holds `{"state_dict": sd, "epoch": 3, "ema": OrderedDict(w=...)}` over a float
    /// storage of `i / 4` (i < 12), a long storage `[7e9]` and a half storage `[1.5, -0.25,
    /// 65504]`.
    const PYTHON_LEGACY_FILE: [&str; 22] = [
        "80028a0a6cfc9c46f9206aa850192e80024de9032e80027d710028581000000070726f746f636f6c5f76657273696f6e",
        "71014de903580d0000006c6974746c655f656e6469616e710288580a000000747970655f73697a657371037d71042858",
        "0500000073686f727471054b025803000000696e7471064b0458040000006c6f6e6771074b0475752e80027d71002858",
        "0a00000073746174655f64696374710163636f6c6c656374696f6e730a4f726465726564446963740a71022952710328",
        "580b000000636f6e762e776569676874710463746f7263682e5f7574696c730a5f72656275696c645f74656e736f725f",
        "76320a71052828580700000073746f72616765710663746f7263680a466c6f617453746f726167650a7107580c000000",
        "31343030303030303030303071085806000000637564613a3071094b0c4e74710a514b004b024b0386710b4b034b0186",
        "710c8968022952710d74710e52710f580b000000636f6e762e766965775f7471106805282868066807680868094b0c58",
        "0c00000031343030303030303030313671114b044b08877112747113514b014b034b028671144b014b03867115896802",
        "29527116747117527118580b000000636f6e762e73686172656471196805282868066807680868094b0c4e74711a514b",
        "0a4b0285711b4b0185711c8968022952711d74711e52711f5816000000626e2e6e756d5f626174636865735f74726163",
        "6b6564712068052828680663746f7263680a4c6f6e6753746f726167650a7121580c0000003134303030303030303033",
        "32712268094b014e747123514b00292989680229527124747125527126580400000068616c6671276805282868066374",
        "6f7263680a48616c6653746f726167650a7128580c000000313430303030303030303438712968094b034e74712a514b",
        "004b0385712b4b0185712c8968022952712d74712e52712f757d713058090000005f6d65746164617461713168022952",
        "713228580000000071337d7134580700000076657273696f6e71354b01735802000000626e71367d713768354b027375",
        "7362580500000065706f636871384b035803000000656d61713968022952713a580100000077713b6805282868066807",
        "680868094b0c4e74713c514b024b024b0286713d4b024b0186713e8968022952713f74714052714173752e80025d7100",
        "28580c0000003134303030303030303030307101580c0000003134303030303030303033327102580c00000031343030",
        "30303030303034387103652e0c00000000000000000000000000803e0000003f0000403f0000803f0000a03f0000c03f",
        "0000e03f00000040000010400000204000003040010000000000000000863ba1010000000300000000000000003e00b4",
        "ff7b",
    ];

    #[test]
    fn python_pickled_legacy_file_cross_check() {
        let dir = temp_dir("legacy_python");
        let hex: String = PYTHON_LEGACY_FILE.concat();
        let bytes: Vec<u8> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        let path = dir.join("python.pth");
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(checkpoint_entries(&path).unwrap(), ["state_dict", "epoch", "ema"]);
        let t = |shape: &[usize], data: &[f32]| HostTensor { shape: shape.to_vec(), data: data.to_vec() };
        let sd = read_state_dict(&path, "state_dict").unwrap();
        let names: Vec<&str> = sd.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["conv.weight", "conv.view_t", "conv.shared", "bn.num_batches_tracked", "half"]);
        assert_eq!(sd[0].1, t(&[2, 3], &[0., 0.25, 0.5, 0.75, 1., 1.25]));
        // View [4, 12) of the root, tensor offset 1, strides (1, 3): root[5 + i + 3 j].
        assert_eq!(sd[1].1, t(&[3, 2], &[1.25, 2., 1.5, 2.25, 1.75, 2.5]));
        assert_eq!(sd[2].1, t(&[2], &[2.5, 2.75]));
        assert_eq!(sd[3].1, t(&[], &[7e9]));
        assert_eq!(sd[4].1, t(&[3], &[1.5, -0.25, 65504.]));
        let ema = read_state_dict(&path, "ema").unwrap();
        assert_eq!(ema, [("w".to_string(), t(&[2, 2], &[0.5, 0.75, 1., 1.25]))]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn legacy_errors_name_the_file_and_the_problem() {
        let dir = temp_dir("legacy_errors");
        let path = dir.join("legacy.pth");
        let read = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            let err = read_state_dict(&path, "").unwrap_err();
            assert!(err.to_string().contains("legacy.pth"), "{err}");
            err
        };
        let mut object = Pickle::default();
        object.op(op::PROTO).op(2);
        legacy_state_dict(&mut object);
        object.op(op::STOP);
        let good = legacy_file(good_header(), &object, &legacy_records());

        // Truncated inside the pickles, inside a count, inside the data.
        let err = read(&good[..good_header().0.len() + object.0.len() / 2]);
        assert!(matches!(err, TorchCheckpointError::Malformed { .. }), "{err}");
        let data_start = good.len() - (8 + 48) - (8 + 24) - (8 + 8);
        let err = read(&good[..data_start + 4]);
        assert!(matches!(&err, TorchCheckpointError::LegacyTruncated { storage, .. } if storage == "7003"), "{err}");
        let err = read(&good[..good.len() - 1]);
        assert!(
            matches!(&err, TorchCheckpointError::LegacyTruncated { storage, end, .. }
                if storage == "7002" && *end == good.len() as u64),
            "{err}"
        );

        // Header: not the magic number, another protocol, a big-endian writer.
        let err = read(&legacy_file(legacy_header(&[42], 1001, true), &object, &legacy_records()));
        assert!(matches!(err, TorchCheckpointError::LegacyMagic { .. }), "{err}");
        assert!(err.to_string().contains("the int 42"), "{err}");
        let err = read(&legacy_file(legacy_header(&LEGACY_MAGIC, 1000, true), &object, &legacy_records()));
        assert!(matches!(err, TorchCheckpointError::LegacyProtocol { .. }), "{err}");
        let err = read(&legacy_file(legacy_header(&LEGACY_MAGIC, 1001, false), &object, &legacy_records()));
        assert!(matches!(err, TorchCheckpointError::LegacyBigEndian { .. }), "{err}");

        // A record whose count disagrees with the persistent id; a storage missing from the list.
        let mut records = legacy_records();
        records[1].1 = 5;
        let err = read(&legacy_file(good_header(), &object, &records));
        assert!(matches!(err, TorchCheckpointError::LegacyStorageCount { expected: 6, found: 5, .. }), "{err}");
        let err = read(&legacy_file(good_header(), &object, &legacy_records()[..2]));
        assert!(matches!(&err, TorchCheckpointError::LegacyStorageUnlisted { storage, .. } if storage == "7002"));

        // A view reaching past its own end (the root has room, the view does not).
        let mut p = Pickle::default();
        p.op(op::PROTO).op(2).op(op::EMPTY_DICT);
        p.str("w").legacy_tensor("FloatStorage", "7003", 12, Some(("v", 2, 4)), 1, &[4], &[1]);
        p.op(op::SETITEM).op(op::STOP);
        let err = read(&legacy_file(good_header(), &p, &legacy_records()[..1]));
        assert!(matches!(err, TorchCheckpointError::StorageOutOfBounds { needed: 5, available: 4, .. }), "{err}");

        // Unsupported storage types. A requested complex tensor is refused by its dtype.
        let complex = ("c", 2, vec![0u8; 16]);
        let foo = ("f", 3, vec![0u8; 3]);
        let mut p = Pickle::default();
        p.op(op::PROTO).op(2).op(op::EMPTY_DICT);
        p.str("z").legacy_tensor("ComplexFloatStorage", "c", 2, None, 0, &[2], &[1]);
        p.op(op::SETITEM).op(op::STOP);
        let err = read(&legacy_file(good_header(), &p, std::slice::from_ref(&complex)));
        assert!(matches!(err, TorchCheckpointError::UnsupportedDtype { .. }), "{err}");
        assert!(err.to_string().contains("torch.ComplexFloatStorage"), "{err}");
        // `{"model": {"w": float tensor}, "extra": [complex tensor, torch.FooStorage tensor]}`:
        // a record of known element size before `w`'s is walked past, one of unknown size is not.
        let mut p = Pickle::default();
        p.op(op::PROTO).op(2).op(op::EMPTY_DICT).op(op::MARK);
        p.str("model").op(op::EMPTY_DICT);
        p.str("w").legacy_tensor("FloatStorage", "7001", 6, None, 0, &[6], &[1]);
        p.op(op::SETITEM);
        p.str("extra").op(op::MARK);
        p.legacy_tensor("ComplexFloatStorage", "c", 2, None, 0, &[2], &[1]);
        p.legacy_tensor("FooStorage", "f", 3, None, 0, &[3], &[1]);
        p.op(op::LIST).op(op::SETITEMS).op(op::STOP);
        let w_record = legacy_records()[1].clone();
        std::fs::write(&path, legacy_file(good_header(), &p, &[complex, w_record.clone(), foo.clone()])).unwrap();
        let model = read_state_dict(&path, "model").unwrap();
        assert_eq!(model[0].1.data, [0., 1., 2., 3., 4., 5.]);
        std::fs::write(&path, legacy_file(good_header(), &p, &[foo, w_record])).unwrap();
        let err = read_state_dict(&path, "model").unwrap_err();
        assert!(
            matches!(&err, TorchCheckpointError::LegacyElementSize { storage, dtype, .. }
                if storage == "f" && dtype == "torch.FooStorage"),
            "{err}"
        );
        assert!(err.to_string().contains("legacy.pth"), "{err}");

        // A listed storage no persistent id describes, before the one needed.
        let err = read(&legacy_file(good_header(), &object, &[("ghost", 1, vec![0; 4]), legacy_records()[0].clone()]));
        assert!(matches!(&err, TorchCheckpointError::LegacyStorageUndescribed { storage, .. } if storage == "ghost"));
        // One root key under two storage types.
        let mut p = Pickle::default();
        p.op(op::PROTO).op(2).op(op::EMPTY_DICT).op(op::MARK);
        p.str("a").legacy_tensor("FloatStorage", "7001", 6, None, 0, &[6], &[1]);
        p.str("b").legacy_tensor("IntStorage", "7001", 6, None, 0, &[6], &[1]);
        p.op(op::SETITEMS).op(op::STOP);
        let err = read(&legacy_file(good_header(), &p, &legacy_records()[1..2]));
        assert!(
            matches!(&err, TorchCheckpointError::LegacyStorageConflict { first, second, .. }
                if first == "torch.FloatStorage" && second == "torch.IntStorage"),
            "{err}"
        );
        // A fifth pickle that is not a list of keys.
        let mut bytes = good_header().0;
        bytes.extend(&object.0);
        bytes.extend(b"\x80\x02}.");
        let err = read(&bytes);
        assert!(matches!(err, TorchCheckpointError::LegacyStorageList { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
