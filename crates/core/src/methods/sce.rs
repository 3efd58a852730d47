//! `sce`: Select, Calculate, Erase (methods.md §19; mergekit `merge_methods/sce.py`,
//! arXiv 2408.07990). Sharding class **T**.
//!
//! Per tensor, with task vectors δ_i = θ_i − θ_0 (the base model is required):
//! 1. **Select** (`select_topk`, default 1.0 = off): with v = the population variance of δ_i
//!    across models per element (computed in f64, rounded to f32 as torch's f32 `var`), keep the
//!    k = ⌊nonzero(v) · select_topk⌋ elements of largest v (computed in f32 as torch's
//!    `int(tensor * float)`), ties broken by the lowest flat index (torch's `topk` order is
//!    unspecified); the same mask applies to every model. `select_topk <= 0` or k = 0 keeps none.
//!    Exact selection by streaming histograms ([`crate::select`]).
//! 2. **Calculate**: w_i = mean over the tensor of (masked δ_i)², normalised by Σ_j w_j; if that
//!    sum is below 1e-6, w_i = 1/N.
//! 3. **Erase**: TIES sign election on the (masked, unweighted) δ: majority +1 where Σ_i δ_i ≥ 0
//!    else −1; model i takes part where sgn δ_i equals it (zeros never).
//! 4. θ = θ_0 + Σ_i e_i w_i δ_i / max(Σ_i e_i w_i, 1e-6).
//!
//! Passes over the blocks: with selection, one to count non-zero variances and two or three for
//! the selection; then one for the weights (f64 [`ChunkedSum`]) and the merge pass.
//!
//! Parameters: `select_topk` (method-wide, default 1.0), `int8_mask` (accepted, no effect).
//! Per-model weights are not used (as mergekit).

use crate::error::{MergeError, Result};
use crate::methods::dare::PAR_CHUNK;
use crate::methods::gta::{read_base, read_delta};
use crate::methods::{GlobalStats, MergeMethod, MethodInfo, ShardClass};
use crate::params::TensorParams;
use crate::reduce::ChunkedSum;
use crate::select::{select_cuts, Cut};
use crate::tensor::{Input, TensorJob, TensorReader, TensorWriter};
use rayon::prelude::*;
use std::ops::Range;

/// Static facts about `sce`.
pub const INFO: MethodInfo = MethodInfo {
    name: "sce",
    needs_base: true,
    min_models: 1,
    exact_models: None,
    global_params: &["select_topk", "int8_mask"],
    model_params: &[],
    random: false,
    summary: "SCE: keep the highest-variance entries, weight models by mean squared task vector, TIES sign election",
};

/// Below this, the weight sum falls back to uniform weights (`sce.py:sce_weight`).
const WEIGHT_EPS: f64 = 1e-6;
/// Floor of the merged divisor (`clamp(min=1e-6)`).
const DIV_FLOOR: f32 = 1e-6;

/// `sce` configured for one tensor.
#[derive(Debug, Clone)]
pub struct Sce {
    select_topk: f64,
    n_models: usize,
}

/// The selection mask of one tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Selection {
    /// Every element (select_topk ≥ 1).
    All,
    /// No element.
    Nothing,
    /// Elements whose `!var_key` comes before the cut (the k largest variances).
    Top(Cut),
}

/// Base and task-vector buffers for one block.
struct Block {
    base: Vec<f32>,
    deltas: Vec<Vec<f32>>,
}

impl Block {
    fn new(n: usize) -> Self {
        Self {
            base: Vec::new(),
            deltas: vec![Vec::new(); n],
        }
    }

    fn read(&mut self, job: &TensorJob, reader: &dyn TensorReader, r: Range<usize>) -> Result<()> {
        self.base.resize(r.len(), 0.0);
        read_base(job, reader, r.clone(), &mut self.base)?;
        for (i, d) in self.deltas.iter_mut().enumerate() {
            d.resize(r.len(), 0.0);
            read_delta(job, reader, i, r.clone(), &self.base, d)?;
        }
        Ok(())
    }

    /// The f32 population variance across models of element `j`, as an order key (bit pattern
    /// of a non-negative f32).
    #[inline]
    fn var_key(&self, j: usize) -> u32 {
        let n = self.deltas.len() as f64;
        let mean = self.deltas.iter().map(|d| f64::from(d[j])).sum::<f64>() / n;
        let var = self
            .deltas
            .iter()
            .map(|d| {
                let x = f64::from(d[j]) - mean;
                x * x
            })
            .sum::<f64>()
            / n;
        (var as f32).to_bits()
    }

