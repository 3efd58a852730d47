//! Merging tensors on a device (a GPU): the interface the engine calls and a backend (the
//! `amalgam-cuda` crate) implements. The engine asks a method for its
//! [`amalgam_core::methods::device::DevicePlan`]; when it has one and a device is configured,
//! the device merges the tensor, else the CPU does.

use crate::error::EngineError;
use crate::run::TensorOut;
use amalgam_core::methods::device::DevicePlan;
use amalgam_core::tensor::{TensorJob, TensorReader};

/// A tensor's inputs already loaded on a device by [`Accelerator::preload`] (opaque to the
/// engine).
pub struct Preloaded(pub Box<dyn std::any::Any + Send>);

/// A device that runs [`DevicePlan`]s.
pub trait Accelerator: Send + Sync {
    /// The device, for messages (e.g. `cuda:0 NVIDIA H200`).
    fn describe(&self) -> String;

    /// Load `job`'s inputs onto the device ahead of [`Accelerator::merge`]. The engine calls it
    /// on a helper thread for the next tensor while the current one merges, so that reading
    /// inputs overlaps the device's work and the writes. `None`: nothing loaded (the device
    /// declines the tensor, or loads inputs only in `merge`).
    fn preload(
        &self,
        plan: &DevicePlan,
        job: &TensorJob,
        reader: &dyn TensorReader,
    ) -> Result<Option<Preloaded>, EngineError> {
        let _ = (plan, job, reader);
        Ok(None)
    }

    /// Merge `job`'s tensor as `plan` says: read the inputs through `reader` (unless
    /// `preloaded` holds them), write the whole output to `writer` (whose tensor is begun).
    /// `Ok(false)`, having written nothing, when the device cannot take this tensor (e.g. too
    /// large for its memory): the CPU merges it.
    fn merge(
        &self,
        plan: &DevicePlan,
        job: &TensorJob,
        reader: &dyn TensorReader,
        writer: &mut dyn TensorOut,
        preloaded: Option<Preloaded>,
    ) -> Result<bool, EngineError>;
}

/// Where tensors are merged.
#[derive(Clone, Default)]
pub enum Device {
    /// On the CPU (rayon).
    #[default]
    Cpu,
    /// On an accelerator, for the methods that have a device plan; the CPU does the rest.
    Accelerator(std::sync::Arc<dyn Accelerator>),
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Accelerator(a) => write!(f, "{}", a.describe()),
        }
    }
}
