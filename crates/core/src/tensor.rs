//! The view a merge method has of one output tensor.
//!
//! A method never sees files. It gets a [`TensorJob`] (name, shape, how many models, how many
//! elements it may hold per input at once) and reads its inputs through a [`TensorReader`] in
//! element ranges, writing its output through a [`TensorWriter`] in increasing, contiguous
//! ranges. Elementwise methods read one block of every input at a time; per-tensor methods make
//! several passes over blocks, gathering reductions first. Peak memory is therefore set by
//! [`TensorJob::block_elems`], never by the tensor size.

use crate::error::Result;
use crate::raw::{RawBlock, RawDtype};
use std::ops::Range;

/// Which input of a merge a read refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Input {
    /// The base (pretrained) model.
    Base,
    /// The i-th model of the merge's model list (base excluded), in config order.
    Model(usize),
}

/// One output tensor, as a method sees it.
#[derive(Debug, Clone)]
pub struct TensorJob {
    /// Output tensor name.
    pub name: String,
    /// Shape (torch order: rows first). A scalar has an empty shape.
    pub shape: Vec<usize>,
    /// Number of models (base excluded) the reader provides.
    pub n_models: usize,
    /// Whether [`Input::Base`] can be read.
    pub has_base: bool,
    /// Maximum number of elements a method should hold per input buffer at once (at least one
    /// row, rounded to whole rows by [`TensorJob::block_rows`]).
    pub block_elems: usize,
    /// Random seed of the merge (`random_seed`), for random methods.
    pub seed: u64,
}

/// Row length of a tensor of `shape`: the last dimension (1-D tensors are one row; scalars
/// one element; an empty last dimension counts 1).
pub fn row_len(shape: &[usize]) -> usize {
    shape.last().map_or(1, |&c| c.max(1))
}

/// Whether a tensor is indexed by token id along axis 0.
pub fn is_vocab_tensor(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2
        && (name.contains("embed_tokens")
            || name == "lm_head.weight"
            || name.ends_with(".wte.weight")
            || name.contains("word_embeddings"))
}

impl TensorJob {
    /// Total number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Row length: the last dimension (1-D tensors are one row; scalars one element).
    pub fn cols(&self) -> usize {
        row_len(&self.shape)
    }

    /// Number of rows (product of all but the last dimension).
    pub fn rows(&self) -> usize {
        self.numel().checked_div(self.cols()).unwrap_or(0)
    }

    /// Element ranges covering the tensor in order, each at most `block_elems` elements where
    /// possible (never less than one element).
    pub fn blocks(&self) -> impl Iterator<Item = Range<usize>> {
        let n = self.numel();
        let b = self.block_elems.max(1);
        (0..n.div_ceil(b)).map(move |i| i * b..((i + 1) * b).min(n))
    }

    /// Element ranges of whole rows, each holding as many rows as fit in `block_elems` (at least
    /// one row, even when one row exceeds it).
    pub fn row_blocks(&self) -> impl Iterator<Item = Range<usize>> {
        let cols = self.cols();
        let rows = self.rows();
        let per = (self.block_elems / cols).max(1);
        (0..rows.div_ceil(per)).map(move |i| (i * per * cols)..((i + 1) * per).min(rows) * cols)
    }
}

/// Reads input values as f32, converting from the stored dtype.
pub trait TensorReader: Sync {
    /// Fill `out` with the elements `range` (flat, row-major) of `input`.
    /// `out.len()` equals `range.len()`.
    fn read(&self, input: Input, range: Range<usize>, out: &mut [f32]) -> Result<()>;

    /// Fill `out` with the elements `range` of `input` in their stored encoding, when the input
    /// is stored as f32, f16 or bf16 and needs no transformation on the way (a vocabulary
    /// permutation or an adapter does). Returns `false` (leaving `out` alone) otherwise; the
    /// caller then uses [`TensorReader::read`]. Unlike `read`, values are not checked finite:
    /// the caller checks them unless [`TensorReader::allows_nonfinite`].
    fn read_raw(&self, input: Input, range: Range<usize>, out: &mut RawBlock) -> Result<bool> {
        let _ = (input, range, out);
        Ok(false)
    }

