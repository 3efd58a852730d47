//! PEFT's `utils/merge_utils.py` (peft 0.21) over `f64` tensors: the operations
//! `add_weighted_adapter` applies to LoRA factors or to per-adapter `ΔW` (methods.md §3-§4 list
//! the TIES / DARE families; this is PEFT's variant of them, not mergekit's).
//!
//! Each operation works on one tensor per adapter (same length, row-major flat) and is a pure
//! function of them, their weights and (for DARE) the Philox mask streams:
//!
//! - `magnitude` pruning: keeps exactly `k = floor(density · n)` entries of largest `|x|`
//!   (PEFT: `torch.topk`, tie order unspecified; here ties go to the lowest flat index).
//!   `density ≥ 1` prunes nothing (PEFT warns); `density < 0` is an error.
//! - `random` pruning (DARE): keeps an entry with probability `density` and, with `rescale`,
//!   divides the kept ones by `density`. The keep decision is [`crate::philox`]'s
//!   (`word < floor(density · 2^32)`, key `(seed, adapter index)`, counter `(FNV-1a 64 of the
//!   tensor's mask name, flat index)`), so masks do not depend on threads or blocks; PEFT draws
//!   `torch.bernoulli` instead, so masks differ from PEFT's run to run anyway.
//!   `density = 0` gives zeros (PEFT computes `0 / 0 = NaN`).
//! - majority sign: `total` = sign of `Σ_i x_i` (unweighted), `frequency` = sign of
//!   `Σ_i sign(x_i)`; `≥ 0` elects `+1` (ties go to `+`).
//! - disjoint merge: `Σ_i w_i x_i [sign(x_i) = elected] / max(1, #{i : sign(x_i) = elected})`.
//!   The mask compares the **unweighted** sign with the elected sign (a negative weight does not
//!   flip an adapter's vote; PEFT quirk reproduced), and zeros never match.

use crate::error::{MergeError, Result};
use crate::philox::{keep_threshold, MaskStream};
use rayon::prelude::*;

/// Elements per parallel chunk of the elementwise loops (fixed: results do not depend on it).
const CHUNK: usize = 1 << 14;

/// How the elected sign is computed (PEFT `majority_sign_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MajoritySignMethod {
    /// Sign of the sum of the (pruned, unweighted) values. PEFT's default.
    #[default]
    Total,
    /// Sign of the sum of the signs.
    Frequency,
}

impl MajoritySignMethod {
    /// Parse PEFT's name (`total`, `frequency`).
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "total" => Ok(Self::Total),
            "frequency" => Ok(Self::Frequency),
            other => Err(MergeError::BadParameter {
                key: "majority_sign_method".to_string(),
                message: format!("`{other}` is not one of `total`, `frequency`"),
            }),
        }
    }
}

/// One of PEFT's merge operations (`merge_utils.py`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MergeOp {
    /// `task_arithmetic`: `Σ w_i x_i`.
    TaskArithmetic,
    /// `magnitude_prune`: magnitude pruning, then `Σ w_i x_i`.
    MagnitudePrune {
        /// Fraction kept.
        density: f64,
    },
    /// `ties`: magnitude pruning, sign election, disjoint merge.
    Ties {
        /// Fraction kept.
        density: f64,
        /// How the sign is elected.
        sign: MajoritySignMethod,
    },
    /// `dare_linear`: random pruning with rescale, then `Σ w_i x_i`.
    DareLinear {
        /// Keep probability.
        density: f64,
    },
    /// `dare_ties`: random pruning with rescale, sign election, disjoint merge.
    DareTies {
        /// Keep probability.
        density: f64,
        /// How the sign is elected.
        sign: MajoritySignMethod,
    },
}

/// Check a PEFT `density` (`≥ 0`, finite; values `≥ 1` mean no pruning).
pub fn check_density(density: f64) -> Result<()> {
    if density.is_nan() || density < 0.0 {
        return Err(MergeError::BadParameter {
            key: "density".to_string(),
            message: format!("must be >= 0 (fraction of values kept), got {density}"),
        });
    }
    Ok(())
}

