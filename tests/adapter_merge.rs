//! `amalgam merge-adapters` and `amalgam extract-lora`: adapters written here, merged or
//! extracted by the binary, read back with the `safetensors` crate and checked against naive
//! float64 computations written here (PEFT's `add_weighted_adapter` formulas, KnOTS through an
//! eigen-decomposition of `M Mᵀ`, and the known low-rank difference of an extraction).

use crate::common::*;
use amalgam_io::peft::{lora_a_key, lora_b_key};
use amalgam_io::{
    write_adapter, AdapterConfig, CheckpointWriter, DType, LoraConfig, OutputLayout, OutputTensor,
    TargetModules,
};
use std::collections::BTreeMap;
use std::path::Path;

const Q: &str = "model.layers.0.self_attn.q_proj";
const V: &str = "model.layers.0.self_attn.v_proj";
/// (module, out, in).
const MODULES: [(&str, usize, usize); 2] = [(Q, 6, 5), (V, 4, 5)];

/// Deterministic values in [-0.5, 0.5) (splitmix64), distinct in practice.
fn vals(seed: u64, n: usize) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let mut z = (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                .wrapping_add(i.wrapping_mul(0xBF58_476D_1CE4_E5B9));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// One adapter's factors per module (f64 copies of what was written).
struct Lora {
    r: usize,
    scaling: f64,
    ab: BTreeMap<String, (Vec<f64>, Vec<f64>)>,
}

/// Write a LoRA adapter of rank `r` and alpha `alpha` on `modules` into `dir`.
fn write_lora(
    dir: &Path,
    modules: &[(&str, usize, usize)],
    r: usize,
    alpha: f64,
    seed: u64,
    base: &str,
) -> Lora {
    let mut cfg = LoraConfig::new(
        r,
        alpha,
        TargetModules::List(vec!["q_proj".into(), "v_proj".into()]),
    );
    cfg.base_model_name_or_path = Some(base.to_string());
    let mut data = Vec::new();
    let mut ab = BTreeMap::new();
    for (k, &(m, out, inp)) in modules.iter().enumerate() {
        let a = vals(seed * 10 + 2 * k as u64, r * inp);
        let b = vals(seed * 10 + 2 * k as u64 + 1, out * r);
        ab.insert(
            m.to_string(),
            (
                a.iter().map(|&x| x as f64).collect(),
                b.iter().map(|&x| x as f64).collect(),
            ),
        );
        data.push((lora_a_key(m), vec![r, inp], a));
        data.push((lora_b_key(m), vec![out, r], b));
    }
    let refs: Vec<(String, Vec<usize>, &[f32])> = data
        .iter()
        .map(|(k, s, v)| (k.clone(), s.clone(), v.as_slice()))
        .collect();
    write_adapter(dir, &AdapterConfig::Lora(cfg), &refs, false).unwrap();
    Lora {
        r,
        scaling: alpha / r as f64,
        ab,
    }
}

/// `B A` (out × r) · (r × in), row-major.
fn mm(b: &[f64], out: usize, r: usize, a: &[f64], inp: usize) -> Vec<f64> {
    let mut c = vec![0.0; out * inp];
    for o in 0..out {
        for j in 0..r {
            for i in 0..inp {
                c[o * inp + i] += b[o * r + j] * a[j * inp + i];
            }
        }
    }
    c
}

/// The written adapter's `(alpha / r) · B · A` per module, and its config.
fn merged_products(dir: &Path) -> (BTreeMap<String, Vec<f64>>, serde_json::Value) {
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    let r = cfg["r"].as_u64().unwrap() as usize;
    let alpha = cfg["lora_alpha"].as_f64().unwrap();
    let t = load_dir(dir);
    let mut out = BTreeMap::new();
    for &(m, o, i) in &MODULES {
        let a = &t[&lora_a_key(m)];
        let b = &t[&lora_b_key(m)];
        assert_eq!(a.shape, vec![r, i], "{m} A shape");
        assert_eq!(b.shape, vec![o, r], "{m} B shape");
        let mut p = mm(&b.values, o, r, &a.values, i);
        p.iter_mut().for_each(|x| *x *= alpha / r as f64);
        out.insert(m.to_string(), p);
    }
    (out, cfg)
}

fn merge(d: &Path, yaml: &str, out: &str) -> (BTreeMap<String, Vec<f64>>, serde_json::Value) {
    let cfg = format!("{out}.yaml");
    std::fs::write(d.join(&cfg), yaml).unwrap();
    run_ok(d, &["merge-adapters", &cfg, "--out", out, "--quiet"]);
    merged_products(&d.join(out))
}

/// `Σ_i w_i s_i B_i A_i` for one module.
fn exact_sum(ls: &[&Lora], w: &[f64], m: &str, out: usize, inp: usize) -> Vec<f64> {
    let mut acc = vec![0.0; out * inp];
    for (l, wi) in ls.iter().zip(w) {
        let (a, b) = &l.ab[m];
        for (x, y) in acc.iter_mut().zip(mm(b, out, l.r, a, inp)) {
            *x += wi * l.scaling * y;
        }
    }
    acc
}

/// Eigen-decomposition of a symmetric `n × n` matrix by cyclic Jacobi: (eigenvalues
/// descending, eigenvectors as columns of a row-major `n × n`).
fn jacobi_eigen(mut a: Vec<f64>, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0.0; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    for _ in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|p| (0..n).filter(move |&q| q != p).map(move |q| (p, q)))
            .map(|(p, q)| a[p * n + q].powi(2))
            .sum();
        if off < 1e-30 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                if a[p * n + q].abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * a[p * n + q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| a[y * n + y].total_cmp(&a[x * n + x]));
    let vals: Vec<f64> = order.iter().map(|&j| a[j * n + j]).collect();
    let mut vecs = vec![0.0; n * n];
    for (c, &j) in order.iter().enumerate() {
        for k in 0..n {
            vecs[k * n + c] = v[k * n + j];
        }
    }
    (vals, vecs)
}

