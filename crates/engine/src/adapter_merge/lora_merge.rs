//! LoRA adapters: PEFT's combination types and KnOTS (see the parent module), one module per
//! unit of work.

use super::*;
use amalgam_core::adapters::knots::KnotsGlobal;
use amalgam_io::peft::LoraModule;

/// Per module (merge order), per adapter, the index of the module in that adapter's
/// `lora_modules()` (`None` where the adapter lacks it).
type Table = Vec<Vec<Option<usize>>>;

/// Builds the module table and checks that the adapters agree on shapes and layout.
fn lora_table(adapters: &[Adapter], order: &[String]) -> Result<Table, EngineError> {
    let mut table = Vec::with_capacity(order.len());
    let rows = module_rows(adapters, order, Adapter::lora_modules, |m| m.name.as_str());
    for ((row, (i0, j0)), name) in rows.into_iter().zip(order) {
        let m0 = &adapters[i0].lora_modules()[j0];
        for (i, j) in row.iter().enumerate() {
            let Some(j) = j else { continue };
            let m = &adapters[i].lora_modules()[*j];
            if (m.out_features, m.in_features, m.embedding)
                != (m0.out_features, m0.in_features, m0.embedding)
            {
                return Err(mismatch(
                    &adapters[i],
                    format!(
                        "module `{name}`: {} LoRA of {} x {} (out x in) but {} has {} {} x {}; \
                         all adapters must target the same base model",
                        if m.embedding { "an embedding" } else { "a" },
                        m.out_features,
                        m.in_features,
                        adapters[i0].dir().display(),
                        if m0.embedding { "an embedding" } else { "a" },
                        m0.out_features,
                        m0.in_features
                    ),
                ));
            }
        }
        table.push(row);
    }
    Ok(table)
}

fn lora_keys(m: &LoraModule) -> (String, String) {
    if m.embedding {
        (
            format!("{KEY_PREFIX}{}.lora_embedding_A", m.name),
            format!("{KEY_PREFIX}{}.lora_embedding_B", m.name),
        )
    } else {
        (lora_a_key(&m.name), lora_b_key(&m.name))
    }
}

/// The new adapter's config: the first adapter's, with `r = lora_alpha = rank`, no patterns,
/// no rsLoRA, the union of the targets, and no `modules_to_save` (those tensors are not merged).
fn lora_out_config(adapters: &[Adapter], rank: usize, order: &[String]) -> AdapterConfig {
    let lcs: Vec<&LoraConfig> = adapters
        .iter()
        .filter_map(|a| match a.config() {
            AdapterConfig::Lora(c) => Some(c),
            AdapterConfig::Ia3(_) => None,
        })
        .collect();
    let mut c = lcs[0].clone();
    c.r = rank;
    c.lora_alpha = rank as f64;
    c.rank_pattern.clear();
    c.alpha_pattern.clear();
    c.use_rslora = false;
    c.target_modules = union_targets(lcs.iter().map(|c| &c.target_modules), order);
    if c.extra.contains_key("modules_to_save") {
        c.extra
            .insert("modules_to_save".to_string(), serde_json::Value::Null);
    }
    AdapterConfig::Lora(c)
}

pub(super) fn warn_extra(adapters: &[Adapter]) {
    for a in adapters {
        if let Some(k) = a.extra_keys().first() {
            tracing::warn!(
                "{}: {} non-adapter tensor(s) (e.g. `{k}`, modules_to_save) are not merged and not written",
                a.dir().display(),
                a.extra_keys().len()
            );
        }
    }
}

/// One adapter's factors of a module: (adapter index, A, B, the module).
type ReadFactors<'a> = (usize, Vec<f64>, Vec<f64>, &'a LoraModule);

