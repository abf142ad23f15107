//! Loading the FID Inception weights: pytorch-fid's
//! `pt_inception-2015-12-05-6726825d.pth` (a torch pickle, read by
//! [`diffmoe_weights::read_state_dict`] without executing it) or a safetensors
//! conversion, under either key layout: the weights file's own names
//! (torchvision `Inception3`: `Mixed_5b.branch1x1.conv.weight`, `fc.weight`)
//! or pytorch-fid's `InceptionV3` module names (`blocks.2.0.branch1x1.conv.weight`).
//!
//! Loading is strict as in pytorch-fid: every key and shape is checked
//! before any parameter is built; only `num_batches_tracked` (unused in eval)
//! may be absent.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use safetensors::SafeTensors;

use diffmoe_model::StateDict;
use diffmoe_weights::{is_torch_save_file, read_state_dict, Element, HostTensor, TorchCheckpointError};

use crate::inception::{conv_specs, FidInceptionV3, InceptionFc, INCEPTION_CLASSES, POOL_FEATURES};
use crate::inception_blocks::{BasicConv2d, BatchNorm2d, ConvSource, ConvSpec};

/// The weights file pytorch-fid downloads for its FID Inception.
pub const WEIGHTS_FILE_NAME: &str = "pt_inception-2015-12-05-6726825d.pth";
/// Where pytorch-fid downloads it from (its GitHub release `fid_weights`).
pub const WEIGHTS_FILE_URL: &str =
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth";

/// pytorch-fid's `InceptionV3` module prefixes and the weights-file modules
/// they hold (`blocks.0` ends in a max pool, `blocks.1` too, `blocks.3` in
/// the average pool; `fc` is dropped).
pub const MODULE_BLOCKS: [(&str, &str); 16] = [
    ("blocks.0.0", "Conv2d_1a_3x3"),
    ("blocks.0.1", "Conv2d_2a_3x3"),
    ("blocks.0.2", "Conv2d_2b_3x3"),
    ("blocks.1.0", "Conv2d_3b_1x1"),
    ("blocks.1.1", "Conv2d_4a_3x3"),
    ("blocks.2.0", "Mixed_5b"),
    ("blocks.2.1", "Mixed_5c"),
    ("blocks.2.2", "Mixed_5d"),
    ("blocks.2.3", "Mixed_6a"),
    ("blocks.2.4", "Mixed_6b"),
    ("blocks.2.5", "Mixed_6c"),
    ("blocks.2.6", "Mixed_6d"),
    ("blocks.2.7", "Mixed_6e"),
    ("blocks.3.0", "Mixed_7a"),
    ("blocks.3.1", "Mixed_7b"),
    ("blocks.3.2", "Mixed_7c"),
];

/// The key names of a state dict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLayout {
    /// The weights file (torchvision `Inception3` with FID blocks, 566 keys with `fc`).
    WeightsFile,
    /// pytorch-fid's `InceptionV3` module (`blocks.*`, 564 keys, no `fc`).
    PytorchFidModule,
}

impl fmt::Display for KeyLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::WeightsFile => "weights-file names (Conv2d_1a_3x3..., fc)",
            Self::PytorchFidModule => "pytorch-fid InceptionV3 module names (blocks.*)",
        })
    }
}

