//! SHA-256 helpers: the checkpoint header digest that statistics files record
//! (architecture.md "Statistics files") and a plain hex digest of bytes.

use sha2::{Digest, Sha256};

/// SHA-256 of the concatenation of `parts`, as lowercase hex.
pub fn sha256_hex_parts<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    hex::encode(h.finalize())
}

/// SHA-256 of `bytes`, as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    sha256_hex_parts([bytes])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digest() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            sha256_hex_parts([&b"a"[..], &b"bc"[..]]),
            sha256_hex(b"abc")
        );
    }
}
