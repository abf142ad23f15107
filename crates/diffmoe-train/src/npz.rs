//! NumPy `.npz` files (a zip of `.npy` arrays, as `np.savez` writes them):
//! the array files of sampling runs, in the layout evaluators read (the ADM
//! evaluator and `sample_ddp` scripts of the DiT family read `arr_0`, the
//! images `[N, H, W, C]` as uint8, and `arr_1`, the labels).
//!
//! [`NpzWriter`] streams each array in turn (a run of 50 000 samples never
//! has to be in memory at once) into a temporary file that is synced and
//! renamed over the destination only when every array is complete.
//! [`read_npz`] reads little-endian C-order arrays back, from stored
//! (`np.savez`) or deflate-compressed (`np.savez_compressed`) members;
//! [`NpyArray::read_selected`] reads only the named ones (an ADM reference
//! batch holds gigabytes of images beside its `mu` and `sigma`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::data::DataError;

/// An element type of an array file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NpyDtype {
    /// `<f4`.
    F32,
    /// `<f8`.
    F64,
    /// `<i8`.
    I64,
    /// `|u1`.
    U8,
}

impl NpyDtype {
    fn descr(self) -> &'static str {
        match self {
            Self::F32 => "<f4",
            Self::F64 => "<f8",
            Self::I64 => "<i8",
            Self::U8 => "|u1",
        }
    }

    fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F64 | Self::I64 => 8,
            Self::U8 => 1,
        }
    }

    fn from_descr(descr: &str) -> Option<Self> {
        match descr {
            "<f4" => Some(Self::F32),
            "<f8" => Some(Self::F64),
            "<i8" => Some(Self::I64),
            "|u1" | "<u1" => Some(Self::U8),
            _ => None,
        }
    }
}

/// A value that can be written to an array file.
pub trait NpyElement: Copy {
    /// Its dtype.
    const DTYPE: NpyDtype;
    /// Appends its little-endian bytes.
    fn put(self, out: &mut Vec<u8>);
}

