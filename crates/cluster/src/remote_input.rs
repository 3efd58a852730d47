//! Streamed inputs: the worker's side of the data plane (issue 3, item 3).
//!
//! The coordinator describes every input checkpoint it opened in the job spec
//! ([`InputCheckpoint`], built by [`manifest`]): the model as the config names it, the index
//! text of a sharded checkpoint, and per safetensors file its `ReadInput` key, its canonical
//! path, its size and the sha256 of its header.
//!
//! **The rule** (worker flag `--stream-inputs`, default `auto`). For every input file:
//! - `never`: the file is read from the worker's storage, as the config names it (a path
//!   outside `--allow-root` refuses the job). Nothing is streamed.
//! - `auto`: the file is read locally when the coordinator's canonical path lies under the
//!   worker's `--allow-root` (any path when none is given), exists, has the coordinator's size
//!   and the same header sha256. Otherwise (missing, different, outside the roots: never
//!   opened then) its byte ranges are streamed from the coordinator.
//! - `always`: every file is streamed; the worker's storage is not read for checkpoints.
//!
//! **Other files the config names** ([`ExtraInput`], built by [`extra_manifest`]): adapters
//! (`model+adapter`), statistics files and MaTS's `init:` checkpoints are described by the
//! coordinator file by file (size and sha256 of the whole file), and so are each checkpoint's
//! tokenizer files ([`TOKENIZER_FILES`], for `tokenizer_source`). A worker uses its own copy
//! when the coordinator's path is under its roots and holds the same bytes; otherwise (and
//! always under `always`) it fetches the file whole into the job's folder and checks its
//! sha256. Under `never` they are read locally and stay subject to `--allow-root`. Outputs are
//! written by the coordinator only.
//!
//! **How streamed files are read** ([`StreamedInputs`]). A streamed file gets a sparse stand-in
//! of the same size in a private temporary folder (`$TMPDIR`), holding its header (fetched and
//! checked against the coordinator's sha256) and whatever tensor data has been fetched; the
//! checkpoint reader opens the stand-in exactly as it opens a local file, so the merge reads
//! the very bytes a local read gives and the output is byte-identical. Before a shard is
//! merged, [`StreamedInputs::prefetch`] fetches the data ranges of every tensor the shard
//! reads (neighbouring ranges less than [`COALESCE_GAP`] apart are fetched together), in
//! `ReadInput` calls of at most [`REQUEST_BYTES`] that the coordinator streams in
//! [`crate::CHUNK_BYTES`] chunks, so a tensor larger than the gRPC message limit arrives in
//! pieces and the merge makes no RPC per small read. Fetched ranges are kept for the rest of
//! the job (a re-leased or neighbouring shard does not fetch them again), so the folder holds
//! at most the input bytes this worker merged; it is removed when the job ends or changes.
//!
//! **Folders of killed workers.** A worker killed with `-9` cannot remove its folder. Each
//! folder therefore holds a lock file ([`LOCK_FILE`]) that its worker keeps locked (`flock`,
//! exclusive) for as long as the folder is in use; the kernel drops the lock when the process
//! dies, however it dies. Before a worker makes a folder, [`sweep_stale`] removes every
//! `amalgam-streamed-*` folder in the same temporary directory whose lock it can take: folders
//! of dead workers only. A folder whose lock file is missing (being made, or from an older
//! version) is left alone. The lock file is created under a temporary name, locked, then
//! renamed into place, so no other process can see it unlocked.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use amalgam_core::config::MergeConfig;
use amalgam_core::plan::{referenced_models, Plan, TensorPlan};
use amalgam_engine::inputs::{input_model, resolve_model_path, Inputs};
use amalgam_io::{Checkpoint, StatsFile};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{ClusterError, Result};
use crate::roots::AllowedRoots;
use crate::worker::InputClient;

/// Most bytes one `ReadInput` call asks for (the coordinator streams them in chunks); also
/// the most a worker holds in memory at once while fetching.
pub const REQUEST_BYTES: u64 = 16 << 20;

/// Ranges of one file closer than this are fetched as one (read-ahead over small gaps).
pub const COALESCE_GAP: u64 = 1 << 20;

/// Environment variable read by the embedded runner (`amalgam merge --workers N`): the
/// `--stream-inputs` mode of its worker tasks (tests and benchmarks stream with `always`).
pub const ENV_STREAM_INPUTS: &str = "AMALGAM_STREAM_INPUTS";

/// Name of the index file of a sharded checkpoint.
const INDEX_FILE: &str = "model.safetensors.index.json";

/// Where a worker reads its inputs from (`amalgam worker --stream-inputs`); see the module
/// docs for the rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StreamInputs {
    /// Local when the worker sees the same file (size and header checksum), else streamed.
    #[default]
    Auto,
    /// Every checkpoint file streamed from the coordinator.
    Always,
    /// Never streamed: inputs read locally as the config names them.
    Never,
}

impl std::str::FromStr for StreamInputs {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(StreamInputs::Auto),
            "always" => Ok(StreamInputs::Always),
            "never" => Ok(StreamInputs::Never),
            o => Err(format!("`{o}`: expected auto, always or never")),
        }
    }
}

impl std::fmt::Display for StreamInputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StreamInputs::Auto => "auto",
            StreamInputs::Always => "always",
            StreamInputs::Never => "never",
        })
    }
}