    /// Variance keys of the whole block into `keys`.
    fn var_keys(&self, keys: &mut [u32]) {
        keys.par_chunks_mut(PAR_CHUNK)
            .enumerate()
            .for_each(|(c, out)| {
                for (k, o) in out.iter_mut().enumerate() {
                    *o = self.var_key(c * PAR_CHUNK + k);
                }
            });
    }

    /// Whether each element of the block at `start` is selected.
    fn selected(&self, sel: Selection, start: usize, flags: &mut Vec<bool>) {
        let len = self.base.len();
        flags.resize(len, false);
        match sel {
            Selection::All => flags.iter_mut().for_each(|f| *f = true),
            Selection::Nothing => flags.iter_mut().for_each(|f| *f = false),
            Selection::Top(cut) => {
                flags
                    .par_chunks_mut(PAR_CHUNK)
                    .enumerate()
                    .for_each(|(c, out)| {
                        for (k, f) in out.iter_mut().enumerate() {
                            let j = c * PAR_CHUNK + k;
                            *f = cut.before(!self.var_key(j), (start + j) as u64);
                        }
                    });
            }
        }
    }
}

impl Sce {
    /// Build from resolved parameters.
    pub fn from_params(params: &TensorParams, n_models: usize) -> Result<Self> {
        let select_topk = params.num("select_topk", 1.0)?;
        if select_topk.is_nan() {
            return Err(MergeError::BadParameter {
                key: "select_topk".into(),
                message: "must be a number in [0, 1] (the fraction of entries kept), got NaN"
                    .into(),
            });
        }
        let _ = params.bool("int8_mask", false)?;
        Ok(Self {
            select_topk,
            n_models,
        })
    }

    /// Pass(es) 1: the selection mask.
    fn selection(&self, job: &TensorJob, reader: &dyn TensorReader) -> Result<Selection> {
        if self.select_topk >= 1.0 {
            return Ok(Selection::All);
        }
        if self.select_topk <= 0.0 {
            return Ok(Selection::Nothing);
        }
        let n = self.n_models;
        let mut blk = Block::new(n);
        let mut keys = Vec::new();
        let mut nonzero = 0u64;
        for r in job.blocks() {
            blk.read(job, reader, r.clone())?;
            keys.resize(r.len(), 0);
            blk.var_keys(&mut keys);
            nonzero += keys.iter().filter(|&&k| k != 0).count() as u64;
        }
        // torch: int(count_nonzero(var) * density), an f32 product.
        let k = (nonzero as f32 * self.select_topk as f32).floor() as u64;
        if k == 0 {
            return Ok(Selection::Nothing);
        }
        let blocks: Vec<Range<usize>> = job.blocks().collect();
        let cuts = select_cuts(job.numel(), &blocks, &[k], |r, out| {
            blk.read(job, reader, r)?;
            blk.var_keys(out);
            // Largest first: ascending order of the complemented key.
            out.iter_mut().for_each(|x| *x = !*x);
            Ok(())
        })?;
        Ok(Selection::Top(cuts[0]))
    }

    /// Pass 2: the normalised model weights.
    fn weights(
        &self,
        sel: Selection,
        job: &TensorJob,
        reader: &dyn TensorReader,
    ) -> Result<Vec<f32>> {
        let n = self.n_models;
        let numel = job.numel();
        let mut sums: Vec<ChunkedSum> = (0..n).map(|_| ChunkedSum::new(numel)).collect();
        if sel != Selection::Nothing {
            let mut blk = Block::new(n);
            let mut flags = Vec::new();
            for r in job.blocks() {
                blk.read(job, reader, r.clone())?;
                blk.selected(sel, r.start, &mut flags);
                for (i, s) in sums.iter_mut().enumerate() {
                    let d = &blk.deltas[i];
                    let f = &flags;
                    s.add_block(r.start, r.len(), |j| {
                        if f[j] {
                            let x = f64::from(d[j]);
                            x * x
                        } else {
                            0.0
                        }
                    });
                }
            }
        }
        let w: Vec<f64> = sums
            .iter()
            .map(|s| s.total() / numel.max(1) as f64)
            .collect();
        let total: f64 = w.iter().sum();
        Ok(if total.abs() < WEIGHT_EPS {
            vec![1.0 / n as f32; n]
        } else {
            w.iter().map(|x| (x / total) as f32).collect()
        })
    }
}

impl MergeMethod for Sce {
    fn class(&self) -> ShardClass {
        ShardClass::T
    }

