//! `amalgam inspect`: what a checkpoint holds, and whether it is valid.

use crate::size::human;
use amalgam_io::Checkpoint;
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

/// Arguments of `amalgam inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A `.safetensors` file or a Hugging Face checkpoint directory.
    pub path: PathBuf,
    /// Also scan every value for NaN / Inf (reads the whole checkpoint).
    #[arg(long)]
    pub check_values: bool,
    /// Print a JSON summary instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Run `amalgam inspect`.
pub fn run(args: InspectArgs) -> Result<()> {
    let ckpt = Checkpoint::open(&args.path)
        .with_context(|| format!("{} is not a valid checkpoint", args.path.display()))?;
    let mut problems = Vec::new();
    if args.check_values {
        for t in ckpt.tensors() {
            if t.dtype.is_mergeable() {
                if let Err(e) = ckpt.check_finite(&t.name) {
                    problems.push(e.to_string());
                }
            }
        }
    }
    let total: u64 = ckpt
        .tensors()
        .iter()
        .map(|t| t.data_range.len() as u64)
        .sum();
    if args.json {
        let tensors: Vec<serde_json::Value> = ckpt
            .tensors()
            .iter()
            .map(|t| {
                serde_json::json!({
                    "name": t.name, "dtype": t.dtype.as_str(), "shape": t.shape,
                    "bytes": t.data_range.len(), "file": t.file.display().to_string(),
                })
            })
            .collect();
        let v = serde_json::json!({"path": args.path.display().to_string(), "tensors": tensors,
            "total_bytes": total, "problems": problems});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{:<60} {:<6} {:>20} {:>12}",
            "tensor", "dtype", "shape", "bytes"
        );
        for t in ckpt.tensors() {
            println!(
                "{:<60} {:<6} {:>20} {:>12}",
                t.name,
                t.dtype.as_str(),
                format!("{:?}", t.shape),
                human(t.data_range.len() as u64)
            );
        }
        let params: usize = ckpt
            .tensors()
            .iter()
            .map(|t| t.shape.iter().product::<usize>())
            .sum();
        println!(
            "{} tensors, {} parameters, {}",
            ckpt.tensors().len(),
            params,
            human(total)
        );
        if problems.is_empty() {
            println!(
                "no problems found{}",
                if args.check_values {
                    ""
                } else {
                    " in the headers (pass --check-values to scan values)"
                }
            );
        } else {
            for p in &problems {
                println!("problem: {p}");
            }
        }
    }
    if !problems.is_empty() {
        anyhow::bail!("{} problem(s) found", problems.len());
    }
    Ok(())
}
