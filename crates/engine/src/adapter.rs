//! `model+adapter` inputs: a PEFT adapter applied to its base on the fly, as mergekit does.
//!
//! Reading an adapted weight yields `W + s·B·A` for a LoRA module (`(s·B·A)ᵀ` added when the
//! weight is stored transposed: embeddings, `fan_in_fan_out`), `diag(l)·W` for an (IA)³ output
//! vector and `W·diag(l)` for an (IA)³ feed-forward (input) vector, computed row by row in f64
//! for the rows a block covers, so memory stays bounded by the block. Weights the adapter does not
//! touch read unchanged. The adapter is validated against its base before any work.

use crate::error::EngineError;
use amalgam_io::{Adapter, AdapterModules, Checkpoint};
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

/// The update one adapter makes to one base weight.
#[derive(Debug, Clone)]
pub enum WeightUpdate {
    /// `W += s·B·A` (or its transpose).
    Lora {
        /// A, `[rank, in]`, row-major.
        a: Vec<f32>,
        /// B, `[out, rank]`, row-major.
        b: Vec<f32>,
        /// Rank.
        rank: usize,
        /// Input features.
        d_in: usize,
        /// Output features.
        d_out: usize,
        /// `alpha / rank` (or rsLoRA's).
        scaling: f64,
        /// The base weight is stored `[in, out]`.
        transposed: bool,
    },
    /// `W ← diag(l)·W` (rows) or `W·diag(l)` (columns).
    Ia3 {
        /// The vector l.
        l: Vec<f32>,
        /// Scales columns (inputs) rather than rows (outputs) of the stored weight.
        columns: bool,
    },
}

/// Every update of one adapter, by base weight name.
#[derive(Debug, Clone, Default)]
pub struct AdapterDelta {
    /// Updates by base tensor name.
    pub updates: HashMap<String, WeightUpdate>,
}

impl AdapterDelta {
    /// Open the adapter at `path`, check it against `base`, and load its (small) factors.
    pub fn load(path: &Path, base: &Checkpoint) -> Result<AdapterDelta, EngineError> {
        let adapter = Adapter::open(path)?;
        adapter.check_base(base)?;
        let mut updates = HashMap::new();
        match adapter.modules() {
            AdapterModules::Lora(mods) => {
                for m in mods {
                    updates.insert(
                        adapter.base_weight_name(&m.name),
                        WeightUpdate::Lora {
                            a: adapter.read(&m.a_key)?,
                            b: adapter.read(&m.b_key)?,
                            rank: m.rank,
                            d_in: m.in_features,
                            d_out: m.out_features,
                            scaling: m.scaling,
                            transposed: m.transposed,
                        },
                    );
                }
            }
            AdapterModules::Ia3(mods) => {
                for m in mods {
                    // A feed-forward vector scales the layer's inputs: the columns of a
                    // `[out, in]` weight, or the rows when the weight is stored transposed.
                    let columns = m.is_feedforward != m.transposed;
                    updates.insert(
                        adapter.base_weight_name(&m.name),
                        WeightUpdate::Ia3 {
                            l: adapter.read(&m.key)?,
                            columns,
                        },
                    );
                }
            }
        }
        Ok(AdapterDelta { updates })
    }
}

impl WeightUpdate {
    /// Apply the update to `out`, which holds elements `range` of the base weight (`cols` per
    /// stored row).
    pub fn apply(&self, range: Range<usize>, cols: usize, out: &mut [f32]) {
        for (k, v) in out.iter_mut().enumerate() {
            let e = range.start + k;
            let (r, c) = (e / cols, e % cols);
            match self {
                WeightUpdate::Lora {
                    a,
                    b,
                    rank,
                    d_in,
                    scaling,
                    transposed,
                    ..
                } => {
                    // Stored element (r, c) is ΔW[o, i] with (o, i) = (r, c), or (c, r) transposed.
                    let (o, i) = if *transposed { (c, r) } else { (r, c) };
                    let mut s = 0f64;
                    for j in 0..*rank {
                        s += b[o * rank + j] as f64 * a[j * d_in + i] as f64;
                    }
                    *v = (*v as f64 + scaling * s) as f32;
                }
                WeightUpdate::Ia3 { l, columns } => {
                    let idx = if *columns { c } else { r };
                    *v *= l[idx];
                }
            }
        }
    }
}
