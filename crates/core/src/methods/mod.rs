//! Merge methods: one module per method, and the registry that builds them.
//!
//! Every method implements [`MergeMethod`]: it reads its inputs for one tensor through a
//! [`TensorReader`] in blocks of at most [`TensorJob::block_elems`] elements per input, and writes
//! the merged tensor through a [`TensorWriter`] in order. Model-global (class G) methods also
//! run [`MergeMethod::global_passes`] passes over every tensor first; the executor sums each
//! pass's [`GlobalStats`] over all tensors in plan order and hands the sums to the next pass and
//! to [`MergeMethod::merge`].

use crate::error::{MergeError, Result};
use crate::params::TensorParams;
use crate::tensor::{TensorJob, TensorReader, TensorWriter};

pub mod breadcrumbs;
pub mod dare;
pub mod della;
pub mod device;
pub mod fisher;
pub(crate) mod gram;
pub mod gta;
pub mod iso;
pub mod karcher;
pub mod linear;
pub mod mats;
pub mod model_stock;
pub mod multislerp;
pub mod nearswap;
pub mod nuslerp;
pub mod passthrough;
pub mod ram;
pub mod regmean;
pub mod sce;
pub mod slerp;
pub mod sparsify;
pub mod task_arithmetic;
pub mod ties;
pub mod tsv;

/// Partial statistics of one tensor for a model-global pass, and (summed over all tensors by
/// the executor, elementwise, in plan order) the pass's result. What the vectors hold is up to
/// the method (e.g. one magnitude histogram per model in `counts`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GlobalStats {
    /// Exact counts (histograms).
    pub counts: Vec<u64>,
    /// f64 sums.
    pub sums: Vec<f64>,
}

impl GlobalStats {
    /// Add `other` into `self`: counts elementwise (the shorter vector padded with zeros, so
    /// the sum is exact and independent of grouping), sums elementwise in f64 (taken as they
    /// are when `self` has none yet; an f64 sum depends on the order, so the executor adds
    /// tensors in plan order).
    pub fn accumulate(&mut self, other: &GlobalStats) {
        self.add_counts(&other.counts);
        self.add_sums(&other.sums);
    }

    /// Add `counts` elementwise (exact; `self.counts` grows to the longer length).
    pub fn add_counts(&mut self, counts: &[u64]) {
        if self.counts.len() < counts.len() {
            self.counts.resize(counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(counts) {
            *a += b;
        }
    }

    /// Add `sums` elementwise in f64 (taken as they are when `self` has no sums yet).
    pub fn add_sums(&mut self, sums: &[f64]) {
        if self.sums.is_empty() {
            self.sums = sums.to_vec();
            return;
        }
        for (a, b) in self.sums.iter_mut().zip(sums) {
            *a += b;
        }
    }
}

/// Sharding class of a method (methods.md §0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardClass {
    /// Elementwise: any row range.
    E,
    /// Per tensor: whole tensor or a few cross-part reductions.
    T,
    /// Model-global: needs a pre-pass over all tensors.
    G,
}

/// A merge method built for one tensor's parameters.
pub trait MergeMethod: Send + Sync {
    /// Sharding class of this configured method.
    fn class(&self) -> ShardClass;

    /// Number of f32 buffers of `block_elems` elements this method holds at once, for the
    /// executor's memory budget (inputs included).
    fn buffers(&self, n_models: usize) -> usize {
        n_models + 3
    }

    /// Bytes this method must hold at once whatever the block size (methods that need whole
    /// tensors: SVD, Gram solves, conjugate gradient), or `None` for streaming methods. The
    /// executor refuses, before any work, a plan whose largest need exceeds `--memory-budget`,
    /// and the dry run reports it.
    fn whole_tensor_bytes(&self, job: &TensorJob) -> Option<u64> {
        let _ = job;
        None
    }

    /// The method's work as a [`device::DevicePlan`] a GPU can run with the same f32
    /// operations per element, or `None` (the default) when it has none: the tensor is then
    /// merged on the CPU.
    fn device_plan(&self) -> Option<device::DevicePlan> {
        None
    }

    /// [`MergeMethod::device_plan`] for a method whose plan depends on its global passes
    /// (`global`: the summed results of every pass, as [`MergeMethod::merge`] gets them); the
    /// default is the plan without them.
    fn device_plan_global(&self, global: &[GlobalStats]) -> Option<device::DevicePlan> {
        let _ = global;
        self.device_plan()
    }

    /// Number of model-global passes before [`MergeMethod::merge`] (class G only).
    fn global_passes(&self) -> usize {
        0
    }

    /// Compute this tensor's partial statistics for global pass `pass`, given the summed results
    /// of the earlier passes.
    fn global_pass(
        &self,
        pass: usize,
        prior: &[GlobalStats],
        job: &TensorJob,
        reader: &dyn TensorReader,
    ) -> Result<GlobalStats> {
        let _ = (pass, prior, job, reader);
        Ok(GlobalStats::default())
    }

