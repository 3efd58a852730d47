//! The crate's error type: one variant per thing that can go wrong, each carrying the file,
//! tensor or index entry it concerns, with a message that says what to do next.

use std::ops::Range;
use std::path::PathBuf;

/// Errors from reading, validating and writing checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// An operating-system I/O error on a path.
    #[error("{}: {op} failed: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done ("open", "read", "write", "rename", ...).
        op: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file that must exist does not.
    #[error("{}: file not found; check the path (a checkpoint is a .safetensors file or a directory holding model.safetensors or model.safetensors.index.json)", path.display())]
    FileMissing {
        /// The missing file.
        path: PathBuf,
    },
    /// A directory holds neither `model.safetensors` nor `model.safetensors.index.json`.
    #[error("{}: no checkpoint here: expected model.safetensors or model.safetensors.index.json{}", dir.display(), found_hint(found))]
    NoCheckpoint {
        /// The directory.
        dir: PathBuf,
        /// The `*.safetensors` files that were found (pass one of them directly to use it).
        found: Vec<String>,
    },
    /// The file is shorter than the 8-byte header length prefix.
    #[error("{}: file is {len} bytes, too short for a safetensors header (needs at least 8); the file is truncated or not safetensors", file.display())]
    FileTooShort {
        /// The file.
        file: PathBuf,
        /// Its length in bytes.
        len: u64,
    },
    /// The header length prefix points past the end of the file.
    #[error("{}: header length prefix says {header_len} bytes but the file has only {file_len} bytes; the file is truncated or not safetensors", file.display())]
    HeaderTooLarge {
        /// The file.
        file: PathBuf,
        /// The header length from the prefix.
        header_len: u64,
        /// The file's length.
        file_len: u64,
    },
    /// The header is not valid UTF-8 JSON, or not a JSON object.
    #[error("{}: header is not a valid safetensors JSON object: {reason}; the file is corrupt or not safetensors", file.display())]
    HeaderNotJson {
        /// The file.
        file: PathBuf,
        /// What the JSON parser said.
        reason: String,
    },
    /// A tensor entry lacks `dtype`/`shape`/`data_offsets` or has them in the wrong form.
    #[error("{}: tensor \"{tensor}\": malformed header entry: {reason}", file.display())]
    MalformedTensor {
        /// The file.
        file: PathBuf,
        /// The tensor name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor's data offsets lie outside the file's data section.
    #[error("{}: tensor \"{tensor}\": data_offsets [{begin}, {end}] lie outside the data section ({data_len} bytes); the file is truncated or its header is corrupt", file.display())]
    OffsetsOutOfFile {
        /// The file.
        file: PathBuf,
        /// The tensor name.
        tensor: String,
        /// Start offset (relative to the data section).
        begin: u64,
        /// End offset (relative to the data section).
        end: u64,
        /// Length of the data section.
        data_len: u64,
    },
    /// Two tensors' byte ranges overlap.
    #[error("{}: tensor \"{tensor}\" overlaps tensor \"{other}\" in the data section; the header is corrupt (re-export the checkpoint)", file.display())]
    OverlappingTensors {
        /// The file.
        file: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The tensor it overlaps.
        other: String,
    },
    /// A tensor's byte length does not equal dtype size × number of elements.
    #[error("{}: tensor \"{tensor}\": {dtype} {shape:?} needs {expected} bytes but data_offsets give {actual}; the header is corrupt", file.display())]
    SizeMismatch {
        /// The file.
        file: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The dtype string.
        dtype: String,
        /// The shape.
        shape: Vec<usize>,
        /// Expected byte length (`u64::MAX` when it overflows or sub-byte elements leave a partial byte).
        expected: u64,
        /// Byte length from the offsets.
        actual: u64,
    },
    /// The index JSON is malformed.
    #[error("{}: malformed index: {reason}; expected {{\"metadata\": {{...}}, \"weight_map\": {{\"tensor\": \"file.safetensors\", ...}}}}", index.display())]
    IndexMalformed {
        /// The index file.
        index: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An index entry names a file outside the checkpoint directory.
    #[error("{}: tensor \"{tensor}\" maps to \"{entry}\", which is outside the checkpoint directory; weight_map entries must be plain relative file names", index.display())]
    IndexPathEscapes {
        /// The index file.
        index: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The offending weight_map value.
        entry: String,
    },
    /// An index entry names a file that does not exist.
    #[error("{}: tensor \"{tensor}\" maps to {}, which does not exist; the checkpoint is incomplete (re-download the missing shard)", index.display(), file.display())]
    IndexFileMissing {
        /// The index file.
        index: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The missing file.
        file: PathBuf,
    },
    /// A tensor named in the index is not in the file the index points to.
    #[error("{}: tensor \"{tensor}\" is listed in the index but missing from {}; the index and shards disagree (re-download the checkpoint)", index.display(), file.display())]
    IndexTensorMissing {
        /// The index file.
        index: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The shard that should hold it.
        file: PathBuf,
    },
    /// The same tensor name appears in two shard files.
    #[error("tensor \"{tensor}\" appears in both {} and {}; a checkpoint must hold each tensor once", first.display(), second.display())]
    DuplicateTensor {
        /// The tensor name.
        tensor: String,
        /// The first file holding it.
        first: PathBuf,
        /// The second file holding it.
        second: PathBuf,
    },
    /// A tensor was asked for that the checkpoint does not hold.
    #[error("{}: no tensor named \"{tensor}\" in this checkpoint", root.display())]
    UnknownTensor {
        /// The checkpoint root.
        root: PathBuf,
        /// The tensor name.
        tensor: String,
    },
    /// A tensor's dtype cannot be used for the requested operation.
    #[error("{}: tensor \"{tensor}\": dtype {dtype} is not supported for {op}; only F32, F16, BF16 and F64 tensors can be merged (pass such tensors through unchanged instead)", file.display())]
    UnsupportedDtype {
        /// The file (or output file name).
        file: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The dtype string.
        dtype: String,
        /// The operation ("conversion to f32", "writing from f32", ...).
        op: &'static str,
    },
    /// An element range or buffer length does not fit the tensor.
    #[error("{}: tensor \"{tensor}\": element range {range:?} with a buffer of {buffer_len} does not fit the tensor's {numel} elements", file.display())]
    RangeOutOfBounds {
        /// The file.
        file: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The requested element range.
        range: Range<usize>,
        /// The output buffer's length.
        buffer_len: usize,
        /// The tensor's element count.
        numel: usize,
    },
    /// A tensor holds a NaN or infinity.
    #[error("{}: tensor \"{tensor}\": element {index} is {value}; the input holds non-finite values (fix or drop this model)", file.display())]
    NonFinite {
        /// The file.
        file: PathBuf,
        /// The tensor name.
        tensor: String,
        /// Index (flat, row-major) of the first non-finite element.
        index: usize,
        /// The value ("NaN", "inf", "-inf").
        value: String,
    },
    /// The output directory already holds a checkpoint.
    #[error("{}: already holds a checkpoint ({found}); choose another output directory or allow overwriting (--overwrite)", dir.display())]
    OutputExists {
        /// The output directory.
        dir: PathBuf,
        /// The first checkpoint file found there.
        found: String,
    },
    /// The output path exists and is not a directory.
    #[error("{}: exists and is not a directory; the output is a directory (created if missing)", path.display())]
    OutputNotDirectory {
        /// The output path.
        path: PathBuf,
    },
    /// The output layout is unusable.
    #[error("output layout: {reason}")]
    InvalidLayout {
        /// What is wrong.
        reason: String,
    },
    /// Tensors were written out of layout order, or the writer was misused.
    #[error("{}: {reason}", file.display())]
    WriteOrder {
        /// The output file concerned.
        file: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// More, or fewer, bytes were written for a tensor than its dtype and shape need.
    #[error("{}: tensor \"{tensor}\": {written} bytes written but {expected} expected", file.display())]
    TensorSize {
        /// The output file.
        file: PathBuf,
        /// The tensor name.
        tensor: String,
        /// Bytes written (or that would have been written).
        written: u64,
        /// Bytes the tensor needs.
        expected: u64,
    },
    /// `tokenizer.json` is malformed.
    #[error("{}: cannot read the vocabulary: {reason}", path.display())]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A statistics file's `__metadata__` entry is missing or invalid (architecture.md
    /// "Statistics files").
    #[error("{}: statistics metadata \"{key}\": {reason}; a statistics file's __metadata__ needs \"amalgam.stats\": \"1\", a \"kind\" string, \"examples\" >= 1 and \"tokens\" >= 1 (recompute the statistics with `amalgam stats`)", file.display())]
    StatsMetadata {
        /// The statistics file.
        file: PathBuf,
        /// The metadata key (`amalgam.stats`, `kind`, `examples`, `tokens`, `model_header_sha256`).
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A statistics key is malformed: no or an unknown `::` suffix, a dtype other than F32,
    /// a matrix statistic that is not square 2-D, a key written twice.
    #[error("{}: statistics key \"{key}\": {reason}", file.display())]
    StatsKey {
        /// The statistics file.
        file: PathBuf,
        /// The full key (`NAME::suffix`).
        key: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// A statistic holds a NaN, an infinity, or a negative value where only non-negative
    /// values can occur (a diagonal Fisher; the diagonal of a Gram or Fisher matrix).
    #[error("{}: statistics key \"{key}\": element {index} is {value}; {reason}", file.display())]
    StatsValue {
        /// The statistics file.
        file: PathBuf,
        /// The full key.
        key: String,
        /// Flat (row-major) index of the first bad element.
        index: usize,
        /// The value ("NaN", "inf", "-inf", or the negative number).
        value: String,
        /// Why it is wrong and what to do.
        reason: String,
    },
    /// A Gram or Fisher matrix statistic is not symmetric within the tolerance.
    #[error("{}: statistics key \"{key}\" is not symmetric: element ({row}, {col}) is {a_ij:e} but ({col}, {row}) is {a_ji:e} (allowed: relative difference {rtol:e} of max(|a_ij|, |a_ji|, sqrt(|a_ii| |a_jj|))); a Gram or Fisher matrix is symmetric, so the file is corrupt or was written in the wrong layout (recompute the statistics)", file.display())]
    StatsNotSymmetric {
        /// The statistics file.
        file: PathBuf,
        /// The full key.
        key: String,
        /// Row of the first offending pair (`row < col`).
        row: usize,
        /// Column of the first offending pair.
        col: usize,
        /// The element at (row, col).
        a_ij: f32,
        /// The element at (col, row).
        a_ji: f32,
        /// The relative tolerance applied.
        rtol: f64,
    },
    /// A statistic a method needs is not in the statistics file.
    #[error("{}: no statistic \"{key}\"; the merge method needs it for this tensor: recompute the statistics with the kind this method needs (`amalgam stats`), or merge this tensor with a method that needs none", file.display())]
    StatsMissing {
        /// The statistics file.
        file: PathBuf,
        /// The missing key (`NAME::suffix`).
        key: String,
    },
    /// The statistics record a model header digest that is not the model's.
    #[error("{}: statistics were computed for a different model: its model_header_sha256 is {expected} but {} has {actual}; recompute the statistics for this model (`amalgam stats`) or point `statistics:` at the file made for it", stats.display(), model.display())]
    StatsWrongModel {
        /// The statistics file.
        stats: PathBuf,
        /// The model checkpoint.
        model: PathBuf,
        /// The digest recorded in the statistics.
        expected: String,
        /// The model's digest.
        actual: String,
    },
    /// A statistics key names a parameter the model does not have.
    #[error("{}: statistics key \"{key}\" is for parameter \"{param}\", which model {} does not have; the statistics were computed for a different model (recompute them, or point `statistics:` at the file made for this model)", stats.display(), model.display())]
    StatsUnknownParameter {
        /// The statistics file.
        stats: PathBuf,
        /// The model checkpoint.
        model: PathBuf,
        /// The full key.
        key: String,
        /// The parameter name (the key without its suffix).
        param: String,
    },
    /// A statistic's shape does not fit its parameter's shape.
    #[error("{}: statistics key \"{key}\" has shape {actual:?} but in model {} {need}; the statistics were computed for a different model (recompute them)", stats.display(), model.display())]
    StatsShape {
        /// The statistics file.
        stats: PathBuf,
        /// The model checkpoint.
        model: PathBuf,
        /// The full key (`NAME::suffix`; NAME is the parameter).
        key: String,
        /// The statistic's shape.
        actual: Vec<usize>,
        /// What the parameter needs, in words: `parameter "P" has shape [3, 4], which needs [4, 4]`.
        need: String,
    },
    /// The statistics file to write already exists.
    #[error("{}: already exists; choose another path for the statistics or allow overwriting (--overwrite)", file.display())]
    StatsExists {
        /// The existing file.
        file: PathBuf,
    },
    /// A path given as a PEFT adapter is not one: no directory, no `adapter_config.json`, or
    /// no weights file.
    #[error("{}: not a PEFT adapter directory: {reason}; an adapter directory holds adapter_config.json and adapter_model.safetensors (as written by PEFT's save_pretrained)", dir.display())]
    NoAdapter {
        /// The directory.
        dir: PathBuf,
        /// What is missing.
        reason: String,
    },
    /// The adapter's weights are only in PyTorch pickle format (`adapter_model.bin`).
    #[error("{}: adapter weights in PyTorch pickle format are not read (pickles can run code); convert them to safetensors first, e.g. in Python: `safetensors.torch.save_file(torch.load(\"adapter_model.bin\"), \"adapter_model.safetensors\", metadata={{\"format\": \"pt\"}})`", file.display())]
    AdapterNotSafetensors {
        /// The `.bin` file.
        file: PathBuf,
    },
    /// `adapter_config.json` is malformed, names an unsupported adapter type or option, or
    /// holds an invalid value or pattern.
    #[error("{}: \"{key}\": {reason}", file.display())]
    AdapterConfig {
        /// The config file.
        file: PathBuf,
        /// The config field (`peft_type`, `r`, `rank_pattern`, ...).
        key: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// An adapter tensor is missing, has the wrong shape, disagrees with the config, or is of
    /// an unsupported kind.
    #[error("{}: tensor \"{key}\": {reason}", file.display())]
    AdapterTensor {
        /// The adapter weights file.
        file: PathBuf,
        /// The tensor key.
        key: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// An adapter holds no adapter tensors of its type.
    #[error("{}: holds no {what} tensors; an adapter needs at least one adapted module", file.display())]
    AdapterEmpty {
        /// The adapter weights file.
        file: PathBuf,
        /// What was looked for ("LoRA (lora_A/lora_B)", "(IA)^3 (ia3_l)").
        what: &'static str,
    },
    /// An adapter does not fit the base model it is applied to.
    #[error("{}: module \"{module}\" does not fit the base model {}: {reason}; use the base model the adapter was trained on", adapter.display(), base.display())]
    AdapterBase {
        /// The adapter weights file.
        adapter: PathBuf,
        /// The adapted module (`model.layers.0.self_attn.q_proj`).
        module: String,
        /// The base checkpoint file (or directory) consulted.
        base: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A GGUF file cannot be read as a Hugging Face checkpoint: bad magic or version, an
    /// unsupported tensor encoding or architecture, a tensor with no Hugging Face name,
    /// missing or malformed metadata.
    #[error("{}: GGUF {item}: {reason}", file.display())]
    Gguf {
        /// The GGUF file.
        file: PathBuf,
        /// What the error concerns: `header`, `tensor "NAME"`, `metadata "KEY"`, `tokenizer`.
        item: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The output directory already holds an adapter.
    #[error("{}: already holds an adapter ({found}); choose another output directory or allow overwriting (--overwrite)", dir.display())]
    AdapterExists {
        /// The output directory.
        dir: PathBuf,
        /// The adapter file found there.
        found: String,
    },
}

fn found_hint(found: &[String]) -> String {
    if found.is_empty() {
        String::new()
    } else {
        format!(
            " (found {}; pass a .safetensors file directly to use it)",
            found.join(", ")
        )
    }
}

impl IoError {
    /// Wraps an `std::io::Error` with its path and operation; `NotFound` becomes [`IoError::FileMissing`].
    pub fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound && op == "open" {
            IoError::FileMissing { path }
        } else {
            IoError::Io { path, op, source }
        }
    }
}
