//! Calling a worker's `/generate` and turning its answer into OpenAI shapes.
//!
//! SGLang's `/generate` answers `{"text", "output_ids", "meta_info": {"finish_reason":
//! {"type": "stop"|"length"|"abort", ...} | null, "prompt_tokens", "completion_tokens", ...}}`;
//! streamed, each `data:` event carries the text so far (or only the new text when the worker
//! runs with `--incremental-streaming-output`: both are handled).
//!
//! The gateway's own time per forwarded request ("overhead": the `smg_gateway_overhead_seconds`
//! histogram, and the `x-smg-overhead-us` / `x-smg-upstream-us` headers of non-streamed
//! answers) is its wall time on the request minus the time it waited on the worker. The wall
//! time starts at [`RequestStart`](crate::RequestStart) (request headers parsed, body not read);
//! the wait starts just before the `/generate` call (its first attempt, when a dead worker is
//! skipped).
//! - not streamed: the wall time ends with the OpenAI answer built and its headers set; the
//!   wait ends with the worker's whole body received.
//! - streamed: the wall time ends when the first chunk converted from the worker's first body
//!   chunk is handed to the server (or when that chunk is converted, if it gave no output); the
//!   wait ends with the worker's first body chunk read.
//!
//! The wait includes reqwest's own work on the call (writing the request, parsing the answer's
//! headers, reading the body), so the overhead leaves that out; and both leave out what the
//! server does before `RequestStart` (reading the request headers) and after the handler
//! (writing the response): a client sees a little more than overhead + upstream.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use futures_util::stream::BoxStream;
use futures_util::StreamExt as _;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::shm::ShmFiles;
use crate::workers::Lease;
use crate::Shared;

/// Which OpenAI API the answer is shaped for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Chat,
    Completion,
}

impl Api {
    /// The route this API is served on (the metrics label).
    pub fn route(self) -> &'static str {
        match self {
            Api::Chat => "/v1/chat/completions",
            Api::Completion => "/v1/completions",
        }
    }
}

/// One request ready to forward.
#[derive(Debug)]
pub struct Forward {
    pub api: Api,
    pub id: String,
    pub model: String,
    /// The serialized `/generate` body.
    pub body: Bytes,
    pub stream: bool,
    pub include_usage: bool,
    /// Gateway-side timings (ms), reported in the `m3serve` field / header.
    pub timings: Value,
    /// Shared-memory files the worker reads; deleted when the answer is complete.
    pub keep: Option<ShmFiles>,
    /// When the gateway took the request ([`RequestStart`](crate::RequestStart)).
    pub start: Instant,
}

/// Header names of the non-streamed answer's overhead and upstream time (integer µs).
pub const OVERHEAD_HEADER: &str = "x-smg-overhead-us";
pub const UPSTREAM_HEADER: &str = "x-smg-upstream-us";

