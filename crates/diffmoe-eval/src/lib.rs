//! Evaluation of generated samples: the FID Inception network of
//! pytorch-fid, the Frechet distance, the Inception Score, reference
//! statistics, precision and recall, and the Fashion-MNIST feature classifier.

mod classifier;
mod classifier_training;
mod comparison;
mod frechet;
mod inception;
mod inception_blocks;
mod inception_features;
mod inception_score;
mod inception_weights;
mod pairwise_sum;
pub mod parity;
mod precision_recall;
pub mod procedural_weights;
mod resize;
mod sample_quality;
mod sample_set;

pub use classifier::{ClassifierConfig, ClassifierError, FeatureClassifier, CLASSIFIER_CONFIG_KEY};
pub use classifier_training::{accuracy, train_classifier, ClassifierObserver, ClassifierTraining, EpochReport};
pub use comparison::{
    markdown_table, run_comparison, ComparisonError, ComparisonObserver, ComparisonResults, ComparisonRow,
    ComparisonSettings, COMPARISON_PRESETS,
};
pub use frechet::{frechet_distance, FeatureStatistics, MeanPrecision, SqrtmOffset, StatisticsError, PYTORCH_FID_EPS};
pub use inception::{
    conv_specs, diffmoe_images01, normalize_input, resize_input, FcBias, FidInceptionV3, InceptionFc, InceptionTap,
    INCEPTION_CLASSES, INCEPTION_SIZE, POOL_FEATURES,
};
pub use inception_blocks::{
    BasicConv2d, BatchNorm2d, ConvSource, ConvSpec, EBlockPool, InceptionA, InceptionB, InceptionC, InceptionD,
    InceptionE, BATCH_NORM_EPS,
};
pub use inception_features::InceptionFeatures;
pub use inception_score::{inception_score, softmax_rows, InceptionScore, ScoreArithmetic, ADM_SPLIT_SIZE};
pub use inception_weights::{
    key_layout, load_fid_inception, module_key, read_inception_weights, weights_file_key, weights_file_keys,
    InceptionWeightsError, KeyLayout, KeyPresence, WeightKey, MODULE_BLOCKS, WEIGHTS_FILE_NAME, WEIGHTS_FILE_URL,
};
pub use precision_recall::{precision_recall, PrecisionRecall, DEFAULT_K};
pub use resize::{axis_taps, bilinear_resize, AxisTaps};
pub use sample_quality::{sample_quality, ClassifierFeatures, SampleQuality};
pub use sample_set::{SampleEncoding, SampleSet, SampleSetError};
