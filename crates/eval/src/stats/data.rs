//! The data statistics are computed from (`amalgam stats --data DATA`), and how an example
//! becomes the token ids the model is fed and the positions its loss is taken over.
//!
//! DATA is JSON Lines, one object per line (blank lines are skipped):
//! - `{"input": .., "target": ..}`: the loss is the NLL of the target's tokens given the
//!   input, tokenized as lm-eval does: `whole = enc(input + target)`, `ctx = enc(input)`, the
//!   target tokens are `whole[len(ctx)..]`; when `whole` does not start with `ctx` (a
//!   merge across the boundary, e.g. an input ending in a space), the sequence is
//!   `ctx + enc_without_special(target)` instead (the same fallback as [`crate::score`]);
//! - `{"text": ..}`: the loss is the NLL of every token of the text after the BOS, i.e. an
//!   input `""` with the text as target.
//! - `{"input": .., "choices": [..], "label": k}` (a rank-classification task's line, as
//!   `amalgam eval` reads it): the pair of the input and its correct choice, `choices[k]`, so
//!   the statistics can come from the task data the merge is evaluated on.
//!
//! An empty context is the BOS (a Llama tokenizer adds it); with a tokenizer that adds none,
//! the BOS (else EOS) id is put in front, as lm-eval's prefix token. Examples longer than the
//! model's window are cut from the left, keeping the scored tokens.
//!
//! The model is fed `seq[..len - 1]` (the last token predicts nothing), so an example feeds
//! `len - 1` positions and scores `len - start` tokens.

use std::path::Path;

use serde_json::Value;

use crate::error::{EvalError, Result};
use crate::tasks::choice_line;

/// One example of a statistics data set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StatsExample {
    /// A target scored after an input (`{"input", "target"}`).
    Pair {
        /// The conditioning text (may be empty).
        input: String,
        /// The text whose tokens are scored (must give at least one token).
        target: String,
    },
    /// A text scored after its first token (`{"text"}`).
    Text {
        /// The text.
        text: String,
    },
}

/// An example as token ids: the full sequence and the index of its first scored token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExampleTokens {
    /// Every token of the example (BOS included when the tokenizer adds it).
    pub ids: Vec<u32>,
    /// Index in `ids` of the first token the loss is taken over (≥ 1, < `ids.len()`).
    pub start: usize,
}

impl ExampleTokens {
    /// The ids fed to the model: every token but the last.
    pub fn fed(&self) -> &[u32] {
        &self.ids[..self.ids.len() - 1]
    }

    /// Number of positions fed to the model (`ids.len() - 1`).
    pub fn positions(&self) -> usize {
        self.ids.len() - 1
    }

    /// The fed positions the Gram and K-FAC sums take: all (`0..positions`), or those whose
    /// outputs predict a scored token (`start - 1..positions`).
    pub fn counted(&self, which: super::GramPositions) -> std::ops::Range<usize> {
        match which {
            super::GramPositions::All => 0..self.positions(),
            super::GramPositions::Scored => self.start - 1..self.positions(),
        }
    }

    /// Number of tokens the loss is taken over (`ids.len() - start`).
    pub fn loss_tokens(&self) -> usize {
        self.ids.len() - self.start
    }
}

/// Reads a JSONL data file; the error names the file, line and field at fault.
pub fn read_jsonl(path: &Path) -> Result<Vec<StatsExample>> {
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::File {
        path: path.to_path_buf(),
        source,
    })?;
    parse_jsonl(path, &text)
}