    /// The stored encoding of `input` when [`TensorReader::read_raw_bytes`] can read it (f32,
    /// f16 or bf16, no transformation on the way), else `None`.
    fn raw_dtype(&self, input: Input) -> Result<Option<RawDtype>> {
        let _ = input;
        Ok(None)
    }

    /// Fill `out` (`range.len()` elements of [`TensorReader::raw_dtype`]) with the elements
    /// `range` of `input` in their stored encoding, unchecked like
    /// [`TensorReader::read_raw`]; `false` (leaving `out` alone) when the input has no raw
    /// encoding. Lets a device backend read straight into its pinned transfer buffers.
    fn read_raw_bytes(&self, input: Input, range: Range<usize>, out: &mut [u8]) -> Result<bool> {
        let _ = (input, range, out);
        Ok(false)
    }

    /// The whole stored tensor of `input` lent without copying (e.g. a memory-mapped file's
    /// bytes: little-endian [`TensorReader::raw_dtype`] elements, `numel * size` bytes, any
    /// alignment), when the reader can and [`TensorReader::read_raw`] would give the same
    /// bytes; `None` otherwise (the default). Unchecked like `read_raw`.
    fn raw_view(&self, input: Input) -> Result<Option<(RawDtype, &[u8])>> {
        let _ = input;
        Ok(None)
    }

    /// Whether non-finite input values are accepted (`--allow-nonfinite`).
    fn allows_nonfinite(&self) -> bool {
        false
    }

    /// The error for a non-finite value of `input` at flat element `index` of output tensor
    /// `tensor` (readers that know the file name it).
    fn non_finite_error(
        &self,
        tensor: &str,
        input: Input,
        index: usize,
        value: f32,
    ) -> crate::MergeError {
        crate::raw::non_finite_message(tensor, input, index, value)
    }

    /// Shape of statistic `kind` of model `model` (an [`Input::Model`] index) for this tensor,
    /// or `None` when that model has no such statistic. `kind` is the key suffix of the
    /// statistics file format (architecture.md, "Statistics files"): `fisher`, `gram_in`,
    /// `kfac_out`, `fisher_block`.
    fn stat_shape(&self, model: usize, kind: &str) -> Result<Option<Vec<usize>>> {
        let _ = (model, kind);
        Ok(None)
    }

    /// Fill `out` with elements `range` of statistic `kind` of model `model`.
    fn read_stat(
        &self,
        model: usize,
        kind: &str,
        range: Range<usize>,
        out: &mut [f32],
    ) -> Result<()> {
        let _ = (range, out);
        Err(crate::MergeError::Read(format!(
            "model #{model} has no statistics (`{kind}`): give its `statistics:` file in the config"
        )))
    }

    /// Shape of this tensor's namesake in the extra checkpoint `key` (a checkpoint path a
    /// method parameter names, as written in the config: e.g. MaTS's `init`), or `None` when the
    /// reader has no such checkpoint or it lacks the tensor.
    fn extra_shape(&self, key: &str) -> Result<Option<Vec<usize>>> {
        let _ = key;
        Ok(None)
    }

    /// A device that solves MaTS's systems for this merge (`--device cuda`), or
    /// `None` (the default): the CPU solves them.
    fn device_solver(&self) -> Option<&dyn crate::solve::cg::DeviceSolver> {
        None
    }

    /// Fill `out` with elements `range` of this tensor's namesake in the extra checkpoint
    /// `key`, as f32.
    fn read_extra(&self, key: &str, range: Range<usize>, out: &mut [f32]) -> Result<()> {
        let _ = (range, out);
        Err(crate::MergeError::Read(format!(
            "checkpoint `{key}` was not opened for this merge"
        )))
    }
}

/// One diagnostic record a method emits for a tensor (e.g. a conjugate-gradient block's exit
/// code and residuals); the executor writes them as JSON lines.
pub type LogRecord = serde_json::Map<String, serde_json::Value>;

