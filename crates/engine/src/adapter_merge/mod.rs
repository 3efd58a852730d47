//! Adapter-to-adapter work (issue 8): merging PEFT adapter directories into one adapter
//! (`amalgam merge-adapters`) and extracting a LoRA from a full fine-tune (`amalgam
//! extract-lora`). Pure orchestration: the math is `amalgam_core::adapters`, the files go
//! through `amalgam_io::peft`.
//!
//! methods.md §14 (KnOTS), §15 ((IA)³), §3-§4 (TIES / DARE as PEFT runs them).
//!
//! **Merging** ([`merge_adapters`]): every adapter is opened and validated
//! ([`amalgam_io::Adapter::open`]); they must be of one kind (LoRA or (IA)³), name the same
//! base model (`base_model_name_or_path`, when both record it) and adapt the same modules with
//! the same shapes (errors name the adapter directory and the module). Then, per module:
//!
//! - LoRA with one of PEFT's `combination_type`s: [`amalgam_core::adapters::combine`], exactly
//!   `LoraModel.add_weighted_adapter` (the linear family merges A and B separately; `cat` is
//!   exact; the SVD family truncates `Σ w_i ΔW_i`). The new adapter has `r = lora_alpha` = the
//!   new rank and no rank or alpha pattern, as PEFT's.
//! - LoRA with `knots_ties` / `knots_dare`: [`amalgam_core::adapters::knots`] over all modules
//!   at once (the TIES top-k and the zero-sign rule are global over all layers): every module
//!   is aligned, then the global statistics are taken, then each module is merged. Each
//!   module's result is a LoRA of its own rank `k`, zero-padded to the largest `k`.
//! - (IA)³: `linear` is PEFT's `IA3Model.add_weighted_adapter` (`Σ w_i l_i`, raw vectors); the
//!   others (`task_arithmetic`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`) run
//!   PEFT's merge operations on the task vectors `τ_i = l_i − 1` and write `1 + merged`.
//!
//! Both run as an adapter job ([`job`]): one unit per module, cut into shards, each unit's
//! tensors computed by [`AdapterTask::run_unit`], in this process ([`run_local`]) or on
//! workers (`amalgam_cluster::adapter_job`), with the same bytes.
//!
//! The result is written with [`amalgam_io::peft::write_adapter`] (staged, then renamed into
//! place); an existing adapter in the output directory is refused before any work unless
//! `overwrite`.
//!
//! **Extraction** ([`extract_lora`]): for each 2-D `*.weight` of the fine-tune that the base
//! has with the same shape (embeddings and the LM head excluded), the rank-`r` truncated SVD of
//! `W_ft − W_base` ([`amalgam_core::adapters::extract`], mergekit's `extract_lora.py`
//! convention: `√S` on both factors, `lora_alpha = r`, `rank_pattern = alpha_pattern` for
//! modules of a smaller rank). One tensor pair is read at a time; only the (small) factors are
//! kept until the adapter is written.

use crate::error::EngineError;
use crate::inputs::resolve_model_path;
use crate::run::Progress;
use amalgam_core::adapters::combine::{
    self, new_rank, resolve_combination, Combination, CombineOptions,
};
use amalgam_core::adapters::extract::{self, ExtractOptions};
use amalgam_core::adapters::ia3;
use amalgam_core::adapters::knots::{self, KnotsDare, KnotsOptions, KnotsSignMode, LoraFactors};
use amalgam_core::adapters::merge_ops::{self, check_density, MajoritySignMethod, MergeOp};
use amalgam_core::params::{Scalar, TensorParams};
use amalgam_core::philox::MaskStream;
use amalgam_core::tensor::{MemReader, TensorJob};
use amalgam_io::peft::{
    ia3_key, lora_a_key, lora_b_key, write_adapter, ADAPTER_BIN_FILE, ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE, KEY_PREFIX,
};
use amalgam_io::{
    Adapter, AdapterConfig, AdapterKind, Checkpoint, IoError, LoraConfig, StatKind, StatsFile,
    TargetModules,
};
use serde_yaml_ng::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

mod ia3_merge;
pub mod job;
mod lora_extract;
mod lora_merge;

pub use job::{
    partition, run_local, AdapterJobSpec, AdapterTask, AdapterUnit, DEFAULT_ADAPTER_SHARD_BYTES,
};
pub use lora_extract::ExtractLoraOptions;
use lora_merge::warn_extra;

/// KnOTS followed by TIES (methods.md §14; `configs/vitB_r16_knots_ties.py`).
pub const KNOTS_TIES: &str = "knots_ties";
/// KnOTS followed by DARE (and TIES with `top_k`, 100 by default: no trimming).
pub const KNOTS_DARE: &str = "knots_dare";
/// The (IA)³ combination types.
pub const IA3_COMBINATIONS: [&str; 8] = [
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "fisher",
    "mats",
];

/// One adapter of a merge: its directory and weight.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterEntry {
    /// The adapter directory as written in the config.
    pub path: String,
    /// The adapter's weight (PEFT's `weights[i]`; default 1).
    pub weight: f64,
    /// Its statistics file (the (IA)³ `fisher` and `mats` combinations): `KEY::fisher` or
    /// `KEY::fisher_block` for each adapter tensor `KEY`, in the statistics file format.
    pub statistics: Option<String>,
}