/// The orthonormal left singular vectors of `m` (`rows × cols`) with singular value `> eps`,
/// as columns of a `rows × k` matrix (from the eigenvectors of `M Mᵀ`).
fn left_singular(m: &[f64], rows: usize, cols: usize, eps: f64) -> (Vec<f64>, usize) {
    let mut g = vec![0.0; rows * rows];
    for i in 0..rows {
        for j in 0..rows {
            g[i * rows + j] = (0..cols).map(|t| m[i * cols + t] * m[j * cols + t]).sum();
        }
    }
    let (ev, vecs) = jacobi_eigen(g, rows);
    let keep: Vec<usize> = (0..rows).filter(|&j| ev[j].max(0.0).sqrt() > eps).collect();
    let k = keep.len();
    let mut u = vec![0.0; rows * k];
    for o in 0..rows {
        for (c, &j) in keep.iter().enumerate() {
            u[o * k + c] = vecs[o * rows + j];
        }
    }
    (u, k)
}

/// `U_k U_kᵀ M`: the best rank-`k` approximation of `M` (Eckart–Young).
fn truncate(m: &[f64], rows: usize, cols: usize, k: usize) -> Vec<f64> {
    let (u, kk) = left_singular(m, rows, cols, 0.0);
    let k = k.min(kk);
    let mut out = vec![0.0; rows * cols];
    for j in 0..k {
        let proj: Vec<f64> = (0..cols)
            .map(|t| (0..rows).map(|o| u[o * kk + j] * m[o * cols + t]).sum())
            .collect();
        for o in 0..rows {
            for t in 0..cols {
                out[o * cols + t] += u[o * kk + j] * proj[t];
            }
        }
    }
    out
}

