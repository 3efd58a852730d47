//! Adapter work as units and shards, the same whether it runs in this process or on workers.
//!
//! A job ([`AdapterJobSpec`]) is a `merge-adapters` config (its adapter and statistics paths
//! made absolute) or an `extract-lora` request. Opening it ([`AdapterTask::open`]) checks every
//! input before any tensor is read and plans the **units**: one per module, each producing that
//! module's output tensors (`lora_A` and `lora_B`, or an (IA)³ vector). [`partition`] cuts the
//! units into shards of about `shard_bytes` input bytes, from the units alone (never from the
//! number of workers).
//!
//! KnOTS's TIES step is model-global (methods.md §14, class G): [`AdapterTask::run_global`]
//! aligns every module and takes the trim thresholds and the majority sign once, on the
//! coordinator; the result travels in the spec ([`AdapterJobSpec::Merge::knots`]) and each
//! shard re-aligns its own modules (the alignment is deterministic) and merges them with it.
//!
//! [`run_local`] runs every shard here; the cluster's adapter job (`amalgam_cluster::adapter_job`)
//! leases the same shards to workers, which call [`AdapterTask::run_unit`] exactly as
//! [`run_local`] does, so the written adapter is byte-identical either way.

use super::ia3_merge::Ia3Merge;
use super::lora_extract::LoraExtraction;
use super::lora_merge::{KnotsPass, LoraMerge};
use super::*;
use amalgam_core::adapters::knots::KnotsGlobal;
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Default input bytes per shard of adapter work.
pub const DEFAULT_ADAPTER_SHARD_BYTES: u64 = 64 << 20;

/// KnOTS's model-global pass as it travels to workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KnotsPassSpec {
    /// Per model, the magnitude threshold (f32 bit pattern).
    pub thresholds: Vec<u32>,
    /// The global majority sign.
    pub majority_sign: i8,
    /// The merged adapter's rank.
    pub rank: usize,
}

/// One adapter job, as every process that works on it receives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AdapterJobSpec {
    /// `amalgam merge-adapters`.
    Merge {
        /// The config, as text.
        config_yaml: String,
        /// Each adapter's directory, absolute (config order).
        adapter_dirs: Vec<PathBuf>,
        /// Each adapter's statistics file, absolute, where given.
        statistics: Vec<Option<PathBuf>>,
        /// KnOTS's global pass, once run.
        knots: Option<KnotsPassSpec>,
    },
    /// `amalgam extract-lora`.
    Extract {
        /// The base checkpoint, absolute.
        base: PathBuf,
        /// The fine-tune, absolute.
        model: PathBuf,
        /// Maximum rank.
        rank: usize,
        /// Module filter (regular expression).
        modules: Option<String>,
        /// `√S` on both factors.
        distribute_scale: bool,
        /// Singular-value cut.
        sv_epsilon: f64,
    },
}

fn absolute(p: &Path) -> Result<PathBuf, EngineError> {
    std::path::absolute(p).map_err(|e| cfg_err("", format!("resolving {}: {e}", p.display())))
}

impl AdapterJobSpec {
    /// The spec of a merge config (`text`, read from a file in `config_dir`): relative paths
    /// are resolved (the working directory first, then `config_dir`) and made absolute.
    pub fn merge(text: &str, config_dir: Option<&Path>) -> Result<AdapterJobSpec, EngineError> {
        let cfg = AdapterMergeConfig::parse(text)?;
        let mut adapter_dirs = Vec::with_capacity(cfg.adapters.len());
        let mut statistics = Vec::with_capacity(cfg.adapters.len());
        for e in &cfg.adapters {
            adapter_dirs.push(absolute(&resolve_model_path(&e.path, config_dir)?)?);
            statistics.push(match &e.statistics {
                None => None,
                Some(s) => match resolve_model_path(s, config_dir) {
                    Ok(p) => Some(absolute(&p)?),
                    // Reported, naming the adapter, when the merge is planned.
                    Err(_) => Some(PathBuf::from(s)),
                },
            });
        }
        Ok(AdapterJobSpec::Merge {
            config_yaml: text.to_string(),
            adapter_dirs,
            statistics,
            knots: None,
        })
    }

    /// The spec of an extraction.
    pub fn extract(opts: &ExtractLoraOptions) -> Result<AdapterJobSpec, EngineError> {
        Ok(AdapterJobSpec::Extract {
            base: absolute(&opts.base)?,
            model: absolute(&opts.model)?,
            rank: opts.rank,
            modules: opts.modules.clone(),
            distribute_scale: opts.distribute_scale,
            sv_epsilon: opts.sv_epsilon,
        })
    }

