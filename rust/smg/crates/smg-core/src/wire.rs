//! The gateway → worker wire format: `m3serve.patches.v2` (sent) and `v1` (still accepted).
//!
//! docs/wire-format.md is the definition; this module is its Rust side: serde types, the
//! inline (base64) and shared-memory encoders, and the validation both sides run. The test
//! vectors in tests/wire_vectors/ are checked by this crate's tests and by the worker's.
//!
//! One [`ImageItem`] per image goes in SGLang's `/generate` `image_data` list, in prompt order.
//! Raw image bytes never travel: only bf16 patches `[N, 1176]` plus the grid, a content hash
//! and where the image's placeholder run sits in `input_ids`.
//!
//! v2 differs from v1 only in the payload: one temporal frame per row (`[N, 588]`, columns
//! C → py → px) instead of the processor's two identical frames (`[N, 1176]`); the receiver
//! repeats each channel's 196 values to rebuild the `[N, 1176]` rows. Half the bytes, same
//! tensor.

#![allow(clippy::doc_markdown)] // product names (SGLang, MiniMax, HF) in prose are not code

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// `format` of every version-1 item.
pub const FORMAT_V1: &str = "m3serve.patches.v1";
/// `format` of every version-2 item (one frame per row).
pub const FORMAT_V2: &str = "m3serve.patches.v2";
/// Columns of a v2 row: 3 channels × 14 × 14 (one temporal frame).
pub const FRAME_DIM: usize = 588;
/// The only dtype (v1 and v2).
pub const DTYPE_BF16: &str = "bfloat16";
/// Columns of a patch row: 3 channels × temporal 2 × 14 × 14.
pub const PATCH_DIM: usize = 1176;
/// Patches merged into one token (2 × 2 spatial merge).
pub const MERGE: usize = 4;
/// Most patch rows one item may carry (3584² pixels / 14² = 65,536 rows, doubled for headroom).
pub const MAX_PATCHES: usize = 131_072;
/// Longest accepted hash string.
pub const MAX_HASH_LEN: usize = 128;
/// Shared-memory files must live here and start with this prefix.
pub const SHM_PREFIX: &str = "/dev/shm/m3serve-";

/// Shared-memory handle: the bf16 bytes of the item, little-endian, in a file the gateway wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShmRef {
    /// Absolute path, `/dev/shm/m3serve-<...>`.
    pub path: String,
    /// File length in bytes (= N · 1176 · 2).
    pub nbytes: u64,
}

/// One image on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageItem {
    /// [`FORMAT_V2`] (what the gateway sends) or [`FORMAT_V1`].
    pub format: String,
    /// Always [`DTYPE_BF16`].
    pub dtype: String,
    /// `[N, 1176]` (v1) or `[N, 588]` (v2), N = t · h · w.
    pub shape: [u64; 2],
    /// `[t, h, w]` in 14-pixel patches; h and w even.
    pub grid_thw: [u64; 3],
    /// Content hash of the image (opaque; equal images give equal hashes).
    pub hash: String,
    /// Index in `input_ids` of the first of this image's tokens.
    pub offset: u64,
    /// Number of image tokens (= N / 4).
    pub length: u64,
    /// Base64 (standard alphabet, padded) of the little-endian bf16 bytes. Exactly one of
    /// `data` and `shm` is present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// Shared-memory handle instead of `data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm: Option<ShmRef>,
}

/// A validation failure; [`code`](WireError::code) is what the test vectors name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError {
    code: &'static str,
    message: String,
}

