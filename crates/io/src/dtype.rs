//! Element types of safetensors tensors and the conversions between them and f32.
//!
//! Decoding (stored dtype → f32) is exact for F16, BF16 and F32; F64 rounds to nearest f32.
//! Encoding (f32 → stored dtype) rounds to nearest, ties to even (via `half` for F16 and BF16),
//! and keeps NaN a NaN. All byte layouts are little-endian, as the safetensors format requires.

use std::fmt;

use half::f16;
use half::prelude::HalfFloatSliceExt;
use rayon::prelude::*;

/// The dtype of a tensor, as named in safetensors headers (`"F32"`, `"BF16"`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    BF16,
    /// 64-bit IEEE float.
    F64,
    /// 64-bit signed integer.
    I64,
    /// 32-bit signed integer.
    I32,
    /// 16-bit signed integer.
    I16,
    /// 8-bit signed integer.
    I8,
    /// 8-bit unsigned integer.
    U8,
    /// Boolean (one byte).
    Bool,
    /// 8-bit float, 4 exponent bits, 3 mantissa bits (`F8_E4M3`, the "fn" variant: no infinities).
    F8E4M3,
    /// 8-bit float, 5 exponent bits, 2 mantissa bits (`F8_E5M2`).
    F8E5M2,
    /// Any other dtype string, kept verbatim; an error only where it must be converted.
    Other(String),
}

impl DType {
    /// Parses a safetensors dtype string; unknown strings become [`DType::Other`].
    pub fn parse(s: &str) -> DType {
        match s {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F64" => DType::F64,
            "I64" => DType::I64,
            "I32" => DType::I32,
            "I16" => DType::I16,
            "I8" => DType::I8,
            "U8" => DType::U8,
            "BOOL" => DType::Bool,
            "F8_E4M3" => DType::F8E4M3,
            "F8_E5M2" => DType::F8E5M2,
            other => DType::Other(other.to_string()),
        }
    }

    /// Parses a config dtype name (`float32`, `fp16`, `bfloat16`, `torch.float16`, `F32`, ...).
    /// Returns `None` for names that are not a dtype amalgam can write merged values in.
    pub fn from_config_name(name: &str) -> Option<DType> {
        let n = name.trim();
        let n = n.strip_prefix("torch.").unwrap_or(n);
        match n.to_ascii_lowercase().as_str() {
            "float32" | "fp32" | "f32" | "float" => Some(DType::F32),
            "float16" | "fp16" | "f16" | "half" => Some(DType::F16),
            "bfloat16" | "bf16" => Some(DType::BF16),
            "float64" | "fp64" | "f64" | "double" => Some(DType::F64),
            _ => None,
        }
    }