    /// Every path the job reads (for a worker's `--allow-root` checks).
    pub fn paths(&self) -> Vec<PathBuf> {
        match self {
            AdapterJobSpec::Merge {
                adapter_dirs,
                statistics,
                ..
            } => adapter_dirs
                .iter()
                .cloned()
                .chain(statistics.iter().flatten().cloned())
                .collect(),
            AdapterJobSpec::Extract { base, model, .. } => vec![base.clone(), model.clone()],
        }
    }

    /// The spec as JSON (what travels in a shard).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an adapter job spec always serializes")
    }

    /// A spec from [`AdapterJobSpec::to_json`]'s text.
    pub fn from_json(text: &str) -> Result<AdapterJobSpec, EngineError> {
        serde_json::from_str(text).map_err(|e| cfg_err("", format!("malformed adapter job: {e}")))
    }
}

/// One unit of adapter work: one module.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterUnit {
    /// The module path.
    pub name: String,
    /// Input bytes it reads.
    pub in_bytes: u64,
    /// The keys of its output tensors, in order (an extraction may produce none of them).
    pub keys: Vec<String>,
}

enum MergeWork {
    Lora(LoraMerge),
    Ia3(Ia3Merge),
}

enum Work {
    Merge {
        adapters: Vec<Adapter>,
        weights: Vec<f64>,
        order: Vec<String>,
        work: MergeWork,
    },
    Extract(LoraExtraction),
}

/// An opened adapter job: inputs checked, units planned.
pub struct AdapterTask {
    spec: AdapterJobSpec,
    work: Work,
    units: Vec<AdapterUnit>,
}

impl std::fmt::Debug for AdapterTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterTask")
            .field("spec", &self.spec)
            .field("units", &self.units.len())
            .finish()
    }
}

impl AdapterTask {
    /// Opens and checks every input of `spec` and plans its units (no tensor is read).
    pub fn open(spec: &AdapterJobSpec) -> Result<AdapterTask, EngineError> {
        match spec {
            AdapterJobSpec::Merge {
                config_yaml,
                adapter_dirs,
                statistics,
                knots,
            } => {
                let mut cfg = AdapterMergeConfig::parse(config_yaml)?;
                if cfg.adapters.len() != adapter_dirs.len()
                    || statistics.len() != adapter_dirs.len()
                {
                    return Err(cfg_err(
                        "adapters",
                        "the job's adapter list does not match its config",
                    ));
                }
                for ((e, d), s) in cfg.adapters.iter_mut().zip(adapter_dirs).zip(statistics) {
                    e.path = d.to_string_lossy().into_owned();
                    e.statistics = s.as_ref().map(|s| s.to_string_lossy().into_owned());
                }
                let (adapters, order) = open_adapters(&cfg)?;
                let weights: Vec<f64> = cfg.adapters.iter().map(|e| e.weight).collect();
                warn_extra(&adapters);
                let work = match adapters[0].kind() {
                    AdapterKind::Lora => {
                        let mut m = LoraMerge::plan(&cfg, &adapters, &weights, &order)?;
                        if let Some(k) = knots {
                            m.set_knots_pass(KnotsPass {
                                global: KnotsGlobal {
                                    thresholds: k.thresholds.clone(),
                                    majority_sign: k.majority_sign,
                                },
                                rank: k.rank,
                            })?;
                        }
                        MergeWork::Lora(m)
                    }
                    AdapterKind::Ia3 => {
                        MergeWork::Ia3(Ia3Merge::plan(&cfg, &adapters, &order, None)?)
                    }
                };
                let units = order
                    .iter()
                    .enumerate()
                    .map(|(u, name)| {
                        let (in_bytes, keys) = match &work {
                            MergeWork::Lora(m) => m.unit(&adapters, u),
                            MergeWork::Ia3(m) => {
                                let (b, k, _) = m.unit(&adapters, u, name);
                                (b, vec![k])
                            }
                        };
                        AdapterUnit {
                            name: name.clone(),
                            in_bytes,
                            keys,
                        }
                    })
                    .collect();
                Ok(AdapterTask {
                    spec: spec.clone(),
                    work: Work::Merge {
                        adapters,
                        weights,
                        order,
                        work,
                    },
                    units,
                })
            }
            AdapterJobSpec::Extract {
                base,
                model,
                rank,
                modules,
                distribute_scale,
                sv_epsilon,
            } => {
                let x = LoraExtraction::plan(&ExtractLoraOptions {
                    base: base.clone(),
                    model: model.clone(),
                    rank: *rank,
                    out: PathBuf::new(),
                    modules: modules.clone(),
                    distribute_scale: *distribute_scale,
                    sv_epsilon: *sv_epsilon,
                    overwrite: false,
                })?;
                let units = x
                    .modules()
                    .into_iter()
                    .enumerate()
                    .map(|(u, name)| {
                        let (in_bytes, keys) = x.unit(u);
                        AdapterUnit {
                            name,
                            in_bytes,
                            keys,
                        }
                    })
                    .collect();
                Ok(AdapterTask {
                    spec: spec.clone(),
                    work: Work::Extract(x),
                    units,
                })
            }
        }
    }

