//! Whether a kernel's main loop issues every input's load before it uses any loaded value,
//! read from the SASS that `cuobjdump` disassembles from an NVRTC cubin (no GPU needed).
//!
//! The merge kernels are memory-bound: an iteration's loads must all be in flight together.
//! When a load's data is used before the next load is issued (the compiler decoded each 2-byte
//! input in the branch that loaded it, or delayed a load for its registers), each iteration
//! waits for memory once per input instead of once. Nothing else shows this without a device:
//! results stay exact, only the time grows. The hot kernels are checked by a test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The hot kernels whose main loop issues every load before the first use (their 2-byte
/// paths included; the general `gta_*` instances decode 2-byte inputs as they load them).
pub const LOADS_FIRST: &[&str] = &[
    "linear_merge_2",
    "linear_merge_4",
    "linear_merge_8",
    "gta_plain_2_v8",
    "gta_plain_4_v8",
    "gta_rank_4_v8",
    "gta_dare_4_v8",
    "gta_plain_8_h",
    "gta_rank_8_h",
    "gta_dare_8_h",
    "bracket_pass_4",
    "bracket_pass_8",
    "bracket_pass_16",
    "tie_pass_4",
    "tie_pass_8",
    "tie_pass_16",
];

/// The main loop of one kernel: its loads, and how many of them issue after the first
/// instruction that reads a loaded register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopLoads {
    /// Instructions in the loop.
    pub instructions: usize,
    /// Global (or generic) loads in the loop.
    pub loads: usize,
    /// Loads issued after the first use of a loaded value.
    pub late: usize,
    /// The first use (`None`: no loaded value is read in the loop).
    pub first_use: Option<String>,
}

/// `cuobjdump`: `$AMALGAM_CUOBJDUMP`, else the one `.ci/run` unpacks beside NVRTC
/// (`$AMALGAM_NVRTC_DIR`, by default `~/.cache/amalgam-nvrtc`, under `cuobjdump/`), else one on
/// `PATH`.
pub fn cuobjdump() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("AMALGAM_CUOBJDUMP") {
        return Some(PathBuf::from(p));
    }
    let dir = std::env::var_os("AMALGAM_NVRTC_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/amalgam-nvrtc")));
    if let Some(p) = dir.map(|d| d.join("cuobjdump/nvidia/cu13/bin/cuobjdump")) {
        if p.is_file() {
            return Some(p);
        }
    }
    let ok = Command::new("cuobjdump").arg("--version").output();
    ok.is_ok_and(|o| o.status.success())
        .then(|| PathBuf::from("cuobjdump"))
}

/// The SASS of every kernel in `cubin`, by kernel name (`tool` is `cuobjdump`).
pub fn disassemble(tool: &Path, cubin: &[u8]) -> Result<BTreeMap<String, String>, String> {
    let file = std::env::temp_dir().join(format!("amalgam-sass-{}.cubin", std::process::id()));
    std::fs::write(&file, cubin).map_err(|e| format!("writing {}: {e}", file.display()))?;
    let out = Command::new(tool).arg("-sass").arg(&file).output();
    let _ = std::fs::remove_file(&file);
    let out = out.map_err(|e| format!("running {}: {e}", tool.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} -sass failed: {}",
            tool.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut by_kernel = BTreeMap::new();
    let mut name: Option<String> = None;
    let mut body = String::new();
    for line in text.lines() {
        if let Some(rest) = line.trim().strip_prefix("Function : ") {
            if let Some(n) = name.take() {
                by_kernel.insert(n, std::mem::take(&mut body));
            }
            name = Some(rest.trim().to_string());
        } else if name.is_some() {
            body.push_str(line);
            body.push('\n');
        }
    }
    if let Some(n) = name {
        by_kernel.insert(n, body);
    }
    Ok(by_kernel)
}

/// The instructions of a SASS listing: (address, text without the predicate guard's effect on
/// reading, the trailing `;` removed).
fn instructions(sass: &str) -> Vec<(u64, String)> {
    sass.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let rest = l.strip_prefix("/*")?;
            let (addr, rest) = rest.split_once("*/")?;
            let addr = u64::from_str_radix(addr, 16).ok()?;
            let text = rest.split(';').next()?.trim();
            (!text.is_empty()).then(|| (addr, text.to_string()))
        })
        .collect()
}

