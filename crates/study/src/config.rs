//! The study file (YAML): pool, methods with hyperparameter grids, model counts, subsets,
//! evaluation suite.
//!
//! ```yaml
//! base_model: path/to/base          # needed by methods that use a base (task_arithmetic, ties...)
//! pool:                             # the fine-tuned models, in a fixed order
//!   - model: path/ft1
//!     statistics: path/ft1.gram.safetensors   # optional, for fisher / regmean / mats
//!   - model: path/ft2
//! methods:
//!   - merge_method: task_arithmetic
//!     parameters: {lambda: [0.5, 1.0]}        # a list is a grid axis; axes multiply
//!   - merge_method: ties
//!     parameters: {density: [0.2, 0.5], lambda: 1.0}
//! counts: [2, 4, 8]                  # numbers of models merged
//! subsets: {permutations: 10, seed: 0, max_per_count: 5}   # all optional
//! evaluation: {suite: suite.yaml, batch_size: 8}
//! dtype: float32                    # optional, copied into every merge config
//! ```
//!
//! Relative paths are resolved against the study file's directory.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_yaml_ng::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One fine-tuned model of the pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolModel {
    /// The model (a Hugging Face directory or a safetensors file).
    pub model: PathBuf,
    /// Its statistics file (Fisher or Gram), for data-driven methods.
    #[serde(default)]
    pub statistics: Option<PathBuf>,
    /// Display name (default: the model path's last component).
    #[serde(default)]
    pub name: Option<String>,
}

impl PoolModel {
    /// The model's display name.
    pub fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            self.model
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| self.model.display().to_string())
        })
    }
}

/// A method with its hyperparameter grid.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodGrid {
    /// The merge method's config name (`merge_method`).
    pub merge_method: String,
    /// Hyperparameters: a scalar is fixed, a list is a grid axis (axes multiply).
    #[serde(default)]
    pub parameters: BTreeMap<String, Value>,
}

/// How subsets of the pool are drawn (see [`crate::subsets`]).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SubsetSpec {
    /// Number of permutations (default: 20 if the pool has more than 20 models, else 10).
    #[serde(default)]
    pub permutations: Option<usize>,
    /// Seed of the permutations (default 0).
    #[serde(default)]
    pub seed: u64,
    /// At most this many distinct subsets per model count (default: all).
    #[serde(default)]
    pub max_per_count: Option<usize>,
}

/// The evaluation suite run on every merge.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    /// The suite file (YAML; see `amalgam eval`).
    pub suite: PathBuf,
    /// Requests scored per forward pass (default: the suite's).
    #[serde(default)]
    pub batch_size: Option<usize>,
}

/// A whole study.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudyConfig {
    /// The base model (for methods that use one).
    #[serde(default)]
    pub base_model: Option<PathBuf>,
    /// The fine-tuned models.
    pub pool: Vec<PoolModel>,
    /// Methods and their grids.
    pub methods: Vec<MethodGrid>,
    /// Numbers of models merged.
    pub counts: Vec<usize>,
    /// How subsets are drawn.
    #[serde(default)]
    pub subsets: SubsetSpec,
    /// The evaluation suite.
    pub evaluation: EvalSpec,
    /// Output dtype of every merge (copied into each merge config).
    #[serde(default)]
    pub dtype: Option<String>,
}

/// One point of a method's grid: the method and its hyperparameters (sorted by name).
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    /// The merge method.
    pub method: String,
    /// Hyperparameter name and value, sorted by name.
    pub params: Vec<(String, Value)>,
}

