//! amalgam-io: checkpoint I/O for amalgam.
//!
//! This crate owns everything between the merge and the disk: reading and validating
//! safetensors checkpoints (single files and Hugging Face sharded directories), converting
//! between stored dtypes and the f32 that merges compute in, writing the merged checkpoint as
//! sharded safetensors with its index, copying config and tokenizer files, and checksums.
//! It knows nothing of merge methods, configs or the cluster: callers pass tensor names,
//! element ranges and output layouts.
//!
//! # Brief overview
//!
//! - [`Checkpoint::open`] (architecture.md step 1, Inspect) maps every file and validates
//!   every header and index entry up front: offsets inside the file, no overlaps, byte sizes
//!   matching dtype × shape, index entries inside the checkpoint directory and present in
//!   their shard, no tensor in two shards. Errors ([`IoError`]) name the file and tensor.
//!   Reads then slice the maps: [`Checkpoint::read_f32`] converts a range of elements to f32,
//!   [`Checkpoint::raw`] gives the stored bytes for pass-through.
//! - [`OutputLayout::plan`] assigns output tensors to files of bounded size (mergekit
//!   naming); [`CheckpointWriter`] (step 5, Reassemble) streams each tensor's data into its
//!   file in layout order through a bounded buffer, under temporary names that
//!   [`CheckpointWriter::finish`] renames, writing the index last. A crash never leaves a
//!   half-written file under a final name.
//! - [`copy_aux_files`], [`read_vocab`] and [`write_text_atomic`] handle the rest of a model
//!   directory.
//!
//! - [`gguf`] reads llama.cpp GGUF files: [`Checkpoint::open`] accepts a `.gguf` file and
//!   presents its tensors dequantized (to F32; F16/BF16/F32 kept) under Hugging Face names,
//!   from an in-memory safetensors image (the whole model lives in memory while open);
//!   [`gguf::hf_config_json`] and [`gguf::tokenizer_json`] give the `config.json` and
//!   `tokenizer.json` equivalents from its metadata.
//!
//! Data flow: `Checkpoint` (mmap) → `read_f32` → merge (f32) → `CheckpointWriter::write_f32`
//! (rounded to the output dtype) → `.partial` file → rename.

#![deny(missing_docs)]

mod atomic;
mod aux_files;
pub mod checksum;
mod dtype;
mod error;
pub mod gguf;
pub mod hf_index;
pub mod peft;
pub mod safetensors;
pub mod stats;

pub use atomic::{remove_staged_and_exit, stage, temp_path, unstage, write_text_atomic};
pub use aux_files::{copy_aux_files, copy_files, read_vocab, AUX_FILES, TOKENIZER_FILES};
pub use dtype::{encode_f32, find_non_finite, DType};
pub use error::IoError;
pub use hf_index::{INDEX_FILE, SINGLE_FILE};
pub use peft::{
    write_adapter, Adapter, AdapterConfig, AdapterKind, AdapterModules, AdapterWriter, Ia3Config,
    Ia3Module, LoraConfig, LoraModule, TargetModules,
};
pub use safetensors::read::{Checkpoint, CheckpointFile, TensorMeta};
pub use safetensors::write::{
    CheckpointWriter, OutputFile, OutputLayout, OutputSummary, OutputTensor,
};
pub use stats::{write_stats, StatKey, StatKind, StatsFile, StatsMeta, StatsWriter};
