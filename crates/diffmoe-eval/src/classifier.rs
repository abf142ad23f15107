//! The feature classifier of the Fashion-MNIST evaluation: a small
//! convolutional network trained on the training split by
//! `diffmoe classifier train`, whose 128-d penultimate activations play the
//! part Inception's pool features play for ImageNet (Frechet distance,
//! precision and recall) and whose predictions score class-conditional
//! samples (the accuracy of a classifier on the requested labels, as in
//! the classification-accuracy scores of the conditional-GAN literature).
//!
//! ```text
//! [N, C, S, S] in [-1, 1]                                    (S = 32 for Fashion-MNIST)
//!   conv3x3(C -> w) ReLU conv3x3(w -> w) ReLU maxpool2       [N, w, S/2, S/2]
//!   conv3x3(w -> 2w) ReLU conv3x3(2w -> 2w) ReLU maxpool2    [N, 2w, S/4, S/4]
//!   conv3x3(2w -> 4w) ReLU maxpool2, flatten                 [N, 4w * S/8 * S/8]
//!   linear(-> features) ReLU                                 [N, features]   <- features
//!   linear(features -> classes)                              [N, classes]    <- logits
//! ```
//!
//! Weights are saved as safetensors under PyTorch-style names
//! (`conv1a.weight` `[out, in, 3, 3]`, `fc_features.weight` `[out, in]`, ...)
//! with the config in the metadata; the classifier this project trained on
//! Fashion-MNIST is embedded in the binary ([`FeatureClassifier::fashion_mnist`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::module::max_pool2d;
use burn::tensor::{activation::relu, backend::Backend, Tensor, TensorData};
use diffmoe_weights::{write_f32_safetensors, Element};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

/// Metadata key of the classifier config in its safetensors file.
pub const CLASSIFIER_CONFIG_KEY: &str = "diffmoe.classifier_config";

/// The classifier this project trained on the Fashion-MNIST training split
/// (see `docs/results.md` for the command and its test accuracy).
const FASHION_MNIST_WEIGHTS: &[u8] = include_bytes!("../weights/fashion_mnist_classifier.safetensors");

/// Hyper-parameters of the classifier.
#[derive(Config, Debug, PartialEq)]
pub struct ClassifierConfig {
    /// Input channels.
    #[config(default = 1)]
    pub channels: usize,
    /// Side of the (square) input; a multiple of 8.
    #[config(default = 32)]
    pub input_size: usize,
    /// Classes.
    #[config(default = 10)]
    pub num_classes: usize,
    /// Channels of the first convolutions (`w`; then `2w`, `4w`).
    #[config(default = 32)]
    pub width: usize,
    /// Width of the feature layer.
    #[config(default = 128)]
    pub features: usize,
}

/// Why classifier weights could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ClassifierError {
    /// The file could not be read.
    #[error("classifier weights {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file could not be written.
    #[error(transparent)]
    Write(#[from] diffmoe_weights::WriteError),
    /// The file is not valid safetensors.
    #[error("classifier weights {path} are not valid safetensors")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// The config in the metadata is missing or invalid.
    #[error("classifier weights {path}: no valid `{CLASSIFIER_CONFIG_KEY}` metadata ({reason})")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor is missing or has the wrong shape or dtype.
    #[error("classifier weights {path}: `{key}` {problem}")]
    Tensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        key: String,
        /// What is wrong.
        problem: String,
    },
}

/// The classifier.
#[derive(Module, Debug)]
pub struct FeatureClassifier<B: Backend> {
    /// `C -> w`.
    pub conv1a: Conv2d<B>,
    /// `w -> w`.
    pub conv1b: Conv2d<B>,
    /// `w -> 2w`.
    pub conv2a: Conv2d<B>,
    /// `2w -> 2w`.
    pub conv2b: Conv2d<B>,
    /// `2w -> 4w`.
    pub conv3: Conv2d<B>,
    /// `4w * (S/8)^2 -> features`.
    pub fc_features: Linear<B>,
    /// `features -> classes`.
    pub fc_logits: Linear<B>,
    /// Side of the images it reads.
    pub input_size: usize,
}

impl ClassifierConfig {
    /// A freshly initialised classifier (burn's default initialisation).
    pub fn init<B: Backend>(&self, device: &B::Device) -> FeatureClassifier<B> {
        let conv = |i: usize, o: usize| {
            Conv2dConfig::new([i, o], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)).init(device)
        };
        let w = self.width;
        FeatureClassifier {
            conv1a: conv(self.channels, w),
            conv1b: conv(w, w),
            conv2a: conv(w, 2 * w),
            conv2b: conv(2 * w, 2 * w),
            conv3: conv(2 * w, 4 * w),
            fc_features: LinearConfig::new(4 * w * (self.input_size / 8).pow(2), self.features).init(device),
            fc_logits: LinearConfig::new(self.features, self.num_classes).init(device),
            input_size: self.input_size,
        }
    }
}