/// Why the FID Inception weights could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum InceptionWeightsError {
    /// The file could not be read (most often: it is not there).
    #[error(
        "cannot read the FID Inception weights {}: {source}; bring pytorch-fid's {WEIGHTS_FILE_NAME} \
         (from the pytorch-fid GitHub release, {WEIGHTS_FILE_URL}) or a safetensors conversion of it",
        path.display()
    )]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The torch pickle could not be read.
    #[error("cannot read the torch pickle {}", path.display())]
    Torch {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<TorchCheckpointError>,
    },
    /// The safetensors file could not be parsed.
    #[error("{} is not a valid safetensors file (nor a torch pickle)", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// A tensor has a dtype that cannot be read as float32.
    #[error("{}: tensor `{key}` has the unsupported dtype {dtype}", path.display())]
    Dtype {
        /// The file.
        path: PathBuf,
        /// The tensor.
        key: String,
        /// Its dtype.
        dtype: String,
    },
    /// A required tensor is absent.
    #[error(
        "{}: key `{key}` ({layout}) is missing; the FID Inception needs pytorch-fid's {WEIGHTS_FILE_NAME} \
         (from the pytorch-fid GitHub release, {WEIGHTS_FILE_URL}) or a conversion with the same keys",
        path.display()
    )]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The key, in the file's layout.
        key: String,
        /// The layout the file was read in.
        layout: KeyLayout,
    },
    /// A tensor the network does not have (loading is strict, as in pytorch-fid).
    #[error("{}: unexpected key `{key}` for the FID Inception ({layout})", path.display())]
    UnexpectedKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The layout the file was read in.
        layout: KeyLayout,
    },
    /// A tensor of the wrong shape.
    #[error("{}: key `{key}` has shape {found:?}, the FID Inception expects {expected:?}", path.display())]
    Shape {
        /// The file.
        path: PathBuf,
        /// The key, in the file's layout.
        key: String,
        /// The network's shape.
        expected: Vec<usize>,
        /// The file's shape.
        found: Vec<usize>,
    },
}

/// Whether a key may be absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPresence {
    /// Needed by the forward.
    Required,
    /// `bn.num_batches_tracked`: unused in eval; torch's BatchNorm loader
    /// accepts files without it.
    Optional,
}

/// One tensor of the weights file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightKey {
    /// Weights-file name.
    pub name: String,
    /// PyTorch shape (`[]` for `num_batches_tracked`).
    pub shape: Vec<usize>,
    /// Whether it may be absent.
    pub presence: KeyPresence,
}

/// The 566 keys of `pt_inception-2015-12-05-6726825d.pth` with their shapes,
/// in file order (the conv weights, five BatchNorm tensors per conv, then `fc`).
pub fn weights_file_keys() -> Vec<WeightKey> {
    let key = |name: String, shape: Vec<usize>, presence| WeightKey { name, shape, presence };
    let mut keys = Vec::new();
    for spec in conv_specs() {
        let c = spec.out_channels;
        keys.push(key(format!("{}.conv.weight", spec.name), spec.weight_shape().to_vec(), KeyPresence::Required));
        for t in ["weight", "bias", "running_mean", "running_var"] {
            keys.push(key(format!("{}.bn.{t}", spec.name), vec![c], KeyPresence::Required));
        }
        keys.push(key(format!("{}.bn.num_batches_tracked", spec.name), vec![], KeyPresence::Optional));
    }
    keys.push(key("fc.weight".into(), vec![INCEPTION_CLASSES, POOL_FEATURES], KeyPresence::Required));
    keys.push(key("fc.bias".into(), vec![INCEPTION_CLASSES], KeyPresence::Required));
    keys
}

/// The weights-file name of a pytorch-fid module key
/// (`blocks.2.0.branch1x1.conv.weight` -> `Mixed_5b.branch1x1.conv.weight`).
pub fn weights_file_key(module_key: &str) -> Option<String> {
    MODULE_BLOCKS.iter().find_map(|(module, file)| {
        module_key.strip_prefix(module).and_then(|rest| rest.strip_prefix('.')).map(|rest| format!("{file}.{rest}"))
    })
}

/// The pytorch-fid module name of a weights-file key (`None` for `fc.*`).
pub fn module_key(weights_file_key: &str) -> Option<String> {
    MODULE_BLOCKS.iter().find_map(|(module, file)| {
        weights_file_key
            .strip_prefix(file)
            .and_then(|rest| rest.strip_prefix('.'))
            .map(|rest| format!("{module}.{rest}"))
    })
}

