//! Merging a subset of a plan's tensors into bytes: what a cluster worker does with one shard.
//!
//! [`ShardBytes`] is a [`TensorOut`] that encodes each tensor into its output dtype in memory,
//! exactly as the checkpoint writer would, so the coordinator can copy the bytes into the
//! checkpoint ([`amalgam_io::CheckpointWriter::write_raw`]) and the result is byte-identical to
//! a single-process merge.

use crate::error::EngineError;
use crate::run::TensorOut;
use amalgam_io::{encode_f32, DType, OutputLayout};
use std::collections::HashMap;

/// One tensor of a shard's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardTensor {
    /// Tensor name.
    pub name: String,
    /// Its byte length (in the output dtype).
    pub len: u64,
}

/// Tensors encoded in their output dtypes, back to back, in the order they were written.
#[derive(Debug)]
pub struct ShardBytes {
    dtypes: HashMap<String, (DType, u64)>,
    /// The encoded bytes of every tensor, concatenated.
    pub bytes: Vec<u8>,
    /// The tensors, in order.
    pub tensors: Vec<ShardTensor>,
    current: Option<(DType, u64)>,
}

impl ShardBytes {
    /// An empty buffer for tensors of `layout` (which gives each tensor's dtype and size).
    pub fn new(layout: &OutputLayout) -> Self {
        let dtypes = layout
            .files
            .iter()
            .flat_map(|f| f.tensors.iter())
            .map(|t| {
                (
                    t.name.clone(),
                    (t.dtype.clone(), t.byte_len().unwrap_or(u64::MAX)),
                )
            })
            .collect();
        Self {
            dtypes,
            bytes: Vec::new(),
            tensors: Vec::new(),
            current: None,
        }
    }

    fn check_complete(&self) -> Result<(), EngineError> {
        if let (Some((_, expected)), Some(t)) = (&self.current, self.tensors.last()) {
            if t.len != *expected {
                return Err(EngineError::Merge(amalgam_core::MergeError::Write(
                    format!(
                        "tensor \"{}\": {} of {expected} bytes written",
                        t.name, t.len
                    ),
                )));
            }
        }
        Ok(())
    }

    /// Check the last tensor is complete and return the bytes and tensor list.
    pub fn finish(self) -> Result<(Vec<u8>, Vec<ShardTensor>), EngineError> {
        self.check_complete()?;
        Ok((self.bytes, self.tensors))
    }

    fn add(&mut self, n: u64) -> Result<(), EngineError> {
        let (t, (_, expected)) = match (self.tensors.last_mut(), &self.current) {
            (Some(t), Some(c)) => (t, c),
            _ => {
                return Err(EngineError::Merge(amalgam_core::MergeError::Write(
                    "data written before a tensor was begun".into(),
                )))
            }
        };
        t.len += n;
        if t.len > *expected {
            return Err(EngineError::Merge(amalgam_core::MergeError::Write(
                format!(
                    "tensor \"{}\": more than its {expected} bytes written",
                    t.name
                ),
            )));
        }
        Ok(())
    }
}

impl TensorOut for ShardBytes {
    fn begin_tensor(&mut self, name: &str) -> Result<(), EngineError> {
        self.check_complete()?;
        let (dtype, len) = self.dtypes.get(name).cloned().ok_or_else(|| {
            EngineError::Merge(amalgam_core::MergeError::Write(format!(
                "tensor \"{name}\" is not in the output layout"
            )))
        })?;
        self.current = Some((dtype, len));
        self.tensors.push(ShardTensor {
            name: name.to_string(),
            len: 0,
        });
        Ok(())
    }

    fn raw_dtype(&self) -> Option<amalgam_core::raw::RawDtype> {
        self.current.as_ref()?.0.raw()
    }

    fn write_f32(&mut self, data: &[f32]) -> Result<(), EngineError> {
        let dtype = match &self.current {
            Some((d, _)) => d.clone(),
            None => {
                return Err(EngineError::Merge(amalgam_core::MergeError::Write(
                    "data written before a tensor was begun".into(),
                )))
            }
        };
        let before = self.bytes.len();
        if !encode_f32(&dtype, data, &mut self.bytes) {
            return Err(EngineError::Merge(amalgam_core::MergeError::Write(
                format!("cannot write dtype {dtype} from f32"),
            )));
        }
        self.add((self.bytes.len() - before) as u64)
    }

    fn write_raw(&mut self, bytes: &[u8]) -> Result<(), EngineError> {
        self.bytes.extend_from_slice(bytes);
        self.add(bytes.len() as u64)
    }
}