/// How the modules are merged.
#[derive(Debug, Clone)]
enum Mode {
    /// One of PEFT's combination types, to a LoRA of `rank`.
    Combine { opts: CombineOptions, rank: usize },
    /// KnOTS; `global` is set once the model-global pass has run (or was received), and
    /// `aligned` holds every module's alignment when the pass ran here (so it is not
    /// computed again; a worker that received the pass aligns its own modules).
    Knots {
        opts: KnotsOptions,
        global: Option<KnotsPass>,
        aligned: Vec<knots::KnotsLayer>,
    },
}

/// The result of KnOTS's model-global pass: what every module's merge needs.
#[derive(Debug, Clone, PartialEq)]
pub struct KnotsPass {
    /// Trim thresholds and majority sign.
    pub global: KnotsGlobal,
    /// The adapter's rank: the largest layer rank (at least 1).
    pub rank: usize,
}

/// A planned LoRA merge.
#[derive(Debug, Clone)]
pub(super) struct LoraMerge {
    table: Table,
    mode: Mode,
    method: String,
}

impl LoraMerge {
    /// Plans the merge: the module table, the combination and its rank.
    pub(super) fn plan(
        cfg: &AdapterMergeConfig,
        adapters: &[Adapter],
        weights: &[f64],
        order: &[String],
    ) -> Result<LoraMerge, EngineError> {
        let table = lora_table(adapters, order)?;
        let name = cfg.combination_type.as_deref().unwrap_or("svd");
        if name == KNOTS_TIES || name == KNOTS_DARE {
            let opts = knots_options(cfg, name, adapters, weights, &table)?;
            return Ok(LoraMerge {
                table,
                mode: Mode::Knots {
                    opts,
                    global: None,
                    aligned: Vec::new(),
                },
                method: name.to_string(),
            });
        }
        let combination = Combination::parse(name).map_err(|e| EngineError::Config {
            key: "combination_type".to_string(),
            message: format!("{e}; or {KNOTS_TIES}, {KNOTS_DARE}"),
        })?;
        let combination = resolve_combination(combination, adapters.len());
        let ranks: Vec<usize> = adapters
            .iter()
            .map(|a| match a.config() {
                AdapterConfig::Lora(c) => c.rank_pattern.values().copied().fold(c.r, usize::max),
                AdapterConfig::Ia3(_) => 0,
            })
            .collect();
        let rank = new_rank(combination, &ranks, cfg.svd_rank)?;
        let opts = CombineOptions {
            combination,
            density: cfg.density,
            majority_sign_method: cfg.majority_sign_method,
            svd_clamp: cfg.svd_clamp,
            seed: cfg.seed,
        };
        Ok(LoraMerge {
            table,
            mode: Mode::Combine { opts, rank },
            method: combination.name().to_string(),
        })
    }

    /// The combination that runs (after PEFT's one-adapter rule).
    pub(super) fn method(&self) -> &str {
        &self.method
    }

    /// The output rank, once known (KnOTS: after its global pass).
    pub(super) fn rank(&self) -> Option<usize> {
        match &self.mode {
            Mode::Combine { rank, .. } => Some(*rank),
            Mode::Knots { global, .. } => global.as_ref().map(|g| g.rank),
        }
    }

    /// Whether a model-global pass must run before any module is merged.
    pub(super) fn needs_global(&self) -> bool {
        matches!(self.mode, Mode::Knots { global: None, .. })
    }

    /// The global pass's result, if there is one.
    pub(super) fn knots_pass(&self) -> Option<&KnotsPass> {
        match &self.mode {
            Mode::Knots { global, .. } => global.as_ref(),
            Mode::Combine { .. } => None,
        }
    }

    /// Takes a global pass computed elsewhere (the coordinator's).
    pub(super) fn set_knots_pass(&mut self, pass: KnotsPass) -> Result<(), EngineError> {
        match &mut self.mode {
            Mode::Knots { global, .. } => {
                *global = Some(pass);
                Ok(())
            }
            Mode::Combine { .. } => Err(cfg_err(
                "combination_type",
                format!("`{}` has no model-global pass", self.method),
            )),
        }
    }

