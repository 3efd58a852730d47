//! `ram` and `ramplus_tl`: Reinforced Agent Merging (methods.md §19; mergekit 0.1.5
//! `mergekit/merge_methods/ram.py`).
//!
//! With task vectors δ_i = θ_i − θ_0 (f32), an entry of model i *contributes* when |δ_i| > ε
//! (`epsilon`, default 1e-5); c is the number of contributing models at that position.
//! Entries contributed by exactly one model are kept (`ram`) or scaled by
//! λ_i = 1 + r·clamp(ρ_i, 0, α) (`ramplus_tl`, defaults r = 0.1, α = 0.2), where ρ_i is model i's
//! count of contributing entries that are shared (c > 1) over its count of unique ones (c = 1)
//! over the whole tensor (the unique count floored at ε, as mergekit does). Entries contributed
//! by several models are averaged over them. The result is θ_0 + Σ_i term_i, summed in model order
//! in f32 as mergekit does.
//!
//! Sharding class **E** for `ram`; **T** for `ramplus_tl` (two counts per model per tensor, one
//! pass over the blocks before the merge pass).

use crate::error::{MergeError, Result};
use crate::methods::{GlobalStats, MergeMethod, MethodInfo, ShardClass};
use crate::params::TensorParams;
use crate::tensor::{Input, TensorJob, TensorReader, TensorWriter};

/// Static facts about `ram`.
pub const INFO: MethodInfo = MethodInfo {
    name: "ram",
    needs_base: true,
    min_models: 1,
    exact_models: None,
    global_params: &["epsilon"],
    model_params: &[],
    random: false,
    summary: "Reinforced Agent Merging: unique task-vector entries kept, shared ones averaged",
};

/// Static facts about `ramplus_tl`.
pub const INFO_PLUS: MethodInfo = MethodInfo {
    name: "ramplus_tl",
    needs_base: true,
    min_models: 1,
    exact_models: None,
    global_params: &["epsilon", "r", "alpha"],
    model_params: &[],
    random: false,
    summary: "RAM+ (tensor-local): unique entries rescaled by 1 + r*clamp(shared/unique, 0, alpha)",
};

/// `ram` / `ramplus_tl` configured for one tensor.
#[derive(Debug, Clone)]
pub struct Ram {
    n_models: usize,
    epsilon: f32,
    /// `(r, alpha)` for `ramplus_tl`.
    plus: Option<(f64, f64)>,
}

fn finite(params: &TensorParams, key: &str, default: f64) -> Result<f64> {
    let v = params.num(key, default)?;
    if !v.is_finite() || v < 0.0 {
        return Err(MergeError::BadParameter {
            key: key.into(),
            message: format!("must be a finite number >= 0, got {v}"),
        });
    }
    Ok(v)
}

impl Ram {
    /// Build from resolved parameters; `plus` selects `ramplus_tl`.
    pub fn from_params(params: &TensorParams, n_models: usize, plus: bool) -> Result<Self> {
        let epsilon = finite(params, "epsilon", 1e-5)? as f32;
        let plus = if plus {
            Some((finite(params, "r", 0.1)?, finite(params, "alpha", 0.2)?))
        } else {
            None
        };
        Ok(Self {
            n_models,
            epsilon,
            plus,
        })
    }

    fn read_block(
        &self,
        reader: &dyn TensorReader,
        range: std::ops::Range<usize>,
        base: &mut Vec<f32>,
        deltas: &mut [Vec<f32>],
    ) -> Result<()> {
        base.resize(range.len(), 0.0);
        reader.read(Input::Base, range.clone(), base)?;
        for (i, d) in deltas.iter_mut().enumerate() {
            d.resize(range.len(), 0.0);
            reader.read(Input::Model(i), range.clone(), d)?;
            for (x, b) in d.iter_mut().zip(base.iter()) {
                *x -= *b;
            }
        }
        Ok(())
    }

    /// λ_i for every model (1 for `ram`), from a counting pass over the tensor.
    fn lambdas(&self, job: &TensorJob, reader: &dyn TensorReader) -> Result<Vec<f32>> {
        let n = self.n_models;
        let Some((r, alpha)) = self.plus else {
            return Ok(vec![1.0; n]);
        };
        let mut shared = vec![0u64; n];
        let mut unique = vec![0u64; n];
        let mut base = Vec::new();
        let mut deltas = vec![Vec::new(); n];
        for range in job.blocks() {
            self.read_block(reader, range.clone(), &mut base, &mut deltas)?;
            for e in 0..range.len() {
                let c = deltas.iter().filter(|d| d[e].abs() > self.epsilon).count();
                for (i, d) in deltas.iter().enumerate() {
                    if d[e].abs() > self.epsilon {
                        if c == 1 {
                            unique[i] += 1;
                        } else {
                            shared[i] += 1;
                        }
                    }
                }
            }
        }
        Ok((0..n)
            .map(|i| {
                let rho = (shared[i] as f32 / (unique[i] as f32).max(self.epsilon)) as f64;
                (1.0 + r * rho.clamp(0.0, alpha)) as f32
            })
            .collect())
    }
}