    fn device_plan(&self) -> Option<crate::methods::device::DevicePlan> {
        (self.n_models > 0).then_some(crate::methods::device::DevicePlan::Sce {
            select_topk: self.select_topk,
        })
    }

    fn buffers(&self, n_models: usize) -> usize {
        // base, models, selection keys/flags, output
        n_models + 3
    }

    fn merge(
        &self,
        job: &TensorJob,
        _global: &[GlobalStats],
        reader: &dyn TensorReader,
        writer: &mut dyn TensorWriter,
    ) -> Result<()> {
        let n = self.n_models;
        if job.n_models != n {
            return Err(MergeError::BadInputs {
                method: "sce".into(),
                message: format!(
                    "configured for {n} models but the tensor has {}",
                    job.n_models
                ),
            });
        }
        if !job.has_base {
            return Err(MergeError::BadInputs {
                method: "sce".into(),
                message: "requires `base_model`".into(),
            });
        }
        if n == 0 {
            // mergekit returns the base tensor when there are no other models.
            let mut buf = Vec::new();
            for r in job.blocks() {
                buf.resize(r.len(), 0.0);
                reader.read(Input::Base, r.clone(), &mut buf)?;
                writer.write(r, &buf)?;
            }
            return Ok(());
        }
        let sel = self.selection(job, reader)?;
        let w = self.weights(sel, job, reader)?;
        let mut blk = Block::new(n);
        let mut flags = Vec::new();
        let mut out = Vec::new();
        for r in job.blocks() {
            blk.read(job, reader, r.clone())?;
            blk.selected(sel, r.start, &mut flags);
            out.resize(r.len(), 0.0f32);
            let (blk, flags, w) = (&blk, &flags, &w);
            out.par_chunks_mut(PAR_CHUNK)
                .enumerate()
                .for_each(|(c, o)| {
                    for (k, y) in o.iter_mut().enumerate() {
                        let j = c * PAR_CHUNK + k;
                        let base = blk.base[j];
                        if !flags[j] {
                            // Every task vector is masked to 0: nothing takes part.
                            *y = base;
                            continue;
                        }
                        let s = blk.deltas.iter().fold(0.0f32, |a, d| a + d[j]);
                        let positive = s >= 0.0;
                        let (mut num, mut den) = (0.0f32, 0.0f32);
                        for (d, &wi) in blk.deltas.iter().zip(w) {
                            let x = d[j];
                            if (positive && x > 0.0) || (!positive && x < 0.0) {
                                num += x * wi;
                                den += wi;
                            }
                        }
                        *y = base + num / den.max(DIV_FLOOR);
                    }
                });
            writer.write(r, &out)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::dare::tests::{assert_close, job, reader};
    use crate::params::Scalar;
    use crate::tensor::{merge_in_memory, MemReader};

    /// Naive f64 SCE with a full sort for the top-k (ties by lowest index).
    fn naive(r: &MemReader, topk: f64) -> (Vec<f64>, Vec<f64>) {
        let base = r.base.clone().unwrap();
        let n = r.models.len();
        let numel = base.len();
        let mut tv: Vec<Vec<f64>> = r
            .models
            .iter()
            .map(|m| m.iter().zip(&base).map(|(a, b)| (a - b) as f64).collect())
            .collect();
        if topk < 1.0 {
            let var: Vec<f32> = (0..numel)
                .map(|j| {
                    let mean = tv.iter().map(|t| t[j]).sum::<f64>() / n as f64;
                    (tv.iter().map(|t| (t[j] - mean).powi(2)).sum::<f64>() / n as f64) as f32
                })
                .collect();
            let nonzero = var.iter().filter(|v| **v != 0.0).count();
            let k = if topk <= 0.0 {
                0
            } else {
                (nonzero as f32 * topk as f32) as usize
            };
            let mut order: Vec<usize> = (0..numel).collect();
            order.sort_by(|&a, &b| var[b].partial_cmp(&var[a]).unwrap().then(a.cmp(&b)));
            let mut keep = vec![false; numel];
            for &j in &order[..k] {
                keep[j] = true;
            }
            for t in tv.iter_mut() {
                for j in 0..numel {
                    if !keep[j] {
                        t[j] = 0.0;
                    }
                }
            }
        }
        let mut w: Vec<f64> = tv
            .iter()
            .map(|t| t.iter().map(|x| x * x).sum::<f64>() / numel as f64)
            .collect();
        let s: f64 = w.iter().sum();
        if s.abs() < 1e-6 {
            w = vec![1.0 / n as f64; n];
        } else {
            w.iter_mut().for_each(|x| *x /= s);
        }
        let mut out = Vec::new();
        let mut scale = Vec::new();
        for j in 0..numel {
            let sum: f64 = tv.iter().map(|t| t[j]).sum();
            let sign = if sum >= 0.0 { 1.0 } else { -1.0 };
            let (mut num, mut den, mut mag) = (0.0, 0.0, 0.0);
            for i in 0..n {
                let x = tv[i][j];
                mag += x.abs();
                if x != 0.0 && x.signum() == sign {
                    num += x * w[i];
                    den += w[i];
                }
            }
            out.push(base[j] as f64 + num / den.max(1e-6));
            scale.push(base[j].abs() as f64 + mag);
        }
        (out, scale)
    }

    #[test]
    fn matches_naive_reference() {
        for (shape, n) in [
            (vec![29usize, 41], 3usize),
            (vec![500], 2),
            (vec![7, 3, 5], 4),
        ] {
            let numel: usize = shape.iter().product();
            let r = reader(numel, n);
            for topk in [1.0, 0.5, 0.1, 0.0] {
                let p = TensorParams::default().with_global("select_topk", Scalar::Num(topk));
                let m = Sce::from_params(&p, n).unwrap();
                let got = merge_in_memory(&m, &job("sce.w", &shape, n, 97, 0), &r).unwrap();
                let (want, scale) = naive(&r, topk);
                assert_close(&got, &want, &scale);
            }
        }
    }

    #[test]
    fn selection_ties_and_zero_variance() {
        // Two models; variance is 0 where they agree, and takes only a few distinct values.
        let numel = 300;
        let base = vec![0.0f32; numel];
        let a: Vec<f32> = (0..numel)
            .map(|j| if j % 3 == 0 { 1.0 } else { (j % 4) as f32 })
            .collect();
        let b: Vec<f32> = (0..numel)
            .map(|j| if j % 3 == 0 { 1.0 } else { -((j % 4) as f32) })
            .collect();
        let r = MemReader {
            stats: Default::default(),
            base: Some(base),
            models: vec![a, b],
        };
        for topk in [0.3, 0.5, 0.77, 0.999] {
            let p = TensorParams::default().with_global("select_topk", Scalar::Num(topk));
            let m = Sce::from_params(&p, 2).unwrap();
            for block in [numel, 1, 13] {
                let got = merge_in_memory(&m, &job("t", &[numel], 2, block, 0), &r).unwrap();
                let (want, scale) = naive(&r, topk);
                assert_close(&got, &want, &scale);
            }
        }
    }

    #[test]
    fn bit_identical_across_blocks_and_threads() {
        let shape = [50, 400];
        let numel = 20_000;
        let r = reader(numel, 3);
        let p = TensorParams::default().with_global("select_topk", Scalar::Num(0.4));
        let m = Sce::from_params(&p, 3).unwrap();
        let whole = merge_in_memory(&m, &job("t", &shape, 3, numel, 0), &r).unwrap();
        for block in [1usize, 333, 4096] {
            let got = merge_in_memory(&m, &job("t", &shape, 3, block, 0), &r).unwrap();
            assert!(got
                .iter()
                .zip(&whole)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let one = pool.install(|| merge_in_memory(&m, &job("t", &shape, 3, 1000, 0), &r).unwrap());
        assert!(one
            .iter()
            .zip(&whole)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn zero_task_vectors_and_no_models() {
        let numel = 64;
        let r = reader(numel, 1);
        let base = r.base.clone().unwrap();
        let zr = MemReader {
            stats: Default::default(),
            base: Some(base.clone()),
            models: vec![base.clone(), base.clone()],
        };
        let m = Sce::from_params(&TensorParams::default(), 2).unwrap();
        assert_eq!(
            merge_in_memory(&m, &job("z", &[numel], 2, 10, 0), &zr).unwrap(),
            base
        );
        let m0 = Sce::from_params(&TensorParams::default(), 0).unwrap();
        let empty = MemReader {
            stats: Default::default(),
            base: Some(base.clone()),
            models: vec![],
        };
        assert_eq!(
            merge_in_memory(&m0, &job("e", &[numel], 0, 10, 0), &empty).unwrap(),
            base
        );
        let e = Sce::from_params(
            &TensorParams::default().with_global("select_topk", Scalar::Num(f64::NAN)),
            1,
        )
        .unwrap_err();
        assert!(e.to_string().contains("select_topk"));
        const { assert!(INFO.needs_base && !INFO.random) };
    }
}
