//! KnOTS: merging LoRA adapters after aligning them with an SVD of their concatenated updates
//! (methods.md §14; reference `gstoica27/KnOTS`, `task_merger.py` `SVDMerger`, `masking_ops.py`).
//! Sharding class **G**: the SVD is per layer (class T), but the TIES top-k and the zero-sign
//! rule are global over all layers of a model.
//!
//! The reference computes, per LoRA layer with updates `ΔW_i` (`O × I`, model `i` of `N`):
//!
//! 1. `M = [ΔW_1 … ΔW_N]` (`O × N·I`, concatenated along the input dimension) and its thin SVD
//!    `U S Vᵀ` in float64, dropping the components with `s ≤ 1e-5` (absolute);
//! 2. task `i`'s representation `R_i = diag(S) · V_iᵀ` (`k × I`, `V_iᵀ` the `i`-th column block of
//!    `Vᵀ`), rounded to float32; so `ΔW_i = U R_i`;
//! 3. optionally DARE on every `R_i` (keep with probability `1 − p`, rescale by `1/(1 − p)`);
//! 4. TIES on the representations flattened over **all layers**: per model keep `|x| ≥ t_i`
//!    where `t_i` is the `(d − ⌊d·K⌋)`-th smallest `|x|` of its `d` values (`K = topK/100`; this
//!    keeps `⌊d·K⌋ + 1` values plus ties, the TIES reference's off-by-one; `topK ≥ 100` keeps
//!    all); elect `γ = sign(Σ_i trimmed R_i)` per entry (`sum_of_values`), entries with `γ = 0`
//!    getting `sign(Σ γ)` over all entries of all layers (if that is 0 too, `γ` stays 0 and
//!    the negative entries are selected, a reference quirk kept); select the trimmed entries
//!    with `sign = γ`;
//! 5. merge each entry as `α · Σ selected / max(1, #selected)` (`merging_type: mean`, every
//!    model scaled by the single coefficient `α`);
//! 6. `ΔW = U · merged`, added to the base weight.
//!
//! API: [`align_lora`] (or [`align_dense`]) per layer → [`apply_dare`] per layer (optional) →
//! [`global_stats`] over all layers → [`merge_layer`] per layer; [`knots`] runs all of it. The
//! result of a layer is itself a LoRA of rank `k` ([`KnotsMerged`]: `B = U`, `A = merged`).
//!
//! Defaults ([`KnotsOptions::default`], `configs/vitB_r16_knots_ties.py`): `topK = 20`,
//! `α = 0.6`, no DARE. The reference's KnOTS-DARE config uses DARE `p = 0.1`, `topK = 100`,
//! `α = 0.7`.
//!
//! Deviations: [`align_lora`] computes the same SVD from the factors (SVD of each `A_i`, then of
//! the `O × Σr_i` matrix `[B_1 P_1 Σ_1 … B_N P_N Σ_N]`), never forming `M`: equal in exact
//! arithmetic, far cheaper, and singular-vector sign flips cancel in `U · merged`; the `ΔW_i`
//! include the LoRA scaling (the reference takes `B A`, its adapters having `alpha = r`); `U`
//! and the merged values stay float64 (the reference rounds them to float32); the sign sum is
//! float64; DARE masks come from Philox (the reference uses `torch.manual_seed(dare_seed)`), key
//! `(seed, model)`, mask name `"{layer}.knots"`, index the flat index in `R_i`; `topK` is a
//! percentage only (the reference reads `topK ≤ 1` as a fraction); the per-model coefficients
//! are one `α` (the reference also uses only `weights[0]`).

use super::check_finite;
use crate::error::{MergeError, Result};
use crate::linalg;
use crate::philox::{keep_threshold, MaskStream};
use crate::select::select_cuts;
use rayon::prelude::*;
use std::ops::Range;

/// Singular values at or below this are dropped (absolute, as the reference).
pub const S_EPSILON: f64 = 1e-5;

const METHOD: &str = "knots";

/// How the sign of each entry is elected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KnotsSignMode {
    /// `sum_of_values`: sign of the sum of trimmed values; zeros take the global majority.
    #[default]
    SumOfValues,
    /// `sum_of_signs`: sign of the sum of signs; zeros stay zero (negative entries selected).
    SumOfSigns,
}

/// DARE on the representations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KnotsDare {
    /// Drop probability `p` in `[0, 1)`.
    pub drop_rate: f64,
    /// Seed of the Philox masks.
    pub seed: u64,
}

/// KnOTS options.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KnotsOptions {
    /// Percentage of each model's representation kept by TIES (`topK`, default 20; `≥ 100`
    /// keeps all).
    pub top_k: f64,
    /// Scaling coefficient `α` of the merged update (default 0.6).
    pub alpha: f64,
    /// Sign election rule (default `sum_of_values`).
    pub sign_mode: KnotsSignMode,
    /// DARE before TIES (default none).
    pub dare: Option<KnotsDare>,
}