    /// The safetensors dtype string (`"F32"`, `"BOOL"`, `"F8_E4M3"`, or the `Other` string).
    pub fn as_str(&self) -> &str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F64 => "F64",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
            DType::Other(s) => s,
        }
    }

    /// Bits per element, when known (also for the safetensors dtypes kept as `Other`:
    /// `U16`, `U32`, `U64`, `C64`, `F8_E8M0`, `F8_E4M3FNUZ`, `F8_E5M2FNUZ`, `F4`, `F6_E2M3`, `F6_E3M2`).
    pub fn bits(&self) -> Option<usize> {
        Some(match self {
            DType::F64 | DType::I64 => 64,
            DType::F32 | DType::I32 => 32,
            DType::F16 | DType::BF16 | DType::I16 => 16,
            DType::I8 | DType::U8 | DType::Bool | DType::F8E4M3 | DType::F8E5M2 => 8,
            DType::Other(s) => match s.as_str() {
                "U64" | "C64" => 64,
                "U32" => 32,
                "U16" => 16,
                "F8_E8M0" | "F8_E4M3FNUZ" | "F8_E5M2FNUZ" => 8,
                "F6_E2M3" | "F6_E3M2" => 6,
                "F4" => 4,
                _ => return None,
            },
        })
    }

    /// Bytes per element. Returns 0 for dtypes whose size is unknown or not a whole number of
    /// bytes (unknown `Other` strings, `F4`, `F6_*`); use [`DType::byte_len`] for exact sizes.
    pub fn size_bytes(&self) -> usize {
        match self.bits() {
            Some(b) if b % 8 == 0 => b / 8,
            _ => 0,
        }
    }

    /// Bytes taken by `numel` elements, or `None` when the dtype's size is unknown, the
    /// product overflows, or sub-byte elements do not fill whole bytes.
    pub fn byte_len(&self, numel: usize) -> Option<usize> {
        let bits = numel.checked_mul(self.bits()?)?;
        (bits % 8 == 0).then_some(bits / 8)
    }

    /// The dtype of an encoding merge loops and devices use as stored.
    pub fn from_raw(raw: amalgam_core::raw::RawDtype) -> DType {
        use amalgam_core::raw::RawDtype;
        match raw {
            RawDtype::F32 => DType::F32,
            RawDtype::F16 => DType::F16,
            RawDtype::Bf16 => DType::BF16,
        }
    }

    /// The encoding merge loops and devices read as stored (F32, F16, BF16), else `None`.
    pub fn raw(&self) -> Option<amalgam_core::raw::RawDtype> {
        use amalgam_core::raw::RawDtype;
        match self {
            DType::F32 => Some(RawDtype::F32),
            DType::F16 => Some(RawDtype::F16),
            DType::BF16 => Some(RawDtype::Bf16),
            _ => None,
        }
    }

    /// Whether merged (f32) values can be read from and written to this dtype: F32, F16, BF16.
    pub fn is_mergeable(&self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// Whether [`decode_f32`] and [`encode_f32`] accept this dtype: the mergeable ones and F64.
    pub fn is_float_convertible(&self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Number of elements converted per step through a stack buffer.
const CHUNK: usize = 1024;

/// Decodes little-endian `bytes` of `dtype` into `out` (`bytes.len()` must be
/// `out.len() * dtype.size_bytes()`). Returns `false` (and writes nothing) for a dtype that is
/// not float-convertible.
pub(crate) fn decode_f32(dtype: &DType, bytes: &[u8], out: &mut [f32]) -> bool {
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F64 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                let b: [u8; 8] = c.try_into().expect("chunks_exact(8) yields 8 bytes");
                *o = f64::from_le_bytes(b) as f32;
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        DType::F16 => {
            let mut tmp = [f16::ZERO; CHUNK];
            for (o, c) in out.chunks_mut(CHUNK).zip(bytes.chunks(CHUNK * 2)) {
                let t = &mut tmp[..o.len()];
                for (h, b) in t.iter_mut().zip(c.chunks_exact(2)) {
                    *h = f16::from_bits(u16::from_le_bytes([b[0], b[1]]));
                }
                t.convert_to_f32_slice(o);
            }
        }
        _ => return false,
    }
    true
}

/// `half`'s `bf16::from_f32` (round to nearest even; a NaN keeps its high bits with the quiet
/// bit set), written without branches so that loops over it vectorise.
#[inline(always)]
fn f32_to_bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    let nan = (x & 0x7FFF_FFFF) > 0x7F80_0000;
    let round = ((x & 0x8000) != 0 && (x & 0x1_7FFF) != 0) as u32;
    // Without overflow: a non-NaN `x >> 16` is at most 0xFF80 and rounds up only when the
    // dropped bits are non-zero (so below 0xFF80).
    let rounded = ((x >> 16) + round) as u16;
    let quiet = ((x >> 16) | 0x0040) as u16;
    if nan {
        quiet
    } else {
        rounded
    }
}

/// Encodes `src` into `out` (exactly `src.len() * dtype.size_bytes()` bytes) for a
/// float-convertible `dtype`, in the widest SIMD build of the loops the CPU has
/// (`amalgam_core::simd`; the same bytes).
fn encode_into(dtype: &DType, src: &[f32], out: &mut [u8]) {
    amalgam_core::simd::run(
        #[inline(always)]
        || encode_into_body(dtype, src, out),
    )
}

/// [`encode_into`]'s loops, inlined into both of its builds.
#[inline(always)]
fn encode_into_body(dtype: &DType, src: &[f32], out: &mut [u8]) {
    match dtype {
        DType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(src) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        DType::F64 => {
            for (o, v) in out.chunks_exact_mut(8).zip(src) {
                o.copy_from_slice(&(*v as f64).to_le_bytes());
            }
        }
        DType::BF16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(src) {
                o.copy_from_slice(&f32_to_bf16_bits(*v).to_le_bytes());
            }
        }
        DType::F16 => {
            let mut tmp = [f16::ZERO; CHUNK];
            for (s, o) in src.chunks(CHUNK).zip(out.chunks_mut(CHUNK * 2)) {
                let t = &mut tmp[..s.len()];
                t.convert_from_f32_slice(s);
                for (b, h) in o.chunks_exact_mut(2).zip(t.iter()) {
                    b.copy_from_slice(&h.to_le_bytes());
                }
            }
        }
        _ => {}
    }
}

