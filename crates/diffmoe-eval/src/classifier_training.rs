//! Training and testing the feature classifier (`diffmoe classifier train`):
//! cross-entropy with AdamW and a cosine learning-rate decay, over epochs of
//! the deterministic loader of `diffmoe-train` (random horizontal flips as
//! augmentation), with the test accuracy after every epoch.

use std::sync::Arc;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};

use diffmoe_train::data::{Augment, BadFilePolicy, DataError, Dataset, Loader, LoaderConfig};

use crate::classifier::{ClassifierConfig, FeatureClassifier};

/// How the classifier is trained.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClassifierTraining {
    /// Passes over the training set.
    pub epochs: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Peak learning rate (cosine decay to 0 over the run).
    pub learning_rate: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Seeds the initialisation, the data order and the flips.
    pub seed: u64,
    /// Data loader threads.
    pub workers: usize,
}

impl Default for ClassifierTraining {
    /// The recipe of the shipped Fashion-MNIST classifier.
    fn default() -> Self {
        Self { epochs: 8, batch_size: 128, learning_rate: 1e-3, weight_decay: 1e-4, seed: 0, workers: 2 }
    }
}

/// What one epoch did.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct EpochReport {
    /// 1-based.
    pub epoch: usize,
    /// Mean training cross-entropy.
    pub train_loss: f64,
    /// Training accuracy (on the augmented batches, as they were trained).
    pub train_accuracy: f64,
    /// Accuracy on the test set.
    pub test_accuracy: f64,
    /// Wall time of the epoch, test included.
    pub seconds: f64,
}

/// Receives the progress of a classifier training run.
pub trait ClassifierObserver {
    /// A step is done (`step` of `total`, its loss).
    fn stepped(&mut self, _step: usize, _total: usize, _loss: f64) {}
    /// An epoch is done.
    fn epoch(&mut self, _report: &EpochReport) {}
}

/// Trains a classifier of `config` on `train`, testing on `test` after
/// every epoch.
///
/// # Errors
/// If an example cannot be loaded; the error names the file.
pub fn train_classifier<B: AutodiffBackend>(
    config: &ClassifierConfig,
    train: Arc<dyn Dataset>,
    test: &dyn Dataset,
    settings: ClassifierTraining,
    device: &B::Device,
    observer: &mut impl ClassifierObserver,
) -> Result<(FeatureClassifier<B::InnerBackend>, Vec<EpochReport>), DataError> {
    B::seed(device, settings.seed);
    let mut model = config.init::<B>(device);
    let mut optimizer = AdamWConfig::new().with_weight_decay(settings.weight_decay as f32).init();
    let loader_config = LoaderConfig {
        batch_size: settings.batch_size,
        workers: settings.workers,
        seed: settings.seed,
        flip: true,
        bad_files: BadFilePolicy::Fail,
        rank: 0,
        world_size: 1,
    };
    let mut loader = Loader::new(train, loader_config, 0)?;
    let per_epoch = loader.batches_per_epoch() as usize;
    let total = per_epoch * settings.epochs;
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let mut reports = Vec::new();
    let mut step = 0;
    for epoch in 1..=settings.epochs {
        let started = Instant::now();
        let (mut loss_sum, mut correct, mut seen) = (0.0, 0usize, 0usize);
        for _ in 0..per_epoch {
            let batch = loader.next_batch()?;
            let (x, y) = tensors::<B>(&batch.images, batch.shape, &batch.labels, device);
            let logits = model.forward(x);
            correct += count_correct(logits.clone().inner(), &batch.labels);
            seen += batch.labels.len();
            let loss = loss_fn.forward(logits, y);
            let value = loss.clone().into_scalar_f64();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let progress = step as f64 / total.max(1) as f64;
            let lr = settings.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
            model = optimizer.step(lr, model, grads);
            loss_sum += value;
            step += 1;
            observer.stepped(step, total, value);
        }
        let test_accuracy = accuracy(&model.valid(), test, 500)?;
        let report = EpochReport {
            epoch,
            train_loss: loss_sum / per_epoch.max(1) as f64,
            train_accuracy: correct as f64 / seen.max(1) as f64,
            test_accuracy,
            seconds: started.elapsed().as_secs_f64(),
        };
        observer.epoch(&report);
        reports.push(report);
    }
    Ok((model.valid(), reports))
}