/// Reads the tensors of a weights file: a torch pickle (zip or legacy
/// format) or a safetensors file, told apart by their first bytes; values as
/// float32.
pub fn read_inception_weights(path: &Path) -> Result<StateDict, InceptionWeightsError> {
    let io = |source| InceptionWeightsError::Io { path: path.to_path_buf(), source };
    // pytorch-fid's own file is a legacy (pre-zip) torch.save file.
    if is_torch_save_file(path).map_err(io)? {
        let tensors = read_state_dict(path, "")
            .map_err(|e| InceptionWeightsError::Torch { path: path.to_path_buf(), source: Box::new(e) })?;
        return Ok(StateDict { tensors: tensors.into_iter().collect() });
    }
    let bytes = std::fs::read(path).map_err(io)?;
    read_safetensors(path, &bytes)
}

fn read_safetensors(path: &Path, bytes: &[u8]) -> Result<StateDict, InceptionWeightsError> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|source| InceptionWeightsError::Safetensors { path: path.to_path_buf(), source })?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        // Floats, and the integer `num_batches_tracked` counters of batch norm.
        let element = Element::from_safetensors(view.dtype()).ok_or_else(|| InceptionWeightsError::Dtype {
            path: path.to_path_buf(),
            key: name.clone(),
            dtype: format!("{:?}", view.dtype()),
        })?;
        tensors.insert(name, HostTensor { shape: view.shape().to_vec(), data: element.decode_all(view.data()) });
    }
    Ok(StateDict { tensors })
}

/// Loads pytorch-fid's FID Inception from a weights file (see
/// [`read_inception_weights`] and [`FidInceptionV3::from_state_dict`]).
pub fn load_fid_inception<B: Backend>(
    path: &Path,
    device: &B::Device,
) -> Result<FidInceptionV3<B>, InceptionWeightsError> {
    let state_dict = read_inception_weights(path)?;
    FidInceptionV3::from_state_dict(&state_dict, path, device)
}

/// The layout of a state dict: pytorch-fid module names when any key starts with `blocks.`.
pub fn key_layout(state_dict: &StateDict) -> KeyLayout {
    if state_dict.tensors.keys().any(|k| k.starts_with("blocks.")) {
        KeyLayout::PytorchFidModule
    } else {
        KeyLayout::WeightsFile
    }
}

/// Hands out the checked tensors of a state dict.
struct Checked<'a, B: Backend> {
    /// Weights-file name to tensor.
    tensors: BTreeMap<String, &'a HostTensor>,
    device: &'a B::Device,
}

impl<B: Backend> Checked<'_, B> {
    fn tensor<const D: usize>(&self, key: &str) -> Tensor<B, D> {
        let t = self.tensors.get(key).unwrap_or_else(|| panic!("`{key}` was checked to be present"));
        Tensor::from_data(TensorData::new(t.data.clone(), t.shape.clone()), self.device)
    }

    fn param<const D: usize>(&self, key: &str) -> Param<Tensor<B, D>> {
        Param::from_tensor(self.tensor(key))
    }
}

impl<B: Backend> ConvSource<B> for Checked<'_, B> {
    fn conv(&mut self, spec: &ConvSpec) -> BasicConv2d<B> {
        let n = &spec.name;
        BasicConv2d {
            conv_weight: self.param(&format!("{n}.conv.weight")),
            bn: BatchNorm2d {
                weight: self.param(&format!("{n}.bn.weight")),
                bias: self.param(&format!("{n}.bn.bias")),
                running_mean: self.param(&format!("{n}.bn.running_mean")),
                running_var: self.param(&format!("{n}.bn.running_var")),
            },
            stride: spec.stride,
            padding: spec.padding,
        }
    }
}

