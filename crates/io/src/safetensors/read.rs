//! [`Checkpoint`]: a validated, memory-mapped view of a safetensors checkpoint (one file or a
//! Hugging Face sharded directory).
//!
//! [`Checkpoint::open`] maps every file and validates every header and index entry up front,
//! so that a merge fails before any work rather than halfway. Reads then slice the maps.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;

use crate::checksum::sha256_hex_parts;
use crate::dtype::{decode_f32_par, find_non_finite, DType};
use crate::error::IoError;
use crate::hf_index::{self, INDEX_FILE, SINGLE_FILE};
use crate::safetensors::header;

/// One tensor's header entry, with absolute byte offsets into its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    /// Tensor name.
    pub name: String,
    /// Stored dtype.
    pub dtype: DType,
    /// Shape (row-major).
    pub shape: Vec<usize>,
    /// The file holding the tensor.
    pub file: PathBuf,
    /// Absolute byte range of the tensor's data in `file`.
    pub data_range: Range<usize>,
}

impl TensorMeta {
    /// Number of elements (product of the shape; 1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size of the data in bytes.
    pub fn byte_len(&self) -> usize {
        self.data_range.len()
    }
}

/// One safetensors file of a checkpoint.
#[derive(Debug)]
pub struct CheckpointFile {
    /// Full path.
    pub path: PathBuf,
    /// Path relative to the checkpoint root (the name the index uses).
    pub name: String,
    /// The header's `__metadata__` entries.
    pub metadata: BTreeMap<String, String>,
    header: Range<usize>,
    map: Mmap,
    file: File,
}

impl CheckpointFile {
    /// The header JSON bytes (after the 8-byte length prefix, padding included).
    pub fn header_bytes(&self) -> &[u8] {
        &self.map[self.header.clone()]
    }
}

/// A validated checkpoint: every header parsed and checked, every file memory-mapped.
#[derive(Debug)]
pub struct Checkpoint {
    root: PathBuf,
    index: Option<PathBuf>,
    files: Vec<CheckpointFile>,
    tensors: Vec<TensorMeta>,
    file_of: Vec<usize>,
    by_name: HashMap<String, usize>,
}

fn map_file(path: &Path) -> Result<(Mmap, File), IoError> {
    let f = File::open(path).map_err(|e| IoError::io(path, "open", e))?;
    let len = f
        .metadata()
        .map_err(|e| IoError::io(path, "stat", e))?
        .len();
    if len < header::PREFIX_LEN as u64 {
        return Err(IoError::FileTooShort {
            file: path.to_path_buf(),
            len,
        });
    }
    // SAFETY: the map is read-only; like every safetensors reader we rely on the input files
    // not being modified while the checkpoint is open.
    let map = unsafe { Mmap::map(&f) }.map_err(|e| IoError::io(path, "mmap", e))?;
    Ok((map, f))
}

fn open_file(root: &Path, name: &str) -> Result<(CheckpointFile, Vec<TensorMeta>), IoError> {
    let path = root.join(name);
    let (map, file) = map_file(&path)?;
    let parsed = header::parse(&path, &map)?;
    Ok((
        CheckpointFile {
            path,
            name: name.to_string(),
            metadata: parsed.metadata,
            header: parsed.header,
            map,
            file,
        },
        parsed.tensors,
    ))
}

/// Opens GGUF file `path` as a one-file checkpoint: its tensors, dequantized under Hugging
/// Face names, are laid out as a safetensors file in memory (see [`crate::gguf`]; the whole
/// model stays in memory while the checkpoint is open), which is then mapped and validated
/// like a file on disk. Errors name `path`.
fn open_gguf(path: &Path, name: &str) -> Result<(CheckpointFile, Vec<TensorMeta>), IoError> {
    let file = crate::gguf::safetensors_image(path)?;
    // SAFETY: the image is an anonymous file only this checkpoint holds; nothing writes it
    // after it is built.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| IoError::io(path, "mmap", e))?;
    let parsed = header::parse(path, &map)?;
    Ok((
        CheckpointFile {
            path: path.to_path_buf(),
            name: name.to_string(),
            metadata: parsed.metadata,
            header: parsed.header,
            map,
            file,
        },
        parsed.tensors,
    ))
}

