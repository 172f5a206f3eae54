//! Fashion-MNIST from Debian's `dataset-fashion-mnist` package, which installs
//! the original gzipped IDX files (60,000 train / 10,000 test, 10 classes).

use super::mnist::{sha256_hex, to_dataset, Mnist};
use super::{idx, DataError};
use std::path::{Path, PathBuf};

const FETCH: &str = "sudo apt-get install dataset-fashion-mnist";
const FILES: [(&str, &str); 4] = [
    (
        "train-images-idx3-ubyte.gz",
        "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    ),
    (
        "train-labels-idx1-ubyte.gz",
        "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    ),
    (
        "t10k-images-idx3-ubyte.gz",
        "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    ),
    (
        "t10k-labels-idx1-ubyte.gz",
        "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
    ),
];

/// `$KILN_FASHION_MNIST`, else where the Debian package puts the files.
pub fn default_dir() -> PathBuf {
    std::env::var_os("KILN_FASHION_MNIST")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/share/datasets/fashion-mnist"))
}

/// Loads the four files from [`default_dir`], checking their SHA-256.
pub fn load() -> Result<Mnist, DataError> {
    load_from(&default_dir())
}

/// Loads the four files from `dir`, checking their SHA-256.
pub fn load_from(dir: &Path) -> Result<Mnist, DataError> {
    let mut arrays = Vec::with_capacity(4);
    for (name, sha) in FILES {
        let path = dir.join(name);
        if !path.exists() {
            return Err(DataError::Missing {
                dataset: "Fashion-MNIST",
                dir: dir.to_path_buf(),
                fetch: FETCH,
            });
        }
        let bytes = std::fs::read(&path).map_err(|source| DataError::Io {
            path: path.clone(),
            source,
        })?;
        let actual = sha256_hex(&bytes);
        if actual != sha {
            return Err(DataError::Corrupt {
                path,
                reason: format!("SHA-256 {actual}, expected {sha}"),
                fetch: FETCH,
            });
        }
        arrays.push(idx::read(&path, FETCH)?);
    }
    Ok(Mnist {
        train: to_dataset(&arrays[0], &arrays[1])?,
        test: to_dataset(&arrays[2], &arrays[3])?,
    })
}
