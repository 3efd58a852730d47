//! LoRA adapters: PEFT's combination types and KnOTS (see the parent module).

use super::*;

/// Per module, per adapter (`None` where the adapter lacks it), the module's metadata; checks
/// that the adapters agree on shapes and layout.
fn lora_table<'a>(
    adapters: &'a [Adapter],
    order: &[String],
) -> Result<Vec<Vec<Option<&'a amalgam_io::peft::LoraModule>>>, EngineError> {
    let maps: Vec<HashMap<&str, &amalgam_io::peft::LoraModule>> = adapters
        .iter()
        .map(|a| {
            a.lora_modules()
                .iter()
                .map(|m| (m.name.as_str(), m))
                .collect()
        })
        .collect();
    let mut table = Vec::with_capacity(order.len());
    for name in order {
        let row: Vec<Option<&amalgam_io::peft::LoraModule>> =
            maps.iter().map(|m| m.get(name.as_str()).copied()).collect();
        let (i0, m0) = row
            .iter()
            .enumerate()
            .find_map(|(i, m)| m.map(|m| (i, m)))
            .expect("a module in the order belongs to some adapter");
        for (i, m) in row.iter().enumerate() {
            let Some(m) = m else { continue };
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

fn lora_keys(m: &amalgam_io::peft::LoraModule) -> (String, String) {
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

pub(super) fn merge_lora(
    cfg: &AdapterMergeConfig,
    adapters: &[Adapter],
    weights: &[f64],
    order: &[String],
    out: &Path,
    overwrite: bool,
    progress: &dyn Progress,
) -> Result<AdapterSummary, EngineError> {
    let table = lora_table(adapters, order)?;
    let name = cfg.combination_type.as_deref().unwrap_or("svd");
    let is_knots = name == KNOTS_TIES || name == KNOTS_DARE;
    warn_extra(adapters);
    let total: u64 = table
        .iter()
        .map(|row| {
            row.iter()
                .zip(adapters)
                .filter_map(|(m, a)| m.map(|m| bytes_of(a, &[&m.a_key, &m.b_key])))
                .sum::<u64>()
        })
        .sum();
    let mut tensors: Vec<OutTensor> = Vec::with_capacity(2 * order.len());
    let (method, rank) = if is_knots {
        let rank = merge_knots(
            cfg,
            name,
            adapters,
            weights,
            &table,
            total,
            progress,
            &mut tensors,
        )?;
        (name.to_string(), rank)
    } else {
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
        progress.begin("merging", total, order.len());
        for (row, mname) in table.iter().zip(order) {
            let mut factors: Vec<(usize, Vec<f64>, Vec<f64>, &amalgam_io::peft::LoraModule)> =
                Vec::new();
            let mut bytes = 0;
            for (i, (m, a)) in row.iter().zip(adapters).enumerate() {
                let Some(m) = m else { continue };
                factors.push((i, to_f64(a.read(&m.a_key)?), to_f64(a.read(&m.b_key)?), m));
                bytes += bytes_of(a, &[&m.a_key, &m.b_key]);
            }
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
                combine::combine(mname, m0.out_features, m0.in_features, &mods, rank, &opts)?;
            let (ka, kb) = lora_keys(m0);
            tensors.push((ka, vec![rank, m0.in_features], to_f32(&merged.a)));
            tensors.push((kb, vec![m0.out_features, rank], to_f32(&merged.b)));
            progress.advance(mname, bytes);
        }
        progress.end();
        (combination.name().to_string(), rank)
    };
    let config = lora_out_config(adapters, rank, order);
    let refs: Vec<(String, Vec<usize>, &[f32])> = tensors
        .iter()
        .map(|(k, s, v)| (k.clone(), s.clone(), v.as_slice()))
        .collect();
    write_adapter(out, &config, &refs, overwrite)?;
    Ok(AdapterSummary {
        out_dir: out.to_path_buf(),
        kind: AdapterKind::Lora,
        method,
        modules: order.len(),
        rank,
    })
}

/// KnOTS over all modules; pushes the output tensors and returns the adapter's rank.
#[allow(clippy::too_many_arguments)]
fn merge_knots(
    cfg: &AdapterMergeConfig,
    name: &str,
    adapters: &[Adapter],
    weights: &[f64],
    table: &[Vec<Option<&amalgam_io::peft::LoraModule>>],
    total: u64,
    progress: &dyn Progress,
    tensors: &mut Vec<OutTensor>,
) -> Result<usize, EngineError> {
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
        let m = row.iter().flatten().next().expect("some adapter has it");
        return Err(mismatch(
            &adapters[i],
            format!(
                "does not adapt module `{}`; KnOTS needs every adapter on every module",
                m.name
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
    progress.begin("aligning", total, table.len());
    let mut layers = Vec::with_capacity(table.len());
    for row in table {
        let mut read = Vec::with_capacity(row.len());
        let mut bytes = 0;
        for (m, a) in row.iter().zip(adapters) {
            let m = m.expect("checked: every adapter has every module");
            read.push((to_f64(a.read(&m.a_key)?), to_f64(a.read(&m.b_key)?), m));
            bytes += bytes_of(a, &[&m.a_key, &m.b_key]);
        }
        let factors: Vec<LoraFactors<'_>> = read
            .iter()
            .map(|(a, b, m)| LoraFactors {
                a,
                b,
                rank: m.rank,
                scaling: m.scaling,
            })
            .collect();
        let m0 = read[0].2;
        layers.push(knots::align_lora(
            &m0.name,
            &factors,
            m0.out_features,
            m0.in_features,
        )?);
        progress.advance(&m0.name, bytes);
    }
    progress.end();
    let merged = knots::knots(layers, &opts)?;
    let rank = merged.iter().map(|m| m.rank).max().unwrap_or(0).max(1);
    for (row, m) in table.iter().zip(&merged) {
        let lm = row[0].expect("checked: every adapter has every module");
        let (a, b) = m
            .padded(rank)
            .expect("rank is the largest layer rank, so padding always fits");
        let (ka, kb) = lora_keys(lm);
        tensors.push((ka, vec![rank, lm.in_features], to_f32(&a)));
        tensors.push((kb, vec![lm.out_features, rank], to_f32(&b)));
    }
    Ok(rank)
}
