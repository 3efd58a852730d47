//! The registers and spilled bytes of every kernel as NVRTC compiles it for one real
//! architecture, read from the cubin's `.nv.info` section without a GPU, and the blocks a
//! multiprocessor holds at that register count. The merge kernels are memory-bound where their
//! loads stay in flight: how many threads a multiprocessor keeps (their registers decide it)
//! moves their speed, so a test keeps the hot kernels at the occupancy they were measured at.

use crate::error::{CudaError, Result};
use crate::kernels::{program, require_nvrtc, FLAGS};
use cudarc::nvrtc::{result, sys};
use std::collections::BTreeMap;
use std::ffi::CString;

/// The hot kernels and the blocks of 256 threads per multiprocessor their registers must allow
/// on sm_90 (what they had when last measured, or what a change bought): linear, the
/// task-arithmetic family, the TIES selection passes.
pub const BUDGETS: &[(&str, u32)] = &[
    ("linear_merge_4", 4),
    ("gta_plain_4", 5),
    ("gta_rank_4", 5),
    ("gta_dare_4", 4),
    ("gta_plain_4_v8", 4),
    ("gta_rank_4_v8", 4),
    ("gta_dare_4_v8", 4),
    ("gta_plain_8_h", 4),
    ("bracket_pass_4", 5),
    ("bracket_pass_8", 3),
    ("tie_pass_4", 4),
    ("sample_hist", 5),
];

/// What one kernel takes of a multiprocessor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    /// Registers per thread.
    pub registers: u32,
    /// Bytes of local memory per thread for spilled registers (the stack frame).
    pub spill_bytes: u32,
}

/// The program compiled to a cubin for `arch` (a real architecture such as `sm_90`).
pub fn cubin(arch: &str) -> Result<Vec<u8>> {
    require_nvrtc()?;
    let err = |what: &str, e: &dyn std::fmt::Debug| CudaError::Compile {
        arch: arch.to_string(),
        log: format!("{what}: {e:?}"),
    };
    let src = CString::new(program()).map_err(|e| err("the program holds a NUL", &e))?;
    let prog = result::create_program(&src, None).map_err(|e| err("nvrtcCreateProgram", &e))?;
    let mut opts: Vec<String> = FLAGS.iter().map(|f| f.to_string()).collect();
    opts.push(format!("--gpu-architecture={arch}"));
    // SAFETY: `prog` was just created and is destroyed below, once.
    let out = unsafe {
        let compiled = result::compile_program(prog, &opts).map_err(|e| {
            let log = result::get_program_log(prog)
                .map(|l| {
                    let bytes: Vec<u8> =
                        l.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
                    String::from_utf8_lossy(&bytes).into_owned()
                })
                .unwrap_or_default();
            err("nvrtcCompileProgram", &format!("{e:?}\n{log}"))
        });
        let bin = compiled.and_then(|()| {
            let mut size = 0usize;
            sys::nvrtcGetCUBINSize(prog, &mut size)
                .result()
                .map_err(|e| err("nvrtcGetCUBINSize", &e))?;
            let mut bin = vec![0u8; size];
            sys::nvrtcGetCUBIN(prog, bin.as_mut_ptr().cast())
                .result()
                .map_err(|e| err("nvrtcGetCUBIN", &e))?;
            Ok(bin)
        });
        let _ = result::destroy_program(prog);
        bin
    };
    out
}

// `.nv.info` records: a format byte, an attribute byte and, for the sized format, a 16-bit
// length and that many bytes (here a 32-bit symbol index and a 32-bit value); the other formats
// carry a 16-bit value.
/// `.nv.info` attribute: registers per thread.
const EIATTR_REGCOUNT: u8 = 0x2f;
/// `.nv.info` attribute: the stack frame (spilled registers) in bytes.
const EIATTR_FRAME_SIZE: u8 = 0x11;
/// `.nv.info` record format with a length and a payload.
const EIFMT_SVAL: u8 = 4;