/// Receives the merged values, in increasing contiguous ranges starting at 0.
pub trait TensorWriter {
    /// Write the elements `range` of the output. Ranges arrive in order and cover the tensor.
    fn write(&mut self, range: Range<usize>, data: &[f32]) -> Result<()>;

    /// Record a diagnostic (solver logs). The default drops it.
    fn log(&mut self, record: LogRecord) {
        let _ = record;
    }
}

/// An in-memory reader: the base (optional) and each model as a flat vector. Used by tests and
/// by small tensors.
#[derive(Debug, Clone, Default)]
pub struct MemReader {
    /// Base values, if any.
    pub base: Option<Vec<f32>>,
    /// Model values, in order.
    pub models: Vec<Vec<f32>>,
    /// Statistics by (model index, kind): shape and values.
    pub stats: std::collections::BTreeMap<(usize, String), (Vec<usize>, Vec<f32>)>,
}

impl MemReader {
    fn input(&self, input: Input) -> Result<&Vec<f32>> {
        match input {
            Input::Base => self
                .base
                .as_ref()
                .ok_or_else(|| crate::MergeError::Read("no base model in this merge".into())),
            Input::Model(i) => self
                .models
                .get(i)
                .ok_or_else(|| crate::MergeError::Read(format!("no model {i}"))),
        }
    }
}

impl TensorReader for MemReader {
    fn read(&self, input: Input, range: Range<usize>, out: &mut [f32]) -> Result<()> {
        out.copy_from_slice(&self.input(input)?[range]);
        Ok(())
    }

    fn read_raw(&self, input: Input, range: Range<usize>, out: &mut RawBlock) -> Result<bool> {
        let src = &self.input(input)?[range];
        let bytes = out.fill(RawDtype::F32, src.len());
        for (b, v) in bytes.chunks_exact_mut(4).zip(src) {
            b.copy_from_slice(&v.to_le_bytes());
        }
        Ok(true)
    }

    fn stat_shape(&self, model: usize, kind: &str) -> Result<Option<Vec<usize>>> {
        Ok(self
            .stats
            .get(&(model, kind.to_string()))
            .map(|s| s.0.clone()))
    }

    fn read_stat(
        &self,
        model: usize,
        kind: &str,
        range: Range<usize>,
        out: &mut [f32],
    ) -> Result<()> {
        let (_, v) = self.stats.get(&(model, kind.to_string())).ok_or_else(|| {
            crate::MergeError::Read(format!("model #{model} has no statistic `{kind}`"))
        })?;
        out.copy_from_slice(&v[range]);
        Ok(())
    }
}

/// An in-memory writer collecting the whole output (tests, small tensors).
#[derive(Debug, Clone, Default)]
pub struct MemWriter {
    /// The values written so far.
    pub data: Vec<f32>,
    /// Diagnostics the method logged.
    pub logs: Vec<LogRecord>,
}

impl TensorWriter for MemWriter {
    fn write(&mut self, range: Range<usize>, data: &[f32]) -> Result<()> {
        if range.start != self.data.len() {
            return Err(crate::MergeError::Write(format!(
                "out-of-order write: expected offset {}, got {}",
                self.data.len(),
                range.start
            )));
        }
        self.data.extend_from_slice(data);
        Ok(())
    }

    fn log(&mut self, record: LogRecord) {
        self.logs.push(record);
    }
}

/// Run a method on in-memory inputs and return its output (tests and small tensors).
pub fn merge_in_memory(
    method: &dyn crate::methods::MergeMethod,
    job: &TensorJob,
    reader: &MemReader,
) -> Result<Vec<f32>> {
    let mut passes = Vec::new();
    for pass in 0..method.global_passes() {
        let stats = method.global_pass(pass, &passes, job, reader)?;
        passes.push(stats);
    }
    let mut w = MemWriter::default();
    method.merge(job, &passes, reader, &mut w)?;
    Ok(w.data)
}
