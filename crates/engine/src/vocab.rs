//! `tokenizer_source`: merging models whose vocabularies differ.
//!
//! When the config names a tokenizer source (`base` or a model), every vocabulary-axis tensor
//! (input embeddings and output head: rows indexed by token id) is re-indexed to the chosen
//! tokenizer before merging, as mergekit 0.1.5 does (`tokenizer/embed.py`). For a token of the
//! chosen vocabulary, model `m`'s row is its own row for the same token string when it has one;
//! otherwise a default row shared by all models: the row of the only model that has the token,
//! else the base model's row when the base has it, else the mean of the rows of the models that
//! have it, else zeros.
//!
//! [`prepare_vocabularies`] adjusts the planner's view of the tensor shapes (the vocabulary axis
//! takes the chosen tokenizer's size), and [`VocabMap`] tells the reader where each row comes from.

use crate::error::EngineError;
use crate::inputs::Inputs;
use amalgam_core::config::{MergeConfig, ModelRef, TokenizerSource};
use amalgam_core::plan::Plan;
use std::collections::{BTreeMap, HashMap};

/// Where row `r` (a token id of the chosen tokenizer) of one model comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowSource {
    /// The model's own row.
    Own(u32),
    /// The default row for this token (same for every model).
    Default,
}

/// How a default row is made.
#[derive(Debug, Clone, PartialEq)]
pub enum DefaultRow {
    /// Row `row` of model `model` (a plan model index).
    Copy {
        /// Plan model index.
        model: usize,
        /// Row in that model.
        row: u32,
    },
    /// Mean of these (model, row) pairs.
    Mean(Vec<(usize, u32)>),
    /// All zeros.
    Zero,
}

/// Row mapping of every model for the vocabulary-axis tensors of one merge.
#[derive(Debug, Clone, Default)]
pub struct VocabMap {
    /// Size of the chosen vocabulary (rows of the output embeddings).
    pub size: usize,
    /// Per plan-model index: source of each target row.
    pub rows: BTreeMap<usize, Vec<RowSource>>,
    /// Default rows, by target row.
    pub defaults: HashMap<u32, DefaultRow>,
}

/// Every model's vocabulary: token string per id (`None` for unused ids).
pub type Vocabularies = BTreeMap<ModelRef, Vec<Option<String>>>;

pub use amalgam_core::tensor::is_vocab_tensor;

/// The model whose tokenizer `tokenizer_source: base` names: `base_model`, else (as in
/// mergekit) the first model the config references.
fn base_tokenizer_model(config: &MergeConfig) -> Result<ModelRef, EngineError> {
    amalgam_core::plan::referenced_models(config)
        .into_iter()
        .next()
        .ok_or_else(|| EngineError::Config {
            key: "tokenizer_source".into(),
            message: "`base` needs a model: the config names none".into(),
        })
}

fn chosen_source(config: &MergeConfig) -> Option<TokenizerSource> {
    config
        .tokenizer_source
        .clone()
        .or_else(|| config.tokenizer.as_ref().and_then(|t| t.source.clone()))
}

fn vocab_of(inputs: &Inputs, m: &ModelRef) -> Result<Vec<Option<String>>, EngineError> {
    let ck = inputs
        .checkpoints
        .get(m)
        .ok_or_else(|| EngineError::Model {
            model: m.to_string(),
            message: "was not opened".into(),
        })?;
    let vocab = match amalgam_io::gguf::gguf_source(ck) {
        Some(gguf) => amalgam_io::gguf::vocab(gguf)?,
        None => amalgam_io::read_vocab(ck.root())?,
    };
    vocab.ok_or_else(|| EngineError::Model {
        model: m.to_string(),
        message: format!(
            "`tokenizer_source` is set but {} has no tokenizer.json",
            ck.root().display()
        ),
    })
}