/// One safetensors file of an input checkpoint, as the coordinator sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InputFile {
    /// The `ReadInput` key (the file's canonical path on the coordinator).
    pub key: String,
    /// Path relative to the checkpoint root (the name an index uses).
    pub name: String,
    /// Canonical path on the coordinator (what a worker on the same storage finds).
    pub path: PathBuf,
    /// File size in bytes.
    pub size: u64,
    /// Header JSON length (the bytes after the 8-byte length prefix).
    pub header_len: u64,
    /// Lower-case hex sha256 of the header JSON bytes.
    pub header_sha256: String,
}

/// One input checkpoint the config references, as the coordinator opened it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InputCheckpoint {
    /// The model path as the config writes it ([`amalgam_core::config::ModelRef::path`]).
    pub model: String,
    /// Canonical checkpoint root on the coordinator (a sharded checkpoint's directory).
    pub root: PathBuf,
    /// The index file's text, for a sharded checkpoint.
    pub index: Option<String>,
    /// Its files, in name order.
    pub files: Vec<InputFile>,
    /// Its tokenizer files ([`TOKENIZER_FILES`] found in its root folder), streamed whole
    /// beside its stand-ins when the checkpoint is streamed (for `tokenizer_source`).
    #[serde(default)]
    pub aux: Vec<WholeFile>,
}

/// The tokenizer files a streamed checkpoint brings along (what `tokenizer_source` reads).
pub const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
];

/// A file streamed whole when the worker does not have it (tokenizer files, adapters,
/// statistics files, `init:` checkpoints), checked by its sha256.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WholeFile {
    /// The `ReadInput` key (the file's canonical path on the coordinator).
    pub key: String,
    /// Name relative to its folder.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Lower-case hex sha256 of the whole file.
    pub sha256: String,
}

/// A file or folder the config names besides the models' checkpoints (an adapter, a statistics
/// file, an `init:` checkpoint), as the coordinator resolved it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExtraInput {
    /// The path as the config writes it.
    pub path: String,
    /// Canonical path on the coordinator.
    pub root: PathBuf,
    /// Whether it is a folder (its top-level files are listed) or one file.
    pub is_dir: bool,
    /// Its files, in name order.
    pub files: Vec<WholeFile>,
}

/// sha256 of a whole file, read in 1 MiB pieces.
fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// A [`WholeFile`] of `path` (on the coordinator), named `name`.
fn whole_file(path: &Path, name: String) -> Result<WholeFile> {
    let canon = std::fs::canonicalize(path).map_err(|e| ClusterError::io(path, e))?;
    let size = std::fs::metadata(&canon)
        .map_err(|e| ClusterError::io(&canon, e))?
        .len();
    Ok(WholeFile {
        key: canon.to_string_lossy().into_owned(),
        name,
        size,
        sha256: sha256_file(&canon).map_err(|e| ClusterError::io(&canon, e))?,
    })
}

/// The coordinator's description of every adapter, statistics file and `init:` checkpoint the
/// config names (each folder's top-level regular files, hidden ones excepted).
pub fn extra_manifest(config: &MergeConfig, config_dir: Option<&Path>) -> Result<Vec<ExtraInput>> {
    let mut paths: Vec<String> = Vec::new();
    let mut add = |p: &str| {
        if !paths.iter().any(|q| q == p) {
            paths.push(p.to_string());
        }
    };
    for m in referenced_models(config) {
        if let Some(a) = &m.adapter {
            add(a);
        }
    }
    for p in config.statistics.values() {
        add(p);
    }
    for p in amalgam_core::methods::mats::init_checkpoint_paths(config) {
        add(&p);
    }
    paths
        .into_iter()
        .map(|path| {
            let resolved = resolve_model_path(&path, config_dir).map_err(exec_err)?;
            let root =
                std::fs::canonicalize(&resolved).map_err(|e| ClusterError::io(&resolved, e))?;
            let is_dir = root.is_dir();
            let files = if is_dir {
                let mut names: Vec<String> = std::fs::read_dir(&root)
                    .map_err(|e| ClusterError::io(&root, e))?
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .collect();
                names.sort();
                names
                    .into_iter()
                    .map(|n| whole_file(&root.join(&n), n))
                    .collect::<Result<Vec<_>>>()?
            } else {
                let name = root
                    .file_name()
                    .map_or_else(|| "file".to_string(), |n| n.to_string_lossy().into_owned());
                vec![whole_file(&root, name)?]
            };
            Ok(ExtraInput {
                path,
                root,
                is_dir,
                files,
            })
        })
        .collect()
}

/// Every `ReadInput` key of the whole files a job may stream (the coordinator serves these).
pub fn whole_file_keys(manifest: &[InputCheckpoint], extras: &[ExtraInput]) -> Vec<PathBuf> {
    manifest
        .iter()
        .flat_map(|c| c.aux.iter())
        .chain(extras.iter().flat_map(|e| e.files.iter()))
        .map(|f| PathBuf::from(&f.key))
        .collect()
}

/// Why `f` (whose coordinator path is `path`) cannot be read locally; `Ok(path)` when the
/// worker has the same bytes there.
fn local_whole(
    f: &WholeFile,
    path: &Path,
    roots: Option<&AllowedRoots>,
) -> std::result::Result<PathBuf, String> {
    let path = sized_under_roots(path, f.size, roots)?;
    let sum = sha256_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    if sum != f.sha256 {
        return Err(format!(
            "{}: another sha256 than the coordinator's",
            path.display()
        ));
    }
    Ok(path)
}

