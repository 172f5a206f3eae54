//! Datasets: loading (MNIST from the cache, Fashion-MNIST from its Debian
//! package, the IDX format, IMDB reviews), text vectorisation, normalisation,
//! validation splits, seeded shuffling and batching.

pub mod fashion_mnist;
pub mod idx;
pub mod imdb;
pub mod mnist;
pub mod text;
pub mod tokenize;

use std::path::PathBuf;
use thiserror::Error;

/// Errors loading data; each says what to do about it.
#[derive(Debug, Error)]
pub enum DataError {
    /// A dataset's files are not where Kiln looks for them.
    #[error("{dataset} not found in {dir}: run `{fetch}` to download it")]
    Missing {
        /// The dataset's name.
        dataset: &'static str,
        /// Where it was looked for.
        dir: PathBuf,
        /// The command that downloads or installs it.
        fetch: &'static str,
    },
    /// A file is there but unreadable or fails its checksum.
    #[error("{path} is corrupt ({reason}); delete it and run `{fetch}` again")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
        /// The command that fetches a good copy.
        fetch: &'static str,
    },
    /// Data or settings that do not fit together (sizes, labels, options), with
    /// what was expected.
    #[error("{0}")]
    Invalid(String),
    /// A file could not be read or written.
    #[error("I/O error on {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Model code reports data problems (a missing tokenizer, a text it cannot
/// encode) in its own error type, with the same message.
impl From<DataError> for kiln_models::ModelError {
    fn from(e: DataError) -> Self {
        kiln_models::ModelError::Invalid(e.to_string())
    }
}

/// Where Kiln keeps downloaded and converted data (and the device's tuning):
/// `$KILN_CACHE`, else `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`.
pub use kiln_device::cache_dir;

/// Samples with `features` f32 inputs each and a class label.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Dataset {
    /// Inputs per sample; at least 1.
    pub features: usize,
    /// `len() * features` values, row-major.
    pub x: Vec<f32>,
    /// Class label of each sample, each below `classes`.
    pub y: Vec<u32>,
    /// Number of classes; at least 1.
    pub classes: usize,
}

impl Dataset {
    /// `y.len()` samples of `features` inputs each (`x` row-major) with labels
    /// below `classes`; an error if the sizes disagree, a label is out of
    /// range or an input is not a finite number.
    ///
    /// ```
    /// let data = kiln::data::Dataset::new(2, vec![0.1, 0.2, 0.3, 0.4], vec![0, 1], 2)?;
    /// assert_eq!(data.len(), 2);
    /// assert!(kiln::data::Dataset::new(2, vec![0.1, 0.2], vec![3], 2).is_err());
    /// # Ok::<(), kiln::data::DataError>(())
    /// ```
    pub fn new(
        features: usize,
        x: Vec<f32>,
        y: Vec<u32>,
        classes: usize,
    ) -> Result<Self, DataError> {
        let data = Self {
            features,
            x,
            y,
            classes,
        };
        data.validate()?;
        Ok(data)
    }

    /// What [`Dataset::new`] checks, for a dataset built field by field.
    pub fn validate(&self) -> Result<(), DataError> {
        let (features, classes) = (self.features, self.classes);
        if features == 0 || classes == 0 {
            return Err(DataError::Invalid(format!(
                "a dataset needs at least one feature and one class, got {features} and {classes}"
            )));
        }
        self.check_sizes()?;
        if let Some(&bad) = self.y.iter().find(|&&l| l as usize >= classes) {
            return Err(DataError::Invalid(format!(
                "label {bad} out of range for {classes} classes"
            )));
        }
        // A NaN (a missing value in a CSV, say) would train a whole epoch
        // and then be blamed on the learning rate.
        if let Some(at) = first_non_finite(&self.x) {
            return Err(DataError::Invalid(format!(
                "sample {} has input {} at feature {}: inputs must be finite numbers \
                 (fill in or drop missing values before training)",
                at / features,
                self.x[at],
                at % features
            )));
        }
        Ok(())
    }