impl WireError {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    /// Stable machine-readable code (`bad_format`, `bad_shape`, ...).
    pub fn code(&self) -> &'static str {
        self.code
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for WireError {}

/// Little-endian bytes of bf16 bit patterns.
pub fn bf16_to_le_bytes(patches: &[u16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(patches.len() * 2);
    for v in patches {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// v2 payload: little-endian bytes of one temporal frame per row (`[N, 588]`), taken from
/// full `[N, 1176]` rows (whose two frames are equal for an image).
pub fn frame_le_bytes(patches: &[u16]) -> Vec<u8> {
    const PLANE: usize = PATCH_DIM / 6; // 14 × 14
    let mut out = Vec::with_capacity(patches.len());
    for row in patches.chunks_exact(PATCH_DIM) {
        for c in 0..3 {
            for v in &row[c * 2 * PLANE..(c * 2 + 1) * PLANE] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    out
}

/// `[N, 1176]` rows from v2 `[N, 588]` rows: each channel's frame repeated for T = 2.
pub fn expand_frames(frames: &[u16]) -> Vec<u16> {
    const PLANE: usize = PATCH_DIM / 6;
    let mut out = Vec::with_capacity(frames.len() * 2);
    for row in frames.chunks_exact(FRAME_DIM) {
        for plane in row.chunks_exact(PLANE) {
            out.extend_from_slice(plane);
            out.extend_from_slice(plane);
        }
    }
    out
}

/// Payload columns of a format (`None`: unknown format).
fn payload_cols(format: &str) -> Option<usize> {
    match format {
        FORMAT_V1 => Some(PATCH_DIM),
        FORMAT_V2 => Some(FRAME_DIM),
        _ => None,
    }
}

/// bf16 bit patterns from little-endian bytes (length must be even).
pub fn le_bytes_to_bf16(bytes: &[u8]) -> Vec<u16> {
    bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
}

/// Where the image sits in `input_ids` and what identifies it.
#[derive(Debug, Clone, Copy)]
pub struct ItemMeta<'a> {
    pub grid_thw: [u32; 3],
    pub hash: &'a str,
    pub offset: usize,
    pub length: usize,
}

fn header(meta: &ItemMeta<'_>, rows: usize) -> ImageItem {
    ImageItem {
        format: FORMAT_V1.to_owned(),
        dtype: DTYPE_BF16.to_owned(),
        shape: [rows as u64, PATCH_DIM as u64],
        grid_thw: meta.grid_thw.map(u64::from),
        hash: meta.hash.to_owned(),
        offset: meta.offset as u64,
        length: meta.length as u64,
        data: None,
        shm: None,
    }
}

/// Build a v2 inline item. `patches` is row-major `[N, 1176]` bf16 bits; one frame is sent.
pub fn encode_inline_v2(patches: &[u16], meta: &ItemMeta<'_>) -> ImageItem {
    let rows = patches.len() / PATCH_DIM;
    let data = base64::engine::general_purpose::STANDARD.encode(frame_le_bytes(patches));
    encode_inline_base64_v2(rows, data, meta)
}

/// Build a v2 inline item from the base64 of [`frame_le_bytes`] already computed.
pub fn encode_inline_base64_v2(rows: usize, data: String, meta: &ItemMeta<'_>) -> ImageItem {
    let mut item = header_v2(meta, rows);
    item.data = Some(data);
    item
}

/// Build a v2 shared-memory item for [`frame_le_bytes`] already written to `path`.
pub fn encode_shm_v2(rows: usize, path: &str, meta: &ItemMeta<'_>) -> ImageItem {
    let mut item = header_v2(meta, rows);
    item.shm = Some(ShmRef { path: path.to_owned(), nbytes: (rows * FRAME_DIM * 2) as u64 });
    item
}

fn header_v2(meta: &ItemMeta<'_>, rows: usize) -> ImageItem {
    let mut item = header(meta, rows);
    FORMAT_V2.clone_into(&mut item.format);
    item.shape = [rows as u64, FRAME_DIM as u64];
    item
}

/// Build a v1 inline item. `patches` is row-major `[N, 1176]` bf16 bits.
pub fn encode_inline(patches: &[u16], meta: &ItemMeta<'_>) -> ImageItem {
    let mut item = header(meta, patches.len() / PATCH_DIM);
    item.data = Some(base64::engine::general_purpose::STANDARD.encode(bf16_to_le_bytes(patches)));
    item
}

/// Build an inline item from base64 already computed (e.g. on a preprocessing thread).
pub fn encode_inline_base64(rows: usize, data: String, meta: &ItemMeta<'_>) -> ImageItem {
    let mut item = header(meta, rows);
    item.data = Some(data);
    item
}

/// Build a shared-memory item for bytes already written to `path` (see [`SHM_PREFIX`]).
pub fn encode_shm(rows: usize, path: &str, meta: &ItemMeta<'_>) -> ImageItem {
    let mut item = header(meta, rows);
    item.shm = Some(ShmRef { path: path.to_owned(), nbytes: (rows * PATCH_DIM * 2) as u64 });
    item
}

fn hash_ok(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= MAX_HASH_LEN
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':' | b'.'))
}

/// Check one item on its own (format, shapes, grid, hash, payload size). Does not decode
/// `data` beyond its length, and does not open `shm`.
pub fn validate_item(item: &ImageItem) -> Result<(), WireError> {
    let Some(cols) = payload_cols(&item.format) else {
        return Err(WireError::new("bad_format", format!("format {:?}, expected {FORMAT_V2:?} or {FORMAT_V1:?}", item.format)));
    };
    if item.dtype != DTYPE_BF16 {
        return Err(WireError::new("bad_dtype", format!("dtype {:?}, expected {DTYPE_BF16:?}", item.dtype)));
    }
    let [t, h, w] = item.grid_thw;
    if t != 1 || h < 2 || w < 2 || h % 2 != 0 || w % 2 != 0 {
        return Err(WireError::new("bad_grid", format!("grid_thw {:?}: t must be 1, h and w even and >= 2", item.grid_thw)));
    }
    let rows = h.saturating_mul(w);
    if item.shape != [rows, cols as u64] || rows > MAX_PATCHES as u64 {
        return Err(WireError::new(
            "bad_shape",
            format!("shape {:?}, expected [{rows}, {cols}] with at most {MAX_PATCHES} rows", item.shape),
        ));
    }
    if item.length != rows / MERGE as u64 {
        return Err(WireError::new("bad_length", format!("length {}, expected {}", item.length, rows / MERGE as u64)));
    }
    if !hash_ok(&item.hash) {
        return Err(WireError::new("bad_hash", format!("hash must be 1..={MAX_HASH_LEN} chars of [A-Za-z0-9_:.-]")));
    }
    let nbytes = rows * cols as u64 * 2;
    match (&item.data, &item.shm) {
        (Some(data), None) => {
            // Padded base64 of nbytes is exactly 4·ceil(nbytes/3) chars: check before decoding.
            if data.len() as u64 != nbytes.div_ceil(3) * 4 {
                return Err(WireError::new("bad_data", format!("data has {} base64 chars, expected {}", data.len(), nbytes.div_ceil(3) * 4)));
            }
        }
        (None, Some(shm)) => {
            let name = shm.path.strip_prefix(SHM_PREFIX).unwrap_or("");
            if name.is_empty() || name.contains('/') || name.len() > 200 {
                return Err(WireError::new("bad_shm", format!("shm path must be {SHM_PREFIX}<name> with no '/' in name")));
            }
            if shm.nbytes != nbytes {
                return Err(WireError::new("bad_shm", format!("shm nbytes {}, expected {nbytes}", shm.nbytes)));
            }
        }
        (None, None) => return Err(WireError::new("no_payload", "one of data or shm is required")),
        (Some(_), Some(_)) => return Err(WireError::new("no_payload", "data and shm are exclusive")),
    }
    Ok(())
}

/// Check all items of a request against its `input_ids`: each item valid, runs in prompt
/// order and disjoint, each run entirely `image_token_id`, and no image token outside a run.
pub fn validate_request(input_ids: &[u32], items: &[ImageItem], image_token_id: u32) -> Result<(), WireError> {
    let mut end = 0u64;
    for (i, item) in items.iter().enumerate() {
        validate_item(item).map_err(|e| WireError::new(e.code, format!("image_data[{i}]: {}", e.message)))?;
        if item.offset < end {
            return Err(WireError::new("bad_offset", format!("image_data[{i}]: offset {} overlaps or precedes the previous image", item.offset)));
        }
        let stop = item.offset.saturating_add(item.length);
        if stop > input_ids.len() as u64 {
            return Err(WireError::new("bad_offset", format!("image_data[{i}]: run [{}, {stop}) past input_ids length {}", item.offset, input_ids.len())));
        }
        // Both bounds checked above, so these fit in usize.
        let run = &input_ids[item.offset as usize..stop as usize];
        if run.iter().any(|&t| t != image_token_id) {
            return Err(WireError::new("bad_offset", format!("image_data[{i}]: input_ids[{}..{stop}] are not all the image token {image_token_id}", item.offset)));
        }
        end = stop;
    }
    let in_runs: u64 = items.iter().map(|it| it.length).sum();
    let total = input_ids.iter().filter(|&&t| t == image_token_id).count() as u64;
    if total != in_runs {
        return Err(WireError::new("bad_offset", format!("input_ids hold {total} image tokens but the items cover {in_runs}")));
    }
    Ok(())
}

/// Parse a `/generate` body's `image_data` (a JSON array of items); any shape or type
/// problem is `bad_schema`.
pub fn parse_items(image_data: &serde_json::Value) -> Result<Vec<ImageItem>, WireError> {
    serde_json::from_value(image_data.clone()).map_err(|e| WireError::new("bad_schema", e.to_string()))
}

/// Decode an inline item's patches (validates it first) as `[N, 1176]` rows (v2 expanded).
pub fn decode_inline(item: &ImageItem) -> Result<Vec<u16>, WireError> {
    validate_item(item)?;
    let data = item.data.as_deref().ok_or_else(|| WireError::new("no_payload", "item has no inline data"))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| WireError::new("bad_data", format!("invalid base64: {e}")))?;
    if bytes.len() as u64 != item.shape[0] * item.shape[1] * 2 {
        return Err(WireError::new("bad_data", format!("decoded {} bytes, expected {}", bytes.len(), item.shape[0] * item.shape[1] * 2)));
    }
    let rows = le_bytes_to_bf16(&bytes);
    Ok(if item.format == FORMAT_V2 { expand_frames(&rows) } else { rows })
}

/// FNV-1a 64-bit of a byte string, hex: the checksum the test vectors use (trivial to
/// compute on both sides, no hashing crate needed).
pub fn fnv1a64_hex(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patches(rows: usize) -> Vec<u16> {
        (0..rows * PATCH_DIM).map(|i| (i % 65_000) as u16).collect()
    }

    fn meta(grid: [u32; 3], offset: usize) -> ItemMeta<'static> {
        ItemMeta { grid_thw: grid, hash: "abc123", offset, length: (grid[0] * grid[1] * grid[2]) as usize / 4 }
    }

    #[test]
    fn inline_round_trip() {
        let p = patches(8);
        let item = encode_inline(&p, &meta([1, 2, 4], 3));
        validate_item(&item).unwrap();
        assert_eq!(decode_inline(&item).unwrap(), p);
        let json = serde_json::to_string(&item).unwrap();
        assert!(!json.contains("shm"));
        let back: ImageItem = serde_json::from_str(&json).unwrap();
        assert_eq!(back, item);
    }

    #[test]
    fn request_runs_are_checked() {
        let item = encode_inline(&patches(8), &meta([1, 2, 4], 1));
        validate_request(&[0, 9, 9, 0], std::slice::from_ref(&item), 9).unwrap();
        assert_eq!(validate_request(&[0, 9, 0, 9], std::slice::from_ref(&item), 9).unwrap_err().code(), "bad_offset");
        assert_eq!(validate_request(&[0, 9], std::slice::from_ref(&item), 9).unwrap_err().code(), "bad_offset");
        assert_eq!(validate_request(&[0, 9, 9, 9], &[item], 9).unwrap_err().code(), "bad_offset");
    }

    #[test]
    fn bad_items() {
        let good = encode_inline(&patches(4), &meta([1, 2, 2], 0));
        let mut b = good.clone();
        b.grid_thw = [1, 3, 2];
        assert_eq!(validate_item(&b).unwrap_err().code(), "bad_grid");
        let mut b = good.clone();
        b.length = 2;
        assert_eq!(validate_item(&b).unwrap_err().code(), "bad_length");
        let mut b = good.clone();
        b.hash = "a b".into();
        assert_eq!(validate_item(&b).unwrap_err().code(), "bad_hash");
        let mut b = good.clone();
        b.data = Some("!".repeat(good.data.as_ref().unwrap().len()));
        assert_eq!(decode_inline(&b).unwrap_err().code(), "bad_data");
        let mut b = good.clone();
        b.shm = Some(ShmRef { path: "/dev/shm/m3serve-x".into(), nbytes: 4 * 1176 * 2 });
        assert_eq!(validate_item(&b).unwrap_err().code(), "no_payload");
        b.data = None;
        validate_item(&b).unwrap();
        b.shm = Some(ShmRef { path: "/dev/shm/m3serve-../etc/passwd".into(), nbytes: 4 * 1176 * 2 });
        assert_eq!(validate_item(&b).unwrap_err().code(), "bad_shm");
    }

    #[test]
    fn fnv_known_value() {
        assert_eq!(fnv1a64_hex(b""), "cbf29ce484222325");
        assert_eq!(fnv1a64_hex(b"a"), "af63dc4c8601ec8c");
    }
}