/// Keep the `floor(density · n)` entries of largest magnitude of `x` (ties to the lowest
/// index) and zero the others; `density ≥ 1` keeps everything.
pub fn magnitude_prune_in_place(x: &mut [f64], density: f64) {
    if density >= 1.0 {
        return;
    }
    let n = x.len();
    // Python's int(density * numel): truncation of the f64 product.
    let k = ((density * n as f64) as usize).min(n);
    if k == n {
        return;
    }
    if k == 0 {
        x.iter_mut().for_each(|v| *v = 0.0);
        return;
    }
    // Magnitude keys: the bit pattern of |x| orders non-negative f64s.
    let key = |v: f64| v.abs().to_bits();
    let mut keys: Vec<u64> = x.par_iter().map(|&v| key(v)).collect();
    // The k-th largest key: position n - k in ascending order.
    let (_, kth, _) = keys.select_nth_unstable(n - k);
    let kth = *kth;
    drop(keys);
    let above = x.par_iter().filter(|&&v| key(v) > kth).count();
    // Keep every entry above the k-th key and the first (k - above) equal to it, by index.
    let mut equal_left = k - above;
    for v in x.iter_mut() {
        let kv = key(*v);
        if kv > kth {
            continue;
        }
        if kv == kth && equal_left > 0 {
            equal_left -= 1;
            continue;
        }
        *v = 0.0;
    }
}

/// DARE's random pruning: keep entry `j` when `stream.keep(j, floor(density · 2^32))`, zero it
/// otherwise, and divide the kept ones by `density` when `rescale`. `density ≥ 1` keeps
/// everything unscaled (PEFT returns the tensor untouched); `density = 0` zeroes everything.
pub fn random_prune_in_place(x: &mut [f64], density: f64, rescale: bool, stream: &MaskStream) {
    if density >= 1.0 {
        return;
    }
    let thr = keep_threshold(density);
    x.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
        let base = c * CHUNK;
        for (j, v) in chunk.iter_mut().enumerate() {
            if !stream.keep(base + j, thr) {
                *v = 0.0;
            } else if rescale {
                *v /= density;
            }
        }
    });
}

fn sign(v: f64) -> i8 {
    if v > 0.0 {
        1
    } else if v < 0.0 {
        -1
    } else {
        0
    }
}

/// The elected sign per entry (`+1` or `-1`) of the (pruned, unweighted) tensors.
pub fn majority_sign(tensors: &[Vec<f64>], method: MajoritySignMethod) -> Vec<i8> {
    let n = tensors.first().map_or(0, Vec::len);
    let mut out = vec![0i8; n];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let base = c * CHUNK;
            for (j, o) in chunk.iter_mut().enumerate() {
                let s: f64 = match method {
                    MajoritySignMethod::Total => tensors.iter().map(|t| t[base + j]).sum(),
                    MajoritySignMethod::Frequency => {
                        tensors.iter().map(|t| f64::from(sign(t[base + j]))).sum()
                    }
                };
                *o = if s >= 0.0 { 1 } else { -1 };
            }
        });
    out
}

/// `Σ_i w_i x_i`.
pub fn weighted_sum(tensors: &[Vec<f64>], weights: &[f64]) -> Vec<f64> {
    let n = tensors.first().map_or(0, Vec::len);
    let mut out = vec![0.0; n];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let base = c * CHUNK;
            for (j, o) in chunk.iter_mut().enumerate() {
                *o = tensors
                    .iter()
                    .zip(weights)
                    .map(|(t, w)| t[base + j] * w)
                    .sum();
            }
        });
    out
}

/// PEFT's `disjoint_merge` of the weighted tensors under the elected signs `elected`.
pub fn disjoint_merge(tensors: &[Vec<f64>], weights: &[f64], elected: &[i8]) -> Vec<f64> {
    let n = elected.len();
    let mut out = vec![0.0; n];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let base = c * CHUNK;
            for (j, o) in chunk.iter_mut().enumerate() {
                let (mut sum, mut count) = (0.0, 0u32);
                for (t, w) in tensors.iter().zip(weights) {
                    let v = t[base + j];
                    if sign(v) == elected[base + j] {
                        sum += v * w;
                        count += 1;
                    }
                }
                *o = sum / f64::from(count.max(1));
            }
        });
    out
}

