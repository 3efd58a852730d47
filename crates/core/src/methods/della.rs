//! `della` (stub: to be implemented).

use crate::error::{MergeError, Result};
use crate::methods::{GlobalStats, MergeMethod, MethodInfo, ShardClass};
use crate::params::TensorParams;
use crate::tensor::{TensorJob, TensorReader, TensorWriter};

/// Static facts about `della`.
pub const INFO: MethodInfo = MethodInfo {
    name: "della",
    needs_base: false,
    min_models: 1,
    exact_models: None,
    global_params: &[],
    model_params: &[],
    random: false,
    summary: "della",
};

/// `della` configured for one tensor.
#[derive(Debug, Clone)]
pub struct Della;

impl Della {
    /// Build from resolved parameters.
    #[allow(unused_variables)]
    pub fn from_params(params: &TensorParams, n_models: usize, ties: bool) -> Result<Self> {
        Err(MergeError::BadInputs { method: "della".into(), message: "not implemented yet".into() })
    }
}

impl MergeMethod for Della {
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

/// Static facts about `della_linear`.
pub const INFO_LINEAR: MethodInfo = MethodInfo {
    name: "della_linear",
    needs_base: false,
    min_models: 1,
    exact_models: None,
    global_params: &[],
    model_params: &[],
    random: false,
    summary: "della_linear",
};
