//! Errors of the device layer. Every failure a user can cause (no adapter, a buffer
//! too large, mismatched shapes) becomes a [`DeviceError`] with a message that says
//! what to do, instead of a panic inside wgpu.

use thiserror::Error;

/// Result alias used throughout kiln-device.
pub type Result<T> = std::result::Result<T, DeviceError>;

/// Everything that can go wrong in the device layer.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// No adapter matched the request (or none exists at all).
    #[error("{0}")]
    NoAdapter(String),

    /// `KILN_DEVICE` (or a selector string) could not be parsed.
    #[error("invalid device selector {given:?}: {reason}. Expected `auto`, `gpu` or `cpu`, optionally followed by `:FILTER` (a backend such as vulkan/gl/metal/dx12, or part of the adapter name), e.g. `cpu:gl` or `gpu:nvidia`")]
    BadSelector {
        /// The text that was given.
        given: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The adapter refused to create a device.
    #[error("the adapter {adapter:?} refused to open a device: {message}")]
    RequestDevice {
        /// The adapter's name.
        adapter: String,
        /// wgpu's reason.
        message: String,
    },

    /// A buffer larger than the adapter can bind in one piece.
    #[error("a buffer of {requested} bytes ({what}) exceeds this adapter's limit of {limit} bytes per storage binding; use a smaller batch or split the tensor")]
    BufferTooLarge {
        /// What the buffer was for.
        what: String,
        /// Bytes asked for.
        requested: u64,
        /// The adapter's largest storage binding, in bytes.
        limit: u64,
    },

    /// Shapes or lengths handed to a kernel do not fit together.
    #[error("{op}: {message}")]
    Shape {
        /// The operation that refused its inputs.
        op: &'static str,
        /// What did not fit, with the shapes involved.
        message: String,
    },

    /// A read asked for a different element type than the buffer holds.
    #[error("buffer holds {actual:?} elements but {requested:?} were requested")]
    DType {
        /// What the buffer holds.
        actual: crate::DType,
        /// What the read asked for.
        requested: crate::DType,
    },

    /// A generated or hand-written shader failed validation. This is a bug in Kiln.
    #[error("shader {key:?} failed to compile (a Kiln bug, please report it): {message}")]
    Shader {
        /// The kernel's cache key.
        key: String,
        /// The validation error.
        message: String,
    },

    /// The GPU ran out of memory.
    #[error(
        "out of GPU memory while allocating {bytes} bytes; reduce the batch size or model size"
    )]
    OutOfMemory {
        /// Size of the allocation that failed.
        bytes: u64,
    },

    /// wgpu reported an error asynchronously (device lost, validation, mapping).
    #[error("GPU backend error: {0}")]
    Backend(String),
}
