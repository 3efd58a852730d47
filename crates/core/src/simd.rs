//! Runtime dispatch of the hot elementwise kernels to AVX2 code.
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
//! Only vectorisation changes, never the arithmetic: the AVX2 entry points do not enable FMA
//! (Rust never contracts `a * b + c` on its own, and no kernel calls `mul_add`), so every
//! element goes through exactly the same IEEE f32 operations and the results are
//! bit-identical on either path.
//!
//! `AMALGAM_NO_AVX2=1` (any value but empty or `0`) in the environment forces the plain path
//! for the whole process (to compare the two); [`force_plain`] forces it on the calling thread
//! only (tests, which run concurrently in one process and so cannot use the environment).

use std::cell::Cell;
use std::sync::OnceLock;

thread_local! {
    static FORCE_PLAIN: Cell<bool> = const { Cell::new(false) };
}

/// The process-wide choice: AVX2 detected and not disabled by `AMALGAM_NO_AVX2`.
fn detected() -> bool {
    static AVX2: OnceLock<bool> = OnceLock::new();
    *AVX2.get_or_init(|| {
        let disabled =
            std::env::var_os("AMALGAM_NO_AVX2").is_some_and(|v| !v.is_empty() && v != "0");
        !disabled && cpu_has_avx2()
    })
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
    detected() && !FORCE_PLAIN.with(Cell::get)
}

/// Force (`true`) or stop forcing (`false`) the plain kernels on the calling thread. For tests
/// and comparisons: set it on every thread of a rayon pool with the pool's start handler.
pub fn force_plain(on: bool) {
    FORCE_PLAIN.with(|f| f.set(on));
}

/// Run `f` compiled with AVX2 enabled when [`avx2`] allows it, else as it is. Pass a closure
/// marked `#[inline(always)]` whose hot loops are inlined too (`#[inline(always)]` kernels,
/// iterator adaptors): code inlined into the AVX2 entry point is compiled for AVX2, while a
/// call to a function that is not inlined runs that function's baseline code. Both copies
/// perform the same operations, so they compute the same bits. Call it once per tile or block.
#[inline(always)]
pub fn run<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if avx2() {
            // SAFETY: `avx2()` is true only when the CPU reports AVX2, the only feature the
            // entry point enables.
            return unsafe { run_avx2(f) };
        }
    }
    f()
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
