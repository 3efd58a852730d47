//! Statistics files: the per-model Fisher, Gram and K-FAC statistics that the data-driven
//! merge methods (Fisher merging, RegMean, MaTS; methods.md §9-§11) consume.
//!
//! The format is fixed by architecture.md ("Statistics files"). A statistics file IS a
//! safetensors file, so it is opened with [`Checkpoint`] and written with
//! [`CheckpointWriter`]; this module adds the format's rules on top:
//!
//! - keys are `NAME::SUFFIX`, NAME a parameter of the model and SUFFIX one of [`StatKind`]:
//!   `fisher` (diagonal Fisher, the parameter's shape), `gram_in` (Gram of a linear layer's
//!   inputs, d_in × d_in for a weight stored `[d_out, d_in]`), `kfac_out` (Gram of the
//!   gradients w.r.t. the layer outputs, d_out × d_out), `fisher_block` (full Fisher of a
//!   vector parameter of length d, d × d); every tensor is F32;
//! - `__metadata__` holds `amalgam.stats` = `"1"` (the format version), `kind` (a string
//!   describing how the statistics were computed), `examples` and `tokens` (integers ≥ 1,
//!   written as decimal strings; a zero count is an error) and optionally
//!   `model_header_sha256` (see [`Checkpoint::header_sha256`]). Other entries are kept in
//!   [`StatsMeta::extra`].
//!
//! [`StatsFile::open`] validates all of this up front, values included: every element is
//! finite, a diagonal Fisher and the diagonal of every matrix statistic are non-negative,
//! and every matrix statistic is symmetric within [`SYMMETRY_RTOL`] (see there for the rule).
//! [`StatsFile::check_model`] then checks the file against the model it is used with (header
//! digest, every key's parameter present, every shape fitting). Reads stream ranges of
//! elements, like [`Checkpoint::read_f32`]. [`StatsWriter`] (and [`write_stats`]) write a file
//! under a temporary name and rename it into place, so a killed writer never leaves a
//! half-written statistics file.
//!
//! A sharded directory (Hugging Face layout) is accepted too, with the same `__metadata__`
//! in every shard; [`StatsWriter`] always writes one file.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rayon::prelude::*;
use serde_json::Value;

use crate::atomic;
use crate::dtype::DType;
use crate::error::IoError;
use crate::safetensors::read::Checkpoint;
use crate::safetensors::write::{CheckpointWriter, OutputLayout, OutputTensor};

/// The format version this build reads and writes (`__metadata__["amalgam.stats"]`).
pub const STATS_FORMAT_VERSION: &str = "1";

/// Metadata key of the format version.
pub const META_VERSION: &str = "amalgam.stats";
/// Metadata key of the statistics kind.
pub const META_KIND: &str = "kind";
/// Metadata key of the number of examples.
pub const META_EXAMPLES: &str = "examples";
/// Metadata key of the number of tokens.
pub const META_TOKENS: &str = "tokens";
/// Metadata key of the model header digest.
pub const META_MODEL_SHA256: &str = "model_header_sha256";

/// Relative tolerance of the symmetry check of matrix statistics.
///
/// Elements (i, j) and (j, i) must satisfy
/// `|a_ij − a_ji| ≤ SYMMETRY_RTOL · max(|a_ij|, |a_ji|, sqrt(|a_ii| · |a_jj|)) + f32::MIN_POSITIVE`.
/// The scale `sqrt(a_ii a_jj)` bounds |a_ij| for a positive semi-definite matrix
/// (Cauchy–Schwarz) and bounds the rounding error of an f32 dot product too, so an entry that
/// cancels to near zero is judged against the size of its row and column, not against
/// itself. A Gram or Fisher matrix accumulated in f32 in any order (blocked GEMM, batches,
/// several GPUs) differs from its transpose by a few ulps times sqrt(#terms) relative to that
/// scale, far below 1e-4; a matrix stored in the wrong layout, or not a Gram at all, fails.
pub const SYMMETRY_RTOL: f64 = 1e-4;

/// Tile edge of the blocked symmetry check (a tile pair fits in L1).
const TILE: usize = 64;
/// Elements per parallel chunk of the value scan.
const SCAN_CHUNK: usize = 1 << 20;

/// The kind of one statistic: the suffix of its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StatKind {
    /// `NAME::fisher`: diagonal Fisher, the parameter's shape.
    Fisher,
    /// `NAME::gram_in`: Gram of a linear layer's inputs, d_in × d_in for a weight `[d_out, d_in]`.
    GramIn,
    /// `NAME::kfac_out`: Gram of the gradients w.r.t. a linear layer's outputs, d_out × d_out.
    KfacOut,
    /// `NAME::fisher_block`: full Fisher of a vector parameter of length d ((IA)³), d × d.
    FisherBlock,
}

impl StatKind {
    /// Every kind, in suffix order of the format description.
    pub const ALL: [StatKind; 4] = [
        StatKind::Fisher,
        StatKind::GramIn,
        StatKind::KfacOut,
        StatKind::FisherBlock,
    ];

