//! Statistics from data for the data-driven merges: diagonal empirical Fisher (methods.md §9),
//! Gram matrices of linear-layer inputs (§10, RegMean), K-FAC factors and (IA)³ block Fishers
//! (§11, MaTS), written in the statistics-file format of architecture.md ("Statistics files")
//! through [`amalgam_io::StatsWriter`].
//!
//! Everything follows the MaTS reference (`r-three/mats`,
//! `src/merging/save_metadata/save_fisher.py` and `save_gram_matrix.py`): one example per batch
//! (so there is no padding), the loss of an example is the **mean** NLL over its scored tokens
//! ([`data`] says which tokens those are), and at most [`StatsOptions::examples`] examples are
//! used (the reference stops at 1000).
//!
//! | kind | keys | definition |
//! |---|---|---|
//! | `fisher` | `NAME::fisher`, every parameter | (1/n) Σ_examples (∂loss/∂θ)² |
//! | `gram` | `W::gram_in`, every linear weight | Σ_positions x xᵀ / #positions |
//! | `kfac` | `W::gram_in` and `W::kfac_out` | as `gram`, and Σ_positions g gᵀ / #positions, g = ∂loss/∂(layer output) |
//! | `ia3-block` | `KEY::fisher_block`, every (IA)³ vector | (1/n) Σ_examples g gᵀ, g = ∂loss/∂l |
//!
//! "Positions" ([`GramPositions`]) are by default every position fed to the model (all real
//! tokens but the last; see [`data`]): in a decoder-only model every token passes through
//! every layer, which is what the reference's token masks count for a T5 (encoder tokens for
//! the encoder, target tokens for the decoder) and what the original RegMean code counts (all
//! token rows); [`GramPositions::Scored`] counts only the positions that predict a scored
//! token (the literal analogue of MaTS's decoder `target_mask`). Padding never occurs at
//! batch size 1. `lm_head` gets a `gram_in` (its
//! input is the hidden size) but no `kfac_out` (its output is vocabulary-sized; the reference
//! skips it too). A head tied to the embedding gets no statistic (its weight is the
//! embedding, which no method solves). The model runs in its own dtype (f32 recommended).
//!
//! Sums are accumulated in f64 per chunk of examples ([`StatsOptions::chunk`],
//! [`compute_partial`]) and the chunk sums added in chunk order ([`finish_partials`]), so
//! workers that each compute some chunks (one model per worker) give the single-process
//! result bit for bit: the work is data-parallel over examples.

pub mod data;
mod fisher;
mod gram;
mod ia3;

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use amalgam_io::{write_stats, Checkpoint, StatKey, StatKind, StatsMeta};
use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::model::{Capture, CausalLm};

pub use data::{read_jsonl, tokenize_example, ExampleTokens, StatsExample};
pub use ia3::{install_ia3, Ia3Vector, Ia3Vectors};

/// The examples used when no limit is given: the MaTS reference's cap.
pub const DEFAULT_EXAMPLES: usize = 1000;

/// Examples per chunk by default ([`StatsOptions::chunk`]).
pub const DEFAULT_CHUNK: usize = 64;

/// Which statistics to compute (`amalgam stats --kind`; serialized by its CLI name).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StatsKindArg {
    /// `fisher`: diagonal empirical Fisher of every parameter (`::fisher`).
    Fisher,
    /// `gram`: Gram of every linear layer's inputs (`::gram_in`).
    Gram,
    /// `kfac`: K-FAC factors of every linear layer (`::gram_in`, and `::kfac_out` for all but
    /// `lm_head`).
    Kfac,
    /// `ia3-block`: full Fisher of every (IA)³ vector (`::fisher_block`); needs
    /// [`StatsOptions::ia3`].
    Ia3Block,
}

impl StatsKindArg {
    /// Every kind, in CLI order.
    pub const ALL: [StatsKindArg; 4] = [
        StatsKindArg::Fisher,
        StatsKindArg::Gram,
        StatsKindArg::Kfac,
        StatsKindArg::Ia3Block,
    ];