#[test]
fn adapter_merge_linear_cat_svd_products_match_naive() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let l1 = write_lora(&d.join("a1"), &MODULES, 2, 4.0, 1, "base");
    let l2 = write_lora(&d.join("a2"), &MODULES, 2, 8.0, 2, "base");
    let l3 = write_lora(&d.join("a3"), &MODULES, 3, 3.0, 3, "base");
    let w = [0.7, -0.4];

    // linear: A and B combined separately with sign(w s)·sqrt|w s| (A) and sqrt|w s| (B).
    let (got, cfg) = merge(
        d,
        "combination_type: linear\nadapters:\n  - {path: a1, weight: 0.7}\n  - {path: a2, weight: -0.4}\n",
        "lin",
    );
    assert_eq!(cfg["r"], 2);
    assert_eq!(cfg["lora_alpha"], 2);
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["base_model_name_or_path"], "base");
    for &(m, o, i) in &MODULES {
        let (r, mut a, mut b) = (2, vec![0.0; 2 * i], vec![0.0; o * 2]);
        for (l, wi) in [(&l1, w[0]), (&l2, w[1])] {
            let ws: f64 = wi * l.scaling;
            let root = ws.abs().sqrt();
            let (la, lb) = &l.ab[m];
            for (x, y) in a.iter_mut().zip(la) {
                *x += ws.signum() * root * y;
            }
            for (x, y) in b.iter_mut().zip(lb) {
                *x += root * y;
            }
        }
        let want = mm(&b, o, r, &a, i);
        assert_close(&format!("linear {m}"), &got[m], &want, 1e-5, 1e-2);
        // The quirk is visible: not the exact weighted sum.
        let exact = exact_sum(&[&l1, &l2], &w, m, o, i);
        assert!(want.iter().zip(&exact).any(|(x, y)| (x - y).abs() > 1e-3));
    }

    // cat: exact, rank r1 + r3 (different ranks allowed).
    let (got, cfg) = merge(
        d,
        "combination_type: cat\nadapters:\n  - {path: a1, weight: 0.7}\n  - {path: a3, weight: -0.4}\n",
        "cat",
    );
    assert_eq!(cfg["r"], 5);
    for &(m, o, i) in &MODULES {
        let want = exact_sum(&[&l1, &l3], &w, m, o, i);
        assert_close(&format!("cat {m}"), &got[m], &want, 1e-5, 1e-2);
    }

    // svd (PEFT's default type) with the default rank max(r) = 3: the best rank-3
    // approximation of the exact sum; with svd_rank 5, the exact sum.
    let (got, cfg) = merge(
        d,
        "adapters:\n  - {path: a1, weight: 0.7}\n  - {path: a3, weight: -0.4}\n",
        "svd",
    );
    assert_eq!(cfg["r"], 3);
    for &(m, o, i) in &MODULES {
        let want = truncate(&exact_sum(&[&l1, &l3], &w, m, o, i), o, i, 3);
        assert_close(&format!("svd {m}"), &got[m], &want, 1e-5, 1e-2);
    }
    let (got, cfg) = merge(
        d,
        "combination_type: svd\nsvd_rank: 5\nadapters:\n  - {path: a1, weight: 0.7}\n  - {path: a3, weight: -0.4}\n",
        "svd5",
    );
    assert_eq!(cfg["r"], 5);
    for &(m, o, i) in &MODULES {
        let want = exact_sum(&[&l1, &l3], &w, m, o, i);
        assert_close(&format!("svd5 {m}"), &got[m], &want, 1e-5, 1e-2);
    }
}

/// PEFT's TIES on one factor: keep floor(density·n) largest |x| per tensor, elect the sign of
/// the unweighted sum (>= 0 → +), mean of the weighted values agreeing with it.
fn naive_ties(tensors: &[Vec<f64>], weights: &[f64], density: f64) -> Vec<f64> {
    let n = tensors[0].len();
    let k = (density * n as f64) as usize;
    let pruned: Vec<Vec<f64>> = tensors
        .iter()
        .map(|t| {
            let mut idx: Vec<usize> = (0..n).collect();
            idx.sort_by(|&x, &y| t[y].abs().total_cmp(&t[x].abs()));
            let mut p = vec![0.0; n];
            for &j in &idx[..k] {
                p[j] = t[j];
            }
            p
        })
        .collect();
    (0..n)
        .map(|j| {
            let s: f64 = pruned.iter().map(|p| p[j]).sum();
            let elected = if s >= 0.0 { 1.0 } else { -1.0 };
            let mut sum = 0.0;
            let mut cnt = 0;
            for (p, w) in pruned.iter().zip(weights) {
                if p[j] != 0.0 && p[j].signum() == elected {
                    sum += w * p[j];
                    cnt += 1;
                }
            }
            sum / cnt.max(1) as f64
        })
        .collect()
}

