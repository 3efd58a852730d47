//! `dare_linear` (stub: to be implemented).

use crate::error::{MergeError, Result};
use crate::methods::{GlobalStats, MergeMethod, MethodInfo, ShardClass};
use crate::params::TensorParams;
use crate::tensor::{TensorJob, TensorReader, TensorWriter};

/// Static facts about `dare_linear`.
pub const INFO_LINEAR: MethodInfo = MethodInfo {
    name: "dare_linear",
    needs_base: false,
    min_models: 1,
    exact_models: None,
    global_params: &[],
    model_params: &[],
    random: false,
    summary: "dare_linear",
};

/// `dare_linear` configured for one tensor.
#[derive(Debug, Clone)]
pub struct Dare;

impl Dare {
    /// Build from resolved parameters.
    #[allow(unused_variables)]
    pub fn from_params(params: &TensorParams, n_models: usize, ties: bool) -> Result<Self> {
        Err(MergeError::BadInputs { method: "dare_linear".into(), message: "not implemented yet".into() })
    }
}

impl MergeMethod for Dare {
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

/// Static facts about `dare_ties`.
pub const INFO_TIES: MethodInfo = MethodInfo {
    name: "dare_ties",
    needs_base: false,
    min_models: 1,
    exact_models: None,
    global_params: &[],
    model_params: &[],
    random: false,
    summary: "dare_ties",
};
