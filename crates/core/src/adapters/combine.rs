//! PEFT's `LoraModel.add_weighted_adapter` (peft 0.21, `tuners/lora/model.py`) for one module,
//! as a pure function: several LoRA adapters of the same base module in, one LoRA out.
//!
//! methods.md §3-§4 (TIES / DARE) through PEFT's `utils/merge_utils.py` ([`super::merge_ops`]);
//! sharding class **T** (one module's factors at a time). Inputs per adapter `i`: `A_i`
//! (`r_i × in`), `B_i` (`out × r_i`), its scaling `s_i` (`lora_alpha / r`, or `/√r` with
//! rsLoRA) and its weight `w_i`. All arithmetic is in `f64` (PEFT computes in the adapter's
//! dtype, usually f32); the result is `f64`, cast by the writer.
//!
//! What each combination type computes (exactly as PEFT does):
//!
//! - **Linear family** (`linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`): the A's
//!   and the B's are merged **separately** with the same operation: A with weights
//!   `sign(w_i s_i) · √|w_i s_i|`, B with weights `√|w_i s_i|` (the sign goes on A only). So
//!   `linear` gives `B·A = (Σ √|w_i s_i| B_i)(Σ ±√|w_i s_i| A_i)`, which equals `Σ w_i s_i B_i A_i`
//!   only with one adapter: cross terms `B_i A_j` remain (PEFT's documented "rough
//!   approximation"). Pruning, sign election and DARE act on the factors, not on `ΔW`.
//!   All adapters must have the same rank.
//! - **`cat`**: `A = [w_1 s_1 A_1; …; w_N s_N A_N]` (rows stacked), `B = [B_1 … B_N]` (columns
//!   side by side), so `B·A = Σ w_i s_i B_i A_i` exactly; rank `Σ r_i`.
//! - **SVD family** (`svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`,
//!   `magnitude_prune_svd`): the operation runs on the per-adapter `ΔW_i = s_i B_i A_i` with
//!   weights `w_i` (`svd` = `Σ w_i ΔW_i`), then a truncated SVD `U S Vᵀ` of the result gives
//!   `B = U_r S_r`, `A = V_rᵀ` (the singular values go to B, as PEFT's kohya-derived code does).
//!   `svd_clamp = q` clamps both to `[-h, h]` with `h` the `q`-quantile (linear interpolation, as
//!   `torch.quantile`) of all entries of `U_r S_r` and `V_rᵀ` together (signed values, so a `q`
//!   below the median makes `h` negative and every entry becomes `h`, as `torch.clamp` does).
//! - The new adapter has `r = lora_alpha = new rank` (scaling 1) with no rank or alpha pattern;
//!   see [`new_rank`].
//!
//! PEFT quirks reproduced: one adapter always merges as `linear` ([`resolve_combination`]);
//! `svd_rank = 0` means "not given" (`svd_rank or max(ranks)`); the majority sign is elected
//! from unweighted values; `density ≥ 1` means no pruning; the new rank is computed from the
//! adapters' configured ranks (`max(r, *rank_pattern.values())`), not per module.
//!
//! Deviations (each documented where it happens): results are zero-padded to the new rank
//! wherever a module has fewer components (PEFT writes smaller tensors, or fails, and then
//! saves an adapter whose shapes disagree with its config); `density = 0` with DARE gives
//! zeros (PEFT: NaN); DARE masks come from Philox ([`super::merge_ops`]); magnitude ties go to
//! the lowest index; `svd_driver` / `svd_full_matrices` do not apply (faer's thin SVD on the
//! CPU; singular vector signs, which `svd_clamp` can see, are faer's, not LAPACK's).
//! A copied config with `use_rslora = true` would give the new adapter a scaling of
//! `r/√r = √r` in PEFT (it keeps `use_rslora`); the writer should write `use_rslora = false`.

use super::merge_ops::{self, check_density, MajoritySignMethod, MergeOp};
use super::{check_finite, check_shape, pad_rank};
use crate::error::{MergeError, Result};
use crate::linalg;
use crate::philox::MaskStream;

/// PEFT's `combination_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combination {
    /// `linear`: A's and B's summed separately with `√`-split weights (equal ranks).
    Linear,
    /// `cat`: ranks concatenated; exact.
    Cat,
    /// `svd`: truncated SVD of `Σ w_i ΔW_i`. PEFT's default.
    Svd,
    /// `ties_svd`: TIES over the `ΔW_i`, then SVD.
    TiesSvd,
    /// `dare_linear_svd`: DARE + sum over the `ΔW_i`, then SVD.
    DareLinearSvd,
    /// `dare_ties_svd`: DARE + TIES over the `ΔW_i`, then SVD.
    DareTiesSvd,
    /// `magnitude_prune_svd`: magnitude pruning + sum over the `ΔW_i`, then SVD.
    MagnitudePruneSvd,
    /// `ties`: TIES over the A's and over the B's separately.
    Ties,
    /// `dare_linear`: DARE + sum over the A's and over the B's separately.
    DareLinear,
    /// `dare_ties`: DARE + TIES over the A's and over the B's separately.
    DareTies,
    /// `magnitude_prune`: magnitude pruning + sum over the A's and the B's separately.
    MagnitudePrune,
}

