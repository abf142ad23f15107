//! FID Inception features of a set of images, batch by batch: the 2048-d
//! pool features (FID, precision and recall) and, when the weights carry the
//! `fc` head, the class probabilities of the Inception Score.

use burn::tensor::{backend::Backend, Tensor, TensorData};

use diffmoe_train::data::{Augment, DataError, Dataset};

use crate::inception::{FidInceptionV3, POOL_FEATURES};

/// Inception outputs of a set of images.
#[derive(Debug, Clone, PartialEq)]
pub struct InceptionFeatures {
    /// `[n, 2048]` pool features.
    pub pool: Vec<f32>,
    /// `[n, 1008]` `softmax(pool W^T)`, when the network has its head.
    pub probabilities: Option<Vec<f32>>,
}

impl InceptionFeatures {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.pool.len() / POOL_FEATURES
    }

    /// Whether there is no image.
    pub fn is_empty(&self) -> bool {
        self.pool.is_empty()
    }

    /// Features of RGB images in `[0, 1]`, `[n, 3, H, W]` in C order, run
    /// `batch` at a time; `progress` is told the images done so far.
    pub fn of_images01<B: Backend>(
        model: &FidInceptionV3<B>,
        images01: &[f32],
        shape: [usize; 3],
        batch: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Self {
        let device = model.conv2d_1a_3x3.conv_weight.val().device();
        let per = shape.iter().product::<usize>();
        let mut pool = Vec::new();
        let mut probabilities: Option<Vec<f32>> = Some(Vec::new());
        let mut done = 0;
        for chunk in images01.chunks(batch.max(1) * per) {
            let n = chunk.len() / per;
            let x =
                Tensor::<B, 4>::from_data(TensorData::new(chunk.to_vec(), [n, shape[0], shape[1], shape[2]]), &device);
            let features = model.forward(x); // [n, 2048]
            match (model.class_probabilities(features.clone()), probabilities.as_mut()) {
                (Some(p), Some(all)) => all.extend(p.into_data().iter::<f32>()),
                _ => probabilities = None,
            }
            pool.extend(features.into_data().iter::<f32>());
            done += n;
            progress(done);
        }
        Self { pool, probabilities }
    }

    /// Features of the first `limit` examples of a pixel dataset (all when
    /// `None`), read at `[3, H, W]` in `[-1, 1]` and mapped to `(x + 1) / 2`,
    /// the `v / 255` of an 8-bit image file.
    ///
    /// # Errors
    /// If an example cannot be loaded.
    pub fn of_dataset<B: Backend>(
        model: &FidInceptionV3<B>,
        dataset: &dyn Dataset,
        limit: Option<usize>,
        batch: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Self, DataError> {
        let shape = dataset.shape();
        let n = limit.map_or(dataset.len(), |l| l.min(dataset.len()));
        let mut pool = Vec::new();
        let mut probabilities: Option<Vec<f32>> = Some(Vec::new());
        for start in (0..n).step_by(batch.max(1)) {
            let end = (start + batch.max(1)).min(n);
            let mut images = Vec::with_capacity((end - start) * shape.numel());
            for i in start..end {
                images.extend(dataset.get(i, Augment::default())?.image.into_iter().map(|x| (x + 1.0) / 2.0));
            }
            let part =
                Self::of_images01(model, &images, [shape.channels, shape.height, shape.width], batch, &mut |_| {});
            pool.extend(part.pool);
            match (part.probabilities, probabilities.as_mut()) {
                (Some(p), Some(all)) => all.extend(p),
                _ => probabilities = None,
            }
            progress(end);
        }
        Ok(Self { pool, probabilities })
    }
}