    /// The CLI name (`fisher`, `gram`, `kfac`, `ia3-block`).
    pub fn name(self) -> &'static str {
        match self {
            StatsKindArg::Fisher => "fisher",
            StatsKindArg::Gram => "gram",
            StatsKindArg::Kfac => "kfac",
            StatsKindArg::Ia3Block => "ia3-block",
        }
    }

    /// The `kind` written to the file's metadata.
    pub fn meta_kind(self) -> &'static str {
        match self {
            StatsKindArg::Fisher => "empirical_fisher_diagonal",
            StatsKindArg::Gram => "gram_input_activations",
            StatsKindArg::Kfac => "kfac",
            StatsKindArg::Ia3Block => "empirical_fisher_blockwise_ia3",
        }
    }

    /// Whether the kind runs backward passes (every kind but `gram`).
    pub fn needs_backward(self) -> bool {
        !matches!(self, StatsKindArg::Gram)
    }

    /// Whether the model must be loaded with `LoadOptions::trainable` (only `fisher`: K-FAC
    /// takes its gradients from output probes, (IA)³ from the vectors' own variables).
    pub fn needs_trainable(self) -> bool {
        matches!(self, StatsKindArg::Fisher)
    }
}

impl fmt::Display for StatsKindArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for StatsKindArg {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<StatsKindArg, String> {
        StatsKindArg::ALL
            .into_iter()
            .find(|k| k.name() == s || k.name().replace('-', "_") == s)
            .ok_or_else(|| {
                format!("unknown statistics kind \"{s}\"; expected fisher, gram, kfac or ia3-block")
            })
    }
}

/// Which positions of an example the Gram and K-FAC sums (and their normalising count) take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GramPositions {
    /// Every position fed to the model (every real token but the last).
    #[default]
    All,
    /// Only the positions whose outputs predict a scored token (`start - 1 ..`).
    Scored,
}

impl GramPositions {
    /// The name (`all`, `scored`).
    pub fn name(self) -> &'static str {
        match self {
            GramPositions::All => "all",
            GramPositions::Scored => "scored",
        }
    }
}

impl FromStr for GramPositions {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<GramPositions, String> {
        match s {
            "all" => Ok(GramPositions::All),
            "scored" => Ok(GramPositions::Scored),
            _ => Err(format!("unknown positions \"{s}\"; expected all or scored")),
        }
    }
}

/// What [`compute_stats`] computes.
#[derive(Clone, Debug)]
pub struct StatsOptions {
    /// The statistics.
    pub kind: StatsKindArg,
    /// Use at most this many examples, the first ones in file order (0: all).
    pub examples: usize,
    /// Examples per chunk: the unit of work on the cluster and of the f64 sums (the result
    /// depends on it in the last bits only; keep it fixed to compare runs bit for bit).
    pub chunk: usize,
    /// The (IA)³ vectors installed in the model (from [`install_ia3`]); required by
    /// [`StatsKindArg::Ia3Block`], ignored otherwise.
    pub ia3: Option<Ia3Vectors>,
    /// The positions `gram` and `kfac` take (ignored by the other kinds).
    pub positions: GramPositions,
}

impl StatsOptions {
    /// Options for `kind` with [`DEFAULT_EXAMPLES`] and no (IA)³ vectors.
    pub fn new(kind: StatsKindArg) -> StatsOptions {
        StatsOptions {
            kind,
            examples: DEFAULT_EXAMPLES,
            chunk: DEFAULT_CHUNK,
            ia3: None,
            positions: GramPositions::All,
        }
    }
}

/// One computed statistic.
#[derive(Clone, Debug, PartialEq)]
pub struct StatTensor {
    /// Its key (parameter name, kind, shape).
    pub key: StatKey,
    /// Row-major values.
    pub data: Vec<f32>,
}

/// The result of [`compute_stats`]: metadata and statistics, ready to [`write`](Self::write).
#[derive(Clone, Debug)]
pub struct StatsOutput {
    /// The file's metadata (`tokens` counts positions for `gram`/`kfac` and scored tokens for
    /// `fisher`/`ia3-block`; both counts are in `extra` as `positions` and `loss_tokens`).
    pub meta: StatsMeta,
    /// The statistics, in the model's parameter order.
    pub tensors: Vec<StatTensor>,
}

