//! Per-epoch results of a training run, written as JSON and CSV.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What one epoch measured.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EpochStats {
    /// 1-based, counting epochs of resumed runs too.
    pub epoch: usize,
    /// Mean training loss over the epoch.
    pub loss: f32,
    /// Fraction of the epoch's training samples classified right.
    pub accuracy: f32,
    /// Mean loss on the validation split; `None` without one.
    pub val_loss: Option<f32>,
    /// Accuracy on the validation split; `None` without one.
    pub val_accuracy: Option<f32>,
    /// Wall-clock time of the epoch's training, validation excluded.
    pub seconds: f64,
    /// Training samples per second.
    pub samples_per_second: f64,
}

/// The epochs of a `fit` call, in order.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct History {
    /// One entry per completed epoch.
    pub epochs: Vec<EpochStats>,
}

impl History {
    /// The latest epoch, if any.
    pub fn last(&self) -> Option<&EpochStats> {
        self.epochs.last()
    }

    /// The history as pretty-printed JSON (`{"epochs": [...]}`).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("plain numbers serialise")
    }

    /// The history as CSV, one header line then one line per epoch; missing
    /// validation values are empty cells.
    pub fn to_csv(&self) -> String {
        let opt = |v: Option<f32>| v.map(|v| v.to_string()).unwrap_or_default();
        let mut out =
            String::from("epoch,loss,accuracy,val_loss,val_accuracy,seconds,samples_per_second\n");
        for e in &self.epochs {
            out += &format!(
                "{},{},{},{},{},{:.3},{:.1}\n",
                e.epoch,
                e.loss,
                e.accuracy,
                opt(e.val_loss),
                opt(e.val_accuracy),
                e.seconds,
                e.samples_per_second
            );
        }
        out
    }

    /// Writes the history beside a run's checkpoint, named after it
    /// (`runs/x/checkpoint.safetensors` gets `runs/x/checkpoint.history.json`
    /// and `.history.csv`), each file atomically: runs that share a directory
    /// keep their own.
    pub fn save_beside(&self, checkpoint: &Path) -> std::io::Result<()> {
        let (json, csv) = Self::paths_beside(checkpoint);
        kiln_models::checkpoint::write_atomic(&json, self.to_json().as_bytes())?;
        kiln_models::checkpoint::write_atomic(&csv, self.to_csv().as_bytes())
    }

    /// Where [`History::save_beside`] writes: the JSON file, then the CSV.
    pub fn paths_beside(checkpoint: &Path) -> (PathBuf, PathBuf) {
        (
            checkpoint.with_extension("history.json"),
            checkpoint.with_extension("history.csv"),
        )
    }
}
