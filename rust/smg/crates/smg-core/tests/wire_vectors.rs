//! Checks the shared wire-format vectors in `tests/wire_vectors/` (the worker's tests read the
//! same files). `SMG_WRITE_WIRE_VECTORS=1 cargo test -p smg-core --test wire_vectors`
//! regenerates them from the encoder below.

#![allow(clippy::needless_pass_by_value)] // the generator builds throwaway JSON values

use std::path::PathBuf;

use serde_json::{json, Value};
use smg_core::wire::{
    bf16_to_le_bytes, decode_inline, encode_inline, encode_inline_v2, encode_shm, encode_shm_v2, expand_frames, frame_le_bytes, le_bytes_to_bf16, fnv1a64_hex, parse_items, validate_request, ItemMeta,
    PATCH_DIM,
};

const IMAGE: u32 = 200_025;
const START: u32 = 200_027;
const END: u32 = 200_028;

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../../tests/wire_vectors")
}

/// Deterministic patch values, exact in bf16: ((i mod 251) − 125) / 64.
fn patches(rows: usize, seed: usize) -> Vec<u16> {
    (0..rows * PATCH_DIM)
        .map(|i| {
            let v = (((i + seed) % 251) as f32 - 125.0) / 64.0;
            (v.to_bits() >> 16) as u16
        })
        .collect()
}

/// Prompt ids with one `START, IMAGE×n, END` run per image; returns ids and offsets.
fn prompt(tokens: &[usize]) -> (Vec<u32>, Vec<usize>) {
    let mut ids = vec![1, 100, 101];
    let mut offsets = vec![];
    for &n in tokens {
        ids.push(START);
        offsets.push(ids.len());
        ids.extend(std::iter::repeat_n(IMAGE, n));
        ids.push(END);
        ids.push(102);
    }
    ids.push(2);
    (ids, offsets)
}

fn expect_images(items: &[(Vec<u16>, [u32; 3])]) -> Value {
    Value::Array(
        items
            .iter()
            .map(|(p, g)| {
                json!({"grid_thw": g, "fnv1a64": fnv1a64_hex(&bf16_to_le_bytes(p)), "first8": &p[..8], "last8": &p[p.len() - 8..]})
            })
            .collect(),
    )
}

fn vector(name: &str, description: &str, input_ids: &[u32], image_data: Value, expect: Value) -> (String, Value) {
    (
        name.to_owned(),
        json!({"wire_format": if image_data[0]["format"] == "m3serve.patches.v2" { "m3serve.patches.v2" } else { "m3serve.patches.v1" }, "name": name, "description": description, "image_token_id": IMAGE,
               "request": {"input_ids": input_ids, "image_data": image_data}, "expect": expect}),
    )
}