impl StatsOutput {
    /// Records the model the statistics belong to (its safetensors header digest), so that a
    /// merge refuses them with another model.
    pub fn for_model(mut self, model: &Checkpoint) -> StatsOutput {
        self.meta = self.meta.for_model(model);
        self
    }

    /// The statistic of parameter `name` of kind `kind`.
    pub fn get(&self, name: &str, kind: StatKind) -> Option<&StatTensor> {
        self.tensors
            .iter()
            .find(|t| t.key.name == name && t.key.kind == kind)
    }

    /// Writes the statistics file (atomically; an existing file only with `overwrite`).
    pub fn write(&self, path: &Path, overwrite: bool) -> Result<PathBuf> {
        let entries: Vec<(StatKey, &[f32])> = self
            .tensors
            .iter()
            .map(|t| (t.key.clone(), t.data.as_slice()))
            .collect();
        Ok(write_stats(path, &self.meta, &entries, overwrite)?)
    }
}

/// Computes `opts.kind` over the first `opts.examples` of `data` (one forward, and backward
/// where needed, per example), calling `progress(1)` after each example.
///
/// `fisher` needs a model loaded with `trainable` (every parameter a variable); `ia3-block`
/// needs `opts.ia3` from [`install_ia3`] on this model; `gram` and `kfac` work either way.
///
/// The examples are summed in the chunks of [`plan_chunks`], and the chunk sums added in
/// chunk order ([`finish_partials`]): the cluster computes the same chunks on its workers
/// ([`compute_partial`]) and gets the same numbers.
pub fn compute_stats(
    model: &CausalLm,
    data: &[StatsExample],
    opts: &StatsOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<StatsOutput> {
    let parts = plan_chunks(data.len(), opts)
        .into_iter()
        .map(|range| compute_partial(model, data, range, opts, progress))
        .collect::<Result<Vec<_>>>()?;
    finish_partials(opts.kind, &parts)
}

/// The number of examples used: the first `opts.examples` of `n` (all with 0).
pub fn examples_used(n: usize, opts: &StatsOptions) -> usize {
    if opts.examples == 0 {
        n
    } else {
        opts.examples.min(n)
    }
}

/// The chunks of examples (contiguous, in order, [`StatsOptions::chunk`] each) that are summed
/// separately, for a data set of `n` examples.
pub fn plan_chunks(n: usize, opts: &StatsOptions) -> Vec<Range<usize>> {
    crate::score::plan_batches(examples_used(n, opts), opts.chunk)
}

/// One chunk's unnormalised sum of one statistic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartialSum {
    /// The parameter name.
    pub name: String,
    /// The statistic's key suffix (`fisher`, `gram_in`, `kfac_out`, `fisher_block`).
    pub suffix: String,
    /// The statistic's shape.
    pub shape: Vec<usize>,
    /// The sum, row-major.
    pub sum: Vec<f64>,
}

impl PartialSum {
    pub(crate) fn new(key: StatKey, sum: Vec<f64>) -> PartialSum {
        PartialSum {
            name: key.name,
            suffix: key.kind.suffix().to_string(),
            shape: key.shape,
            sum,
        }
    }

    /// The statistic's key; `Err` for an unknown suffix.
    pub fn key(&self) -> Result<StatKey> {
        let kind = StatKind::from_suffix(&self.suffix).ok_or_else(|| {
            EvalError::Other(format!(
                "partial statistics for {}: unknown kind \"{}\"",
                self.name, self.suffix
            ))
        })?;
        Ok(StatKey::new(self.name.clone(), kind, self.shape.clone()))
    }
}

/// The unnormalised statistics of one chunk of examples (what a worker returns).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsPartial {
    /// The examples summed (indices into the data set).
    pub range: Range<usize>,
    /// The positions the Gram and K-FAC sums take.
    pub counted: GramPositions,
    /// Number of those positions over the examples.
    pub positions: u64,
    /// Tokens scored over those examples.
    pub loss_tokens: u64,
    /// The sums, in the model's parameter order.
    pub sums: Vec<PartialSum>,
}