fn micros(d: Duration) -> HeaderValue {
    HeaderValue::from(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The streamed request's overhead clock, consumed when the overhead is recorded.
struct StreamClock {
    start: Instant,
    sent: Instant,
    /// The worker's first body chunk (read by the gateway).
    first_chunk: Option<Instant>,
    api: Api,
}

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A random request id with the OpenAI prefix.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

fn upstream_message(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let msg = v
        .pointer("/error/message")
        .or_else(|| v.get("message"))
        .or_else(|| v.get("detail"))
        .and_then(Value::as_str)
        .map_or_else(|| String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(), str::to_owned);
    msg.chars().take(1000).collect()
}

/// POST the body to the least-loaded healthy worker; a worker that cannot be reached is
/// taken out of rotation and the next one tried.
async fn send(state: &Shared, f: &Forward) -> Result<(reqwest::Response, Lease), ApiError> {
    let mut tried: Vec<String> = Vec::new();
    loop {
        let Some(lease) = state.workers.pick(&tried) else {
            return Err(if tried.is_empty() {
                ApiError::unavailable("no healthy worker")
            } else {
                ApiError::bad_gateway(format!("no worker reachable (tried {})", tried.join(", ")))
            });
        };
        let url = lease.worker().url.clone();
        let mut rb = state
            .client
            .post(format!("{url}/generate"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(f.body.clone());
        if !f.stream {
            rb = rb.timeout(state.cfg.upstream_timeout);
        }
        match rb.send().await {
            Ok(resp) if resp.status().is_success() => return Ok((resp, lease)),
            Ok(resp) => {
                let status = resp.status();
                let body = resp.bytes().await.unwrap_or_default();
                let msg = upstream_message(&body);
                if status.is_client_error() {
                    return Err(ApiError::bad_request(format!("rejected by worker: {msg}")).with_code("rejected_by_worker"));
                }
                state.metrics.record_worker_error(&url);
                return Err(ApiError::bad_gateway(format!("worker answered {status}: {msg}")));
            }
            Err(e) => {
                state.metrics.record_worker_error(&url);
                if e.is_connect() {
                    state.workers.mark_failed(&url);
                    tried.push(url);
                    continue;
                }
                if e.is_timeout() {
                    return Err(ApiError::gateway_timeout("worker did not answer in time"));
                }
                return Err(ApiError::bad_gateway(format!("worker call failed: {e}")));
            }
        }
    }
}

fn finish_reason(meta: &Value) -> Option<&'static str> {
    match meta.pointer("/finish_reason/type").and_then(Value::as_str) {
        Some("length") => Some("length"),
        Some(_) => Some("stop"),
        None => None,
    }
}

fn usage(meta: &Value) -> Value {
    let p = meta.get("prompt_tokens").and_then(Value::as_u64).unwrap_or(0);
    let c = meta.get("completion_tokens").and_then(Value::as_u64).unwrap_or(0);
    let mut u = json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c});
    if let Some(cached) = meta.get("cached_tokens").and_then(Value::as_u64) {
        u["prompt_tokens_details"] = json!({"cached_tokens": cached});
    }
    u
}

/// Build the OpenAI JSON for a non-streamed worker answer.
pub fn convert_full(api: Api, id: &str, created: u64, model: &str, out: &Value) -> Result<Value, ApiError> {
    let text = out.get("text").and_then(Value::as_str).ok_or_else(|| ApiError::bad_gateway("worker answer has no text"))?;
    let meta = out.get("meta_info").cloned().unwrap_or(Value::Null);
    let fr = finish_reason(&meta).unwrap_or("stop");
    let choice = match api {
        Api::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": fr}),
        Api::Completion => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": fr}),
    };
    let object = match api {
        Api::Chat => "chat.completion",
        Api::Completion => "text_completion",
    };
    Ok(json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice], "usage": usage(&meta)}))
}

/// Turns SGLang stream events into OpenAI SSE chunks.
#[derive(Debug)]
pub struct SseConverter {
    api: Api,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    sent: String,
    meta: Value,
    finish_sent: bool,
    done: bool,
}

fn sse(v: &Value) -> Bytes {
    let mut s = Vec::with_capacity(256);
    s.extend_from_slice(b"data: ");
    // Serializing a Value cannot fail.
    serde_json::to_writer(&mut s, v).unwrap_or_default();
    s.extend_from_slice(b"\n\n");
    Bytes::from(s)
}

impl SseConverter {
    pub fn new(api: Api, id: String, created: u64, model: String, include_usage: bool) -> Self {
        Self { api, id, created, model, include_usage, sent: String::new(), meta: Value::Null, finish_sent: false, done: false }
    }

    fn chunk(&self, delta: Option<&str>, role: bool, finish: Option<&str>) -> Value {
        let (object, choice) = match self.api {
            Api::Chat => {
                let mut d = serde_json::Map::new();
                if role {
                    d.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = delta {
                    d.insert("content".into(), json!(t));
                }
                ("chat.completion.chunk", json!({"index": 0, "delta": d, "logprobs": null, "finish_reason": finish}))
            }
            Api::Completion => ("text_completion", json!({"index": 0, "text": delta.unwrap_or(""), "logprobs": null, "finish_reason": finish})),
        };
        let mut c = json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [choice]});
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    /// The opening chunk (chat: the assistant role).
    pub fn start(&self) -> Option<Bytes> {
        (self.api == Api::Chat).then(|| sse(&self.chunk(Some(""), true, None)))
    }

    /// One worker event.
    pub fn on_event(&mut self, ev: &Value) -> Vec<Bytes> {
        let mut out = Vec::new();
        if let Some(err) = ev.get("error") {
            out.push(sse(&json!({"error": {"message": upstream_message(err.to_string().as_bytes()), "type": "upstream_error", "param": null, "code": "worker_error"}})));
            out.extend(self.finish());
            return out;
        }
        let text = ev.get("text").and_then(Value::as_str).unwrap_or("");
        let delta = match text.strip_prefix(self.sent.as_str()) {
            Some(rest) => rest.to_owned(),
            // Incremental mode: the event holds only the new text.
            None => text.to_owned(),
        };
        if text.len() >= self.sent.len() && text.starts_with(self.sent.as_str()) {
            text.clone_into(&mut self.sent);
        } else {
            self.sent.push_str(&delta);
        }
        if let Some(meta) = ev.get("meta_info") {
            self.meta = meta.clone();
        }
        if !delta.is_empty() {
            out.push(sse(&self.chunk(Some(&delta), false, None)));
        }
        if let Some(fr) = finish_reason(&self.meta) {
            if !self.finish_sent {
                self.finish_sent = true;
                out.push(sse(&self.chunk(None, false, Some(fr))));
            }
        }
        out
    }