    /// The key suffix (without `::`).
    pub fn suffix(self) -> &'static str {
        match self {
            StatKind::Fisher => "fisher",
            StatKind::GramIn => "gram_in",
            StatKind::KfacOut => "kfac_out",
            StatKind::FisherBlock => "fisher_block",
        }
    }

    /// The kind with this suffix (without `::`).
    pub fn from_suffix(s: &str) -> Option<StatKind> {
        StatKind::ALL.into_iter().find(|k| k.suffix() == s)
    }

    /// Whether the statistic is a square matrix (every kind but [`StatKind::Fisher`]).
    pub fn is_matrix(self) -> bool {
        !matches!(self, StatKind::Fisher)
    }

    /// The key of this statistic for parameter `name`: `NAME::suffix`.
    pub fn key(self, name: &str) -> String {
        format!("{name}::{}", self.suffix())
    }

    /// Splits a key into its parameter name and kind; `Err` says what is wrong.
    pub fn parse_key(key: &str) -> Result<(&str, StatKind), String> {
        let Some((name, suffix)) = key.rsplit_once("::") else {
            return Err(format!(
                "a statistics key is NAME::SUFFIX with SUFFIX one of {}, but this key has no \"::\"",
                suffix_list()
            ));
        };
        let Some(kind) = StatKind::from_suffix(suffix) else {
            return Err(format!(
                "unknown suffix \"::{suffix}\"; the suffixes are {} (is this a statistics file for a newer amalgam?)",
                suffix_list()
            ));
        };
        if name.is_empty() {
            return Err("the parameter name before \"::\" is empty".to_string());
        }
        Ok((name, kind))
    }

    /// The shape this statistic must have for a parameter of shape `param`; `Err` describes
    /// the parameter shape it needs instead (a linear weight is stored `[d_out, d_in]`).
    pub fn expected_shape(self, param: &[usize]) -> Result<Vec<usize>, String> {
        match (self, param) {
            (StatKind::Fisher, p) => Ok(p.to_vec()),
            (StatKind::GramIn, &[_, d_in]) => Ok(vec![d_in, d_in]),
            (StatKind::KfacOut, &[d_out, _]) => Ok(vec![d_out, d_out]),
            (StatKind::GramIn | StatKind::KfacOut, _) => Err(format!(
                "a 2-D linear weight [d_out, d_in], as ::{} is for linear weights",
                self.suffix()
            )),
            // (IA)³ vectors: 1-D, or stored by PEFT as [d, 1] (output) or [1, d] (feed-forward).
            (StatKind::FisherBlock, &[d] | &[d, 1] | &[1, d]) => Ok(vec![d, d]),
            (StatKind::FisherBlock, _) => Err(
                "a vector (1-D, [d, 1] or [1, d]), as ::fisher_block is for vector parameters"
                    .to_string(),
            ),
        }
    }
}

fn suffix_list() -> String {
    StatKind::ALL
        .iter()
        .map(|k| format!("::{}", k.suffix()))
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for StatKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.suffix())
    }
}

impl FromStr for StatKind {
    type Err = String;

    /// Parses a suffix, with or without its leading `::`.
    fn from_str(s: &str) -> Result<StatKind, String> {
        let s = s.strip_prefix("::").unwrap_or(s);
        StatKind::from_suffix(s).ok_or_else(|| {
            format!(
                "unknown statistic \"{s}\"; expected one of {}",
                suffix_list()
            )
        })
    }
}

/// One statistic of a file: parameter name, kind and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatKey {
    /// The parameter name (the key without its suffix).
    pub name: String,
    /// The kind (the key's suffix).
    pub kind: StatKind,
    /// The statistic's shape.
    pub shape: Vec<usize>,
}

impl StatKey {
    /// A key for parameter `name`.
    pub fn new(name: impl Into<String>, kind: StatKind, shape: Vec<usize>) -> StatKey {
        StatKey {
            name: name.into(),
            kind,
            shape,
        }
    }

