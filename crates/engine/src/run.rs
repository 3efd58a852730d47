//! Executing a plan on one machine.
//!
//! Order of work: (1) every model-global pass of the method over all tensors, summed in plan
//! order; (2) every output tensor in plan order, each streamed block by block from the
//! memory-mapped inputs through the method into the [`CheckpointWriter`]; (3) the checkpoint is
//! finished (temporary files renamed, index written last); (4) config, tokenizer files and the
//! model card are copied or written. A failure at any step leaves no final-named output file
//! from this run.

use crate::adapter::AdapterDelta;
use crate::budget;
use crate::card;
use crate::device::Preloaded;
use crate::error::EngineError;
use crate::inputs::Inputs;
use crate::reader::PlanReader;
use crate::vocab::VocabMap;
use amalgam_core::config::{MergeConfig, TokenizerSource};
use amalgam_core::methods::{self, GlobalStats, MergeMethod};
use amalgam_core::plan::{Plan, TensorPlan};
use amalgam_core::tensor::{LogRecord, TensorJob, TensorWriter};
use amalgam_core::MergeError;
use amalgam_io::{Checkpoint, CheckpointWriter, DType, OutputLayout, OutputTensor, StatsFile};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What the readers need besides the checkpoints: the vocabulary map (`tokenizer_source`) and
/// each plan model's statistics file.
#[derive(Debug, Default)]
pub struct ReadExtras<'a> {
    /// Row map of vocabulary-axis tensors.
    pub vocab: Option<&'a VocabMap>,
    /// Statistics file of each plan model (plan order), if given.
    pub stats: Vec<Option<&'a StatsFile>>,
    /// Adapter of each plan model (plan order), for `model+adapter` references.
    pub adapters: Vec<Option<&'a AdapterDelta>>,
    /// Extra checkpoints by the path written in the config (MaTS's `init: PATH`).
    pub extra: std::collections::BTreeMap<String, &'a Checkpoint>,
}

impl<'a> ReadExtras<'a> {
    /// The reader of one planned tensor, with every extra applied.
    pub fn reader(
        &'a self,
        t: &'a TensorPlan,
        ckpts: &'a [&'a Checkpoint],
        allow_nonfinite: bool,
    ) -> PlanReader<'a> {
        PlanReader::new(t, ckpts, allow_nonfinite)
            .with_vocab(self.vocab)
            .with_stats(&self.stats)
            .with_adapters(&self.adapters)
            .with_extra(&self.extra)
    }
}

/// File name of the per-block solver log written beside the merged checkpoint.
pub const SOLVER_LOG: &str = "solver_log.jsonl";

/// Options of one run.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// Output directory.
    pub out_dir: PathBuf,
    /// Peak private memory target, bytes.
    pub memory_budget: u64,
    /// Maximum bytes per output file.
    pub out_shard_size: u64,
    /// Replace an existing checkpoint in `out_dir`.
    pub overwrite: bool,
    /// Accept NaN / Inf in inputs.
    pub allow_nonfinite: bool,
    /// Where tensors are merged.
    pub device: crate::device::Device,
}

/// Progress reporting (the CLI draws a bar; tests pass [`NoProgress`]).
pub trait Progress: Sync {
    /// Work is starting: `total` input bytes over `tensors` tensors, in `phase`.
    fn begin(&self, phase: &str, total: u64, tensors: usize);
    /// One tensor is done (`bytes` of inputs consumed).
    fn advance(&self, tensor: &str, bytes: u64);
    /// The phase is finished.
    fn end(&self);
}

/// A [`Progress`] that reports nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn begin(&self, _: &str, _: u64, _: usize) {}
    fn advance(&self, _: &str, _: u64) {}
    fn end(&self) {}
}