    /// Closing chunks: finish_reason if not yet sent, usage if asked, `[DONE]`. Idempotent.
    pub fn finish(&mut self) -> Vec<Bytes> {
        if self.done {
            return Vec::new();
        }
        self.done = true;
        let mut out = Vec::new();
        if !self.finish_sent {
            self.finish_sent = true;
            out.push(sse(&self.chunk(None, false, Some(finish_reason(&self.meta).unwrap_or("stop")))));
        }
        if self.include_usage {
            let object = if self.api == Api::Chat { "chat.completion.chunk" } else { "text_completion" };
            out.push(sse(&json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [], "usage": usage(&self.meta)})));
        }
        out.push(Bytes::from_static(b"data: [DONE]\n\n"));
        out
    }
}

/// Largest SSE event buffered from a worker before the stream is cut.
const MAX_EVENT_BYTES: usize = 16 << 20;

struct StreamState {
    up: BoxStream<'static, reqwest::Result<Bytes>>,
    buf: Vec<u8>,
    conv: SseConverter,
    queue: VecDeque<Bytes>,
    done: bool,
    state: Shared,
    worker: String,
    _lease: Lease,
    _keep: Option<ShmFiles>,
    clock: Option<StreamClock>,
}

impl StreamState {
    /// Record the overhead once the worker's first chunk was read and converted.
    fn record_overhead(&mut self) {
        let Some(c) = self.clock.take_if(|c| c.first_chunk.is_some()) else { return };
        let upstream = c.first_chunk.map_or(Duration::ZERO, |t| t - c.sent);
        let overhead = c.start.elapsed().saturating_sub(upstream);
        self.state.metrics.record_overhead(c.api.route(), true, overhead.as_secs_f64());
    }

    fn error(&mut self, msg: &str) {
        self.state.metrics.record_worker_error(&self.worker);
        self.queue.push_back(sse(&json!({"error": {"message": msg, "type": "upstream_error", "param": null, "code": "worker_error"}})));
        let fin = self.conv.finish();
        self.queue.extend(fin);
        self.done = true;
    }

    fn drain_events(&mut self) {
        while let Some(pos) = self.buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = self.buf.drain(..pos + 2).collect();
            for line in event.split(|&b| b == b'\n') {
                let Some(data) = line.strip_prefix(b"data:") else { continue };
                let data = data.trim_ascii();
                if data == b"[DONE]" {
                    let fin = self.conv.finish();
                    self.queue.extend(fin);
                    self.done = true;
                    return;
                }
                match serde_json::from_slice::<Value>(data) {
                    Ok(v) => {
                        let is_err = v.get("error").is_some();
                        let out = self.conv.on_event(&v);
                        self.queue.extend(out);
                        if is_err {
                            self.state.metrics.record_worker_error(&self.worker);
                            self.done = true;
                            return;
                        }
                    }
                    Err(e) => {
                        self.error(&format!("worker sent a malformed event: {e}"));
                        return;
                    }
                }
            }
        }
        if self.buf.len() > MAX_EVENT_BYTES {
            self.error("worker event too large");
        }
    }
}

fn timings_header(v: &Value) -> Option<HeaderValue> {
    HeaderValue::from_str(&v.to_string()).ok()
}

