//! amalgam-core: the merge math of amalgam, free of I/O and networking.
//!
//! What lives here:
//! - [`tensor`]: the view a merge method has of one output tensor ([`tensor::TensorJob`]) and the
//!   two traits through which it reads its inputs and writes its output in bounded blocks
//!   ([`tensor::TensorReader`], [`tensor::TensorWriter`]). The checkpoint crate implements them
//!   over memory-mapped safetensors; tests implement them over vectors.
//! - [`methods`]: one module per merge method (methods.md §1-§8, §19), each a pure function of
//!   its inputs, and the registry that builds a method from its resolved parameters.
//! - [`params`]: parameters resolved for one tensor (gradients and filters already applied).
//! - [`config`]: the mergekit-compatible YAML config model and its validation.
//! - [`plan`]: the planner, which turns a config and the inputs' tensor lists into per-tensor work.
//! - [`reduce`], [`select`], [`philox`]: deterministic reductions, exact selection and the
//!   counter-based RNG shared by the methods.
//!
//! Data flow: the planner produces a [`plan::TensorPlan`] per output tensor; the executor (in the
//! CLI) builds the method from the registry, wraps the inputs in a [`tensor::TensorReader`] and
//! the output in a [`tensor::TensorWriter`], and calls [`methods::MergeMethod::merge`].
#![deny(missing_docs)]

pub mod adapters;
pub mod config;
pub mod error;
pub mod linalg;
pub mod methods;
pub mod params;
pub mod philox;
pub mod plan;
pub mod raw;
pub mod reduce;
pub mod select;
pub mod simd;
pub mod solve;
pub mod tensor;

pub use error::MergeError;