/// A `merge-adapters` config (YAML). Keys and defaults follow PEFT's
/// `add_weighted_adapter(adapters, weights, adapter_name, combination_type="svd",
/// svd_rank=None, svd_clamp=None, svd_full_matrices=True, svd_driver=None, density=None,
/// majority_sign_method="total")`, plus KnOTS's and amalgam's own keys.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterMergeConfig {
    /// `combination_type`; `None` when not given (`svd` for LoRA, `linear` for (IA)³, as PEFT).
    pub combination_type: Option<String>,
    /// `adapters`: a list of paths or of `{path, weight}`.
    pub adapters: Vec<AdapterEntry>,
    /// `density`: fraction kept by the pruning types (required by them).
    pub density: Option<f64>,
    /// `majority_sign_method`: `total` (default) or `frequency`.
    pub majority_sign_method: MajoritySignMethod,
    /// `svd_rank`: rank of the SVD family's result (default, or 0: the largest adapter rank).
    pub svd_rank: Option<usize>,
    /// `svd_clamp`: quantile for clamping the SVD factors (default none).
    pub svd_clamp: Option<f64>,
    /// `seed`: seed of the DARE masks (default 0).
    pub seed: u64,
    /// `top_k` (KnOTS): percentage of each model's representation kept by TIES (default 20
    /// for `knots_ties`, 100 for `knots_dare`).
    pub top_k: Option<f64>,
    /// `alpha` (KnOTS): scale of the merged update (default 0.6 for `knots_ties`, 0.7 for
    /// `knots_dare`).
    pub alpha: Option<f64>,
    /// `sign_mode` (KnOTS): `sum_of_values` (default) or `sum_of_signs`.
    pub sign_mode: KnotsSignMode,
    /// `drop_rate` (`knots_dare`): DARE drop probability (default 0.1).
    pub drop_rate: Option<f64>,
    /// `union_modules`: accept adapters that adapt different modules and merge each module over
    /// the adapters that have it (PEFT's behaviour); default false (an error naming the module).
    pub union_modules: bool,
    /// `allow_base_mismatch`: accept different `base_model_name_or_path` values (default false).
    pub allow_base_mismatch: bool,
}

const KEYS: [&str; 15] = [
    "combination_type",
    "adapters",
    "density",
    "majority_sign_method",
    "svd_rank",
    "svd_clamp",
    "svd_full_matrices",
    "svd_driver",
    "seed",
    "top_k",
    "alpha",
    "sign_mode",
    "drop_rate",
    "union_modules",
    "allow_base_mismatch",
];

fn cfg_err(key: &str, message: impl Into<String>) -> EngineError {
    EngineError::Config {
        key: key.to_string(),
        message: message.into(),
    }
}

fn get_f64(key: &str, v: &Value) -> Result<f64, EngineError> {
    v.as_f64()
        .filter(|x| x.is_finite())
        .ok_or_else(|| cfg_err(key, format!("expected a finite number, found {v:?}")))
}

fn get_u64(key: &str, v: &Value) -> Result<u64, EngineError> {
    v.as_u64()
        .ok_or_else(|| cfg_err(key, format!("expected an integer >= 0, found {v:?}")))
}

fn get_bool(key: &str, v: &Value) -> Result<bool, EngineError> {
    v.as_bool()
        .ok_or_else(|| cfg_err(key, format!("expected true or false, found {v:?}")))
}

fn get_str<'v>(key: &str, v: &'v Value) -> Result<&'v str, EngineError> {
    v.as_str()
        .ok_or_else(|| cfg_err(key, format!("expected a string, found {v:?}")))
}