/// Sums `opts.kind` over the examples `range` of `data` (a chunk of [`plan_chunks`]), calling
/// `progress(1)` after each example. Errors name the example by its index in `data`.
pub fn compute_partial(
    model: &CausalLm,
    data: &[StatsExample],
    range: Range<usize>,
    opts: &StatsOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<StatsPartial> {
    let chunk = data.get(range.clone()).ok_or_else(|| {
        EvalError::Other(format!(
            "examples {range:?} are outside the data set of {} examples",
            data.len()
        ))
    })?;
    let tok = model.tokenizer();
    let prefix = tok.bos_id().or(tok.eos_id());
    let max_positions = model.config().max_position_embeddings;
    let mut encode = |t: &str, special: bool| tok.encode(t, special);
    let mut examples = Vec::with_capacity(chunk.len());
    for (i, ex) in chunk.iter().enumerate() {
        let index = range.start + i;
        let ex = tokenize_example(&mut encode, prefix, ex, index)?;
        examples.push(ex.truncate_left(max_positions, index)?);
    }
    let sums = match opts.kind {
        StatsKindArg::Fisher => fisher::diagonal_fisher(model, &examples, progress)?,
        StatsKindArg::Gram => gram::grams(model, &examples, opts.positions, false, progress)?,
        StatsKindArg::Kfac => gram::grams(model, &examples, opts.positions, true, progress)?,
        StatsKindArg::Ia3Block => {
            let Some(vectors) = &opts.ia3 else {
                return Err(EvalError::Other(
                    "--kind ia3-block needs an (IA)^3 adapter installed in the model".to_string(),
                ));
            };
            ia3::block_fisher(model, vectors, &examples, progress)?
        }
    };
    Ok(StatsPartial {
        range,
        counted: opts.positions,
        positions: examples
            .iter()
            .map(|e| e.counted(opts.positions).len() as u64)
            .sum(),
        loss_tokens: examples.iter().map(|e| e.loss_tokens() as u64).sum(),
        sums,
    })
}

/// Adds the chunk sums in the order given (which must be the chunks' order, contiguous from
/// example 0), divides them (by the number of examples for `fisher` and `ia3-block`, by the
/// number of positions for `gram` and `kfac`) and builds the file's metadata.
pub fn finish_partials(kind: StatsKindArg, parts: &[StatsPartial]) -> Result<StatsOutput> {
    let Some(first) = parts.first() else {
        return Err(EvalError::Other(
            "statistics need at least one example, and the data set is empty".to_string(),
        ));
    };
    let mut next = 0;
    for p in parts {
        if p.range.start != next || p.range.is_empty() {
            return Err(EvalError::Other(format!(
                "partial statistics out of order: chunk {:?} where examples {next}.. were expected",
                p.range
            )));
        }
        next = p.range.end;
        let same = p.counted == first.counted
            && p.sums.len() == first.sums.len()
            && p.sums.iter().zip(&first.sums).all(|(a, b)| {
                a.name == b.name
                    && a.suffix == b.suffix
                    && a.shape == b.shape
                    && a.sum.len() == b.sum.len()
            });
        if !same {
            return Err(EvalError::Other(format!(
                "partial statistics of examples {:?} hold other keys than those of examples {:?} (another model?)",
                p.range, first.range
            )));
        }
    }
    let examples = next as u64;
    let positions: u64 = parts.iter().map(|p| p.positions).sum();
    let loss_tokens: u64 = parts.iter().map(|p| p.loss_tokens).sum();
    let (denom, tokens) = match kind {
        StatsKindArg::Gram | StatsKindArg::Kfac => (positions, positions),
        StatsKindArg::Fisher | StatsKindArg::Ia3Block => (examples, loss_tokens),
    };
    let mut tensors = Vec::with_capacity(first.sums.len());
    for (k, s0) in first.sums.iter().enumerate() {
        let mut total = s0.sum.clone();
        for p in &parts[1..] {
            for (t, x) in total.iter_mut().zip(&p.sums[k].sum) {
                *t += x;
            }
        }
        let data = total.iter().map(|&x| (x / denom as f64) as f32).collect();
        tensors.push(StatTensor {
            key: s0.key()?,
            data,
        });
    }
    let mut meta = StatsMeta::new(kind.meta_kind(), examples, tokens);
    meta.extra
        .insert("positions".to_string(), positions.to_string());
    meta.extra
        .insert("loss_tokens".to_string(), loss_tokens.to_string());
    if matches!(kind, StatsKindArg::Gram | StatsKindArg::Kfac) {
        meta.extra.insert(
            "gram_positions".to_string(),
            first.counted.name().to_string(),
        );
    }
    meta.extra.insert(
        "loss".to_string(),
        "mean token NLL per example, batch size 1".to_string(),
    );
    Ok(StatsOutput { meta, tensors })
}

/// Runs the model on one example and returns its loss, the mean NLL of the scored tokens (a
/// scalar), recording every linear layer into `capture` when given.
pub(crate) fn example_loss(
    model: &CausalLm,
    ex: &ExampleTokens,
    capture: Option<&mut Capture>,
) -> Result<Tensor> {
    let dev = model.device();
    let fed = Tensor::new(ex.fed(), dev)?.unsqueeze(0)?;
    let mask = Tensor::ones((1, ex.positions()), DType::U32, dev)?;
    let logits = model.forward(&fed, &mask, capture)?;
    let n = ex.loss_tokens();
    let scored = logits
        .narrow(1, ex.start - 1, n)?
        .squeeze(0)?
        .to_dtype(DType::F32)?;
    let logp = candle_nn::ops::log_softmax(&scored, D::Minus1)?;
    let targets = Tensor::new(&ex.ids[ex.start..], dev)?.unsqueeze(1)?;
    let nll = logp.gather(&targets, 1)?.mean_all()?.neg()?;
    Ok(nll)
}

/// A running f64 sum of f32 tensors (on the model's device).
pub(crate) struct Acc {
    sum: Option<Tensor>,
}

impl Acc {
    pub(crate) fn new() -> Acc {
        Acc { sum: None }
    }

    pub(crate) fn add(&mut self, t: &Tensor) -> Result<()> {
        let t = t.detach().to_dtype(DType::F64)?;
        self.sum = Some(match self.sum.take() {
            None => t,
            Some(s) => (s + t)?,
        });
        Ok(())
    }

    /// The sum as f64 values; zeros of `shape` when nothing was added.
    pub(crate) fn into_sum(self, shape: &[usize]) -> Result<Vec<f64>> {
        match self.sum {
            None => Ok(vec![0.0; shape.iter().product()]),
            Some(s) => Ok(s.flatten_all()?.to_vec1::<f64>()?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_round_trip() {
        for k in StatsKindArg::ALL {
            assert_eq!(k.name().parse::<StatsKindArg>(), Ok(k));
            assert_eq!(k.to_string(), k.name());
        }
        assert_eq!("ia3_block".parse(), Ok(StatsKindArg::Ia3Block));
        let e = "hessian".parse::<StatsKindArg>().unwrap_err();
        assert!(e.contains("ia3-block"), "{e}");
        assert!(!StatsKindArg::Gram.needs_backward());
        assert!(StatsKindArg::Kfac.needs_backward());
        assert!(StatsKindArg::Fisher.needs_trainable());
        assert!(!StatsKindArg::Kfac.needs_trainable());
        assert_eq!("scored".parse(), Ok(GramPositions::Scored));
        assert!("target".parse::<GramPositions>().is_err());
    }

    #[test]
    fn accumulator_sums_in_f64_and_divides() {
        let dev = candle_core::Device::Cpu;
        let mut acc = Acc::new();
        // 1e8 + 1 is not representable in f32; the f64 sum keeps the 1.
        acc.add(&Tensor::new(&[1e8f32, 3.0], &dev).unwrap())
            .unwrap();
        acc.add(&Tensor::new(&[1.0f32, 5.0], &dev).unwrap())
            .unwrap();
        acc.add(&Tensor::new(&[-1e8f32, 1.0], &dev).unwrap())
            .unwrap();
        assert_eq!(acc.into_sum(&[2]).unwrap(), vec![1.0, 9.0]);
        assert_eq!(Acc::new().into_sum(&[2, 2]).unwrap(), vec![0.0; 4]);
    }
}
