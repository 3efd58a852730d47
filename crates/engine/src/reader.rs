//! A [`TensorReader`] over memory-mapped checkpoints for one planned tensor.

use crate::adapter::AdapterDelta;
use crate::finite::first_non_finite;
use crate::vocab::{is_vocab_tensor, DefaultRow, RowSource, VocabMap};
use amalgam_core::plan::{TensorPlan, TensorSource};
use amalgam_core::raw::{RawBlock, RawDtype};
use amalgam_core::tensor::{Input, TensorReader};
use amalgam_core::MergeError;
use amalgam_io::{Checkpoint, StatKind, StatsFile};
use std::ops::Range;

/// The error for a non-finite input value, naming the file, tensor and element.
fn non_finite(file: &str, tensor: &str, value: f32, index: usize) -> MergeError {
    MergeError::Read(format!(
        "{file}: tensor \"{tensor}\" holds a non-finite value ({value}) at element {index}; \
         fix the input or pass --allow-nonfinite"
    ))
}

/// Reads the inputs of one [`TensorPlan`], converting to f32 and rejecting non-finite values
/// (unless allowed) with an error naming the file and tensor.
#[derive(Debug)]
pub struct PlanReader<'a> {
    plan: &'a TensorPlan,
    checkpoints: &'a [&'a Checkpoint],
    allow_nonfinite: bool,
    vocab: Option<&'a VocabMap>,
    stats: &'a [Option<&'a StatsFile>],
    adapters: &'a [Option<&'a AdapterDelta>],
    extra: Option<&'a std::collections::BTreeMap<String, &'a Checkpoint>>,
    device_solver: Option<std::sync::Arc<dyn amalgam_core::solve::cg::DeviceSolver>>,
}