    /// Merge one tensor. `global` holds the summed results of every global pass.
    fn merge(
        &self,
        job: &TensorJob,
        global: &[GlobalStats],
        reader: &dyn TensorReader,
        writer: &mut dyn TensorWriter,
    ) -> Result<()>;
}

/// Static facts about a method, for validation before any work.
#[derive(Debug, Clone, Copy)]
pub struct MethodInfo {
    /// The config name (`merge_method`).
    pub name: &'static str,
    /// Whether `base_model` is required.
    pub needs_base: bool,
    /// Minimum number of models (base excluded).
    pub min_models: usize,
    /// Exact number of models, if fixed (SLERP: 2 counting the base).
    pub exact_models: Option<usize>,
    /// Method-wide parameter names it understands (with defaults documented in its module).
    pub global_params: &'static [&'static str],
    /// Per-model parameter names it understands.
    pub model_params: &'static [&'static str],
    /// Whether it involves randomness (`random_seed` matters).
    pub random: bool,
    /// One-line description for `amalgam methods` and `--help`.
    pub summary: &'static str,
}

/// Every registered method, in display order.
pub fn registry() -> Vec<MethodInfo> {
    vec![
        linear::INFO,
        task_arithmetic::INFO,
        ties::INFO,
        dare::INFO_LINEAR,
        dare::INFO_TIES,
        breadcrumbs::INFO,
        breadcrumbs::INFO_TIES,
        della::INFO,
        della::INFO_LINEAR,
        sce::INFO,
        slerp::INFO,
        nuslerp::INFO,
        multislerp::INFO,
        karcher::INFO,
        model_stock::INFO,
        nearswap::INFO,
        passthrough::INFO,
        ram::INFO,
        ram::INFO_PLUS,
        tsv::INFO,
        iso::INFO_C,
        iso::INFO_CTS,
        fisher::INFO,
        regmean::INFO,
        mats::INFO,
    ]
}

/// Look up a method's static facts by config name.
pub fn info(name: &str) -> Result<MethodInfo> {
    registry()
        .into_iter()
        .find(|m| m.name == name)
        .ok_or_else(|| MergeError::UnknownMethod(name.into()))
}

/// Build a method for one tensor from its resolved parameters. `n_models` excludes the base.
pub fn build(
    name: &str,
    params: &TensorParams,
    n_models: usize,
    has_base: bool,
) -> Result<Box<dyn MergeMethod>> {
    Ok(match name {
        "linear" => Box::new(linear::Linear::from_params(params, n_models)?),
        "task_arithmetic" => Box::new(task_arithmetic::TaskArithmetic::from_params(
            params, n_models,
        )?),
        "ties" => Box::new(ties::Ties::from_params(params, n_models)?),
        "dare_linear" => Box::new(dare::Dare::from_params(params, n_models, false)?),
        "dare_ties" => Box::new(dare::Dare::from_params(params, n_models, true)?),
        "breadcrumbs" => Box::new(breadcrumbs::Breadcrumbs::from_params(
            params, n_models, false,
        )?),
        "breadcrumbs_ties" => Box::new(breadcrumbs::Breadcrumbs::from_params(
            params, n_models, true,
        )?),
        "della" => Box::new(della::Della::from_params(params, n_models, true)?),
        "della_linear" => Box::new(della::Della::from_params(params, n_models, false)?),
        "sce" => Box::new(sce::Sce::from_params(params, n_models)?),
        "slerp" => Box::new(slerp::Slerp::from_params(params, n_models, has_base)?),
        "nuslerp" => Box::new(nuslerp::Nuslerp::from_params(params, n_models, has_base)?),
        "multislerp" => Box::new(multislerp::Multislerp::from_params(
            params, n_models, has_base,
        )?),
        "karcher" => Box::new(karcher::Karcher::from_params(params, n_models)?),
        "model_stock" => Box::new(model_stock::ModelStock::from_params(params, n_models)?),
        "nearswap" => Box::new(nearswap::Nearswap::from_params(params, n_models)?),
        "passthrough" => Box::new(passthrough::Passthrough::from_params(params, n_models)?),
        "ram" => Box::new(ram::Ram::from_params(params, n_models, false)?),
        "ramplus_tl" => Box::new(ram::Ram::from_params(params, n_models, true)?),
        "tsv" => Box::new(tsv::Tsv::from_params(params, n_models, has_base)?),
        "iso_c" => Box::new(iso::Iso::from_params(params, n_models, has_base, false)?),
        "iso_cts" => Box::new(iso::Iso::from_params(params, n_models, has_base, true)?),
        "fisher" => Box::new(fisher::Fisher::from_params(params, n_models)?),
        "regmean" => Box::new(regmean::RegMean::from_params(params, n_models)?),
        "mats" => Box::new(mats::Mats::from_params(params, n_models, has_base)?),
        other => return Err(MergeError::UnknownMethod(other.into())),
    })
}
