//! Parity with mergekit 0.1.5 itself: the fixtures under tests/fixtures/mergekit were made by
//! `make_fixtures.py` (which runs mergekit in a virtualenv; CI does not run it). Each config is
//! merged here with amalgam and every tensor compared at 1e-5 relative.

use crate::common::*;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mergekit")
}

#[test]
fn every_fixture_matches_mergekit() {
    let root = fixtures();
    let configs = root.join("configs");
    let Ok(entries) = std::fs::read_dir(&configs) else {
        panic!("no fixtures at {}", configs.display());
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    names.sort();
    assert!(!names.is_empty());
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for n in &names {
        let case = n.trim_end_matches(".yaml");
        let expected = root.join("expected").join(case);
        if !expected.exists() {
            continue;
        }
        let out = tmp.path().join(case);
        run_ok(
            &root,
            &[
                "merge",
                &format!("configs/{n}"),
                "--out",
                out.to_str().unwrap(),
                "--quiet",
            ],
        );
        let got = load_dir(&out);
        let want = load_dir(&expected);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{case}: tensor names differ"
        );
        for (name, w) in &want {
            let g = &got[name];
            assert_eq!(g.shape, w.shape, "{case}: {name} shape");
            let scale = w.values.iter().fold(0f64, |a, v| a.max(v.abs()));
            assert_close(
                &format!("{case}: {name}"),
                &g.values,
                &w.values,
                1e-5,
                1e-3 * scale,
            );
        }
        checked += 1;
    }
    println!("checked {checked} mergekit fixtures");
    assert!(checked > 0, "no fixture had expected outputs");
}