/// A name that stays inside its folder.
fn check_name(name: &str) -> Result<()> {
    let p = Path::new(name);
    if p.is_absolute()
        || p.components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(ClusterError::Protocol(format!(
            "input file name `{name}` leaves its folder"
        )));
    }
    Ok(())
}

fn exec_err(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Executor(e.to_string())
}

/// The coordinator's description of every input checkpoint (for the job spec).
pub fn manifest(inputs: &Inputs) -> Result<Vec<InputCheckpoint>> {
    let mut out: Vec<InputCheckpoint> = Vec::new();
    for (m, ck) in &inputs.checkpoints {
        if out.iter().any(|c| c.model == m.path) {
            continue; // the same model with another adapter
        }
        let index = match ck.index_path() {
            Some(p) => Some(std::fs::read_to_string(p).map_err(|e| ClusterError::io(p, e))?),
            None => None,
        };
        let files = ck
            .files()
            .iter()
            .map(|f| {
                let h = f.header_bytes();
                let size = std::fs::metadata(&f.path)
                    .map_err(|e| ClusterError::io(&f.path, e))?
                    .len();
                // Canonical: the spec (and so the plan hash a restarted coordinator compares)
                // does not depend on the coordinator's working directory.
                let path = std::fs::canonicalize(&f.path).unwrap_or_else(|_| f.path.clone());
                Ok(InputFile {
                    key: path.to_string_lossy().into_owned(),
                    name: f.name.clone(),
                    path,
                    size,
                    header_len: h.len() as u64,
                    header_sha256: hex::encode(Sha256::digest(h)),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let root = std::fs::canonicalize(ck.root()).unwrap_or_else(|_| ck.root().to_path_buf());
        let aux = TOKENIZER_FILES
            .iter()
            .filter(|n| root.join(n).is_file())
            .map(|n| whole_file(&root.join(n), n.to_string()))
            .collect::<Result<Vec<_>>>()?;
        out.push(InputCheckpoint {
            model: m.path.clone(),
            root,
            index,
            files,
            aux,
        });
    }
    Ok(out)
}

/// `path` as the worker may read it (checked against the roots) when a file of `size` bytes
/// is there; why not otherwise.
fn sized_under_roots(
    path: &Path,
    size: u64,
    roots: Option<&AllowedRoots>,
) -> std::result::Result<PathBuf, String> {
    let path = match roots {
        Some(r) => r.check(path).map_err(|e| e.to_string())?,
        None => path.to_path_buf(),
    };
    let len = std::fs::metadata(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    if len != size {
        return Err(format!(
            "{}: {len} bytes here, {size} on the coordinator",
            path.display()
        ));
    }
    Ok(path)
}

/// Why `f` cannot be read locally; `Ok(path)` (canonical) when the worker sees the same file.
fn local_copy(f: &InputFile, roots: Option<&AllowedRoots>) -> std::result::Result<PathBuf, String> {
    let path = sized_under_roots(&f.path, f.size, roots)?;
    let mut file = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if u64::from_le_bytes(prefix) != f.header_len {
        return Err(format!("{}: another header length", path.display()));
    }
    let mut header = vec![0u8; f.header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if hex::encode(Sha256::digest(&header)) != f.header_sha256 {
        return Err(format!("{}: another header checksum", path.display()));
    }
    Ok(path)
}

/// A streamed input file: its sparse stand-in and the ranges already fetched.
#[derive(Debug)]
struct RemoteFile {
    key: String,
    local: PathBuf,
    size: u64,
    file: File,
    /// Fetched byte ranges, sorted and disjoint (non-adjacent).
    fetched: Mutex<Vec<Range<u64>>>,
}

/// The parts of `want` not covered by the sorted disjoint `have`.
fn missing(have: &[Range<u64>], want: Range<u64>) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut at = want.start;
    for h in have {
        if h.end <= at {
            continue;
        }
        if h.start >= want.end {
            break;
        }
        if h.start > at {
            out.push(at..h.start);
        }
        at = at.max(h.end);
        if at >= want.end {
            break;
        }
    }
    if at < want.end {
        out.push(at..want.end);
    }
    out
}

/// Add `r` to the sorted disjoint `have`, merging what touches it.
fn insert(have: &mut Vec<Range<u64>>, r: Range<u64>) {
    if r.is_empty() {
        return;
    }
    let (mut s, mut e) = (r.start, r.end);
    let mut out = Vec::with_capacity(have.len() + 1);
    let mut placed = false;
    for h in have.drain(..) {
        if h.end < s {
            out.push(h);
        } else if h.start > e {
            if !placed {
                out.push(s..e);
                placed = true;
            }
            out.push(h);
        } else {
            s = s.min(h.start);
            e = e.max(h.end);
        }
    }
    if !placed {
        out.push(s..e);
    }
    *have = out;
}

/// Sort `ranges` and join those less than `gap` apart.
fn coalesce(mut ranges: Vec<Range<u64>>, gap: u64) -> Vec<Range<u64>> {
    ranges.retain(|r| !r.is_empty());
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(l) if r.start <= l.end.saturating_add(gap) => l.end = l.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

impl RemoteFile {
    /// Make `want` present in the stand-in; returns the bytes fetched.
    fn ensure(&self, want: Range<u64>, client: &InputClient) -> Result<u64> {
        let want = want.start.min(self.size)..want.end.min(self.size);
        let mut have = self
            .fetched
            .lock()
            .map_err(|_| ClusterError::Executor("streamed-input lock poisoned".into()))?;
        let mut n = 0;
        for piece in missing(&have, want) {
            let mut off = piece.start;
            while off < piece.end {
                let len = (piece.end - off).min(REQUEST_BYTES);
                let data = client.read(&self.key, off, len)?;
                self.file
                    .write_all_at(&data, off)
                    .map_err(|e| ClusterError::io(&self.local, e))?;
                insert(&mut have, off..off + len);
                off += len;
                n += len;
            }
        }
        Ok(n)
    }
}

/// Name of the lock file inside a streamed folder (see the module docs).
pub const LOCK_FILE: &str = ".amalgam-worker.lock";

/// Prefix of the streamed folders in the temporary directory.
pub const STREAMED_PREFIX: &str = "amalgam-streamed-";

/// Makes a streamed folder in `tmp` with its lock file already locked by this process; the
/// returned file holds the lock (keep it as long as the folder).
fn locked_folder(tmp: &Path) -> Result<(tempfile::TempDir, File)> {
    let dir = tempfile::Builder::new()
        .prefix(STREAMED_PREFIX)
        .tempdir_in(tmp)
        .map_err(|e| ClusterError::io(tmp, e))?;
    let staged = dir.path().join(format!("{LOCK_FILE}.new"));
    let lock = File::create(&staged).map_err(|e| ClusterError::io(&staged, e))?;
    lock.lock().map_err(|e| ClusterError::io(&staged, e))?;
    let path = dir.path().join(LOCK_FILE);
    std::fs::rename(&staged, &path).map_err(|e| ClusterError::io(&path, e))?;
    Ok((dir, lock))
}

/// Removes the streamed folders in `tmp` left by dead workers (their lock can be taken);
/// returns how many were removed. Folders in use, folders without a lock file, and anything
/// that cannot be read are left alone.
pub fn sweep_stale(tmp: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().starts_with(STREAMED_PREFIX)
            || !e.file_type().is_ok_and(|t| t.is_dir())
        {
            continue;
        }
        let dir = e.path();
        let Ok(lock) = File::open(dir.join(LOCK_FILE)) else {
            continue;
        };
        if lock.try_lock().is_ok() {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {
                    tracing::info!(dir = %dir.display(), "removed the streamed inputs of a dead worker");
                    removed += 1;
                }
                Err(err) => {
                    tracing::warn!(dir = %dir.display(), %err, "could not remove stale streamed inputs")
                }
            }
        }
    }
    removed
}

/// The coordinator connection a file `key` streams through, with the folder of its local
/// copy `at` made.
fn stream_target<'c>(
    key: &str,
    at: &Path,
    client: Option<&'c InputClient>,
) -> Result<&'c InputClient> {
    let client = client.ok_or_else(|| {
        ClusterError::Executor(format!(
            "{key} would be streamed, but there is no coordinator connection"
        ))
    })?;
    if let Some(parent) = at.parent() {
        std::fs::create_dir_all(parent).map_err(|e| ClusterError::io(parent, e))?;
    }
    Ok(client)
}

/// The streamed files of one job on a worker (see the module docs).
#[derive(Debug)]
pub struct StreamedInputs {
    dir: tempfile::TempDir,
    /// Holds the folder's lock while the folder is in use (see the module docs).
    _lock: File,
    /// Files streamed whole (tokenizer files, adapters, statistics, `init:` checkpoints).
    whole_files: usize,
    /// By stand-in path (what the checkpoint reader's tensor metadata names).
    files: HashMap<PathBuf, Arc<RemoteFile>>,
    bytes: AtomicU64,
}

impl StreamedInputs {
    /// Number of streamed files.
    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    /// Bytes fetched from the coordinator so far (headers included).
    pub fn bytes_streamed(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The folder holding the stand-ins.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Fetch the data of every streamed input tensor that `tensors` read (all sources; with a
    /// vocabulary re-indexing, the source tensors of every model). Returns the bytes fetched.
    pub fn prefetch<'a>(
        &self,
        plan: &Plan,
        inputs: &Inputs,
        tensors: impl IntoIterator<Item = &'a TensorPlan>,
        client: &InputClient,
    ) -> Result<u64> {
        let mut want: BTreeMap<PathBuf, Vec<Range<u64>>> = BTreeMap::new();
        let mut add = |m: usize, name: &str| {
            let Some(ck) = plan.models.get(m).and_then(|r| inputs.checkpoints.get(r)) else {
                return;
            };
            if let Some(meta) = ck.get(name) {
                if self.files.contains_key(&meta.file) {
                    let r = meta.data_range.start as u64..meta.data_range.end as u64;
                    want.entry(meta.file.clone()).or_default().push(r);
                }
            }
        };
        for t in tensors {
            for src in t.base.iter().chain(t.models.iter()) {
                if inputs.vocab.is_some() {
                    for m in 0..plan.models.len() {
                        add(m, &src.tensor);
                    }
                } else {
                    add(src.model, &src.tensor);
                }
            }
        }
        let mut n = 0;
        for (path, ranges) in want {
            let f = &self.files[&path];
            for r in coalesce(ranges, COALESCE_GAP) {
                n += f.ensure(r, client)?;
            }
        }
        self.bytes.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }

    /// Fetches `f` whole into `at` and checks its sha256.
    fn fetch_whole(
        &mut self,
        f: &WholeFile,
        at: &Path,
        client: Option<&InputClient>,
    ) -> Result<()> {
        let client = stream_target(&f.key, at, client)?;
        let file = File::create(at).map_err(|e| ClusterError::io(at, e))?;
        let mut h = Sha256::new();
        let mut off = 0;
        while off < f.size {
            let len = (f.size - off).min(REQUEST_BYTES);
            let data = client.read(&f.key, off, len)?;
            h.update(&data);
            file.write_all_at(&data, off)
                .map_err(|e| ClusterError::io(at, e))?;
            off += len;
        }
        if hex::encode(h.finalize()) != f.sha256 {
            return Err(ClusterError::Protocol(format!(
                "{}: the streamed bytes do not match the coordinator's sha256",
                f.key
            )));
        }
        self.bytes.fetch_add(f.size, Ordering::Relaxed);
        self.whole_files += 1;
        Ok(())
    }

    /// A sparse stand-in for `f` at `local` holding its header, checked against the
    /// coordinator's checksum.
    fn add_file(
        &mut self,
        f: &InputFile,
        local: PathBuf,
        client: Option<&InputClient>,
    ) -> Result<()> {
        let client = stream_target(&f.key, &local, client)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&local)
            .map_err(|e| ClusterError::io(&local, e))?;
        file.set_len(f.size)
            .map_err(|e| ClusterError::io(&local, e))?;
        let rf = RemoteFile {
            key: f.key.clone(),
            local: local.clone(),
            size: f.size,
            file,
            fetched: Mutex::default(),
        };
        let head = 8 + f.header_len;
        let n = rf.ensure(0..head, client)?;
        self.bytes.fetch_add(n, Ordering::Relaxed);
        let mut header = vec![0u8; f.header_len as usize];
        rf.file
            .read_exact_at(&mut header, 8)
            .map_err(|e| ClusterError::io(&local, e))?;
        if hex::encode(Sha256::digest(&header)) != f.header_sha256 {
            return Err(ClusterError::Protocol(format!(
                "streamed input {}: its header does not match the coordinator's checksum",
                f.key
            )));
        }
        self.files.insert(local, Arc::new(rf));
        Ok(())
    }
}

/// Open one checkpoint: locally when every file passes the rule, else from a folder of
/// stand-ins (streamed files) and links (local files).
fn open_checkpoint(
    c: &InputCheckpoint,
    slot: usize,
    roots: Option<&AllowedRoots>,
    mode: StreamInputs,
    streamed: &mut StreamedInputs,
    client: Option<&InputClient>,
) -> Result<(Checkpoint, bool)> {
    let local: Vec<std::result::Result<PathBuf, String>> = c
        .files
        .iter()
        .map(|f| match mode {
            StreamInputs::Always => Err("--stream-inputs always".to_string()),
            _ => local_copy(f, roots),
        })
        .collect();
    let index_matches = match &c.index {
        None => true,
        Some(text) => {
            let p = c.root.join(INDEX_FILE);
            mode != StreamInputs::Always
                && roots.is_none_or(|r| r.check(&p).is_ok())
                && std::fs::read_to_string(&p).is_ok_and(|t| t == *text)
        }
    };
    if index_matches && local.iter().all(|l| l.is_ok()) {
        let path = match (&c.index, local.first()) {
            (None, Some(Ok(file))) if c.files.len() == 1 => file.clone(),
            _ => c.root.clone(),
        };
        let ck = Checkpoint::open(&path).map_err(exec_err)?;
        if let Some(r) = roots {
            for f in ck.files() {
                r.check(&f.path)?;
            }
        }
        return Ok((ck, false));
    }
    let mirror = streamed.dir.path().join(format!("{slot:03}"));
    std::fs::create_dir_all(&mirror).map_err(|e| ClusterError::io(&mirror, e))?;
    for (f, l) in c.files.iter().zip(&local) {
        if Path::new(&f.name).is_absolute()
            || Path::new(&f.name)
                .components()
                .any(|p| matches!(p, std::path::Component::ParentDir))
        {
            return Err(ClusterError::Protocol(format!(
                "input file name `{}` leaves its checkpoint",
                f.name
            )));
        }
        let at = mirror.join(&f.name);
        match l {
            Ok(path) => {
                if let Some(parent) = at.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| ClusterError::io(parent, e))?;
                }
                std::os::unix::fs::symlink(path, &at).map_err(|e| ClusterError::io(&at, e))?;
            }
            Err(reason) => {
                tracing::info!(input = %f.key, %reason, "streaming input from the coordinator");
                streamed.add_file(f, at, client)?;
            }
        }
    }
    for f in &c.aux {
        check_name(&f.name)?;
        let at = mirror.join(&f.name);
        match local_whole(f, &c.root.join(&f.name), roots) {
            Ok(path) => {
                std::os::unix::fs::symlink(&path, &at).map_err(|e| ClusterError::io(&at, e))?
            }
            Err(reason) => {
                tracing::info!(input = %f.key, %reason, "streaming a tokenizer file from the coordinator");
                streamed.fetch_whole(f, &at, client)?;
            }
        }
    }
    let path = match &c.index {
        Some(text) => {
            let p = mirror.join(INDEX_FILE);
            std::fs::write(&p, text).map_err(|e| ClusterError::io(&p, e))?;
            mirror
        }
        None => match c.files.as_slice() {
            [one] => mirror.join(&one.name),
            _ => {
                return Err(ClusterError::Protocol(format!(
                    "input {}: {} files but no index",
                    c.model,
                    c.files.len()
                )))
            }
        },
    };
    Ok((Checkpoint::open(&path).map_err(exec_err)?, true))
}