    /// The full key, `NAME::suffix`.
    pub fn key(&self) -> String {
        self.kind.key(&self.name)
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The `__metadata__` of a statistics file (the format version is implied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsMeta {
    /// How the statistics were computed (free text, non-empty; e.g. `"empirical_fisher"`, `"gram"`).
    pub kind: String,
    /// Number of examples the statistics were computed over (≥ 1).
    pub examples: u64,
    /// Number of tokens they were computed over (≥ 1).
    pub tokens: u64,
    /// The model's [`Checkpoint::header_sha256`], lowercase hex, when recorded.
    pub model_header_sha256: Option<String>,
    /// Every other `__metadata__` entry except safetensors' `format` (non-string values as
    /// their JSON text).
    pub extra: BTreeMap<String, String>,
}

impl StatsMeta {
    /// Metadata with no model digest and no extra entries.
    pub fn new(kind: impl Into<String>, examples: u64, tokens: u64) -> StatsMeta {
        StatsMeta {
            kind: kind.into(),
            examples,
            tokens,
            model_header_sha256: None,
            extra: BTreeMap::new(),
        }
    }

    /// Records the model the statistics belong to (its [`Checkpoint::header_sha256`]).
    pub fn for_model(mut self, model: &Checkpoint) -> StatsMeta {
        self.model_header_sha256 = Some(model.header_sha256());
        self
    }

    /// The `__metadata__` entries to write (after safetensors' `format`).
    fn entries(&self) -> Vec<(String, String)> {
        let mut v = vec![
            (META_VERSION.to_string(), STATS_FORMAT_VERSION.to_string()),
            (META_KIND.to_string(), self.kind.clone()),
            (META_EXAMPLES.to_string(), self.examples.to_string()),
            (META_TOKENS.to_string(), self.tokens.to_string()),
        ];
        if let Some(h) = &self.model_header_sha256 {
            v.push((META_MODEL_SHA256.to_string(), h.clone()));
        }
        v.extend(
            self.extra
                .iter()
                .filter(|(k, _)| !is_reserved(k))
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        v
    }

    /// Checks the values a writer is given (the reader checks the same rules while parsing).
    fn validate(&self, file: &Path) -> Result<(), IoError> {
        let err = |key: &str, reason: String| IoError::StatsMetadata {
            file: file.to_path_buf(),
            key: key.to_string(),
            reason,
        };
        if self.kind.is_empty() {
            return Err(err(META_KIND, "is empty".to_string()));
        }
        if self.examples == 0 {
            return Err(err(META_EXAMPLES, zero_reason("examples")));
        }
        if self.tokens == 0 {
            return Err(err(META_TOKENS, zero_reason("tokens")));
        }
        if let Some(h) = &self.model_header_sha256 {
            if !is_sha256_hex(h) {
                return Err(err(META_MODEL_SHA256, sha_reason(h)));
            }
        }
        Ok(())
    }
}

fn is_reserved(key: &str) -> bool {
    matches!(
        key,
        "format" | META_VERSION | META_KIND | META_EXAMPLES | META_TOKENS | META_MODEL_SHA256
    )
}

fn zero_reason(what: &str) -> String {
    format!("is 0: statistics over zero {what} hold no information (the data set was empty or every example was filtered out)")
}

fn sha_reason(h: &str) -> String {
    format!("\"{h}\" is not a SHA-256 digest (64 hexadecimal digits)")
}

fn is_sha256_hex(h: &str) -> bool {
    h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Parses a count: a decimal string (the safetensors convention) or a JSON integer.
fn parse_count(file: &Path, key: &str, v: Option<&Value>) -> Result<u64, IoError> {
    let err = |reason: String| IoError::StatsMetadata {
        file: file.to_path_buf(),
        key: key.to_string(),
        reason,
    };
    let n = match v {
        None => return Err(err("missing".to_string())),
        Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s
            .parse::<u64>()
            .map_err(|_| err(format!("\"{s}\" does not fit in 64 bits")))?,
        Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64().expect("checked is_some"),
        Some(other) => {
            return Err(err(format!(
            "{other} is not a non-negative integer (write it as a decimal string, e.g. \"1000\")"
        )))
        }
    };
    if n == 0 {
        return Err(err(zero_reason(key)));
    }
    Ok(n)
}

/// Parses and validates one file's raw `__metadata__` object.
fn parse_meta(file: &Path, raw: &serde_json::Map<String, Value>) -> Result<StatsMeta, IoError> {
    let err = |key: &str, reason: String| IoError::StatsMetadata {
        file: file.to_path_buf(),
        key: key.to_string(),
        reason,
    };
    match raw.get(META_VERSION) {
        None => {
            return Err(err(
                META_VERSION,
                "missing, so this is not a statistics file (a model checkpoint, perhaps?)"
                    .to_string(),
            ))
        }
        Some(Value::String(s)) if s == STATS_FORMAT_VERSION => {}
        Some(Value::Number(n)) if n.as_u64() == Some(1) => {}
        Some(v) => {
            return Err(err(
                META_VERSION,
                format!(
                    "format version {v} is not supported; this build reads version \"{STATS_FORMAT_VERSION}\""
                ),
            ))
        }
    }
    let kind = match raw.get(META_KIND) {
        None => return Err(err(META_KIND, "missing".to_string())),
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::String(_)) => return Err(err(META_KIND, "is empty".to_string())),
        Some(v) => return Err(err(META_KIND, format!("{v} is not a string"))),
    };
    let examples = parse_count(file, META_EXAMPLES, raw.get(META_EXAMPLES))?;
    let tokens = parse_count(file, META_TOKENS, raw.get(META_TOKENS))?;
    let model_header_sha256 = match raw.get(META_MODEL_SHA256) {
        None => None,
        Some(Value::String(h)) if is_sha256_hex(h) => Some(h.to_ascii_lowercase()),
        Some(Value::String(h)) => return Err(err(META_MODEL_SHA256, sha_reason(h))),
        Some(v) => return Err(err(META_MODEL_SHA256, sha_reason(&v.to_string()))),
    };
    let extra = raw
        .iter()
        .filter(|(k, _)| !is_reserved(k))
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), v)
        })
        .collect();
    Ok(StatsMeta {
        kind,
        examples,
        tokens,
        model_header_sha256,
        extra,
    })
}