impl Default for KnotsOptions {
    fn default() -> Self {
        Self {
            top_k: 20.0,
            alpha: 0.6,
            sign_mode: KnotsSignMode::SumOfValues,
            dare: None,
        }
    }
}

impl KnotsOptions {
    /// Check the values.
    pub fn validate(&self) -> Result<()> {
        if !self.top_k.is_finite() || self.top_k < 0.0 {
            return Err(MergeError::BadParameter {
                key: "topK".to_string(),
                message: format!("must be a percentage >= 0, got {}", self.top_k),
            });
        }
        if !self.alpha.is_finite() {
            return Err(MergeError::BadParameter {
                key: "alpha".to_string(),
                message: format!("must be finite, got {}", self.alpha),
            });
        }
        if let Some(d) = self.dare {
            if !(0.0..1.0).contains(&d.drop_rate) {
                return Err(MergeError::BadParameter {
                    key: "dare_pruning_coeffs".to_string(),
                    message: format!("drop rate must be in [0, 1), got {}", d.drop_rate),
                });
            }
        }
        Ok(())
    }
}

/// One layer after alignment.
#[derive(Debug, Clone, PartialEq)]
pub struct KnotsLayer {
    /// Layer name (DARE mask name and errors).
    pub name: String,
    /// `O`.
    pub out_features: usize,
    /// `I`.
    pub in_features: usize,
    /// Number of components kept (`s > 1e-5`).
    pub rank: usize,
    /// Shared basis `U`, row-major `O × rank`.
    pub u: Vec<f64>,
    /// Kept singular values.
    pub s: Vec<f64>,
    /// Per model `R_i = diag(s) V_iᵀ`, row-major `rank × I`, float32.
    pub reps: Vec<Vec<f32>>,
}

/// One model's LoRA factors of a layer, for [`align_lora`].
#[derive(Debug, Clone, Copy)]
pub struct LoraFactors<'a> {
    /// `lora_A`, row-major `rank × in`.
    pub a: &'a [f64],
    /// `lora_B`, row-major `out × rank`.
    pub b: &'a [f64],
    /// Rank.
    pub rank: usize,
    /// LoRA scaling (`ΔW = scaling · B · A`).
    pub scaling: f64,
}

fn shape_err(name: &str, message: String) -> MergeError {
    MergeError::BadInputs {
        method: METHOD.to_string(),
        message: format!("layer `{name}`: {message}"),
    }
}

/// Build the layer from the SVD `U S Vᵀ` of `M` given as `u` (`O × k`), `s`, and per model the
/// column block `Vᵀ_i` through `vt_block(i)` (`k × I`).
fn build_layer<F>(
    name: &str,
    out_f: usize,
    in_f: usize,
    n: usize,
    u: &[f64],
    s: &[f64],
    vt_block: F,
) -> Result<KnotsLayer>
where
    F: Fn(usize) -> Vec<f64>,
{
    let k_all = s.len();
    let keep: Vec<usize> = (0..k_all).filter(|&j| s[j] > S_EPSILON).collect();
    let k = keep.len();
    let mut uk = vec![0.0; out_f * k];
    for o in 0..out_f {
        for (c, &j) in keep.iter().enumerate() {
            uk[o * k + c] = u[o * k_all + j];
        }
    }
    let sk: Vec<f64> = keep.iter().map(|&j| s[j]).collect();
    let mut reps = Vec::with_capacity(n);
    for i in 0..n {
        let vt = vt_block(i);
        let mut r = vec![0f32; k * in_f];
        for (c, &j) in keep.iter().enumerate() {
            for t in 0..in_f {
                r[c * in_f + t] = (s[j] * vt[j * in_f + t]) as f32;
            }
        }
        if let Some(p) = r.iter().position(|x| !x.is_finite()) {
            return Err(MergeError::Numeric {
                tensor: name.to_string(),
                message: format!("representation of model {i} overflows float32 at index {p}"),
            });
        }
        reps.push(r);
    }
    Ok(KnotsLayer {
        name: name.to_string(),
        out_features: out_f,
        in_features: in_f,
        rank: k,
        u: uk,
        s: sk,
        reps,
    })
}