impl<'a> PlanReader<'a> {
    /// A reader for `plan`; `checkpoints[i]` is the plan's model `i`.
    pub fn new(
        plan: &'a TensorPlan,
        checkpoints: &'a [&'a Checkpoint],
        allow_nonfinite: bool,
    ) -> Self {
        Self {
            plan,
            checkpoints,
            allow_nonfinite,
            vocab: None,
            stats: &[],
            adapters: &[],
            extra: None,
            device_solver: None,
        }
    }

    /// Serve the extra checkpoints `extra` (by the path written in the config) through
    /// [`TensorReader::read_extra`]: this tensor's namesake in each.
    pub fn with_extra(
        mut self,
        extra: &'a std::collections::BTreeMap<String, &'a Checkpoint>,
    ) -> Self {
        self.extra = Some(extra);
        self
    }

    /// Solve MaTS's systems on `solver` (the accelerator's), when given.
    pub fn with_device_solver(
        mut self,
        solver: Option<std::sync::Arc<dyn amalgam_core::solve::cg::DeviceSolver>>,
    ) -> Self {
        self.device_solver = solver;
        self
    }

    /// Apply `adapters[i]` (a `model+adapter` reference's adapter) to the plan's model `i`.
    pub fn with_adapters(mut self, adapters: &'a [Option<&'a AdapterDelta>]) -> Self {
        self.adapters = adapters;
        self
    }

    /// Read statistics from `stats[i]`, the statistics file of the plan's model `i` (if any).
    pub fn with_stats(mut self, stats: &'a [Option<&'a StatsFile>]) -> Self {
        self.stats = stats;
        self
    }

    fn stats_source(
        &self,
        model: usize,
        kind: &str,
    ) -> Result<(&TensorSource, Option<&StatsFile>, StatKind), MergeError> {
        let src = self.plan.models.get(model).ok_or_else(|| {
            MergeError::Read(format!("tensor \"{}\": no model #{model}", self.plan.name))
        })?;
        let kind: StatKind = kind
            .parse()
            .map_err(|e: String| MergeError::Read(format!("statistic kind `{kind}`: {e}")))?;
        Ok((src, self.stats.get(src.model).copied().flatten(), kind))
    }

    /// The source of `input` when its stored bytes are its values: `None` when a vocabulary
    /// re-indexing or an adapter transforms them on the way.
    fn raw_source(&self, input: Input) -> Result<Option<&TensorSource>, MergeError> {
        let src = self.source(input)?;
        let has_update = self
            .adapters
            .get(src.model)
            .copied()
            .flatten()
            .is_some_and(|d| d.updates.contains_key(&src.tensor));
        Ok((self.vocab.is_none() && !has_update).then_some(src))
    }

    /// Re-index vocabulary-axis tensors through `vocab` (`tokenizer_source`).
    pub fn with_vocab(mut self, vocab: Option<&'a VocabMap>) -> Self {
        self.vocab = vocab.filter(|_| is_vocab_tensor(&self.plan.name, &self.plan.shape));
        self
    }

    fn read_row(
        &self,
        model: usize,
        tensor: &str,
        row: u32,
        cols: usize,
        out: &mut [f32],
    ) -> Result<(), MergeError> {
        let start = row as usize * cols;
        self.checkpoints[model]
            .read_f32(tensor, start..start + cols, out)
            .map_err(|e| MergeError::Read(e.to_string()))
    }

    /// Read through the vocabulary map: row by row.
    fn read_mapped(
        &self,
        vocab: &VocabMap,
        src: &TensorSource,
        range: Range<usize>,
        out: &mut [f32],
    ) -> Result<(), MergeError> {
        let cols = self.plan.shape[1].max(1);
        let rows = vocab.rows.get(&src.model).ok_or_else(|| {
            MergeError::Read(format!(
                "no vocabulary map for input {} of \"{}\"",
                src.model, self.plan.name
            ))
        })?;
        let mut buf = vec![0f32; cols];
        let mut tmp = vec![0f32; cols];
        let first_row = range.start / cols;
        let last_row = (range.end - 1) / cols;
        for r in first_row..=last_row {
            match rows.get(r).copied().unwrap_or(RowSource::Default) {
                RowSource::Own(row) => {
                    self.read_row(src.model, &src.tensor, row, cols, &mut buf)?
                }
                RowSource::Default => match vocab.defaults.get(&(r as u32)) {
                    Some(DefaultRow::Copy { model, row }) => {
                        self.read_row(*model, &src.tensor, *row, cols, &mut buf)?
                    }
                    Some(DefaultRow::Mean(list)) => {
                        let mut acc = vec![0f64; cols];
                        for (model, row) in list {
                            self.read_row(*model, &src.tensor, *row, cols, &mut tmp)?;
                            for (a, v) in acc.iter_mut().zip(&tmp) {
                                *a += *v as f64;
                            }
                        }
                        let n = list.len().max(1) as f64;
                        for (b, a) in buf.iter_mut().zip(&acc) {
                            *b = (*a / n) as f32;
                        }
                    }
                    Some(DefaultRow::Zero) | None => buf.iter_mut().for_each(|b| *b = 0.0),
                },
            }
            let row_start = r * cols;
            let lo = range.start.max(row_start);
            let hi = range.end.min(row_start + cols);
            out[lo - range.start..hi - range.start]
                .copy_from_slice(&buf[lo - row_start..hi - row_start]);
        }
        Ok(())
    }

    fn source(&self, input: Input) -> Result<&TensorSource, MergeError> {
        match input {
            Input::Base => self.plan.base.as_ref(),
            Input::Model(i) => self.plan.models.get(i),
        }
        .ok_or_else(|| {
            MergeError::Read(format!(
                "tensor \"{}\": input {input:?} does not exist in this merge",
                self.plan.name
            ))
        })
    }
}

