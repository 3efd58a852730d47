//! Writing a checkpoint: [`OutputLayout`] decides which tensors go to which output file, and
//! [`CheckpointWriter`] streams tensor data into them.
//!
//! Every header is known before any data is written (names, dtypes and shapes come from the
//! layout), so each file is written front to back in one pass through an 8 MiB buffer and no
//! tensor is ever held whole in memory. Files are written under temporary names
//! (`.NAME.partial`) and renamed only by [`CheckpointWriter::finish`], after every tensor is
//! complete and fsynced; the index is written last. Dropping an unfinished writer removes its
//! temporary files; a killed process leaves only temporary names behind.
//!
//! Naming follows mergekit (`mergekit/io/tensor_writer.py`): one file is `model.safetensors`
//! with no index; several are `model-00001-of-0000N.safetensors` plus
//! `model.safetensors.index.json`.

use std::path::{Path, PathBuf};

use crate::atomic::{self, temp_path};
use crate::dtype::{encode_f32_into, DType};
use crate::error::IoError;
use crate::hf_index::{self, INDEX_FILE, SINGLE_FILE};
use crate::safetensors::header::{self, HeaderEntry};
use crate::safetensors::sink::FileSink;

/// One tensor of the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputTensor {
    /// Tensor name.
    pub name: String,
    /// Dtype written.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
}

impl OutputTensor {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size in bytes, or `None` when the dtype's size is unknown (such a tensor cannot be written).
    pub fn byte_len(&self) -> Option<u64> {
        let numel = self
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))?;
        self.dtype.byte_len(numel).map(|b| b as u64)
    }
}

/// One output file and its tensors, in write order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFile {
    /// File name inside the output directory (`model-00001-of-00003.safetensors`).
    pub name: String,
    /// Its tensors, in the order they are written.
    pub tensors: Vec<OutputTensor>,
}

impl OutputFile {
    /// Total data bytes of the file's tensors (tensors of unknown size count 0).
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.byte_len().unwrap_or(0)).sum()
    }
}

/// The assignment of output tensors to output files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLayout {
    /// The files, in order.
    pub files: Vec<OutputFile>,
}

impl OutputLayout {
    /// Splits `tensors` (kept in the given order) greedily into files of at most
    /// `max_shard_bytes` data bytes: a new file starts when the next tensor would push the
    /// current one over the limit, so a tensor bigger than the limit gets a file of its own.
    /// `max_shard_bytes == 0` means no limit. Named as mergekit names them.
    pub fn plan(tensors: Vec<OutputTensor>, max_shard_bytes: u64) -> OutputLayout {
        let mut groups: Vec<Vec<OutputTensor>> = Vec::new();
        let mut current: Vec<OutputTensor> = Vec::new();
        let mut current_bytes = 0u64;
        for t in tensors {
            let size = t.byte_len().unwrap_or(0);
            if !current.is_empty()
                && max_shard_bytes > 0
                && current_bytes.saturating_add(size) > max_shard_bytes
            {
                groups.push(std::mem::take(&mut current));
                current_bytes = 0;
            }
            current_bytes = current_bytes.saturating_add(size);
            current.push(t);
        }
        if !current.is_empty() {
            groups.push(current);
        }
        let n = groups.len();
        let files = groups
            .into_iter()
            .enumerate()
            .map(|(i, tensors)| OutputFile {
                name: if n == 1 {
                    SINGLE_FILE.to_string()
                } else {
                    format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
                },
                tensors,
            })
            .collect();
        OutputLayout { files }
    }

    /// Total data bytes of all tensors (the index's `total_size`).
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(OutputFile::data_bytes).sum()
    }

    /// Number of tensors.
    pub fn num_tensors(&self) -> usize {
        self.files.iter().map(|f| f.tensors.len()).sum()
    }

    /// Whether an index file is written (more than one file).
    pub fn needs_index(&self) -> bool {
        self.files.len() > 1
    }

    /// Checks names and sizes; called by [`CheckpointWriter::create`].
    fn validate(&self, dir: &Path) -> Result<(), IoError> {
        let invalid = |reason: String| Err(IoError::InvalidLayout { reason });
        let mut names = std::collections::HashSet::new();
        let mut files = std::collections::HashSet::new();
        for f in &self.files {
            if !f.name.ends_with(".safetensors")
                || !hf_index::is_inside(&f.name)
                || f.name.contains('/')
            {
                return invalid(format!(
                    "output file name \"{}\" must be a plain file name ending in .safetensors",
                    f.name
                ));
            }
            if !files.insert(f.name.as_str()) {
                return invalid(format!("output file \"{}\" appears twice", f.name));
            }
            if f.tensors.is_empty() {
                return invalid(format!("output file \"{}\" has no tensors", f.name));
            }
            for t in &f.tensors {
                if t.name == "__metadata__" {
                    return invalid("a tensor cannot be named \"__metadata__\"".to_string());
                }
                if !names.insert(t.name.as_str()) {
                    return invalid(format!("tensor \"{}\" appears twice in the output", t.name));
                }
                if t.byte_len().is_none() {
                    return Err(IoError::UnsupportedDtype {
                        file: dir.join(&f.name),
                        tensor: t.name.clone(),
                        dtype: t.dtype.to_string(),
                        op: "writing (its byte size is unknown)",
                    });
                }
            }
        }
        Ok(())
    }
}

