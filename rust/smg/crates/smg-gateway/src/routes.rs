//! HTTP handlers: OpenAI chat/text completions, models, health, metrics.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Extension, FromRequest, OriginalUri, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use smg_core::wire::{encode_inline_base64_v2, encode_inline_v2, encode_shm_v2, ImageItem, ItemMeta};

use crate::error::ApiError;
use crate::forward::{self, Api, Forward};
use crate::images::{self, Payload, ReadyImage};
use crate::openai::{image_refs, template_messages, ChatRequest, CompletionRequest};
use crate::shm::ShmFiles;
use crate::{RequestStart, Shared};

/// A JSON body read under the body size limit and the body timeout, with every failure
/// (slow client, too large, not JSON, wrong types, missing fields) an OpenAI-style 4xx.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Shared> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Shared) -> Result<Self, ApiError> {
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or("");
            if !ct.starts_with("application/json") {
                return Err(ApiError::unsupported_media(format!("Content-Type must be application/json, got {ct:?}")));
            }
        }
        let bytes = tokio::time::timeout(state.cfg.body_timeout, Bytes::from_request(req, state))
            .await
            .map_err(|_| ApiError::timeout("request body not received in time"))?
            .map_err(|rej| {
                if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::too_large(format!("request body larger than {} bytes", state.cfg.max_body_bytes))
                } else {
                    ApiError::bad_request(format!("cannot read request body: {}", rej.body_text()))
                }
            })?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            use serde_json::error::Category;
            match e.classify() {
                Category::Data => ApiError::bad_request(format!("invalid request: {e}")).with_code("invalid_request"),
                _ => ApiError::bad_request(format!("malformed JSON: {e}")).with_code("invalid_json"),
            }
        })
    }
}

fn ms(t: Instant) -> f64 {
    (t.elapsed().as_secs_f64() * 1e6).round() / 1e3
}

/// Shared tail of both completion routes: images → expansion → wire items → worker.
struct Prepared {
    input_ids: Vec<u32>,
    image_data: Vec<ImageItem>,
    keep: Option<ShmFiles>,
    timings: serde_json::Map<String, Value>,
}

/// The resize and normalise + patchify stages as reported: one `resize_normalize_patchify`
/// stage when the core ran them fused (the resampling then has no time of its own), else two.
fn stage_split(t: &smg_core::image::StageTimings) -> Vec<(&'static str, u64)> {
    if t.resize_fused {
        vec![("resize_normalize_patchify", t.resize_us + t.normalize_patchify_us)]
    } else {
        vec![("resize", t.resize_us), ("normalize_patchify", t.normalize_patchify_us)]
    }
}

fn record_image_metrics(state: &Shared, ready: &[ReadyImage]) {
    let m = &state.metrics;
    m.record_images(ready.len());
    for r in ready {
        m.record_stage("fetch", r.fetch_us as f64 / 1e6);
        m.record_stage("decode", r.timings.decode_us as f64 / 1e6);
        for (name, us) in stage_split(&r.timings) {
            m.record_stage(name, us as f64 / 1e6);
        }
    }
}

