//! (IA)³ helpers (methods.md §15; PEFT 0.21 `tuners/ia3/layer.py`, `tuners/ia3/model.py`).
//! Sharding class **E** (elementwise on the vectors, row/column scaling for the fold).
//!
//! An (IA)³ module has one learned vector `l`, initialised to ones. PEFT's `Linear` scales:
//!
//! - a **non-feedforward** module (attention `k`, `v`): its **output** — `ia3_l` has shape
//!   `(out, 1)`; folded, `W' = diag(l) · W` (row `o` times `l_o`) and the bias, if any, becomes
//!   `l ⊙ b`;
//! - a **feedforward** module (listed in `feedforward_modules`, e.g. T5 `wo`, Llama `down_proj`):
//!   its **input** — `ia3_l` has shape `(1, in)`; folded, `W' = W · diag(l)` (column `c` times
//!   `l_c`) and the bias is unchanged.
//!
//! Merging: the pretrained value of `l` is all ones, so the task vector is `τ = l − 1` and every
//! elementwise method of `crate::methods` applies to `τ` with a zero base (or to `l` with a
//! ones base); [`weighted_sum`] is PEFT's `IA3Model.add_weighted_adapter`, which sums the raw
//! vectors (`Σ w_i l_i`, no task vectors: weights summing to 1 are the meaningful choice).
//! Conv layers and `fan_in_fan_out` (GPT-2 `Conv1D`, whose weight is `in × out`) are the
//! caller's layout: pass the weight as `out × in`.

use crate::error::{MergeError, Result};

/// Which side of a `Linear` weight an (IA)³ vector scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ia3Side {
    /// Output channels (rows): non-feedforward modules.
    Output,
    /// Input channels (columns): feedforward modules.
    Input,
}

impl Ia3Side {
    /// PEFT's rule: feedforward modules scale the input, the others the output.
    pub fn for_module(is_feedforward: bool) -> Self {
        if is_feedforward {
            Self::Input
        } else {
            Self::Output
        }
    }
}

/// The task vector `τ = l − 1`.
pub fn task_vector(l: &[f32]) -> Vec<f32> {
    l.iter().map(|x| x - 1.0).collect()
}

/// The vector `l = 1 + τ` of a merged task vector.
pub fn from_task_vector(tau: &[f32]) -> Vec<f32> {
    tau.iter().map(|x| 1.0 + x).collect()
}

/// PEFT's `IA3Model.add_weighted_adapter` for one module: `Σ_i w_i l_i` (in `f64`, returned as
/// `f32`). `vectors` must have equal lengths.
pub fn weighted_sum(module: &str, vectors: &[&[f32]], weights: &[f64]) -> Result<Vec<f32>> {
    let n = vectors.first().map_or(0, |v| v.len());
    if vectors.is_empty() || vectors.len() != weights.len() {
        return Err(MergeError::BadInputs {
            method: "ia3".to_string(),
            message: format!(
                "module `{module}`: {} vectors for {} weights",
                vectors.len(),
                weights.len()
            ),
        });
    }
    if let Some(v) = vectors.iter().find(|v| v.len() != n) {
        return Err(MergeError::BadInputs {
            method: "ia3".to_string(),
            message: format!(
                "module `{module}`: vectors of {} and {n} values; all adapters must target \
                 the same base model",
                v.len()
            ),
        });
    }
    Ok((0..n)
        .map(|j| {
            vectors
                .iter()
                .zip(weights)
                .map(|(v, w)| f64::from(v[j]) * w)
                .sum::<f64>() as f32
        })
        .collect())
}