/// A file or folder the config names besides checkpoints (adapter, statistics file, `init:`
/// checkpoint): read locally when the worker has the coordinator's bytes at the coordinator's
/// path (under its roots), else streamed whole into the job's folder (not under `never`, or
/// when the coordinator did not describe it: then resolved locally as the engine resolves it,
/// and checked against the roots).
#[allow(clippy::too_many_arguments)]
fn extra_path(
    path: &str,
    config_dir: Option<&Path>,
    extras: &[ExtraInput],
    roots: Option<&AllowedRoots>,
    mode: StreamInputs,
    streamed: &mut StreamedInputs,
    client: Option<&InputClient>,
) -> Result<PathBuf> {
    let found = extras.iter().enumerate().find(|(_, e)| e.path == path);
    let (Some((slot, e)), false) = (found, mode == StreamInputs::Never) else {
        return local_extra(path, config_dir, roots);
    };
    let at_coordinator = |f: &WholeFile| {
        if e.is_dir {
            e.root.join(&f.name)
        } else {
            e.root.clone()
        }
    };
    let local: Vec<std::result::Result<PathBuf, String>> = e
        .files
        .iter()
        .map(|f| match mode {
            StreamInputs::Always => Err("--stream-inputs always".to_string()),
            _ => local_whole(f, &at_coordinator(f), roots),
        })
        .collect();
    if local.iter().all(|l| l.is_ok()) {
        return Ok(e.root.clone());
    }
    let folder = streamed.dir.path().join(format!("extra-{slot:03}"));
    std::fs::create_dir_all(&folder).map_err(|e| ClusterError::io(&folder, e))?;
    for (f, l) in e.files.iter().zip(&local) {
        check_name(&f.name)?;
        let at = folder.join(&f.name);
        match l {
            Ok(p) => std::os::unix::fs::symlink(p, &at).map_err(|e| ClusterError::io(&at, e))?,
            Err(reason) => {
                tracing::info!(input = %f.key, %reason, "streaming {} from the coordinator", e.path);
                streamed.fetch_whole(f, &at, client)?;
            }
        }
    }
    Ok(match (e.is_dir, e.files.as_slice()) {
        (false, [one]) => folder.join(&one.name),
        _ => folder,
    })
}

