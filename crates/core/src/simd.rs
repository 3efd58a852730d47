//! Runtime dispatch of the hot elementwise kernels to AVX2 (or AVX-512) code.
//!
//! The binary is built for the baseline x86-64 target, so that it runs on any x86-64 CPU. The
//! merge loops (decoding, masking, mixing) are plain elementwise code that the compiler
//! vectorises; built with AVX2 enabled they run on 8 lanes instead of 4 and use AVX2's
//! integer and blend instructions. A kernel is therefore written once, as an
//! `#[inline(always)]` body, and compiled twice by [`run`]: inlined into a function with
//! `#[target_feature(enable = "avx2")]` and into the plain caller. [`run`] picks one per tile
//! or block (not per element) with [`avx2`]:
//!
//! ```
//! fn scale(v: &mut [f32], f: f32) {
//!     amalgam_core::simd::run(
//!         #[inline(always)]
//!         || v.iter_mut().for_each(|x| *x *= f),
//!     )
//! }
//! let mut v = [1.0f32, 2.0];
//! scale(&mut v, 0.5);
//! assert_eq!(v, [0.5, 1.0]);
//! ```
//!
//! A function the body calls without inlining it (a `dyn` method, a thread-local's `with`)
//! runs its baseline build: such calls either dispatch themselves or stay outside the body.
//!
//! Only vectorisation changes, never the arithmetic: Rust never contracts `a * b + c` into a
//! fused multiply-add on its own (not even where FMA is enabled, as AVX-512 implies), and no
//! kernel calls `mul_add`, so every element goes through exactly the same IEEE f32
//! operations and the results are bit-identical on every path.
//!
//! Where the CPU also has AVX-512 (F, BW, VL, DQ), [`run`] uses a third build of the same body
//! with those enabled (16 lanes, mask registers): measured on the `amalgam bench` bf16 TIES
//! merge, about 15% less CPU time than the AVX2 build, the same bits.
//!
//! `AMALGAM_NO_AVX2=1` (any value but empty or `0`) in the environment forces the plain path
//! for the whole process (to compare the two), `AMALGAM_NO_AVX512=1` the AVX2 path;
//! [`force_plain`] forces the plain path on the calling thread only (tests, which run
//! concurrently in one process and so cannot use the environment).

use std::cell::Cell;
use std::sync::OnceLock;

thread_local! {
    /// The widest build this thread may run: 0 plain, 1 AVX2, 2 AVX-512 ([`force_plain`],
    /// [`force_avx2`]).
    static CAP: Cell<u8> = const { Cell::new(2) };
}

/// Whether the environment variable `var` is set to anything but empty or `0`.
fn disabled_by(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| !v.is_empty() && v != "0")
}

/// The process-wide choice: AVX2 detected and not disabled by `AMALGAM_NO_AVX2`.
fn detected() -> bool {
    static AVX2: OnceLock<bool> = OnceLock::new();
    *AVX2.get_or_init(|| !disabled_by("AMALGAM_NO_AVX2") && cpu_has_avx2())
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_avx2() -> bool {
    false
}

/// Whether the calling thread should run the AVX2 entry points of the kernels: the CPU has
/// AVX2, `AMALGAM_NO_AVX2` does not disable it and [`force_plain`] is not set on this thread.
/// Always `false` off x86-64. Cheap (a thread-local and a cached flag): call it once per tile.
#[inline]
pub fn avx2() -> bool {
    detected() && CAP.with(Cell::get) >= 1
}

/// Force (`true`) or stop forcing (`false`) the plain kernels on the calling thread. For tests
/// and comparisons: set it on every thread of a rayon pool with the pool's start handler.
pub fn force_plain(on: bool) {
    CAP.with(|f| f.set(if on { 0 } else { 2 }));
}

/// Force (`true`) or stop forcing (`false`) at most the AVX2 kernels on the calling thread (no
/// AVX-512), as [`force_plain`].
pub fn force_avx2(on: bool) {
    CAP.with(|f| f.set(if on { 1 } else { 2 }));
}

/// Run `f` compiled with AVX-512 or AVX2 enabled when [`avx512`] or [`avx2`] allows it, else
/// as it is. Pass a closure
/// marked `#[inline(always)]` whose hot loops are inlined too (`#[inline(always)]` kernels,
/// iterator adaptors): code inlined into the AVX2 entry point is compiled for AVX2, while a
/// call to a function that is not inlined runs that function's baseline code. Both copies
/// perform the same operations, so they compute the same bits. Call it once per tile or block.
#[inline(always)]
pub fn run<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if avx2() {
            if avx512() {
                // SAFETY: `avx512()` is true only when the CPU reports every feature the
                // entry point enables.
                return unsafe { run_avx512(f) };
            }
            // SAFETY: `avx2()` is true only when the CPU reports AVX2, the only feature the
            // entry point enables.
            return unsafe { run_avx2(f) };
        }
    }
    f()
}

/// Whether the AVX-512 entry point is used: [`avx2`] holds, the CPU has AVX-512 F, BW, VL and
/// DQ, and neither `AMALGAM_NO_AVX512` nor [`force_avx2`] disables it.
#[inline]
pub fn avx512() -> bool {
    static AVX512: OnceLock<bool> = OnceLock::new();
    avx2()
        && CAP.with(Cell::get) >= 2
        && *AVX512.get_or_init(|| !disabled_by("AMALGAM_NO_AVX512") && cpu_has_avx512())
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512dq")
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_avx512() -> bool {
    false
}

/// The AVX2 entry point of [`run`]: `f`, inlined here, is compiled with AVX2 enabled.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn run_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// The AVX-512 entry point of [`run`].
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and DQ.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
unsafe fn run_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn force_plain_is_per_thread() {
        force_plain(true);
        assert!(!avx2());
        let other = std::thread::spawn(|| avx2() == detected())
            .join()
            .expect("thread");
        assert!(other);
        force_plain(false);
        assert_eq!(avx2(), detected());
    }

    #[test]
    fn both_paths_compute_the_same_bits() {
        let x = [1.5f32, -2.0, 3.25, 0.1];
        let run = |plain: bool| {
            force_plain(plain);
            let mut out = [0.0f32; 4];
            run(
                #[inline(always)]
                || {
                    for (o, v) in out.iter_mut().zip(&x) {
                        *o = v * 0.3;
                    }
                },
            );
            force_plain(false);
            out.map(f32::to_bits)
        };
        assert_eq!(run(true), run(false));
    }
}