    /// The modules of adapter `i` in row `u`, or `None`.
    fn module<'a>(&self, adapters: &'a [Adapter], u: usize, i: usize) -> Option<&'a LoraModule> {
        self.table[u][i].map(|j| &adapters[i].lora_modules()[j])
    }

    /// Input bytes and output keys of unit (module) `u`.
    pub(super) fn unit(&self, adapters: &[Adapter], u: usize) -> (u64, Vec<String>) {
        let mut bytes = 0;
        let mut first = None;
        for (i, a) in adapters.iter().enumerate() {
            if let Some(m) = self.module(adapters, u, i) {
                bytes += bytes_of(a, &[&m.a_key, &m.b_key]);
                first.get_or_insert(m);
            }
        }
        let (ka, kb) = lora_keys(first.expect("a module in the table belongs to some adapter"));
        (bytes, vec![ka, kb])
    }

    /// Reads module `u`'s factors of every adapter that has it: (adapter, A, B, module).
    fn read<'a>(
        &self,
        adapters: &'a [Adapter],
        u: usize,
    ) -> Result<Vec<ReadFactors<'a>>, EngineError> {
        let mut out = Vec::new();
        for (i, a) in adapters.iter().enumerate() {
            if let Some(m) = self.module(adapters, u, i) {
                out.push((i, to_f64(a.read(&m.a_key)?), to_f64(a.read(&m.b_key)?), m));
            }
        }
        Ok(out)
    }

    /// KnOTS's alignment of module `u` (with DARE applied when configured).
    fn align(
        &self,
        adapters: &[Adapter],
        u: usize,
        opts: &KnotsOptions,
    ) -> Result<knots::KnotsLayer, EngineError> {
        let read = self.read(adapters, u)?;
        let factors: Vec<LoraFactors<'_>> = read
            .iter()
            .map(|(_, a, b, m)| LoraFactors {
                a,
                b,
                rank: m.rank,
                scaling: m.scaling,
            })
            .collect();
        let m0 = read[0].3;
        let mut layer = knots::align_lora(&m0.name, &factors, m0.out_features, m0.in_features)?;
        if let Some(d) = &opts.dare {
            knots::apply_dare(&mut layer, d);
        }
        Ok(layer)
    }

    /// KnOTS's model-global pass over every module (aligns them all, then takes the global
    /// trim thresholds and majority sign); a no-op for the other combinations.
    pub(super) fn run_global(
        &mut self,
        adapters: &[Adapter],
        progress: &dyn Progress,
    ) -> Result<(), EngineError> {
        let Mode::Knots {
            opts, global: None, ..
        } = &self.mode
        else {
            return Ok(());
        };
        let opts = *opts;
        let total: u64 = (0..self.table.len())
            .map(|u| self.unit(adapters, u).0)
            .sum();
        progress.begin("aligning", total, self.table.len());
        let mut layers = Vec::with_capacity(self.table.len());
        for u in 0..self.table.len() {
            let layer = self.align(adapters, u, &opts)?;
            progress.advance(&layer.name, self.unit(adapters, u).0);
            layers.push(layer);
        }
        progress.end();
        let global = knots::global_stats(&layers, &opts)?;
        let rank = layers.iter().map(|l| l.rank).max().unwrap_or(0).max(1);
        self.mode = Mode::Knots {
            opts,
            global: Some(KnotsPass { global, rank }),
            aligned: layers,
        };
        Ok(())
    }

    /// The output tensors of module `u`: its merged `lora_A` and `lora_B`.
    pub(super) fn merge_unit(
        &self,
        adapters: &[Adapter],
        weights: &[f64],
        u: usize,
        name: &str,
    ) -> Result<Vec<OutTensor>, EngineError> {
        match &self.mode {
            Mode::Combine { opts, rank } => {
                let factors = self.read(adapters, u)?;
                let mods: Vec<combine::LoraModule<'_>> = factors
                    .iter()
                    .map(|(i, a, b, m)| combine::LoraModule {
                        model: *i,
                        a,
                        b,
                        rank: m.rank,
                        scaling: m.scaling,
                        weight: weights[*i],
                    })
                    .collect();
                let m0 = factors[0].3;
                let merged =
                    combine::combine(name, m0.out_features, m0.in_features, &mods, *rank, opts)?;
                let (ka, kb) = lora_keys(m0);
                Ok(vec![
                    (ka, vec![*rank, m0.in_features], to_f32(&merged.a)),
                    (kb, vec![m0.out_features, *rank], to_f32(&merged.b)),
                ])
            }
            Mode::Knots {
                opts,
                global,
                aligned,
            } => {
                let pass = global
                    .as_ref()
                    .expect("KnOTS modules are merged after the global pass");
                let merged = match aligned.get(u) {
                    Some(layer) => knots::merge_layer(layer, &pass.global, opts)?,
                    None => {
                        knots::merge_layer(&self.align(adapters, u, opts)?, &pass.global, opts)?
                    }
                };
                let lm = self
                    .module(adapters, u, 0)
                    .expect("checked: every adapter has every module");
                let (a, b) = merged.padded(pass.rank).ok_or_else(|| EngineError::Model {
                    model: adapters[0].dir().display().to_string(),
                    message: format!(
                        "module `{}`: KnOTS rank {} exceeds the global pass's rank {} (the \
                             adapters changed since the pass)",
                        lm.name, merged.rank, pass.rank
                    ),
                })?;
                let (ka, kb) = lora_keys(lm);
                Ok(vec![
                    (ka, vec![pass.rank, lm.in_features], to_f32(&a)),
                    (kb, vec![lm.out_features, pass.rank], to_f32(&b)),
                ])
            }
        }
    }

    /// The output adapter's config.
    pub(super) fn out_config(&self, adapters: &[Adapter], order: &[String]) -> AdapterConfig {
        lora_out_config(adapters, self.rank().unwrap_or(0), order)
    }
}