impl Setting {
    /// `name=value` pairs joined by spaces (empty when there are none).
    pub fn label(&self) -> String {
        self.params
            .iter()
            .map(|(k, v)| format!("{k}={}", scalar_text(v)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// A YAML scalar as text (numbers as YAML writes them).
pub fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Null => "null".to_string(),
        other => serde_yaml_ng::to_string(other)
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
    }
}

impl StudyConfig {
    /// Reads and checks a study file; relative paths become relative to its directory.
    pub fn load(path: &Path) -> Result<StudyConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read study {}", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new(""));
        StudyConfig::parse(&text, dir).with_context(|| format!("study {}", path.display()))
    }

    /// Parses study YAML; relative paths are joined to `dir`.
    pub fn parse(text: &str, dir: &Path) -> Result<StudyConfig> {
        let mut c: StudyConfig = serde_yaml_ng::from_str(text).context("parsing the study")?;
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        if let Some(b) = c.base_model.as_mut() {
            fix(b);
        }
        for m in &mut c.pool {
            fix(&mut m.model);
            if let Some(s) = m.statistics.as_mut() {
                fix(s);
            }
        }
        fix(&mut c.evaluation.suite);
        c.check()?;
        Ok(c)
    }

    fn check(&self) -> Result<()> {
        if self.pool.len() < 2 {
            bail!(
                "pool: a study needs at least 2 models, got {}",
                self.pool.len()
            );
        }
        for (i, m) in self.pool.iter().enumerate() {
            if self.pool[..i].iter().any(|o| o.model == m.model) {
                bail!(
                    "pool[{i}]: model {} is listed twice (a merge refuses duplicate inputs)",
                    m.model.display()
                );
            }
        }
        if self.methods.is_empty() {
            bail!("methods: name at least one method");
        }
        if self.counts.is_empty() {
            bail!("counts: name at least one model count");
        }
        for &c in &self.counts {
            if c < 1 || c > self.pool.len() {
                bail!(
                    "counts: {c} is not between 1 and the pool size {}",
                    self.pool.len()
                );
            }
        }
        for (i, m) in self.methods.iter().enumerate() {
            let info = amalgam_core::methods::info(&m.merge_method)
                .with_context(|| format!("methods[{i}].merge_method"))?;
            if info.needs_base && self.base_model.is_none() {
                bail!(
                    "methods[{i}]: `{}` needs a base model; set base_model",
                    m.merge_method
                );
            }
            for (k, v) in &m.parameters {
                let values = match v {
                    Value::Sequence(s) if s.is_empty() => {
                        bail!("methods[{i}].parameters.{k}: an empty list gives no setting")
                    }
                    Value::Sequence(s) => s.clone(),
                    other => vec![other.clone()],
                };
                for x in values {
                    if matches!(x, Value::Sequence(_) | Value::Mapping(_) | Value::Tagged(_)) {
                        bail!("methods[{i}].parameters.{k}: grid values must be scalars");
                    }
                }
            }
        }
        if self.subsets.permutations == Some(0) {
            bail!("subsets.permutations: must be at least 1");
        }
        if self.evaluation.batch_size == Some(0) {
            bail!("evaluation.batch_size: must be at least 1");
        }
        Ok(())
    }

    /// Every grid point of every method, in file order (grid axes sorted by name, values in
    /// the order given, the last axis varying fastest).
    pub fn settings(&self) -> Vec<Setting> {
        let mut out = Vec::new();
        for m in &self.methods {
            let mut points: Vec<Vec<(String, Value)>> = vec![Vec::new()];
            for (k, v) in &m.parameters {
                let values = match v {
                    Value::Sequence(s) => s.clone(),
                    other => vec![other.clone()],
                };
                let mut next = Vec::with_capacity(points.len() * values.len());
                for p in &points {
                    for x in &values {
                        let mut q = p.clone();
                        q.push((k.clone(), x.clone()));
                        next.push(q);
                    }
                }
                points = next;
            }
            for params in points {
                out.push(Setting {
                    method: m.merge_method.clone(),
                    params,
                });
            }
        }
        out
    }

    /// The number of permutations: as given, else 20 for a pool of more than 20, else 10.
    pub fn permutations(&self) -> usize {
        self.subsets
            .permutations
            .unwrap_or(if self.pool.len() > 20 { 20 } else { 10 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STUDY: &str = "base_model: base\npool:\n  - model: a\n    statistics: a.st\n  - model: /abs/b\nmethods:\n  - merge_method: task_arithmetic\n    parameters: {lambda: [0.5, 1.0], normalize: false}\n  - merge_method: ties\n    parameters: {density: [0.2, 0.5], lambda: [1, 2]}\n  - merge_method: linear\ncounts: [2]\nevaluation: {suite: s.yaml}\n";

    #[test]
    fn grid_expands_to_the_cartesian_product() {
        let c = StudyConfig::parse(STUDY, Path::new("/d")).unwrap();
        let labels: Vec<String> = c
            .settings()
            .iter()
            .map(|s| format!("{} {}", s.method, s.label()))
            .collect();
        assert_eq!(
            labels,
            [
                "task_arithmetic lambda=0.5 normalize=false",
                "task_arithmetic lambda=1.0 normalize=false",
                "ties density=0.2 lambda=1",
                "ties density=0.2 lambda=2",
                "ties density=0.5 lambda=1",
                "ties density=0.5 lambda=2",
                "linear ",
            ]
        );
        assert_eq!(c.pool[0].model, Path::new("/d/a"));
        assert_eq!(c.pool[0].statistics.as_deref(), Some(Path::new("/d/a.st")));
        assert_eq!(c.pool[1].model, Path::new("/abs/b"));
        assert_eq!(c.evaluation.suite, Path::new("/d/s.yaml"));
        assert_eq!(c.permutations(), 10);
    }

    #[test]
    fn bad_studies_are_refused_with_the_key() {
        let e = StudyConfig::parse(&STUDY.replace("counts: [2]", "counts: [3]"), Path::new(""))
            .unwrap_err();
        assert!(format!("{e:#}").contains("counts"), "{e:#}");
        let e = StudyConfig::parse(&STUDY.replace("base_model: base\n", ""), Path::new(""))
            .unwrap_err();
        assert!(format!("{e:#}").contains("base model"), "{e:#}");
        let e = StudyConfig::parse(&STUDY.replace("linear", "no_such"), Path::new("")).unwrap_err();
        assert!(format!("{e:#}").contains("methods[2]"), "{e:#}");
        let e = StudyConfig::parse(&STUDY.replace("/abs/b", "a"), Path::new("")).unwrap_err();
        assert!(format!("{e:#}").contains("pool[1]"), "{e:#}");
        let e = StudyConfig::parse(&STUDY.replace("[1, 2]", "[]"), Path::new("")).unwrap_err();
        assert!(format!("{e:#}").contains("lambda"), "{e:#}");
    }
}
