//! Synthetic statistics files for the data-driven methods' process tests.

use super::tiny_family;
use amalgam_io::{write_stats, Checkpoint, StatKey, StatKind, StatsMeta};
use std::path::Path;

/// Deterministic pseudo-random values in [-1, 1).
fn values(seed: u64, n: usize) -> Vec<f64> {
    let mut z = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            z ^= z << 13;
            z ^= z >> 7;
            z ^= z << 17;
            ((z >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect()
}

/// A symmetric positive-definite d x d Gram matrix XᵀX/rows (+ small diagonal), as f32.
fn gram(seed: u64, d: usize) -> Vec<f32> {
    let rows = d + 3;
    let x = values(seed, rows * d);
    let mut g = vec![0f64; d * d];
    for r in 0..rows {
        for i in 0..d {
            for j in 0..d {
                g[i * d + j] += x[r * d + i] * x[r * d + j] / rows as f64;
            }
        }
    }
    for i in 0..d {
        g[i * d + i] += 1e-3;
    }
    g.into_iter().map(|v| v as f32).collect()
}

/// Write statistics for every tensor of `model`: `gram_in` for linear weights, `fisher` for all.
pub fn write_model_stats(dir: &Path, model: &str, seed: u64) {
    let ck = Checkpoint::open(&dir.join(model)).unwrap();
    let mut owned: Vec<(StatKey, Vec<f32>)> = Vec::new();
    for (k, t) in ck.tensors().iter().enumerate() {
        let n: usize = t.shape.iter().product();
        let f: Vec<f32> = values(seed * 1000 + k as u64, n)
            .into_iter()
            .map(|v| (v.abs() + 0.05) as f32)
            .collect();
        owned.push((
            StatKey::new(t.name.clone(), StatKind::Fisher, t.shape.clone()),
            f,
        ));
        if t.shape.len() == 2 && t.name.contains("_proj.") {
            let d_in = t.shape[1];
            owned.push((
                StatKey::new(t.name.clone(), StatKind::GramIn, vec![d_in, d_in]),
                gram(seed * 7919 + k as u64, d_in),
            ));
        }
    }
    let entries: Vec<(StatKey, &[f32])> = owned
        .iter()
        .map(|(k, v)| (k.clone(), v.as_slice()))
        .collect();
    let meta = StatsMeta::new("synthetic", 10, 100).for_model(&ck);
    write_stats(
        &dir.join(format!("{model}.stats.safetensors")),
        &meta,
        &entries,
        true,
    )
    .unwrap();
}

/// A base and 2 fine-tunes (`ft1`, `ft2`) of one layer, with statistics: their MLP weights
/// (256 × 128 and 128 × 256) are 2 reduction chunks each, so a MaTS block splits in two parts.
pub fn split_mats_family(d: &Path) {
    tiny_family(
        d,
        2,
        &[
            "--hidden",
            "128",
            "--intermediate",
            "256",
            "--heads",
            "2",
            "--kv-heads",
            "1",
            "--vocab",
            "32",
            "--layers",
            "1",
        ],
    );
    write_model_stats(d, "ft1", 1);
    write_model_stats(d, "ft2", 2);
}