/// What [`CheckpointWriter::finish`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSummary {
    /// The output directory.
    pub dir: PathBuf,
    /// The safetensors files written, in layout order.
    pub files: Vec<PathBuf>,
    /// The index file, when one was written.
    pub index: Option<PathBuf>,
    /// Total tensor data bytes.
    pub total_bytes: u64,
    /// Files of a previous checkpoint removed (with `overwrite`).
    pub removed: Vec<PathBuf>,
}

/// The tensor currently being written.
#[derive(Debug)]
struct Cursor {
    file: usize,
    tensor: usize,
    written: u64,
    expected: u64,
}

/// Streams tensors into a new checkpoint directory, in layout order.
#[derive(Debug)]
pub struct CheckpointWriter {
    dir: PathBuf,
    layout: OutputLayout,
    overwrite: bool,
    cursor: Option<Cursor>,
    out: Option<FileSink>,
    temps: Vec<PathBuf>,
    metadata: Vec<(String, String)>,
}

/// The first checkpoint file in `dir`, if any (`*.safetensors` or the index).
fn existing_checkpoint(dir: &Path) -> Result<Vec<String>, IoError> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| IoError::io(dir, "read directory", e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| !t.is_dir()).unwrap_or(false))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors") || n == INDEX_FILE)
        .collect();
    found.sort();
    Ok(found)
}

impl CheckpointWriter {
    /// Prepares to write `layout` into `out_dir` (created if missing). Refuses a directory
    /// that already holds a checkpoint (`*.safetensors` or the index) unless `overwrite`;
    /// with `overwrite` the old files are removed only by a successful [`finish`](Self::finish).
    pub fn create(out_dir: &Path, layout: OutputLayout, overwrite: bool) -> Result<Self, IoError> {
        layout.validate(out_dir)?;
        if out_dir.exists() && !out_dir.is_dir() {
            return Err(IoError::OutputNotDirectory {
                path: out_dir.to_path_buf(),
            });
        }
        if !overwrite {
            if let Some(found) = existing_checkpoint(out_dir)?.into_iter().next() {
                return Err(IoError::OutputExists {
                    dir: out_dir.to_path_buf(),
                    found,
                });
            }
        }
        std::fs::create_dir_all(out_dir)
            .map_err(|e| IoError::io(out_dir, "create directory", e))?;
        Ok(CheckpointWriter {
            dir: out_dir.to_path_buf(),
            layout,
            overwrite,
            cursor: None,
            out: None,
            temps: Vec::new(),
            metadata: Vec::new(),
        })
    }

    /// Adds `__metadata__` entries to every output file's header, after `"format": "pt"`
    /// (which always comes first; an entry named `format` is ignored). Call before the first
    /// [`begin_tensor`](Self::begin_tensor); entries keep the given order.
    pub fn with_metadata(mut self, entries: Vec<(String, String)>) -> Self {
        self.metadata = entries.into_iter().filter(|(k, _)| k != "format").collect();
        self
    }

    /// The layout being written.
    pub fn layout(&self) -> &OutputLayout {
        &self.layout
    }

    fn file_path(&self, file: usize) -> PathBuf {
        self.dir.join(&self.layout.files[file].name)
    }

    fn current(&self) -> Result<(&OutputTensor, &Cursor), IoError> {
        match &self.cursor {
            Some(c) => Ok((&self.layout.files[c.file].tensors[c.tensor], c)),
            None => Err(IoError::WriteOrder {
                file: self.dir.clone(),
                reason: "data written before begin_tensor".to_string(),
            }),
        }
    }

    fn check_complete(&self) -> Result<(), IoError> {
        if let Some(c) = &self.cursor {
            if c.written != c.expected {
                let t = &self.layout.files[c.file].tensors[c.tensor];
                return Err(IoError::TensorSize {
                    file: self.file_path(c.file),
                    tensor: t.name.clone(),
                    written: c.written,
                    expected: c.expected,
                });
            }
        }
        Ok(())
    }

