//! `passthrough` (stub: to be implemented).

use crate::error::{MergeError, Result};
use crate::methods::{GlobalStats, MergeMethod, MethodInfo, ShardClass};
use crate::params::TensorParams;
use crate::tensor::{TensorJob, TensorReader, TensorWriter};

/// Static facts about `passthrough`.
pub const INFO: MethodInfo = MethodInfo {
    name: "passthrough",
    needs_base: false,
    min_models: 1,
    exact_models: None,
    global_params: &[],
    model_params: &[],
    random: false,
    summary: "passthrough",
};

/// `passthrough` configured for one tensor.
#[derive(Debug, Clone)]
pub struct Passthrough;

impl Passthrough {
    /// Build from resolved parameters.
    #[allow(unused_variables)]
    pub fn from_params(params: &TensorParams, n_models: usize) -> Result<Self> {
        Err(MergeError::BadInputs { method: "passthrough".into(), message: "not implemented yet".into() })
    }
}

impl MergeMethod for Passthrough {
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