async fn prepare(state: &Shared, ids: Vec<u32>, req: Option<&ChatRequest>, t_tok_ms: f64) -> Result<Prepared, ApiError> {
    let cfg = &state.cfg;
    let mut timings = serde_json::Map::new();
    timings.insert("template_tokenize".into(), json!(t_tok_ms));
    let refs = req.map(|r| image_refs(&r.messages)).unwrap_or_default();
    if refs.is_empty() {
        if ids.len() > cfg.max_prompt_tokens {
            return Err(too_long(ids.len(), cfg.max_prompt_tokens));
        }
        return Ok(Prepared { input_ids: ids, image_data: Vec::new(), keep: None, timings });
    }
    // Cheap checks first: the placeholder count and the text length before any image work.
    let image_ids = state.tokenizer.image_ids().ok_or_else(|| ApiError::bad_request("this model does not accept images").with_param("messages"))?;
    let placeholders = ids.iter().filter(|&&t| t == image_ids.image).count();
    if placeholders != refs.len() {
        return Err(ApiError::bad_request(format!(
            "the rendered prompt has {placeholders} image placeholder(s) for {} image(s)",
            refs.len()
        ))
        .with_param("messages"));
    }
    if ids.len() > cfg.max_prompt_tokens {
        return Err(too_long(ids.len(), cfg.max_prompt_tokens));
    }
    let t_img = Instant::now();
    let ready = images::prepare_all(&refs, &state.images).await?;
    timings.insert("images".into(), json!(ms(t_img)));
    record_image_metrics(state, &ready);
    let mut per_image: Vec<Value> = ready
        .iter()
        .map(|r| {
            let mut t = json!({"fetch": r.fetch_us as f64 / 1e3, "decode": r.timings.decode_us as f64 / 1e3,
                               "grid_thw": r.grid_thw});
            for (name, us) in stage_split(&r.timings) {
                t[name] = json!(us as f64 / 1e3);
            }
            t
        })
        .collect();
    let total_pixels: u64 = ready.iter().map(|r| r.num_patches as u64 * 196).sum();
    if total_pixels > cfg.max_total_pixels {
        return Err(ApiError::bad_request(format!(
            "images total {total_pixels} pixels after resizing, more than the limit {}",
            cfg.max_total_pixels
        ))
        .with_param("messages")
        .with_code("too_many_pixels"));
    }
    let counts: Vec<usize> = ready.iter().map(ReadyImage::num_image_tokens).collect();
    let (input_ids, spans) = state.tokenizer.expand_images(&ids, &counts).map_err(|e| ApiError::bad_request(e.to_string()).with_param("messages"))?;
    if input_ids.len() > cfg.max_prompt_tokens {
        return Err(too_long(input_ids.len(), cfg.max_prompt_tokens));
    }
    let mut keep = cfg.shm.then(ShmFiles::default);
    let mut image_data = Vec::with_capacity(ready.len());
    for ((r, span), info) in ready.into_iter().zip(spans).zip(&mut per_image) {
        let meta = ItemMeta { grid_thw: r.grid_thw, hash: &r.hash, offset: span.offset, length: span.length };
        let mut item = match (r.payload, keep.as_mut()) {
            (Payload::Base64(data), _) => encode_inline_base64_v2(r.num_patches, data, &meta),
            (Payload::Patches(p), Some(files)) => {
                let path = files
                    .write(&r.hash, &smg_core::wire::frame_le_bytes(&p))
                    .map_err(|e| ApiError::internal(format!("cannot write shared memory: {e}")))?;
                encode_shm_v2(r.num_patches, &path, &meta)
            }
            (Payload::Patches(p), None) => encode_inline_v2(&p, &meta),
        };
        info["wire_bytes"] = json!(wire_bytes(&mut item));
        image_data.push(item);
    }
    timings.insert("per_image".into(), Value::Array(per_image));
    Ok(Prepared { input_ids, image_data, keep, timings })
}

/// Bytes of `item` in the `/generate` body (reported per image as `wire_bytes`): its compact JSON
/// without `data`, plus the `,"data":"…"` member (base64 needs no escaping), so the multi-MB
/// string is not serialized twice.
fn wire_bytes(item: &mut ImageItem) -> usize {
    let data = item.data.take();
    let rest = serde_json::to_vec(&*item).map_or(0, |v| v.len());
    let data_len = data.as_ref().map_or(0, |d| r#","data":"""#.len() + d.len());
    item.data = data;
    rest + data_len
}

fn too_long(n: usize, max: usize) -> ApiError {
    ApiError::bad_request(format!("prompt is {n} tokens, more than the limit {max}"))
        .with_param("messages")
        .with_code("context_length_exceeded")
}

fn generate_body(rid: &str, p: &Prepared, params: &Value, stream: bool) -> Result<Bytes, ApiError> {
    let mut body = json!({"rid": rid, "input_ids": p.input_ids, "sampling_params": params, "stream": stream});
    if !p.image_data.is_empty() {
        body["image_data"] = serde_json::to_value(&p.image_data).map_err(|e| ApiError::internal(e.to_string()))?;
    }
    serde_json::to_vec(&body).map(Bytes::from).map_err(|e| ApiError::internal(e.to_string()))
}

/// POST /v1/chat/completions
pub async fn chat_completions(
    State(state): State<Shared>,
    Extension(RequestStart(start)): Extension<RequestStart>,
    JsonBody(req): JsonBody<ChatRequest>,
) -> Result<Response, ApiError> {
    let t0 = Instant::now();
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty").with_param("messages"));
    }
    let params = req.sampling.to_sglang(state.cfg.default_max_tokens, state.cfg.max_max_tokens)?;
    let n_images = image_refs(&req.messages).len();
    if n_images > state.cfg.max_images {
        return Err(ApiError::bad_request(format!("{n_images} images, more than the limit {}", state.cfg.max_images))
            .with_param("messages")
            .with_code("too_many_images"));
    }
    let t_tok = Instant::now();
    let text = state
        .template
        .render(&template_messages(&req.messages), true)
        .map_err(|e| ApiError::bad_request(e.to_string()).with_param("messages"))?;
    let ids = state.tokenizer.encode(&text).map_err(|e| ApiError::bad_request(e.to_string()).with_param("messages"))?;
    let tok_ms = ms(t_tok);
    state.metrics.record_stage("template_tokenize", tok_ms / 1e3);
    let p = prepare(&state, ids, Some(&req), tok_ms).await?;
    let id = forward::new_id("chatcmpl");
    let body = generate_body(&id, &p, &params, req.sampling.stream)?;
    let mut timings = p.timings;
    timings.insert("gateway_total".into(), json!(ms(t0)));
    forward::run(
        state.clone(),
        Forward {
            api: Api::Chat,
            id,
            model: req.model.clone().unwrap_or_else(|| state.cfg.served_model_name.clone()),
            body,
            stream: req.sampling.stream,
            include_usage: req.sampling.include_usage(),
            timings: Value::Object(timings),
            keep: p.keep,
            start,
        },
    )
    .await
}

