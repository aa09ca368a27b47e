//! Test fixtures: a tiny model directory (hand-written WordLevel tokenizer, a chat template
//! that places image tokens, config.json with image_token_id) and a mock SGLang worker.
#![allow(dead_code, clippy::doc_markdown)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

pub const IMAGE_TOKEN_ID: u32 = 5;

pub const TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m.role }} {% if m.content is string %}{{ m.content }}{% else %}{% for p in m.content %}{% if p.type == 'image' %}]<]image[>[{% else %}{{ p.text }}{% endif %}{% endfor %}{% endif %}<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}";

/// Write a model directory under the system temp dir.
pub fn model_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("smg-gw-test-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "]<]image[>[", "]<]start of image[>[", "]<]end of image[>["];
    let ids = [0, 1, 2, 3, 4, 5, 6, 7];
    let added: Vec<Value> = specials
        .iter()
        .zip(ids)
        .map(|(c, i)| json!({"id": i, "content": c, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let mut vocab = serde_json::Map::new();
    for (c, i) in specials.iter().zip(ids) {
        vocab.insert((*c).to_owned(), json!(i));
    }
    for (i, w) in ["user", "assistant", "system", "hello", "world", "what", "is", "this", "?", "hi", "a", "b", "c"].iter().enumerate() {
        vocab.insert((*w).to_owned(), json!(10 + i));
    }
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        json!({"bos_token": "<s>", "eos_token": "</s>", "chat_template": TEMPLATE}).to_string(),
    )
    .unwrap();
    std::fs::write(dir.join("config.json"), json!({"image_token_id": IMAGE_TOKEN_ID}).to_string()).unwrap();
    dir
}

/// What the mock worker saw.
#[derive(Default)]
pub struct Seen {
    pub bodies: Vec<Value>,
}

pub type SeenRef = Arc<Mutex<Seen>>;

async fn generate(State(seen): State<SeenRef>, Json(body): Json<Value>) -> Response {
    let n_ids = body["input_ids"].as_array().map_or(0, Vec::len);
    let stream = body["stream"].as_bool().unwrap_or(false);
    let max = body["sampling_params"]["max_new_tokens"].as_u64().unwrap_or(3);
    seen.lock().unwrap().bodies.push(body);
    if n_ids > 10_000 {
        return (axum::http::StatusCode::BAD_REQUEST, Json(json!({"error": {"message": "prompt too long for worker"}}))).into_response();
    }
    let meta = |done: bool, k: u64| {
        json!({"id": "r", "prompt_tokens": n_ids, "completion_tokens": k, "cached_tokens": 0,
               "finish_reason": if done { json!({"type": "length", "length": max}) } else { Value::Null }})
    };
    if !stream {
        return Json(json!({"text": "abc", "output_ids": [20, 21, 22], "meta_info": meta(true, 3)})).into_response();
    }
    let events: Vec<Result<String, std::convert::Infallible>> = vec![
        Ok(format!("data: {}\n\n", json!({"text": "a", "meta_info": meta(false, 1)}))),
        Ok(format!("data: {}\n\n", json!({"text": "ab", "meta_info": meta(false, 2)}))),
        Ok(format!("data: {}\n\n", json!({"text": "abc", "meta_info": meta(true, 3)}))),
        Ok("data: [DONE]\n\n".to_owned()),
    ];
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(futures_util::stream::iter(events)))
        .unwrap()
}

/// Start a mock SGLang worker on 127.0.0.1; returns its URL and what it records.
pub async fn mock_worker() -> (String, SeenRef) {
    let seen: SeenRef = Arc::default();
    let app = Router::new()
        .route("/generate", post(generate))
        .route("/health", get(|| async { "ok" }))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (format!("http://{addr}"), seen)
}

/// A URL where nothing listens.
pub fn dead_worker() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

/// PNG bytes of a w×h RGB gradient.
pub fn png(w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().unwrap();
        let data: Vec<u8> = (0..w * h * 3).map(|i| (i % 251) as u8).collect();
        wr.write_image_data(&data).unwrap();
    }
    out
}

pub fn data_url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}
