//! What a device backend (the GPU crate) needs to run a method on one tensor, without the
//! method's code: the resolved coefficients of the elementwise methods. A method that returns
//! a [`DevicePlan`] from [`crate::methods::MergeMethod::device_plan`] promises that running the
//! plan with the same f32 operations per element gives its result.

use crate::methods::gta::GtaOptions;

/// How one model's task vector is sparsified before the pipeline's mix.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DeviceSparsify {
    /// Untouched.
    None,
    /// TIES `magnitude` per tensor: keep the `max(1, ⌊density·n⌋)` largest `|δ|`, ties to the
    /// lowest flat index; `density ≥ 1` keeps everything.
    Magnitude {
        /// Fraction kept.
        density: f64,
    },
    /// DARE: keep with probability `density` (the Philox contract of [`crate::philox`]),
    /// kept entries times `1/density` when `inverse`.
    Dare {
        /// Keep probability.
        density: f64,
        /// Divide kept entries by the density.
        inverse: bool,
    },
}

/// A method's work on one tensor in a form a device can run.
#[derive(Debug, Clone, PartialEq)]
pub enum DevicePlan {
    /// `Σ_i x_i·w_i` over the inputs in order, divided by `divisor` when given.
    Linear {
        /// Per-input weights.
        weights: Vec<f32>,
        /// Divisor (`normalize`).
        divisor: Option<f32>,
    },
    /// The generalized task-arithmetic pipeline (`gta`).
    Gta {
        /// Shared options.
        opts: GtaOptions,
        /// Per-model sparsification.
        sparsify: Vec<DeviceSparsify>,
    },
}