    /// The spec, with the global pass's result once it has run (what workers receive).
    pub fn spec(&self) -> &AdapterJobSpec {
        &self.spec
    }

    /// The units, in output order.
    pub fn units(&self) -> &[AdapterUnit] {
        &self.units
    }

    /// What runs: the combination type, or `extract`.
    pub fn method(&self) -> &str {
        match &self.work {
            Work::Merge {
                work: MergeWork::Lora(m),
                ..
            } => m.method(),
            Work::Merge {
                work: MergeWork::Ia3(m),
                ..
            } => m.method(),
            Work::Extract(_) => "extract",
        }
    }

    /// Whether a model-global pass must run before any unit (KnOTS).
    pub fn needs_global(&self) -> bool {
        matches!(
            &self.work,
            Work::Merge {
                work: MergeWork::Lora(m),
                ..
            } if m.needs_global()
        )
    }

    /// Runs the model-global pass, if the job has one, and records its result in the spec.
    pub fn run_global(&mut self, progress: &dyn Progress) -> Result<(), EngineError> {
        let Work::Merge {
            adapters,
            work: MergeWork::Lora(m),
            ..
        } = &mut self.work
        else {
            return Ok(());
        };
        if !m.needs_global() {
            return Ok(());
        }
        m.run_global(adapters, progress)?;
        if let (Some(p), AdapterJobSpec::Merge { knots, .. }) = (m.knots_pass(), &mut self.spec) {
            *knots = Some(KnotsPassSpec {
                thresholds: p.global.thresholds.clone(),
                majority_sign: p.global.majority_sign,
                rank: p.rank,
            });
        }
        Ok(())
    }

    /// The output tensors of unit `u`, checked against the unit's keys.
    pub fn run_unit(&self, u: usize) -> Result<Vec<OutTensor>, EngineError> {
        let unit = self
            .units
            .get(u)
            .ok_or_else(|| cfg_err("", format!("no unit {u} in this adapter job")))?;
        if self.needs_global() {
            return Err(cfg_err(
                "",
                "the model-global pass has not run; modules cannot be merged yet",
            ));
        }
        let out = match &self.work {
            Work::Merge {
                adapters,
                weights,
                work,
                ..
            } => match work {
                MergeWork::Lora(m) => m.merge_unit(adapters, weights, u, &unit.name)?,
                MergeWork::Ia3(m) => m.merge_unit(adapters, weights, u, &unit.name)?,
            },
            Work::Extract(x) => x.run_unit(u)?,
        };
        Ok(out)
    }

    /// Writes the adapter from every unit's output tensors (unit order) into `out`.
    pub fn write(
        &self,
        tensors: &[OutTensor],
        out: &Path,
        overwrite: bool,
    ) -> Result<AdapterSummary, EngineError> {
        let (kind, config, rank, modules) = match &self.work {
            Work::Merge {
                adapters,
                order,
                work,
                ..
            } => match work {
                MergeWork::Lora(m) => (
                    AdapterKind::Lora,
                    m.out_config(adapters, order),
                    m.rank().unwrap_or(0),
                    order.len(),
                ),
                MergeWork::Ia3(m) => (
                    AdapterKind::Ia3,
                    m.out_config(adapters, order),
                    0,
                    order.len(),
                ),
            },
            Work::Extract(x) => {
                let (config, rank) = x.out_config(tensors)?;
                (AdapterKind::Lora, config, rank, tensors.len() / 2)
            }
        };
        let refs: Vec<(String, Vec<usize>, &[f32])> = tensors
            .iter()
            .map(|(k, s, v)| (k.clone(), s.clone(), v.as_slice()))
            .collect();
        write_adapter(out, &config, &refs, overwrite)?;
        Ok(AdapterSummary {
            out_dir: out.to_path_buf(),
            kind,
            method: self.method().to_string(),
            modules,
            rank,
        })
    }
}