#[test]
fn adapter_merge_ties_product_matches_naive() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let l1 = write_lora(&d.join("a1"), &MODULES, 2, 4.0, 11, "base");
    let l2 = write_lora(&d.join("a2"), &MODULES, 2, 2.0, 12, "base");
    let l3 = write_lora(&d.join("a3"), &MODULES, 2, 2.0, 13, "base");
    let w = [0.5, 0.8, -0.3];
    let (got, cfg) = merge(
        d,
        "combination_type: ties\ndensity: 0.5\nadapters:\n  - {path: a1, weight: 0.5}\n  - {path: a2, weight: 0.8}\n  - {path: a3, weight: -0.3}\n",
        "ties",
    );
    assert_eq!(cfg["r"], 2);
    for &(m, o, i) in &MODULES {
        let ls = [&l1, &l2, &l3];
        let wa: Vec<f64> = ls
            .iter()
            .zip(w)
            .map(|(l, wi)| (wi * l.scaling).signum() * (wi * l.scaling).abs().sqrt())
            .collect();
        let wb: Vec<f64> = ls
            .iter()
            .zip(w)
            .map(|(l, wi)| (wi * l.scaling).abs().sqrt())
            .collect();
        let a = naive_ties(
            &ls.iter().map(|l| l.ab[m].0.clone()).collect::<Vec<_>>(),
            &wa,
            0.5,
        );
        let b = naive_ties(
            &ls.iter().map(|l| l.ab[m].1.clone()).collect::<Vec<_>>(),
            &wb,
            0.5,
        );
        let want = mm(&b, o, 2, &a, i);
        assert_close(&format!("ties {m}"), &got[m], &want, 1e-5, 1e-2);
    }
    // The other types run, keep their rank rule and give finite values (random masks: seeded).
    for (ty, r) in [
        ("dare_ties", 2),
        ("dare_linear", 2),
        ("magnitude_prune", 2),
        ("ties_svd", 2),
        ("dare_linear_svd", 2),
        ("dare_ties_svd", 2),
        ("magnitude_prune_svd", 2),
        ("knots_dare", 0),
    ] {
        let (got, cfg) = merge(
            d,
            &format!("combination_type: {ty}\ndensity: 0.7\nseed: 3\nadapters: [a1, a2, a3]\n"),
            ty,
        );
        if r > 0 {
            assert_eq!(cfg["r"], r, "{ty}");
        }
        assert!(got.values().flatten().all(|x| x.is_finite()), "{ty}");
        assert!(got.values().flatten().any(|x| *x != 0.0), "{ty}");
    }
}