/// A local file the config names besides checkpoints (adapter, statistics): resolved as the
/// engine resolves it and checked against the roots.
fn local_extra(
    path: &str,
    config_dir: Option<&Path>,
    roots: Option<&AllowedRoots>,
) -> Result<PathBuf> {
    let p = resolve_model_path(path, config_dir).map_err(exec_err)?;
    if let Some(r) = roots {
        r.check(&p)?;
    }
    Ok(p)
}

/// What [`open_and_plan`] opened.
#[derive(Debug)]
pub struct OpenedJob {
    /// The inputs (streamed checkpoints read from their stand-ins).
    pub inputs: Inputs,
    /// The plan (the coordinator's, since the headers are the same).
    pub plan: Plan,
    /// The streamed files, when any.
    pub streamed: Option<StreamedInputs>,
}

/// The worker's `open_and_plan` under `mode` (not [`StreamInputs::Never`], which opens the
/// config's paths as they are): every checkpoint opened from the coordinator's `manifest`,
/// locally or streamed by the rule in the module docs.
pub fn open_and_plan(
    config: &MergeConfig,
    config_dir: Option<&Path>,
    manifest: &[InputCheckpoint],
    extras: &[ExtraInput],
    roots: Option<&AllowedRoots>,
    mode: StreamInputs,
    client: Option<&InputClient>,
) -> Result<OpenedJob> {
    let tmp = std::env::temp_dir();
    sweep_stale(&tmp);
    let (dir, lock) = locked_folder(&tmp)?;
    let mut streamed = StreamedInputs {
        dir,
        _lock: lock,
        whole_files: 0,
        files: HashMap::new(),
        bytes: AtomicU64::new(0),
    };
    let mut inputs = Inputs::default();
    let mut opened: HashMap<String, Arc<Checkpoint>> = HashMap::new();
    let mut any_mirrored = false;
    for m in referenced_models(config) {
        let ck = match opened.get(&m.path) {
            Some(c) => Arc::clone(c),
            None => {
                let (slot, c) = manifest
                    .iter()
                    .enumerate()
                    .find(|(_, c)| c.model == m.path)
                    .ok_or_else(|| {
                        ClusterError::Protocol(format!(
                            "the job's input list does not describe model {}",
                            m.path
                        ))
                    })?;
                let (ck, mirrored) = open_checkpoint(c, slot, roots, mode, &mut streamed, client)?;
                any_mirrored |= mirrored;
                let ck = Arc::new(ck);
                opened.insert(m.path.clone(), Arc::clone(&ck));
                ck
            }
        };
        if let Some(adapter) = &m.adapter {
            let apath = extra_path(
                adapter,
                config_dir,
                extras,
                roots,
                mode,
                &mut streamed,
                client,
            )?;
            let delta =
                amalgam_engine::adapter::AdapterDelta::load(&apath, &ck).map_err(exec_err)?;
            inputs.adapters.insert(m.clone(), Arc::new(delta));
        }
        inputs
            .models
            .insert(m.clone(), input_model(m.to_string(), &ck));
        inputs.checkpoints.insert(m, ck);
    }
    for (m, path) in &config.statistics {
        let p = extra_path(path, config_dir, extras, roots, mode, &mut streamed, client)?;
        let stats = StatsFile::open(&p).map_err(exec_err)?;
        if let Some(ck) = inputs.checkpoints.get(m) {
            stats.check_model(ck).map_err(exec_err)?;
        }
        inputs.stats.insert(m.clone(), Arc::new(stats));
    }
    // Extra checkpoints a method parameter names (MaTS's `init: PATH`), streamed whole.
    for path in amalgam_core::methods::mats::init_checkpoint_paths(config) {
        let p = extra_path(
            &path,
            config_dir,
            extras,
            roots,
            mode,
            &mut streamed,
            client,
        )?;
        let ck = Checkpoint::open(&p).map_err(exec_err)?;
        if let Some(r) = roots {
            if !p.starts_with(streamed.dir.path()) {
                for f in ck.files() {
                    r.check(&f.path)?;
                }
            }
        }
        inputs.extra.insert(path, Arc::new(ck));
    }
    let tokenizer_source = config.tokenizer_source.is_some()
        || config
            .tokenizer
            .as_ref()
            .is_some_and(|t| t.source.is_some());
    if any_mirrored && tokenizer_source && manifest.iter().all(|c| c.aux.is_empty()) {
        return Err(ClusterError::Executor(
            "`tokenizer_source` needs the models' tokenizer files, but some models are streamed \
             and the coordinator sent no tokenizer files (an older coordinator): give the \
             worker the same storage (--allow-root) or run without streaming"
                .into(),
        ));
    }
    let (inputs, plan) = amalgam_engine::inputs::plan_inputs(config, inputs).map_err(exec_err)?;
    Ok(OpenedJob {
        inputs,
        plan,
        streamed: (!streamed.files.is_empty() || streamed.whole_files > 0).then_some(streamed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the folders whose lock nobody holds (their worker is dead) are swept; a live
    /// worker's folder, a folder without a lock file and other entries stay.
    #[test]
    fn sweep_removes_only_the_folders_of_dead_workers() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let (live, _held) = locked_folder(root).unwrap();
        let (dead, lock) = locked_folder(root).unwrap();
        std::fs::write(dead.path().join("stand-in.safetensors"), b"partial").unwrap();
        let dead = dead.keep();
        drop(lock); // what the kernel does when the process is killed
        let legacy = root.join(format!("{STREAMED_PREFIX}legacy"));
        std::fs::create_dir(&legacy).unwrap();
        let other = root.join("something-else");
        std::fs::create_dir(&other).unwrap();
        assert!(dead.join(LOCK_FILE).exists());
        assert_eq!(sweep_stale(root), 1);
        assert!(!dead.exists(), "the dead worker's folder is removed");
        assert!(live.path().join(LOCK_FILE).exists(), "a live folder stays");
        assert!(legacy.exists() && other.exists());
        assert_eq!(sweep_stale(root), 0);
        drop(_held);
        assert_eq!(sweep_stale(root), 1, "released: swept like a dead worker's");
        assert!(sweep_stale(&root.join("missing")) == 0);
    }

    #[test]
    fn range_sets() {
        let mut have = Vec::new();
        insert(&mut have, 10..20);
        insert(&mut have, 30..40);
        assert_eq!(missing(&have, 0..50), vec![0..10, 20..30, 40..50]);
        assert_eq!(missing(&have, 12..18), Vec::<Range<u64>>::new());
        assert_eq!(missing(&have, 15..35), vec![20..30]);
        insert(&mut have, 20..30);
        assert_eq!(have, vec![10..40]);
        insert(&mut have, 0..5);
        insert(&mut have, 45..50);
        insert(&mut have, 4..46);
        assert_eq!(have, vec![0..50]);
        assert_eq!(
            coalesce(vec![9..12, 0..3, 4..5, 30..31], 2),
            vec![0..5, 9..12, 30..31]
        );
    }

    /// A safetensors file with one F32 tensor `w` of `n` values `seed + i`.
    fn write_model(path: &Path, n: usize, seed: f32) -> Vec<u8> {
        let mut header = format!(
            "{{\"w\":{{\"dtype\":\"F32\",\"shape\":[{n}],\"data_offsets\":[0,{}]}}}}",
            4 * n
        )
        .into_bytes();
        while header.len() % 8 != 0 {
            header.push(b' ');
        }
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(&header);
        for i in 0..n {
            b.extend_from_slice(&(seed + i as f32).to_le_bytes());
        }
        std::fs::write(path, &b).unwrap();
        b
    }

    /// Serves files by key (the coordinator's copies).
    struct Files(Mutex<u64>);
    impl crate::server::JobHost for Files {
        fn shards(&self) -> Vec<crate::scheduler::ShardSpec> {
            vec![crate::scheduler::ShardSpec {
                id: 0,
                est_bytes: 1,
                gang: None,
                spec: Vec::new(),
            }]
        }
        fn read_input(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
            *self.0.lock().unwrap() += len;
            let f = File::open(key).map_err(|e| ClusterError::io(Path::new(key), e))?;
            let mut buf = vec![0u8; len as usize];
            f.read_exact_at(&mut buf, offset)
                .map_err(|e| ClusterError::io(Path::new(key), e))?;
            Ok(buf)
        }
        fn accept(&self, _: u64, _: Vec<u8>) -> Result<()> {
            Ok(())
        }
    }

    /// Through a real coordinator on loopback: a local copy that differs (another header,
    /// same path) is streamed, and the tensor (larger than the gRPC message limit) reads the
    /// coordinator's values; an identical copy is read locally; `always` and a path outside
    /// the roots stream an identical copy too.
    #[test]
    fn differing_copies_are_streamed_and_identical_ones_read_locally() {
        let tmp = tempfile::tempdir().unwrap();
        let (coord_dir, worker_dir) = (tmp.path().join("coord"), tmp.path().join("worker"));
        std::fs::create_dir_all(&coord_dir).unwrap();
        std::fs::create_dir_all(&worker_dir).unwrap();
        let n = crate::MAX_MESSAGE_BYTES / 4 + 1000; // more bytes than one message may carry
        let theirs = coord_dir.join("m.safetensors");
        let bytes = write_model(&theirs, n, 1.0);
        let mine = worker_dir.join("m.safetensors");
        let rt = tokio::runtime::Runtime::new().unwrap();
        let host = Arc::new(Files(Mutex::new(0)));
        let server = rt
            .block_on(crate::server::serve(
                Arc::clone(&host),
                "127.0.0.1:0".parse().unwrap(),
                crate::server::ServerOptions::default(),
            ))
            .unwrap();
        let client = rt
            .block_on(crate::client::connect(&server.url(), None))
            .unwrap();
        let ic = InputClient::new(client, rt.handle().clone());
        let cfg_text = format!(
            "merge_method: linear\nmodels:\n  - model: {}\n    parameters: {{weight: 1.0}}\n",
            mine.display()
        );
        let (config, _) = amalgam_core::config::parse_config(&cfg_text, false).unwrap();
        let info = |size: u64| {
            let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap());
            vec![InputCheckpoint {
                model: mine.display().to_string(),
                root: worker_dir.clone(),
                index: None,
                files: vec![InputFile {
                    key: theirs.display().to_string(),
                    name: "m.safetensors".into(),
                    path: mine.clone(),
                    size,
                    header_len: hlen,
                    header_sha256: hex::encode(Sha256::digest(&bytes[8..8 + hlen as usize])),
                }],
                aux: Vec::new(),
            }]
        };
        let manifest = info(bytes.len() as u64);
        let read_all = |o: &OpenedJob| {
            let ck = o.inputs.checkpoints.values().next().unwrap();
            let mut v = vec![0f32; n];
            ck.read_f32("w", 0..n, &mut v).unwrap();
            v
        };
        let want: Vec<f32> = (0..n).map(|i| 1.0 + i as f32).collect();
        let open = |mode, roots: Option<&AllowedRoots>| {
            open_and_plan(&config, None, &manifest, &[], roots, mode, Some(&ic)).unwrap()
        };

        // Same path, other bytes (another header): streamed.
        write_model(&mine, n - 1, 7.0);
        let o = open(StreamInputs::Auto, None);
        let s = o.streamed.as_ref().expect("streamed");
        assert_eq!(s.file_count(), 1);
        let fetched = s
            .prefetch(&o.plan, &o.inputs, o.plan.tensors.iter(), &ic)
            .unwrap();
        assert_eq!(fetched, 4 * n as u64, "the tensor's data, once");
        assert_eq!(
            s.prefetch(&o.plan, &o.inputs, o.plan.tensors.iter(), &ic)
                .unwrap(),
            0
        );
        assert_eq!(s.bytes_streamed(), bytes.len() as u64);
        assert!(read_all(&o) == want, "the coordinator's values");
        drop(o);

        // An identical copy: read locally, nothing fetched.
        std::fs::write(&mine, &bytes).unwrap();
        let before = *host.0.lock().unwrap();
        let o = open(StreamInputs::Auto, None);
        assert!(o.streamed.is_none());
        assert!(read_all(&o) == want);
        assert_eq!(*host.0.lock().unwrap(), before);
        // The same size but another size on the coordinator: streamed.
        let other = info(bytes.len() as u64 + 8);
        let o2 = open_and_plan(
            &config,
            None,
            &other,
            &[],
            None,
            StreamInputs::Auto,
            Some(&ic),
        );
        // (the stand-in then has the coordinator's size, which the real file lacks)
        assert!(o2.is_err() || o2.unwrap().streamed.is_some());
        // `always`, and a copy outside the roots: streamed although identical.
        assert!(open(StreamInputs::Always, None).streamed.is_some());
        let roots = AllowedRoots::new([&coord_dir]).unwrap();
        let o = open(StreamInputs::Auto, Some(&roots));
        assert!(o.streamed.is_some());
        o.streamed
            .as_ref()
            .unwrap()
            .prefetch(&o.plan, &o.inputs, o.plan.tensors.iter(), &ic)
            .unwrap();
        assert!(read_all(&o) == want);
        rt.block_on(server.shutdown(std::time::Duration::from_secs(1)))
            .unwrap();
    }

    #[test]
    fn modes_parse() {
        for m in ["auto", "always", "never"] {
            assert_eq!(
                m.parse::<StreamInputs>().map(|s| s.to_string()),
                Ok(m.into())
            );
        }
        assert!("sometimes".parse::<StreamInputs>().is_err());
    }
}
