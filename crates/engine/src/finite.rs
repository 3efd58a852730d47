//! Finite values: the scan that refuses non-finite inputs, and the output check that refuses a
//! merged value that is not finite or does not fit the output dtype (float16 saturates at
//! 65504: a larger merged value would be written as infinity).

use crate::run::TensorOut;
use crate::EngineError;
use amalgam_core::raw::RawDtype;
use amalgam_core::MergeError;
use amalgam_io::{find_non_finite, DType};
use rayon::prelude::*;

/// Elements per parallel work item of a scan.
const SCAN_CHUNK: usize = 1 << 15;

/// `|x|`'s bits from which an f32 is not finite (infinities, NaN).
const F32_LIMIT: u32 = 0x7F80_0000;
/// `|x|`'s bits from which an f32 rounds to infinity in float16 (65520, the midpoint between
/// 65504 and 65536, rounds to the even neighbour, infinity).
const F16_LIMIT: u32 = 0x477F_F000;
/// `|x|`'s bits from which an f32 rounds to infinity in bfloat16 (the midpoint above the
/// largest bfloat16, 0x7F7F, rounds to the even neighbour, infinity).
const BF16_LIMIT: u32 = 0x7F7F_8000;

/// Index of the first value whose magnitude's bits reach `limit`: a branch-free
/// (vectorisable) test per chunk, chunks in parallel, and a search only inside a chunk that
/// fails it.
fn first_reaching(v: &[f32], limit: u32) -> Option<usize> {
    let over = |x: &f32| x.to_bits() & 0x7FFF_FFFF >= limit;
    let find = |(i, c): (usize, &[f32])| {
        if c.iter().fold(false, |any, x| any | over(x)) {
            c.iter().position(over).map(|k| i * SCAN_CHUNK + k)
        } else {
            None
        }
    };
    if v.len() < 2 * SCAN_CHUNK {
        v.chunks(SCAN_CHUNK).enumerate().find_map(find)
    } else {
        v.par_chunks(SCAN_CHUNK).enumerate().find_map_first(find)
    }
}

/// Index of the first non-finite value (NaN or an infinity).
pub fn first_non_finite(v: &[f32]) -> Option<usize> {
    first_reaching(v, F32_LIMIT)
}

/// A [`TensorOut`] that refuses, naming the tensor and element, a merged value that is not
/// finite or would not be finite in the output dtype. Used when the inputs were checked finite
/// (without `--allow-nonfinite`): such a value comes from the weights (an overflow), and
/// writing it would give a model that silently computes infinities.
pub struct FiniteOut<'a> {
    inner: &'a mut dyn TensorOut,
    tensor: &'a str,
    next: usize,
}

impl<'a> FiniteOut<'a> {
    /// Checks what is written to `inner` for `tensor` (already begun).
    pub fn new(inner: &'a mut dyn TensorOut, tensor: &'a str) -> Self {
        FiniteOut {
            inner,
            tensor,
            next: 0,
        }
    }

    fn refuse(&self, index: usize, value: String, dtype: Option<RawDtype>) -> EngineError {
        let why = match dtype {
            Some(RawDtype::F16) => {
                "it does not fit float16 (largest 65504); write bfloat16 or float32 (`dtype:` or \
                 `out_dtype:`), or lower the weights"
            }
            Some(RawDtype::Bf16) => {
                "it does not fit bfloat16; write float32 (`dtype:` or `out_dtype:`), or lower \
                 the weights"
            }
            _ => "the weights overflow float32; lower them",
        };
        EngineError::Merge(MergeError::Write(format!(
            "tensor \"{}\": the merged value at element {index} is {value}: {why} (or pass \
             --allow-nonfinite to write it anyway)",
            self.tensor
        )))
    }
}

impl TensorOut for FiniteOut<'_> {
    fn begin_tensor(&mut self, name: &str) -> Result<(), EngineError> {
        self.inner.begin_tensor(name)
    }

    fn write_f32(&mut self, data: &[f32]) -> Result<(), EngineError> {
        let dtype = self.inner.raw_dtype();
        let limit = match dtype {
            Some(RawDtype::F16) => F16_LIMIT,
            Some(RawDtype::Bf16) => BF16_LIMIT,
            _ => F32_LIMIT,
        };
        if let Some(k) = first_reaching(data, limit) {
            return Err(self.refuse(self.next + k, data[k].to_string(), dtype));
        }
        self.next += data.len();
        self.inner.write_f32(data)
    }

    fn write_raw(&mut self, bytes: &[u8]) -> Result<(), EngineError> {
        let dtype = self.inner.raw_dtype();
        if let Some(d) = dtype {
            if let Some((k, value)) = find_non_finite(&DType::from_raw(d), bytes) {
                return Err(self.refuse(self.next + k, value, dtype));
            }
            self.next += bytes.len() / d.size();
        }
        self.inner.write_raw(bytes)
    }

    fn raw_dtype(&self) -> Option<RawDtype> {
        self.inner.raw_dtype()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    fn first_non_finite_encoded(dtype: RawDtype, bytes: &[u8]) -> Option<usize> {
        find_non_finite(&DType::from_raw(dtype), bytes).map(|(k, _)| k)
    }

    #[test]
    fn limits_are_where_rounding_reaches_infinity() {
        let below = |bits: u32| f32::from_bits(bits - 1);
        let at = f32::from_bits;
        assert!(f16::from_f32(below(F16_LIMIT)).is_finite());
        assert!(f16::from_f32(at(F16_LIMIT)).is_infinite());
        assert_eq!(at(F16_LIMIT), 65520.0);
        assert!(bf16::from_f32(below(BF16_LIMIT)).is_finite());
        assert!(bf16::from_f32(at(BF16_LIMIT)).is_infinite());
        assert!(below(F32_LIMIT).is_finite() && at(F32_LIMIT).is_infinite());
    }

    #[test]
    fn scans_find_the_first_offender_in_any_chunk() {
        let n = 5 * SCAN_CHUNK + 7;
        for k in [0, 1, SCAN_CHUNK - 1, 3 * SCAN_CHUNK + 2, n - 1] {
            let mut v = vec![1.5f32; n];
            v[k] = -70000.0;
            v[n - 1] = f32::NAN;
            assert_eq!(first_reaching(&v, F16_LIMIT), Some(k));
            assert_eq!(first_non_finite(&v), Some(n - 1));
        }
        let mut h = Vec::new();
        for x in [1.0f32, 65504.0, f32::INFINITY] {
            h.extend_from_slice(&f16::from_f32(x).to_le_bytes());
        }
        assert_eq!(first_non_finite_encoded(RawDtype::F16, &h), Some(2));
        let mut b = Vec::new();
        for x in [f32::NAN, 1.0] {
            b.extend_from_slice(&bf16::from_f32(x).to_le_bytes());
        }
        assert_eq!(first_non_finite_encoded(RawDtype::Bf16, &b), Some(0));
        // Past the parallel threshold, in a later chunk.
        let n = 3 * SCAN_CHUNK + 5;
        let k = 2 * SCAN_CHUNK + 3;
        let mut w: Vec<u8> = (0..n).flat_map(|_| 2.5f32.to_le_bytes()).collect();
        w[4 * k..4 * k + 4].copy_from_slice(&f32::NEG_INFINITY.to_le_bytes());
        assert_eq!(first_non_finite_encoded(RawDtype::F32, &w), Some(k));
        assert_eq!(first_non_finite_encoded(RawDtype::F32, &w[..4 * k]), None);
    }
}