/// The raw `__metadata__` object of one safetensors header (empty when absent).
fn raw_metadata(file: &Path, header: &[u8]) -> Result<serde_json::Map<String, Value>, IoError> {
    let json: Value = serde_json::from_slice(header).map_err(|e| IoError::HeaderNotJson {
        file: file.to_path_buf(),
        reason: e.to_string(),
    })?;
    match json {
        Value::Object(mut m) => match m.remove("__metadata__") {
            Some(Value::Object(meta)) => Ok(meta),
            _ => Ok(serde_json::Map::new()),
        },
        _ => Ok(serde_json::Map::new()),
    }
}

/// Whether value `x` at flat index `idx` is invalid for a statistic of `kind` (matrix edge
/// `d`): non-finite anywhere; negative in a diagonal Fisher or on a matrix's diagonal.
fn bad_value(kind: StatKind, d: usize, idx: usize, x: f32) -> bool {
    if !x.is_finite() {
        return true;
    }
    x < 0.0
        && match kind {
            StatKind::Fisher => true,
            _ => idx.is_multiple_of(d + 1),
        }
}

fn value_error(file: &Path, key: &str, kind: StatKind, d: usize, idx: usize, x: f32) -> IoError {
    let (value, reason) = if x.is_nan() {
        ("NaN".to_string(), non_finite_reason())
    } else if x.is_infinite() {
        let v = if x > 0.0 { "inf" } else { "-inf" };
        (v.to_string(), non_finite_reason())
    } else if kind.is_matrix() {
        (
            format!("{x:e}"),
            format!(
                "that is diagonal element ({i}, {i}), and the diagonal of a Gram or Fisher matrix is a sum of squares, never negative (recompute the statistics)",
                i = idx / (d + 1)
            ),
        )
    } else {
        (
            format!("{x:e}"),
            "a diagonal Fisher is a mean of squared gradients, never negative (recompute the statistics)"
                .to_string(),
        )
    };
    IoError::StatsValue {
        file: file.to_path_buf(),
        key: key.to_string(),
        index: idx,
        value,
        reason,
    }
}

fn non_finite_reason() -> String {
    "statistics must be finite; the file is corrupt or the model overflowed while they were computed (recompute them, e.g. in float32)".to_string()
}

/// Element `idx` of little-endian F32 `bytes`.
fn f32_at(bytes: &[u8], idx: usize) -> f32 {
    let b: [u8; 4] = bytes[idx * 4..idx * 4 + 4]
        .try_into()
        .expect("a 4-byte slice");
    f32::from_le_bytes(b)
}

/// The first invalid value of a statistic's data (see [`bad_value`]), scanned in parallel
/// chunks; the lowest index wins whatever the thread count.
fn first_bad_value(kind: StatKind, d: usize, bytes: &[u8]) -> Option<(usize, f32)> {
    bytes
        .par_chunks(SCAN_CHUNK * 4)
        .enumerate()
        .find_map_first(|(c, chunk)| {
            chunk.chunks_exact(4).enumerate().find_map(|(i, b)| {
                let idx = c * SCAN_CHUNK + i;
                let x = f32::from_le_bytes(b.try_into().expect("chunks_exact(4)"));
                bad_value(kind, d, idx, x).then_some((idx, x))
            })
        })
}

/// Whether a pair of mirrored elements is symmetric within [`SYMMETRY_RTOL`].
fn symmetric_pair(a_ij: f32, a_ji: f32, a_ii: f32, a_jj: f32) -> bool {
    let (a, b) = (a_ij as f64, a_ji as f64);
    let scale = a
        .abs()
        .max(b.abs())
        .max((a_ii as f64 * a_jj as f64).abs().sqrt());
    (a - b).abs() <= SYMMETRY_RTOL * scale + f32::MIN_POSITIVE as f64
}

/// The first asymmetric pair `(i, j)`, `i < j`, of a d × d little-endian F32 matrix, checked
/// tile pair by tile pair in parallel; the first in (tile row, tile column, i, j) order wins
/// whatever the thread count.
fn first_asymmetry(d: usize, bytes: &[u8]) -> Option<(usize, usize, f32, f32)> {
    let diag: Vec<f32> = (0..d).map(|i| f32_at(bytes, i * d + i)).collect();
    let nt = d.div_ceil(TILE);
    let pairs: Vec<(usize, usize)> = (0..nt)
        .flat_map(|bi| (bi..nt).map(move |bj| (bi, bj)))
        .collect();
    pairs.par_iter().find_map_first(|&(bi, bj)| {
        let rows = bi * TILE..((bi + 1) * TILE).min(d);
        let cols = bj * TILE..((bj + 1) * TILE).min(d);
        // The mirrored tile, transposed: t[(j - cols.start) * TILE + (i - rows.start)] = a_ji.
        let mut t = [0f32; TILE * TILE];
        for j in cols.clone() {
            for i in rows.clone() {
                t[(j - cols.start) * TILE + (i - rows.start)] = f32_at(bytes, j * d + i);
            }
        }
        for i in rows.clone() {
            for j in cols.clone().filter(|&j| j > i) {
                let a_ij = f32_at(bytes, i * d + j);
                let a_ji = t[(j - cols.start) * TILE + (i - rows.start)];
                if !symmetric_pair(a_ij, a_ji, diag[i], diag[j]) {
                    return Some((i, j, a_ij, a_ji));
                }
            }
        }
        None
    })
}

