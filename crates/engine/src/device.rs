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

    /// A solver of MaTS's systems on this device (`None`, the default: the CPU
    /// solves them).
    fn device_solver(&self) -> Option<std::sync::Arc<dyn amalgam_core::solve::cg::DeviceSolver>> {
        None
    }

    /// A line on what the device has merged so far, for the merge's summary (`None`: nothing
    /// to say).
    fn report(&self) -> Option<String> {
        None
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inputs::open_and_plan;
    use crate::run::{execute, MergeOptions, NoProgress};
    use crate::synth::write_tiny_family;
    use amalgam_core::config::parse_config;
    use std::sync::{Arc, Mutex};

    /// An accelerator that preloads a tag (the tensor's name) and, when asked to merge, records
    /// which tag it was handed and declines, so the CPU merges: the engine's preload plumbing
    /// is checked against a plain CPU run.
    #[derive(Default)]
    struct Recorder {
        preloads: Mutex<Vec<String>>,
        merges: Mutex<Vec<(String, Option<String>)>>,
    }

    impl Accelerator for Recorder {
        fn describe(&self) -> String {
            "recorder".into()
        }

        fn preload(
            &self,
            _plan: &DevicePlan,
            job: &TensorJob,
            _reader: &dyn TensorReader,
        ) -> Result<Option<Preloaded>, EngineError> {
            self.preloads.lock().expect("lock").push(job.name.clone());
            Ok(Some(Preloaded(Box::new(job.name.clone()))))
        }

        fn merge(
            &self,
            _plan: &DevicePlan,
            job: &TensorJob,
            _reader: &dyn TensorReader,
            _writer: &mut dyn TensorOut,
            preloaded: Option<Preloaded>,
        ) -> Result<bool, EngineError> {
            let tag = preloaded.and_then(|p| p.0.downcast::<String>().ok().map(|s| *s));
            self.merges
                .lock()
                .expect("lock")
                .push((job.name.clone(), tag));
            Ok(false)
        }
    }

    #[test]
    fn preloads_reach_their_own_tensor_and_the_output_is_the_cpus() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_tiny_family(dir.path()).expect("models");
        let yaml = "merge_method: ties\nbase_model: base\nmodels:\n  - model: a\n    parameters: {weight: 1.0, density: 0.5}\n  - model: b\n    parameters: {weight: 0.5, density: 0.5}\n";
        let (config, _) = parse_config(yaml, true).expect("config");
        let (inputs, plan) = open_and_plan(&config, Some(dir.path())).expect("plan");
        let run = |out: &str, device: Device| {
            let opts = MergeOptions {
                out_dir: dir.path().join(out),
                memory_budget: 1 << 30,
                out_shard_size: 5_000_000_000,
                overwrite: false,
                allow_nonfinite: false,
                device,
            };
            execute(
                &config,
                &plan,
                &inputs,
                Some(dir.path()),
                &opts,
                &NoProgress,
            )
            .expect("run");
            std::fs::read(dir.path().join(out).join("model.safetensors")).expect("output")
        };
        let cpu = run("cpu", Device::Cpu);
        let rec = Arc::new(Recorder::default());
        let via = run("acc", Device::Accelerator(rec.clone()));
        assert_eq!(
            cpu, via,
            "declined tensors must be merged by the CPU, unchanged"
        );
        let merges = rec.merges.lock().expect("lock").clone();
        let merged: Vec<&str> = plan
            .tensors
            .iter()
            .filter(|t| !t.copy_raw)
            .map(|t| t.name.as_str())
            .collect();
        assert_eq!(merges.len(), merged.len());
        for ((name, tag), want) in merges.iter().zip(&merged) {
            assert_eq!(name, want, "tensors are merged in plan order");
            assert_eq!(
                tag.as_deref(),
                Some(name.as_str()),
                "each merge gets its own preload"
            );
        }
        assert_eq!(rec.preloads.lock().expect("lock").len(), merged.len());
    }
}
