//! `breadcrumbs` (stub: to be implemented).

use crate::error::{MergeError, Result};
use crate::methods::{GlobalStats, MergeMethod, MethodInfo, ShardClass};
use crate::params::TensorParams;
use crate::tensor::{TensorJob, TensorReader, TensorWriter};

/// Static facts about `breadcrumbs`.
pub const INFO: MethodInfo = MethodInfo {
    name: "breadcrumbs",
    needs_base: false,
    min_models: 1,
    exact_models: None,
    global_params: &[],
    model_params: &[],
    random: false,
    summary: "breadcrumbs",
};

/// `breadcrumbs` configured for one tensor.
#[derive(Debug, Clone)]
pub struct Breadcrumbs;

impl Breadcrumbs {
    /// Build from resolved parameters.
    #[allow(unused_variables)]
    pub fn from_params(params: &TensorParams, n_models: usize, ties: bool) -> Result<Self> {
        Err(MergeError::BadInputs { method: "breadcrumbs".into(), message: "not implemented yet".into() })
    }
}

impl MergeMethod for Breadcrumbs {
    fn class(&self) -> ShardClass {
        ShardClass::E
    }

    fn merge(
        &self,
        _job: &TensorJob,
        _global: &[GlobalStats],
        _reader: &dyn TensorReader,
        _writer: &mut dyn TensorWriter,
    ) -> Result<()> {
        unimplemented!()
    }
}

/// Static facts about `breadcrumbs_ties`.
pub const INFO_TIES: MethodInfo = MethodInfo {
    name: "breadcrumbs_ties",
    needs_base: false,
    min_models: 1,
    exact_models: None,
    global_params: &[],
    model_params: &[],
    random: false,
    summary: "breadcrumbs_ties",
};
