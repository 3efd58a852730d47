//! What a device backend (the GPU crate) needs to run a method on one tensor, without the
//! method's code: the resolved coefficients of the elementwise methods. A method that returns
//! a [`DevicePlan`] from [`crate::methods::MergeMethod::device_plan`] promises that running the
//! plan with the same f32 operations per element gives its result.

use crate::error::Result;
use crate::methods::gta::GtaOptions;
use crate::tensor::Input;
use std::sync::Arc;

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
    /// The whole-model TIES trim (`trim_scope: model`): keep the entries whose `|δ|` bit pattern
    /// is at least `bits` (the model-wide threshold from the global passes).
    MinMagnitude {
        /// Smallest kept `|δ|`, as f32 bits.
        bits: u32,
    },
    /// Breadcrumbs `magnitude_outliers`: keep the positions `[n_bot, n_bot + ⌊density·n⌋)` of
    /// the ascending `(|δ|, index)` order, with `n_top = ⌊γ·n⌋` and
    /// `n_bot = max(0, n − ⌊density·n⌋ − n_top)` ([`crate::methods::sparsify::magnitude_outliers`]);
    /// `density ≥ 1` keeps everything; nothing is kept when `⌊density·n⌋ = 0`, or with
    /// `legacy` when `n_top = 0`.
    Outliers {
        /// Fraction kept.
        density: f64,
        /// Fraction of the largest entries dropped.
        gamma: f64,
        /// `breadcrumbs_legacy_slice`.
        legacy: bool,
    },
    /// DELLA MagPrune ([`crate::methods::della`]): per rank group (a row of a matrix, the whole
    /// of a 1-D tensor) keep with probability `keep_prob(rank)` from `density ± epsilon`,
    /// Philox as DARE; kept entries divided by their probability when `inverse`.
    Della {
        /// Mean keep probability.
        density: f64,
        /// Half the spread of the keep probabilities.
        epsilon: f64,
        /// Divide kept entries by their keep probability (`rescale_mode: inverse_prob`).
        inverse: bool,
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

/// How the Gram-based methods group a tensor's elements into vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceGrouping {
    /// The whole flattened tensor is one vector.
    Whole,
    /// Each row along the last dimension is a vector (1-D tensors and scalars: one vector).
    Rows,
    /// Each fibre along dimension 0 is a vector.
    Axis0,
}

/// How a Gram-based plan forms its output from the per-group coefficients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GramCombine {
    /// `out = Σ_i c_i·x_i (+ base)` in f32, input order from 0, with `x_i = input_i − base`.
    Deltas,
    /// Model stock: with `t = c_0` of the group and `s = Σ_i input_i` (raw inputs, f32, input
    /// order from 0), `out = t·(s / n) + (1 − t)·base`.
    Stock,
}

/// The Gram matrices of one tensor: `G_ij = x_i·x_j` (f64) per vector (group).
#[derive(Debug, Clone, PartialEq)]
pub struct GramMatrices {
    /// Vectors per group (the number of inputs).
    pub n: usize,
    /// Number of groups.
    pub groups: usize,
    /// `groups × n × n`, row-major per group, symmetric.
    pub data: Vec<f64>,
}

impl GramMatrices {
    /// G_ij of group `g`.
    #[inline]
    pub fn get(&self, g: usize, i: usize, j: usize) -> f64 {
        self.data[(g * self.n + i) * self.n + j]
    }

    /// The n×n matrix of group `g`, row-major.
    pub fn matrix(&self, g: usize) -> &[f64] {
        &self.data[g * self.n * self.n..(g + 1) * self.n * self.n]
    }
}

/// A Gram-based method's coefficient step: per group, one f32 coefficient per input
/// (`groups × n`, group-major).
pub type CoefficientFn = Arc<dyn Fn(&GramMatrices) -> Result<Vec<f32>> + Send + Sync>;

/// A method's work on one tensor in a form a device can run.
#[derive(Clone)]
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
    /// `sce` ([`crate::methods::sce`]) on the base and every model: the variance selection
    /// (`select_topk`), the weights from the masked squared task vectors, the sign election.
    Sce {
        /// Fraction of the highest-variance entries kept (≥ 1: all, ≤ 0: none).
        select_topk: f64,
    },
    /// The Gram-based methods (`slerp`, `nuslerp`, `multislerp`, `karcher`): with
    /// `x_i = input_i − base` (f32; the input itself without a base), the Gram matrices of the
    /// x_i per vector of `grouping`, then per element the output `combine` gives from the
    /// coefficients `coefficients(G)` of the element's group. (`model_stock` uses the same
    /// Gram matrices with [`GramCombine::Stock`].)
    Gram {
        /// The vectors' inputs, in order.
        inputs: Vec<Input>,
        /// Subtracted from every input, and added back to the output.
        base: Option<Input>,
        /// How elements are grouped into vectors.
        grouping: DeviceGrouping,
        /// The method's coefficients from the Gram matrices.
        coefficients: CoefficientFn,
        /// How the output is formed from the coefficients.
        combine: GramCombine,
    },
}

impl std::fmt::Debug for DevicePlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DevicePlan::Linear { weights, divisor } => f
                .debug_struct("Linear")
                .field("weights", weights)
                .field("divisor", divisor)
                .finish(),
            DevicePlan::Sce { select_topk } => f
                .debug_struct("Sce")
                .field("select_topk", select_topk)
                .finish(),
            DevicePlan::Gta { opts, sparsify } => f
                .debug_struct("Gta")
                .field("opts", opts)
                .field("sparsify", sparsify)
                .finish(),
            DevicePlan::Gram {
                inputs,
                base,
                grouping,
                combine,
                ..
            } => f
                .debug_struct("Gram")
                .field("inputs", inputs)
                .field("base", base)
                .field("grouping", grouping)
                .field("combine", combine)
                .finish_non_exhaustive(),
        }
    }
}