/// Parses JSONL text (`path` only names the source in errors).
pub fn parse_jsonl(path: &Path, text: &str) -> Result<Vec<StatsExample>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |field: &str, msg: String| EvalError::Task {
            path: path.to_path_buf(),
            field: format!("line {}{field}", i + 1),
            msg,
        };
        let v: Value = serde_json::from_str(line).map_err(|e| err("", format!("not JSON: {e}")))?;
        let Value::Object(obj) = v else {
            return Err(err("", "expected a JSON object".to_string()));
        };
        let string = |key: &str| -> Result<Option<String>> {
            match obj.get(key) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(err(
                    &format!(".{key}"),
                    format!("expected a string, found {other}"),
                )),
            }
        };
        let target = match (string("target")?, obj.contains_key("choices")) {
            (None, true) => {
                let (_, choices, label) =
                    choice_line(path, i + 1, &obj, "choices", 1, "label", "choice")?;
                Some(choices[label].clone())
            }
            (Some(_), true) => {
                return Err(err(
                    ".choices",
                    "give either \"target\" or \"choices\" with \"label\", not both".into(),
                ))
            }
            (target, false) => target,
        };
        let ex = match (string("input")?, target, string("text")?) {
            (Some(input), Some(target), None) => StatsExample::Pair { input, target },
            (None, None, Some(text)) => StatsExample::Text { text },
            (Some(_), None, None) => {
                return Err(err(
                    ".target",
                    "missing (an \"input\" needs a \"target\", or \"choices\" and a \"label\")"
                        .into(),
                ))
            }
            (None, Some(_), None) => {
                return Err(err(
                    ".input",
                    "missing (a \"target\" needs an \"input\")".into(),
                ))
            }
            (None, None, None) => {
                return Err(err(
                    "",
                    "expected {\"input\", \"target\"}, {\"input\", \"choices\", \"label\"} or \
                     {\"text\"}"
                        .to_string(),
                ))
            }
            _ => {
                return Err(err(
                    ".text",
                    "give either {\"input\", \"target\"} or {\"text\"}, not both".to_string(),
                ))
            }
        };
        out.push(ex);
    }
    Ok(out)
}

/// Tokenizes one example with `encode(text, add_special_tokens)`; `prefix` is the id put in
/// front of an empty context (the tokenizer's BOS, else EOS, as [`crate::score`] and
/// lm-eval's prefix token do); `index` (0-based) names the example in errors. An example that
/// scores no token is an error.
pub fn tokenize_example(
    encode: &mut dyn FnMut(&str, bool) -> Result<Vec<u32>>,
    prefix: Option<u32>,
    ex: &StatsExample,
    index: usize,
) -> Result<ExampleTokens> {
    let (input, target) = match ex {
        StatsExample::Pair { input, target } => (input.as_str(), target.as_str()),
        StatsExample::Text { text } => ("", text.as_str()),
    };
    let mut ctx = encode(input, true)?;
    let whole = encode(&format!("{input}{target}"), true)?;
    let cont = if whole.starts_with(&ctx) {
        whole[ctx.len()..].to_vec()
    } else {
        encode(target, false)?
    };
    if ctx.is_empty() {
        ctx.extend(prefix);
    }
    let start = ctx.len();
    let mut ids = ctx;
    ids.extend(cont);
    if start == 0 || start >= ids.len() {
        let what = if start == 0 {
            "the input gives no token to condition on and the tokenizer has no BOS or EOS"
        } else {
            match ex {
                StatsExample::Pair { .. } => "the target gives no token after the input",
                StatsExample::Text { .. } => "the text gives no token",
            }
        };
        return Err(EvalError::Other(format!(
            "statistics example {index}: nothing to score: {what}"
        )));
    }
    Ok(ExampleTokens { ids, start })
}

