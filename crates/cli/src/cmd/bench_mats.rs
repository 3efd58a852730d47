//! `amalgam bench --suite mats`: MaTS (Gram objective, conjugate gradient) on 4 synthetic
//! Llama-shaped fine-tunes (hidden 1024, 2 layers, 10 iterations), against two baselines measured
//! in the same run: the matmul floor of one CG iteration (2·d_in²·d_out flops per solved weight at
//! the f64 matmul rate measured here) and a `task_arithmetic` merge of the same models.

use super::bench::timed_merge;
use amalgam_engine::synth::{write_model, SynthSpec, SynthValues};
use amalgam_io::{write_stats, Checkpoint, DType, StatKey, StatKind, StatsMeta};
use anyhow::Result;
use std::path::Path;
use std::time::Instant;

const ITERATIONS: usize = 10;

/// A symmetric, strictly diagonally dominant (so positive-definite) d x d matrix, seeded.
fn spd(seed: u64, d: usize) -> Vec<f32> {
    let mut g = vec![0f32; d * d];
    for i in 0..d {
        for j in 0..i {
            let v = 0.5 * amalgam_engine::synth::uniform(seed, i as u64, j as u64) / d as f32;
            g[i * d + j] = v;
            g[j * d + i] = v;
        }
    }
    for i in 0..d {
        let off: f32 = (0..d).filter(|&j| j != i).map(|j| g[i * d + j].abs()).sum();
        g[i * d + i] =
            1.0 + off + 0.5 * (1.0 + amalgam_engine::synth::uniform(seed ^ 77, i as u64, 0));
    }
    g
}

/// Run the MaTS benchmark in `dir`.
pub fn run(dir: &Path, budget: u64) -> Result<()> {
    let spec = SynthSpec {
        hidden: 1024,
        intermediate: 2816,
        layers: 2,
        heads: 16,
        kv_heads: 8,
        vocab: 32000,
        dtype: DType::F32,
    };
    let names = ["base", "ft1", "ft2", "ft3", "ft4"];
    let t = Instant::now();
    for (i, n) in names.iter().enumerate() {
        let d = dir.join(n);
        if !d.join("config.json").exists() {
            let v = SynthValues {
                base_seed: 9,
                delta_seed: 200 + i as u64,
                delta_scale: if i == 0 { 0.0 } else { 0.01 },
                delta_density: 1.0,
            };
            write_model(&d, &spec, &v, 5_000_000_000, true)?;
        }
        if i > 0 && !dir.join(format!("{n}.stats.safetensors")).exists() {
            let ck = Checkpoint::open(&d)?;
            let mut owned: Vec<(StatKey, Vec<f32>)> = Vec::new();
            for (k, t) in ck.tensors().iter().enumerate() {
                if amalgam_core::plan::is_linear_weight(&t.name, &t.shape) {
                    let din = t.shape[1];
                    owned.push((
                        StatKey::new(t.name.clone(), StatKind::GramIn, vec![din, din]),
                        spd((i * 1000 + k) as u64, din),
                    ));
                }
            }
            let entries: Vec<(StatKey, &[f32])> = owned
                .iter()
                .map(|(k, v)| (k.clone(), v.as_slice()))
                .collect();
            write_stats(
                &dir.join(format!("{n}.stats.safetensors")),
                &StatsMeta::new("synthetic", 1, 1).for_model(&ck),
                &entries,
                true,
            )?;
        }
    }
    println!(
        "mats: {} parameters per model; inputs and Gram statistics ready in {:.1} s",
        spec.params(),
        t.elapsed().as_secs_f64()
    );

    // Matmul rate (f64, the CG matvec's arithmetic), measured now.
    let (m, k, n) = (1024usize, 1024usize, 2816usize);
    let a: Vec<f64> = (0..m * k).map(|i| (i % 97) as f64 * 1e-3).collect();
    let b: Vec<f64> = (0..k * n).map(|i| (i % 89) as f64 * 1e-3).collect();
    let _ = amalgam_core::linalg::matmul(&a, m, k, &b, n);
    let t = Instant::now();
    let reps = 3;
    for _ in 0..reps {
        std::hint::black_box(amalgam_core::linalg::matmul(&a, m, k, &b, n));
    }
    let rate = (2 * m * k * n * reps) as f64 / t.elapsed().as_secs_f64();
    // Flops of one CG iteration of one layer: Σ over its linear weights of 2·d_in²·d_out.
    let h = spec.hidden;
    let kv = h / spec.heads * spec.kv_heads;
    let it = spec.intermediate;
    let shapes = [(h, h), (kv, h), (kv, h), (h, h), (it, h), (it, h), (h, it)];
    let layer_flops: f64 = shapes
        .iter()
        .map(|&(dout, din)| 2.0 * (din * din * dout) as f64)
        .sum();
    let floor_iter = layer_flops / rate;

    let models: String = names[1..]
        .iter()
        .map(|n| format!("  - model: {n}\n    statistics: {n}.stats.safetensors\n    parameters: {{weight: 1.0}}\n"))
        .collect();
    let ta = format!("merge_method: task_arithmetic\nbase_model: base\nmodels:\n{models}parameters:\n  lambda: 0.3\n");
    let mats = format!(
        "merge_method: mats\nbase_model: base\nmodels:\n{models}parameters:\n  objective: gram\n  iterations: {ITERATIONS}\n  rtol: 0.0\n  atol: 0.0\n"
    );
    std::fs::write(dir.join("ta.yaml"), ta)?;
    std::fs::write(dir.join("mats.yaml"), mats)?;
    let (ta_wall, ta_peak) = timed_merge(&dir.join("ta.yaml"), &dir.join("out-ta"), budget)?;
    let (mats_wall, mats_peak) =
        timed_merge(&dir.join("mats.yaml"), &dir.join("out-mats"), budget)?;
    let log = std::fs::read_to_string(dir.join("out-mats").join(amalgam_engine::run::SOLVER_LOG))
        .unwrap_or_default();
    let blocks = log.lines().count();
    let cg_time = (mats_wall - ta_wall).as_secs_f64().max(0.0);
    let per_iter_layer = cg_time / (ITERATIONS * spec.layers) as f64;
    println!();
    println!("| measure | value |");
    println!("|---|---:|");
    println!("| f64 matmul rate | {:.1} GFLOP/s |", rate / 1e9);
    println!(
        "| CG iteration floor per layer (2·d_in²·d_out per weight) | {:.1} ms |",
        floor_iter * 1e3
    );
    println!(
        "| task_arithmetic merge | {:.2} s (peak RssAnon {} MiB) |",
        ta_wall.as_secs_f64(),
        ta_peak >> 20
    );
    println!("| mats merge ({ITERATIONS} iterations, {blocks} solved blocks) | {:.2} s (peak RssAnon {} MiB) |", mats_wall.as_secs_f64(), mats_peak >> 20);
    println!(
        "| mats / task_arithmetic | {:.2}x |",
        mats_wall.as_secs_f64() / ta_wall.as_secs_f64()
    );
    println!(
        "| CG time per iteration per layer (mats − task_arithmetic) | {:.1} ms |",
        per_iter_layer * 1e3
    );
    println!(
        "| per iteration per layer / floor | {:.2}x |",
        per_iter_layer / floor_iter
    );
    let _ = std::fs::remove_dir_all(dir.join("out-ta"));
    let _ = std::fs::remove_dir_all(dir.join("out-mats"));
    Ok(())
}