thread_local! {
    /// Reusable byte buffer for positioned reads of non-f32 tensors (reused so that repeated
    /// reads do not fault in fresh pages).
    static PREAD_SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Fill `buf` from `file` at `offset`, in parallel 8 MiB pieces for large reads.
fn pread_par(file: &CheckpointFile, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
    use std::os::unix::fs::FileExt;
    const PIECE: usize = 8 << 20;
    let read = |off: u64, b: &mut [u8]| {
        file.file
            .read_exact_at(b, off)
            .map_err(|e| IoError::io(&file.path, "read", e))
    };
    if buf.len() <= PIECE {
        return read(offset, buf);
    }
    buf.par_chunks_mut(PIECE)
        .enumerate()
        .try_for_each(|(i, b)| read(offset + (i * PIECE) as u64, b))
}

impl Checkpoint {
    /// Opens and validates a checkpoint: a `.safetensors` file, or a directory holding
    /// `model.safetensors.index.json` (sharded; preferred when both exist) or `model.safetensors`.
    /// A GGUF file (recognized by its magic) is read too: dequantized into memory under
    /// Hugging Face names ([`crate::gguf`]).
    pub fn open(path: &Path) -> Result<Checkpoint, IoError> {
        let md = std::fs::metadata(path).map_err(|e| IoError::io(path, "open", e))?;
        if md.is_file() {
            let root = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if crate::gguf::is_gguf(path) {
                let (file, tensors) = open_gguf(path, &name)?;
                return Ok(Self::assemble(root, None, vec![(file, tensors)]));
            }
            let (file, tensors) = open_file(&root, &name)?;
            return Ok(Self::assemble(root, None, vec![(file, tensors)]));
        }
        let root = path.to_path_buf();
        let index = root.join(INDEX_FILE);
        if index.is_file() {
            return Self::open_sharded(root, index);
        }
        if root.join(SINGLE_FILE).is_file() {
            let (file, tensors) = open_file(&root, SINGLE_FILE)?;
            return Ok(Self::assemble(root, None, vec![(file, tensors)]));
        }
        let mut found: Vec<String> = std::fs::read_dir(&root)
            .map_err(|e| IoError::io(&root, "read directory", e))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".safetensors"))
            .collect();
        found.sort();
        Err(IoError::NoCheckpoint { dir: root, found })
    }

    fn open_sharded(root: PathBuf, index: PathBuf) -> Result<Checkpoint, IoError> {
        let bytes = std::fs::read(&index).map_err(|e| IoError::io(&index, "read", e))?;
        let entries = hf_index::parse(&index, &bytes)?;
        // Unique files, sorted by name; the first tensor naming each, for error messages.
        let mut first_tensor: BTreeMap<&str, &str> = BTreeMap::new();
        for (t, f) in &entries {
            first_tensor.entry(f.as_str()).or_insert(t.as_str());
        }
        let mut opened = Vec::with_capacity(first_tensor.len());
        for (&name, &tensor) in &first_tensor {
            let path = root.join(name);
            if !path.is_file() {
                return Err(IoError::IndexFileMissing {
                    index,
                    tensor: tensor.to_string(),
                    file: path,
                });
            }
            opened.push(open_file(&root, name)?);
        }
        let file_pos: HashMap<&str, usize> = first_tensor
            .keys()
            .enumerate()
            .map(|(i, &n)| (n, i))
            .collect();
        for (tensor, file) in &entries {
            let (f, tensors) = &opened[file_pos[file.as_str()]];
            if !tensors.iter().any(|t| &t.name == tensor) {
                return Err(IoError::IndexTensorMissing {
                    index,
                    tensor: tensor.clone(),
                    file: f.path.clone(),
                });
            }
        }
        let ckpt = Self::assemble(root, Some(index), opened);
        // Duplicates across shards.
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, t) in ckpt.tensors.iter().enumerate() {
            if let Some(&j) = seen.get(t.name.as_str()) {
                return Err(IoError::DuplicateTensor {
                    tensor: t.name.clone(),
                    first: ckpt.tensors[j].file.clone(),
                    second: t.file.clone(),
                });
            }
            seen.insert(&t.name, i);
        }
        if ckpt.tensors.len() > entries.len() {
            tracing::warn!(
                index = %ckpt.index.as_deref().unwrap_or(Path::new("")).display(),
                "{} tensors are in the shard files but not in the index; they are included",
                ckpt.tensors.len() - entries.len()
            );
        }
        Ok(ckpt)
    }

    fn assemble(
        root: PathBuf,
        index: Option<PathBuf>,
        opened: Vec<(CheckpointFile, Vec<TensorMeta>)>,
    ) -> Checkpoint {
        let mut files = Vec::with_capacity(opened.len());
        let mut tensors = Vec::new();
        let mut file_of = Vec::new();
        for (i, (f, ts)) in opened.into_iter().enumerate() {
            files.push(f);
            file_of.extend(std::iter::repeat_n(i, ts.len()));
            tensors.extend(ts);
        }
        let mut by_name = HashMap::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            by_name.entry(t.name.clone()).or_insert(i);
        }
        Checkpoint {
            root,
            index,
            files,
            tensors,
            file_of,
            by_name,
        }
    }

    /// The checkpoint directory (for a single file, its parent).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The index file, for a sharded checkpoint.
    pub fn index_path(&self) -> Option<&Path> {
        self.index.as_deref()
    }

    /// The files, sorted by name.
    pub fn files(&self) -> &[CheckpointFile] {
        &self.files
    }

    /// All tensors: files in name order, then by data offset.
    pub fn tensors(&self) -> &[TensorMeta] {
        &self.tensors
    }

    /// A tensor by name.
    pub fn get(&self, name: &str) -> Option<&TensorMeta> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    fn lookup(&self, name: &str) -> Result<(&TensorMeta, &CheckpointFile), IoError> {
        let &i = self
            .by_name
            .get(name)
            .ok_or_else(|| IoError::UnknownTensor {
                root: self.root.clone(),
                tensor: name.to_string(),
            })?;
        Ok((&self.tensors[i], &self.files[self.file_of[i]]))
    }

    /// The raw bytes of a tensor's data (little-endian, as stored).
    pub fn raw(&self, name: &str) -> Result<&[u8], IoError> {
        let (t, f) = self.lookup(name)?;
        Ok(&f.map[t.data_range.clone()])
    }
    /// The stored encoding of tensor `name` when it is F32, F16 or BF16 (what
    /// [`Checkpoint::read_raw_bytes`] reads), else `None`.
    pub fn raw_dtype(&self, name: &str) -> Result<Option<amalgam_core::raw::RawDtype>, IoError> {
        Ok(self.lookup(name)?.0.dtype.raw())
    }

    /// Reads elements `range` of tensor `name` in their stored encoding into `out`
    /// (`range.len()` times the element size), with parallel positioned reads. Returns `false`
    /// (leaving `out` alone) when the tensor is not F32, F16 or BF16.
    pub fn read_raw_bytes(
        &self,
        name: &str,
        range: Range<usize>,
        out: &mut [u8],
    ) -> Result<bool, IoError> {
        let (t, f) = self.lookup(name)?;
        let Some(dtype) = t.dtype.raw() else {
            return Ok(false);
        };
        let numel = t.numel();
        if range.start > range.end || range.end > numel || out.len() != range.len() * dtype.size() {
            return Err(IoError::RangeOutOfBounds {
                file: t.file.clone(),
                tensor: t.name.clone(),
                buffer_len: out.len() / dtype.size(),
                range,
                numel,
            });
        }
        let start = t.data_range.start + range.start * dtype.size();
        pread_par(f, start as u64, out)?;
        Ok(true)
    }

    /// Reads elements `range` of tensor `name` into `out` in their stored encoding, when the
    /// tensor is F32, F16 or BF16 (returns `false` otherwise, leaving `out` alone).
    pub fn read_raw(
        &self,
        name: &str,
        range: Range<usize>,
        out: &mut amalgam_core::raw::RawBlock,
    ) -> Result<bool, IoError> {
        let Some(dtype) = self.raw_dtype(name)? else {
            return Ok(false);
        };
        let len = range.len();
        self.read_raw_bytes(name, range, out.fill(dtype, len))
    }

    /// Reads elements `range` (flat, row-major) of a tensor into `out` as f32, converting
    /// from F32, F16, BF16 or F64. `out.len()` must equal `range.len()`.
    pub fn read_f32(
        &self,
        name: &str,
        range: Range<usize>,
        out: &mut [f32],
    ) -> Result<(), IoError> {
        let (t, f) = self.lookup(name)?;
        if !t.dtype.is_float_convertible() {
            return Err(IoError::UnsupportedDtype {
                file: t.file.clone(),
                tensor: t.name.clone(),
                dtype: t.dtype.to_string(),
                op: "reading as f32",
            });
        }
        let numel = t.numel();
        if range.start > range.end || range.end > numel || out.len() != range.len() {
            return Err(IoError::RangeOutOfBounds {
                file: t.file.clone(),
                tensor: t.name.clone(),
                range,
                buffer_len: out.len(),
                numel,
            });
        }
        let size = t.dtype.size_bytes();
        let start = t.data_range.start + range.start * size;
        // Positioned reads, not the map: touching a large map page by page costs one page
        // fault per 4 KiB (most of a merge's time on a warm cache), while pread copies in bulk.
        if t.dtype == DType::F32 && cfg!(target_endian = "little") {
            return pread_par(f, start as u64, bytemuck::cast_slice_mut(out));
        }
        PREAD_SCRATCH.with(|cell| {
            let mut scratch = cell.borrow_mut();
            let len = range.len() * size;
            if scratch.len() < len {
                scratch.resize(len, 0);
            }
            pread_par(f, start as u64, &mut scratch[..len])?;
            let ok = decode_f32_par(&t.dtype, &scratch[..len], out);
            debug_assert!(ok, "dtype checked above");
            Ok(())
        })
    }

    /// SHA-256 (hex) over every file's header JSON bytes, files in name order, concatenated
    /// (architecture.md "Statistics files": `model_header_sha256`).
    pub fn header_sha256(&self) -> String {
        sha256_hex_parts(self.files.iter().map(|f| f.header_bytes()))
    }

    /// Scans a tensor for NaN or infinity (in parallel, chunk by chunk); the error names the
    /// file, the tensor and the first non-finite element. Integer tensors always pass.
    pub fn check_finite(&self, name: &str) -> Result<(), IoError> {
        let (t, _) = self.lookup(name)?;
        match find_non_finite(&t.dtype, self.raw(name)?) {
            None => Ok(()),
            Some((index, value)) => Err(IoError::NonFinite {
                file: t.file.clone(),
                tensor: t.name.clone(),
                index,
                value,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn checkpoint_is_send_sync() {
        assert_send_sync::<Checkpoint>();
    }
}