/// Opens every adapter of `cfg` (paths as given) and checks that they can be merged together:
/// one kind, one base model, one `fan_in_fan_out`, and (without `union_modules`) the same
/// modules. Returns them with the module order.
fn open_adapters(cfg: &AdapterMergeConfig) -> Result<(Vec<Adapter>, Vec<String>), EngineError> {
    if cfg.adapters.is_empty() {
        return Err(cfg_err("adapters", "give at least one adapter directory"));
    }
    let mut adapters = Vec::with_capacity(cfg.adapters.len());
    for e in &cfg.adapters {
        adapters.push(Adapter::open(Path::new(&e.path))?);
    }
    let first = &adapters[0];
    for ad in &adapters[1..] {
        if ad.kind() != first.kind() {
            return Err(mismatch(
                ad,
                format!(
                    "is a {} adapter but {} is a {} adapter; merge adapters of one kind",
                    ad.kind(),
                    first.dir().display(),
                    first.kind()
                ),
            ));
        }
        if let (Some(a), Some(b)) = (
            first.config().base_model_name_or_path(),
            ad.config().base_model_name_or_path(),
        ) {
            if a != b && !cfg.allow_base_mismatch {
                return Err(mismatch(
                    ad,
                    format!(
                        "was trained on base model `{b}` but {} on `{a}` (base_model_name_or_path); \
                         adapters of different bases cannot be merged (set \
                         `allow_base_mismatch: true` if they name the same model differently)",
                        first.dir().display()
                    ),
                ));
            }
        }
        if ad.config().fan_in_fan_out() != first.config().fan_in_fan_out() {
            return Err(mismatch(
                ad,
                format!(
                    "has fan_in_fan_out = {} but {} has {}",
                    ad.config().fan_in_fan_out(),
                    first.dir().display(),
                    first.config().fan_in_fan_out()
                ),
            ));
        }
    }
    check_combination(first.kind(), cfg.combination_type.as_deref())?;
    let order = module_order(&adapters, cfg.union_modules)?;
    Ok((adapters, order))
}

/// Cuts `units` into consecutive shards of about `shard_bytes` input bytes (at least one unit
/// each). Depends only on the units and the size.
pub fn partition(units: &[AdapterUnit], shard_bytes: u64) -> Vec<Range<usize>> {
    let mut shards = Vec::new();
    let (mut start, mut bytes) = (0usize, 0u64);
    for (u, unit) in units.iter().enumerate() {
        if u > start && bytes + unit.in_bytes > shard_bytes.max(1) {
            shards.push(start..u);
            start = u;
            bytes = 0;
        }
        bytes += unit.in_bytes;
    }
    if start < units.len() {
        shards.push(start..units.len());
    }
    shards
}

/// Checks a shard's output tensors against its units (keys in order, lengths matching the
/// shapes; an extraction's unit may be empty), as a coordinator does with a worker's result.
pub fn check_unit_output(unit: &AdapterUnit, tensors: &[OutTensor]) -> Result<(), String> {
    let keys: Vec<&str> = tensors.iter().map(|t| t.0.as_str()).collect();
    let want: Vec<&str> = unit.keys.iter().map(String::as_str).collect();
    if !keys.is_empty() && keys != want {
        return Err(format!(
            "module `{}`: tensors {keys:?}, expected {want:?}",
            unit.name
        ));
    }
    for (k, shape, data) in tensors {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(format!(
                "tensor `{k}`: {} values for shape {shape:?}",
                data.len()
            ));
        }
    }
    Ok(())
}

/// Runs `spec` in this process: opens it, runs its global pass, merges every shard of
/// [`partition`] in order and writes the adapter into `out` (refused when it already holds
/// one, unless `overwrite`).
pub fn run_local(
    spec: &AdapterJobSpec,
    out: &Path,
    overwrite: bool,
    shard_bytes: u64,
    progress: &dyn Progress,
) -> Result<AdapterSummary, EngineError> {
    check_out(out, overwrite, spec)?;
    let mut task = AdapterTask::open(spec)?;
    task.run_global(progress)?;
    let total: u64 = task.units().iter().map(|u| u.in_bytes).sum();
    let phase = if task.method() == "extract" {
        "extracting"
    } else {
        "merging"
    };
    progress.begin(phase, total, task.units().len());
    let mut tensors = Vec::with_capacity(2 * task.units().len());
    for shard in partition(task.units(), shard_bytes) {
        for u in shard {
            let t = task.run_unit(u)?;
            let unit = &task.units()[u];
            progress.advance(&unit.name, unit.in_bytes);
            tensors.extend(t);
        }
    }
    progress.end();
    task.write(&tensors, out, overwrite)
}