/// POST /v1/completions (text only).
pub async fn completions(
    State(state): State<Shared>,
    Extension(RequestStart(start)): Extension<RequestStart>,
    JsonBody(req): JsonBody<CompletionRequest>,
) -> Result<Response, ApiError> {
    let t0 = Instant::now();
    let params = req.sampling.to_sglang(state.cfg.default_max_tokens, state.cfg.max_max_tokens)?;
    let prompt = req.prompt.single()?;
    let t_tok = Instant::now();
    let ids = state
        .tokenizer
        .encode_with_special_tokens(&prompt)
        .map_err(|e| ApiError::bad_request(e.to_string()).with_param("prompt"))?;
    let tok_ms = ms(t_tok);
    state.metrics.record_stage("template_tokenize", tok_ms / 1e3);
    let p = prepare(&state, ids, None, tok_ms).await?;
    let id = forward::new_id("cmpl");
    let body = generate_body(&id, &p, &params, req.sampling.stream)?;
    let mut timings = p.timings;
    timings.insert("gateway_total".into(), json!(ms(t0)));
    forward::run(
        state.clone(),
        Forward {
            api: Api::Completion,
            id,
            model: req.model.clone().unwrap_or_else(|| state.cfg.served_model_name.clone()),
            body,
            stream: req.sampling.stream,
            include_usage: req.sampling.include_usage(),
            timings: Value::Object(timings),
            keep: p.keep,
            start,
        },
    )
    .await
}

/// GET /v1/models
pub async fn models(State(state): State<Shared>) -> Json<Value> {
    let created = forward::now_secs() - state.started.elapsed().as_secs();
    Json(json!({"object": "list", "data": [{"id": state.cfg.served_model_name, "object": "model", "created": created, "owned_by": "m3serve"}]}))
}

/// GET /health: 200 while at least one worker is in rotation, else 503.
pub async fn health(State(state): State<Shared>) -> Response {
    let workers: Vec<Value> = state
        .workers
        .snapshot()
        .into_iter()
        .map(|(url, healthy, outstanding)| json!({"url": url, "healthy": healthy, "outstanding": outstanding}))
        .collect();
    let ok = state.workers.any_healthy();
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({"status": if ok { "ok" } else { "no_healthy_worker" }, "workers": workers}))).into_response()
}

/// GET /metrics (Prometheus text format 0.0.4).
pub async fn metrics(State(state): State<Shared>) -> Response {
    let text = state.metrics.render(&state.workers.snapshot());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

pub async fn not_found(OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::not_found(uri.path())
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_bytes_is_the_serialized_length() {
        let patches = vec![0x3f80_u16; 8 * smg_core::wire::PATCH_DIM];
        let meta = ItemMeta { grid_thw: [2, 2, 2], hash: "ab\"c", offset: 3, length: 2 };
        let inline = encode_inline_v2(&patches, &meta);
        let shm = encode_shm_v2(8, "/dev/shm/m3serve-x", &meta);
        for mut item in [inline, shm] {
            let want = serde_json::to_vec(&item).unwrap().len();
            assert_eq!(wire_bytes(&mut item), want);
            assert_eq!(serde_json::to_vec(&item).unwrap().len(), want, "item left as it was");
        }
    }
}