impl AdapterMergeConfig {
    /// Parse the YAML text of a config. Unknown keys are errors (a typo would otherwise
    /// silently fall back to a default).
    pub fn parse(text: &str) -> Result<AdapterMergeConfig, EngineError> {
        let root: Value = serde_yaml_ng::from_str(text)
            .map_err(|e| cfg_err("", format!("not valid YAML: {e}")))?;
        let Value::Mapping(map) = root else {
            return Err(cfg_err("", "the config must be a YAML mapping"));
        };
        let mut cfg = AdapterMergeConfig {
            combination_type: None,
            adapters: Vec::new(),
            density: None,
            majority_sign_method: MajoritySignMethod::Total,
            svd_rank: None,
            svd_clamp: None,
            seed: 0,
            top_k: None,
            alpha: None,
            sign_mode: KnotsSignMode::SumOfValues,
            drop_rate: None,
            union_modules: false,
            allow_base_mismatch: false,
        };
        for (k, v) in &map {
            let key = get_str("", k)?;
            if !KEYS.contains(&key) {
                return Err(cfg_err(
                    key,
                    format!("unknown key; the keys are {}", KEYS.join(", ")),
                ));
            }
            if v.is_null() {
                continue;
            }
            match key {
                "combination_type" => cfg.combination_type = Some(get_str(key, v)?.to_string()),
                "adapters" => cfg.adapters = parse_entries(v)?,
                "density" => cfg.density = Some(get_f64(key, v)?),
                "majority_sign_method" => {
                    cfg.majority_sign_method = MajoritySignMethod::parse(get_str(key, v)?)?
                }
                "svd_rank" => {
                    let r = get_u64(key, v)? as usize;
                    cfg.svd_rank = (r > 0).then_some(r);
                }
                "svd_clamp" => cfg.svd_clamp = Some(get_f64(key, v)?),
                // Accepted for PEFT compatibility: the CPU thin SVD has no driver choice and
                // the result does not depend on full matrices.
                "svd_full_matrices" => {
                    get_bool(key, v)?;
                }
                "svd_driver" => {
                    get_str(key, v)?;
                }
                "seed" => cfg.seed = get_u64(key, v)?,
                "top_k" => cfg.top_k = Some(get_f64(key, v)?),
                "alpha" => cfg.alpha = Some(get_f64(key, v)?),
                "sign_mode" => {
                    cfg.sign_mode = match get_str(key, v)? {
                        "sum_of_values" => KnotsSignMode::SumOfValues,
                        "sum_of_signs" => KnotsSignMode::SumOfSigns,
                        other => {
                            return Err(cfg_err(
                                key,
                                format!("`{other}` is not one of sum_of_values, sum_of_signs"),
                            ))
                        }
                    }
                }
                "drop_rate" => cfg.drop_rate = Some(get_f64(key, v)?),
                "union_modules" => cfg.union_modules = get_bool(key, v)?,
                "allow_base_mismatch" => cfg.allow_base_mismatch = get_bool(key, v)?,
                _ => unreachable!("every key of KEYS is handled"),
            }
        }
        if cfg.adapters.is_empty() {
            return Err(cfg_err("adapters", "give at least one adapter directory"));
        }
        Ok(cfg)
    }
}

impl AdapterMergeConfig {
    /// The config as YAML text that [`AdapterMergeConfig::parse`] reads back to an equal
    /// config (numbers in their shortest exact form).
    pub fn to_yaml(&self) -> String {
        use serde_yaml_ng::Mapping;
        let mut m = Mapping::new();
        let mut put = |k: &str, v: Value| {
            m.insert(Value::String(k.to_string()), v);
        };
        if let Some(c) = &self.combination_type {
            put("combination_type", Value::String(c.clone()));
        }
        let entries = self
            .adapters
            .iter()
            .map(|e| {
                let mut x = Mapping::new();
                x.insert("path".into(), Value::String(e.path.clone()));
                x.insert("weight".into(), Value::from(e.weight));
                if let Some(s) = &e.statistics {
                    x.insert("statistics".into(), Value::String(s.clone()));
                }
                Value::Mapping(x)
            })
            .collect();
        put("adapters", Value::Sequence(entries));
        let num = |x: Option<f64>| x.map_or(Value::Null, Value::from);
        put("density", num(self.density));
        put(
            "majority_sign_method",
            Value::String(
                match self.majority_sign_method {
                    MajoritySignMethod::Total => "total",
                    MajoritySignMethod::Frequency => "frequency",
                }
                .into(),
            ),
        );
        put(
            "svd_rank",
            self.svd_rank.map_or(Value::Null, |r| Value::from(r as u64)),
        );
        put("svd_clamp", num(self.svd_clamp));
        put("seed", Value::from(self.seed));
        put("top_k", num(self.top_k));
        put("alpha", num(self.alpha));
        put(
            "sign_mode",
            Value::String(
                match self.sign_mode {
                    KnotsSignMode::SumOfValues => "sum_of_values",
                    KnotsSignMode::SumOfSigns => "sum_of_signs",
                }
                .into(),
            ),
        );
        put("drop_rate", num(self.drop_rate));
        put("union_modules", Value::Bool(self.union_modules));
        put("allow_base_mismatch", Value::Bool(self.allow_base_mismatch));
        serde_yaml_ng::to_string(&Value::Mapping(m)).expect("a YAML mapping always serializes")
    }
}

fn parse_entries(v: &Value) -> Result<Vec<AdapterEntry>, EngineError> {
    let Value::Sequence(items) = v else {
        return Err(cfg_err(
            "adapters",
            "expected a list of adapter directories or of {path, weight}",
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(s) => Ok(AdapterEntry {
                path: s.clone(),
                weight: 1.0,
                statistics: None,
            }),
            Value::Mapping(m) => {
                let mut path = None;
                let mut weight = 1.0;
                let mut statistics = None;
                for (k, v) in m {
                    match k.as_str() {
                        Some("path") => path = Some(get_str("adapters.path", v)?.to_string()),
                        Some("weight") => weight = get_f64("adapters.weight", v)?,
                        Some("statistics") => {
                            statistics = Some(get_str("adapters.statistics", v)?.to_string())
                        }
                        _ => {
                            return Err(cfg_err(
                                "adapters",
                                format!(
                                    "entry {i}: unknown key `{}`; use `path`, `weight` and \
                                     `statistics`",
                                    k.as_str().map_or_else(|| format!("{k:?}"), str::to_string)
                                ),
                            ))
                        }
                    }
                }
                let path =
                    path.ok_or_else(|| cfg_err("adapters", format!("entry {i} has no `path`")))?;
                Ok(AdapterEntry {
                    path,
                    weight,
                    statistics,
                })
            }
            other => Err(cfg_err(
                "adapters",
                format!("entry {i}: expected a path or {{path, weight}}, found {other:?}"),
            )),
        })
        .collect()
}

/// What a merge or an extraction wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSummary {
    /// The output directory.
    pub out_dir: PathBuf,
    /// LoRA or (IA)³.
    pub kind: AdapterKind,
    /// The combination type that ran (after PEFT's one-adapter rule), or `extract`.
    pub method: String,
    /// Modules written.
    pub modules: usize,
    /// The adapter's `r` (0 for (IA)³).
    pub rank: usize,
}