fn generate() -> Vec<(String, Value)> {
    let mut out = vec![];
    // Valid: one image.
    let p1 = patches(4, 0);
    let (ids1, off1) = prompt(&[1]);
    let item1 = encode_inline(&p1, &ItemMeta { grid_thw: [1, 2, 2], hash: "sha256:00ab", offset: off1[0], length: 1 });
    let one = serde_json::to_value(vec![&item1]).unwrap();
    out.push(vector("valid_one_image_inline", "Smallest image: grid 1x2x2, 4 patch rows, 1 token.", &ids1, one.clone(),
        json!({"valid": true, "images": expect_images(&[(p1.clone(), [1, 2, 2])])})));
    // Valid: two images of different grids.
    let (pa, pb) = (patches(8, 1), patches(8, 2));
    let (ids2, off2) = prompt(&[2, 2]);
    let a = encode_inline(&pa, &ItemMeta { grid_thw: [1, 2, 4], hash: "aaaa", offset: off2[0], length: 2 });
    let b = encode_inline(&pb, &ItemMeta { grid_thw: [1, 4, 2], hash: "bbbb", offset: off2[1], length: 2 });
    out.push(vector("valid_two_images_inline", "Two images (grids 1x2x4 and 1x4x2) in prompt order.", &ids2,
        serde_json::to_value(vec![&a, &b]).unwrap(),
        json!({"valid": true, "images": expect_images(&[(pa, [1, 2, 4]), (pb, [1, 4, 2])])})));
    // Valid: shared-memory handle (structure only; the file is not part of the vector).
    let s = encode_shm(4, "/dev/shm/m3serve-123-0-00ab.bf16", &ItemMeta { grid_thw: [1, 2, 2], hash: "sha256:00ab", offset: off1[0], length: 1 });
    out.push(vector("valid_one_image_shm", "Shared-memory handle instead of data (file not shipped).", &ids1,
        serde_json::to_value(vec![&s]).unwrap(), json!({"valid": true})));

    // Invalid: mutate the one-image item.
    let mutate = |f: &dyn Fn(&mut Value)| {
        let mut v = one.clone();
        f(&mut v[0]);
        v
    };
    let bad = |name: &str, desc: &str, ids: &[u32], data: Value, code: &str| vector(name, desc, ids, data, json!({"valid": false, "error": code}));
    out.push(bad("invalid_format_version", "Unknown format version.", &ids1, mutate(&|i| i["format"] = json!("m3serve.patches.v99")), "bad_format"));
    out.push(bad("invalid_dtype", "float32 is not a v1 dtype.", &ids1, mutate(&|i| i["dtype"] = json!("float32")), "bad_dtype"));
    out.push(bad("invalid_shape_cols", "Rows must have 1176 columns.", &ids1, mutate(&|i| i["shape"] = json!([4, 1024])), "bad_shape"));
    out.push(bad("invalid_shape_rows", "Rows must equal t*h*w.", &ids1, mutate(&|i| i["shape"] = json!([8, 1176])), "bad_shape"));
    out.push(bad("invalid_grid_odd", "h and w must be even (2x2 merge).", &ids1, mutate(&|i| i["grid_thw"] = json!([1, 3, 2])), "bad_grid"));
    out.push(bad("invalid_grid_t", "Images have t = 1.", &ids1, mutate(&|i| i["grid_thw"] = json!([2, 2, 2])), "bad_grid"));
    out.push(bad("invalid_length", "length must be t*h*w/4.", &ids1, mutate(&|i| i["length"] = json!(2)), "bad_length"));
    out.push(bad("invalid_hash_chars", "Hash has a space.", &ids1, mutate(&|i| i["hash"] = json!("a b")), "bad_hash"));
    out.push(bad("invalid_hash_empty", "Empty hash.", &ids1, mutate(&|i| i["hash"] = json!("")), "bad_hash"));
    out.push(bad("invalid_data_truncated", "Base64 shorter than N*1176*2 bytes.", &ids1,
        mutate(&|i| { let d = i["data"].as_str().unwrap(); i["data"] = json!(d[..d.len() - 4].to_owned()); }), "bad_data"));
    out.push(bad("invalid_data_alphabet", "Right length, characters outside base64.", &ids1,
        mutate(&|i| { let d = i["data"].as_str().unwrap(); i["data"] = json!(format!("!!!!{}", &d[4..])); }), "bad_data"));
    out.push(bad("invalid_no_payload", "Neither data nor shm.", &ids1, mutate(&|i| { i.as_object_mut().unwrap().remove("data"); }), "no_payload"));
    out.push(bad("invalid_both_payloads", "data and shm together.", &ids1,
        mutate(&|i| i["shm"] = json!({"path": "/dev/shm/m3serve-1-0-x.bf16", "nbytes": 9408})), "no_payload"));
    out.push(bad("invalid_shm_path", "shm path outside /dev/shm/m3serve-*.", &ids1,
        serde_json::to_value(vec![encode_shm(4, "/dev/shm/m3serve-../../etc/passwd", &ItemMeta { grid_thw: [1, 2, 2], hash: "h", offset: off1[0], length: 1 })]).unwrap(), "bad_shm"));
    out.push(bad("invalid_shm_nbytes", "shm nbytes differs from N*1176*2.", &ids1,
        serde_json::to_value(vec![{ let mut s = s.clone(); if let Some(h) = s.shm.as_mut() { h.nbytes = 10; } s }]).unwrap(), "bad_shm"));
    out.push(bad("invalid_offset_not_image_tokens", "Run does not cover image tokens.", &ids1, mutate(&|i| i["offset"] = json!(0)), "bad_offset"));
    out.push(bad("invalid_offset_past_end", "Run ends past input_ids.", &ids1, mutate(&|i| i["offset"] = json!(1_000_000)), "bad_offset"));
    out.push(bad("invalid_uncovered_image_tokens", "input_ids hold image tokens no item covers.", &ids2, one.clone(), "bad_offset"));
    out.push(bad("invalid_out_of_order", "Items must follow prompt order.", &ids2, serde_json::to_value(vec![&b, &a]).unwrap(), "bad_offset"));
    out.push(bad("invalid_unknown_field", "Unknown fields are rejected (bump the version instead).", &ids1, mutate(&|i| i["extra"] = json!(1)), "bad_schema"));
    out.push(bad("invalid_wrong_type", "shape must be an array of two integers.", &ids1, mutate(&|i| i["shape"] = json!("4x1176")), "bad_schema"));
    // v2: one frame per row ([N, 588]); decodes to the same [N, 1176] rows.
    // A still image's rows hold two equal frames; build such rows from p1's first frames.
    let p1f = expand_frames(&le_bytes_to_bf16(&frame_le_bytes(&p1)));
    let v2 = encode_inline_v2(&p1f, &ItemMeta { grid_thw: [1, 2, 2], hash: "sha256:00ab", offset: off1[0], length: 1 });
    let one_v2 = serde_json::to_value(vec![&v2]).unwrap();
    out.push(vector("valid_one_image_inline_v2", "v2: one temporal frame per row, [4, 588]; the receiver repeats each channel's 196 values (T = 2) to rebuild [4, 1176].", &ids1, one_v2.clone(),
        json!({"valid": true, "images": expect_images(&[(p1f.clone(), [1, 2, 2])])})));
    let s2 = encode_shm_v2(4, "/dev/shm/m3serve-123-0-00ab.bf16", &ItemMeta { grid_thw: [1, 2, 2], hash: "sha256:00ab", offset: off1[0], length: 1 });
    out.push(vector("valid_one_image_shm_v2", "v2 shared-memory handle: nbytes = N*588*2.", &ids1,
        serde_json::to_value(vec![&s2]).unwrap(), json!({"valid": true})));
    let mut_v2 = |f: &dyn Fn(&mut Value)| {
        let mut v = one_v2.clone();
        f(&mut v[0]);
        v
    };
    out.push(bad("invalid_v2_shape_cols", "v2 rows have 588 columns, not 1176.", &ids1, mut_v2(&|i| i["shape"] = json!([4, 1176])), "bad_shape"));
    out.push(bad("invalid_v2_data_v1_length", "v2 with a v1-sized payload (N*1176*2 bytes).", &ids1, mut_v2(&|i| i["data"] = one[0]["data"].clone()), "bad_data"));
    out.push(bad("invalid_v2_shm_nbytes", "v2 shm nbytes must be N*588*2.", &ids1,
        serde_json::to_value(vec![{ let mut s = s2.clone(); if let Some(h) = s.shm.as_mut() { h.nbytes = 4 * 1176 * 2; } s }]).unwrap(), "bad_shm"));
    out.push(bad("invalid_negative_offset", "offset is a non-negative integer.", &ids1, mutate(&|i| i["offset"] = json!(-1)), "bad_schema"));
    out
}