    /// Flushes and fsyncs the open file, if any.
    fn close_current(&mut self) -> Result<(), IoError> {
        if let Some(out) = self.out.take() {
            out.finish()?;
        }
        Ok(())
    }

    /// Opens file `file` under its temporary name and writes its prefix and header.
    fn open_file(&mut self, file: usize) -> Result<(), IoError> {
        let f = &self.layout.files[file];
        let mut offset = 0u64;
        let entries: Vec<HeaderEntry<'_>> = f
            .tensors
            .iter()
            .map(|t| {
                let len = t.byte_len().expect("validated in create");
                let e = HeaderEntry {
                    name: &t.name,
                    dtype: &t.dtype,
                    shape: &t.shape,
                    offsets: (offset, offset + len),
                };
                offset += len;
                e
            })
            .collect();
        let metadata: Vec<(&str, &str)> = std::iter::once(("format", "pt"))
            .chain(self.metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .collect();
        let header = header::serialize(&metadata, &entries);
        let tmp = temp_path(&self.file_path(file));
        self.temps.push(tmp.clone());
        let mut out = atomic::stage(&tmp, || FileSink::create(&tmp))?;
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        self.out = Some(out);
        Ok(())
    }

    /// Starts the next tensor, which must be `name` (tensors come in layout order). The
    /// previous tensor must be complete.
    pub fn begin_tensor(&mut self, name: &str) -> Result<(), IoError> {
        self.check_complete()?;
        let (file, tensor) = match &self.cursor {
            None => (0, 0),
            Some(c) if c.tensor + 1 < self.layout.files[c.file].tensors.len() => {
                (c.file, c.tensor + 1)
            }
            Some(c) => (c.file + 1, 0),
        };
        let Some(f) = self.layout.files.get(file) else {
            return Err(IoError::WriteOrder {
                file: self.dir.clone(),
                reason: format!(
                    "tensor \"{name}\" begun after every tensor of the layout was written"
                ),
            });
        };
        let expected = &f.tensors[tensor];
        if expected.name != name {
            return Err(IoError::WriteOrder {
                file: self.file_path(file),
                reason: format!(
                    "tensor \"{name}\" begun but \"{}\" comes next in the layout; tensors must be written in layout order",
                    expected.name
                ),
            });
        }
        let expected_bytes = expected.byte_len().expect("validated in create");
        if self.cursor.as_ref().is_none_or(|c| c.file != file) {
            self.close_current()?;
            self.open_file(file)?;
        }
        self.cursor = Some(Cursor {
            file,
            tensor,
            written: 0,
            expected: expected_bytes,
        });
        Ok(())
    }

    fn reserve(&mut self, bytes: u64) -> Result<(), IoError> {
        let (t, c) = self.current()?;
        if c.written + bytes > c.expected {
            return Err(IoError::TensorSize {
                file: self.file_path(c.file),
                tensor: t.name.clone(),
                written: c.written + bytes,
                expected: c.expected,
            });
        }
        Ok(())
    }

    fn emit(&mut self, bytes: &[u8]) -> Result<(), IoError> {
        self.out
            .as_mut()
            .expect("a file is open while a tensor is begun")
            .write_all(bytes)?;
        if let Some(c) = self.cursor.as_mut() {
            c.written += bytes.len() as u64;
        }
        Ok(())
    }

    /// The stored dtype of the tensor being written, if one is begun.
    pub fn current_dtype(&self) -> Option<DType> {
        self.current().ok().map(|(t, _)| t.dtype.clone())
    }

    /// Appends f32 values to the current tensor, converted to its dtype (F32, F16, BF16, F64;
    /// rounding to nearest even).
    pub fn write_f32(&mut self, data: &[f32]) -> Result<(), IoError> {
        let (t, c) = self.current()?;
        let dtype = t.dtype.clone();
        if !dtype.is_float_convertible() {
            return Err(IoError::UnsupportedDtype {
                file: self.file_path(c.file),
                tensor: t.name.clone(),
                dtype: dtype.to_string(),
                op: "writing from f32",
            });
        }
        let size = dtype.size_bytes() as u64;
        self.reserve(data.len() as u64 * size)?;
        let out = self
            .out
            .as_mut()
            .expect("a file is open while a tensor is begun");
        let unit = size as usize;
        // Encoded straight into the sink's buffers (in parallel for large pieces).
        out.write_with(data.len() * unit, unit, |off, dst| {
            let src = &data[off / unit..(off + dst.len()) / unit];
            encode_f32_into(&dtype, src, dst);
        })?;
        if let Some(c) = self.cursor.as_mut() {
            c.written += data.len() as u64 * size;
        }
        Ok(())
    }

    /// Appends raw bytes (already in the tensor's dtype, little-endian) to the current tensor.
    pub fn write_raw(&mut self, bytes: &[u8]) -> Result<(), IoError> {
        self.reserve(bytes.len() as u64)?;
        self.emit(bytes)
    }

    /// Completes the checkpoint: checks every tensor was fully written, fsyncs, renames the
    /// files to their final names, removes an overwritten checkpoint's other files, and
    /// writes the index (when there are several files) last.
    pub fn finish(mut self) -> Result<OutputSummary, IoError> {
        self.check_complete()?;
        let total = self.layout.num_tensors();
        let done = match &self.cursor {
            None => 0,
            Some(c) => {
                self.layout.files[..c.file]
                    .iter()
                    .map(|f| f.tensors.len())
                    .sum::<usize>()
                    + c.tensor
                    + 1
            }
        };
        if done != total {
            let missing = self
                .layout
                .files
                .iter()
                .flat_map(|f| f.tensors.iter())
                .nth(done)
                .map(|t| t.name.clone())
                .unwrap_or_default();
            return Err(IoError::WriteOrder {
                file: self.dir.clone(),
                reason: format!(
                    "finish called after {done} of {total} tensors; \"{missing}\" and later tensors were never written"
                ),
            });
        }
        self.close_current()?;

        let finals: Vec<PathBuf> = (0..self.layout.files.len())
            .map(|i| self.file_path(i))
            .collect();
        for (tmp, fin) in self.temps.clone().iter().zip(&finals) {
            atomic::rename(tmp, fin)?;
            atomic::unstage(tmp);
        }
        self.temps.clear();

        let needs_index = self.layout.needs_index();
        let mut removed = Vec::new();
        if self.overwrite {
            for name in existing_checkpoint(&self.dir)? {
                let ours = self.layout.files.iter().any(|f| f.name == name)
                    || (needs_index && name == INDEX_FILE);
                if !ours {
                    let p = self.dir.join(&name);
                    std::fs::remove_file(&p).map_err(|e| IoError::io(&p, "remove", e))?;
                    removed.push(p);
                }
            }
        }

        remove_stale_partials(&self.dir);

        let total_bytes = self.layout.total_bytes();
        let index = if needs_index {
            let wm: Vec<(String, String)> = self
                .layout
                .files
                .iter()
                .flat_map(|f| f.tensors.iter().map(|t| (t.name.clone(), f.name.clone())))
                .collect();
            let path = self.dir.join(INDEX_FILE);
            atomic::write_text_atomic(&path, &hf_index::serialize(total_bytes, &wm))?;
            Some(path)
        } else {
            None
        };
        atomic::sync_dir(&self.dir);
        Ok(OutputSummary {
            dir: self.dir.clone(),
            files: finals,
            index,
            total_bytes,
            removed,
        })
    }
}

/// Removes temporary files left in `dir` by an earlier, killed writer
/// (`.model*.safetensors.partial`, `.model.safetensors.index.json.partial`). Best effort.
fn remove_stale_partials(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        let stale = name.starts_with(".model")
            && (name.ends_with(".safetensors.partial") || name.ends_with(".index.json.partial"));
        if stale {
            tracing::debug!(file = %name, "removing a stale temporary file");
            let _ = std::fs::remove_file(e.path());
        }
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        drop(self.out.take());
        for t in self.temps.drain(..) {
            let _ = std::fs::remove_file(&t);
            atomic::unstage(&t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, n: usize) -> OutputTensor {
        OutputTensor {
            name: name.into(),
            dtype: DType::F32,
            shape: vec![n],
        }
    }

    #[test]
    fn plan_greedy() {
        // sizes 40, 40, 40, 200, 8 bytes with a 100-byte limit
        let l = OutputLayout::plan(
            vec![t("a", 10), t("b", 10), t("c", 10), t("d", 50), t("e", 2)],
            100,
        );
        let names: Vec<Vec<&str>> = l
            .files
            .iter()
            .map(|f| f.tensors.iter().map(|t| t.name.as_str()).collect())
            .collect();
        assert_eq!(names, vec![vec!["a", "b"], vec!["c"], vec!["d"], vec!["e"]]);
        assert_eq!(l.files[0].name, "model-00001-of-00004.safetensors");
        assert_eq!(l.files[3].name, "model-00004-of-00004.safetensors");
        assert_eq!(l.total_bytes(), 328);
        let one = OutputLayout::plan(vec![t("a", 10), t("b", 10)], 0);
        assert_eq!(one.files.len(), 1);
        assert_eq!(one.files[0].name, "model.safetensors");
        assert!(!one.needs_index());
        // exactly at the limit stays in one file
        assert_eq!(
            OutputLayout::plan(vec![t("a", 10), t("b", 15)], 100)
                .files
                .len(),
            1
        );
    }
}