    /// Whether `x` holds `features` inputs for every label.
    fn check_sizes(&self) -> Result<(), DataError> {
        if Some(self.x.len()) != self.y.len().checked_mul(self.features) {
            return Err(DataError::Invalid(format!(
                "{} inputs do not make {} samples of {} features",
                self.x.len(),
                self.y.len(),
                self.features
            )));
        }
        Ok(())
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// True when there are no samples.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Samples `range` as a new dataset; an error if it reaches past the
    /// last sample.
    ///
    /// ```
    /// let data = kiln::data::Dataset::new(1, vec![0.1, 0.2, 0.3], vec![0, 1, 0], 2)?;
    /// assert_eq!(data.slice(1..3)?.x, vec![0.2, 0.3]);
    /// assert!(data.slice(2..4).is_err());
    /// # Ok::<(), kiln::data::DataError>(())
    /// ```
    pub fn slice(&self, range: std::ops::Range<usize>) -> Result<Dataset, DataError> {
        self.check_sizes()?;
        if range.start > range.end || range.end > self.len() {
            return Err(DataError::Invalid(format!(
                "samples {range:?} of a dataset of {} samples",
                self.len()
            )));
        }
        Ok(self.rows(range))
    }

    /// The first `n` samples (all if fewer).
    pub fn take(&self, n: usize) -> Dataset {
        self.rows(0..n.min(self.len()))
    }

    /// Samples `range`, which must lie within `y`. Inputs are cut to what
    /// `x` holds, so a dataset with too few (built field by field) gives one
    /// that [`Dataset::validate`] refuses rather than a panic here.
    fn rows(&self, range: std::ops::Range<usize>) -> Dataset {
        let inputs = |sample: usize| (sample * self.features).min(self.x.len());
        Dataset {
            features: self.features,
            x: self.x[inputs(range.start)..inputs(range.end)].to_vec(),
            y: self.y[range].to_vec(),
            classes: self.classes,
        }
    }

    /// Keras's `validation_split`: the *last* `fraction` of the samples, taken
    /// before any shuffling, become the validation set.
    pub fn split_validation(&self, fraction: f32) -> Result<(Dataset, Dataset), DataError> {
        self.check_sizes()?;
        if !(0.0..1.0).contains(&fraction) {
            return Err(DataError::Invalid(format!(
                "validation_split must be in [0, 1), got {fraction}"
            )));
        }
        let cut = self.len() - self.validation_size(fraction);
        Ok((self.rows(0..cut), self.rows(cut..self.len())))
    }

    /// How many samples [`Dataset::split_validation`] holds out: as Keras,
    /// all but the first `floor(len * (1 - fraction))`.
    pub fn validation_size(&self, fraction: f32) -> usize {
        // The fraction as written (0.1, not f32's 0.100000001): Keras
        // computes in f64 from the decimal, and the floor would otherwise
        // move a sample (60,000 x 0.1 held out 6,001).
        let fraction: f64 = fraction.to_string().parse().unwrap_or(f64::from(fraction));
        let train = (self.len() as f64 * (1.0 - fraction)).floor() as usize;
        self.len() - train.min(self.len())
    }

    /// Copies the samples `indices` into `x_out` / `y_out` (reused between
    /// batches, so the training loop allocates nothing per sample); an error
    /// if an index is past the last sample.
    pub fn gather(
        &self,
        indices: &[usize],
        x_out: &mut Vec<f32>,
        y_out: &mut Vec<u32>,
    ) -> Result<(), DataError> {
        x_out.clear();
        y_out.clear();
        self.check_sizes()?;
        if let Some(bad) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(DataError::Invalid(format!(
                "sample {bad} of a dataset of {} samples",
                self.len()
            )));
        }
        for &i in indices {
            x_out.extend_from_slice(&self.x[i * self.features..(i + 1) * self.features]);
            y_out.push(self.y[i]);
        }
        Ok(())
    }
}