/// What a finished run wrote.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Output checkpoint files, in order.
    pub files: Vec<PathBuf>,
    /// Auxiliary files copied or written.
    pub aux_files: Vec<PathBuf>,
    /// Sum of tensor bytes written.
    pub total_bytes: u64,
    /// Sum of input tensor bytes read (once per pass counted once).
    pub input_bytes: u64,
    /// Wall time of the global passes.
    pub global_time: Duration,
    /// Wall time of the merge phase.
    pub merge_time: Duration,
}

/// Output dtype of a tensor: `out_dtype`, else `dtype`, else the input's.
pub fn output_dtype(config: &MergeConfig, t: &TensorPlan) -> Result<DType, EngineError> {
    let input = DType::parse(&t.input_dtype);
    if t.copy_raw {
        return Ok(input);
    }
    for (key, v) in [("out_dtype", &config.out_dtype), ("dtype", &config.dtype)] {
        if let Some(name) = v {
            return DType::from_config_name(name).ok_or_else(|| EngineError::Config {
                key: key.into(),
                message: format!("unknown dtype `{name}`; use float32, float16 or bfloat16"),
            });
        }
    }
    Ok(input)
}

/// The output layout of a plan.
pub fn output_layout(
    config: &MergeConfig,
    plan: &Plan,
    shard: u64,
) -> Result<OutputLayout, EngineError> {
    let tensors = plan
        .tensors
        .iter()
        .map(|t| {
            Ok(OutputTensor {
                name: t.name.clone(),
                dtype: output_dtype(config, t)?,
                shape: t.shape.clone(),
            })
        })
        .collect::<Result<Vec<_>, EngineError>>()?;
    Ok(OutputLayout::plan(tensors, shard))
}

/// Build the method of one planned tensor.
pub fn build_method(t: &TensorPlan) -> Result<Box<dyn MergeMethod>, MergeError> {
    methods::build(&t.method, &t.params, t.models.len(), t.base.is_some())
}

/// The job description of one planned tensor under a memory budget.
pub fn job_for(t: &TensorPlan, method: &dyn MergeMethod, seed: u64, budget: u64) -> TensorJob {
    TensorJob {
        name: t.name.clone(),
        shape: t.shape.clone(),
        n_models: t.models.len(),
        has_base: t.base.is_some(),
        block_elems: budget::block_elems(method, t.models.len(), budget),
        seed,
    }
}

fn input_bytes(t: &TensorPlan, ckpts: &[&Checkpoint]) -> u64 {
    t.base
        .iter()
        .chain(&t.models)
        .filter_map(|s| ckpts[s.model].get(&s.tensor))
        .map(|m| m.data_range.len() as u64)
        .sum()
}

/// Where merged tensors go, in layout order: the checkpoint being written
/// ([`CheckpointWriter`]), or one shard's bytes on a cluster worker ([`crate::shard`]).
pub trait TensorOut {
    /// Start tensor `name` (the previous one must be complete).
    fn begin_tensor(&mut self, name: &str) -> Result<(), EngineError>;
    /// Append values, converted to the tensor's output dtype.
    fn write_f32(&mut self, data: &[f32]) -> Result<(), EngineError>;
    /// Append bytes already in the tensor's output dtype.
    fn write_raw(&mut self, bytes: &[u8]) -> Result<(), EngineError>;
    /// The current tensor's output dtype when it is F32, F16 or BF16 and the writer takes
    /// bytes in it (a device may then encode on its side), else `None`.
    fn raw_dtype(&self) -> Option<amalgam_core::raw::RawDtype> {
        None
    }
}

impl TensorOut for CheckpointWriter {
    fn begin_tensor(&mut self, name: &str) -> Result<(), EngineError> {
        Ok(CheckpointWriter::begin_tensor(self, name)?)
    }
    fn write_f32(&mut self, data: &[f32]) -> Result<(), EngineError> {
        Ok(CheckpointWriter::write_f32(self, data)?)
    }
    fn write_raw(&mut self, bytes: &[u8]) -> Result<(), EngineError> {
        Ok(CheckpointWriter::write_raw(self, bytes)?)
    }
    fn raw_dtype(&self) -> Option<amalgam_core::raw::RawDtype> {
        self.current_dtype()?.raw()
    }
}

