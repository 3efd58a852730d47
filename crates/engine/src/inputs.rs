//! Resolving model paths and opening every input checkpoint.

use crate::error::EngineError;
use amalgam_core::config::{MergeConfig, ModelRef};
use amalgam_core::plan::{referenced_models, InputModel, InputTensor};
use amalgam_io::{Checkpoint, StatsFile};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Every input of a merge, opened and validated.
#[derive(Debug, Default)]
pub struct Inputs {
    /// Open checkpoints by reference.
    pub checkpoints: BTreeMap<ModelRef, Arc<Checkpoint>>,
    /// Tensor lists by reference, for the planner.
    pub models: BTreeMap<ModelRef, InputModel>,
    /// Row map for vocabulary-axis tensors, when `tokenizer_source` re-indexes them.
    pub vocab: Option<crate::vocab::VocabMap>,
    /// Statistics files by model (the config's per-model `statistics:`), validated against
    /// their model.
    pub stats: BTreeMap<ModelRef, Arc<StatsFile>>,
    /// Adapters applied on the fly (`model+adapter` references).
    pub adapters: BTreeMap<ModelRef, Arc<crate::adapter::AdapterDelta>>,
    /// Extra checkpoints a method parameter names (MaTS's `init: PATH`), by the path as
    /// written in the config; served to methods through
    /// [`amalgam_core::tensor::TensorReader::read_extra`].
    pub extra: BTreeMap<String, Arc<Checkpoint>>,
}

/// Find a model on disk: as written (relative to the working directory, as mergekit does), else
/// relative to the config file's directory.
pub fn resolve_model_path(path: &str, config_dir: Option<&Path>) -> Result<PathBuf, EngineError> {
    let p = PathBuf::from(path);
    if p.exists() {
        return Ok(p);
    }
    if let Some(dir) = config_dir {
        let q = dir.join(&p);
        if q.exists() {
            return Ok(q);
        }
    }
    let message = if amalgam_core::config::parse::looks_like_hub_name(path) {
        "not found on disk, and it looks like a Hugging Face hub name: amalgam reads local \
         checkpoints only. Download it first (e.g. `huggingface-cli download NAME --local-dir DIR`) \
         and give the directory"
            .to_string()
    } else {
        "no such file or directory (paths are relative to the working directory, then to the \
         config file's directory)"
            .to_string()
    };
    Err(EngineError::Model {
        model: path.into(),
        message,
    })
}

/// Summarise a checkpoint's tensors for the planner.
pub fn input_model(display: String, ckpt: &Checkpoint) -> InputModel {
    InputModel {
        display,
        tensors: ckpt
            .tensors()
            .iter()
            .map(|t| InputTensor {
                name: t.name.clone(),
                shape: t.shape.clone(),
                dtype: t.dtype.as_str().to_string(),
                mergeable: t.dtype.is_mergeable(),
            })
            .collect(),
    }
}

/// Every path the config makes [`open_inputs`] read, resolved as it resolves them but opened by
/// nothing: model checkpoints (files or directories), adapters, statistics files. A worker
/// restricted to some directories checks these before opening any header.
pub fn referenced_paths(
    config: &MergeConfig,
    config_dir: Option<&Path>,
) -> Result<Vec<PathBuf>, EngineError> {
    let mut out = Vec::new();
    for m in referenced_models(config) {
        out.push(resolve_model_path(&m.path, config_dir)?);
        if let Some(adapter) = &m.adapter {
            out.push(resolve_model_path(adapter, config_dir)?);
        }
    }
    for path in config.statistics.values() {
        out.push(resolve_model_path(path, config_dir)?);
    }
    for path in amalgam_core::methods::mats::init_checkpoint_paths(config) {
        out.push(resolve_extra_path(&path, config_dir)?);
    }
    Ok(out)
}

/// Refuses an output directory that holds an input of the merge (a model directory, the
/// directory of a model, adapter or statistics file): the writer replaces the checkpoint files
/// it finds there (with `--overwrite`), which would destroy the input.
pub fn check_output_dir(
    config: &MergeConfig,
    config_dir: Option<&Path>,
    out_dir: &Path,
) -> Result<(), EngineError> {
    refuse_output_holding(out_dir, referenced_paths(config, config_dir)?)
}

/// Refuses `out_dir` when it is one of `inputs` (directories) or the directory of one (files).
pub fn refuse_output_holding(
    out_dir: &Path,
    inputs: impl IntoIterator<Item = PathBuf>,
) -> Result<(), EngineError> {
    let Ok(out) = std::fs::canonicalize(out_dir) else {
        return Ok(()); // not there yet: it holds nothing
    };
    for input in inputs {
        let dir = if input.is_dir() {
            Some(input.clone())
        } else {
            input.parent().map(|p| match p.as_os_str().is_empty() {
                true => PathBuf::from("."),
                false => p.to_path_buf(),
            })
        };
        if dir.and_then(|d| std::fs::canonicalize(d).ok()).as_ref() == Some(&out) {
            return Err(EngineError::OutputHoldsInput {
                dir: out_dir.to_path_buf(),
                input,
            });
        }
    }
    Ok(())
}