/// KnOTS (methods.md §14) written naively: `M = [ΔW_1 ΔW_2]`, `U` its left singular vectors
/// (s > 1e-5), `R_i = Uᵀ ΔW_i`, a per-model top-k over all layers' `R_i` (keeping
/// `floor(d·K) + 1` values), sign = sign of the sum of the kept values (zeros: the global
/// majority), disjoint mean times `alpha`, `ΔW = U · merged`.
#[test]
fn adapter_merge_knots_matches_naive_svd() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let ls = [
        write_lora(&d.join("a1"), &MODULES, 2, 4.0, 21, "base"),
        write_lora(&d.join("a2"), &MODULES, 2, 2.0, 22, "base"),
    ];
    let (top_k, alpha) = (50.0, 0.6);
    let (got, cfg) = merge(
        d,
        "combination_type: knots_ties\ntop_k: 50\nadapters: [a1, a2]\n",
        "knots",
    );
    assert_eq!(
        cfg["r"].as_u64().unwrap(),
        cfg["lora_alpha"].as_u64().unwrap()
    );
    // Per module: U (rows × k) and per model R_i (k × in).
    let mut us = Vec::new();
    let mut reps: Vec<Vec<Vec<f64>>> = Vec::new();
    for &(m, o, i) in &MODULES {
        let deltas: Vec<Vec<f64>> = ls
            .iter()
            .map(|l| exact_sum(&[l], &[1.0], m, o, i))
            .collect();
        let cat: Vec<f64> = (0..o)
            .flat_map(|r| {
                deltas
                    .iter()
                    .flat_map(move |dw| dw[r * i..(r + 1) * i].to_vec())
            })
            .collect();
        let (u, k) = left_singular(&cat, o, 2 * i, 1e-5);
        let r: Vec<Vec<f64>> = deltas
            .iter()
            .map(|dw| {
                (0..k * i)
                    .map(|e| {
                        let (j, t) = (e / i, e % i);
                        (0..o).map(|row| u[row * k + j] * dw[row * i + t]).sum()
                    })
                    .collect()
            })
            .collect();
        us.push((u, k));
        reps.push(r);
    }
    // Global per-model thresholds.
    let thresholds: Vec<f64> = (0..2)
        .map(|mi| {
            let mut all: Vec<f64> = reps
                .iter()
                .flat_map(|r| r[mi].iter().map(|x| x.abs()))
                .collect();
            all.sort_by(f64::total_cmp);
            let dd = all.len();
            let kept = (dd as f64 * top_k / 100.0) as usize;
            all[(dd - kept).saturating_sub(1)]
        })
        .collect();
    let trimmed: Vec<Vec<Vec<f64>>> = reps
        .iter()
        .map(|r| {
            r.iter()
                .zip(&thresholds)
                .map(|(v, t)| {
                    v.iter()
                        .map(|&x| if x.abs() >= *t { x } else { 0.0 })
                        .collect()
                })
                .collect()
        })
        .collect();
    let raw_sign = |layer: &Vec<Vec<f64>>, j: usize| -> f64 {
        let s: f64 = layer.iter().map(|v| v[j]).sum();
        if s > 0.0 {
            1.0
        } else if s < 0.0 {
            -1.0
        } else {
            0.0
        }
    };
    let total: f64 = trimmed
        .iter()
        .map(|l| (0..l[0].len()).map(|j| raw_sign(l, j)).sum::<f64>())
        .sum();
    let majority = total.signum();
    for (li, &(m, o, i)) in MODULES.iter().enumerate() {
        let (u, k) = &us[li];
        let layer = &trimmed[li];
        let merged: Vec<f64> = (0..k * i)
            .map(|j| {
                let mut g = raw_sign(layer, j);
                if g == 0.0 {
                    g = majority;
                }
                let sel: Vec<f64> = layer
                    .iter()
                    .map(|v| v[j])
                    .filter(|&x| (g > 0.0 && x > 0.0) || (g <= 0.0 && x < 0.0))
                    .collect();
                if sel.is_empty() {
                    0.0
                } else {
                    alpha * sel.iter().sum::<f64>() / sel.len() as f64
                }
            })
            .collect();
        let want = mm(u, o, *k, &merged, i);
        assert_close(&format!("knots {m}"), &got[m], &want, 1e-4, 1e-2);
    }
}