struct WriterAdapter<'a> {
    writer: &'a mut dyn TensorOut,
    next: usize,
    logs: Vec<LogRecord>,
}

impl TensorWriter for WriterAdapter<'_> {
    fn write(&mut self, range: Range<usize>, data: &[f32]) -> Result<(), MergeError> {
        if range.start != self.next || range.len() != data.len() {
            return Err(MergeError::Write(format!(
                "internal error: out-of-order write at {} (expected {})",
                range.start, self.next
            )));
        }
        self.next = range.end;
        self.writer.write_f32(data).map_err(|e| match e {
            EngineError::Merge(m) => m,
            other => MergeError::Write(other.to_string()),
        })
    }

    fn log(&mut self, record: LogRecord) {
        self.logs.push(record);
    }
}

/// Checkpoints of the plan's models, in plan order.
pub fn plan_checkpoints<'a>(
    plan: &Plan,
    inputs: &'a Inputs,
) -> Result<Vec<&'a Checkpoint>, EngineError> {
    plan.models
        .iter()
        .map(|m| {
            inputs
                .checkpoints
                .get(m)
                .map(|c| c.as_ref())
                .ok_or_else(|| EngineError::Model {
                    model: m.to_string(),
                    message: "was not opened".into(),
                })
        })
        .collect()
}

/// Run every model-global pass of the plan's method; returns the summed statistics.
pub fn global_passes(
    plan: &Plan,
    ckpts: &[&Checkpoint],
    opts: &MergeOptions,
    extras: &ReadExtras<'_>,
    progress: &dyn Progress,
) -> Result<Vec<GlobalStats>, EngineError> {
    let passes = global_pass_count(plan)?;
    let mut done: Vec<GlobalStats> = Vec::new();
    for pass in 0..passes {
        let total: u64 = plan.tensors.iter().map(|t| input_bytes(t, ckpts)).sum();
        progress.begin(
            &format!("global pass {}/{passes}", pass + 1),
            total,
            plan.tensors.len(),
        );
        let mut acc = GlobalStats::default();
        for t in plan.tensors.iter().filter(|t| !t.copy_raw) {
            let stats = global_pass_tensor(t, pass, &done, plan.seed, ckpts, opts, extras)?;
            acc.accumulate(&stats);
            progress.advance(&t.name, input_bytes(t, ckpts));
        }
        progress.end();
        done.push(acc);
    }
    Ok(done)
}

/// How many model-global passes the plan needs (the most any of its methods asks for).
pub fn global_pass_count(plan: &Plan) -> Result<usize, EngineError> {
    plan.tensors
        .iter()
        .filter(|t| !t.copy_raw)
        .map(|t| build_method(t).map(|m| m.global_passes()))
        .try_fold(0usize, |acc, p| p.map(|p| acc.max(p)))
        .map_err(EngineError::from)
}

/// Tensor `t`'s part of global pass `pass`, given the results of the passes before it
/// (`done`); [`global_passes`] adds these over the plan's tensors in plan order. A copied
/// tensor contributes nothing.
pub fn global_pass_tensor(
    t: &TensorPlan,
    pass: usize,
    done: &[GlobalStats],
    seed: u64,
    ckpts: &[&Checkpoint],
    opts: &MergeOptions,
    extras: &ReadExtras<'_>,
) -> Result<GlobalStats, EngineError> {
    if t.copy_raw {
        return Ok(GlobalStats::default());
    }
    let method = build_method(t)?;
    let job = job_for(t, method.as_ref(), seed, opts.memory_budget);
    let reader = extras.reader(t, ckpts, opts.allow_nonfinite);
    Ok(method.global_pass(pass, done, &job, &reader)?)
}