/// Checks a key's dtype and shape (not its values): F32, and square 2-D for matrix kinds.
fn check_key_form(
    file: &Path,
    key: &str,
    kind: StatKind,
    dtype: &DType,
    shape: &[usize],
) -> Result<(), IoError> {
    let err = |reason: String| IoError::StatsKey {
        file: file.to_path_buf(),
        key: key.to_string(),
        reason,
    };
    if *dtype != DType::F32 {
        return Err(err(format!(
            "dtype {dtype} but statistics are F32 (recompute or convert them)"
        )));
    }
    if kind.is_matrix() && !(shape.len() == 2 && shape[0] == shape[1]) {
        return Err(err(format!(
            "shape {shape:?} but ::{} is a square matrix [d, d]",
            kind.suffix()
        )));
    }
    Ok(())
}

/// The path that names a model checkpoint in messages: its index or directory when sharded,
/// else its one file.
fn model_path(model: &Checkpoint) -> PathBuf {
    match (model.index_path(), model.files()) {
        (None, [one]) => one.path.clone(),
        _ => model.root().to_path_buf(),
    }
}

/// A validated statistics file, memory-mapped (see the module docs for what is validated).
#[derive(Debug)]
pub struct StatsFile {
    path: PathBuf,
    single: bool,
    ckpt: Checkpoint,
    meta: StatsMeta,
    keys: Vec<StatKey>,
    by_name: HashMap<String, [Option<usize>; 4]>,
}

fn kind_slot(kind: StatKind) -> usize {
    match kind {
        StatKind::Fisher => 0,
        StatKind::GramIn => 1,
        StatKind::KfacOut => 2,
        StatKind::FisherBlock => 3,
    }
}

impl StatsFile {
    /// Opens and validates a statistics file (or a sharded directory of them): the
    /// metadata, every key's name, dtype and shape, and every value (finite; non-negative
    /// where it must be; matrices symmetric within [`SYMMETRY_RTOL`]). Reads the whole file
    /// once, in parallel. Errors name the file and the key.
    pub fn open(path: &Path) -> Result<StatsFile, IoError> {
        let ckpt = Checkpoint::open(path)?;
        let single = path.is_file();
        let shown = |f: &Path| -> PathBuf {
            if single {
                path.to_path_buf()
            } else {
                f.to_path_buf()
            }
        };

        // Metadata: the same in every file; validated once.
        let mut first: Option<(PathBuf, serde_json::Map<String, Value>)> = None;
        for f in ckpt.files() {
            let mut raw = raw_metadata(&f.path, f.header_bytes())?;
            raw.remove("format");
            match &first {
                None => first = Some((f.path.clone(), raw)),
                Some((p0, r0)) if *r0 != raw => {
                    return Err(IoError::StatsMetadata {
                        file: f.path.clone(),
                        key: "__metadata__".to_string(),
                        reason: format!(
                            "differs from that of {}; every shard of a statistics directory needs the same metadata",
                            p0.display()
                        ),
                    })
                }
                Some(_) => {}
            }
        }
        let meta = match &first {
            Some((p, raw)) => parse_meta(&shown(p), raw)?,
            None => parse_meta(path, &serde_json::Map::new())?,
        };

        // Keys: name, dtype, shape.
        let mut keys = Vec::with_capacity(ckpt.tensors().len());
        let mut by_name: HashMap<String, [Option<usize>; 4]> = HashMap::new();
        for t in ckpt.tensors() {
            let file = shown(&t.file);
            let (name, kind) =
                StatKind::parse_key(&t.name).map_err(|reason| IoError::StatsKey {
                    file: file.clone(),
                    key: t.name.clone(),
                    reason,
                })?;
            check_key_form(&file, &t.name, kind, &t.dtype, &t.shape)?;
            by_name.entry(name.to_string()).or_default()[kind_slot(kind)] = Some(keys.len());
            keys.push(StatKey::new(name, kind, t.shape.clone()));
        }

        // Values.
        for (k, t) in keys.iter().zip(ckpt.tensors()) {
            let file = shown(&t.file);
            let bytes = ckpt.raw(&t.name)?;
            let d = if k.kind.is_matrix() { k.shape[0] } else { 0 };
            if let Some((idx, x)) = first_bad_value(k.kind, d, bytes) {
                return Err(value_error(&file, &t.name, k.kind, d, idx, x));
            }
            if k.kind.is_matrix() {
                if let Some((row, col, a_ij, a_ji)) = first_asymmetry(d, bytes) {
                    return Err(IoError::StatsNotSymmetric {
                        file,
                        key: t.name.clone(),
                        row,
                        col,
                        a_ij,
                        a_ji,
                        rtol: SYMMETRY_RTOL,
                    });
                }
            }
        }
        Ok(StatsFile {
            path: path.to_path_buf(),
            single,
            ckpt,
            meta,
            keys,
            by_name,
        })
    }

