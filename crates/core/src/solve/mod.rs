//! Iterative solvers for the data-driven methods (methods.md §11, MaTS).
//!
//! - [`cg`]: conjugate gradient exactly as SciPy's `scipy.sparse.linalg.cg` runs it (no
//!   preconditioner), over an unknown split into parts whose inner products are reduced through
//!   a caller-supplied callback (architecture.md, "Split blocks"), so the same code runs in one
//!   process and across the cluster.

pub mod cg;
