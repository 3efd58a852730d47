//! `multislerp` (stub: to be implemented).

use crate::error::{MergeError, Result};
use crate::methods::{GlobalStats, MergeMethod, MethodInfo, ShardClass};
use crate::params::TensorParams;
use crate::tensor::{TensorJob, TensorReader, TensorWriter};

/// Static facts about `multislerp`.
pub const INFO: MethodInfo = MethodInfo {
    name: "multislerp",
    needs_base: false,
    min_models: 1,
    exact_models: None,
    global_params: &[],
    model_params: &[],
    random: false,
    summary: "multislerp",
};

/// `multislerp` configured for one tensor.
#[derive(Debug, Clone)]
pub struct Multislerp;

impl Multislerp {
    /// Build from resolved parameters.
    #[allow(unused_variables)]
    pub fn from_params(params: &TensorParams, n_models: usize, has_base: bool) -> Result<Self> {
        Err(MergeError::BadInputs { method: "multislerp".into(), message: "not implemented yet".into() })
    }
}

impl MergeMethod for Multislerp {
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
