//! safetensors checkpoints: atomic writes, and reads that check every name and
//! shape and convert F16/BF16 to f32.

use kiln_graph::{DeviceError, Tensor};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Errors of models and checkpoints.
#[derive(Debug, Error)]
pub enum ModelError {
    /// A device or tensor operation failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A checkpoint (or model config) file is malformed or does not match the
    /// model: a missing, extra or misshapen tensor, an unsupported dtype.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("I/O error on {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Input a layer cannot take, with what it expected.
    #[error("{0}")]
    Invalid(String),
}

fn bad(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory
/// (named after this process and a count, so concurrent writers never share
/// one), synced, then renamed over `path`: readers see the old file or the
/// new one, never a partial one, even if the process is killed mid-write.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    // Process id and a per-process count: neither two processes nor two
    // threads saving the same path ever write the same temporary file.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let count = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp{}-{count}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself lasts through a power cut once the directory
        // is synced (where directories can be opened to sync: unix). Best
        // effort: the new file is in place either way.
        #[cfg(unix)]
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A tensor as a file holds it: name, shape, f32 values.
pub type NamedValues = (String, Vec<usize>, Vec<f32>);

/// Saves f32 tensors `(name, shape, values)` and string metadata.
pub fn save(
    path: &Path,
    tensors: &[NamedValues],
    metadata: &HashMap<String, String>,
) -> Result<(), ModelError> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, values)| {
            let view = TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(values))
                .map_err(|e| bad(path, format!("tensor {name}: {e}")))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<_, ModelError>>()?;
    let metadata = (!metadata.is_empty()).then(|| metadata.clone());
    let bytes = safetensors::serialize(views, metadata).map_err(|e| bad(path, e.to_string()))?;
    write_atomic(path, &bytes).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Values read from a checkpoint and checked against the tensors they are
/// for, not yet copied in: a loader reads and checks everything first, so a
/// file that fails part-way leaves the model as it was.
#[derive(Default)]
pub struct StagedState {
    targets: Vec<(Tensor, Vec<f32>)>,
}

impl StagedState {
    /// Queues `values` (checked against `target`'s shape by the caller) for
    /// `target`.
    pub(crate) fn push(&mut self, target: &Tensor, values: Vec<f32>) {
        self.targets.push((target.clone(), values));
    }

    /// Copies every value into its tensor, in place, so optimizers holding
    /// the tensors see the new values.
    pub fn apply(self) -> Result<(), ModelError> {
        for (t, values) in self.targets {
            t.assign(&Tensor::from_slice(t.device(), &values, t.shape())?)?;
        }
        Ok(())
    }
}

/// A safetensors file, memory-mapped (tensors are paged in as they are read,
/// never copied whole into RAM) and validated.
pub struct Checkpoint {
    path: PathBuf,
    bytes: memmap2::Mmap,
}

impl Checkpoint {
    /// Maps and validates a safetensors file: an error (never a panic) for a
    /// directory, a pipe, a truncated or corrupt file.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let io = |source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        };
        // Checked before opening: opening a FIFO blocks until something
        // writes to it, and a device file could be endless.
        let kind = std::fs::metadata(path).map_err(io)?.file_type();
        if kind.is_dir() {
            return Err(bad(
                path,
                "is a directory; pass the .safetensors file itself (e.g. checkpoint.safetensors in it)",
            ));
        }
        if !kind.is_file() {
            return Err(bad(
                path,
                "is not a regular file (a pipe or device?); pass a .safetensors file",
            ));
        }
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let invalid = |e: String| {
            bad(
                path,
                format!("not a valid safetensors file ({e}); was it truncated?"),
            )
        };
        // An empty file cannot be mapped; a safetensors file starts with an
        // 8-byte header length anyway.
        if len < 8 {
            return Err(invalid(format!("{len} bytes")));
        }
        // SAFETY: the map is read-only and lives as long as `self`. Another
        // process truncating the file in place would make reads fault; Kiln
        // itself only ever replaces checkpoints by renaming a new file over
        // the old one, which leaves this mapping's inode intact.
        let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        SafeTensors::deserialize(&bytes).map_err(|e| invalid(e.to_string()))?;
        Ok(Self {
            path: path.to_path_buf(),
            bytes,
        })
    }

    fn parsed(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("validated in open")
    }

    /// The file this was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .parsed()
            .names()
            .into_iter()
            .map(str::to_string)
            .collect();
        names.sort();
        names
    }

    /// The header's `__metadata__` strings (empty if it has none).
    pub fn metadata(&self) -> HashMap<String, String> {
        SafeTensors::read_metadata(&self.bytes)
            .ok()
            .and_then(|(_, m)| m.metadata().clone())
            .unwrap_or_default()
    }

    /// Errors naming every missing tensor and every unexpected one (names with
    /// one of `ignore_prefixes` are not counted as unexpected).
    pub fn check_names(
        &self,
        expected: &[&str],
        ignore_prefixes: &[&str],
    ) -> Result<(), ModelError> {
        let present = self.names();
        let missing: Vec<&str> = expected
            .iter()
            .copied()
            .filter(|n| !present.iter().any(|p| p == n))
            .collect();
        let extra: Vec<&String> = present
            .iter()
            .filter(|p| !expected.contains(&p.as_str()))
            .filter(|p| !ignore_prefixes.iter().any(|pre| p.starts_with(pre)))
            .collect();
        if missing.is_empty() && extra.is_empty() {
            return Ok(());
        }
        Err(bad(
            &self.path,
            format!("does not match the model: missing {missing:?}, unexpected {extra:?}"),
        ))
    }

    /// The shape of tensor `name`, if the file has it.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.parsed().tensor(name).ok().map(|t| t.shape().to_vec())
    }

    /// Tensor `name` as f32 values, checked against `shape`.
    pub fn tensor_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let parsed = self.parsed();
        let view = parsed
            .tensor(name)
            .map_err(|_| bad(&self.path, format!("tensor {name} is missing")))?;
        if view.shape() != shape {
            return Err(bad(
                &self.path,
                format!(
                    "tensor {name} has shape {:?}, the model expects {shape:?}",
                    view.shape()
                ),
            ));
        }
        let data = view.data();
        let values = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(bad(
                    &self.path,
                    format!("tensor {name} is {other:?}; Kiln reads F32, F16 and BF16"),
                ))
            }
        };
        Ok(values)
    }

    /// Every tensor whose name starts with `prefix`, as (name without the
    /// prefix, f32 values), whatever its shape.
    pub fn tensors_with_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<f32>)>, ModelError> {
        let parsed = self.parsed();
        let mut out = Vec::new();
        for name in self.names() {
            if let Some(rest) = name.strip_prefix(prefix) {
                let shape = parsed.tensor(&name).expect("listed").shape().to_vec();
                out.push((rest.to_string(), self.tensor_f32(&name, &shape)?));
            }
        }
        Ok(out)
    }
}