#[test]
fn adapter_merge_errors_name_the_file_and_module() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write_lora(&d.join("a1"), &MODULES, 2, 4.0, 1, "base");
    // Another base model.
    write_lora(&d.join("other"), &MODULES, 2, 4.0, 2, "another-base");
    // Only q_proj.
    write_lora(&d.join("qonly"), &MODULES[..1], 2, 4.0, 3, "base");
    // q_proj with another shape.
    write_lora(&d.join("wide"), &[(Q, 6, 7), (V, 4, 5)], 2, 4.0, 4, "base");
    let cases = [("other", "another-base"), ("qonly", V), ("wide", Q)];
    for (name, needle) in cases {
        let y = format!("combination_type: cat\nadapters: [a1, {name}]\n");
        std::fs::write(d.join("e.yaml"), y).unwrap();
        let e = run_err(d, &["merge-adapters", "e.yaml", "--out", "e-out"]);
        assert!(e.contains(name) && e.contains(needle), "{name}: {e}");
        assert!(!d.join("e-out").join("adapter_config.json").exists());
    }
    // PEFT's union of modules on request.
    std::fs::write(
        d.join("u.yaml"),
        "combination_type: cat\nunion_modules: true\nadapters: [a1, qonly]\n",
    )
    .unwrap();
    run_ok(
        d,
        &["merge-adapters", "u.yaml", "--out", "u-out", "--quiet"],
    );
    // An existing output is refused, then replaced with --overwrite.
    let e = run_err(d, &["merge-adapters", "u.yaml", "--out", "u-out"]);
    assert!(e.contains("already holds an adapter"), "{e}");
    run_ok(
        d,
        &[
            "merge-adapters",
            "u.yaml",
            "--out",
            "u-out",
            "--overwrite",
            "--quiet",
        ],
    );
    // Unknown keys and types are refused by name.
    std::fs::write(d.join("k.yaml"), "combination_typo: svd\nadapters: [a1]\n").unwrap();
    let e = run_err(d, &["merge-adapters", "k.yaml", "--out", "k-out"]);
    assert!(e.contains("combination_typo"), "{e}");
    std::fs::write(
        d.join("t.yaml"),
        "combination_type: nope\nadapters: [a1, qonly]\n",
    )
    .unwrap();
    let e = run_err(d, &["merge-adapters", "t.yaml", "--out", "t-out"]);
    assert!(e.contains("combination_type"), "{e}");
    std::fs::write(
        d.join("x.yaml"),
        "combination_type: cat\nadapters:\n  - adapter: a1\n",
    )
    .unwrap();
    let e = run_err(d, &["merge-adapters", "x.yaml", "--out", "x-out"]);
    assert!(e.contains("unknown key `adapter`"), "{e}");
    // An input adapter's directory is refused as the output, even with --overwrite.
    let before = std::fs::read(d.join("a1/adapter_model.safetensors")).unwrap();
    let e = run_err(
        d,
        &["merge-adapters", "u.yaml", "--out", "a1", "--overwrite"],
    );
    assert!(e.contains("an input of this merge"), "{e}");
    assert_eq!(
        std::fs::read(d.join("a1/adapter_model.safetensors")).unwrap(),
        before
    );
}