/// Run `op` over `tensors` (one per adapter, consumed) with `weights`; `streams[i]` is adapter
/// `i`'s DARE mask stream (only read by the DARE operations). Returns the merged tensor.
///
/// # Panics
/// When the tensors differ in length or `weights` / `streams` are shorter than `tensors`
/// (the caller's invariant).
pub fn apply(
    op: MergeOp,
    mut tensors: Vec<Vec<f64>>,
    weights: &[f64],
    streams: &[MaskStream],
) -> Vec<f64> {
    assert!(weights.len() >= tensors.len(), "merge_ops::apply: weights");
    match op {
        MergeOp::TaskArithmetic => weighted_sum(&tensors, weights),
        MergeOp::MagnitudePrune { density } => {
            tensors
                .iter_mut()
                .for_each(|t| magnitude_prune_in_place(t, density));
            weighted_sum(&tensors, weights)
        }
        MergeOp::Ties { density, sign } => {
            tensors
                .iter_mut()
                .for_each(|t| magnitude_prune_in_place(t, density));
            let elected = majority_sign(&tensors, sign);
            disjoint_merge(&tensors, weights, &elected)
        }
        MergeOp::DareLinear { density } => {
            assert!(streams.len() >= tensors.len(), "merge_ops::apply: streams");
            tensors
                .iter_mut()
                .zip(streams)
                .for_each(|(t, s)| random_prune_in_place(t, density, true, s));
            weighted_sum(&tensors, weights)
        }
        MergeOp::DareTies { density, sign } => {
            assert!(streams.len() >= tensors.len(), "merge_ops::apply: streams");
            tensors
                .iter_mut()
                .zip(streams)
                .for_each(|(t, s)| random_prune_in_place(t, density, true, s));
            let elected = majority_sign(&tensors, sign);
            disjoint_merge(&tensors, weights, &elected)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magnitude_prune_keeps_floor_k_ties_to_lowest_index() {
        // density 0.5 of 7 -> int(3.5) = 3 kept.
        let mut x = vec![1.0, -3.0, 2.0, -2.0, 0.5, 2.0, -0.1];
        magnitude_prune_in_place(&mut x, 0.5);
        // |x| sorted desc: 3 (idx1), then 2 at idx 2, 3, 5: two of them, lowest indices 2, 3.
        assert_eq!(x, vec![0.0, -3.0, 2.0, -2.0, 0.0, 0.0, 0.0]);
        let mut y = vec![1.0, 2.0];
        magnitude_prune_in_place(&mut y, 0.2); // int(0.4) = 0
        assert_eq!(y, vec![0.0, 0.0]);
        let mut z = vec![1.0, -2.0];
        magnitude_prune_in_place(&mut z, 1.5);
        assert_eq!(z, vec![1.0, -2.0]);
    }

    #[test]
    fn ties_hand_example() {
        // Two tensors, density 1 (no pruning), total sign.
        let t = vec![vec![1.0, -2.0, 3.0, 0.0], vec![-3.0, -1.0, 1.0, 2.0]];
        let w = [2.0, -1.0];
        let out = apply(
            MergeOp::Ties {
                density: 1.0,
                sign: MajoritySignMethod::Total,
            },
            t,
            &w,
            &[],
        );
        // e0: sum -2 -> -1; only t1 (-3) matches: (-3 * -1) / 1 = 3.
        // e1: sum -3 -> -1; both match: (2*-2 + -1*-1)/2 = -1.5.
        // e2: sum 4 -> +1; both: (2*3 + -1*1)/2 = 2.5.
        // e3: sum 2 -> +1; t1 (2): (-1*2)/1 = -2; t0 is 0 and never matches.
        assert_eq!(out, vec![3.0, -1.5, 2.5, -2.0]);
        let f = apply(
            MergeOp::Ties {
                density: 1.0,
                sign: MajoritySignMethod::Frequency,
            },
            vec![vec![1.0, 1.0], vec![1.0, -5.0], vec![-1.0, 1.0]],
            &[1.0, 1.0, 1.0],
            &[],
        );
        // e0: signs +,+,- -> +: (1+1)/2 = 1. e1: +,-,+ -> +: (1+1)/2 = 1.
        assert_eq!(f, vec![1.0, 1.0]);
    }

    #[test]
    fn random_prune_edge_densities() {
        let s = MaskStream::new(7, 0, "t");
        let mut x = vec![1.0; 100];
        random_prune_in_place(&mut x, 0.0, true, &s);
        assert!(x.iter().all(|&v| v == 0.0));
        let mut y = vec![1.0; 100];
        random_prune_in_place(&mut y, 1.0, true, &s);
        assert!(y.iter().all(|&v| v == 1.0));
        let mut z = vec![1.0; 1000];
        random_prune_in_place(&mut z, 0.25, true, &s);
        for (j, v) in z.iter().enumerate() {
            let kept = u64::from(s.word(j)) < keep_threshold(0.25);
            assert_eq!(*v, if kept { 4.0 } else { 0.0 });
        }
    }

    #[test]
    fn dare_masks_do_not_depend_on_threads() {
        let n = 3 * CHUNK + 17;
        let x: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin()).collect();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let s = MaskStream::new(42, 1, "m.lora_A.weight");
                let mut v = x.clone();
                random_prune_in_place(&mut v, 0.3, true, &s);
                v.iter().map(|f| f.to_bits()).collect::<Vec<_>>()
            })
        };
        assert_eq!(run(1), run(4));
    }
}
