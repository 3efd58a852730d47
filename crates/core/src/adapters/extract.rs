//! LoRA extraction: the rank-`r` LoRA closest (in Frobenius norm) to a full fine-tune's update of
//! one weight, by truncated SVD of `W_ft − W_base` (issue 8; mergekit 0.1.5
//! `mergekit/scripts/extract_lora.py`, `TaskVectorDecompositionTask`). Sharding class **T**.
//!
//! With `ΔW = U S Vᵀ` (thin SVD, `rows × cols` torch layout `out × in`) and
//! `r = min(max_rank, min(rows, cols))`, further limited to the number of singular values above
//! `sv_epsilon` when `sv_epsilon > 0`, mergekit's defaults (`--distribute-scale`, the default)
//! give `A = diag(√S_r) V_rᵀ` (`r × in`) and `B = U_r diag(√S_r)` (`out × r`); with
//! `distribute_scale = false`, `A = diag(S_r) V_rᵀ` and `B = U_r`. Either way `B·A` is the best
//! rank-`r` approximation of `ΔW`, and the adapter uses `lora_alpha = r` (mergekit writes
//! `alpha_pattern = rank_pattern`), so its scaling is 1.
//!
//! Embeddings: mergekit decomposes the transpose of the embedding update (PEFT's
//! `lora_embedding_A` is `r × num_embeddings`); pass the transposed difference here. Bias
//! differences (mergekit saves them as `lora_B.bias`) are the writer's business.
//!
//! Deviation: the SVD and the difference are float64 (mergekit: float32).

use crate::error::{MergeError, Result};
use crate::linalg;

/// Options of [`extract_lora`] (mergekit-extract-lora flags).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExtractOptions {
    /// `--max-rank` (mergekit default 128).
    pub max_rank: usize,
    /// `--distribute-scale` (default true): `√S` on both factors; false puts `S` on `A`.
    pub distribute_scale: bool,
    /// `--sv-epsilon` (default 0): when `> 0`, singular values `≤` it are dropped.
    pub sv_epsilon: f64,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        Self {
            max_rank: 128,
            distribute_scale: true,
            sv_epsilon: 0.0,
        }
    }
}

/// An extracted LoRA of one module.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtractedLora {
    /// `lora_A`, row-major `rank × cols`.
    pub a: Vec<f64>,
    /// `lora_B`, row-major `rows × rank`.
    pub b: Vec<f64>,
    /// The rank (may be below `max_rank`; 0 when `sv_epsilon` drops everything).
    pub rank: usize,
    /// `lora_alpha` for this module: `rank` (scaling 1).
    pub alpha: f64,
    /// The singular values of `ΔW` (all `min(rows, cols)` of them), for reporting the
    /// approximation error (`Σ_{j ≥ rank} s_j²` is the squared Frobenius residual).
    pub singular_values: Vec<f64>,
}

/// Extract a LoRA from `W_ft` and `W_base` (row-major `rows × cols`, torch `out × in`).
pub fn extract_lora(
    name: &str,
    w_ft: &[f32],
    w_base: &[f32],
    rows: usize,
    cols: usize,
    opts: &ExtractOptions,
) -> Result<ExtractedLora> {
    if w_ft.len() != rows * cols || w_base.len() != rows * cols {
        return Err(MergeError::BadInputs {
            method: "extract-lora".to_string(),
            message: format!(
                "tensor `{name}`: the fine-tuned weight has {} values and the base {}, \
                 expected {rows} x {cols}; both must come from the same architecture",
                w_ft.len(),
                w_base.len()
            ),
        });
    }
    let delta: Vec<f64> = w_ft
        .iter()
        .zip(w_base)
        .map(|(&f, &b)| f64::from(f) - f64::from(b))
        .collect();
    extract_lora_from_delta(name, &delta, rows, cols, opts)
}