/// KnOTS's options, after checking that the merge fits the method.
fn knots_options(
    cfg: &AdapterMergeConfig,
    name: &str,
    adapters: &[Adapter],
    weights: &[f64],
    table: &Table,
) -> Result<KnotsOptions, EngineError> {
    if let Some((i, w)) = weights.iter().enumerate().find(|(_, w)| **w != 1.0) {
        return Err(cfg_err(
            "adapters.weight",
            format!(
                "adapter {i} has weight {w}: KnOTS scales the merged update by the single \
                 coefficient `alpha` (per-adapter weights are not part of the method)"
            ),
        ));
    }
    if let Some(row) = table.iter().find(|r| r.iter().any(Option::is_none)) {
        let i = row
            .iter()
            .position(Option::is_none)
            .expect("the row has a missing adapter");
        let (k, j) = row
            .iter()
            .enumerate()
            .find_map(|(k, j)| j.map(|j| (k, j)))
            .expect("some adapter has it");
        return Err(mismatch(
            &adapters[i],
            format!(
                "does not adapt module `{}`; KnOTS needs every adapter on every module",
                adapters[k].lora_modules()[j].name
            ),
        ));
    }
    let dare = name == KNOTS_DARE;
    let opts = KnotsOptions {
        top_k: cfg.top_k.unwrap_or(if dare { 100.0 } else { 20.0 }),
        alpha: cfg.alpha.unwrap_or(if dare { 0.7 } else { 0.6 }),
        sign_mode: cfg.sign_mode,
        dare: dare.then(|| KnotsDare {
            drop_rate: cfg.drop_rate.unwrap_or(0.1),
            seed: cfg.seed,
        }),
    };
    opts.validate()?;
    Ok(opts)
}