/// Merge one planned tensor into the writer (which must be positioned at it).
pub fn merge_tensor(
    t: &TensorPlan,
    seed: u64,
    global: &[GlobalStats],
    ckpts: &[&Checkpoint],
    opts: &MergeOptions,
    extras: &ReadExtras<'_>,
    writer: &mut dyn TensorOut,
) -> Result<Vec<LogRecord>, EngineError> {
    merge_tensor_preloaded(t, seed, global, ckpts, opts, extras, writer, None)
}

/// Load tensor `t`'s inputs onto the accelerator of `opts` ahead of its merge (see
/// [`crate::device::Accelerator::preload`]); `None` when there is nothing to load.
pub fn preload_tensor(
    t: &TensorPlan,
    seed: u64,
    ckpts: &[&Checkpoint],
    opts: &MergeOptions,
    extras: &ReadExtras<'_>,
) -> Option<Result<Preloaded, EngineError>> {
    let crate::device::Device::Accelerator(dev) = &opts.device else {
        return None;
    };
    if t.copy_raw {
        return None;
    }
    let method = build_method(t).ok()?;
    let plan = method.device_plan()?;
    let job = job_for(t, method.as_ref(), seed, opts.memory_budget);
    let reader = extras.reader(t, ckpts, opts.allow_nonfinite);
    dev.preload(&plan, &job, &reader).transpose()
}

/// [`merge_tensor`] with the tensor's inputs possibly preloaded by [`preload_tensor`] (an error
/// of the preload is this tensor's error).
#[allow(clippy::too_many_arguments)]
pub fn merge_tensor_preloaded(
    t: &TensorPlan,
    seed: u64,
    global: &[GlobalStats],
    ckpts: &[&Checkpoint],
    opts: &MergeOptions,
    extras: &ReadExtras<'_>,
    writer: &mut dyn TensorOut,
    preloaded: Option<Result<Preloaded, EngineError>>,
) -> Result<Vec<LogRecord>, EngineError> {
    let preloaded = preloaded.transpose()?;
    writer.begin_tensor(&t.name)?;
    if t.copy_raw {
        let src = t
            .base
            .as_ref()
            .or(t.models.first())
            .ok_or_else(|| EngineError::Config {
                key: "models".into(),
                message: format!("tensor \"{}\" has no input", t.name),
            })?;
        writer.write_raw(ckpts[src.model].raw(&src.tensor)?)?;
        return Ok(Vec::new());
    }
    let method = build_method(t)?;
    let job = job_for(t, method.as_ref(), seed, opts.memory_budget);
    let mut reader = extras.reader(t, ckpts, opts.allow_nonfinite);
    // Inputs were checked finite: a value that is not finite in the output is refused.
    let mut checked;
    let writer: &mut dyn TensorOut = if opts.allow_nonfinite {
        writer
    } else {
        checked = crate::finite::FiniteOut::new(writer, &t.name);
        &mut checked
    };
    if let crate::device::Device::Accelerator(dev) = &opts.device {
        reader = reader.with_device_solver(dev.device_solver());
        if let Some(plan) = method.device_plan_global(global) {
            if dev.merge(&plan, &job, &reader, writer, preloaded)? {
                return Ok(Vec::new());
            }
        }
    }
    let mut adapter = WriterAdapter {
        writer,
        next: 0,
        logs: Vec::new(),
    };
    method.merge(&job, global, &reader, &mut adapter)?;
    if adapter.next != job.numel() {
        return Err(MergeError::Write(format!(
            "internal error: method `{}` wrote {} of {} elements of \"{}\"",
            t.method,
            adapter.next,
            job.numel(),
            t.name
        ))
        .into());
    }
    for r in adapter.logs.iter_mut() {
        r.insert("method".into(), t.method.clone().into());
        r.entry("tensor")
            .or_insert_with(|| serde_json::Value::from(t.name.clone()));
    }
    Ok(adapter.logs)
}