/// Elements per parallel work item of [`decode_f32_par`] and [`encode_f32`].
const PAR_CHUNK: usize = 1 << 15;

/// Encodes `src` as little-endian `dtype` bytes appended to `dst`, rounding to nearest even
/// (large inputs in parallel over fixed chunks: the result is elementwise, so identical).
/// Returns `false` (and appends nothing) for a dtype that is not float-convertible.
pub fn encode_f32(dtype: &DType, src: &[f32], dst: &mut Vec<u8>) -> bool {
    if !dtype.is_float_convertible() {
        return false;
    }
    let old = dst.len();
    dst.resize(old + src.len() * dtype.size_bytes(), 0);
    encode_f32_into(dtype, src, &mut dst[old..])
}

/// [`encode_f32`] into a slice of exactly `src.len()` elements of `dtype` (large inputs in
/// parallel over fixed chunks). Returns `false` (writing nothing) for a dtype that is not
/// float-convertible.
pub fn encode_f32_into(dtype: &DType, src: &[f32], out: &mut [u8]) -> bool {
    if !dtype.is_float_convertible() {
        return false;
    }
    let size = dtype.size_bytes();
    debug_assert_eq!(out.len(), src.len() * size);
    if src.len() < 2 * PAR_CHUNK {
        encode_into(dtype, src, out);
    } else {
        out.par_chunks_mut(PAR_CHUNK * size)
            .zip(src.par_chunks(PAR_CHUNK))
            .for_each(|(o, s)| encode_into(dtype, s, o));
    }
    true
}

/// [`decode_f32`], large inputs in parallel over fixed chunks (elementwise, so identical).
pub(crate) fn decode_f32_par(dtype: &DType, bytes: &[u8], out: &mut [f32]) -> bool {
    if !dtype.is_float_convertible() {
        return false;
    }
    let size = dtype.size_bytes();
    if out.len() < 2 * PAR_CHUNK {
        return decode_f32(dtype, bytes, out);
    }
    out.par_chunks_mut(PAR_CHUNK)
        .zip(bytes.par_chunks(PAR_CHUNK * size))
        .for_each(|(o, b)| {
            decode_f32(dtype, b, o);
        });
    true
}

/// [`first_non_finite`] over large inputs: chunks of 2^20 elements in parallel, the first
/// finding in element order.
pub fn find_non_finite(dtype: &DType, bytes: &[u8]) -> Option<(usize, String)> {
    const CHUNK_ELEMS: usize = 1 << 20;
    let size = dtype.size_bytes();
    if size == 0 {
        return None;
    }
    bytes
        .par_chunks(CHUNK_ELEMS * size)
        .enumerate()
        .find_map_first(|(c, chunk)| {
            first_non_finite(dtype, chunk).map(|(i, v)| (c * CHUNK_ELEMS + i, v))
        })
}