impl Combination {
    /// Every combination type with its PEFT name.
    pub const ALL: [(Combination, &'static str); 11] = [
        (Combination::Linear, "linear"),
        (Combination::Cat, "cat"),
        (Combination::Svd, "svd"),
        (Combination::TiesSvd, "ties_svd"),
        (Combination::DareLinearSvd, "dare_linear_svd"),
        (Combination::DareTiesSvd, "dare_ties_svd"),
        (Combination::MagnitudePruneSvd, "magnitude_prune_svd"),
        (Combination::Ties, "ties"),
        (Combination::DareLinear, "dare_linear"),
        (Combination::DareTies, "dare_ties"),
        (Combination::MagnitudePrune, "magnitude_prune"),
    ];

    /// Parse PEFT's name.
    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .iter()
            .find(|(_, n)| *n == s)
            .map(|(c, _)| *c)
            .ok_or_else(|| MergeError::BadParameter {
                key: "combination_type".to_string(),
                message: format!(
                    "`{s}` is not one of {}",
                    Self::ALL.map(|(_, n)| n).join(", ")
                ),
            })
    }

    /// PEFT's name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(c, _)| *c == self)
            .map(|(_, n)| *n)
            .expect("every combination is listed in ALL")
    }

    /// Whether this type truncates an SVD of the merged `ΔW`.
    pub fn is_svd(self) -> bool {
        matches!(
            self,
            Self::Svd
                | Self::TiesSvd
                | Self::DareLinearSvd
                | Self::DareTiesSvd
                | Self::MagnitudePruneSvd
        )
    }

    /// Whether this type merges A's and B's separately and needs equal ranks.
    pub fn is_linear_family(self) -> bool {
        matches!(
            self,
            Self::Linear | Self::Ties | Self::DareLinear | Self::DareTies | Self::MagnitudePrune
        )
    }

    /// Whether this type needs `density`.
    pub fn needs_density(self) -> bool {
        !matches!(self, Self::Linear | Self::Cat | Self::Svd)
    }
}

/// PEFT's rule: a merge of a single adapter is always `linear`.
pub fn resolve_combination(combination: Combination, n_adapters: usize) -> Combination {
    if n_adapters == 1 {
        Combination::Linear
    } else {
        combination
    }
}

/// The new adapter's rank (`r`, and `lora_alpha`, of the merged adapter), from each adapter's
/// configured maximum rank (`max(r, *rank_pattern.values())`) as PEFT's
/// `_check_add_weighted_adapter` computes it, after [`resolve_combination`]: the common rank for
/// the linear family (error if they differ), the sum for `cat`, `svd_rank` (`None` or `0`: the
/// maximum) for the SVD family.
pub fn new_rank(
    combination: Combination,
    adapter_ranks: &[usize],
    svd_rank: Option<usize>,
) -> Result<usize> {
    let Some(&first) = adapter_ranks.first() else {
        return Err(MergeError::BadInputs {
            method: "add_weighted_adapter".to_string(),
            message: "no adapters to merge".to_string(),
        });
    };
    let combination = resolve_combination(combination, adapter_ranks.len());
    if combination.is_linear_family() {
        if adapter_ranks.iter().any(|&r| r != first) {
            return Err(MergeError::BadInputs {
                method: combination.name().to_string(),
                message: format!(
                    "all adapters must have the same rank r, got {adapter_ranks:?}; use `cat` \
                     or an `svd` combination type for adapters of different ranks"
                ),
            });
        }
        Ok(first)
    } else if combination == Combination::Cat {
        Ok(adapter_ranks.iter().sum())
    } else {
        Ok(match svd_rank {
            Some(r) if r > 0 => r,
            _ => adapter_ranks.iter().copied().max().unwrap_or(0),
        })
    }
}

/// One adapter's factors for one module.
#[derive(Debug, Clone, Copy)]
pub struct LoraModule<'a> {
    /// The adapter's index in the merge (key of its DARE mask stream).
    pub model: usize,
    /// `lora_A`, row-major `rank × in`.
    pub a: &'a [f64],
    /// `lora_B`, row-major `out × rank`.
    pub b: &'a [f64],
    /// This module's rank in this adapter.
    pub rank: usize,
    /// This module's scaling in this adapter (`lora_alpha / r`, or `/√r` with rsLoRA).
    pub scaling: f64,
    /// The adapter's weight in the merge (may be negative).
    pub weight: f64,
}

/// Options of [`combine`] (PEFT's `add_weighted_adapter` arguments).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CombineOptions {
    /// `combination_type`, already passed through [`resolve_combination`].
    pub combination: Combination,
    /// `density`: required by the pruning types, ignored by `linear`, `cat`, `svd`.
    pub density: Option<f64>,
    /// `majority_sign_method` (default `total`).
    pub majority_sign_method: MajoritySignMethod,
    /// `svd_clamp`: quantile in `[0, 1]` for clamping the SVD factors; `None` for none.
    pub svd_clamp: Option<f64>,
    /// Seed of the DARE masks.
    pub seed: u64,
}