impl TensorReader for PlanReader<'_> {
    fn device_solver(&self) -> Option<&dyn amalgam_core::solve::cg::DeviceSolver> {
        self.device_solver.as_deref()
    }

    fn stat_shape(&self, model: usize, kind: &str) -> Result<Option<Vec<usize>>, MergeError> {
        let (src, file, kind) = self.stats_source(model, kind)?;
        Ok(file
            .and_then(|f| f.shape(&src.tensor, kind))
            .map(|s| s.to_vec()))
    }

    fn read_stat(
        &self,
        model: usize,
        kind: &str,
        range: Range<usize>,
        out: &mut [f32],
    ) -> Result<(), MergeError> {
        let (src, file, kind) = self.stats_source(model, kind)?;
        let file = file.ok_or_else(|| {
            MergeError::Read(format!(
                "tensor \"{}\": model #{model} has no `statistics:` file, but `{}` needs `{}`",
                self.plan.name,
                self.plan.method,
                kind.key(&src.tensor)
            ))
        })?;
        file.read(&src.tensor, kind, range, out)
            .map_err(|e| MergeError::Read(e.to_string()))
    }

    fn read_raw(
        &self,
        input: Input,
        range: Range<usize>,
        out: &mut RawBlock,
    ) -> Result<bool, MergeError> {
        let Some(src) = self.raw_source(input)? else {
            return Ok(false);
        };
        self.checkpoints[src.model]
            .read_raw(&src.tensor, range, out)
            .map_err(|e| MergeError::Read(e.to_string()))
    }

    fn raw_dtype(&self, input: Input) -> Result<Option<RawDtype>, MergeError> {
        let Some(src) = self.raw_source(input)? else {
            return Ok(None);
        };
        self.checkpoints[src.model]
            .raw_dtype(&src.tensor)
            .map_err(|e| MergeError::Read(e.to_string()))
    }

    fn read_raw_bytes(
        &self,
        input: Input,
        range: Range<usize>,
        out: &mut [u8],
    ) -> Result<bool, MergeError> {
        let Some(src) = self.raw_source(input)? else {
            return Ok(false);
        };
        self.checkpoints[src.model]
            .read_raw_bytes(&src.tensor, range, out)
            .map_err(|e| MergeError::Read(e.to_string()))
    }

    /// The tensor's bytes in the checkpoint's memory map (no copy: a warm page cache is read
    /// in place), when they are its values.
    fn raw_view(&self, input: Input) -> Result<Option<(RawDtype, &[u8])>, MergeError> {
        let Some(src) = self.raw_source(input)? else {
            return Ok(None);
        };
        let ckpt = self.checkpoints[src.model];
        let Some(dtype) = ckpt
            .raw_dtype(&src.tensor)
            .map_err(|e| MergeError::Read(e.to_string()))?
        else {
            return Ok(None);
        };
        let bytes = ckpt
            .raw(&src.tensor)
            .map_err(|e| MergeError::Read(e.to_string()))?;
        Ok(Some((dtype, bytes)))
    }

    fn allows_nonfinite(&self) -> bool {
        self.allow_nonfinite
    }

    fn extra_shape(&self, key: &str) -> Result<Option<Vec<usize>>, MergeError> {
        Ok(self
            .extra
            .and_then(|m| m.get(key))
            .and_then(|c| c.get(&self.plan.name))
            .map(|t| t.shape.clone()))
    }

    fn read_extra(
        &self,
        key: &str,
        range: Range<usize>,
        out: &mut [f32],
    ) -> Result<(), MergeError> {
        let ckpt = self.extra.and_then(|m| m.get(key)).ok_or_else(|| {
            MergeError::Read(format!("checkpoint `{key}` was not opened for this merge"))
        })?;
        ckpt.read_f32(&self.plan.name, range, out)
            .map_err(|e| MergeError::Read(e.to_string()))
    }

    fn non_finite_error(&self, tensor: &str, input: Input, index: usize, value: f32) -> MergeError {
        let Ok(src) = self.source(input) else {
            return amalgam_core::raw::non_finite_message(tensor, input, index, value);
        };
        let file = self.checkpoints[src.model]
            .get(&src.tensor)
            .map(|m| m.file.display().to_string())
            .unwrap_or_default();
        non_finite(&file, &src.tensor, value, index)
    }

    fn read(&self, input: Input, range: Range<usize>, out: &mut [f32]) -> Result<(), MergeError> {
        let src = self.source(input)?;
        let ckpt = self.checkpoints[src.model];
        let start = range.start;
        let update = self
            .adapters
            .get(src.model)
            .copied()
            .flatten()
            .and_then(|d| d.updates.get(&src.tensor));
        match self.vocab {
            Some(_) if update.is_some() => {
                return Err(MergeError::Read(format!(
                    "tensor \"{}\": an adapter that changes a vocabulary tensor cannot be combined \
                     with `tokenizer_source`",
                    src.tensor
                )))
            }
            Some(v) if !range.is_empty() => self.read_mapped(v, src, range.clone(), out)?,
            _ => ckpt
                .read_f32(&src.tensor, range.clone(), out)
                .map_err(|e| MergeError::Read(e.to_string()))?,
        }
        if let Some(u) = update {
            let cols = amalgam_core::tensor::row_len(&self.plan.shape);
            u.apply(range, cols, out);
        }
        if !self.allow_nonfinite {
            if let Some(k) = first_non_finite(out) {
                let file = ckpt
                    .get(&src.tensor)
                    .map(|m| m.file.display().to_string())
                    .unwrap_or_default();
                return Err(non_finite(&file, &src.tensor, out[k], start + k));
            }
        }
        Ok(())
    }
}