    /// Checks the statistics against the model they are used with: the recorded
    /// `model_header_sha256` (when present) equals [`Checkpoint::header_sha256`], every key's
    /// parameter exists in `model`, and every key's shape fits that parameter
    /// ([`StatKind::expected_shape`]). Errors name both files and the key.
    pub fn check_model(&self, model: &Checkpoint) -> Result<(), IoError> {
        if let Some(expected) = &self.meta.model_header_sha256 {
            let actual = model.header_sha256();
            if actual != *expected {
                return Err(IoError::StatsWrongModel {
                    stats: self.path.clone(),
                    model: model_path(model),
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        for (k, t) in self.keys.iter().zip(self.ckpt.tensors()) {
            let Some(p) = model.get(&k.name) else {
                return Err(IoError::StatsUnknownParameter {
                    stats: self.shown(&t.file),
                    model: model_path(model),
                    key: t.name.clone(),
                    param: k.name.clone(),
                });
            };
            let expected = match k.kind.expected_shape(&p.shape) {
                Ok(s) if s == k.shape => continue,
                Ok(s) => format!("{s:?}"),
                Err(desc) => desc,
            };
            return Err(IoError::StatsShape {
                stats: self.shown(&t.file),
                model: model_path(model),
                key: t.name.clone(),
                actual: k.shape.clone(),
                need: format!(
                    "parameter \"{}\" has shape {:?}, which needs {expected}",
                    k.name, p.shape
                ),
            });
        }
        Ok(())
    }

    fn shown(&self, file: &Path) -> PathBuf {
        if self.single {
            self.path.clone()
        } else {
            file.to_path_buf()
        }
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The metadata.
    pub fn metadata(&self) -> &StatsMeta {
        &self.meta
    }

    /// `__metadata__["kind"]`: how the statistics were computed.
    pub fn kind(&self) -> &str {
        &self.meta.kind
    }

    /// `__metadata__["examples"]`.
    pub fn examples(&self) -> u64 {
        self.meta.examples
    }

    /// `__metadata__["tokens"]`.
    pub fn tokens(&self) -> u64 {
        self.meta.tokens
    }

    /// Every statistic, in file order (files by name, then by data offset).
    pub fn keys(&self) -> &[StatKey] {
        &self.keys
    }

    fn index(&self, name: &str, kind: StatKind) -> Option<usize> {
        self.by_name.get(name).and_then(|s| s[kind_slot(kind)])
    }

    /// Whether the file holds statistic `kind` of parameter `name`.
    pub fn contains(&self, name: &str, kind: StatKind) -> bool {
        self.index(name, kind).is_some()
    }

    /// The shape of statistic `kind` of parameter `name`, if present.
    pub fn shape(&self, name: &str, kind: StatKind) -> Option<&[usize]> {
        self.index(name, kind)
            .map(|i| self.keys[i].shape.as_slice())
    }

    /// The shape of a statistic a method needs: [`IoError::StatsMissing`] (naming the file
    /// and the key) when it is absent.
    pub fn require(&self, name: &str, kind: StatKind) -> Result<&[usize], IoError> {
        self.shape(name, kind).ok_or_else(|| IoError::StatsMissing {
            file: self.path.clone(),
            key: kind.key(name),
        })
    }

    /// Reads elements `range` (flat, row-major) of statistic `kind` of parameter `name` into
    /// `out` (`out.len() == range.len()`), streaming from the map like
    /// [`Checkpoint::read_f32`]. A missing statistic is [`IoError::StatsMissing`].
    pub fn read(
        &self,
        name: &str,
        kind: StatKind,
        range: Range<usize>,
        out: &mut [f32],
    ) -> Result<(), IoError> {
        self.require(name, kind)?;
        self.ckpt.read_f32(&kind.key(name), range, out)
    }

    /// The stored little-endian F32 bytes of a statistic (zero-copy, e.g. for a device upload).
    pub fn raw(&self, name: &str, kind: StatKind) -> Result<&[u8], IoError> {
        self.require(name, kind)?;
        self.ckpt.raw(&kind.key(name))
    }
}

/// Streams statistics into a new statistics file, key by key in the order given to
/// [`create`](Self::create).
///
/// The data goes through [`CheckpointWriter`] into a staging directory next to the target
/// (`.NAME.stats-partial/`) and [`finish`](Self::finish) renames the finished file into
/// place, so the target never exists half-written; dropping an unfinished writer removes the
/// staging directory. [`write`](Self::write) rejects NaN, infinities and negative values
/// where they cannot occur; symmetry is checked by [`StatsFile::open`].
#[derive(Debug)]
pub struct StatsWriter {
    target: PathBuf,
    staging: PathBuf,
    inner: Option<CheckpointWriter>,
    keys: Vec<StatKey>,
    /// The key being written (index into `keys`) and how many elements it has so far.
    current: Option<(usize, usize)>,
}

impl StatsWriter {
    /// Prepares to write `keys` with `meta` to `path`. Refuses an existing `path` unless
    /// `overwrite` (the old file is replaced only by a successful [`finish`](Self::finish)).
    /// Checks the metadata (kind non-empty, counts ≥ 1, digest well-formed) and the keys
    /// (at least one; names non-empty and unique; matrix kinds square 2-D).
    pub fn create(
        path: &Path,
        meta: &StatsMeta,
        keys: Vec<StatKey>,
        overwrite: bool,
    ) -> Result<StatsWriter, IoError> {
        meta.validate(path)?;
        let key_err = |key: String, reason: String| IoError::StatsKey {
            file: path.to_path_buf(),
            key,
            reason,
        };
        if keys.is_empty() {
            return Err(IoError::InvalidLayout {
                reason: format!(
                    "{}: a statistics file needs at least one key",
                    path.display()
                ),
            });
        }
        let mut seen = std::collections::HashSet::new();
        for k in &keys {
            let key = k.key();
            if k.name.is_empty() {
                return Err(key_err(key, "the parameter name is empty".to_string()));
            }
            if !seen.insert(key.clone()) {
                return Err(key_err(key, "given twice".to_string()));
            }
            check_key_form(path, &key, k.kind, &DType::F32, &k.shape)?;
        }
        let file_name = match path.file_name() {
            Some(n) => n.to_string_lossy().into_owned(),
            None => {
                return Err(IoError::InvalidLayout {
                    reason: format!("{}: not a file path", path.display()),
                })
            }
        };
        if !overwrite && path.exists() {
            return Err(IoError::StatsExists {
                file: path.to_path_buf(),
            });
        }
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent)
            .map_err(|e| IoError::io(&parent, "create directory", e))?;
        let staging = parent.join(format!(".{file_name}.stats-partial"));
        if staging.exists() {
            // Left by a killed writer of the same file: the name is ours.
            std::fs::remove_dir_all(&staging)
                .map_err(|e| IoError::io(&staging, "remove stale staging directory", e))?;
        }
        let tensors = keys
            .iter()
            .map(|k| OutputTensor {
                name: k.key(),
                dtype: DType::F32,
                shape: k.shape.clone(),
            })
            .collect();
        let inner = atomic::stage(&staging, || {
            CheckpointWriter::create(&staging, OutputLayout::plan(tensors, 0), true)
        })?
        .with_metadata(meta.entries());
        Ok(StatsWriter {
            target: path.to_path_buf(),
            staging,
            inner: Some(inner),
            keys,
            current: None,
        })
    }

    fn inner(&mut self) -> &mut CheckpointWriter {
        self.inner
            .as_mut()
            .expect("inner is only taken by finish, which consumes self")
    }

    /// Names the statistics file, not the staging file, in the inner writer's usage errors.
    fn retarget(&self, e: IoError) -> IoError {
        match e {
            IoError::WriteOrder { reason, .. } => IoError::WriteOrder {
                file: self.target.clone(),
                reason,
            },
            IoError::TensorSize {
                tensor,
                written,
                expected,
                ..
            } => IoError::TensorSize {
                file: self.target.clone(),
                tensor,
                written,
                expected,
            },
            other => other,
        }
    }

    /// Starts the next statistic, which must be `kind` of `name` (keys come in the order
    /// given to [`create`](Self::create)); the previous one must be complete.
    pub fn begin(&mut self, name: &str, kind: StatKind) -> Result<(), IoError> {
        let next = self.current.map_or(0, |(i, _)| i + 1);
        let key = kind.key(name);
        // The inner writer checks order and completeness and names the expected key.
        if let Err(e) = self.inner().begin_tensor(&key) {
            return Err(self.retarget(e));
        }
        self.current = Some((next, 0));
        Ok(())
    }

    /// Appends values to the current statistic. NaN, infinities, and negative values in a
    /// diagonal Fisher or on a matrix's diagonal are [`IoError::StatsValue`].
    pub fn write(&mut self, data: &[f32]) -> Result<(), IoError> {
        if let Some((i, done)) = self.current {
            let k = &self.keys[i];
            let d = if k.kind.is_matrix() { k.shape[0] } else { 0 };
            if let Some((j, &x)) = data
                .iter()
                .enumerate()
                .find(|&(j, &x)| bad_value(k.kind, d, done + j, x))
            {
                return Err(value_error(&self.target, &k.key(), k.kind, d, done + j, x));
            }
        }
        // Without a current key, the inner writer reports the misuse.
        if let Err(e) = self.inner().write_f32(data) {
            return Err(self.retarget(e));
        }
        if let Some((_, done)) = self.current.as_mut() {
            *done += data.len();
        }
        Ok(())
    }

    /// Completes the file (every key fully written), renames it into place and removes the
    /// staging directory. Returns the file's path.
    pub fn finish(mut self) -> Result<PathBuf, IoError> {
        let inner = self
            .inner
            .take()
            .expect("inner is only taken here, and finish consumes self");
        let summary = inner.finish().map_err(|e| self.retarget(e))?;
        let written = summary
            .files
            .first()
            .cloned()
            .ok_or_else(|| IoError::WriteOrder {
                file: self.target.clone(),
                reason: "no file was written".to_string(),
            })?;
        atomic::rename(&written, &self.target)?;
        let _ = std::fs::remove_dir_all(&self.staging);
        Ok(self.target.clone())
    }
}

impl Drop for StatsWriter {
    fn drop(&mut self) {
        // An unfinished writer (finish takes `inner`; a failed finish leaves no target).
        drop(self.inner.take());
        if self.staging.exists() {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
        atomic::unstage(&self.staging);
    }
}

/// Writes a whole statistics file from in-memory arrays (`keys[i]` with `data[i]`, each
/// `numel` long) through [`StatsWriter`]. Returns the file's path.
pub fn write_stats(
    path: &Path,
    meta: &StatsMeta,
    entries: &[(StatKey, &[f32])],
    overwrite: bool,
) -> Result<PathBuf, IoError> {
    let keys: Vec<StatKey> = entries.iter().map(|(k, _)| k.clone()).collect();
    let mut w = StatsWriter::create(path, meta, keys, overwrite)?;
    for (k, data) in entries {
        w.begin(&k.name, k.kind)?;
        w.write(data)?;
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_parsing() {
        assert_eq!(
            StatKind::parse_key("a.b.weight::gram_in"),
            Ok(("a.b.weight", StatKind::GramIn))
        );
        assert!(StatKind::parse_key("a.weight::hessian")
            .unwrap_err()
            .contains("::hessian"));
        assert!(StatKind::parse_key("a.weight").is_err());
        assert!(StatKind::parse_key("::fisher").is_err());
        for k in StatKind::ALL {
            assert_eq!(k.suffix().parse::<StatKind>(), Ok(k));
            assert_eq!(StatKind::parse_key(&k.key("x")), Ok(("x", k)));
        }
    }

    #[test]
    fn expected_shapes() {
        assert_eq!(StatKind::Fisher.expected_shape(&[3, 5]), Ok(vec![3, 5]));
        assert_eq!(StatKind::GramIn.expected_shape(&[3, 5]), Ok(vec![5, 5]));
        assert_eq!(StatKind::KfacOut.expected_shape(&[3, 5]), Ok(vec![3, 3]));
        assert_eq!(StatKind::FisherBlock.expected_shape(&[7]), Ok(vec![7, 7]));
        assert!(StatKind::GramIn.expected_shape(&[5]).is_err());
        assert!(StatKind::FisherBlock.expected_shape(&[3, 5]).is_err());
    }

    fn mat_bytes(d: usize, f: impl Fn(usize, usize) -> f32) -> Vec<u8> {
        (0..d * d)
            .flat_map(|k| f(k / d, k % d).to_le_bytes())
            .collect()
    }

    #[test]
    fn symmetry_check_finds_first_pair_across_tiles() {
        // d = 150 spans 3 tiles; a symmetric matrix passes, one bad pair is found exactly.
        let d = 150;
        let sym = |i: usize, j: usize| ((i + j) as f32).sin() + if i == j { 200.0 } else { 0.0 };
        assert_eq!(first_asymmetry(d, &mat_bytes(d, sym)), None);
        let bad = |i: usize, j: usize| {
            if (i, j) == (130, 70) {
                sym(i, j) + 1.0
            } else {
                sym(i, j)
            }
        };
        let (i, j, _, _) = first_asymmetry(d, &mat_bytes(d, bad)).unwrap();
        assert_eq!((i, j), (70, 130));
    }

    #[test]
    fn symmetry_tolerance() {
        // A few ulps of asymmetry relative to sqrt(a_ii a_jj) pass, even on a near-zero entry.
        assert!(symmetric_pair(1e-6, 1.2e-6, 1.0, 1.0));
        assert!(symmetric_pair(0.0, 0.0, 0.0, 0.0));
        assert!(!symmetric_pair(1e-2, 1.2e-2, 1.0, 1.0));
        assert!(!symmetric_pair(1.0, -1.0, 1.0, 1.0));
    }

    #[test]
    fn value_scan() {
        let v: Vec<u8> = [1.0f32, 0.0, -0.0, 2.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(first_bad_value(StatKind::Fisher, 0, &v), None);
        let v: Vec<u8> = [1.0f32, -1.0, f32::NAN]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(first_bad_value(StatKind::Fisher, 0, &v), Some((1, -1.0)));
        // 2x2 matrix: off-diagonal negatives are fine, diagonal ones are not.
        let m: Vec<u8> = [1.0f32, -1.0, -1.0, 1.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(first_bad_value(StatKind::GramIn, 2, &m), None);
        let m: Vec<u8> = [1.0f32, 0.0, 0.0, -1.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(first_bad_value(StatKind::GramIn, 2, &m), Some((3, -1.0)));
    }
}
