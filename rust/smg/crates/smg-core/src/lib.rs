//! smg-core: CPU-side multimodal preprocessing for MiniMax-M3 (no Python, no pyo3).
//!
//! Modules (owner in brackets while the first version is written):
//! - `image`: decode, EXIF orientation, RGB conversion, M3 sizing, resize, normalize, patchify (bf16).
//! - `fetch`: image sources (data: URIs, file:// under a root, http(s) policy).
//! - `hash`: per-image content hash.
//! - `template`: chat-template rendering (minijinja) from `tokenizer_config.json`.
//! - `tokenize`: tokenization and image-placeholder expansion.
//! - `wire`: the versioned gateway → worker wire format.

pub mod fetch;
pub mod hash;
pub mod image;
pub mod template;
pub mod tokenize;
pub mod wire;

/// Version of the gateway → worker wire format implemented by this crate.
pub const WIRE_FORMAT_VERSION: u32 = 2;
