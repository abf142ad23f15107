//! Scoring generated images in the feature space of the Fashion-MNIST
//! classifier: Frechet distance (mean and covariance of the 128-d features,
//! the FID formula), improved precision and recall, and the accuracy of the
//! classifier on the requested labels.

use burn::tensor::{backend::Backend, Tensor, TensorData};

use diffmoe_train::data::{Augment, DataError, Dataset};

use crate::classifier::FeatureClassifier;
use crate::frechet::{frechet_distance, FeatureStatistics, MeanPrecision, SqrtmOffset, StatisticsError};
use crate::precision_recall::{precision_recall, PrecisionRecall};

/// Images scored per forward.
const BATCH: usize = 500;

/// Classifier features and predictions of a set of images.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassifierFeatures {
    /// `[n, dim]` row-major.
    pub features: Vec<f32>,
    /// Feature width.
    pub dim: usize,
    /// The predicted class of each image.
    pub predictions: Vec<usize>,
}

impl ClassifierFeatures {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.predictions.len()
    }

    /// Whether there is no image.
    pub fn is_empty(&self) -> bool {
        self.predictions.is_empty()
    }

    /// Features and predictions of `images` (`[n, C, H, W]` in `[-1, 1]`, C order).
    pub fn of_images<B: Backend>(model: &FeatureClassifier<B>, images: &[f32], shape: [usize; 3]) -> Self {
        let device = model.conv1a.weight.val().device();
        let per = shape.iter().product::<usize>();
        let mut features = Vec::new();
        let mut predictions = Vec::new();
        let mut dim = 0;
        for chunk in images.chunks(BATCH * per) {
            let n = chunk.len() / per;
            let x =
                Tensor::<B, 4>::from_data(TensorData::new(chunk.to_vec(), [n, shape[0], shape[1], shape[2]]), &device);
            let f = model.features(x); // [n, dim]
            dim = f.dims()[1];
            let p: Vec<i64> = model.logits_from_features(f.clone()).argmax(1).into_data().iter::<i64>().collect();
            predictions.extend(p.into_iter().map(|c| c as usize));
            features.extend(f.into_data().iter::<f32>());
        }
        Self { features, dim, predictions }
    }

    /// Features of the first `limit` examples of `dataset` (all when
    /// `None`), with the dataset's labels.
    ///
    /// # Errors
    /// If an example cannot be loaded.
    pub fn of_dataset<B: Backend>(
        model: &FeatureClassifier<B>,
        dataset: &dyn Dataset,
        limit: Option<usize>,
    ) -> Result<(Self, Vec<usize>), DataError> {
        let shape = dataset.shape();
        let n = limit.map_or(dataset.len(), |l| l.min(dataset.len()));
        let mut images = Vec::with_capacity(n * shape.numel());
        let mut labels = Vec::with_capacity(n);
        for i in 0..n {
            let example = dataset.get(i, Augment::default())?;
            images.extend(example.image);
            labels.push(example.label);
        }
        Ok((Self::of_images(model, &images, [shape.channels, shape.height, shape.width]), labels))
    }

    /// Mean and covariance (float64, as pytorch-fid).
    ///
    /// # Errors
    /// With fewer than two images.
    pub fn statistics(&self) -> Result<FeatureStatistics, StatisticsError> {
        FeatureStatistics::from_features(&self.features, self.dim, MeanPrecision::F64)
    }
}

/// The scores of generated images against a reference set.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct SampleQuality {
    /// Frechet distance between the feature distributions.
    pub frechet_distance: f64,
    /// Improved precision and recall.
    pub precision_recall: PrecisionRecall,
    /// Fraction of images the classifier assigns to their requested label.
    pub accuracy: f64,
}

/// Scores `samples` (with their requested `labels`) against `reference`.
///
/// # Errors
/// If a set has fewer than two images.
///
/// # Panics
/// If `labels` does not match the samples, or a set has no more than `k` images.
pub fn sample_quality<B: Backend>(
    samples: &ClassifierFeatures,
    labels: &[usize],
    reference: &ClassifierFeatures,
    reference_stats: &FeatureStatistics,
    k: usize,
    device: &B::Device,
) -> Result<SampleQuality, StatisticsError> {
    assert_eq!(labels.len(), samples.len(), "one requested label per sample");
    let fd = frechet_distance(&samples.statistics()?, reference_stats, SqrtmOffset::None)?;
    let pr = precision_recall::<B>(&reference.features, &samples.features, samples.dim, k, device);
    let correct = samples.predictions.iter().zip(labels).filter(|(p, l)| p == l).count();
    Ok(SampleQuality {
        frechet_distance: fd,
        precision_recall: pr,
        accuracy: correct as f64 / labels.len().max(1) as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use diffmoe_train::data::{open_dataset, DataSpec, ImageShape};

    type B = Flex;

    #[test]
    fn real_images_score_well_against_themselves_and_noise_badly() {
        let device = Default::default();
        let model = FeatureClassifier::<B>::fashion_mnist(&device);
        let shape = ImageShape { channels: 1, height: 32, width: 32 };
        let data = open_dataset(&DataSpec::Embedded, shape).unwrap();
        let (reference, _) = ClassifierFeatures::of_dataset(&model, data.as_ref(), Some(400)).unwrap();
        let stats = reference.statistics().unwrap();
        // Other real images of the same set.
        let mut images = Vec::new();
        let mut labels = Vec::new();
        for i in 400..600 {
            let e = data.get(i, Augment::default()).unwrap();
            images.extend(e.image);
            labels.push(e.label);
        }
        let real = ClassifierFeatures::of_images(&model, &images, [1, 32, 32]);
        let good = sample_quality::<B>(&real, &labels, &reference, &stats, 3, &device).unwrap();
        let noise: Vec<f32> = (0..200 * 1024).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
        let fake = ClassifierFeatures::of_images(&model, &noise, [1, 32, 32]);
        let bad = sample_quality::<B>(&fake, &labels, &reference, &stats, 3, &device).unwrap();
        assert!(good.frechet_distance < bad.frechet_distance, "{good:?} vs {bad:?}");
        assert!(good.precision_recall.precision > bad.precision_recall.precision);
        assert!(good.precision_recall.recall > 0.5, "{good:?}");
        assert!(good.accuracy > 0.8 && bad.accuracy < 0.5, "{good:?} vs {bad:?}");
    }
}