impl<B: Backend> FeatureClassifier<B> {
    /// The penultimate activations (after their ReLU), the feature space of
    /// the Frechet distance and of precision and recall.
    ///
    /// # Shapes
    /// - `x`: `[N, channels, input_size, input_size]` in `[-1, 1]` -> `[N, features]`
    pub fn features(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let pool = |x: Tensor<B, 4>| max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], false);
        let h = relu(self.conv1b.forward(relu(self.conv1a.forward(x))));
        let h = pool(h); // [N, w, S/2, S/2]
        let h = relu(self.conv2b.forward(relu(self.conv2a.forward(h))));
        let h = pool(h); // [N, 2w, S/4, S/4]
        let h = pool(relu(self.conv3.forward(h))); // [N, 4w, S/8, S/8]
        let [n, c, hh, ww] = h.dims();
        relu(self.fc_features.forward(h.reshape([n, c * hh * ww]))) // [N, features]
    }

    /// Class logits from features.
    ///
    /// # Shapes
    /// - `features`: `[N, features]` -> `[N, num_classes]`
    pub fn logits_from_features(&self, features: Tensor<B, 2>) -> Tensor<B, 2> {
        self.fc_logits.forward(features)
    }

    /// Class logits.
    ///
    /// # Shapes
    /// - `x`: `[N, channels, input_size, input_size]` in `[-1, 1]` -> `[N, num_classes]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        self.logits_from_features(self.features(x))
    }

    /// The config, read off the layer shapes.
    pub fn config(&self) -> ClassifierConfig {
        let [width, channels, ..] = self.conv1a.weight.dims();
        let [_, features] = self.fc_features.weight.dims();
        let [_, num_classes] = self.fc_logits.weight.dims();
        ClassifierConfig { channels, input_size: self.input_size, num_classes, width, features }
    }

    /// The classifier this project trained on Fashion-MNIST (32x32, one
    /// channel, padded as the training data is), embedded in the binary.
    pub fn fashion_mnist(device: &B::Device) -> Self {
        Self::from_bytes(FASHION_MNIST_WEIGHTS, Path::new("<embedded classifier>"), device)
            .expect("the embedded classifier weights are valid")
    }

    /// Reads weights written by [`Self::save`] (the config is in the file).
    ///
    /// # Errors
    /// If the file cannot be read, has no config, or a tensor is missing or
    /// misshapen; the error names the file and the tensor.
    pub fn load(path: &Path, device: &B::Device) -> Result<Self, ClassifierError> {
        let bytes = std::fs::read(path).map_err(|source| ClassifierError::Io { path: path.to_path_buf(), source })?;
        Self::from_bytes(&bytes, path, device)
    }

    fn from_bytes(bytes: &[u8], path: &Path, device: &B::Device) -> Result<Self, ClassifierError> {
        let st_error = |source| ClassifierError::Safetensors { path: path.to_path_buf(), source };
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(st_error)?;
        let config_error = |reason: String| ClassifierError::Config { path: path.to_path_buf(), reason };
        let json = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(CLASSIFIER_CONFIG_KEY))
            .ok_or_else(|| config_error("absent".into()))?;
        let config: ClassifierConfig = serde_json::from_str(json).map_err(|e| config_error(e.to_string()))?;
        let st = SafeTensors::deserialize(bytes).map_err(st_error)?;
        let mut model = config.init::<B>(device);
        let expected = model.named_shapes();
        let mut values: HashMap<String, Vec<f32>> = HashMap::new();
        for (key, shape) in &expected {
            let problem =
                |problem: String| ClassifierError::Tensor { path: path.to_path_buf(), key: key.clone(), problem };
            let view = st.tensor(key).map_err(|_| problem("is missing".into()))?;
            if view.dtype() != Dtype::F32 {
                return Err(problem(format!("is {:?}, expected F32", view.dtype())));
            }
            if view.shape() != shape.as_slice() {
                return Err(problem(format!("has shape {:?}, expected {shape:?}", view.shape())));
            }
            values.insert(key.clone(), Element::F32.decode_all(view.data()));
        }
        model.set_named(&mut values, device);
        Ok(model)
    }

    /// Writes the weights and the config as safetensors, atomically.
    ///
    /// # Errors
    /// If the file cannot be written.
    pub fn save(&self, path: &Path) -> Result<(), ClassifierError> {
        let metadata = HashMap::from([(
            CLASSIFIER_CONFIG_KEY.to_string(),
            serde_json::to_string(&self.config()).expect("a config serialises"),
        )]);
        let tensors = self.named_values().into_iter().map(|(k, (shape, values))| (k, shape, values));
        Ok(write_f32_safetensors(path, tensors, metadata)?)
    }

    fn convs(&self) -> [(&'static str, &Conv2d<B>); 5] {
        [
            ("conv1a", &self.conv1a),
            ("conv1b", &self.conv1b),
            ("conv2a", &self.conv2a),
            ("conv2b", &self.conv2b),
            ("conv3", &self.conv3),
        ]
    }

    fn linears(&self) -> [(&'static str, &Linear<B>); 2] {
        [("fc_features", &self.fc_features), ("fc_logits", &self.fc_logits)]
    }

    /// Every tensor under its file name, with its file shape (PyTorch
    /// layout: linear weights `[out, in]`).
    fn named_shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.named_values().into_iter().map(|(k, (shape, _))| (k, shape)).collect()
    }

    fn named_values(&self) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
        let host = |t: Tensor<B, 1>| t.into_data().convert::<f32>().to_vec::<f32>().expect("f32 weights");
        let mut out = BTreeMap::new();
        for (name, conv) in self.convs() {
            let w = conv.weight.val();
            out.insert(format!("{name}.weight"), (w.dims().to_vec(), host(w.flatten(0, 3))));
            let b = conv.bias.as_ref().expect("convolutions have a bias").val();
            out.insert(format!("{name}.bias"), (b.dims().to_vec(), host(b)));
        }
        for (name, linear) in self.linears() {
            let w = linear.weight.val().transpose(); // [out, in]
            out.insert(format!("{name}.weight"), (w.dims().to_vec(), host(w.flatten(0, 1))));
            let b = linear.bias.as_ref().expect("linears have a bias").val();
            out.insert(format!("{name}.bias"), (b.dims().to_vec(), host(b)));
        }
        out
    }

    /// Sets every tensor from `values` (file names and layouts, checked by the caller).
    fn set_named(&mut self, values: &mut HashMap<String, Vec<f32>>, device: &B::Device) {
        let mut take = |key: String, dims: Vec<usize>| -> TensorData {
            TensorData::new(values.remove(&key).expect("checked by the caller"), dims)
        };
        let mut convs = [
            ("conv1a", &mut self.conv1a),
            ("conv1b", &mut self.conv1b),
            ("conv2a", &mut self.conv2a),
            ("conv2b", &mut self.conv2b),
            ("conv3", &mut self.conv3),
        ];
        for (name, conv) in convs.iter_mut() {
            let dims = conv.weight.dims().to_vec();
            conv.weight = Param::from_tensor(Tensor::from_data(take(format!("{name}.weight"), dims), device));
            let bias = conv.bias.as_ref().expect("convolutions have a bias").dims().to_vec();
            conv.bias = Some(Param::from_tensor(Tensor::from_data(take(format!("{name}.bias"), bias), device)));
        }
        for (name, linear) in [("fc_features", &mut self.fc_features), ("fc_logits", &mut self.fc_logits)] {
            let [i, o] = linear.weight.dims();
            let w: Tensor<B, 2> = Tensor::from_data(take(format!("{name}.weight"), vec![o, i]), device);
            linear.weight = Param::from_tensor(w.transpose());
            linear.bias = Some(Param::from_tensor(Tensor::from_data(take(format!("{name}.bias"), vec![o]), device)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    type B = Flex;

    #[test]
    fn shapes_and_save_load_round_trip() {
        let device = Default::default();
        let config = ClassifierConfig::new().with_width(4).with_features(8);
        let model = config.init::<B>(&device);
        let x = Tensor::<B, 4>::random([3, 1, 32, 32], Distribution::Uniform(-1.0, 1.0), &device);
        let features = model.features(x.clone());
        assert_eq!(features.dims(), [3, 8]);
        assert!(features.clone().min().into_scalar() >= 0.0, "features follow a ReLU");
        assert_eq!(model.forward(x.clone()).dims(), [3, 10]);
        assert_eq!(model.config(), config);

        let dir = std::env::temp_dir().join(format!("diffmoe-classifier-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.safetensors");
        model.save(&path).unwrap();
        let loaded = FeatureClassifier::<B>::load(&path, &device).unwrap();
        assert_eq!(loaded.config(), config);
        // The same weights; the transposed linear weights may sum in another order.
        let diff: f32 = (loaded.forward(x.clone()) - model.forward(x)).abs().max().into_scalar();
        assert!(diff < 1e-6, "{diff}");

        // Tensors of another width under this config: the error names the tensor.
        let other = ClassifierConfig::new().with_width(4).with_features(9).init::<B>(&device);
        other.save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let metadata = HashMap::from([(CLASSIFIER_CONFIG_KEY.to_string(), serde_json::to_string(&config).unwrap())]);
        let relabelled = safetensors::serialize(st.tensors(), &Some(metadata)).unwrap();
        std::fs::write(&path, relabelled).unwrap();
        let error = FeatureClassifier::<B>::load(&path, &device).unwrap_err();
        assert!(error.to_string().contains("`fc_features."), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_embedded_classifier_loads() {
        let model = FeatureClassifier::<B>::fashion_mnist(&Default::default());
        assert_eq!(model.config(), ClassifierConfig::new());
    }
}