/// Returns the index (within `bytes`, in elements) and description of the first non-finite
/// element of `bytes` of `dtype`, or `None` when all are finite or the dtype has no
/// non-finite values (integers, bool, unknown).
pub(crate) fn first_non_finite(dtype: &DType, bytes: &[u8]) -> Option<(usize, String)> {
    fn describe(v: f64) -> String {
        if v.is_nan() {
            "NaN".to_string()
        } else if v > 0.0 {
            "inf".to_string()
        } else {
            "-inf".to_string()
        }
    }
    match dtype {
        DType::F32 => bytes.chunks_exact(4).position(|c| {
            let bits = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            bits & 0x7f80_0000 == 0x7f80_0000
        }),
        DType::F64 => bytes.chunks_exact(8).position(|c| {
            let b: [u8; 8] = c.try_into().expect("chunks_exact(8) yields 8 bytes");
            u64::from_le_bytes(b) & 0x7ff0_0000_0000_0000 == 0x7ff0_0000_0000_0000
        }),
        DType::BF16 => bytes
            .chunks_exact(2)
            .position(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7f80 == 0x7f80),
        DType::F16 => bytes
            .chunks_exact(2)
            .position(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7c00 == 0x7c00),
        // E4M3 "fn": no infinities; 0x7F and 0xFF are NaN.
        DType::F8E4M3 => bytes.iter().position(|b| b & 0x7f == 0x7f),
        // E5M2: exponent all ones is inf or NaN.
        DType::F8E5M2 => bytes.iter().position(|b| b & 0x7c == 0x7c),
        _ => None,
    }
    .map(|i| {
        let value = match dtype {
            DType::F32 | DType::F64 | DType::BF16 | DType::F16 => {
                let size = dtype.size_bytes();
                let mut v = [0.0f32];
                decode_f32(dtype, &bytes[i * size..(i + 1) * size], &mut v);
                describe(v[0] as f64)
            }
            DType::F8E5M2 if bytes[i] & 0x03 == 0 => {
                if bytes[i] & 0x80 == 0 { "inf" } else { "-inf" }.to_string()
            }
            _ => "NaN".to_string(),
        };
        (i, value)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_encoding_matches_half() {
        let specials = [
            0u32,
            0x8000_0000,
            0x7F80_0000,
            0xFF80_0000,
            0x7FC0_0000,
            0x7F80_0001,
            0xFFFF_FFFF,
            0x7FFF_FFFF,
            0x7F7F_FFFF,
            0xFF7F_FFFF,
            0x0000_8000,
            0x0001_8000,
            0x3F80_8000,
            0x3F81_8000,
            0x3F80_8001,
            0x0000_7FFF,
        ];
        let stride = (1u64..=u32::MAX as u64).step_by(65_521).map(|x| x as u32);
        for x in specials.into_iter().chain(stride) {
            let v = f32::from_bits(x);
            assert_eq!(
                f32_to_bf16_bits(v),
                half::bf16::from_f32(v).to_bits(),
                "{x:#010x}"
            );
        }
    }

    #[test]
    fn parallel_conversions_match_sequential() {
        let n = 5 * PAR_CHUNK + 123;
        let src: Vec<f32> = (0..n)
            .map(|i| f32::from_bits((i as u32).wrapping_mul(2_654_435_761) & 0xBFFF_FFFF))
            .collect();
        for dt in [DType::F32, DType::F16, DType::BF16, DType::F64] {
            let mut par = Vec::new();
            assert!(encode_f32(&dt, &src, &mut par));
            let mut seq = vec![0u8; n * dt.size_bytes()];
            for (s, o) in src.chunks(1000).zip(seq.chunks_mut(1000 * dt.size_bytes())) {
                encode_into(&dt, s, o);
            }
            assert_eq!(par, seq);
            let mut a = vec![0f32; n];
            let mut b = vec![0f32; n];
            assert!(decode_f32_par(&dt, &par, &mut a));
            assert!(decode_f32(&dt, &par, &mut b));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b));
        }
    }

    #[test]
    fn parse_round_trips_strings() {
        for s in [
            "F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3",
            "F8_E5M2", "U32", "C64", "XYZ",
        ] {
            assert_eq!(DType::parse(s).as_str(), s);
        }
        assert_eq!(DType::parse("U32"), DType::Other("U32".into()));
        assert_eq!(DType::parse("U32").size_bytes(), 4);
        assert_eq!(DType::parse("XYZ").size_bytes(), 0);
        assert_eq!(DType::parse("F4").byte_len(3), None);
        assert_eq!(DType::parse("F4").byte_len(4), Some(2));
        assert_eq!(DType::BF16.byte_len(usize::MAX), None);
    }

    #[test]
    fn config_names() {
        assert_eq!(DType::from_config_name("bfloat16"), Some(DType::BF16));
        assert_eq!(DType::from_config_name("torch.float16"), Some(DType::F16));
        assert_eq!(DType::from_config_name("fp32"), Some(DType::F32));
        assert_eq!(DType::from_config_name("float64"), Some(DType::F64));
        assert_eq!(DType::from_config_name("int8"), None);
        assert!(DType::BF16.is_mergeable() && !DType::F64.is_mergeable());
    }

    #[test]
    fn non_finite_detection() {
        let mut b = Vec::new();
        encode_f32(
            &DType::BF16,
            &[1.0, 2.0, f32::NEG_INFINITY, f32::NAN],
            &mut b,
        );
        assert_eq!(
            first_non_finite(&DType::BF16, &b),
            Some((2, "-inf".to_string()))
        );
        let mut b = Vec::new();
        encode_f32(&DType::F16, &[1.0, 1e6], &mut b); // overflows f16 to inf
        assert_eq!(
            first_non_finite(&DType::F16, &b),
            Some((1, "inf".to_string()))
        );
        assert_eq!(
            first_non_finite(&DType::F8E5M2, &[0x00, 0x7c]).map(|x| x.1),
            Some("inf".into())
        );
        assert_eq!(
            first_non_finite(&DType::F8E4M3, &[0x7e, 0xff]).map(|x| x.0),
            Some(1)
        );
        assert_eq!(first_non_finite(&DType::I32, &[0xff; 8]), None);
    }
}
