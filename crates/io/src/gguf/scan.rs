//! A minimal walk over a GGUF header, used only to name the tensor behind candle's
//! "unknown dtype" error (candle's reader stops at the first unknown tensor type without
//! saying which tensor it is).

use std::path::Path;

use memmap2::Mmap;

/// ggml type ids candle's reader knows.
const KNOWN: &[u32] = &[0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 30];

/// The ggml name of type id `ty` (ggml.h `enum ggml_type`).
pub(crate) fn ggml_type_name(ty: u32) -> &'static str {
    match ty {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    }
}

struct Cur<'a> {
    b: &'a [u8],
    pos: usize,
    v1: bool,
}

impl Cur<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.b.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn len(&mut self) -> Option<usize> {
        let n = if self.v1 {
            self.u32()? as u64
        } else {
            self.u64()?
        };
        usize::try_from(n).ok()
    }
    fn string(&mut self) -> Option<String> {
        let n = self.len()?;
        Some(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    fn skip_value(&mut self, ty: u32, depth: usize) -> Option<()> {
        let fixed = |ty| match ty {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        };
        if let Some(n) = fixed(ty) {
            self.take(n)?;
            return Some(());
        }
        match ty {
            8 => {
                let n = self.len()?;
                self.take(n)?;
            }
            9 if depth < 4 => {
                let et = self.u32()?;
                let n = self.len()?;
                if let Some(sz) = fixed(et) {
                    self.take(n.checked_mul(sz)?)?;
                } else {
                    for _ in 0..n {
                        self.skip_value(et, depth + 1)?;
                    }
                }
            }
            _ => return None,
        }
        Some(())
    }
}

/// The first tensor of GGUF file `path` whose type candle does not know, with that type id;
/// `None` when there is none or the header cannot be walked.
pub(crate) fn first_unsupported_tensor(path: &Path) -> Option<(String, u32)> {
    let f = std::fs::File::open(path).ok()?;
    // SAFETY: read-only map of an input file, not modified while read.
    let map = unsafe { Mmap::map(&f) }.ok()?;
    let mut c = Cur {
        b: &map,
        pos: 0,
        v1: false,
    };
    if c.take(4)? != super::MAGIC {
        return None;
    }
    c.v1 = c.u32()? == 1;
    let n_tensors = c.len()?;
    let n_kv = c.len()?;
    for _ in 0..n_kv {
        c.string()?;
        let ty = c.u32()?;
        c.skip_value(ty, 0)?;
    }
    for _ in 0..n_tensors {
        let name = c.string()?;
        let n_dims = c.u32()? as usize;
        c.take(n_dims.checked_mul(if c.v1 { 4 } else { 8 })?)?;
        let ty = c.u32()?;
        c.u64()?;
        if !KNOWN.contains(&ty) {
            return Some((name, ty));
        }
    }
    None
}