impl Default for CombineOptions {
    fn default() -> Self {
        Self {
            combination: Combination::Svd,
            density: None,
            majority_sign_method: MajoritySignMethod::Total,
            svd_clamp: None,
            seed: 0,
        }
    }
}

/// The merged adapter's factors for one module.
#[derive(Debug, Clone, PartialEq)]
pub struct CombinedLora {
    /// `lora_A`, row-major `rank × in_features`.
    pub a: Vec<f64>,
    /// `lora_B`, row-major `out_features × rank`.
    pub b: Vec<f64>,
    /// The rank (rows of `a`, columns of `b`), the target rank given to [`combine`].
    pub rank: usize,
    /// `lora_alpha` of the new adapter: equal to `rank`, so its scaling is 1.
    pub alpha: f64,
    /// Rows of `ΔW`.
    pub out_features: usize,
    /// Columns of `ΔW`.
    pub in_features: usize,
}

impl CombinedLora {
    /// `(alpha / rank) · B · A`, row-major `out × in` (the module's merged update).
    pub fn delta(&self) -> Vec<f64> {
        let mut d = linalg::matmul(
            &self.b,
            self.out_features,
            self.rank,
            &self.a,
            self.in_features,
        );
        if self.rank > 0 && self.alpha != self.rank as f64 {
            let s = self.alpha / self.rank as f64;
            d.iter_mut().for_each(|x| *x *= s);
        }
        d
    }
}

fn op_for(opts: &CombineOptions) -> Result<MergeOp> {
    let c = opts.combination;
    let density = if c.needs_density() {
        let d = opts.density.ok_or_else(|| MergeError::MissingParameter {
            key: "density".to_string(),
            method: c.name().to_string(),
            model: None,
        })?;
        check_density(d)?;
        d
    } else {
        1.0
    };
    let sign = opts.majority_sign_method;
    Ok(match c {
        Combination::Linear | Combination::Svd | Combination::Cat => MergeOp::TaskArithmetic,
        Combination::Ties | Combination::TiesSvd => MergeOp::Ties { density, sign },
        Combination::DareLinear | Combination::DareLinearSvd => MergeOp::DareLinear { density },
        Combination::DareTies | Combination::DareTiesSvd => MergeOp::DareTies { density, sign },
        Combination::MagnitudePrune | Combination::MagnitudePruneSvd => {
            MergeOp::MagnitudePrune { density }
        }
    })
}