/// Resolve an extra checkpoint path (MaTS's `init`), with an error naming the key.
fn resolve_extra_path(path: &str, config_dir: Option<&Path>) -> Result<PathBuf, EngineError> {
    resolve_model_path(path, config_dir).map_err(|_| EngineError::Config {
        key: "init".into(),
        message: format!(
            "`{path}` is neither a named initialisation ({}) nor an existing checkpoint (a \
             .safetensors file or a checkpoint directory, relative to the working directory, \
             then to the config file's directory)",
            amalgam_core::methods::mats::NAMED_INITS.join(", ")
        ),
    })
}

/// Check, before any work, every extra checkpoint a planned tensor reads (MaTS's `init:
/// PATH`): the tensor exists there with the planned shape and holds finite values. Errors
/// name the key, the file and the tensor.
pub fn check_extra_inputs(
    plan: &amalgam_core::plan::Plan,
    inputs: &Inputs,
) -> Result<(), EngineError> {
    for t in plan.tensors.iter().filter(|t| !t.copy_raw) {
        if t.method != amalgam_core::methods::mats::INFO.name {
            continue;
        }
        let Some(init) = t.params.opt_str("init")? else {
            continue;
        };
        let Some(path) = amalgam_core::methods::mats::init_checkpoint(&init) else {
            continue;
        };
        let err = |message: String| EngineError::Config {
            key: "init".into(),
            message: format!("init checkpoint `{path}`: {message}"),
        };
        let ckpt = inputs
            .extra
            .get(path)
            .ok_or_else(|| err("was not opened".into()))?;
        let meta = ckpt.get(&t.name).ok_or_else(|| {
            err(format!(
                "has no tensor \"{}\" (every tensor MaTS solves needs its starting value)",
                t.name
            ))
        })?;
        if meta.shape != t.shape {
            return Err(err(format!(
                "tensor \"{}\" has shape {:?}, the merge needs {:?}",
                t.name, meta.shape, t.shape
            )));
        }
        let file = meta.file.display().to_string();
        let numel: usize = t.shape.iter().product();
        let step = 1usize << 20;
        let mut buf = Vec::new();
        let mut start = 0;
        while start < numel {
            let end = (start + step).min(numel);
            buf.resize(end - start, 0.0f32);
            ckpt.read_f32(&t.name, start..end, &mut buf)?;
            if let Some(k) = buf.iter().position(|v| !v.is_finite()) {
                return Err(err(format!(
                    "{file}: tensor \"{}\" holds a non-finite value ({}) at element {}",
                    t.name,
                    buf[k],
                    start + k
                )));
            }
            start = end;
        }
    }
    Ok(())
}

/// Open every model the config references.
pub fn open_inputs(config: &MergeConfig, config_dir: Option<&Path>) -> Result<Inputs, EngineError> {
    let mut inputs = Inputs::default();
    for m in referenced_models(config) {
        let path = resolve_model_path(&m.path, config_dir)?;
        let ckpt = Checkpoint::open(&path)?;
        if let Some(adapter) = &m.adapter {
            let apath = resolve_model_path(adapter, config_dir)?;
            let delta = crate::adapter::AdapterDelta::load(&apath, &ckpt)?;
            inputs.adapters.insert(m.clone(), Arc::new(delta));
        }
        inputs
            .models
            .insert(m.clone(), input_model(m.to_string(), &ckpt));
        inputs.checkpoints.insert(m, Arc::new(ckpt));
    }
    for (m, path) in &config.statistics {
        let p = resolve_model_path(path, config_dir).map_err(|_| EngineError::Model {
            model: m.to_string(),
            message: format!("statistics file `{path}` not found"),
        })?;
        let stats = StatsFile::open(&p)?;
        if let Some(ck) = inputs.checkpoints.get(m) {
            stats.check_model(ck)?;
        }
        inputs.stats.insert(m.clone(), Arc::new(stats));
    }
    for path in amalgam_core::methods::mats::init_checkpoint_paths(config) {
        let p = resolve_extra_path(&path, config_dir)?;
        let ckpt = Checkpoint::open(&p)?;
        inputs.extra.insert(path, Arc::new(ckpt));
    }
    Ok(inputs)
}

/// Open the inputs, re-index vocabularies when `tokenizer_source` asks for it, and plan.
pub fn open_and_plan(
    config: &MergeConfig,
    config_dir: Option<&Path>,
) -> Result<(Inputs, amalgam_core::plan::Plan), EngineError> {
    plan_inputs(config, open_inputs(config, config_dir)?)
}

/// [`open_and_plan`] with the inputs already opened (by [`open_inputs`], or by a cluster worker
/// that maps some of them elsewhere): vocabularies re-indexed, the plan, the extra inputs
/// checked.
pub fn plan_inputs(
    config: &MergeConfig,
    mut inputs: Inputs,
) -> Result<(Inputs, amalgam_core::plan::Plan), EngineError> {
    let vocabs = crate::vocab::prepare_vocabularies(config, &mut inputs)?;
    let plan = amalgam_core::plan::plan(config, &inputs.models)?;
    check_extra_inputs(&plan, &inputs)?;
    if let Some(v) = vocabs {
        let ckpts = &inputs.checkpoints;
        let rows_of = |m: &ModelRef| -> usize {
            ckpts
                .get(m)
                .and_then(|c| {
                    c.tensors()
                        .iter()
                        .find(|t| crate::vocab::is_vocab_tensor(&t.name, &t.shape))
                        .map(|t| t.shape[0])
                })
                .unwrap_or(0)
        };
        inputs.vocab = Some(crate::vocab::build_vocab_map(config, &plan, &v, &rows_of)?);
    }
    Ok((inputs, plan))
}
