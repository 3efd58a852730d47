//! `model+adapter` inputs: a PEFT adapter written here is applied on the fly, checked against
//! `W + s·B·A` (LoRA) and `diag(l)·W` / `W·diag(l)` ((IA)³) computed here in float64.

use crate::common::*;
use amalgam_io::peft::{ia3_key, lora_a_key, lora_b_key};
use amalgam_io::{write_adapter, AdapterConfig, Ia3Config, LoraConfig, TargetModules};

fn vals(seed: u64, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 1000.0 - 0.5) * 0.1)
        .collect()
}

#[test]
fn lora_adapter_applied_to_its_base() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    generate(d, "base", &["--seed", "5"]);
    let base = load_dir(&d.join("base"));
    let module = "model.layers.1.self_attn.q_proj";
    let (dout, din) = (
        base[&format!("{module}.weight")].shape[0],
        base[&format!("{module}.weight")].shape[1],
    );
    let r = 4;
    let a = vals(1, r * din);
    let b = vals(2, dout * r);
    let cfg = AdapterConfig::Lora(LoraConfig::new(
        r,
        8.0,
        TargetModules::List(vec!["q_proj".into()]),
    ));
    write_adapter(
        &d.join("lora"),
        &cfg,
        &[
            (lora_a_key(module), vec![r, din], a.as_slice()),
            (lora_b_key(module), vec![dout, r], b.as_slice()),
        ],
        false,
    )
    .unwrap();
    std::fs::write(
        d.join("p.yaml"),
        "merge_method: passthrough\nmodels:\n  - model: base+lora\n",
    )
    .unwrap();
    run_ok(d, &["merge", "p.yaml", "--out", "out", "--quiet"]);
    // The cluster path (an embedded coordinator, 2 workers, several shards) applies the adapter
    // on the workers: the same bytes.
    let argv = [
        "merge",
        "p.yaml",
        "--out",
        "out-w2",
        "--quiet",
        "--workers",
        "2",
    ];
    run_ok(d, &[&argv[..], &["--shard-size", "40KB"]].concat());
    for f in final_outputs(&d.join("out")) {
        assert!(
            std::fs::read(d.join("out").join(&f)).unwrap()
                == std::fs::read(d.join("out-w2").join(&f)).unwrap(),
            "{f} differs with --workers 2"
        );
    }
    let out = load_dir(&d.join("out"));
    let w = &base[&format!("{module}.weight")].values;
    let s = 8.0 / r as f64;
    let want: Vec<f64> = (0..dout * din)
        .map(|e| {
            let (o, i) = (e / din, e % din);
            w[e] + s
                * (0..r)
                    .map(|j| b[o * r + j] as f64 * a[j * din + i] as f64)
                    .sum::<f64>()
        })
        .collect();
    assert_close(
        module,
        &out[&format!("{module}.weight")].values,
        &want,
        1e-6,
        1e-3,
    );
    // Untouched weights are the base's.
    let other = "model.layers.0.self_attn.q_proj.weight";
    assert_eq!(out[other].values, base[other].values);
    // A LoRA merged with its base equals it; a missing adapter module in the base is refused.
    let bad = AdapterConfig::Lora(LoraConfig::new(
        r,
        8.0,
        TargetModules::List(vec!["nope".into()]),
    ));
    write_adapter(
        &d.join("bad"),
        &bad,
        &[
            (
                lora_a_key("model.layers.9.nope"),
                vec![r, din],
                a.as_slice(),
            ),
            (
                lora_b_key("model.layers.9.nope"),
                vec![dout, r],
                b.as_slice(),
            ),
        ],
        false,
    )
    .unwrap();
    std::fs::write(
        d.join("b.yaml"),
        "merge_method: passthrough\nmodels:\n  - model: base+bad\n",
    )
    .unwrap();
    let e = run_err(d, &["merge", "b.yaml", "--out", "out-bad"]);
    assert!(e.contains("model.layers.9.nope"), "{e}");
}

#[test]
fn ia3_adapter_scales_outputs_and_feedforward_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    generate(d, "base", &["--seed", "5"]);
    let base = load_dir(&d.join("base"));
    let k = "model.layers.0.self_attn.k_proj";
    let down = "model.layers.0.mlp.down_proj";
    let (kout, _) = (base[&format!("{k}.weight")].shape[0], 0);
    let (dout, din) = (
        base[&format!("{down}.weight")].shape[0],
        base[&format!("{down}.weight")].shape[1],
    );
    let lk: Vec<f32> = vals(3, kout).iter().map(|v| 1.0 + v).collect();
    let ld: Vec<f32> = vals(4, din).iter().map(|v| 1.0 + v).collect();
    let cfg = AdapterConfig::Ia3(Ia3Config::new(
        TargetModules::List(vec!["k_proj".into(), "down_proj".into()]),
        TargetModules::List(vec!["down_proj".into()]),
    ));
    write_adapter(
        &d.join("ia3"),
        &cfg,
        &[
            (ia3_key(k), vec![kout, 1], lk.as_slice()),
            (ia3_key(down), vec![1, din], ld.as_slice()),
        ],
        false,
    )
    .unwrap();
    std::fs::write(
        d.join("p.yaml"),
        "merge_method: passthrough\nmodels:\n  - model: base+ia3\n",
    )
    .unwrap();
    run_ok(d, &["merge", "p.yaml", "--out", "out", "--quiet"]);
    let out = load_dir(&d.join("out"));
    let wk = &base[&format!("{k}.weight")];
    let cols = wk.shape[1];
    let want: Vec<f64> = wk
        .values
        .iter()
        .enumerate()
        .map(|(e, v)| v * lk[e / cols] as f64)
        .collect();
    assert_close(k, &out[&format!("{k}.weight")].values, &want, 1e-6, 1e-3);
    let wd = &base[&format!("{down}.weight")];
    let want: Vec<f64> = wd
        .values
        .iter()
        .enumerate()
        .map(|(e, v)| v * ld[e % din] as f64)
        .collect();
    assert_eq!(wd.values.len(), dout * din);
    assert_close(
        down,
        &out[&format!("{down}.weight")].values,
        &want,
        1e-6,
        1e-3,
    );
}
