//! `linear` (stub: to be implemented).

use crate::error::{MergeError, Result};
use crate::methods::{GlobalStats, MergeMethod, MethodInfo, ShardClass};
use crate::params::TensorParams;
use crate::tensor::{TensorJob, TensorReader, TensorWriter};

/// Static facts about `linear`.
pub const INFO: MethodInfo = MethodInfo {
    name: "linear",
    needs_base: false,
    min_models: 1,
    exact_models: None,
    global_params: &[],
    model_params: &[],
    random: false,
    summary: "linear",
};

/// `linear` configured for one tensor.
#[derive(Debug, Clone)]
pub struct Linear;

impl Linear {
    /// Build from resolved parameters.
    #[allow(unused_variables)]
    pub fn from_params(params: &TensorParams, n_models: usize) -> Result<Self> {
        Err(MergeError::BadInputs { method: "linear".into(), message: "not implemented yet".into() })
    }
}

impl MergeMethod for Linear {
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
