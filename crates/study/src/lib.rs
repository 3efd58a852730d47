//! Scaling studies: how merge methods behave as the number of merged models grows, what they
//! cost, and how held-in and held-out quality move.
//!
//! `amalgam study study.yaml --out DIR` reads a study ([`config`]), draws subsets of the pool
//! from fixed seeded permutations ([`subsets`]), runs one merge per (method, hyperparameters,
//! model count, subset) and evaluates it ([`runner`], resumable: records under `DIR/runs/`),
//! accounts its cost ([`cost`]), and writes `DIR/results.csv` ([`csv`]), PNG plots under
//! `DIR/plots/` ([`plots`], embedded font) and `DIR/report.md` ([`report`]) with the best
//! setting per method selected on held-in tasks and reported on held-out tasks ([`select`]).
//!
//! ```yaml
//! base_model: base/
//! pool:
//!   - model: ft1/
//!     statistics: ft1.gram.safetensors   # optional (fisher, regmean, mats)
//!   - model: ft2/
//!   - model: ft3/
//! methods:
//!   - merge_method: linear
//!   - merge_method: task_arithmetic
//!     parameters: {lambda: [0.5, 1.0]}   # lists are grid axes
//! counts: [2, 3]
//! subsets: {permutations: 10, seed: 0, max_per_count: 4}
//! evaluation: {suite: suite.yaml, batch_size: 8}
//! dtype: float32
//! ```
//!
//! The crate has no dependency on the CLI: merges and evaluations run through an
//! [`runner::Executor`], which the `amalgam` binary implements with child processes (so that
//! each merge's peak memory is its own, and a crash is a recorded failure).
#![deny(missing_docs)]

pub mod config;
pub mod cost;
pub mod csv;
pub mod plots;
pub mod report;
pub mod runner;
pub mod select;
pub mod subsets;

use anyhow::{Context, Result};
use std::path::Path;

/// Writes `results.csv`, the plots and `report.md` for `records` into `out`.
pub fn write_outputs(records: &[runner::RunRecord], out: &Path) -> Result<()> {
    amalgam_io::write_text_atomic(&out.join("results.csv"), &csv::to_csv(records))
        .context("writing results.csv")?;
    let plots = plots::draw_all(records, &out.join("plots"))?;
    let rel: Vec<std::path::PathBuf> = plots.iter().map(|p| Path::new("plots").join(p)).collect();
    amalgam_io::write_text_atomic(&out.join("report.md"), &report::to_markdown(records, &rel))
        .context("writing report.md")?;
    Ok(())
}