/// Extract a LoRA from the update `ΔW` itself (row-major `rows × cols`).
pub fn extract_lora_from_delta(
    name: &str,
    delta: &[f64],
    rows: usize,
    cols: usize,
    opts: &ExtractOptions,
) -> Result<ExtractedLora> {
    if delta.len() != rows * cols {
        return Err(MergeError::BadInputs {
            method: "extract-lora".to_string(),
            message: format!(
                "tensor `{name}`: the update has {} values, expected {rows} x {cols}",
                delta.len()
            ),
        });
    }
    if !opts.sv_epsilon.is_finite() || opts.sv_epsilon < 0.0 {
        return Err(MergeError::BadParameter {
            key: "sv_epsilon".to_string(),
            message: format!("must be >= 0, got {}", opts.sv_epsilon),
        });
    }
    let svd = linalg::svd(delta, rows, cols).map_err(|e| linalg::name_tensor(e, name))?;
    let mut rank = opts.max_rank.min(svd.k);
    if opts.sv_epsilon > 0.0 {
        rank = rank.min(svd.s.iter().filter(|&&s| s > opts.sv_epsilon).count());
    }
    let (fa, fb): (Vec<f64>, Vec<f64>) = svd.s[..rank]
        .iter()
        .map(|&s| {
            if opts.distribute_scale {
                (s.sqrt(), s.sqrt())
            } else {
                (s, 1.0)
            }
        })
        .unzip();
    let mut a = vec![0.0; rank * cols];
    for j in 0..rank {
        for c in 0..cols {
            a[j * cols + c] = fa[j] * svd.vt[j * cols + c];
        }
    }
    let mut b = vec![0.0; rows * rank];
    for r in 0..rows {
        for j in 0..rank {
            b[r * rank + j] = svd.u[r * svd.k + j] * fb[j];
        }
    }
    Ok(ExtractedLora {
        a,
        b,
        rank,
        alpha: rank as f64,
        singular_values: svd.s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::test_util::{mm, rand_vec};

    #[test]
    fn recovers_a_known_low_rank_difference() {
        let (rows, cols, r) = (9, 7, 3);
        let p = rand_vec(1, rows * r);
        let q = rand_vec(2, r * cols);
        let d = mm(&p, rows, r, &q, cols);
        for distribute_scale in [true, false] {
            let opts = ExtractOptions {
                max_rank: 3,
                distribute_scale,
                sv_epsilon: 0.0,
            };
            let e = extract_lora_from_delta("w", &d, rows, cols, &opts).unwrap();
            assert_eq!((e.rank, e.alpha), (3, 3.0));
            let ba = mm(&e.b, rows, 3, &e.a, cols);
            for (x, y) in ba.iter().zip(&d) {
                assert!((x - y).abs() < 1e-10, "{x} vs {y}");
            }
            if distribute_scale {
                // Columns of B and rows of A have equal norms √s_j.
                for j in 0..3 {
                    let na: f64 = (0..cols).map(|c| e.a[j * cols + c].powi(2)).sum();
                    let nb: f64 = (0..rows).map(|i| e.b[i * 3 + j].powi(2)).sum();
                    assert!((na - nb).abs() < 1e-10);
                    assert!((na - e.singular_values[j]).abs() < 1e-10);
                }
            } else {
                // B = U has orthonormal columns.
                for j in 0..3 {
                    let nb: f64 = (0..rows).map(|i| e.b[i * 3 + j].powi(2)).sum();
                    assert!((nb - 1.0).abs() < 1e-12);
                }
            }
        }
        // Larger max_rank: the extra components are ~0 and the product is still exact;
        // sv_epsilon trims them.
        let opts = ExtractOptions {
            max_rank: 128,
            ..Default::default()
        };
        let e = extract_lora_from_delta("w", &d, rows, cols, &opts).unwrap();
        assert_eq!(e.rank, 7);
        let opts = ExtractOptions {
            max_rank: 128,
            sv_epsilon: 1e-8,
            ..Default::default()
        };
        assert_eq!(
            extract_lora_from_delta("w", &d, rows, cols, &opts)
                .unwrap()
                .rank,
            3
        );
    }

    #[test]
    fn from_weights_and_truncation_error() {
        let (rows, cols) = (6, 8);
        let base: Vec<f32> = rand_vec(5, rows * cols).iter().map(|&x| x as f32).collect();
        let ft: Vec<f32> = rand_vec(6, rows * cols).iter().map(|&x| x as f32).collect();
        let opts = ExtractOptions {
            max_rank: 2,
            ..Default::default()
        };
        let e = extract_lora("w", &ft, &base, rows, cols, &opts).unwrap();
        let d: Vec<f64> = ft
            .iter()
            .zip(&base)
            .map(|(&f, &b)| f64::from(f) - f64::from(b))
            .collect();
        let ba = mm(&e.b, rows, 2, &e.a, cols);
        let res: f64 = ba.iter().zip(&d).map(|(x, y)| (x - y).powi(2)).sum();
        let dropped: f64 = e.singular_values[2..].iter().map(|s| s * s).sum();
        assert!((res - dropped).abs() < 1e-10);
        assert!(extract_lora("w", &ft[..5], &base, rows, cols, &opts).is_err());
    }
}