/// Write `tensors` (name, shape, f32 values) as a one-file checkpoint into `dir`.
fn write_model(dir: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let layout = OutputLayout::plan(
        tensors
            .iter()
            .map(|(n, s, _)| OutputTensor {
                name: n.clone(),
                dtype: DType::F32,
                shape: s.clone(),
            })
            .collect(),
        0,
    );
    let mut w = CheckpointWriter::create(dir, layout, true).unwrap();
    for (n, _, v) in tensors {
        w.begin_tensor(n).unwrap();
        w.write_f32(v).unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn adapter_merge_extract_lora_recovers_a_low_rank_difference() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    generate(
        d,
        "base",
        &[
            "--seed",
            "7",
            "--hidden",
            "16",
            "--intermediate",
            "24",
            "--layers",
            "2",
            "--vocab",
            "32",
            "--heads",
            "2",
            "--kv-heads",
            "1",
        ],
    );
    let base = load_dir(&d.join("base"));
    let changed = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
    ];
    let mut model = Vec::new();
    for (name, t) in &base {
        let mut v: Vec<f32> = t.values.iter().map(|&x| x as f32).collect();
        if let Some(k) = changed.iter().position(|m| format!("{m}.weight") == *name) {
            let (o, i) = (t.shape[0], t.shape[1]);
            let b = vals(40 + k as u64, o * 3);
            let a = vals(50 + k as u64, 3 * i);
            for r in 0..o {
                for c in 0..i {
                    let s: f32 = (0..3).map(|j| b[r * 3 + j] * a[j * i + c]).sum();
                    v[r * i + c] += s;
                }
            }
        }
        model.push((name.clone(), t.shape.clone(), v));
    }
    write_model(&d.join("ft"), &model);
    run_ok(
        d,
        &[
            "extract-lora",
            "--base",
            "base",
            "--model",
            "ft",
            "--rank",
            "3",
            "--out",
            "lora",
            "--quiet",
        ],
    );
    let ft = load_dir(&d.join("ft"));
    let lora = load_dir(&d.join("lora"));
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("lora").join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 3);
    assert_eq!(cfg["lora_alpha"], 3);
    // Every 2-D non-embedding weight is extracted; embeddings and norms are not.
    for (name, t) in &base {
        let Some(m) = name.strip_suffix(".weight") else {
            continue;
        };
        let is_lin = t.shape.len() == 2 && !m.contains("embed") && !m.ends_with("lm_head");
        assert_eq!(lora.contains_key(&lora_a_key(m)), is_lin, "{name}");
        if !is_lin {
            continue;
        }
        let (o, i) = (t.shape[0], t.shape[1]);
        let a = &lora[&lora_a_key(m)];
        let b = &lora[&lora_b_key(m)];
        let p = mm(&b.values, o, 3, &a.values, i);
        let want: Vec<f64> = ft[name]
            .values
            .iter()
            .zip(&t.values)
            .map(|(f, b)| f - b)
            .collect();
        for (e, (g, w)) in p.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-5, "{m}[{e}]: got {g}, want {w}");
        }
        if changed.contains(&m) {
            assert!(want.iter().any(|x| x.abs() > 1e-2), "{m} changed");
        }
    }
    // The adapter applies to its base (amalgam's PEFT reader) and gives back the fine-tune.
    std::fs::write(
        d.join("p.yaml"),
        "merge_method: passthrough\nmodels:\n  - model: base+lora\n",
    )
    .unwrap();
    run_ok(d, &["merge", "p.yaml", "--out", "applied", "--quiet"]);
    let applied = load_dir(&d.join("applied"));
    for m in changed {
        let n = format!("{m}.weight");
        assert_close(&n, &applied[&n].values, &ft[&n].values, 1e-5, 1e-1);
    }
    // --modules filters; an existing output is refused.
    run_ok(
        d,
        &[
            "extract-lora",
            "--base",
            "base",
            "--model",
            "ft",
            "--rank",
            "2",
            "--out",
            "q",
            "--modules",
            "q_proj",
            "--quiet",
        ],
    );
    let q = load_dir(&d.join("q"));
    assert_eq!(q.len(), 4, "{:?}", q.keys().collect::<Vec<_>>());
    assert!(q.keys().all(|k| k.contains("q_proj")));
    let e = run_err(
        d,
        &[
            "extract-lora",
            "--base",
            "base",
            "--model",
            "ft",
            "--rank",
            "2",
            "--out",
            "q",
        ],
    );
    assert!(e.contains("already holds an adapter"), "{e}");
}

