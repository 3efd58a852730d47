//! `amalgam generate`: write a seeded synthetic Llama-shaped checkpoint.

use crate::size::parse_size;
use amalgam_engine::synth::{perturb_model, write_model, SynthSpec, SynthValues};
use amalgam_io::DType;
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

/// Arguments of `amalgam generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Output directory (a Hugging Face layout: safetensors, index, config.json).
    pub dir: PathBuf,
    /// Hidden size.
    #[arg(long, default_value_t = 64)]
    pub hidden: usize,
    /// MLP intermediate size.
    #[arg(long, default_value_t = 176)]
    pub intermediate: usize,
    /// Decoder layers.
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// Key-value heads.
    #[arg(long, default_value_t = 2)]
    pub kv_heads: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 256)]
    pub vocab: usize,
    /// Stored dtype: float32, float16 or bfloat16.
    #[arg(long, default_value = "float32")]
    pub dtype: String,
    /// Seed of the base weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Seed of the fine-tune perturbation.
    #[arg(long, default_value_t = 1)]
    pub delta_seed: u64,
    /// Perturbation amplitude (0 writes the base model).
    #[arg(long, default_value_t = 0.0)]
    pub delta_scale: f32,
    /// Fraction of elements perturbed.
    #[arg(long, default_value_t = 1.0)]
    pub delta_density: f32,
    /// Maximum output file size.
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    pub shard_size: u64,
    /// Replace an existing checkpoint.
    #[arg(long)]
    pub overwrite: bool,
    /// Perturb this real checkpoint (a directory, safetensors or GGUF file) instead of making
    /// one up: every matrix gets `--delta-scale · u` added (u uniform in [-1, 1), seeded by
    /// `--delta-seed`); vectors and config/tokenizer files are copied. Makes evaluable
    /// "fine-tunes" of a real model for trying studies and merges.
    #[arg(long, value_name = "MODEL")]
    pub from: Option<PathBuf>,
}

/// Run `amalgam generate`.
pub fn run(a: GenerateArgs, quiet: bool) -> Result<()> {
    if let Some(from) = &a.from {
        perturb_model(
            from,
            &a.dir,
            a.delta_seed,
            a.delta_scale,
            a.shard_size,
            a.overwrite,
        )
        .with_context(|| format!("perturbing {}", from.display()))?;
        if !quiet {
            println!(
                "wrote {} ({} + {} x uniform noise, seed {})",
                a.dir.display(),
                from.display(),
                a.delta_scale,
                a.delta_seed
            );
        }
        return Ok(());
    }
    let dtype = DType::from_config_name(&a.dtype)
        .with_context(|| format!("--dtype {}: use float32, float16 or bfloat16", a.dtype))?;
    let spec = SynthSpec {
        hidden: a.hidden,
        intermediate: a.intermediate,
        layers: a.layers,
        heads: a.heads,
        kv_heads: a.kv_heads,
        vocab: a.vocab,
        dtype,
    };
    anyhow::ensure!(
        a.heads > 0 && a.hidden.is_multiple_of(a.heads),
        "--hidden must be a multiple of --heads"
    );
    let values = SynthValues {
        base_seed: a.seed,
        delta_seed: a.delta_seed,
        delta_scale: a.delta_scale,
        delta_density: a.delta_density,
    };
    write_model(&a.dir, &spec, &values, a.shard_size, a.overwrite)?;
    if !quiet {
        println!("wrote {} ({} parameters)", a.dir.display(), spec.params());
    }
    Ok(())
}