/// Align one layer from the models' dense updates `ΔW_i` (row-major `O × I`): thin SVD of the
/// `O × N·I` concatenation, as the reference does. Memory and time grow with `N·I`; prefer
/// [`align_lora`] for LoRA layers.
pub fn align_dense(
    name: &str,
    deltas: &[&[f64]],
    out_features: usize,
    in_features: usize,
) -> Result<KnotsLayer> {
    let n = deltas.len();
    if n == 0 {
        return Err(shape_err(name, "no models".to_string()));
    }
    for (i, d) in deltas.iter().enumerate() {
        if d.len() != out_features * in_features {
            return Err(shape_err(
                name,
                format!(
                    "model {i}'s update has {} values, expected {out_features} x {in_features}",
                    d.len()
                ),
            ));
        }
        check_finite(name, "delta", d)?;
    }
    let cols = n * in_features;
    let mut m = vec![0.0; out_features * cols];
    for o in 0..out_features {
        for (i, d) in deltas.iter().enumerate() {
            m[o * cols + i * in_features..o * cols + (i + 1) * in_features]
                .copy_from_slice(&d[o * in_features..(o + 1) * in_features]);
        }
    }
    let svd = linalg::svd(&m, out_features, cols).map_err(|e| linalg::name_tensor(e, name))?;
    drop(m);
    let k = svd.k;
    build_layer(name, out_features, in_features, n, &svd.u, &svd.s, |i| {
        let mut b = vec![0.0; k * in_features];
        for j in 0..k {
            b[j * in_features..(j + 1) * in_features].copy_from_slice(
                &svd.vt[j * cols + i * in_features..j * cols + (i + 1) * in_features],
            );
        }
        b
    })
}