/// Merge one module's adapters as PEFT's `add_weighted_adapter` does (see the module docs).
///
/// `module` names the module in errors and in the DARE mask names: the masks of the linear
/// family use `"{module}.lora_A.weight"` and `"{module}.lora_B.weight"`, those of the SVD family
/// `"{module}.weight"` (the `ΔW`), each with key `(seed, adapter.model)`. `target_rank` is the
/// new adapter's rank from [`new_rank`]; the result is zero-padded up to it (an error if the
/// module needs more). `adapters` are the adapters that have this module (PEFT skips the
/// others), in merge order.
pub fn combine(
    module: &str,
    out_features: usize,
    in_features: usize,
    adapters: &[LoraModule<'_>],
    target_rank: usize,
    opts: &CombineOptions,
) -> Result<CombinedLora> {
    let c = opts.combination;
    if adapters.is_empty() {
        return Err(MergeError::BadInputs {
            method: c.name().to_string(),
            message: format!("module `{module}`: no adapter has this module"),
        });
    }
    for (i, ad) in adapters.iter().enumerate() {
        check_shape(module, "lora_A", ad.a.len(), ad.rank, in_features)?;
        check_shape(module, "lora_B", ad.b.len(), out_features, ad.rank)?;
        check_finite(module, "lora_A", ad.a)?;
        check_finite(module, "lora_B", ad.b)?;
        for (key, v) in [("weight", ad.weight), ("scaling", ad.scaling)] {
            if !v.is_finite() {
                return Err(MergeError::BadParameter {
                    key: key.to_string(),
                    message: format!("adapter {i}: must be finite, got {v}"),
                });
            }
        }
    }
    if let Some(q) = opts.svd_clamp {
        if !(0.0..=1.0).contains(&q) {
            return Err(MergeError::BadParameter {
                key: "svd_clamp".to_string(),
                message: format!("must be a quantile in [0, 1], got {q}"),
            });
        }
    }
    let op = op_for(opts)?;
    let (a, b, used) = if c.is_linear_family() {
        combine_factors(module, in_features, out_features, adapters, op, opts)?
    } else if c == Combination::Cat {
        combine_cat(in_features, out_features, adapters)
    } else {
        combine_svd(
            module,
            in_features,
            out_features,
            adapters,
            target_rank,
            op,
            opts,
        )?
    };
    if used > target_rank {
        return Err(MergeError::BadInputs {
            method: c.name().to_string(),
            message: format!(
                "module `{module}`: the merge has rank {used} but the new adapter's rank is \
                 {target_rank}"
            ),
        });
    }
    let (a, b) = pad_rank(a, b, used, target_rank, in_features, out_features);
    Ok(CombinedLora {
        a,
        b,
        rank: target_rank,
        alpha: target_rank as f64,
        out_features,
        in_features,
    })
}

/// The linear family: the op over the A's and over the B's, with √-split weights.
fn combine_factors(
    module: &str,
    in_f: usize,
    out_f: usize,
    adapters: &[LoraModule<'_>],
    op: MergeOp,
    opts: &CombineOptions,
) -> Result<(Vec<f64>, Vec<f64>, usize)> {
    let r = adapters[0].rank;
    if adapters.iter().any(|ad| ad.rank != r) {
        return Err(MergeError::BadInputs {
            method: opts.combination.name().to_string(),
            message: format!(
                "module `{module}`: all adapters must have the same rank here, got {:?}",
                adapters.iter().map(|ad| ad.rank).collect::<Vec<_>>()
            ),
        });
    }
    let mut wa = Vec::with_capacity(adapters.len());
    let mut wb = Vec::with_capacity(adapters.len());
    for ad in adapters {
        let ws = ad.weight * ad.scaling;
        let root = ws.abs().sqrt();
        wa.push(if ws >= 0.0 { root } else { -root });
        wb.push(root);
    }
    let streams = |suffix: &str| -> Vec<MaskStream> {
        let name = format!("{module}.{suffix}");
        adapters
            .iter()
            .map(|ad| MaskStream::new(opts.seed, ad.model, &name))
            .collect()
    };
    let a = merge_ops::apply(
        op,
        adapters.iter().map(|ad| ad.a.to_vec()).collect(),
        &wa,
        &streams("lora_A.weight"),
    );
    let b = merge_ops::apply(
        op,
        adapters.iter().map(|ad| ad.b.to_vec()).collect(),
        &wb,
        &streams("lora_B.weight"),
    );
    debug_assert_eq!((a.len(), b.len()), (r * in_f, out_f * r));
    Ok((a, b, r))
}

/// `cat`: A's scaled by `w_i s_i` stacked by rows, B's side by side.
fn combine_cat(
    in_f: usize,
    out_f: usize,
    adapters: &[LoraModule<'_>],
) -> (Vec<f64>, Vec<f64>, usize) {
    let total: usize = adapters.iter().map(|ad| ad.rank).sum();
    let mut a = Vec::with_capacity(total * in_f);
    for ad in adapters {
        let f = ad.weight * ad.scaling;
        a.extend(ad.a.iter().map(|x| x * f));
    }
    let mut b = vec![0.0; out_f * total];
    let mut col = 0;
    for ad in adapters {
        for o in 0..out_f {
            b[o * total + col..o * total + col + ad.rank]
                .copy_from_slice(&ad.b[o * ad.rank..(o + 1) * ad.rank]);
        }
        col += ad.rank;
    }
    (a, b, total)
}

/// The SVD family: the op over the `ΔW_i = s_i B_i A_i` with weights `w_i`, then a truncated
/// SVD, `B = U_r S_r`, `A = V_rᵀ`, optionally clamped.
fn combine_svd(
    module: &str,
    in_f: usize,
    out_f: usize,
    adapters: &[LoraModule<'_>],
    target_rank: usize,
    op: MergeOp,
    opts: &CombineOptions,
) -> Result<(Vec<f64>, Vec<f64>, usize)> {
    let mut deltas = Vec::with_capacity(adapters.len());
    for ad in adapters {
        deltas.push(super::lora_delta(
            module, ad.a, ad.b, ad.rank, out_f, in_f, ad.scaling,
        )?);
    }
    let weights: Vec<f64> = adapters.iter().map(|ad| ad.weight).collect();
    let name = format!("{module}.weight");
    let streams: Vec<MaskStream> = adapters
        .iter()
        .map(|ad| MaskStream::new(opts.seed, ad.model, &name))
        .collect();
    let delta = merge_ops::apply(op, deltas, &weights, &streams);
    let svd = linalg::svd(&delta, out_f, in_f).map_err(|e| linalg::name_tensor(e, module))?;
    let r = target_rank.min(svd.k);
    // B = U[:, :r] · diag(S[:r]); A = Vᵀ[:r, :].
    let mut b = vec![0.0; out_f * r];
    for o in 0..out_f {
        for j in 0..r {
            b[o * r + j] = svd.u[o * svd.k + j] * svd.s[j];
        }
    }
    let mut a = svd.vt[..r * in_f].to_vec();
    if let Some(q) = opts.svd_clamp {
        let mut all: Vec<f64> = b.iter().chain(a.iter()).copied().collect();
        let hi = quantile_linear(&mut all, q);
        let lo = -hi;
        // torch.clamp(x, lo, hi) = min(max(x, lo), hi): everything becomes hi when lo > hi.
        let clamp = |x: &mut f64| *x = x.max(lo).min(hi);
        b.iter_mut().for_each(clamp);
        a.iter_mut().for_each(clamp);
    }
    Ok((a, b, r))
}

/// `torch.quantile(v, q)` with its default linear interpolation (sorts `v`); `q` in `[0, 1]`.
fn quantile_linear(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let pos = q * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (pos.ceil() as usize).min(v.len() - 1);
    let frac = pos - lo as f64;
    v[lo] + (v[hi] - v[lo]) * frac
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::test_util::{mm, rand_vec};

    fn close(x: &[f64], y: &[f64], tol: f64) {
        assert_eq!(x.len(), y.len());
        let scale = y.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        for (i, (a, b)) in x.iter().zip(y).enumerate() {
            assert!(
                (a - b).abs() <= tol * scale,
                "index {i}: {a} vs {b} (tol {tol})"
            );
        }
    }

    struct Fixture {
        a: Vec<Vec<f64>>,
        b: Vec<Vec<f64>>,
        r: Vec<usize>,
        s: Vec<f64>,
        w: Vec<f64>,
    }
    const OUT: usize = 7;
    const IN: usize = 5;

    fn fixture(ranks: &[usize]) -> Fixture {
        let a = ranks
            .iter()
            .enumerate()
            .map(|(i, &r)| rand_vec(10 + i as u64, r * IN))
            .collect();
        let b = ranks
            .iter()
            .enumerate()
            .map(|(i, &r)| rand_vec(20 + i as u64, OUT * r))
            .collect();
        Fixture {
            a,
            b,
            r: ranks.to_vec(),
            s: vec![2.0, 0.5, 1.5][..ranks.len()].to_vec(),
            w: vec![0.7, -0.4, 1.2][..ranks.len()].to_vec(),
        }
    }

    fn modules(f: &Fixture) -> Vec<LoraModule<'_>> {
        (0..f.r.len())
            .map(|i| LoraModule {
                model: i,
                a: &f.a[i],
                b: &f.b[i],
                rank: f.r[i],
                scaling: f.s[i],
                weight: f.w[i],
            })
            .collect()
    }

    fn run(f: &Fixture, c: Combination, density: Option<f64>, rank: usize) -> CombinedLora {
        let opts = CombineOptions {
            combination: c,
            density,
            ..Default::default()
        };
        combine("m", OUT, IN, &modules(f), rank, &opts).unwrap()
    }

    /// Σ w_i s_i B_i A_i, naive.
    fn exact_sum(f: &Fixture) -> Vec<f64> {
        let mut d = vec![0.0; OUT * IN];
        for i in 0..f.r.len() {
            let p = mm(&f.b[i], OUT, f.r[i], &f.a[i], IN);
            for (x, y) in d.iter_mut().zip(&p) {
                *x += f.w[i] * f.s[i] * y;
            }
        }
        d
    }

    #[test]
    fn linear_combines_factors_separately() {
        let f = fixture(&[3, 3, 3]);
        let out = run(&f, Combination::Linear, None, 3);
        assert_eq!((out.rank, out.alpha), (3, 3.0));
        // Naive: A = Σ sign(ws) √|ws| A_i, B = Σ √|ws| B_i.
        let mut a = vec![0.0; 3 * IN];
        let mut b = vec![0.0; OUT * 3];
        for i in 0..3 {
            let ws: f64 = f.w[i] * f.s[i];
            for (x, y) in a.iter_mut().zip(&f.a[i]) {
                *x += ws.signum() * ws.abs().sqrt() * y;
            }
            for (x, y) in b.iter_mut().zip(&f.b[i]) {
                *x += ws.abs().sqrt() * y;
            }
        }
        close(&out.a, &a, 1e-14);
        close(&out.b, &b, 1e-14);
        close(&out.delta(), &mm(&b, OUT, 3, &a, IN), 1e-13);
    }

    #[test]
    fn linear_single_adapter_is_exact_and_unequal_ranks_fail() {
        let f = fixture(&[2]);
        let c = resolve_combination(Combination::Svd, 1);
        assert_eq!(c, Combination::Linear);
        let out = run(&f, c, None, 2);
        close(&out.delta(), &exact_sum(&f), 1e-13);
        assert!(new_rank(Combination::Ties, &[2, 3], None).is_err());
        let g = fixture(&[2, 3]);
        let opts = CombineOptions {
            combination: Combination::Linear,
            ..Default::default()
        };
        assert!(combine("m", OUT, IN, &modules(&g), 3, &opts).is_err());
    }

    #[test]
    fn cat_is_exact_with_mixed_ranks_and_padding() {
        let f = fixture(&[2, 3, 1]);
        let rank = new_rank(Combination::Cat, &f.r, None).unwrap();
        assert_eq!(rank, 6);
        let out = run(&f, Combination::Cat, None, 8);
        assert_eq!(out.rank, 8);
        close(&out.delta(), &exact_sum(&f), 1e-13);
        // A rows are w_i s_i A_i in order; B columns are the B_i; the padding is zero.
        for j in 0..IN {
            assert_eq!(out.a[j], f.w[0] * f.s[0] * f.a[0][j]);
            assert_eq!(out.a[2 * IN + j], f.w[1] * f.s[1] * f.a[1][j]);
            assert_eq!(out.a[6 * IN + j], 0.0);
        }
        assert_eq!(out.b[2], f.b[1][0]);
        assert_eq!(out.b[7], 0.0);
    }

    #[test]
    fn svd_full_rank_reproduces_the_weighted_sum() {
        let f = fixture(&[2, 3, 1]);
        // Rank min(out, in) = 5 holds the whole sum.
        let out = run(&f, Combination::Svd, None, 5);
        close(&out.delta(), &exact_sum(&f), 1e-12);
        // B = U S has orthogonal columns with norms S; A = Vᵀ has orthonormal rows.
        let aat = mm(
            &out.a,
            5,
            IN,
            &(0..IN * 5)
                .map(|t| out.a[(t % 5) * IN + t / 5])
                .collect::<Vec<_>>(),
            5,
        );
        for i in 0..5 {
            for j in 0..5 {
                let e = if i == j { 1.0 } else { 0.0 };
                assert!((aat[i * 5 + j] - e).abs() < 1e-12);
            }
        }
        // Rank above min(out, in): zero padding.
        let wide = run(&f, Combination::Svd, None, 9);
        assert_eq!(wide.rank, 9);
        close(&wide.delta(), &exact_sum(&f), 1e-12);
        assert!(wide.a[5 * IN..].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn svd_truncation_is_the_best_rank_r_approximation() {
        let f = fixture(&[3, 3, 3]);
        let out = run(&f, Combination::Svd, None, 2);
        let d = exact_sum(&f);
        // Eckart-Young: the residual's Frobenius norm² equals the sum of the dropped s².
        let s = crate::linalg::singular_values(&d, OUT, IN).unwrap();
        let dropped: f64 = s[2..].iter().map(|x| x * x).sum();
        let res: f64 = out
            .delta()
            .iter()
            .zip(&d)
            .map(|(x, y)| (x - y) * (x - y))
            .sum();
        assert!((res - dropped).abs() < 1e-10 * (1.0 + dropped));
        assert_eq!(new_rank(Combination::Svd, &[3, 4], None).unwrap(), 4);
        assert_eq!(new_rank(Combination::Svd, &[3, 4], Some(0)).unwrap(), 4);
        assert_eq!(new_rank(Combination::Svd, &[3, 4], Some(2)).unwrap(), 2);
    }

    /// Naive f64 TIES of PEFT (magnitude by sort, total sign, disjoint merge).
    fn naive_ties(ts: &[Vec<f64>], w: &[f64], density: f64) -> Vec<f64> {
        let pruned: Vec<Vec<f64>> = ts
            .iter()
            .map(|t| {
                let k = (density * t.len() as f64) as usize;
                let mut idx: Vec<usize> = (0..t.len()).collect();
                idx.sort_by(|&i, &j| t[j].abs().total_cmp(&t[i].abs()).then(i.cmp(&j)));
                let mut p = vec![0.0; t.len()];
                for &i in &idx[..k] {
                    p[i] = t[i];
                }
                p
            })
            .collect();
        (0..ts[0].len())
            .map(|j| {
                let tot: f64 = pruned.iter().map(|p| p[j]).sum();
                let el = if tot >= 0.0 { 1.0 } else { -1.0 };
                let (mut s, mut c) = (0.0, 0.0);
                for (p, wi) in pruned.iter().zip(w) {
                    if p[j] != 0.0 && p[j].signum() == el {
                        s += p[j] * wi;
                        c += 1.0;
                    }
                }
                s / f64::max(c, 1.0)
            })
            .collect()
    }

    fn sqrt_weights(f: &Fixture) -> (Vec<f64>, Vec<f64>) {
        let ws: Vec<f64> = (0..f.r.len()).map(|i| f.w[i] * f.s[i]).collect();
        (
            ws.iter().map(|x| x.signum() * x.abs().sqrt()).collect(),
            ws.iter().map(|x| x.abs().sqrt()).collect(),
        )
    }

    #[test]
    fn ties_and_magnitude_prune_on_factors() {
        let f = fixture(&[3, 3, 3]);
        let (wa, wb) = sqrt_weights(&f);
        let out = run(&f, Combination::Ties, Some(0.4), 3);
        close(&out.a, &naive_ties(&f.a, &wa, 0.4), 1e-14);
        close(&out.b, &naive_ties(&f.b, &wb, 0.4), 1e-14);
        // magnitude_prune: pruned sum.
        let out = run(&f, Combination::MagnitudePrune, Some(0.5), 3);
        let naive_mp = |ts: &[Vec<f64>], w: &[f64]| -> Vec<f64> {
            let mut acc = vec![0.0; ts[0].len()];
            for (t, wi) in ts.iter().zip(w) {
                let k = (0.5 * t.len() as f64) as usize;
                let mut idx: Vec<usize> = (0..t.len()).collect();
                idx.sort_by(|&i, &j| t[j].abs().total_cmp(&t[i].abs()).then(i.cmp(&j)));
                for &i in &idx[..k] {
                    acc[i] += wi * t[i];
                }
            }
            acc
        };
        close(&out.a, &naive_mp(&f.a, &wa), 1e-14);
        close(&out.b, &naive_mp(&f.b, &wb), 1e-14);
        // density required.
        let opts = CombineOptions {
            combination: Combination::Ties,
            ..Default::default()
        };
        assert!(matches!(
            combine("m", OUT, IN, &modules(&f), 3, &opts),
            Err(MergeError::MissingParameter { .. })
        ));
    }

    /// Naive DARE with the documented Philox contract.
    fn naive_dare(t: &[f64], density: f64, seed: u64, model: usize, name: &str) -> Vec<f64> {
        let thr = (density * 4_294_967_296.0).floor() as u64;
        let key = [seed as u32, ((seed >> 32) as u32) ^ model as u32];
        let h = crate::philox::name_hash(name);
        t.iter()
            .enumerate()
            .map(|(j, &v)| {
                let ctr = [h as u32, (h >> 32) as u32, j as u32, 0];
                let x0 = crate::philox::philox4x32_10(ctr, key)[0];
                if u64::from(x0) < thr {
                    v / density
                } else {
                    0.0
                }
            })
            .collect()
    }

    #[test]
    fn dare_linear_and_dare_ties_on_factors_and_svd() {
        let f = fixture(&[3, 3, 3]);
        let (wa, wb) = sqrt_weights(&f);
        let d = 0.6;
        let opts = CombineOptions {
            combination: Combination::DareLinear,
            density: Some(d),
            seed: 5,
            ..Default::default()
        };
        let out = combine("mod", OUT, IN, &modules(&f), 3, &opts).unwrap();
        let mut ea = vec![0.0; 3 * IN];
        let mut eb = vec![0.0; OUT * 3];
        for i in 0..3 {
            let pa = naive_dare(&f.a[i], d, 5, i, "mod.lora_A.weight");
            let pb = naive_dare(&f.b[i], d, 5, i, "mod.lora_B.weight");
            ea.iter_mut().zip(&pa).for_each(|(x, y)| *x += wa[i] * y);
            eb.iter_mut().zip(&pb).for_each(|(x, y)| *x += wb[i] * y);
        }
        close(&out.a, &ea, 1e-14);
        close(&out.b, &eb, 1e-14);

        // dare_ties: DARE then sign election (density 1 in naive_ties = no pruning).
        let opts = CombineOptions {
            combination: Combination::DareTies,
            density: Some(d),
            seed: 5,
            ..Default::default()
        };
        let out = combine("mod", OUT, IN, &modules(&f), 3, &opts).unwrap();
        let pa: Vec<Vec<f64>> = (0..3)
            .map(|i| naive_dare(&f.a[i], d, 5, i, "mod.lora_A.weight"))
            .collect();
        close(&out.a, &naive_ties(&pa, &wa, 1.0), 1e-14);

        // dare_linear_svd: DARE on ΔW_i, weighted sum, full-rank SVD reproduces it.
        let opts = CombineOptions {
            combination: Combination::DareLinearSvd,
            density: Some(d),
            seed: 5,
            ..Default::default()
        };
        let out = combine("mod", OUT, IN, &modules(&f), 5, &opts).unwrap();
        let mut e = vec![0.0; OUT * IN];
        for i in 0..3 {
            let dw: Vec<f64> = mm(&f.b[i], OUT, 3, &f.a[i], IN)
                .iter()
                .map(|x| x * f.s[i])
                .collect();
            let p = naive_dare(&dw, d, 5, i, "mod.weight");
            e.iter_mut().zip(&p).for_each(|(x, y)| *x += f.w[i] * y);
        }
        close(&out.delta(), &e, 1e-12);
    }

    #[test]
    fn ties_svd_and_magnitude_prune_svd_prune_each_delta() {
        let f = fixture(&[3, 3, 3]);
        let dws: Vec<Vec<f64>> = (0..3)
            .map(|i| {
                mm(&f.b[i], OUT, 3, &f.a[i], IN)
                    .iter()
                    .map(|x| x * f.s[i])
                    .collect()
            })
            .collect();
        let out = run(&f, Combination::TiesSvd, Some(0.3), 5);
        close(&out.delta(), &naive_ties(&dws, &f.w, 0.3), 1e-12);
        let out = run(&f, Combination::MagnitudePruneSvd, Some(0.3), 5);
        let mut e = vec![0.0; OUT * IN];
        for (t, wi) in dws.iter().zip(&f.w) {
            let k = (0.3 * t.len() as f64) as usize;
            let mut idx: Vec<usize> = (0..t.len()).collect();
            idx.sort_by(|&p, &q| t[q].abs().total_cmp(&t[p].abs()).then(p.cmp(&q)));
            for &j in &idx[..k] {
                e[j] += wi * t[j];
            }
        }
        close(&out.delta(), &e, 1e-12);
        // dare_ties_svd runs (values checked through dare_* above).
        let opts = CombineOptions {
            combination: Combination::DareTiesSvd,
            density: Some(0.5),
            ..Default::default()
        };
        assert!(combine("m", OUT, IN, &modules(&f), 3, &opts).is_ok());
    }

    #[test]
    fn hand_built_adapters_known_product() {
        // Two rank-1 adapters on a 2x2 module: ΔW_1 = 2·[1;0][1 0], ΔW_2 = 1·[0;1][0 1].
        let (a1, b1) = (vec![1.0, 0.0], vec![1.0, 0.0]);
        let (a2, b2) = (vec![0.0, 1.0], vec![0.0, 1.0]);
        let m = [
            LoraModule {
                model: 0,
                a: &a1,
                b: &b1,
                rank: 1,
                scaling: 2.0,
                weight: 0.5,
            },
            LoraModule {
                model: 1,
                a: &a2,
                b: &b2,
                rank: 1,
                scaling: 1.0,
                weight: 3.0,
            },
        ];
        let go = |c: Combination, rank: usize| {
            let opts = CombineOptions {
                combination: c,
                ..Default::default()
            };
            combine("m", 2, 2, &m, rank, &opts).unwrap().delta()
        };
        // Exact: 0.5·2·e1e1ᵀ + 3·1·e2e2ᵀ = diag(1, 3).
        assert_eq!(go(Combination::Cat, 2), vec![1.0, 0.0, 0.0, 3.0]);
        close(&go(Combination::Svd, 2), &[1.0, 0.0, 0.0, 3.0], 1e-15);
        // svd rank 1 keeps the larger singular value only.
        close(&go(Combination::Svd, 1), &[0.0, 0.0, 0.0, 3.0], 1e-15);
        // linear: A = [1, √3], B = [1; √3] -> BA = [[1, √3], [√3, 3]] (cross terms).
        let s3 = 3f64.sqrt();
        close(&go(Combination::Linear, 1), &[1.0, s3, s3, 3.0], 1e-15);
    }

    #[test]
    fn negative_weight_sign_goes_on_a() {
        let (a1, b1) = (vec![1.0, 2.0], vec![3.0]);
        let m = [LoraModule {
            model: 0,
            a: &a1,
            b: &b1,
            rank: 1,
            scaling: 1.0,
            weight: -4.0,
        }];
        let opts = CombineOptions {
            combination: Combination::Linear,
            ..Default::default()
        };
        let out = combine("m", 1, 2, &m, 1, &opts).unwrap();
        assert_eq!(out.a, vec![-2.0, -4.0]);
        assert_eq!(out.b, vec![6.0]);
        assert_eq!(out.delta(), vec![-12.0, -24.0]);
    }

    #[test]
    fn svd_clamp_quantile() {
        let mut v = vec![4.0, 1.0, 3.0, 2.0];
        // torch.quantile([1,2,3,4], 0.5) = 2.5; 0.9 -> pos 2.7 -> 3.7.
        assert_eq!(quantile_linear(&mut v, 0.5), 2.5);
        assert!((quantile_linear(&mut v, 0.9) - 3.7).abs() < 1e-15);
        let f = fixture(&[3, 3]);
        let opts = CombineOptions {
            combination: Combination::Svd,
            svd_clamp: Some(0.9),
            ..Default::default()
        };
        let clamped = combine("m", OUT, IN, &modules(&f), 3, &opts).unwrap();
        let plain = run(&f, Combination::Svd, None, 3);
        let mut all: Vec<f64> = plain.b.iter().chain(&plain.a).copied().collect();
        let hi = quantile_linear(&mut all, 0.9);
        for (c, p) in clamped.a.iter().zip(&plain.a) {
            assert_eq!(*c, p.clamp(-hi, hi));
        }
        let bad = CombineOptions {
            svd_clamp: Some(1.5),
            ..opts
        };
        assert!(combine("m", OUT, IN, &modules(&f), 3, &bad).is_err());
    }

    #[test]
    fn results_do_not_depend_on_threads() {
        let f = fixture(&[3, 3, 3]);
        for c in [
            Combination::DareTies,
            Combination::DareTiesSvd,
            Combination::TiesSvd,
        ] {
            let go = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| {
                    let o = run(&f, c, Some(0.5), 3);
                    o.a.iter()
                        .chain(&o.b)
                        .map(|x| x.to_bits())
                        .collect::<Vec<_>>()
                })
            };
            assert_eq!(go(1), go(3), "{}", c.name());
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let f = fixture(&[3, 3]);
        let mut m = modules(&f);
        m[1].a = &f.a[1][..4];
        let opts = CombineOptions::default();
        assert!(combine("m", OUT, IN, &m, 3, &opts).is_err());
        let nan = vec![f64::NAN; 3 * IN];
        let mut m = modules(&f);
        m[0].a = &nan;
        assert!(combine("m", OUT, IN, &m, 3, &opts).is_err());
        assert!(combine("m", OUT, IN, &[], 3, &opts).is_err());
        let neg = CombineOptions {
            combination: Combination::DareLinear,
            density: Some(-0.1),
            ..Default::default()
        };
        assert!(combine("m", OUT, IN, &modules(&f), 3, &neg).is_err());
        assert_eq!(
            Combination::parse("dare_ties_svd").unwrap(),
            Combination::DareTiesSvd
        );
        assert!(Combination::parse("nope").is_err());
    }
}