/// A seeded permutation of `0..n` (Fisher-Yates over splitmix64), so a seed
/// reproduces the order of a run.
pub fn shuffled_indices(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = kiln_graph::SplitMix64::new(seed);
    let mut indices: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        indices.swap(i, j);
    }
    indices
}

/// The index of the first value in `x` that is not a finite number. Most
/// inputs have none, and `train_on_batch` asks at every step, so a pass
/// without an early exit answers first: an OR over the whole slice of
/// "all exponent bits set" (infinities and NaNs, nothing else) vectorises
/// with baseline SSE2 integer ops, where a search that may stop at each
/// element does not (a 32 x 784 batch: 2.3 against 18-25 us).
pub(crate) fn first_non_finite(x: &[f32]) -> Option<usize> {
    const EXPONENT: u32 = 0x7f80_0000;
    let any = x.iter().fold(0u32, |any, v| {
        any | u32::from(v.to_bits() & EXPONENT == EXPONENT)
    });
    if any != 0 {
        x.iter().position(|v| !v.is_finite())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_non_finite_finds_nans_and_infinities_only() {
        let edges = [f32::MAX, f32::MIN, f32::MIN_POSITIVE, 1e-45, -0.0, 0.0, 1.5];
        assert_eq!(first_non_finite(&edges), None);
        assert_eq!(first_non_finite(&[]), None);
        for bad in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 3, 6] {
                let mut x = edges;
                x[at] = bad;
                assert_eq!(first_non_finite(&x), Some(at), "{bad} at {at}");
            }
        }
        let mut twice = edges;
        twice[2] = f32::INFINITY;
        twice[5] = f32::NAN;
        assert_eq!(first_non_finite(&twice), Some(2));
    }

    #[test]
    fn validation_split_takes_the_tail_like_keras() {
        let d = Dataset::new(
            1,
            (0..10).map(|i| i as f32).collect(),
            (0..10).map(|i| i % 2).collect(),
            2,
        )
        .unwrap();
        let (train, val) = d.split_validation(0.2).unwrap();
        assert_eq!(train.y.len(), 8);
        assert_eq!(val.x, vec![8.0, 9.0]);
        assert!(d.split_validation(1.0).is_err());
    }

    #[test]
    fn bad_ranges_indices_and_inputs_are_errors_not_panics() {
        let d = Dataset::new(2, vec![0.5, -1.0, 2.0, 0.25, 3.0, 1.5], vec![1, 0, 1], 2).unwrap();
        assert_eq!(d.slice(1..3).unwrap().y, vec![0, 1]);
        assert_eq!(d.slice(1..3).unwrap().x, vec![2.0, 0.25, 3.0, 1.5]);
        assert!(d.slice(2..4).is_err());
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = d.slice(2..1);
        assert!(backwards.is_err());
        let (mut x, mut y) = (Vec::new(), Vec::new());
        d.gather(&[2, 0], &mut x, &mut y).unwrap();
        assert_eq!(
            (x.clone(), y.clone()),
            (vec![3.0, 1.5, 0.5, -1.0], vec![1, 1])
        );
        assert!(d.gather(&[0, 3], &mut x, &mut y).is_err());

        // Built field by field with too few inputs: refused, not a panic.
        let short = Dataset {
            x: vec![0.5; 5],
            ..d.clone()
        };
        assert!(short.split_validation(0.5).is_err());
        assert!(short.slice(0..1).is_err());
        assert!(short.gather(&[2], &mut x, &mut y).is_err());
        assert!(short.take(3).validate().is_err());

        let mut nan = d.x.clone();
        nan[3] = f32::NAN;
        let err = Dataset::new(2, nan, d.y.clone(), 2)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sample 1") && err.contains("feature 1"),
            "{err}"
        );
        let mut inf = d.x.clone();
        inf[4] = f32::INFINITY;
        assert!(Dataset::new(2, inf, d.y.clone(), 2).is_err());
    }

    #[test]
    fn shuffles_are_seeded_permutations() {
        let a = shuffled_indices(100, 7);
        assert_eq!(a, shuffled_indices(100, 7));
        assert_ne!(a, shuffled_indices(100, 8));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    }
}