/// Align one layer from the models' LoRA factors, without forming the `O × N·I` matrix:
/// `A_i = P_i Σ_i Q_iᵀ` (thin SVD), `C = [s_1 B_1 P_1 Σ_1 … s_N B_N P_N Σ_N]` (`O × Σ r_i`),
/// `C = U S Wᵀ`; then `M = U S (Wᵀ · blockdiag(Q_iᵀ))`, so `Vᵀ_i = W_iᵀ Q_iᵀ`.
pub fn align_lora(
    name: &str,
    factors: &[LoraFactors<'_>],
    out_features: usize,
    in_features: usize,
) -> Result<KnotsLayer> {
    let n = factors.len();
    if n == 0 {
        return Err(shape_err(name, "no models".to_string()));
    }
    let mut cs: Vec<Vec<f64>> = Vec::with_capacity(n);
    let mut qts: Vec<(Vec<f64>, usize)> = Vec::with_capacity(n);
    for f in factors {
        super::check_shape(name, "lora_A", f.a.len(), f.rank, in_features)?;
        super::check_shape(name, "lora_B", f.b.len(), out_features, f.rank)?;
        check_finite(name, "lora_A", f.a)?;
        check_finite(name, "lora_B", f.b)?;
        if !f.scaling.is_finite() {
            return Err(MergeError::BadParameter {
                key: "scaling".to_string(),
                message: format!("layer `{name}`: must be finite, got {}", f.scaling),
            });
        }
        let sa = linalg::svd(f.a, f.rank, in_features).map_err(|e| linalg::name_tensor(e, name))?;
        let ki = sa.k;
        // P Σ scaled: (rank × ki), then C_i = B_i (P Σ s) (O × ki).
        let mut ps = sa.u.clone();
        for row in ps.chunks_mut(ki.max(1)) {
            for (x, sv) in row.iter_mut().zip(&sa.s) {
                *x *= sv * f.scaling;
            }
        }
        cs.push(linalg::matmul(f.b, out_features, f.rank, &ps, ki));
        qts.push((sa.vt, ki));
    }
    let total: usize = qts.iter().map(|(_, k)| k).sum();
    let mut c = vec![0.0; out_features * total];
    let mut off = 0;
    for (ci, (_, ki)) in cs.iter().zip(&qts) {
        for o in 0..out_features {
            c[o * total + off..o * total + off + ki].copy_from_slice(&ci[o * ki..(o + 1) * ki]);
        }
        off += ki;
    }
    let svd = linalg::svd(&c, out_features, total).map_err(|e| linalg::name_tensor(e, name))?;
    let k = svd.k;
    let offsets: Vec<usize> = qts
        .iter()
        .scan(0, |acc, (_, ki)| {
            let o = *acc;
            *acc += ki;
            Some(o)
        })
        .collect();
    build_layer(name, out_features, in_features, n, &svd.u, &svd.s, |i| {
        let (qt, ki) = (&qts[i].0, qts[i].1);
        // W_iᵀ: k × ki block of Wᵀ (k × total).
        let mut wt = vec![0.0; k * ki];
        for j in 0..k {
            wt[j * ki..(j + 1) * ki]
                .copy_from_slice(&svd.vt[j * total + offsets[i]..j * total + offsets[i] + ki]);
        }
        linalg::matmul(&wt, k, ki, qt, in_features)
    })
}

/// DARE on every representation of `layer`, in place: entry `j` of model `i` is kept when
/// Philox word `< floor((1 − p) · 2^32)` (key `(seed, i)`, mask name `"{layer}.knots"`) and then
/// multiplied by `1/(1 − p)` (in float32, as the reference).
pub fn apply_dare(layer: &mut KnotsLayer, dare: &KnotsDare) {
    let keep = 1.0 - dare.drop_rate;
    let thr = keep_threshold(keep);
    let scale = (1.0 / keep) as f32;
    let name = format!("{}.knots", layer.name);
    for (i, r) in layer.reps.iter_mut().enumerate() {
        let stream = MaskStream::new(dare.seed, i, &name);
        r.par_chunks_mut(1 << 14)
            .enumerate()
            .for_each(|(c, chunk)| {
                for (j, v) in chunk.iter_mut().enumerate() {
                    *v = if stream.keep(c * (1 << 14) + j, thr) {
                        *v * scale
                    } else {
                        0.0
                    };
                }
            });
    }
}

/// The model-global quantities of the TIES step.
#[derive(Debug, Clone, PartialEq)]
pub struct KnotsGlobal {
    /// Per model, the magnitude threshold as an f32 bit pattern: an entry is kept when
    /// `|x|.to_bits() >= threshold` (0 keeps everything).
    pub thresholds: Vec<u32>,
    /// `sign(Σ γ)` over all entries of all layers (used for entries with `γ = 0` under
    /// `sum_of_values`).
    pub majority_sign: i8,
}

fn abs_key(x: f32) -> u32 {
    x.abs().to_bits()
}

/// The elected sign of entry `j` before the zero rule.
fn raw_sign(layer: &KnotsLayer, thresholds: &[u32], mode: KnotsSignMode, j: usize) -> i8 {
    let mut sum = 0.0f64;
    for (r, &t) in layer.reps.iter().zip(thresholds) {
        let x = r[j];
        if abs_key(x) >= t {
            sum += match mode {
                KnotsSignMode::SumOfValues => f64::from(x),
                KnotsSignMode::SumOfSigns => f64::from(sign32(x)),
            };
        }
    }
    sign64(sum)
}

fn sign32(x: f32) -> i8 {
    if x > 0.0 {
        1
    } else if x < 0.0 {
        -1
    } else {
        0
    }
}

fn sign64(x: f64) -> i8 {
    if x > 0.0 {
        1
    } else if x < 0.0 {
        -1
    } else {
        0
    }
}

/// The global trim thresholds and majority sign over `layers` (all layers of the merge, every
/// layer with the same number of models). Thresholds are exact order statistics
/// ([`crate::select`]: integer histograms, so a distributed version sums them across shards).
pub fn global_stats(layers: &[KnotsLayer], opts: &KnotsOptions) -> Result<KnotsGlobal> {
    opts.validate()?;
    let n = layers.first().map_or(0, |l| l.reps.len());
    if let Some(l) = layers.iter().find(|l| l.reps.len() != n) {
        return Err(shape_err(
            &l.name,
            format!("has {} models, expected {n}", l.reps.len()),
        ));
    }
    let frac = opts.top_k / 100.0;
    let mut thresholds = vec![0u32; n];
    if frac < 1.0 {
        for (i, t) in thresholds.iter_mut().enumerate() {
            let sizes: Vec<usize> = layers.iter().map(|l| l.reps[i].len()).collect();
            let d: usize = sizes.iter().sum();
            if d == 0 {
                continue;
            }
            // kthvalue(d - int(d K)) (1-based) = ascending position d - int(d K) - 1.
            let kept = (d as f64 * frac) as usize;
            let pos = (d - kept.min(d)).saturating_sub(1) as u64;
            let mut blocks: Vec<Range<usize>> = Vec::new();
            let mut owner: Vec<usize> = Vec::new();
            let mut start = 0;
            for (li, &sz) in sizes.iter().enumerate() {
                if sz > 0 {
                    blocks.push(start..start + sz);
                    owner.push(li);
                    start += sz;
                }
            }
            let mut bi = 0usize;
            let cuts = select_cuts(d, &blocks, &[pos], |range, keys| {
                // Blocks are visited in order, pass after pass: find this range's block.
                if blocks[bi].start != range.start {
                    bi = blocks
                        .iter()
                        .position(|b| b.start == range.start)
                        .expect("select_cuts passes one of the given blocks");
                }
                let r = &layers[owner[bi]].reps[i];
                for (k, x) in keys.iter_mut().zip(r) {
                    *k = abs_key(*x);
                }
                Ok(())
            })?;
            *t = cuts[0].key;
        }
    }
    let majority_sign = match opts.sign_mode {
        KnotsSignMode::SumOfSigns => 0,
        KnotsSignMode::SumOfValues => {
            let total: i64 = layers
                .iter()
                .map(|l| {
                    let len = l.reps.first().map_or(0, Vec::len);
                    (0..len)
                        .into_par_iter()
                        .map(|j| i64::from(raw_sign(l, &thresholds, opts.sign_mode, j)))
                        .sum::<i64>()
                })
                .sum();
            sign64(total as f64)
        }
    };
    Ok(KnotsGlobal {
        thresholds,
        majority_sign,
    })
}

/// One merged layer: `ΔW = B · A` with `B = U` and `A` the merged representation; a LoRA of
/// rank `rank` and scaling 1.
#[derive(Debug, Clone, PartialEq)]
pub struct KnotsMerged {
    /// Merged representation, row-major `rank × in_features`.
    pub a: Vec<f64>,
    /// The basis `U`, row-major `out_features × rank`.
    pub b: Vec<f64>,
    /// Number of components.
    pub rank: usize,
    /// `O`.
    pub out_features: usize,
    /// `I`.
    pub in_features: usize,
}

impl KnotsMerged {
    /// `ΔW = B · A`, row-major `O × I`.
    pub fn delta(&self) -> Vec<f64> {
        linalg::matmul(
            &self.b,
            self.out_features,
            self.rank,
            &self.a,
            self.in_features,
        )
    }

    /// The factors zero-padded to `rank` components (for writing a fixed-rank adapter); `None`
    /// when `rank` is below this layer's rank.
    pub fn padded(&self, rank: usize) -> Option<(Vec<f64>, Vec<f64>)> {
        (rank >= self.rank).then(|| {
            super::pad_rank(
                self.a.clone(),
                self.b.clone(),
                self.rank,
                rank,
                self.in_features,
                self.out_features,
            )
        })
    }
}

/// Merge one layer given the global statistics (TIES selection and disjoint mean with `α`).
pub fn merge_layer(
    layer: &KnotsLayer,
    global: &KnotsGlobal,
    opts: &KnotsOptions,
) -> Result<KnotsMerged> {
    opts.validate()?;
    if global.thresholds.len() != layer.reps.len() {
        return Err(shape_err(
            &layer.name,
            format!(
                "has {} models but the global statistics have {}",
                layer.reps.len(),
                global.thresholds.len()
            ),
        ));
    }
    let len = layer.rank * layer.in_features;
    let mut merged = vec![0.0f64; len];
    merged.par_iter_mut().enumerate().for_each(|(j, out)| {
        let mut g = raw_sign(layer, &global.thresholds, opts.sign_mode, j);
        if g == 0 && opts.sign_mode == KnotsSignMode::SumOfValues {
            g = global.majority_sign;
        }
        let (mut sum, mut count) = (0.0f64, 0u32);
        for (r, &t) in layer.reps.iter().zip(&global.thresholds) {
            let x = r[j];
            if abs_key(x) >= t && ((g > 0 && x > 0.0) || (g <= 0 && x < 0.0)) {
                sum += f64::from(x);
                count += 1;
            }
        }
        *out = if count == 0 {
            0.0
        } else {
            opts.alpha * sum / f64::from(count)
        };
    });
    Ok(KnotsMerged {
        a: merged,
        b: layer.u.clone(),
        rank: layer.rank,
        out_features: layer.out_features,
        in_features: layer.in_features,
    })
}

/// The whole KnOTS merge over aligned `layers` (DARE applied here when `opts.dare` is set):
/// one [`KnotsMerged`] per layer, in order.
pub fn knots(mut layers: Vec<KnotsLayer>, opts: &KnotsOptions) -> Result<Vec<KnotsMerged>> {
    opts.validate()?;
    if let Some(d) = &opts.dare {
        layers.iter_mut().for_each(|l| apply_dare(l, d));
    }
    let g = global_stats(&layers, opts)?;
    layers.iter().map(|l| merge_layer(l, &g, opts)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::test_util::{mm, rand_vec};

    /// One-sided Jacobi SVD of a row-major `m × n` matrix (`m ≤ n` handled by transposing the
    /// problem): returns (U m×k, s, Vᵀ k×n), k = min(m, n), s descending.
    fn jacobi_svd(a: &[f64], m: usize, n: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        // Orthogonalize the columns of G = Aᵀ (n × m) when m <= n: G = V' S U'ᵀ ... simpler:
        // work on the rows of A: rotate pairs of rows until orthogonal; A = U S Vᵀ with the
        // rows of the result being s_j v_jᵀ and the rotations accumulating U.
        let mut w = a.to_vec(); // m × n, rows become s_j v_jᵀ
        let mut u = vec![0.0; m * m];
        for i in 0..m {
            u[i * m + i] = 1.0;
        }
        for _sweep in 0..60 {
            let mut off = 0.0f64;
            for p in 0..m {
                for q in p + 1..m {
                    let (mut alpha, mut beta, mut gamma) = (0.0, 0.0, 0.0);
                    for t in 0..n {
                        let (x, y) = (w[p * n + t], w[q * n + t]);
                        alpha += x * x;
                        beta += y * y;
                        gamma += x * y;
                    }
                    if gamma.abs() <= 1e-300 {
                        continue;
                    }
                    off = off.max(gamma.abs() / (alpha * beta).sqrt().max(1e-300));
                    let zeta = (beta - alpha) / (2.0 * gamma);
                    let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                    let c = 1.0 / (1.0 + t * t).sqrt();
                    let s = c * t;
                    for k in 0..n {
                        let (x, y) = (w[p * n + k], w[q * n + k]);
                        w[p * n + k] = c * x - s * y;
                        w[q * n + k] = s * x + c * y;
                    }
                    for k in 0..m {
                        let (x, y) = (u[k * m + p], u[k * m + q]);
                        u[k * m + p] = c * x - s * y;
                        u[k * m + q] = s * x + c * y;
                    }
                }
            }
            if off < 1e-15 {
                break;
            }
        }
        let norms: Vec<f64> = (0..m)
            .map(|p| (0..n).map(|t| w[p * n + t].powi(2)).sum::<f64>().sqrt())
            .collect();
        let mut order: Vec<usize> = (0..m).collect();
        order.sort_by(|&x, &y| norms[y].total_cmp(&norms[x]));
        let k = m.min(n);
        let mut uo = vec![0.0; m * k];
        let mut s = vec![0.0; k];
        let mut vt = vec![0.0; k * n];
        for (c, &p) in order.iter().take(k).enumerate() {
            s[c] = norms[p];
            for r in 0..m {
                uo[r * k + c] = u[r * m + p];
            }
            if norms[p] > 0.0 {
                for t in 0..n {
                    vt[c * n + t] = w[p * n + t] / norms[p];
                }
            }
        }
        (uo, s, vt)
    }

    /// The reference algorithm, naive: Jacobi SVD of the concatenation, f32 reps, global TIES.
    fn naive_knots(
        layers: &[(Vec<Vec<f64>>, usize, usize)],
        top_k: f64,
        alpha: f64,
    ) -> Vec<Vec<f64>> {
        let n = layers[0].0.len();
        // Per layer: (U, reps, rank, out, in).
        type Aligned = (Vec<f64>, Vec<Vec<f32>>, usize, usize, usize);
        let mut all: Vec<Aligned> = Vec::new();
        for (deltas, o, i_f) in layers {
            let cols = n * i_f;
            let mut m = vec![0.0; o * cols];
            for r in 0..*o {
                for (i, d) in deltas.iter().enumerate() {
                    for c in 0..*i_f {
                        m[r * cols + i * i_f + c] = d[r * i_f + c];
                    }
                }
            }
            let (u, s, vt) = jacobi_svd(&m, *o, cols);
            let keep: Vec<usize> = (0..s.len()).filter(|&j| s[j] > 1e-5).collect();
            let k = keep.len();
            let mut uk = vec![0.0; o * k];
            for r in 0..*o {
                for (c, &j) in keep.iter().enumerate() {
                    uk[r * k + c] = u[r * s.len() + j];
                }
            }
            let reps = (0..n)
                .map(|i| {
                    let mut rep = vec![0f32; k * i_f];
                    for (c, &j) in keep.iter().enumerate() {
                        for t in 0..*i_f {
                            rep[c * i_f + t] = (s[j] * vt[j * cols + i * i_f + t]) as f32;
                        }
                    }
                    rep
                })
                .collect();
            all.push((uk, reps, k, *o, *i_f));
        }
        // Global trim per model: kthvalue(d - int(d K)).
        let kk = top_k / 100.0;
        let thr: Vec<f32> = (0..n)
            .map(|i| {
                let mut v: Vec<f32> = all
                    .iter()
                    .flat_map(|l| l.1[i].iter().map(|x| x.abs()))
                    .collect();
                v.sort_by(f32::total_cmp);
                let d = v.len();
                if kk >= 1.0 {
                    return 0.0; // the reference keeps everything
                }
                v[d - (d as f64 * kk) as usize - 1]
            })
            .collect();
        let gamma: Vec<Vec<f64>> = all
            .iter()
            .map(|l| {
                (0..l.1[0].len())
                    .map(|j| {
                        let s: f64 = (0..n)
                            .filter(|&i| l.1[i][j].abs() >= thr[i])
                            .map(|i| l.1[i][j] as f64)
                            .sum();
                        s.signum() * (s != 0.0) as i32 as f64
                    })
                    .collect()
            })
            .collect();
        let tot: f64 = gamma.iter().flatten().sum();
        let maj = if tot > 0.0 {
            1.0
        } else if tot < 0.0 {
            -1.0
        } else {
            0.0
        };
        all.iter()
            .zip(&gamma)
            .map(|(l, g)| {
                let merged: Vec<f64> = (0..l.1[0].len())
                    .map(|j| {
                        let gj = if g[j] == 0.0 { maj } else { g[j] };
                        let (mut s, mut c) = (0.0, 0.0);
                        for (rep, &t) in l.1.iter().zip(&thr) {
                            let x = rep[j];
                            let sel = if gj > 0.0 { x > 0.0 } else { x < 0.0 };
                            if x.abs() >= t && sel {
                                s += alpha * x as f64;
                                c += 1.0;
                            }
                        }
                        s / f64::max(c, 1.0)
                    })
                    .collect();
                mm(&l.0, l.3, l.2, &merged, l.4)
            })
            .collect()
    }

    struct Lora {
        a: Vec<f64>,
        b: Vec<f64>,
        r: usize,
        s: f64,
    }

    fn loras(seed: u64, n: usize, r: usize, o: usize, i_f: usize) -> Vec<Lora> {
        (0..n)
            .map(|i| Lora {
                a: rand_vec(seed + 2 * i as u64, r * i_f),
                b: rand_vec(seed + 2 * i as u64 + 1, o * r),
                r,
                s: 0.5 + i as f64,
            })
            .collect()
    }

    fn deltas(ls: &[Lora], o: usize, i_f: usize) -> Vec<Vec<f64>> {
        ls.iter()
            .map(|l| {
                mm(&l.b, o, l.r, &l.a, i_f)
                    .into_iter()
                    .map(|x| x * l.s)
                    .collect()
            })
            .collect()
    }

    fn close(x: &[f64], y: &[f64], tol: f64) {
        let scale = y.iter().fold(1e-300f64, |m, v| m.max(v.abs()));
        for (i, (a, b)) in x.iter().zip(y).enumerate() {
            assert!((a - b).abs() <= tol * scale, "index {i}: {a} vs {b}");
        }
    }

    #[test]
    fn knots_matches_naive_reference() {
        // Two layers, three models, rank 2.
        let shapes = [(6usize, 4usize), (5, 7)];
        let ls: Vec<Vec<Lora>> = shapes
            .iter()
            .enumerate()
            .map(|(t, &(o, i))| loras(100 * t as u64 + 1, 3, 2, o, i))
            .collect();
        let dense: Vec<(Vec<Vec<f64>>, usize, usize)> = ls
            .iter()
            .zip(&shapes)
            .map(|(l, &(o, i))| (deltas(l, o, i), o, i))
            .collect();
        for top_k in [20.0, 50.0, 100.0] {
            let opts = KnotsOptions {
                top_k,
                ..Default::default()
            };
            let naive = naive_knots(&dense, top_k, 0.6);
            // Dense alignment.
            let layers: Vec<KnotsLayer> = dense
                .iter()
                .enumerate()
                .map(|(t, (d, o, i))| {
                    let refs: Vec<&[f64]> = d.iter().map(Vec::as_slice).collect();
                    align_dense(&format!("l{t}"), &refs, *o, *i).unwrap()
                })
                .collect();
            assert_eq!(layers[0].rank, 6); // 3 models x rank 2 <= min(6, 12)
            let out = knots(layers, &opts).unwrap();
            for (m, e) in out.iter().zip(&naive) {
                close(&m.delta(), e, 1e-5);
            }
            // Factored alignment.
            let layers: Vec<KnotsLayer> = ls
                .iter()
                .zip(&shapes)
                .enumerate()
                .map(|(t, (l, &(o, i)))| {
                    let f: Vec<LoraFactors<'_>> = l
                        .iter()
                        .map(|x| LoraFactors {
                            a: &x.a,
                            b: &x.b,
                            rank: x.r,
                            scaling: x.s,
                        })
                        .collect();
                    align_lora(&format!("l{t}"), &f, o, i).unwrap()
                })
                .collect();
            let out = knots(layers, &opts).unwrap();
            for (m, e) in out.iter().zip(&naive) {
                close(&m.delta(), e, 1e-5);
            }
        }
    }

    #[test]
    fn alignment_reconstructs_each_update() {
        let (o, i_f) = (6, 5);
        let ls = loras(7, 3, 2, o, i_f);
        let d = deltas(&ls, o, i_f);
        let f: Vec<LoraFactors<'_>> = ls
            .iter()
            .map(|x| LoraFactors {
                a: &x.a,
                b: &x.b,
                rank: x.r,
                scaling: x.s,
            })
            .collect();
        for layer in [
            align_lora("l", &f, o, i_f).unwrap(),
            align_dense(
                "l",
                &d.iter().map(Vec::as_slice).collect::<Vec<_>>(),
                o,
                i_f,
            )
            .unwrap(),
        ] {
            assert_eq!(layer.rank, 6);
            for (i, di) in d.iter().enumerate() {
                let r: Vec<f64> = layer.reps[i].iter().map(|&x| f64::from(x)).collect();
                // ΔW_i = U R_i up to the f32 rounding of R_i.
                close(&mm(&layer.u, o, layer.rank, &r, i_f), di, 1e-6);
            }
        }
        // Tiny singular values are dropped: identical updates give rank 2, not 6.
        let same: Vec<&[f64]> = vec![&d[0], &d[0], &d[0]];
        assert_eq!(align_dense("l", &same, o, i_f).unwrap().rank, 2);
    }

    #[test]
    fn hand_example_ties_selection() {
        // A layer with U = I (2x2) given directly: reps per model (rank 2 x in 2).
        let layer = KnotsLayer {
            name: "h".to_string(),
            out_features: 2,
            in_features: 2,
            rank: 2,
            u: vec![1.0, 0.0, 0.0, 1.0],
            s: vec![1.0, 1.0],
            reps: vec![vec![4.0, -1.0, 0.5, 2.0], vec![-3.0, -2.0, 0.25, -2.0]],
        };
        // topK 50 of d = 4: keep int(2)+... kthvalue(4 - 2 = 2): model 0 |x| sorted
        // [0.5, 1, 2, 4] -> t = 1 (keeps 4, -1, 2); model 1 [0.25, 2, 2, 3] -> t = 2
        // (keeps -3, -2, -2).
        let opts = KnotsOptions {
            top_k: 50.0,
            alpha: 1.0,
            ..Default::default()
        };
        let g = global_stats(std::slice::from_ref(&layer), &opts).unwrap();
        assert_eq!(g.thresholds, vec![1f32.to_bits(), 2f32.to_bits()]);
        let m = merge_layer(&layer, &g, &opts).unwrap();
        // e0: 4 + -3 = 1 -> +: 4. e1: -1 + -2 -> -: (-3)/2. e2: nothing kept -> sign 0 ->
        // majority (signs +, -, 0, 0 -> 0) = 0 -> selects negatives: none -> 0.
        // e3: 2 + -2 = 0 -> majority 0 -> negatives: -2 (model 1).
        assert_eq!(m.a, vec![4.0, -1.5, 0.0, -2.0]);
        assert_eq!(m.delta(), vec![4.0, -1.5, 0.0, -2.0]);
        // Sum of signs: e0: +1 - 1 = 0 -> negatives (-3).
        let opts2 = KnotsOptions {
            sign_mode: KnotsSignMode::SumOfSigns,
            ..opts
        };
        let g2 = global_stats(std::slice::from_ref(&layer), &opts2).unwrap();
        let m2 = merge_layer(&layer, &g2, &opts2).unwrap();
        assert_eq!(m2.a[0], -3.0);
    }

    #[test]
    fn dare_on_representations_is_thread_independent() {
        let (o, i_f) = (40, 300);
        let ls = loras(3, 4, 8, o, i_f);
        let f: Vec<LoraFactors<'_>> = ls
            .iter()
            .map(|x| LoraFactors {
                a: &x.a,
                b: &x.b,
                rank: x.r,
                scaling: x.s,
            })
            .collect();
        let layer = align_lora("x", &f, o, i_f).unwrap();
        let opts = KnotsOptions {
            top_k: 100.0,
            alpha: 0.7,
            dare: Some(KnotsDare {
                drop_rate: 0.1,
                seed: 421,
            }),
            ..Default::default()
        };
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let out = knots(vec![layer.clone()], &opts).unwrap();
                out[0].a.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            })
        };
        assert_eq!(run(1), run(3));
        // The mask follows the documented Philox contract.
        let mut l = layer.clone();
        apply_dare(&mut l, &opts.dare.unwrap());
        let s = MaskStream::new(421, 2, "x.knots");
        for j in 0..l.reps[2].len() {
            let kept = u64::from(s.word(j)) < keep_threshold(0.9);
            let e = if kept {
                layer.reps[2][j] * (1.0 / 0.9f64) as f32
            } else {
                0.0
            };
            assert_eq!(l.reps[2][j].to_bits(), e.to_bits());
        }
    }

    #[test]
    fn bad_options_and_inputs() {
        let bad = KnotsOptions {
            top_k: -1.0,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let bad = KnotsOptions {
            dare: Some(KnotsDare {
                drop_rate: 1.0,
                seed: 0,
            }),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        assert!(align_dense("l", &[], 2, 2).is_err());
        assert!(align_dense("l", &[&[1.0, 2.0, 3.0]], 2, 2).is_err());
    }
}