/// The opcode and operands of an instruction, without its predicate guard (`@P0`, `@!UP1`).
fn split(text: &str) -> (&str, Vec<&str>) {
    let t = match text.strip_prefix('@') {
        Some(r) => r.split_once(' ').map_or("", |(_, rest)| rest.trim_start()),
        None => text,
    };
    let (op, args) = t.split_once(' ').unwrap_or((t, ""));
    (op, args.split(',').map(str::trim).collect())
}

/// Whether `op` loads from global memory (or generic memory, which is global here).
fn is_load(op: &str) -> bool {
    op.starts_with("LDG.E") || op.starts_with("LD.E")
}

/// The register number an operand names (`R12`, `-R3`, `|R4|`, `R8.reuse`), if any.
fn reg(operand: &str) -> Option<u32> {
    let o = operand.trim_start_matches(['-', '|', '!']);
    let digits: String = o
        .strip_prefix('R')?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The registers an address operand (`desc[UR4][R12.64+0x10]`, `[R2.64]`) reads.
fn address_regs(operand: &str) -> Vec<u32> {
    operand.split('[').skip(1).filter_map(reg).collect()
}

/// The main loop of a kernel's SASS: of the loops (backward branches), the one with the most
/// data loads (16-byte or generic), then the longest; and its loads' order against their
/// first use.
pub fn main_loop(sass: &str) -> Option<LoopLoads> {
    let ins = instructions(sass);
    let mut best_key = (0, 0);
    let mut best: Option<std::ops::RangeInclusive<usize>> = None;
    for (i, (addr, text)) in ins.iter().enumerate() {
        let (op, args) = split(text);
        if !op.starts_with("BRA") {
            continue;
        }
        let Some(target) = args
            .last()
            .and_then(|a| a.strip_prefix("0x"))
            .and_then(|h| u64::from_str_radix(h, 16).ok())
        else {
            continue;
        };
        if target >= *addr {
            continue;
        }
        let start = ins.iter().position(|(a, _)| *a >= target)?;
        let body = &ins[start..=i];
        let data = body
            .iter()
            .filter(|(_, t)| {
                let (op, _) = split(t);
                is_load(op) && (op.contains(".128") || op.starts_with("LD.E"))
            })
            .count();
        let key = (data, body.len());
        if best.is_none() || key > best_key {
            best_key = key;
            best = Some(start..=i);
        }
    }
    let body = &ins[best?];
    let mut loaded: Vec<u32> = Vec::new();
    let (mut loads, mut late, mut first_use) = (0, 0, None::<String>);
    for (_, text) in body {
        let (op, args) = split(text);
        if is_load(op) {
            loads += 1;
            if first_use.is_some() {
                late += 1;
                continue;
            }
            if args
                .iter()
                .flat_map(|a| address_regs(a))
                .any(|r| loaded.contains(&r))
            {
                first_use = Some(text.clone());
                continue;
            }
            let width = if op.contains(".128") {
                4
            } else if op.contains(".64") {
                2
            } else {
                1
            };
            if let Some(r) = args.first().and_then(|a| reg(a)) {
                loaded.extend(r..r + width);
            }
            continue;
        }
        if first_use.is_some() {
            continue;
        }
        let reads = args
            .iter()
            .skip(1)
            .filter_map(|a| reg(a))
            .chain(args.iter().flat_map(|a| address_regs(a)));
        if reads.into_iter().any(|r| loaded.contains(&r)) {
            first_use = Some(text.clone());
            continue;
        }
        // A register written before any use no longer holds loaded data.
        let writes = !(op.starts_with("ST")
            || op.starts_with("RED")
            || op.starts_with("ISETP")
            || op.starts_with("FSETP")
            || op.starts_with("BRA"));
        if writes {
            if let Some(r) = args.first().and_then(|a| reg(a)) {
                loaded.retain(|&x| x != r);
            }
        }
    }
    Some(LoopLoads {
        instructions: body.len(),
        loads,
        late,
        first_use,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-written loop: three loads, the third issued after the first one's data is
    /// converted; then the same loop with the conversion after the loads.
    #[test]
    fn late_loads_are_counted_from_the_first_use() {
        let late = "
        /*0100*/                   LDG.E.128 R8, desc[UR4][R2.64] ;
        /*0110*/               @P0 LDG.E.128 R12, desc[UR4][R4.64] ;
        /*0120*/               @P1 HADD2.F32 R20, -RZ, R9.H0_H0 ;
        /*0130*/                   LDG.E.128 R16, desc[UR4][R6.64] ;
        /*0140*/                   FADD R21, R20, R17 ;
        /*0150*/                   STG.E desc[UR4][R2.64], R21 ;
        /*0160*/              @!P2 BRA 0x100 ;
        ";
        let l = main_loop(late).unwrap();
        assert_eq!((l.instructions, l.loads, l.late), (7, 3, 1));
        assert_eq!(
            l.first_use.as_deref(),
            Some("@P1 HADD2.F32 R20, -RZ, R9.H0_H0")
        );
        let first = late.replace(
            "/*0120*/               @P1 HADD2.F32 R20, -RZ, R9.H0_H0 ;\n        /*0130*/                   LDG.E.128 R16, desc[UR4][R6.64] ;",
            "/*0120*/                   LDG.E.128 R16, desc[UR4][R6.64] ;\n        /*0130*/               @P1 HADD2.F32 R20, -RZ, R9.H0_H0 ;",
        );
        let l = main_loop(&first).unwrap();
        assert_eq!((l.loads, l.late), (3, 0));
        // A load whose address comes from a loaded pointer uses that load.
        let chased = "
        /*0200*/                   LDG.E.64 R4, desc[UR4][R2.64] ;
        /*0210*/                   LD.E.128 R8, desc[UR4][R4.64] ;
        /*0220*/                   LD.E.128 R12, desc[UR4][R6.64] ;
        /*0230*/                   BRA 0x200 ;
        ";
        let l = main_loop(chased).unwrap();
        assert_eq!((l.loads, l.late), (3, 1));
        // A register overwritten before any use holds no loaded data any more.
        let overwritten = "
        /*0300*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0310*/                   IMAD.MOV.U32 R4, RZ, RZ, R7 ;
        /*0320*/                   FADD R5, R4, R4 ;
        /*0330*/                   LDG.E.128 R8, desc[UR4][R6.64] ;
        /*0340*/                   BRA 0x300 ;
        ";
        let l = main_loop(overwritten).unwrap();
        assert_eq!((l.loads, l.late), (2, 0));
        assert!(main_loop("/*0000*/ EXIT ;").is_none());
    }

    /// The hot kernels, as NVRTC compiles them for sm_90, issue every load of an iteration
    /// before they use one (f16/bf16 paths included).
    #[test]
    fn hot_loops_issue_every_load_before_the_first_use() {
        let Some(tool) = cuobjdump() else {
            assert!(
                std::env::var_os("AMALGAM_REQUIRE_CUOBJDUMP").is_none(),
                "AMALGAM_REQUIRE_CUOBJDUMP is set but cuobjdump was not found"
            );
            eprintln!("skipped: cuobjdump not found (AMALGAM_CUOBJDUMP, the NVRTC folder, PATH)");
            return;
        };
        let Some(cubin) = crate::occupancy::tests::sm90_cubin() else {
            return;
        };
        let sass = disassemble(&tool, cubin).unwrap_or_else(|e| panic!("{e}"));
        let mut bad = Vec::new();
        for k in LOADS_FIRST {
            let text = sass
                .get(*k)
                .unwrap_or_else(|| panic!("kernel {k} is not in the disassembly"));
            let l = main_loop(text).unwrap_or_else(|| panic!("{k}: no loop found"));
            eprintln!(
                "{k}: {} loads in a loop of {} instructions, {} after the first use",
                l.loads, l.instructions, l.late
            );
            assert!(l.loads >= 2, "{k}: the main loop was not found ({l:?})");
            if l.late > 0 {
                bad.push(format!(
                    "{k}: {} of {} loads after {}",
                    l.late,
                    l.loads,
                    l.first_use.unwrap_or_default()
                ));
            }
        }
        assert!(
            bad.is_empty(),
            "loads issued after a use:\n{}",
            bad.join("\n")
        );
    }
}