impl ExampleTokens {
    /// Fits the example into `max_positions` fed positions by dropping tokens from the left
    /// (as [`crate::score`] does), keeping every scored token and one before them; `index`
    /// names the example in errors.
    pub fn truncate_left(mut self, max_positions: usize, index: usize) -> Result<ExampleTokens> {
        let positions = self.positions();
        if positions <= max_positions {
            return Ok(self);
        }
        let drop = positions - max_positions;
        if drop >= self.start {
            return Err(EvalError::Other(format!(
                "statistics example {index}: its {} scored tokens do not fit in max_position_embeddings {max_positions}",
                self.loss_tokens()
            )));
        }
        self.ids.drain(..drop);
        self.start -= drop;
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms_and_names_bad_fields() {
        let p = Path::new("d.jsonl");
        let v = parse_jsonl(
            p,
            "{\"input\":\"a\",\"target\":\"b\"}\n\n{\"text\":\"t\"}\n",
        )
        .unwrap();
        assert_eq!(
            v,
            vec![
                StatsExample::Pair {
                    input: "a".into(),
                    target: "b".into()
                },
                StatsExample::Text { text: "t".into() }
            ]
        );
        let e = parse_jsonl(p, "{\"text\":\"t\"}\n{\"input\":\"a\"}").unwrap_err();
        let s = e.to_string();
        assert!(s.contains("line 2.target"), "{s}");
        let e = parse_jsonl(p, "{\"input\":1,\"target\":\"b\"}").unwrap_err();
        assert!(e.to_string().contains("line 1.input"), "{e}");
        assert!(parse_jsonl(p, "[1]").is_err());
        assert!(parse_jsonl(p, "{\"text\":\"a\",\"input\":\"b\",\"target\":\"c\"}").is_err());
    }

    #[test]
    fn a_rank_classification_line_is_its_input_and_correct_choice() {
        let p = Path::new("task.jsonl");
        let v = parse_jsonl(
            p,
            "{\"input\":\"Grass is\",\"choices\":[\" purple\",\" green\"],\"label\":1}\n",
        )
        .unwrap();
        assert_eq!(
            v,
            vec![StatsExample::Pair {
                input: "Grass is".into(),
                target: " green".into()
            }]
        );
        for (line, field) in [
            (
                "{\"input\":\"a\",\"choices\":[\"x\"],\"label\":1}",
                "line 1.label",
            ),
            (
                "{\"input\":\"a\",\"choices\":[\"x\"],\"label\":-1}",
                "line 1.label",
            ),
            ("{\"input\":\"a\",\"choices\":[\"x\"]}", "line 1.label"),
            (
                "{\"input\":\"a\",\"choices\":\"x\",\"label\":0}",
                "line 1.choices",
            ),
            (
                "{\"input\":\"a\",\"choices\":[2],\"label\":0}",
                "line 1.choices",
            ),
            (
                "{\"input\":\"a\",\"target\":\"b\",\"choices\":[\"x\"],\"label\":0}",
                "line 1.choices",
            ),
        ] {
            let e = parse_jsonl(p, line).unwrap_err().to_string();
            assert!(e.contains(field), "{line}: {e}");
        }
    }

    /// A toy tokenizer: BOS 0 when `special`, then one id per character (its code point),
    /// except that "b " merges into a single id 999.
    fn toy(text: &str, special: bool) -> Result<Vec<u32>> {
        let mut v = if special { vec![0] } else { vec![] };
        let s = text.replace("b ", "#");
        for c in s.chars() {
            v.push(if c == '#' { 999 } else { c as u32 });
        }
        Ok(v)
    }

    #[test]
    fn tokenizes_like_lm_eval() {
        let mut enc = |t: &str, s: bool| toy(t, s);
        let ex = StatsExample::Pair {
            input: "ab".into(),
            target: "cd".into(),
        };
        let t = tokenize_example(&mut enc, Some(0), &ex, 0).unwrap();
        assert_eq!(t.ids, vec![0, 97, 98, 99, 100]);
        assert_eq!((t.start, t.positions(), t.loss_tokens()), (3, 4, 2));
        assert_eq!(t.fed(), &[0, 97, 98, 99]);
        // "ab" + " c": whole = [0, 97, 999, 99] does not start with ctx [0, 97, 98]: fallback.
        let ex = StatsExample::Pair {
            input: "ab".into(),
            target: " c".into(),
        };
        let t = tokenize_example(&mut enc, Some(0), &ex, 0).unwrap();
        assert_eq!(t.ids, vec![0, 97, 98, 32, 99]);
        assert_eq!(t.start, 3);
        let t = tokenize_example(
            &mut enc,
            Some(0),
            &StatsExample::Text { text: "ab".into() },
            0,
        )
        .unwrap();
        assert_eq!((t.ids, t.start), (vec![0, 97, 98], 1));
        let empty = StatsExample::Pair {
            input: "ab".into(),
            target: String::new(),
        };
        let e = tokenize_example(&mut enc, Some(0), &empty, 4).unwrap_err();
        assert!(e.to_string().contains("example 4"), "{e}");
        // A tokenizer with no BOS: an empty context becomes the prefix id.
        let mut nobos = |t: &str, _s: bool| toy(t, false);
        let text = StatsExample::Text { text: "ab".into() };
        let t = tokenize_example(&mut nobos, Some(7), &text, 0).unwrap();
        assert_eq!((t.ids.clone(), t.start), (vec![7, 97, 98], 1));
        assert!(tokenize_example(&mut nobos, None, &text, 0).is_err());
        // Left truncation keeps the scored tokens and one before them.
        let t = t.truncate_left(2, 0).unwrap();
        assert_eq!((t.ids.clone(), t.start), (vec![7, 97, 98], 1));
        let long = StatsExample::Pair {
            input: "abc".into(),
            target: "d".into(),
        };
        let t = tokenize_example(&mut enc, Some(0), &long, 0).unwrap();
        assert_eq!((t.ids.clone(), t.start), (vec![0, 97, 98, 99, 100], 4));
        let t = t.truncate_left(2, 0).unwrap();
        assert_eq!((t.ids.clone(), t.start), (vec![98, 99, 100], 2));
        let t = tokenize_example(&mut enc, Some(0), &ex, 0).unwrap();
        assert!(t
            .truncate_left(1, 9)
            .unwrap_err()
            .to_string()
            .contains("example 9"));
    }
}
