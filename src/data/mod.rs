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
    /// below `classes`; an error if the sizes disagree or a label is out of
    /// range.
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
        if Some(self.x.len()) != self.y.len().checked_mul(features) {
            return Err(DataError::Invalid(format!(
                "{} inputs do not make {} samples of {features} features",
                self.x.len(),
                self.y.len()
            )));
        }
        if let Some(&bad) = self.y.iter().find(|&&l| l as usize >= classes) {
            return Err(DataError::Invalid(format!(
                "label {bad} out of range for {classes} classes"
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

    /// Samples `range` as a new dataset.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Dataset {
        Dataset {
            features: self.features,
            x: self.x[range.start * self.features..range.end * self.features].to_vec(),
            y: self.y[range].to_vec(),
            classes: self.classes,
        }
    }

    /// The first `n` samples (all if fewer).
    pub fn take(&self, n: usize) -> Dataset {
        self.slice(0..n.min(self.len()))
    }

    /// Keras's `validation_split`: the *last* `fraction` of the samples, taken
    /// before any shuffling, become the validation set.
    pub fn split_validation(&self, fraction: f32) -> Result<(Dataset, Dataset), DataError> {
        if !(0.0..1.0).contains(&fraction) {
            return Err(DataError::Invalid(format!(
                "validation_split must be in [0, 1), got {fraction}"
            )));
        }
        let cut = self.len() - self.validation_size(fraction);
        Ok((self.slice(0..cut), self.slice(cut..self.len())))
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
    /// batches, so the training loop allocates nothing per sample).
    pub fn gather(&self, indices: &[usize], x_out: &mut Vec<f32>, y_out: &mut Vec<u32>) {
        x_out.clear();
        y_out.clear();
        for &i in indices {
            x_out.extend_from_slice(&self.x[i * self.features..(i + 1) * self.features]);
            y_out.push(self.y[i]);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn shuffles_are_seeded_permutations() {
        let a = shuffled_indices(100, 7);
        assert_eq!(a, shuffled_indices(100, 7));
        assert_ne!(a, shuffled_indices(100, 8));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    }
}