/// Every kernel's resources in `cubin` (an ELF64 file), by kernel name.
pub fn resources(cubin: &[u8]) -> Result<BTreeMap<String, Resources>> {
    let bad = |what: &str| CudaError::Invalid(format!("malformed cubin: {what}"));
    let at = |o: usize, n: usize| -> Result<&[u8]> {
        cubin.get(o..o + n).ok_or_else(|| bad("cut short"))
    };
    let u16_at = |o: usize| -> Result<u16> { Ok(u16::from_le_bytes([at(o, 2)?[0], at(o, 2)?[1]])) };
    let u32_at = |o: usize| -> Result<u32> {
        let b = at(o, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at =
        |o: usize| -> Result<usize> { Ok(u32_at(o)? as usize | (u32_at(o + 4)? as usize) << 32) };
    if cubin.get(..5) != Some(b"\x7fELF\x02") {
        return Err(bad("not an ELF64 file"));
    }
    let shoff = u64_at(0x28)?;
    let (shentsize, shnum, shstrndx) = (
        u16_at(0x3a)? as usize,
        u16_at(0x3c)? as usize,
        u16_at(0x3e)? as usize,
    );
    // (name offset, type, offset, size, link) of each section.
    let mut secs = Vec::with_capacity(shnum);
    for i in 0..shnum {
        let h = shoff + i * shentsize;
        secs.push((
            u32_at(h)? as usize,
            u32_at(h + 4)?,
            u64_at(h + 0x18)?,
            u64_at(h + 0x20)?,
            u32_at(h + 0x28)? as usize,
        ));
    }
    let cstr = |at: usize| -> Result<&str> {
        let tail = cubin.get(at..).ok_or_else(|| bad("string offset"))?;
        let end = tail
            .iter()
            .position(|&c| c == 0)
            .ok_or_else(|| bad("string"))?;
        std::str::from_utf8(&tail[..end]).map_err(|_| bad("string encoding"))
    };
    let names_at = secs.get(shstrndx).ok_or_else(|| bad("section names"))?.2;
    // Symbol names by index (SHT_SYMTAB = 2, 24-byte entries).
    let mut symbols = Vec::new();
    if let Some(&(_, _, off, size, link)) = secs.iter().find(|s| s.1 == 2) {
        let strings = secs.get(link).ok_or_else(|| bad("symbol names"))?.2;
        for k in 0..size / 24 {
            symbols.push(cstr(strings + u32_at(off + 24 * k)? as usize)?.to_string());
        }
    }
    let mut out: BTreeMap<String, Resources> = BTreeMap::new();
    for &(name, _, off, size, _) in &secs {
        if cstr(names_at + name)? != ".nv.info" {
            continue;
        }
        let mut p = off;
        while p + 4 <= off + size {
            let head = at(p, 4)?;
            let (format, attr) = (head[0], head[1]);
            if format != EIFMT_SVAL {
                p += 4;
                continue;
            }
            let len = u16_at(p + 2)? as usize;
            if len >= 8 && (attr == EIATTR_REGCOUNT || attr == EIATTR_FRAME_SIZE) {
                let sym = u32_at(p + 4)? as usize;
                let value = u32_at(p + 8)?;
                let name = symbols.get(sym).ok_or_else(|| bad("symbol index"))?;
                let r = out.entry(name.clone()).or_insert(Resources {
                    registers: 0,
                    spill_bytes: 0,
                });
                if attr == EIATTR_REGCOUNT {
                    r.registers = value;
                } else {
                    r.spill_bytes = value;
                }
            }
            p += 4 + len;
        }
    }
    Ok(out)
}

/// Blocks of `threads` threads one multiprocessor of compute capability 8.0-9.0 holds at
/// `registers` per thread, as far as registers and threads decide (65536 registers, allocated
/// per warp in units of 256; at most 2048 threads and 32 blocks). Shared memory is not counted.
pub fn blocks_per_sm(registers: u32, threads: u32) -> u32 {
    let per_warp = (registers.max(1) * 32).div_ceil(256) * 256;
    let per_block = per_warp * threads.div_ceil(32);
    (65536 / per_block).min(2048 / threads).min(32)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::OnceLock;

    /// The program's sm_90 cubin, compiled once per test process; `None` (printed) without
    /// NVRTC, unless `AMALGAM_REQUIRE_NVRTC` is set.
    pub(crate) fn sm90_cubin() -> Option<&'static [u8]> {
        if require_nvrtc().is_err() {
            assert!(
                std::env::var_os("AMALGAM_REQUIRE_NVRTC").is_none(),
                "AMALGAM_REQUIRE_NVRTC is set but libnvrtc was not found on LD_LIBRARY_PATH"
            );
            eprintln!("skipped: libnvrtc not found");
            return None;
        }
        static CUBIN: OnceLock<Vec<u8>> = OnceLock::new();
        Some(CUBIN.get_or_init(|| cubin("sm_90").unwrap_or_else(|e| panic!("{e}"))))
    }

    #[test]
    fn blocks_follow_the_register_file() {
        // Hand-worked: 32 registers → 1024 per warp, 8192 per 256-thread block → 8 blocks
        // (2048 threads); 48 → 5; 64 → 4; 65 (72 allocated) → 3; 128 → 2; 255 → 1.
        for (regs, blocks) in [
            (32, 8),
            (40, 6),
            (48, 5),
            (56, 4),
            (64, 4),
            (65, 3),
            (80, 3),
        ] {
            assert_eq!(blocks_per_sm(regs, 256), blocks, "{regs} registers");
        }
        assert_eq!(blocks_per_sm(128, 256), 2);
        assert_eq!(blocks_per_sm(255, 256), 1);
        assert_eq!(blocks_per_sm(32, 1024), 2);
    }

    /// The hot kernels keep the blocks of 256 threads per multiprocessor they had when they
    /// were measured (or that a change bought), on sm_90 with this NVRTC; no kernel spills.
    #[test]
    fn kernels_keep_their_occupancy_on_sm_90() {
        let Some(cubin) = sm90_cubin() else {
            return;
        };
        let res = resources(cubin).unwrap();
        for k in crate::kernels::KERNELS.iter().chain(crate::cg::KERNELS) {
            let r = res
                .get(*k)
                .unwrap_or_else(|| panic!("kernel {k} is not in the cubin"));
            assert_eq!(r.spill_bytes, 0, "{k} spills {} bytes", r.spill_bytes);
        }
        for &(k, min) in BUDGETS {
            let r = res[k];
            let blocks = blocks_per_sm(r.registers, 256);
            eprintln!(
                "{k}: {} registers, {blocks} blocks of 256 per SM",
                r.registers
            );
            assert!(
                blocks >= min,
                "{k}: {} registers leave {blocks} blocks of 256 threads per multiprocessor, \
                 fewer than {min}",
                r.registers
            );
        }
    }
}
