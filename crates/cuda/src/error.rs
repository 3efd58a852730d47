//! Errors of the GPU backend.

use cudarc::driver::DriverError;

/// Why a GPU operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No usable GPU: the driver library, NVRTC or a device is missing. The message says which
    /// and what to do.
    #[error("no usable CUDA GPU: {0}")]
    Unavailable(String),
    /// A CUDA driver call failed.
    #[error("CUDA driver error in {what}: {source}")]
    Driver {
        /// The operation.
        what: String,
        /// The driver's error.
        source: DriverError,
    },
    /// NVRTC rejected a kernel source.
    #[error("NVRTC could not compile the kernels for {arch}: {log}")]
    Compile {
        /// Target architecture.
        arch: String,
        /// The compiler's log.
        log: String,
    },
    /// cuBLAS failed.
    #[error("cuBLAS error in {what}: {message}")]
    Blas {
        /// The operation.
        what: String,
        /// The error.
        message: String,
    },
    /// NCCL failed.
    #[error("NCCL error in {what}: {message}")]
    Nccl {
        /// The operation.
        what: String,
        /// The error.
        message: String,
    },
    /// The operation's inputs do not fit what the kernels take.
    #[error("{0}")]
    Invalid(String),
    /// Input `slot` (0: the base, or the first input when there is none; then the models in
    /// order) holds a non-finite value at flat element `index`, the lowest such index.
    #[error("non-finite value in input {slot} at element {index}")]
    NonFinite {
        /// Input slot.
        slot: usize,
        /// Lowest flat index of a non-finite value.
        index: u64,
    },
    /// A merge input held a non-finite value.
    #[error(transparent)]
    Merge(#[from] amalgam_core::MergeError),
}

/// Result of the GPU backend.
pub type Result<T> = std::result::Result<T, CudaError>;

/// Attach the operation's name to a driver error.
pub(crate) trait Ctx<T> {
    /// Map a [`DriverError`] to [`CudaError::Driver`] naming `what`.
    fn ctx(self, what: &str) -> Result<T>;
}

impl<T> Ctx<T> for std::result::Result<T, DriverError> {
    fn ctx(self, what: &str) -> Result<T> {
        self.map_err(|source| CudaError::Driver {
            what: what.to_string(),
            source,
        })
    }
}