impl<B: Backend> FidInceptionV3<B> {
    /// Builds the network from a state dict in either [`KeyLayout`]
    /// (`source` is the file it came from, for errors).
    ///
    /// Every key and shape is checked first; nothing is built unless all
    /// match. Under weights-file names `fc.weight` and `fc.bias` are required
    /// (pytorch-fid loads that file strictly); under module names the head is
    /// optional (pytorch-fid's module has none), and without it
    /// [`FidInceptionV3::logits`] returns `None`.
    pub fn from_state_dict(
        state_dict: &StateDict,
        source: &Path,
        device: &B::Device,
    ) -> Result<Self, InceptionWeightsError> {
        let layout = key_layout(state_dict);
        let path = || source.to_path_buf();
        let shown = |file_key: &str| match layout {
            KeyLayout::PytorchFidModule => module_key(file_key).unwrap_or_else(|| file_key.to_string()),
            KeyLayout::WeightsFile => file_key.to_string(),
        };
        // Translate to weights-file names.
        let mut tensors = BTreeMap::new();
        for (key, tensor) in &state_dict.tensors {
            let file_key = match layout {
                KeyLayout::PytorchFidModule if !key.starts_with("fc.") => weights_file_key(key)
                    .ok_or_else(|| InceptionWeightsError::UnexpectedKey { path: path(), key: key.clone(), layout })?,
                _ => key.clone(),
            };
            tensors.insert(file_key, tensor);
        }
        let expected = weights_file_keys();
        let known: BTreeSet<&str> = expected.iter().map(|k| k.name.as_str()).collect();
        if let Some(key) = tensors.keys().find(|k| !known.contains(k.as_str())) {
            return Err(InceptionWeightsError::UnexpectedKey { path: path(), key: shown(key), layout });
        }
        let has_fc = match layout {
            KeyLayout::WeightsFile => true,
            KeyLayout::PytorchFidModule => tensors.keys().any(|k| k.starts_with("fc.")),
        };
        for key in &expected {
            let required = key.presence == KeyPresence::Required && (has_fc || !key.name.starts_with("fc."));
            match tensors.get(&key.name) {
                None if required => {
                    return Err(InceptionWeightsError::MissingKey { path: path(), key: shown(&key.name), layout })
                }
                Some(t) if t.shape != key.shape => {
                    return Err(InceptionWeightsError::Shape {
                        path: path(),
                        key: shown(&key.name),
                        expected: key.shape.clone(),
                        found: t.shape.clone(),
                    })
                }
                _ => {}
            }
        }
        let mut checked = Checked::<B> { tensors, device };
        let fc = has_fc.then(|| InceptionFc { weight: checked.param("fc.weight"), bias: checked.param("fc.bias") });
        Ok(Self::build(&mut checked, fc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn key_names_and_module_names() {
        let keys = weights_file_keys();
        assert_eq!(keys.len(), 566);
        assert_eq!(keys.iter().filter(|k| k.presence == KeyPresence::Optional).count(), 94);
        assert_eq!(
            weights_file_key("blocks.2.0.branch1x1.conv.weight").as_deref(),
            Some("Mixed_5b.branch1x1.conv.weight")
        );
        assert_eq!(weights_file_key("blocks.0.0.bn.running_var").as_deref(), Some("Conv2d_1a_3x3.bn.running_var"));
        assert_eq!(module_key("Mixed_7c.branch_pool.bn.bias").as_deref(), Some("blocks.3.2.branch_pool.bn.bias"));
        assert_eq!(module_key("fc.weight"), None);
        // `blocks.2.1` must not match `blocks.2.10...`-like keys by prefix alone.
        assert_eq!(weights_file_key("blocks.2.10.x"), None);
    }

    fn small_state_dict() -> StateDict {
        let tensors = weights_file_keys()
            .into_iter()
            .filter(|k| k.presence == KeyPresence::Required)
            .map(|k| {
                let numel = k.shape.iter().product();
                (k.name, HostTensor { shape: k.shape, data: vec![0.5; numel] })
            })
            .collect();
        StateDict { tensors }
    }

    #[test]
    fn strict_checks_name_the_file_key_and_shapes() {
        let device = Default::default();
        let file = Path::new("weights.safetensors");
        let mut sd = small_state_dict();
        let model = FidInceptionV3::<Flex>::from_state_dict(&sd, file, &device).unwrap();
        assert!(model.fc.is_some());

        sd.tensors.get_mut("Mixed_6b.branch7x7_2.conv.weight").unwrap().shape = vec![128, 128, 7, 1];
        let e = FidInceptionV3::<Flex>::from_state_dict(&sd, file, &device).unwrap_err().to_string();
        assert!(e.contains("weights.safetensors") && e.contains("Mixed_6b.branch7x7_2.conv.weight"), "{e}");
        assert!(e.contains("[128, 128, 7, 1]") && e.contains("[128, 128, 1, 7]"), "{e}");

        let mut sd = small_state_dict();
        sd.tensors.remove("fc.bias");
        let e = FidInceptionV3::<Flex>::from_state_dict(&sd, file, &device).unwrap_err().to_string();
        assert!(e.contains("`fc.bias`") && e.contains(WEIGHTS_FILE_NAME), "{e}");

        let mut sd = small_state_dict();
        sd.tensors.insert("AuxLogits.fc.weight".into(), HostTensor { shape: vec![1], data: vec![0.0] });
        let e = FidInceptionV3::<Flex>::from_state_dict(&sd, file, &device).unwrap_err().to_string();
        assert!(e.contains("unexpected key `AuxLogits.fc.weight`"), "{e}");
    }

    #[test]
    fn module_names_load_without_the_head() {
        let sd = small_state_dict();
        let tensors = sd
            .tensors
            .into_iter()
            .filter(|(k, _)| !k.starts_with("fc."))
            .map(|(k, t)| (module_key(&k).unwrap(), t))
            .collect();
        let sd = StateDict { tensors };
        let model = FidInceptionV3::<Flex>::from_state_dict(&sd, Path::new("m.pth"), &Default::default()).unwrap();
        assert!(model.fc.is_none());
        let mut sd = sd;
        sd.tensors.remove("blocks.3.2.branch_pool.bn.running_mean");
        let e = FidInceptionV3::<Flex>::from_state_dict(&sd, Path::new("m.pth"), &Default::default()).unwrap_err();
        assert!(e.to_string().contains("`blocks.3.2.branch_pool.bn.running_mean`"), "{e}");
    }

    /// A `torch.save` zip whose every tensor is a stride-0 view of one
    /// storage holding `0.5`: the whole network in a few hundred bytes.
    fn write_torch_state_dict(path: &Path, keys: &[(String, Vec<usize>)]) {
        use std::io::Write;
        let p = state_dict_pickle(keys, false);
        let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
        let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        for (name, bytes) in
            [("w/data.pkl", p), ("w/data/0", 0.5f32.to_le_bytes().to_vec()), ("w/version", b"3\n".to_vec())]
        {
            zip.start_file(name, options).unwrap();
            zip.write_all(&bytes).unwrap();
        }
        zip.finish().unwrap();
    }

    /// The same state dict as a legacy (torch < 1.6) `torch.save` file, the
    /// format of pytorch-fid's weights: magic number, protocol version 1001,
    /// sys_info, the state dict, the storage keys, then storage `0` (one
    /// element).
    fn write_legacy_torch_state_dict(path: &Path, keys: &[(String, Vec<usize>)]) {
        let mut bytes =
            b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.\x80\x02M\xe9\x03.\x80\x02}.".to_vec();
        bytes.extend(state_dict_pickle(keys, true));
        bytes.extend(b"\x80\x02]X\x01\x00\x00\x000a.");
        bytes.extend(1u64.to_le_bytes());
        bytes.extend(0.5f32.to_le_bytes());
        std::fs::write(path, bytes).unwrap();
    }

    /// The pickle of a state dict whose tensors all view storage `0`; legacy
    /// persistent ids carry a sixth item, the view metadata (`None`).
    fn state_dict_pickle(keys: &[(String, Vec<usize>)], legacy: bool) -> Vec<u8> {
        let mut p = vec![0x80, 2, b'}', b'('];
        let text = |p: &mut Vec<u8>, s: &str| {
            p.push(b'X');
            p.extend((s.len() as u32).to_le_bytes());
            p.extend(s.as_bytes());
        };
        let int = |p: &mut Vec<u8>, v: i32| {
            p.push(b'J');
            p.extend(v.to_le_bytes());
        };
        for (name, shape) in keys {
            text(&mut p, name);
            p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
            p.push(b'(');
            text(&mut p, "storage");
            p.extend(b"ctorch\nFloatStorage\n");
            text(&mut p, "0");
            text(&mut p, "cpu");
            int(&mut p, 1);
            if legacy {
                p.push(b'N');
            }
            p.extend(b"tQ");
            int(&mut p, 0);
            p.push(b'(');
            shape.iter().for_each(|&d| int(&mut p, d as i32));
            p.extend(b"t(");
            shape.iter().for_each(|_| int(&mut p, 0));
            p.extend(b"t\x89ccollections\nOrderedDict\n)RtR");
        }
        p.extend(b"u.");
        p
    }

    #[test]
    fn torch_pickles_load_in_both_layouts() {
        let dir = std::env::temp_dir().join(format!("diffmoe-eval-pth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pt_inception.pth");
        // pytorch-fid module names, no num_batches_tracked, no fc.
        let keys: Vec<(String, Vec<usize>)> = weights_file_keys()
            .into_iter()
            .filter(|k| k.presence == KeyPresence::Required && !k.name.starts_with("fc."))
            .map(|k| (module_key(&k.name).unwrap(), k.shape))
            .collect();
        write_torch_state_dict(&path, &keys);
        let model = load_fid_inception::<Flex>(&path, &Default::default()).unwrap();
        assert!(model.fc.is_none());
        let w = model.mixed_7c.branch_pool.bn.running_var.val().into_data().to_vec::<f32>().unwrap();
        assert_eq!(w, vec![0.5; 192]);

        // Weights-file names with one BatchNorm tensor missing.
        let keys: Vec<(String, Vec<usize>)> = weights_file_keys()
            .into_iter()
            .filter(|k| k.name != "Mixed_6e.branch7x7dbl_4.bn.running_var")
            .map(|k| (k.name, k.shape))
            .collect();
        write_torch_state_dict(&path, &keys);
        let e = load_fid_inception::<Flex>(&path, &Default::default()).unwrap_err().to_string();
        assert!(e.contains("pt_inception.pth") && e.contains("`Mixed_6e.branch7x7dbl_4.bn.running_var`"), "{e}");
        assert!(e.contains(WEIGHTS_FILE_NAME), "{e}");

        // A legacy (non-zip) torch pickle, the format of pytorch-fid's file,
        // with weights-file names and `num_batches_tracked` scalars.
        let keys: Vec<(String, Vec<usize>)> = weights_file_keys().into_iter().map(|k| (k.name, k.shape)).collect();
        write_legacy_torch_state_dict(&path, &keys);
        let model = load_fid_inception::<Flex>(&path, &Default::default()).unwrap();
        assert!(model.fc.is_some());
        let w = model.mixed_7c.branch_pool.bn.running_var.val().into_data().to_vec::<f32>().unwrap();
        assert_eq!(w, vec![0.5; 192]);

        // A truncated legacy file is a torch error naming the file.
        std::fs::write(&path, [0x80u8, 2, 0x8a, 0x0a]).unwrap();
        let e = load_fid_inception::<Flex>(&path, &Default::default()).unwrap_err();
        assert!(matches!(e, InceptionWeightsError::Torch { .. }), "{e}");
        let cause = std::error::Error::source(&e).map(ToString::to_string).unwrap_or_default();
        assert!(cause.contains("pt_inception.pth") && cause.contains("truncated"), "{cause}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_file_says_which_file_to_bring() {
        let e = read_inception_weights(Path::new("no/such/inception.pth")).unwrap_err().to_string();
        assert!(
            e.contains("no/such/inception.pth") && e.contains(WEIGHTS_FILE_NAME) && e.contains("pytorch-fid"),
            "{e}"
        );
    }
}