/// Refuse, before any work, a plan with a tensor whose method must hold more than the budget.
pub fn check_whole_tensor_needs(plan: &Plan, budget_bytes: u64) -> Result<(), EngineError> {
    for t in plan.tensors.iter().filter(|t| !t.copy_raw) {
        let method = build_method(t)?;
        let job = job_for(t, method.as_ref(), plan.seed, budget_bytes);
        if let Some(whole) = method.whole_tensor_bytes(&job) {
            let need = whole + budget::FIXED_OVERHEAD;
            if need > budget_bytes {
                return Err(EngineError::Budget {
                    budget: budget_bytes,
                    message: format!(
                        "`{}` must hold tensor \"{}\" {:?} whole, about {} MiB; raise --memory-budget",
                        t.method,
                        t.name,
                        t.shape,
                        need.div_ceil(1 << 20)
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Run a whole plan into `opts.out_dir`.
pub fn execute(
    config: &MergeConfig,
    plan: &Plan,
    inputs: &Inputs,
    config_dir: Option<&Path>,
    opts: &MergeOptions,
    progress: &dyn Progress,
) -> Result<RunSummary, EngineError> {
    if opts.memory_budget < budget::MIN_BUDGET {
        return Err(EngineError::Budget {
            budget: opts.memory_budget,
            message: format!("the minimum is {} MiB", budget::MIN_BUDGET >> 20),
        });
    }
    crate::inputs::check_output_dir(config, config_dir, &opts.out_dir)?;
    let ckpts = plan_checkpoints(plan, inputs)?;
    resolve_chat_template(config, inputs)?;
    check_whole_tensor_needs(plan, opts.memory_budget)?;
    let extras = read_extras(plan, inputs);
    let layout = output_layout(config, plan, opts.out_shard_size)?;
    let mut writer = CheckpointWriter::create(&opts.out_dir, layout, opts.overwrite)?;

    let t0 = Instant::now();
    let global = global_passes(plan, &ckpts, opts, &extras, progress)?;
    let global_time = t0.elapsed();

    let t1 = Instant::now();
    let total: u64 = plan.tensors.iter().map(|t| input_bytes(t, &ckpts)).sum();
    progress.begin("merging", total, plan.tensors.len());
    let mut logs = Vec::new();
    // On an accelerator, the next tensor's inputs load on a helper thread while this one
    // merges and is written (`preload_tensor` loads nothing on the CPU: no thread then).
    let ahead = !matches!(opts.device, crate::device::Device::Cpu);
    std::thread::scope(|scope| -> Result<(), EngineError> {
        let (ckpts, extras) = (&ckpts, &extras);
        let preload = |t: &'_ TensorPlan| preload_tensor(t, plan.seed, ckpts, opts, extras);
        let spawn = |k: usize| {
            plan.tensors
                .get(k)
                .filter(|_| ahead)
                .map(|t| scope.spawn(move || preload(t)))
        };
        let mut next = spawn(0);
        for (k, t) in plan.tensors.iter().enumerate() {
            let mine = next.take().map(|h| match h.join() {
                Ok(r) => r,
                Err(p) => std::panic::resume_unwind(p),
            });
            next = spawn(k + 1);
            logs.extend(merge_tensor_preloaded(
                t,
                plan.seed,
                &global,
                ckpts,
                opts,
                extras,
                &mut writer,
                mine.flatten(),
            )?);
            progress.advance(&t.name, input_bytes(t, ckpts));
        }
        Ok(())
    })?;
    progress.end();
    let (files, total_bytes, aux_files) = finish_outputs(
        config,
        plan,
        inputs,
        config_dir,
        &opts.out_dir,
        writer,
        &logs,
    )?;
    Ok(RunSummary {
        files,
        aux_files,
        total_bytes,
        input_bytes: total,
        global_time,
        merge_time: t1.elapsed(),
    })
}

/// The readers' extras of a plan: vocabulary map, statistics files and adapters.
pub fn read_extras<'a>(plan: &Plan, inputs: &'a Inputs) -> ReadExtras<'a> {
    ReadExtras {
        vocab: inputs.vocab.as_ref(),
        stats: plan
            .models
            .iter()
            .map(|m| inputs.stats.get(m).map(|s| s.as_ref()))
            .collect(),
        adapters: plan
            .models
            .iter()
            .map(|m| inputs.adapters.get(m).map(|a| a.as_ref()))
            .collect(),
        extra: inputs
            .extra
            .iter()
            .map(|(k, c)| (k.clone(), c.as_ref()))
            .collect(),
    }
}

/// Finish a checkpoint whose tensors are all written: rename its files into place (index
/// last), then copy or write config, tokenizer files, model card and the solver log (`logs`,
/// when not empty). Returns the checkpoint files, their tensor bytes and the auxiliary files.
pub fn finish_outputs(
    config: &MergeConfig,
    plan: &Plan,
    inputs: &Inputs,
    config_dir: Option<&Path>,
    out_dir: &Path,
    writer: CheckpointWriter,
    logs: &[LogRecord],
) -> Result<(Vec<PathBuf>, u64, Vec<PathBuf>), EngineError> {
    let out = writer.finish()?;
    let mut aux_files = write_aux(config, plan, inputs, config_dir, out_dir)?;
    if !logs.is_empty() {
        // One JSON line per solved block (conjugate-gradient exit code, iterations, residuals).
        let path = out_dir.join(SOLVER_LOG);
        let mut text = String::new();
        for r in logs {
            text.push_str(&serde_json::Value::Object(r.clone()).to_string());
            text.push('\n');
        }
        amalgam_io::write_text_atomic(&path, &text)?;
        aux_files.push(path);
    }
    Ok((out.files.clone(), out.total_bytes, aux_files))
}

/// The ChatML template (written here from the format's public description).
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Resolve `chat_template`: `auto` (the most common template among the inputs'
/// `tokenizer_config.json`, first seen on ties), `chatml`, or a Jinja template string.
pub fn resolve_chat_template(
    config: &MergeConfig,
    inputs: &Inputs,
) -> Result<Option<String>, EngineError> {
    let Some(tpl) = &config.chat_template else {
        return Ok(None);
    };
    if tpl == "auto" {
        let mut seen: Vec<(String, usize)> = Vec::new();
        for m in amalgam_core::plan::referenced_models(config) {
            let Some(ck) = inputs.checkpoints.get(&m) else {
                continue;
            };
            let Ok(text) = std::fs::read_to_string(ck.root().join("tokenizer_config.json")) else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            if let Some(t) = v.get("chat_template").and_then(|t| t.as_str()) {
                let t = t.trim().to_string();
                match seen.iter_mut().find(|(s, _)| *s == t) {
                    Some(e) => e.1 += 1,
                    None => seen.push((t, 1)),
                }
            }
        }
        let best = seen.iter().map(|e| e.1).max();
        return Ok(best.and_then(|b| seen.into_iter().find(|e| e.1 == b).map(|e| e.0)));
    }
    if tpl == "chatml" {
        return Ok(Some(CHATML.to_string()));
    }
    if !tpl.contains('{') {
        return Err(EngineError::Config {
            key: "chat_template".into(),
            message: format!(
                "`{tpl}` is neither `auto`, `chatml` nor a Jinja template; give the template text itself"
            ),
        });
    }
    Ok(Some(tpl.clone()))
}

/// Copy config and tokenizer files from the tokenizer source (else the base, else the first
/// model), patch `config.json` (`torch_dtype`, layer count) and write the model card.
fn write_aux(
    config: &MergeConfig,
    plan: &Plan,
    inputs: &Inputs,
    _config_dir: Option<&Path>,
    out_dir: &Path,
) -> Result<Vec<PathBuf>, EngineError> {
    let tok_model = match config
        .tokenizer_source
        .as_ref()
        .or(config.tokenizer.as_ref().and_then(|t| t.source.as_ref()))
    {
        Some(TokenizerSource::Model(m)) => Some(m.clone()),
        _ => None,
    };
    let config_src = plan
        .base_model
        .clone()
        .or_else(|| plan.models.first().cloned());
    // Config files from the base (else the first model); tokenizer files from the tokenizer
    // source when one is named, else from the same model.
    let mut written = Vec::new();
    let root_of = |m: &amalgam_core::config::ModelRef| {
        inputs.checkpoints.get(m).map(|c| c.root().to_path_buf())
    };
    // A GGUF source has no config or tokenizer files: synthesize them from its metadata.
    let gguf_of = |m: &amalgam_core::config::ModelRef| {
        inputs
            .checkpoints
            .get(m)
            .and_then(|c| amalgam_io::gguf::gguf_source(c))
            .map(Path::to_path_buf)
    };
    if let Some(gguf) = config_src.as_ref().and_then(gguf_of) {
        written.extend(amalgam_io::gguf::write_aux_files(
            &gguf, out_dir, true, false,
        )?);
    } else if let Some(dir) = config_src.as_ref().and_then(root_of) {
        written.extend(amalgam_io::copy_files(
            &dir,
            out_dir,
            &["config.json", "generation_config.json"],
        )?);
    }
    if let Some(gguf) = tok_model.as_ref().or(config_src.as_ref()).and_then(gguf_of) {
        written.extend(amalgam_io::gguf::write_aux_files(
            &gguf, out_dir, false, true,
        )?);
    } else if let Some(dir) = tok_model.as_ref().or(config_src.as_ref()).and_then(root_of) {
        written.extend(amalgam_io::copy_files(
            &dir,
            out_dir,
            amalgam_io::TOKENIZER_FILES,
        )?);
    }
    // Patch config.json.
    let cfg_path = out_dir.join("config.json");
    if cfg_path.exists() {
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| amalgam_io::IoError::io(&cfg_path, "read", e))?;
        if let Ok(serde_json::Value::Object(mut obj)) = serde_json::from_str(&text) {
            if let Some(n) = plan.out_layers {
                if obj.contains_key("num_hidden_layers") {
                    obj.insert("num_hidden_layers".into(), n.into());
                }
            }
            if let Some(first) = plan.tensors.iter().find(|t| !t.copy_raw) {
                if let Ok(dt) = output_dtype(config, first) {
                    let name = match dt {
                        DType::F32 => Some("float32"),
                        DType::F16 => Some("float16"),
                        DType::BF16 => Some("bfloat16"),
                        _ => None,
                    };
                    if let Some(name) = name {
                        obj.insert("torch_dtype".into(), name.into());
                    }
                }
            }
            let mut out =
                serde_json::to_string_pretty(&serde_json::Value::Object(obj)).map_err(|e| {
                    EngineError::Config {
                        key: "config.json".into(),
                        message: e.to_string(),
                    }
                })?;
            out.push('\n');
            amalgam_io::write_text_atomic(&cfg_path, &out)?;
        }
    }
    if let Some(tpl) = &resolve_chat_template(config, inputs)? {
        let tc = out_dir.join("tokenizer_config.json");
        let mut obj = match std::fs::read_to_string(&tc) {
            Ok(text) => match serde_json::from_str(&text) {
                Ok(serde_json::Value::Object(o)) => o,
                _ => serde_json::Map::new(),
            },
            Err(_) => serde_json::Map::new(),
        };
        obj.insert("chat_template".into(), tpl.clone().into());
        let text = serde_json::to_string_pretty(&serde_json::Value::Object(obj)).map_err(|e| {
            EngineError::Config {
                key: "chat_template".into(),
                message: e.to_string(),
            }
        })?;
        amalgam_io::write_text_atomic(&tc, &text)?;
        if !written.contains(&tc) {
            written.push(tc);
        }
    }
    let readme = out_dir.join("README.md");
    amalgam_io::write_text_atomic(&readme, &card::model_card(plan, &config.source_text))?;
    written.push(readme);
    Ok(written)
}
