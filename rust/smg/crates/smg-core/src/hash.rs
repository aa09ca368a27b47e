//! `hash`: per-image content hash.
//!
//! SHA-256 over a domain tag, every option that changes the output tensor, and the encoded
//! bytes. Equal hash ⇒ equal patches, so TP ranks and the radix cache can key on it without
//! rehashing the tensor. A cryptographic hash because the key is shared across clients: a
//! crafted collision would substitute one user's cached image for another's. Hashing the
//! encoded bytes (tens to hundreds of KiB) rather than the patches (~1.6 MiB of bf16) keeps it
//! at well under a millisecond.

use sha2::{Digest, Sha256};

use crate::image::ImageOptions;

/// Bumped whenever preprocessing output changes for the same bytes and options.
pub const IMAGE_HASH_VERSION: &[u8] = b"m3serve-image-v1\0";

/// Hex SHA-256 identifying the preprocessed tensor of `bytes` under `opts`.
pub fn image_hash(bytes: &[u8], opts: &ImageOptions) -> String {
    let mut h = Sha256::new();
    h.update(IMAGE_HASH_VERSION);
    h.update(opts.factor.to_le_bytes());
    h.update(opts.min_pixels.to_le_bytes());
    h.update(opts.max_pixels.to_le_bytes());
    h.update(opts.max_aspect_ratio.to_bits().to_le_bytes());
    h.update(opts.max_long_side_pixel.unwrap_or(0).to_le_bytes());
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
    to_hex(&h.finalize())
}

/// Lower-case hex of a byte string.
pub fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 15)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_depends_on_bytes_and_options() {
        let o = ImageOptions::default();
        let a = image_hash(b"abc", &o);
        assert_eq!(a.len(), 64);
        assert_eq!(a, image_hash(b"abc", &o));
        assert_ne!(a, image_hash(b"abd", &o));
        let o2 = ImageOptions {
            max_long_side_pixel: Some(1008),
            ..o.clone()
        };
        assert_ne!(a, image_hash(b"abc", &o2));
        // Limits that only accept/refuse do not change the tensor, hence not the hash.
        let o3 = ImageOptions {
            max_input_bytes: 5,
            ..o
        };
        assert_eq!(a, image_hash(b"abc", &o3));
    }
}