/// The fraction of `dataset` the classifier labels correctly.
///
/// # Errors
/// If an example cannot be loaded.
pub fn accuracy<B: Backend>(
    model: &FeatureClassifier<B>,
    dataset: &dyn Dataset,
    batch_size: usize,
) -> Result<f64, DataError> {
    let device = model.conv1a.weight.val().device();
    let shape = dataset.shape();
    let mut correct = 0;
    for start in (0..dataset.len()).step_by(batch_size.max(1)) {
        let end = (start + batch_size.max(1)).min(dataset.len());
        let mut images = Vec::with_capacity((end - start) * shape.numel());
        let mut labels = Vec::with_capacity(end - start);
        for i in start..end {
            let example = dataset.get(i, Augment::default())?;
            images.extend(example.image);
            labels.push(example.label);
        }
        let dims = [end - start, shape.channels, shape.height, shape.width];
        let (x, _) = tensors::<B>(&images, dims, &labels, &device);
        correct += count_correct(model.forward(x), &labels);
    }
    Ok(correct as f64 / dataset.len().max(1) as f64)
}

/// Labels whose argmax logit is right.
fn count_correct<B: Backend>(logits: Tensor<B, 2>, labels: &[usize]) -> usize {
    let predicted: Vec<i64> = logits.argmax(1).into_data().iter::<i64>().collect();
    predicted.iter().zip(labels).filter(|(p, l)| **p == **l as i64).count()
}

fn tensors<B: Backend>(
    images: &[f32],
    shape: [usize; 4],
    labels: &[usize],
    device: &B::Device,
) -> (Tensor<B, 4>, Tensor<B, 1, Int>) {
    let x = Tensor::from_data(TensorData::new(images.to_vec(), shape), device);
    let y: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
    (x, Tensor::from_data(TensorData::new(y, [labels.len()]), device))
}

trait ScalarF64 {
    fn into_scalar_f64(self) -> f64;
}

impl<B: Backend> ScalarF64 for Tensor<B, 1> {
    fn into_scalar_f64(self) -> f64 {
        self.into_data().iter::<f64>().next().unwrap_or(f64::NAN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use diffmoe_train::data::{open_dataset, DataSpec, ImageShape};

    /// Forty steps on the embedded Fashion-MNIST split lift a small network
    /// well above chance (10%).
    #[test]
    fn learns_fashion_mnist_above_chance() {
        let target = ImageShape { channels: 1, height: 32, width: 32 };
        let data = open_dataset(&DataSpec::Embedded, target).unwrap();
        let config = ClassifierConfig::new().with_width(8).with_features(32);
        let settings =
            ClassifierTraining { epochs: 1, batch_size: 250, learning_rate: 3e-3, workers: 1, ..Default::default() };
        struct Count(usize);
        impl ClassifierObserver for Count {
            fn stepped(&mut self, _: usize, _: usize, _: f64) {
                self.0 += 1;
            }
        }
        let mut count = Count(0);
        let (model, reports) = train_classifier::<Autodiff<Flex>>(
            &config,
            data.clone(),
            data.as_ref(),
            settings,
            &Default::default(),
            &mut count,
        )
        .unwrap();
        assert_eq!(count.0, 40);
        assert_eq!(reports.len(), 1);
        assert!(reports[0].test_accuracy > 0.3, "{:?}", reports[0]);
        assert!((accuracy(&model, data.as_ref(), 1000).unwrap() - reports[0].test_accuracy).abs() < 1e-12);
    }
}