impl MergeMethod for Ram {
    fn class(&self) -> ShardClass {
        if self.plus.is_some() {
            ShardClass::T
        } else {
            ShardClass::E
        }
    }

    fn buffers(&self, n_models: usize) -> usize {
        n_models + 2
    }

    fn merge(
        &self,
        job: &TensorJob,
        _global: &[GlobalStats],
        reader: &dyn TensorReader,
        writer: &mut dyn TensorWriter,
    ) -> Result<()> {
        let lambdas = self.lambdas(job, reader)?;
        let mut base = Vec::new();
        let mut deltas = vec![Vec::new(); self.n_models];
        let mut out = Vec::new();
        for range in job.blocks() {
            self.read_block(reader, range.clone(), &mut base, &mut deltas)?;
            out.clear();
            for e in 0..range.len() {
                let c = deltas.iter().filter(|d| d[e].abs() > self.epsilon).count();
                let mut acc = 0f32;
                for (i, d) in deltas.iter().enumerate() {
                    let v = if d[e].abs() > self.epsilon { d[e] } else { 0.0 };
                    let term = if c == 1 {
                        v * lambdas[i]
                    } else if c > 1 {
                        v / c as f32
                    } else {
                        0.0
                    };
                    acc += term;
                }
                out.push(base[e] + acc);
            }
            writer.write(range, &out)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{merge_in_memory, MemReader};

    fn job(n: usize, models: usize, block: usize) -> TensorJob {
        TensorJob {
            name: "w".into(),
            shape: vec![n],
            n_models: models,
            has_base: true,
            block_elems: block,
            seed: 0,
        }
    }

    /// Naive f64 RAM / RAM+ written from the paper's description.
    #[allow(clippy::needless_range_loop)]
    fn naive(base: &[f32], models: &[Vec<f32>], eps: f64, plus: Option<(f64, f64)>) -> Vec<f64> {
        let n = base.len();
        let d: Vec<Vec<f64>> = models
            .iter()
            .map(|m| {
                m.iter()
                    .zip(base)
                    .map(|(a, b)| *a as f64 - *b as f64)
                    .collect()
            })
            .collect();
        let count = |e: usize| d.iter().filter(|v| v[e].abs() > eps).count();
        let lam: Vec<f64> = (0..d.len())
            .map(|i| match plus {
                None => 1.0,
                Some((r, a)) => {
                    let (mut s, mut u) = (0.0, 0.0);
                    for e in 0..n {
                        if d[i][e].abs() > eps {
                            if count(e) == 1 {
                                u += 1.0;
                            } else {
                                s += 1.0;
                            }
                        }
                    }
                    1.0 + r * (s / f64::max(u, eps)).clamp(0.0, a)
                }
            })
            .collect();
        (0..n)
            .map(|e| {
                let c = count(e);
                let mut t = 0.0;
                for i in 0..d.len() {
                    if d[i][e].abs() > eps {
                        t += if c == 1 {
                            d[i][e] * lam[i]
                        } else {
                            d[i][e] / c as f64
                        };
                    }
                }
                base[e] as f64 + t
            })
            .collect()
    }

    fn data() -> (Vec<f32>, Vec<Vec<f32>>) {
        let n = 997;
        let base: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32) * 0.01).collect();
        let models = (0..3)
            .map(|m| {
                (0..n)
                    .map(|i| {
                        let k = (i * (m + 3) + m * 11) % 7;
                        // Many exact zeros (no contribution) and some tiny changes below epsilon.
                        base[i]
                            + match k {
                                0 | 1 => 0.0,
                                2 => 1e-7,
                                _ => (k as f32 - 4.0) * 0.01 * (m as f32 + 1.0),
                            }
                    })
                    .collect()
            })
            .collect();
        (base, models)
    }

    #[test]
    fn matches_naive_and_is_block_independent() {
        let (base, models) = data();
        let reader = MemReader {
            stats: Default::default(),
            base: Some(base.clone()),
            models: models.clone(),
        };
        for (plus, p) in [(false, None), (true, Some((0.5, 0.4)))] {
            let params = TensorParams::default()
                .with_global("r", crate::params::Scalar::Num(0.5))
                .with_global("alpha", crate::params::Scalar::Num(0.4));
            let m = Ram::from_params(&params, 3, plus).unwrap();
            let whole = merge_in_memory(&m, &job(base.len(), 3, base.len()), &reader).unwrap();
            let small = merge_in_memory(&m, &job(base.len(), 3, 13), &reader).unwrap();
            assert_eq!(
                whole.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                small.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            let want = naive(&base, &models, 1e-5, p);
            for (g, w) in whole.iter().zip(&want) {
                assert!(
                    (*g as f64 - w).abs() <= 1e-6 * w.abs().max(1.0),
                    "{g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn bad_parameters_are_named() {
        let params = TensorParams::default().with_global("alpha", crate::params::Scalar::Num(-1.0));
        let e = Ram::from_params(&params, 2, true).unwrap_err().to_string();
        assert!(e.contains("alpha"), "{e}");
    }
}