/// With `tokenizer_source`, compute the chosen vocabulary and set every model's
/// vocabulary-axis tensors to its size in the planner's view. Returns `None` when no tokenizer
/// source is set or every vocabulary already equals the chosen one.
pub fn prepare_vocabularies(
    config: &MergeConfig,
    inputs: &mut Inputs,
) -> Result<Option<Vocabularies>, EngineError> {
    let target_ref = match chosen_source(config) {
        None => return Ok(None),
        Some(TokenizerSource::Union) => {
            return Err(EngineError::Config {
                key: "tokenizer_source".into(),
                message: "`union` is not supported yet; use `base` or a model path".into(),
            })
        }
        Some(TokenizerSource::Base) => base_tokenizer_model(config)?,
        Some(TokenizerSource::Model(m)) => m,
    };
    let mut vocabs = BTreeMap::new();
    let models: Vec<ModelRef> = inputs.models.keys().cloned().collect();
    for m in &models {
        vocabs.insert(m.clone(), vocab_of(inputs, m)?);
    }
    let target = vocabs
        .get(&target_ref)
        .cloned()
        .ok_or_else(|| EngineError::Config {
            key: "tokenizer_source".into(),
            message: format!("model {target_ref} is not an input of this merge"),
        })?;
    let size = match config.tokenizer.as_ref().and_then(|t| t.pad_to_multiple_of) {
        Some(k) if k > 0 => target.len().div_ceil(k) * k,
        _ => target.len(),
    };
    let all_same = vocabs.values().all(|v| *v == target)
        && inputs.models.values().all(|im| {
            im.tensors
                .iter()
                .filter(|t| is_vocab_tensor(&t.name, &t.shape))
                .all(|t| t.shape[0] == size)
        });
    if all_same {
        return Ok(None);
    }
    if size != target.len() {
        return Err(EngineError::Config {
            key: "tokenizer.pad_to_multiple_of".into(),
            message: "padding the vocabulary is supported only when every model shares the chosen tokenizer".into(),
        });
    }
    for im in inputs.models.values_mut() {
        for t in im.tensors.iter_mut() {
            if is_vocab_tensor(&t.name, &t.shape) {
                t.shape[0] = size;
            }
        }
    }
    vocabs.insert(target_ref.clone(), target);
    Ok(Some(vocabs))
}

/// Build the row map of a plan, given the vocabularies from [`prepare_vocabularies`] (the
/// entry for the chosen tokenizer is read from `config`). `rows_of(model)` is the number of rows
/// the model's own vocabulary tensors hold.
pub fn build_vocab_map(
    config: &MergeConfig,
    plan: &Plan,
    vocabs: &Vocabularies,
    rows_of: &dyn Fn(&ModelRef) -> usize,
) -> Result<VocabMap, EngineError> {
    let target_ref = match chosen_source(config) {
        Some(TokenizerSource::Model(m)) => m,
        _ => base_tokenizer_model(config)?,
    };
    let target = &vocabs[&target_ref];
    let base_idx = plan
        .base_model
        .as_ref()
        .and_then(|b| plan.models.iter().position(|m| m == b));
    let mut map = VocabMap {
        size: target.len(),
        ..Default::default()
    };
    let mut lookups: Vec<(usize, HashMap<&str, u32>)> = Vec::new();
    for (idx, m) in plan.models.iter().enumerate() {
        let v = vocabs.get(m).ok_or_else(|| EngineError::Model {
            model: m.to_string(),
            message: "vocabulary not loaded".into(),
        })?;
        let limit = rows_of(m);
        let h: HashMap<&str, u32> = v
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.as_deref().map(|s| (s, i as u32)))
            .filter(|(_, i)| (*i as usize) < limit)
            .collect();
        lookups.push((idx, h));
    }
    for (idx, h) in &lookups {
        let rows = target
            .iter()
            .map(|tok| match tok.as_deref().and_then(|s| h.get(s)) {
                Some(&r) => RowSource::Own(r),
                None => RowSource::Default,
            })
            .collect();
        map.rows.insert(*idx, rows);
    }
    for (r, tok) in target.iter().enumerate() {
        let present: Vec<(usize, u32)> = lookups
            .iter()
            .filter_map(|(idx, h)| {
                tok.as_deref()
                    .and_then(|s| h.get(s))
                    .map(|&row| (*idx, row))
            })
            .collect();
        if present.len() == lookups.len() {
            continue;
        }
        let d = if present.is_empty() {
            DefaultRow::Zero
        } else if present.len() == 1 {
            DefaultRow::Copy {
                model: present[0].0,
                row: present[0].1,
            }
        } else if let Some(&(model, row)) = base_idx.and_then(|b| present.iter().find(|p| p.0 == b))
        {
            DefaultRow::Copy { model, row }
        } else {
            DefaultRow::Mean(present)
        };
        map.defaults.insert(r as u32, d);
    }
    Ok(map)
}