/// Fold `l` into the row-major `rows × cols` (`out × in`) weight `w` in place: rows scaled for
/// [`Ia3Side::Output`] (`l` has `rows` values), columns for [`Ia3Side::Input`] (`cols` values).
/// One f32 product per element, as PEFT's `torch.mul`.
pub fn fold_into_weight(
    module: &str,
    w: &mut [f32],
    rows: usize,
    cols: usize,
    l: &[f32],
    side: Ia3Side,
) -> Result<()> {
    let want = match side {
        Ia3Side::Output => rows,
        Ia3Side::Input => cols,
    };
    if w.len() != rows * cols || l.len() != want {
        return Err(MergeError::BadInputs {
            method: "ia3".to_string(),
            message: format!(
                "module `{module}`: weight of {} values ({rows} x {cols} expected) and an \
                 (IA)^3 vector of {} values ({want} expected for the {side:?} side); check \
                 `feedforward_modules`",
                w.len(),
                l.len()
            ),
        });
    }
    for (r, row) in w.chunks_mut(cols.max(1)).enumerate().take(rows) {
        match side {
            Ia3Side::Output => row.iter_mut().for_each(|x| *x *= l[r]),
            Ia3Side::Input => row.iter_mut().zip(l).for_each(|(x, s)| *x *= s),
        }
    }
    Ok(())
}

/// Fold `l` into a bias in place: `b ⊙ l` for [`Ia3Side::Output`], unchanged for
/// [`Ia3Side::Input`] (PEFT scales the bias of non-feedforward modules only).
pub fn fold_into_bias(module: &str, bias: &mut [f32], l: &[f32], side: Ia3Side) -> Result<()> {
    if side == Ia3Side::Input {
        return Ok(());
    }
    if bias.len() != l.len() {
        return Err(MergeError::BadInputs {
            method: "ia3".to_string(),
            message: format!(
                "module `{module}`: bias of {} values, (IA)^3 vector of {}",
                bias.len(),
                l.len()
            ),
        });
    }
    bias.iter_mut().zip(l).for_each(|(b, s)| *b *= s);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_vectors_round_trip() {
        let l = [1.5f32, 0.25, 1.0];
        let t = task_vector(&l);
        assert_eq!(t, vec![0.5, -0.75, 0.0]);
        assert_eq!(from_task_vector(&t), l.to_vec());
    }

    #[test]
    fn weighted_sum_is_peft_raw_sum() {
        let a = [1.0f32, 2.0];
        let b = [3.0f32, -1.0];
        let s = weighted_sum("m", &[&a, &b], &[0.5, 0.5]).unwrap();
        assert_eq!(s, vec![2.0, 0.5]);
        assert!(weighted_sum("m", &[&a, &b[..1]], &[0.5, 0.5]).is_err());
        assert!(weighted_sum("m", &[&a], &[0.5, 0.5]).is_err());
    }

    #[test]
    fn fold_scales_the_right_side() {
        // W = [[1, 2, 3], [4, 5, 6]] (out 2, in 3).
        let w0 = vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut w = w0.clone();
        fold_into_weight("k", &mut w, 2, 3, &[2.0, 0.5], Ia3Side::for_module(false)).unwrap();
        assert_eq!(w, vec![2.0, 4.0, 6.0, 2.0, 2.5, 3.0]);
        let mut w = w0.clone();
        fold_into_weight(
            "ff",
            &mut w,
            2,
            3,
            &[1.0, 0.0, 2.0],
            Ia3Side::for_module(true),
        )
        .unwrap();
        assert_eq!(w, vec![1.0, 0.0, 6.0, 4.0, 0.0, 12.0]);
        // Folding equals scaling the output / input of y = W x.
        let x = [0.3f32, -1.0, 2.0];
        let l_in = [1.5f32, 0.5, -1.0];
        let mut w = w0.clone();
        fold_into_weight("ff", &mut w, 2, 3, &l_in, Ia3Side::Input).unwrap();
        for r in 0..2 {
            let y: f32 = (0..3).map(|c| w[r * 3 + c] * x[c]).sum();
            let e: f32 = (0..3).map(|c| w0[r * 3 + c] * (l_in[c] * x[c])).sum();
            assert!((y - e).abs() < 1e-6);
        }
        let mut b = vec![1.0f32, 1.0];
        fold_into_bias("k", &mut b, &[2.0, 3.0], Ia3Side::Output).unwrap();
        assert_eq!(b, vec![2.0, 3.0]);
        fold_into_bias("ff", &mut b, &[5.0, 5.0, 5.0], Ia3Side::Input).unwrap();
        assert_eq!(b, vec![2.0, 3.0]);
        let mut w = w0.clone();
        assert!(fold_into_weight("k", &mut w, 2, 3, &[1.0; 3], Ia3Side::Output).is_err());
    }
}
