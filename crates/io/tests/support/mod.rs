//! Helpers shared by the integration tests: hand-built safetensors files and naive
//! reference conversions, written independently of the crate's code.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;

/// Writes a safetensors file from a raw header JSON string and data bytes.
pub fn write_raw_st(path: &Path, header: &str, data: &[u8]) {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    std::fs::write(path, v).unwrap();
}

/// One tensor for [`write_st`]: name, dtype string, shape, data bytes.
pub type Entry<'a> = (&'a str, &'a str, Vec<usize>, Vec<u8>);

/// Writes a well-formed safetensors file holding `entries` contiguously, in order.
pub fn write_st(path: &Path, entries: &[Entry<'_>]) {
    let mut parts = Vec::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in entries {
        let begin = data.len();
        data.extend_from_slice(bytes);
        parts.push(format!(
            "\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":{shape:?},\"data_offsets\":[{begin},{}]}}",
            data.len()
        ));
    }
    let header = format!(
        "{{\"__metadata__\":{{\"format\":\"pt\"}},{}}}",
        parts.join(",")
    );
    write_raw_st(path, &header, &data);
}

/// f32 values as little-endian F32 bytes.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Naive f32 -> bf16 bits, round to nearest even (NaN not handled).
pub fn naive_bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let lsb = (bits >> 16) & 1;
    ((bits as u64 + 0x7fff + lsb as u64) >> 16) as u16
}

/// bf16 bits -> f32.
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Naive f32 -> nearest f16 value (as f64), round to nearest even, overflow to infinity.
pub fn naive_f16_value(x: f32) -> f64 {
    let x = x as f64;
    if x == 0.0 || x.is_infinite() {
        return x;
    }
    let a = x.abs();
    let e = a.log2().floor().max(-14.0);
    // guard against log2 rounding at exact powers of two
    let e = if 2f64.powf(e + 1.0) <= a {
        e + 1.0
    } else if 2f64.powf(e) > a && e > -14.0 {
        e - 1.0
    } else {
        e
    };
    let ulp = 2f64.powf(e - 10.0);
    let q = (a / ulp).round_ties_even() * ulp;
    let q = if q >= 65520.0 { f64::INFINITY } else { q };
    q.copysign(x)
}

/// Naive f16 value (f64, exactly representable) -> f16 bits.
pub fn f16_bits_from_value(v: f64) -> u16 {
    let sign = if v.is_sign_negative() { 0x8000u16 } else { 0 };
    let a = v.abs();
    if a.is_infinite() {
        return sign | 0x7c00;
    }
    if a == 0.0 {
        return sign;
    }
    if a < 2f64.powi(-14) {
        return sign | (a / 2f64.powi(-24)) as u16;
    }
    let e = a.log2().floor() as i32;
    let e = if 2f64.powi(e + 1) <= a {
        e + 1
    } else if 2f64.powi(e) > a {
        e - 1
    } else {
        e
    };
    let m = (a / 2f64.powi(e) - 1.0) * 1024.0;
    sign | (((e + 15) as u16) << 10) | m as u16
}

/// Deterministic pseudo-random f32 values spanning several magnitudes, plus edge cases.
pub fn test_values(n: usize) -> Vec<f32> {
    let mut v = vec![
        0.0,
        -0.0,
        1.0,
        -2.5,
        1e-8,
        -3e-6,
        65504.0,
        65519.0,
        65520.0,
        1e30,
        -1e-40,
        1.0 + 2f32.powi(-11),       // f16 tie -> 1.0
        1.0 + 3.0 * 2f32.powi(-11), // f16 tie -> 1 + 2^-9
        1.0 + 2f32.powi(-8),        // bf16 tie -> 1.0
        1.0 + 3.0 * 2f32.powi(-8),  // bf16 tie -> 1 + 2^-6
        f32::MAX,
        f32::MIN_POSITIVE,
        f32::INFINITY,
        f32::NEG_INFINITY,
    ];
    let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
    while v.len() < n {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mant = ((s >> 40) as f64) / (1u64 << 24) as f64 - 0.5;
        let exp = ((s >> 20) % 40) as i32 - 20;
        v.push((mant * 2f64.powi(exp)) as f32);
    }
    v.truncate(n);
    v
}