impl NpyElement for f32 {
    const DTYPE: NpyDtype = NpyDtype::F32;
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl NpyElement for f64 {
    const DTYPE: NpyDtype = NpyDtype::F64;
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl NpyElement for i64 {
    const DTYPE: NpyDtype = NpyDtype::I64;
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl NpyElement for u8 {
    const DTYPE: NpyDtype = NpyDtype::U8;
    fn put(self, out: &mut Vec<u8>) {
        out.push(self);
    }
}

/// The `.npy` version 1.0 header of an array, padded so that the data
/// starts on a 64-byte boundary as NumPy writes it.
fn npy_header(dtype: NpyDtype, shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut dict = format!("{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}", dtype.descr());
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

/// The array being streamed.
struct Open {
    name: String,
    dtype: NpyDtype,
    remaining: usize,
}

/// Writes an `.npz` file array by array.
pub struct NpzWriter {
    zip: zip::ZipWriter<BufWriter<File>>,
    path: PathBuf,
    tmp: PathBuf,
    open: Option<Open>,
}

impl std::fmt::Debug for NpzWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NpzWriter").field("path", &self.path).finish_non_exhaustive()
    }
}

impl NpzWriter {
    /// Starts `path` (written to `path.tmp` until [`Self::finish`]).
    pub fn create(path: &Path) -> Result<Self, DataError> {
        let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(".tmp");
        let tmp = path.with_file_name(tmp_name);
        let file = File::create(&tmp).map_err(|e| DataError::io(&tmp, e))?;
        Ok(Self { zip: zip::ZipWriter::new(BufWriter::new(file)), path: path.to_path_buf(), tmp, open: None })
    }

    fn zip_error(&self, e: impl std::fmt::Display) -> DataError {
        DataError::corrupt(&self.tmp, format!("writing the zip archive: {e}"))
    }

    /// Starts the array `name` of `shape`; its values follow through
    /// [`Self::extend`].
    ///
    /// # Errors
    /// If the previous array is incomplete, or on an I/O error.
    pub fn begin<T: NpyElement>(&mut self, name: &str, shape: &[usize]) -> Result<(), DataError> {
        self.check_closed()?;
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(true);
        self.zip.start_file(format!("{name}.npy"), options).map_err(|e| self.zip_error(e))?;
        self.zip.write_all(&npy_header(T::DTYPE, shape)).map_err(|e| DataError::io(&self.tmp, e))?;
        self.open = Some(Open { name: name.to_string(), dtype: T::DTYPE, remaining: shape.iter().product() });
        Ok(())
    }

    /// Appends values to the array being written, in C order.
    ///
    /// # Errors
    /// If no array of this type is open or it would overflow its shape.
    pub fn extend<T: NpyElement>(&mut self, values: &[T]) -> Result<(), DataError> {
        let open = match &mut self.open {
            Some(open) if open.dtype == T::DTYPE && values.len() <= open.remaining => open,
            _ => return Err(DataError::corrupt(&self.tmp, "values do not fit the array being written")),
        };
        open.remaining -= values.len();
        let mut bytes = Vec::with_capacity(values.len() * T::DTYPE.size());
        for &v in values {
            v.put(&mut bytes);
        }
        self.zip.write_all(&bytes).map_err(|e| DataError::io(&self.tmp, e))
    }

    /// Writes a whole array.
    pub fn array<T: NpyElement>(&mut self, name: &str, shape: &[usize], values: &[T]) -> Result<(), DataError> {
        self.begin::<T>(name, shape)?;
        self.extend(values)
    }

    fn check_closed(&self) -> Result<(), DataError> {
        match &self.open {
            Some(open) if open.remaining > 0 => Err(DataError::corrupt(
                &self.tmp,
                format!("array `{}` is missing {} values", open.name, open.remaining),
            )),
            _ => Ok(()),
        }
    }

    /// Completes the file: syncs it and renames it over the destination.
    ///
    /// # Errors
    /// If an array is incomplete, or on an I/O error.
    pub fn finish(self) -> Result<PathBuf, DataError> {
        self.check_closed()?;
        let writer = self.zip.finish().map_err(|e| DataError::corrupt(&self.tmp, format!("finishing the zip: {e}")))?;
        let file = writer.into_inner().map_err(|e| DataError::io(&self.tmp, e.into_error()))?;
        file.sync_all().map_err(|e| DataError::io(&self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| DataError::io(&self.path, e))?;
        Ok(self.path)
    }
}

/// An array read from an `.npz` file, values widened to f64.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// Its element type on disk.
    pub dtype: NpyDtype,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its values in C order.
    pub values: Vec<f64>,
}

/// Reads every array of an `.npz` file (little-endian, C order; members
/// stored or deflate-compressed, as `np.savez` and `np.savez_compressed`
/// write them).
///
/// # Errors
/// If the file cannot be read or an array is of another kind; the error
/// names the file and the array.
pub fn read_npz(path: &Path) -> Result<BTreeMap<String, NpyArray>, DataError> {
    read_members(path, |_| true)
}

impl NpyArray {
    /// Reads the arrays `names` of an `.npz` file (stored or deflate-compressed
    /// members), skipping the others unread. Names absent from the file are
    /// absent from the result.
    ///
    /// # Errors
    /// As [`read_npz`], for the requested arrays.
    pub fn read_selected(path: &Path, names: &[&str]) -> Result<BTreeMap<String, NpyArray>, DataError> {
        read_members(path, |name| names.contains(&name))
    }
}

fn read_members(path: &Path, wanted: impl Fn(&str) -> bool) -> Result<BTreeMap<String, NpyArray>, DataError> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut archive =
        zip::ZipArchive::new(file).map_err(|e| DataError::corrupt(path, format!("not a zip archive: {e}")))?;
    let mut out = BTreeMap::new();
    for i in 0..archive.len() {
        let mut member = archive.by_index(i).map_err(|e| DataError::corrupt(path, e.to_string()))?;
        let name = member.name().trim_end_matches(".npy").to_string();
        if !wanted(&name) {
            continue;
        }
        let mut bytes = Vec::new();
        member.read_to_end(&mut bytes).map_err(|e| DataError::io(path, e))?;
        let array =
            parse_npy(&bytes).map_err(|reason| DataError::corrupt(path, format!("array `{name}`: {reason}")))?;
        out.insert(name, array);
    }
    Ok(out)
}

fn parse_npy(bytes: &[u8]) -> Result<NpyArray, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy array".into());
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => return Err(format!(".npy version {v} is not supported")),
    };
    let header = std::str::from_utf8(bytes.get(start..start + header_len).ok_or("truncated header")?)
        .map_err(|_| "the header is not text")?;
    let field = |key: &str| -> Result<&str, String> {
        let at = header.find(&format!("'{key}':")).ok_or(format!("no `{key}` in the header"))?;
        Ok(header[at + key.len() + 3..].trim_start())
    };
    let descr = field("descr")?.trim_start_matches('\'');
    let descr = &descr[..descr.find('\'').ok_or("bad descr")?];
    let dtype = NpyDtype::from_descr(descr).ok_or(format!("dtype `{descr}` is not supported"))?;
    if field("fortran_order")?.starts_with("True") {
        return Err("Fortran-order arrays are not supported".into());
    }
    let shape = field("shape")?;
    let shape = &shape[1..shape.find(')').ok_or("bad shape")?];
    let shape: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| format!("bad dimension `{s}`")))
        .collect::<Result<_, _>>()?;
    let data = &bytes[start + header_len..];
    let count: usize = shape.iter().product();
    if data.len() != count * dtype.size() {
        return Err(format!("{} data bytes for shape {shape:?} of {descr}", data.len()));
    }
    let values = match dtype {
        NpyDtype::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4")) as f64).collect(),
        NpyDtype::F64 => data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8"))).collect(),
        NpyDtype::I64 => data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8")) as f64).collect(),
        NpyDtype::U8 => data.iter().map(|&b| b as f64).collect(),
    };
    Ok(NpyArray { dtype, shape, values })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_dir;

    #[test]
    fn arrays_round_trip_and_headers_are_numpys() {
        let header = npy_header(NpyDtype::F32, &[2, 3]);
        assert_eq!(header.len() % 64, 0);
        assert!(
            String::from_utf8_lossy(&header).contains("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }")
        );
        assert!(String::from_utf8_lossy(&npy_header(NpyDtype::I64, &[5])).contains("'shape': (5,)"));

        let dir = test_dir("npz");
        let path = dir.join("samples.npz");
        let mut npz = NpzWriter::create(&path).unwrap();
        npz.array("arr_1", &[3], &[1i64, 7, 2]).unwrap();
        npz.begin::<u8>("arr_0", &[3, 2]).unwrap();
        npz.extend(&[0u8, 255]).unwrap();
        assert!(!path.exists(), "nothing at the destination before finish");
        npz.extend(&[1u8, 2, 3, 4]).unwrap();
        npz.array("raw", &[1, 2], &[0.5f32, -1.25]).unwrap();
        npz.finish().unwrap();
        let arrays = read_npz(&path).unwrap();
        assert_eq!(arrays["arr_1"].values, vec![1.0, 7.0, 2.0]);
        assert_eq!(arrays["arr_0"].shape, vec![3, 2]);
        assert_eq!(arrays["arr_0"].values, vec![0.0, 255.0, 1.0, 2.0, 3.0, 4.0]);
        assert_eq!(arrays["raw"].dtype, NpyDtype::F32);
        assert_eq!(arrays["raw"].values, vec![0.5, -1.25]);

        let mut short = NpzWriter::create(&dir.join("short.npz")).unwrap();
        short.begin::<f32>("x", &[4]).unwrap();
        short.extend(&[1.0f32]).unwrap();
        assert!(short.extend(&[1i64]).is_err(), "wrong type");
        let error = short.finish().unwrap_err();
        assert!(error.to_string().contains("missing 3 values"), "{error}");
        assert!(!dir.join("short.npz").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `np.savez_compressed` deflates every member; reading must not care.
    #[test]
    fn compressed_members_and_selected_reads() {
        let dir = test_dir("npz_deflate");
        let path = dir.join("stats.npz");
        let mut zip = zip::ZipWriter::new(File::create(&path).unwrap());
        let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        let mut put = |name: &str, dtype: NpyDtype, shape: &[usize], data: Vec<u8>| {
            zip.start_file(format!("{name}.npy"), options).unwrap();
            zip.write_all(&npy_header(dtype, shape)).unwrap();
            zip.write_all(&data).unwrap();
        };
        put("mu", NpyDtype::F64, &[2], [0.5f64, -2.0].iter().flat_map(|v| v.to_le_bytes()).collect());
        put("arr_0", NpyDtype::U8, &[4096], vec![7u8; 4096]);
        zip.finish().unwrap();
        let all = read_npz(&path).unwrap();
        assert_eq!(all["mu"].values, vec![0.5, -2.0]);
        assert_eq!(all["arr_0"].values.len(), 4096);
        let some = NpyArray::read_selected(&path, &["mu", "sigma"]).unwrap();
        assert_eq!(some.keys().collect::<Vec<_>>(), vec!["mu"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
