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
    /// Mean loss on the validation split; `None` without one. A value that
    /// is not finite is written as the text `"NaN"`, `"inf"` or `"-inf"`:
    /// JSON has no such numbers, and the `null` serde_json writes instead
    /// would read back as "no validation split" (and early stopping, resumed,
    /// would then watch the training loss for that epoch).
    #[serde(with = "float_or_text")]
    pub val_loss: Option<f32>,
    /// Accuracy on the validation split; `None` without one.
    #[serde(with = "float_or_text")]
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

/// An optional f32 as JSON: a number when finite, else its text.
mod float_or_text {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Value {
        Number(f32),
        Text(String),
    }

    pub fn serialize<S: Serializer>(value: &Option<f32>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) if v.is_finite() => Some(Value::Number(*v)),
            Some(v) => Some(Value::Text(v.to_string())),
            None => None,
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f32>, D::Error> {
        match Option::<Value>::deserialize(d)? {
            None => Ok(None),
            Some(Value::Number(v)) => Ok(Some(v)),
            Some(Value::Text(t)) => t
                .parse::<f32>()
                .map(Some)
                .map_err(|_| serde::de::Error::custom(format!("{t:?} is not a number"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_figures_that_are_not_finite_read_back_as_written() {
        let epoch = |val_loss| EpochStats {
            epoch: 1,
            loss: 0.5,
            accuracy: 0.75,
            val_loss,
            val_accuracy: Some(0.625),
            seconds: 1.5,
            samples_per_second: 100.0,
        };
        let history = History {
            epochs: [
                Some(f32::NAN),
                Some(f32::INFINITY),
                Some(-f32::INFINITY),
                Some(0.25),
                None,
            ]
            .into_iter()
            .map(epoch)
            .collect(),
        };
        let json = history.to_json();
        assert!(
            json.contains("\"NaN\"") && json.contains("\"-inf\""),
            "{json}"
        );
        let back: History = serde_json::from_str(&json).unwrap();
        let val = |h: &History| -> Vec<Option<String>> {
            h.epochs
                .iter()
                .map(|e| e.val_loss.map(|v| v.to_string()))
                .collect()
        };
        assert_eq!(val(&back), val(&history));
        assert_eq!(back.epochs[3], history.epochs[3]);
        assert!(serde_json::from_str::<History>(&json.replace("\"NaN\"", "\"many\"")).is_err());
    }
}