/// Refuse an output directory that already holds an adapter (before any work), unless
/// `overwrite`, and one that holds an adapter or statistics file the job reads (writing there
/// would replace it).
pub fn check_out(
    out: &Path,
    overwrite: bool,
    spec: &job::AdapterJobSpec,
) -> Result<(), EngineError> {
    if let job::AdapterJobSpec::Merge { .. } = spec {
        crate::inputs::refuse_output_holding(out, spec.paths())?;
    }
    if overwrite {
        return Ok(());
    }
    for f in [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, ADAPTER_BIN_FILE] {
        if out.join(f).exists() {
            return Err(IoError::AdapterExists {
                dir: out.to_path_buf(),
                found: f.to_string(),
            }
            .into());
        }
    }
    Ok(())
}

fn mismatch(adapter: &Adapter, message: String) -> EngineError {
    EngineError::Model {
        model: adapter.dir().display().to_string(),
        message,
    }
}

/// Module names in merge order: the first adapter's order, then modules only later adapters
/// have. Without `union`, every adapter must adapt exactly the first adapter's modules.
fn module_order(adapters: &[Adapter], union: bool) -> Result<Vec<String>, EngineError> {
    let first = &adapters[0];
    let first_names: BTreeSet<&str> = first.modules().names().into_iter().collect();
    let mut order: Vec<String> = first
        .modules()
        .names()
        .into_iter()
        .map(str::to_string)
        .collect();
    let mut seen: BTreeSet<String> = order.iter().cloned().collect();
    for ad in &adapters[1..] {
        let names: BTreeSet<&str> = ad.modules().names().into_iter().collect();
        if !union {
            if let Some(m) = names.difference(&first_names).next() {
                return Err(mismatch(
                    ad,
                    format!(
                        "adapts module `{m}`, which {} does not; all adapters must target the \
                         same modules (set `union_modules: true` to merge each module over the \
                         adapters that have it, as PEFT does)",
                        first.dir().display()
                    ),
                ));
            }
            if let Some(m) = first_names.difference(&names).next() {
                return Err(mismatch(
                    ad,
                    format!(
                        "does not adapt module `{m}`, which {} does; all adapters must target \
                         the same modules (set `union_modules: true` to merge each module over \
                         the adapters that have it, as PEFT does)",
                        first.dir().display()
                    ),
                ));
            }
        }
        for n in ad.modules().names() {
            if seen.insert(n.to_string()) {
                order.push(n.to_string());
            }
        }
    }
    Ok(order)
}

/// The union of the adapters' `target_modules` (PEFT: set union of lists, `(a)|(b)` of
/// regular expressions); mixed kinds give the written modules' paths.
fn union_targets<'a>(
    targets: impl Iterator<Item = &'a TargetModules>,
    written: &[String],
) -> TargetModules {
    let targets: Vec<&TargetModules> = targets.collect();
    if targets.iter().all(|t| matches!(t, TargetModules::List(_))) {
        let set: BTreeSet<String> = targets
            .iter()
            .flat_map(|t| match t {
                TargetModules::List(v) => v.clone(),
                TargetModules::Regex(_) => Vec::new(),
            })
            .collect();
        TargetModules::List(set.into_iter().collect())
    } else if targets.iter().all(|t| matches!(t, TargetModules::Regex(_))) {
        let mut uniq: Vec<&str> = Vec::new();
        for t in &targets {
            if let TargetModules::Regex(r) = t {
                if !uniq.contains(&r.as_str()) {
                    uniq.push(r);
                }
            }
        }
        if uniq.len() == 1 {
            TargetModules::Regex(uniq[0].to_string())
        } else {
            TargetModules::Regex(
                uniq.iter()
                    .map(|r| format!("({r})"))
                    .collect::<Vec<_>>()
                    .join("|"),
            )
        }
    } else {
        TargetModules::List(written.to_vec())
    }
}

/// One module's row: per adapter, the module's index in that adapter's list (`None` where it
/// lacks it), and the first `(adapter, index)` that has it.
type ModuleRow = (Vec<Option<usize>>, (usize, usize));