/// Forward and answer: JSON or an SSE stream.
pub async fn run(state: Shared, f: Forward) -> Result<Response, ApiError> {
    let created = now_secs();
    let sent = Instant::now();
    let (resp, lease) = send(&state, &f).await?;
    let worker = lease.worker().url.clone();
    if !f.stream {
        let body = resp.bytes().await.map_err(|e| {
            state.metrics.record_worker_error(&worker);
            if e.is_timeout() {
                ApiError::gateway_timeout("worker did not answer in time")
            } else {
                ApiError::bad_gateway(format!("reading worker answer: {e}"))
            }
        })?;
        let upstream = sent.elapsed();
        drop(f.keep);
        drop(lease);
        let out: Value = serde_json::from_slice(&body).map_err(|e| {
            state.metrics.record_worker_error(&worker);
            ApiError::bad_gateway(format!("worker answer is not JSON: {e}"))
        })?;
        let mut v = convert_full(f.api, &f.id, created, &f.model, &out)?;
        v["m3serve"] = json!({"timings_ms": f.timings});
        let mut r = Response::new(Body::from(v.to_string()));
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(h) = timings_header(&f.timings) {
            r.headers_mut().insert("x-m3serve-timings", h);
        }
        let overhead = f.start.elapsed().saturating_sub(upstream);
        state.metrics.record_overhead(f.api.route(), false, overhead.as_secs_f64());
        r.headers_mut().insert(OVERHEAD_HEADER, micros(overhead));
        r.headers_mut().insert(UPSTREAM_HEADER, micros(upstream));
        return Ok(r);
    }
    let conv = SseConverter::new(f.api, f.id.clone(), created, f.model.clone(), f.include_usage);
    let mut queue = VecDeque::new();
    queue.extend(conv.start());
    let st = StreamState {
        up: resp.bytes_stream().boxed(),
        buf: Vec::new(),
        conv,
        queue,
        done: false,
        state,
        worker,
        _lease: lease,
        _keep: f.keep,
        clock: Some(StreamClock { start: f.start, sent, first_chunk: None, api: f.api }),
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(b) = st.queue.pop_front() {
                st.record_overhead();
                return Some((Ok::<_, Infallible>(b), st));
            }
            if st.done {
                st.record_overhead();
                return None;
            }
            match st.up.next().await {
                Some(Ok(chunk)) => {
                    if let Some(c) = st.clock.as_mut() {
                        c.first_chunk.get_or_insert_with(Instant::now);
                    }
                    st.buf.extend_from_slice(&chunk);
                    st.drain_events();
                    if st.queue.is_empty() {
                        // Nothing to relay from this chunk: the gateway's part ends here.
                        st.record_overhead();
                    }
                }
                Some(Err(e)) => st.error(&format!("worker stream failed: {e}")),
                None => {
                    let fin = st.conv.finish();
                    st.queue.extend(fin);
                    st.done = true;
                }
            }
        }
    });
    let mut r = Response::new(Body::from_stream(stream));
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Some(t) = timings_header(&f.timings) {
        h.insert("x-m3serve-timings", t);
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(b: &[Bytes]) -> String {
        b.iter().map(|x| String::from_utf8_lossy(x).into_owned()).collect()
    }

    #[test]
    fn cumulative_stream_to_chat_chunks() {
        let mut c = SseConverter::new(Api::Chat, "id1".into(), 1, "m".into(), true);
        let start = c.start().unwrap();
        assert!(String::from_utf8_lossy(&start).contains("\"role\":\"assistant\""));
        let a = c.on_event(&json!({"text": "Hel", "meta_info": {"finish_reason": null}}));
        let b = c.on_event(&json!({"text": "Hello", "meta_info": {"finish_reason": {"type": "length"}, "prompt_tokens": 3, "completion_tokens": 2}}));
        let fin = c.finish();
        let all = text(&[a, b, fin].concat());
        assert!(all.contains("\"content\":\"Hel\""));
        assert!(all.contains("\"content\":\"lo\""));
        assert!(all.contains("\"finish_reason\":\"length\""));
        assert!(all.contains("\"total_tokens\":5"));
        assert!(all.ends_with("data: [DONE]\n\n"));
        assert!(c.finish().is_empty());
    }

    #[test]
    fn incremental_stream_and_error() {
        let mut c = SseConverter::new(Api::Completion, "id".into(), 1, "m".into(), false);
        let a = text(&c.on_event(&json!({"text": "ab"})));
        let b = text(&c.on_event(&json!({"text": "cd"})));
        assert!(a.contains("\"text\":\"ab\"") && b.contains("\"text\":\"cd\""));
        let e = text(&c.on_event(&json!({"error": {"message": "boom"}})));
        assert!(e.contains("boom") && e.ends_with("data: [DONE]\n\n"));
    }

    #[test]
    fn full_answer() {
        let out = json!({"text": "hi", "meta_info": {"finish_reason": {"type": "stop", "matched": 2}, "prompt_tokens": 4, "completion_tokens": 1, "cached_tokens": 0}});
        let v = convert_full(Api::Chat, "x", 5, "m", &out).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "hi");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["usage"]["total_tokens"], 5);
        assert!(convert_full(Api::Chat, "x", 5, "m", &json!({})).is_err());
    }
}