/// What a receiver does with a vector: parse, validate against `input_ids`, decode inline data.
fn check(v: &Value) -> Result<Vec<Vec<u16>>, String> {
    let req = &v["request"];
    let ids: Vec<u32> = serde_json::from_value(req["input_ids"].clone()).map_err(|e| e.to_string())?;
    let items = parse_items(&req["image_data"]).map_err(|e| e.code().to_owned())?;
    let image = u32::try_from(v["image_token_id"].as_u64().unwrap_or(0)).unwrap_or(0);
    validate_request(&ids, &items, image).map_err(|e| e.code().to_owned())?;
    items
        .iter()
        .filter(|it| it.data.is_some())
        .map(|it| decode_inline(it).map_err(|e| e.code().to_owned()))
        .collect()
}

#[test]
fn wire_vectors() {
    let dir = vectors_dir();
    if std::env::var_os("SMG_WRITE_WIRE_VECTORS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, v) in generate() {
            std::fs::write(dir.join(format!("{name}.json")), serde_json::to_string_pretty(&v).unwrap() + "\n").unwrap();
        }
    }
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let fname = path.file_name().unwrap().to_string_lossy().into_owned();
        if !(fname.starts_with("valid_") || fname.starts_with("invalid_")) {
            continue;
        }
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let got = check(&v);
        if v["expect"]["valid"] == json!(true) {
            let decoded = got.unwrap_or_else(|e| panic!("{fname}: expected valid, got {e}"));
            if let Some(images) = v["expect"]["images"].as_array() {
                assert_eq!(decoded.len(), images.len(), "{fname}");
                for (p, want) in decoded.iter().zip(images) {
                    assert_eq!(fnv1a64_hex(&bf16_to_le_bytes(p)), want["fnv1a64"].as_str().unwrap(), "{fname}");
                    assert_eq!(json!(&p[..8]), want["first8"], "{fname}");
                }
            }
        } else {
            let want = v["expect"]["error"].as_str().unwrap();
            assert_eq!(got.err().as_deref(), Some(want), "{fname}");
        }
        n += 1;
    }
    assert!(n >= 20, "only {n} vectors in {}", dir.display());
}