/// Per module of `order`, per adapter, the index of the module in that adapter's module list
/// `list` (`None` where the adapter lacks it); with each row's first adapter that has it.
fn module_rows<M>(
    adapters: &[Adapter],
    order: &[String],
    list: impl Fn(&Adapter) -> &[M],
    name: impl Fn(&M) -> &str,
) -> Vec<ModuleRow> {
    let maps: Vec<HashMap<&str, usize>> = adapters
        .iter()
        .map(|a| {
            list(a)
                .iter()
                .enumerate()
                .map(|(j, m)| (name(m), j))
                .collect()
        })
        .collect();
    order
        .iter()
        .map(|n| {
            let row: Vec<Option<usize>> = maps.iter().map(|m| m.get(n.as_str()).copied()).collect();
            let first = row
                .iter()
                .enumerate()
                .find_map(|(i, j)| j.map(|j| (i, j)))
                .expect("a module in the order belongs to some adapter");
            (row, first)
        })
        .collect()
}

fn to_f64(v: Vec<f32>) -> Vec<f64> {
    v.into_iter().map(f64::from).collect()
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn bytes_of(adapter: &Adapter, keys: &[&str]) -> u64 {
    keys.iter()
        .filter_map(|k| adapter.checkpoint().get(k))
        .map(|t| t.byte_len() as u64)
        .sum()
}

/// One output tensor: key, shape, values.
pub type OutTensor = (String, Vec<usize>, Vec<f32>);

/// Merge the adapters `cfg` names into one adapter in `out` (see the module docs), in this
/// process ([`job::run_local`]). Relative adapter paths are resolved against the working
/// directory, then `config_dir`.
pub fn merge_adapters(
    cfg: &AdapterMergeConfig,
    config_dir: Option<&Path>,
    out: &Path,
    overwrite: bool,
    progress: &dyn Progress,
) -> Result<AdapterSummary, EngineError> {
    let spec = AdapterJobSpec::merge(&cfg.to_yaml(), config_dir)?;
    run_local(&spec, out, overwrite, DEFAULT_ADAPTER_SHARD_BYTES, progress)
}

/// Extract a LoRA of rank `opts.rank` from `opts.model − opts.base` (see the module docs), in
/// this process ([`job::run_local`]).
pub fn extract_lora(
    opts: &ExtractLoraOptions,
    progress: &dyn Progress,
) -> Result<AdapterSummary, EngineError> {
    let spec = AdapterJobSpec::extract(opts)?;
    run_local(
        &spec,
        &opts.out,
        opts.overwrite,
        DEFAULT_ADAPTER_SHARD_BYTES,
        progress,
    )
}

/// Refuse a `combination_type` that does not apply to `kind` before reading any tensor.
fn check_combination(kind: AdapterKind, name: Option<&str>) -> Result<(), EngineError> {
    let Some(name) = name else { return Ok(()) };
    let ok = match kind {
        AdapterKind::Lora => {
            name == KNOTS_TIES || name == KNOTS_DARE || Combination::parse(name).is_ok()
        }
        AdapterKind::Ia3 => IA3_COMBINATIONS.contains(&name),
    };
    if ok {
        return Ok(());
    }
    let valid: Vec<&str> = match kind {
        AdapterKind::Lora => Combination::ALL
            .iter()
            .map(|(_, n)| *n)
            .chain([KNOTS_TIES, KNOTS_DARE])
            .collect(),
        AdapterKind::Ia3 => IA3_COMBINATIONS.to_vec(),
    };
    Err(cfg_err(
        "combination_type",
        format!(
            "`{name}` does not apply to {kind} adapters; use one of {}",
            valid.join(", ")
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::lora_extract::{exact_key, is_embedding};
    use super::*;
    use crate::run::NoProgress;
    use amalgam_io::Ia3Config;

    #[test]
    fn adapter_merge_config_defaults_and_errors() {
        let c = AdapterMergeConfig::parse("adapters: [a, {path: b, weight: -0.5}]\n").unwrap();
        assert_eq!(c.combination_type, None);
        assert_eq!(
            c.adapters,
            vec![
                AdapterEntry {
                    path: "a".into(),
                    weight: 1.0,
                    statistics: None,
                },
                AdapterEntry {
                    path: "b".into(),
                    weight: -0.5,
                    statistics: None,
                }
            ]
        );
        assert_eq!(c.majority_sign_method, MajoritySignMethod::Total);
        assert_eq!(
            (c.svd_rank, c.svd_clamp, c.density, c.seed),
            (None, None, None, 0)
        );
        assert!(!c.union_modules && !c.allow_base_mismatch);
        let c = AdapterMergeConfig::parse(
            "combination_type: ties\ndensity: 0.3\nsvd_rank: 0\nmajority_sign_method: frequency\n\
             svd_full_matrices: false\nsign_mode: sum_of_signs\nadapters: [a]\n",
        )
        .unwrap();
        assert_eq!(c.svd_rank, None);
        assert_eq!(c.density, Some(0.3));
        assert_eq!(c.majority_sign_method, MajoritySignMethod::Frequency);
        assert_eq!(c.sign_mode, KnotsSignMode::SumOfSigns);
        for (text, key) in [
            ("adapters: [a]\ndensty: 0.5\n", "densty"),
            ("adapters: []\n", "adapters"),
            ("density: 0.5\n", "adapters"),
            ("adapters: [{path: a, wieght: 1}]\n", "adapters"),
            (
                "adapters: [a]\nmajority_sign_method: most\n",
                "majority_sign_method",
            ),
            ("adapters: [a]\nseed: -1\n", "seed"),
        ] {
            let e = AdapterMergeConfig::parse(text).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn adapter_merge_config_yaml_round_trip_and_partition() {
        let text = "combination_type: knots_dare\nadapters: [a, {path: b, weight: -0.3, \
                    statistics: s.st}]\ndensity: 0.1\nmajority_sign_method: frequency\n\
                    svd_rank: 7\nsvd_clamp: 0.99\nseed: 12\ntop_k: 33.3\nalpha: 0.1\n\
                    sign_mode: sum_of_signs\ndrop_rate: 0.2\nunion_modules: true\n\
                    allow_base_mismatch: true\n";
        let c = AdapterMergeConfig::parse(text).unwrap();
        assert_eq!(AdapterMergeConfig::parse(&c.to_yaml()).unwrap(), c);
        let d = AdapterMergeConfig::parse("adapters: [a]\n").unwrap();
        assert_eq!(AdapterMergeConfig::parse(&d.to_yaml()).unwrap(), d);
        let unit = |b: u64| AdapterUnit {
            name: String::new(),
            in_bytes: b,
            keys: Vec::new(),
        };
        let units: Vec<AdapterUnit> = [5, 5, 5, 20, 1, 1].into_iter().map(unit).collect();
        assert_eq!(partition(&units, 10), vec![0..2, 2..3, 3..4, 4..6]);
        assert_eq!(
            partition(&units, 1),
            (0..6).map(|u| u..u + 1).collect::<Vec<_>>()
        );
        assert_eq!(partition(&units, 1 << 30), vec![0..6]);
        assert!(partition(&[], 10).is_empty());
    }

    #[test]
    fn adapter_merge_union_targets_and_rank_keys() {
        let l = |v: &[&str]| TargetModules::List(v.iter().map(|s| s.to_string()).collect());
        let (a, b) = (l(&["q_proj", "v_proj"]), l(&["k_proj", "q_proj"]));
        assert_eq!(
            union_targets([&a, &b].into_iter(), &[]),
            l(&["k_proj", "q_proj", "v_proj"])
        );
        let (x, y) = (
            TargetModules::Regex(".*q".into()),
            TargetModules::Regex(".*v".into()),
        );
        assert_eq!(
            union_targets([&x, &y].into_iter(), &[]),
            TargetModules::Regex("(.*q)|(.*v)".into())
        );
        assert_eq!(
            union_targets([&x, &a].into_iter(), &["m.q".to_string()]),
            l(&["m.q"])
        );
        // An escaped key matches its module only (as PEFT's `(.*\.)?(key)$`).
        let mut c = LoraConfig::new(4, 4.0, l(&["q_proj"]));
        c.rank_pattern
            .insert(exact_key("model.layers.1.self_attn.q_proj"), 2);
        assert_eq!(c.rank_for("model.layers.1.self_attn.q_proj").unwrap(), 2);
        assert_eq!(c.rank_for("model.layers.11.self_attn.q_proj").unwrap(), 4);
        assert_eq!(c.rank_for("model.layers.1xself_attn.q_proj").unwrap(), 4);
        assert!(is_embedding("model.embed_tokens") && is_embedding("lm_head"));
        assert!(!is_embedding("model.layers.0.mlp.up_proj"));
    }

    fn write_ia3(dir: &Path, vecs: &[(&str, Vec<usize>, Vec<f32>)]) {
        let cfg = AdapterConfig::Ia3(Ia3Config::new(
            TargetModules::List(vec!["k_proj".into(), "down_proj".into()]),
            TargetModules::List(vec!["down_proj".into()]),
        ));
        let t: Vec<(String, Vec<usize>, &[f32])> = vecs
            .iter()
            .map(|(m, s, v)| (ia3_key(m), s.clone(), v.as_slice()))
            .collect();
        write_adapter(dir, &cfg, &t, false).unwrap();
    }

    fn read_vec(dir: &Path, m: &str) -> Vec<f64> {
        let a = Adapter::open(dir).unwrap();
        a.read(&ia3_key(m))
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    }

    /// (IA)³: `linear` is PEFT's raw weighted sum; `ties` runs on τ = l − 1 (naive f64 TIES
    /// here: top floor(density·n) |τ|, elected sign of the sum (>= 0 → +), mean of the agreeing
    /// weighted values) and writes 1 + merged, keeping each vector's stored shape.
    #[test]
    fn adapter_merge_ia3_linear_and_ties_match_naive() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let (k, down) = (
            "model.layers.0.self_attn.k_proj",
            "model.layers.0.mlp.down_proj",
        );
        let l1k = vec![1.2f32, 0.9, 1.05, 0.7];
        let l2k = vec![0.8f32, 1.3, 1.1, 0.95];
        let l1d = vec![1.5f32, 0.6, 1.0, 1.25, 0.85];
        let l2d = vec![0.7f32, 0.65, 1.4, 1.2, 1.1];
        write_ia3(
            &d.join("a"),
            &[
                (k, vec![4, 1], l1k.clone()),
                (down, vec![1, 5], l1d.clone()),
            ],
        );
        write_ia3(
            &d.join("b"),
            &[
                (k, vec![4, 1], l2k.clone()),
                (down, vec![1, 5], l2d.clone()),
            ],
        );
        let a = d.join("a").display().to_string();
        let b = d.join("b").display().to_string();
        let w = [0.6, 0.4];
        let yaml = |extra: &str| {
            format!("{extra}adapters:\n  - {{path: {a}, weight: 0.6}}\n  - {{path: {b}, weight: 0.4}}\n")
        };
        let cfg = AdapterMergeConfig::parse(&yaml("")).unwrap();
        let s = merge_adapters(&cfg, None, &d.join("lin"), false, &NoProgress).unwrap();
        assert_eq!(
            (s.kind, s.method.as_str(), s.modules),
            (AdapterKind::Ia3, "linear", 2)
        );
        for (m, v1, v2) in [(k, &l1k, &l2k), (down, &l1d, &l2d)] {
            let got = read_vec(&d.join("lin"), m);
            for j in 0..v1.len() {
                let want = w[0] * v1[j] as f64 + w[1] * v2[j] as f64;
                assert!((got[j] - want).abs() < 1e-6, "{m}[{j}]");
            }
        }
        let out = Adapter::open(&d.join("lin")).unwrap();
        let ff: Vec<bool> = out.ia3_modules().iter().map(|m| m.is_feedforward).collect();
        assert_eq!(ff, vec![false, true]);

        let cfg =
            AdapterMergeConfig::parse(&yaml("combination_type: ties\ndensity: 0.5\n")).unwrap();
        merge_adapters(&cfg, None, &d.join("ties"), false, &NoProgress).unwrap();
        for (m, v1, v2) in [(k, &l1k, &l2k), (down, &l1d, &l2d)] {
            let n = v1.len();
            let keep = (0.5 * n as f64) as usize;
            let prune = |v: &Vec<f32>| -> Vec<f64> {
                let t: Vec<f64> = v.iter().map(|&x| x as f64 - 1.0).collect();
                let mut idx: Vec<usize> = (0..n).collect();
                idx.sort_by(|&x, &y| t[y].abs().total_cmp(&t[x].abs()));
                let mut p = vec![0.0; n];
                for &j in &idx[..keep] {
                    p[j] = t[j];
                }
                p
            };
            let (p1, p2) = (prune(v1), prune(v2));
            let got = read_vec(&d.join("ties"), m);
            for j in 0..n {
                let g = if p1[j] + p2[j] >= 0.0 { 1.0 } else { -1.0 };
                let (mut s, mut c) = (0.0, 0);
                for (p, wi) in [(&p1, w[0]), (&p2, w[1])] {
                    if p[j] != 0.0 && p[j].signum() == g {
                        s += wi * p[j];
                        c += 1;
                    }
                }
                let want = 1.0 + s / c.max(1) as f64;
                assert!(
                    (got[j] - want).abs() < 1e-6,
                    "{m}[{j}]: {} vs {want}",
                    got[j]
                );
            }
        }
        // LoRA-only types and a missing density are refused by key.
        for (extra, key) in [
            ("combination_type: svd\n", "combination_type"),
            ("combination_type: dare_ties\n", "density"),
        ] {
            let cfg = AdapterMergeConfig::parse(&yaml(extra)).unwrap();
            let e = merge_adapters(&cfg, None, &d.join("x"), false, &NoProgress)
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{e}");
        }
    }

    /// Solve the small dense system `a x = b` (n × n) by Gaussian elimination with partial
    /// pivoting, in f64.
    fn dense_solve(mut a: Vec<f64>, mut b: Vec<f64>, n: usize) -> Vec<f64> {
        for c in 0..n {
            let p = (c..n)
                .max_by(|&x, &y| a[x * n + c].abs().total_cmp(&a[y * n + c].abs()))
                .unwrap();
            for k in 0..n {
                a.swap(c * n + k, p * n + k);
            }
            b.swap(c, p);
            for r in c + 1..n {
                let f = a[r * n + c] / a[c * n + c];
                for k in c..n {
                    a[r * n + k] -= f * a[c * n + k];
                }
                b[r] -= f * b[c];
            }
        }
        let mut x = vec![0.0; n];
        for r in (0..n).rev() {
            let s: f64 = (r + 1..n).map(|k| a[r * n + k] * x[k]).sum();
            x[r] = (b[r] - s) / a[r * n + r];
        }
        x
    }

    /// (IA)³ `fisher`: Σ w_i F_i l_i / Σ w_i F_i per entry; `mats`: (Σ F_i) l = Σ F_i l_i with
    /// each adapter's blockwise Fisher, against a dense f64 solve. Statistics files are written
    /// here for each adapter; a missing one is refused naming the adapter.
    /// An adapter's (IA)³ vectors: module, stored shape, values.
    type Ia3Vecs<'a> = Vec<(&'a str, Vec<usize>, Vec<f32>)>;

    #[test]
    #[allow(clippy::needless_range_loop)]
    fn adapter_merge_ia3_fisher_and_mats_match_naive() {
        use amalgam_io::{write_stats, StatKey, StatsMeta};
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let (k, down) = (
            "model.layers.0.self_attn.k_proj",
            "model.layers.0.mlp.down_proj",
        );
        let ls: [Ia3Vecs; 2] = [
            vec![
                (k, vec![4, 1], vec![1.2, 0.9, 1.05, 0.7]),
                (down, vec![1, 5], vec![1.5, 0.6, 1.0, 1.25, 0.85]),
            ],
            vec![
                (k, vec![4, 1], vec![0.8, 1.3, 1.1, 0.95]),
                (down, vec![1, 5], vec![0.7, 0.65, 1.4, 1.2, 1.1]),
            ],
        ];
        // Diagonal Fishers and SPD blocks (B Bᵀ + I), different per adapter.
        let diag = |i: usize, j: usize| 0.2 + ((i * 7 + j * 3) % 5) as f32 * 0.4;
        let block = |i: usize, n: usize| -> Vec<f32> {
            let b: Vec<f64> = (0..n * n)
                .map(|t| ((t * (i + 2) * 37 % 11) as f64 - 5.0) / 7.0)
                .collect();
            let mut a = vec![0.0f32; n * n];
            for r in 0..n {
                for c in 0..n {
                    let v: f64 = (0..n).map(|t| b[r * n + t] * b[c * n + t]).sum();
                    a[r * n + c] = (v + if r == c { 1.0 } else { 0.0 }) as f32;
                }
            }
            a
        };
        for (i, vecs) in ls.iter().enumerate() {
            let dir = d.join(format!("a{i}"));
            write_ia3(&dir, vecs);
            let ad = Adapter::open(&dir).unwrap();
            let mut owned: Vec<(StatKey, Vec<f32>)> = Vec::new();
            for (m, shape, v) in vecs {
                let f: Vec<f32> = (0..v.len()).map(|j| diag(i, j)).collect();
                owned.push((StatKey::new(ia3_key(m), StatKind::Fisher, shape.clone()), f));
                let n = v.len();
                owned.push((
                    StatKey::new(ia3_key(m), StatKind::FisherBlock, vec![n, n]),
                    block(i, n),
                ));
            }
            let entries: Vec<(StatKey, &[f32])> = owned
                .iter()
                .map(|(k, v)| (k.clone(), v.as_slice()))
                .collect();
            let meta = StatsMeta::new("synthetic", 10, 100).for_model(ad.checkpoint());
            write_stats(&d.join(format!("s{i}.safetensors")), &meta, &entries, true).unwrap();
        }
        let w = [0.6, 0.4];
        let yaml = |ty: &str, stats: bool| {
            let st = |i: usize| {
                if stats {
                    format!(
                        ", statistics: {}",
                        d.join(format!("s{i}.safetensors")).display()
                    )
                } else {
                    String::new()
                }
            };
            format!(
                "combination_type: {ty}\nadapters:\n  - {{path: {}, weight: 0.6{}}}\n  - {{path: {}, weight: 0.4{}}}\n",
                d.join("a0").display(),
                st(0),
                d.join("a1").display(),
                st(1)
            )
        };
        let cfg = AdapterMergeConfig::parse(&yaml("fisher", true)).unwrap();
        merge_adapters(&cfg, None, &d.join("fisher"), false, &NoProgress).unwrap();
        for (mi, m) in [k, down].iter().enumerate() {
            let got = read_vec(&d.join("fisher"), m);
            for j in 0..got.len() {
                let (mut num, mut den) = (0.0, 0.0);
                for i in 0..2 {
                    let f = f64::from(diag(i, j));
                    num += w[i] * f * f64::from(ls[i][mi].2[j]);
                    den += w[i] * f;
                }
                assert!((got[j] - num / den).abs() < 1e-6, "fisher {m}[{j}]");
            }
        }
        let cfg = AdapterMergeConfig::parse(&yaml("mats", true)).unwrap();
        merge_adapters(&cfg, None, &d.join("mats"), false, &NoProgress).unwrap();
        for (mi, m) in [k, down].iter().enumerate() {
            let got = read_vec(&d.join("mats"), m);
            let n = got.len();
            let mut a = vec![0.0f64; n * n];
            let mut b = vec![0.0f64; n];
            for i in 0..2 {
                let f = block(i, n);
                for r in 0..n {
                    for c in 0..n {
                        a[r * n + c] += f64::from(f[r * n + c]);
                        b[r] += f64::from(f[r * n + c]) * f64::from(ls[i][mi].2[c]);
                    }
                }
            }
            let want = dense_solve(a, b, n);
            for j in 0..n {
                assert!(
                    (got[j] - want[j]).abs() < 1e-4 * want[j].abs().max(1.0),
                    "mats {m}[{j}]: {} vs {}",
                    got[j],
                    want[j]
                );
            }
        }
        let cfg = AdapterMergeConfig::parse(&yaml("fisher", false)).unwrap();
        let e = merge_adapters(&cfg, None, &d.join("none"), false, &NoProgress)
            .unwrap_err()
            .to_string();
        assert!(e.contains("a0") && e.contains("statistics"), "{e}");
        assert!(!d.join("none").exists());
    }
}