/// Both output files of two adapter directories are byte-identical.
fn assert_same_adapter(a: &Path, b: &Path) {
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        let (x, y) = (
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
        );
        assert!(
            x == y,
            "{f} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

/// Adapter merges and a LoRA extraction run as cluster jobs (a coordinator here, two worker
/// processes over loopback gRPC, one module per shard) write exactly the bytes of the
/// single-process run: the PEFT combinations, KnOTS (its global pass on the coordinator, the
/// modules re-aligned on the workers) and (IA)³.
#[test]
fn adapter_jobs_on_worker_processes_give_the_single_process_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write_lora(&d.join("a1"), &MODULES, 2, 4.0, 61, "base");
    write_lora(&d.join("a2"), &MODULES, 2, 8.0, 62, "base");
    write_lora(&d.join("a3"), &MODULES, 3, 3.0, 63, "base");
    let ia3 = |dir: &str, seed: u64| {
        let cfg = amalgam_io::Ia3Config::new(
            TargetModules::List(vec!["k_proj".into(), "down_proj".into()]),
            TargetModules::List(vec!["down_proj".into()]),
        );
        let k: Vec<f32> = vals(seed, 6).iter().map(|x| 1.0 + x).collect();
        let f: Vec<f32> = vals(seed + 1, 5).iter().map(|x| 1.0 + x).collect();
        let t = [
            (
                amalgam_io::peft::ia3_key("model.layers.0.self_attn.k_proj"),
                vec![6, 1],
                k.as_slice(),
            ),
            (
                amalgam_io::peft::ia3_key("model.layers.0.mlp.down_proj"),
                vec![1, 5],
                f.as_slice(),
            ),
        ];
        let refs: Vec<(String, Vec<usize>, &[f32])> = t
            .iter()
            .map(|(k, s, v)| (k.clone(), s.clone(), *v))
            .collect();
        write_adapter(&d.join(dir), &AdapterConfig::Ia3(cfg), &refs, false).unwrap();
    };
    ia3("i1", 71);
    ia3("i2", 72);
    let configs = [
        ("svd", "combination_type: svd\nadapters:\n  - {path: a1, weight: 0.7}\n  - {path: a2, weight: -0.4}\n  - {path: a3, weight: 0.5}\n"),
        ("ties", "combination_type: ties\ndensity: 0.5\nadapters: [a1, {path: a2, weight: 0.6}]\n"),
        ("knots", "combination_type: knots_ties\ntop_k: 50\nadapters: [a1, a2]\n"),
        ("knots_dare", "combination_type: knots_dare\nseed: 5\nadapters: [a1, a2, a3]\n"),
        ("ia3", "combination_type: dare_ties\ndensity: 0.6\nseed: 3\nadapters: [i1, i2]\n"),
    ];
    for (name, yaml) in configs {
        let cfg = format!("{name}.yaml");
        std::fs::write(d.join(&cfg), yaml).unwrap();
        let single = format!("{name}-single");
        run_ok(d, &["merge-adapters", &cfg, "--out", &single, "--quiet"]);
        let served = format!("{name}-workers");
        run_ok(
            d,
            &[
                "merge-adapters",
                &cfg,
                "--out",
                &served,
                "--quiet",
                "--workers",
                "2",
                "--shard-size",
                "1",
            ],
        );
        assert_same_adapter(&d.join(&single), &d.join(&served));
    }
    // Extraction: one shard per weight of a generated model and a perturbed copy.
    generate(
        d,
        "base",
        &[
            "--seed",
            "9",
            "--hidden",
            "16",
            "--intermediate",
            "24",
            "--layers",
            "2",
            "--vocab",
            "32",
            "--heads",
            "2",
            "--kv-heads",
            "1",
        ],
    );
    let ft: Vec<(String, Vec<usize>, Vec<f32>)> = load_dir(&d.join("base"))
        .into_iter()
        .enumerate()
        .map(|(k, (n, t))| {
            let noise = vals(80 + k as u64, t.values.len());
            let v = t
                .values
                .iter()
                .zip(noise)
                .map(|(&x, e)| x as f32 + 0.05 * e)
                .collect();
            (n, t.shape, v)
        })
        .collect();
    write_model(&d.join("ft"), &ft);
    let extract = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "extract-lora",
            "--base",
            "base",
            "--model",
            "ft",
            "--rank",
            "4",
            "--out",
            out,
            "--quiet",
        ];
        args.extend_from_slice(extra);
        run_ok(d, &args);
    };
    extract("x-single", &[]);
    extract("x-workers", &["--workers", "2", "--shard-size", "1"]);
    assert_same_adapter(&d.join("x-single"), &d.join("x-workers"));
}
