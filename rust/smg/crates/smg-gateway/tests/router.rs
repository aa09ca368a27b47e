//! Router tests: the real router (`app(state)`) against a mock SGLang worker on 127.0.0.1.

#![allow(clippy::doc_markdown)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt as _;
use serde_json::{json, Value};
use smg_gateway::{app, AppState, Config};
use tower::ServiceExt as _;

use common::{data_url, dead_worker, mock_worker, model_dir, png, SeenRef, IMAGE_TOKEN_ID};

fn state(workers: Vec<String>, tag: &str, tweak: impl FnOnce(&mut Config)) -> Arc<AppState> {
    let mut cfg = Config::new(workers, model_dir(tag));
    cfg.served_model_name = "tiny-m3".into();
    tweak(&mut cfg);
    Arc::new(AppState::load(cfg).unwrap())
}

async fn call(router: &Router, method: &str, uri: &str, body: impl Into<Body>, headers: &[(&str, &str)]) -> (StatusCode, Vec<u8>) {
    let mut b = Request::builder().method(method).uri(uri).header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = router.clone().oneshot(b.body(body.into()).unwrap()).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes().to_vec();
    (status, bytes)
}

async fn post_json(router: &Router, uri: &str, body: &Value) -> (StatusCode, Value) {
    let (s, b) = call(router, "POST", uri, body.to_string(), &[]).await;
    (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

fn assert_openai_error(v: &Value) {
    let e = &v["error"];
    assert!(e["message"].is_string() && e["type"].is_string(), "not an OpenAI error: {v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
}

async fn setup(tag: &str) -> (Router, SeenRef) {
    let (url, seen) = mock_worker().await;
    (app(state(vec![url], tag, |_| {})), seen)
}

#[tokio::test]
async fn chat_text_non_stream() {
    let (router, seen) = setup("text").await;
    let (s, v) = post_json(&router, "/v1/chat/completions", &json!({
        "model": "tiny-m3", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 3, "temperature": 0.5, "seed": 7, "stop": ["x"]
    }))
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["choices"][0]["message"], json!({"role": "assistant", "content": "abc"}));
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    let body = seen.lock().unwrap().bodies.pop().unwrap();
    // <|im_start|> user hello world <|im_end|> <|im_start|> assistant
    assert_eq!(body["input_ids"], json!([3, 10, 13, 14, 4, 3, 11]));
    assert_eq!(body["sampling_params"], json!({"max_new_tokens": 3, "temperature": 0.5, "sampling_seed": 7, "stop": ["x"]}));
    assert!(body.get("image_data").is_none());
}

#[tokio::test]
async fn chat_stream_with_usage() {
    let (router, _) = setup("stream").await;
    let (s, b) = call(&router, "POST", "/v1/chat/completions", json!({
        "messages": [{"role": "user", "content": "hi"}], "stream": true, "stream_options": {"include_usage": true}
    }).to_string(), &[]).await;
    assert_eq!(s, StatusCode::OK);
    let text = String::from_utf8(b).unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(content, "abc");
    assert!(chunks.iter().any(|c| c["choices"][0]["finish_reason"] == "length"));
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["total_tokens"], last["usage"]["prompt_tokens"].as_u64().unwrap() + 3);
}

#[tokio::test]
async fn completions_and_models() {
    let (router, seen) = setup("cmpl").await;
    let (s, v) = post_json(&router, "/v1/completions", &json!({"prompt": "hello", "max_tokens": 2})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "abc");
    assert_eq!(seen.lock().unwrap().bodies[0]["input_ids"], json!([13]));
    let (s, b) = call(&router, "GET", "/v1/models", Body::empty(), &[]).await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["data"][0]["id"], "tiny-m3");
}

#[tokio::test]
async fn chat_with_image_sends_patches() {
    let (router, seen) = setup("image").await;
    let img = png(64, 48);
    let (s, v) = post_json(&router, "/v1/chat/completions", &json!({
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(&img)}}, {"type": "text", "text": "what is this ?"}]}],
        "max_tokens": 2
    }))
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let t = &v["m3serve"]["timings_ms"]["per_image"][0];
    assert!(t["decode"].is_number(), "{v}");
    // the resampling is one stage with normalise + patchify where the core fuses them, else two
    let fused = t["resize_normalize_patchify"].is_number();
    assert_eq!(t["resize"].is_number(), !fused, "{t}");
    assert_eq!(t["normalize_patchify"].is_number(), !fused, "{t}");
    let body = seen.lock().unwrap().bodies.pop().unwrap();
    let ids: Vec<u32> = serde_json::from_value(body["input_ids"].clone()).unwrap();
    let items = smg_core::wire::parse_items(&body["image_data"]).unwrap();
    assert_eq!(items.len(), 1);
    smg_core::wire::validate_request(&ids, &items, IMAGE_TOKEN_ID).unwrap();
    let wire = serde_json::to_vec(&body["image_data"][0]).unwrap().len();
    assert_eq!(v["m3serve"]["timings_ms"]["per_image"][0]["wire_bytes"], json!(wire), "bytes the worker got for the image");
    let off = usize::try_from(items[0].offset).unwrap();
    assert_eq!(ids[off - 1], 6, "start-of-image token before the run");
    assert_eq!(ids[off + usize::try_from(items[0].length).unwrap()], 7, "end-of-image token after the run");
    let patches = smg_core::wire::decode_inline(&items[0]).unwrap();
    let want = smg_core::image::preprocess_image(&img, &smg_core::image::ImageOptions::default()).unwrap();
    assert_eq!(patches, want.patches);
    assert_eq!(items[0].hash, want.hash);
}

#[tokio::test]
async fn bad_inputs_are_openai_4xx() {
    let (url, _) = mock_worker().await;
    let router = app(state(vec![url], "bad", |c| {
        c.max_images = 2;
        c.max_body_bytes = 4096;
        c.max_prompt_tokens = 50;
    }));
    let cases: Vec<(&str, String, StatusCode, &str)> = vec![
        ("malformed json", "{\"messages\": [".into(), StatusCode::BAD_REQUEST, "invalid_json"),
        ("not json", "hello".into(), StatusCode::BAD_REQUEST, "invalid_json"),
        ("wrong type", json!({"messages": "hi"}).to_string(), StatusCode::BAD_REQUEST, "invalid_request"),
        ("missing field", json!({"model": "m"}).to_string(), StatusCode::BAD_REQUEST, "invalid_request"),
        ("wrong number type", json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}).to_string(), StatusCode::BAD_REQUEST, "invalid_request"),
        ("unknown part type", json!({"messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]}).to_string(), StatusCode::BAD_REQUEST, "invalid_request"),
        ("invalid base64", json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}).to_string(), StatusCode::BAD_REQUEST, "invalid_base64"),
        ("corrupt image", json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(&png(8, 8)[..40])}}]}]}).to_string(), StatusCode::BAD_REQUEST, ""),
        ("file url not allowed", json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}).to_string(), StatusCode::BAD_REQUEST, "image_url_forbidden"),
        ("http not allowed", json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}]}).to_string(), StatusCode::BAD_REQUEST, "image_url_forbidden"),
        ("too many images", json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:,"}}, {"type": "image_url", "image_url": {"url": "data:,"}}, {"type": "image_url", "image_url": {"url": "data:,"}}]}]}).to_string(),
            StatusCode::BAD_REQUEST, "too_many_images"),
        ("n=2", json!({"messages": [{"role": "user", "content": "hi"}], "n": 2}).to_string(), StatusCode::BAD_REQUEST, ""),
        ("empty messages", json!({"messages": []}).to_string(), StatusCode::BAD_REQUEST, ""),
        ("huge text", json!({"messages": [{"role": "user", "content": "hi ".repeat(2000)}]}).to_string(), StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        ("too many tokens", json!({"messages": [{"role": "user", "content": "hi ".repeat(100)}]}).to_string(), StatusCode::BAD_REQUEST, "context_length_exceeded"),
        ("temperature", json!({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}).to_string(), StatusCode::BAD_REQUEST, ""),
    ];
    for (name, body, status, code) in cases {
        let (s, b) = call(&router, "POST", "/v1/chat/completions", body, &[]).await;
        let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
        assert_eq!(s, status, "{name}: {v}");
        assert_openai_error(&v);
        if !code.is_empty() {
            assert_eq!(v["error"]["code"], code, "{name}: {v}");
        }
    }
    let (s, b) = call(&router, "GET", "/nope", Body::empty(), &[]).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_openai_error(&serde_json::from_slice(&b).unwrap());
    let (s, b) = call(&router, "GET", "/v1/chat/completions", Body::empty(), &[]).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_openai_error(&serde_json::from_slice(&b).unwrap());
    let (s, _) = call(&router, "POST", "/v1/chat/completions", "{}", &[("content-type", "text/plain")]).await;
    assert!(s.is_client_error());
}

#[tokio::test]
async fn api_key() {
    let (url, _) = mock_worker().await;
    let router = app(state(vec![url], "auth", |c| c.api_key = Some("sekret".into())));
    let body = json!({"messages": [{"role": "user", "content": "hi"}]}).to_string();
    let (s, b) = call(&router, "POST", "/v1/chat/completions", body.clone(), &[]).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_openai_error(&serde_json::from_slice(&b).unwrap());
    let (s, _) = call(&router, "POST", "/v1/chat/completions", body.clone(), &[("authorization", "Bearer wrong!")]).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = call(&router, "POST", "/v1/chat/completions", body, &[("authorization", "Bearer sekret")]).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(&router, "GET", "/health", Body::empty(), &[]).await;
    assert_eq!(s, StatusCode::OK, "health needs no key");
}

#[tokio::test]
async fn failover_and_metrics() {
    let (url, _) = mock_worker().await;
    let dead = dead_worker();
    let st = state(vec![dead.clone(), url], "failover", |_| {});
    let router = app(st.clone());
    for _ in 0..3 {
        let (s, v) = post_json(&router, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}]})).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let snap = st.workers.snapshot();
    assert!(!snap.iter().find(|w| w.0 == dead).unwrap().1, "dead worker out of rotation");
    let (s, b) = call(&router, "GET", "/metrics", Body::empty(), &[]).await;
    assert_eq!(s, StatusCode::OK);
    let text = String::from_utf8(b).unwrap();
    assert!(text.contains("smg_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 3"), "{text}");
    assert!(text.contains(&format!("smg_worker_errors_total{{worker=\"{dead}\"}} 1")), "{text}");
    assert!(text.contains("smg_in_flight_requests 1"), "only /metrics itself is in flight: {text}");
    // The probe brings a worker back when it answers again; here it stays dead.
    st.workers.probe_all(&reqwest::Client::new(), Duration::from_millis(300)).await;
    assert!(!st.workers.snapshot().iter().find(|w| w.0 == dead).unwrap().1);
}

fn header_us(resp: &axum::response::Response, name: &str) -> u64 {
    resp.headers().get(name).unwrap_or_else(|| panic!("no {name}")).to_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn overhead_header_and_histogram() {
    let (router, _) = setup("overhead").await;
    let req = || {
        Request::builder()
            .method("POST")
            .uri("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Body::from(json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}).to_string()))
            .unwrap()
    };
    for _ in 0..2 {
        let t0 = std::time::Instant::now();
        let resp = router.clone().oneshot(req()).await.unwrap();
        let wall = u64::try_from(t0.elapsed().as_micros()).unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let (overhead, upstream) = (header_us(&resp, "x-smg-overhead-us"), header_us(&resp, "x-smg-upstream-us"));
        assert!(upstream > 0, "a call over a socket takes time");
        assert!(overhead + upstream <= wall, "{overhead} + {upstream} µs within the {wall} µs the router took");
    }
    // A streamed request: no headers (they leave before the worker answers), a histogram entry.
    let (s, _) = call(&router, "POST", "/v1/chat/completions", json!({"messages": [{"role": "user", "content": "hi"}], "stream": true}).to_string(), &[]).await;
    assert_eq!(s, StatusCode::OK);
    let (_, b) = call(&router, "GET", "/metrics", Body::empty(), &[]).await;
    let text = String::from_utf8(b).unwrap();
    assert!(text.contains("smg_gateway_overhead_seconds_count{route=\"/v1/chat/completions\",stream=\"false\"} 2"), "{text}");
    assert!(text.contains("smg_gateway_overhead_seconds_count{route=\"/v1/chat/completions\",stream=\"true\"} 1"), "{text}");
    assert!(text.contains("smg_gateway_overhead_seconds_bucket{route=\"/v1/chat/completions\",stream=\"false\",le=\"0.000025\"}"), "{text}");
}

#[tokio::test]
async fn no_worker_is_503_and_probe_restores() {
    let (url, _) = mock_worker().await;
    let st = state(vec![url.clone()], "probe", |_| {});
    let router = app(st.clone());
    st.workers.mark_failed(&url);
    let (s, v) = post_json(&router, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_openai_error(&v);
    let (s, _) = call(&router, "GET", "/health", Body::empty(), &[]).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    st.workers.probe_all(&reqwest::Client::new(), Duration::from_secs(2)).await;
    let (s, _) = post_json(&router, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn worker_rejection_is_400() {
    let (url, _) = mock_worker().await;
    let router = app(state(vec![url], "reject", |c| c.max_body_bytes = 1 << 20));
    let (s, v) = post_json(&router, "/v1/completions", &json!({"prompt": "hi ".repeat(10_001)})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], "rejected_by_worker");
}

#[tokio::test]
async fn slow_client_gets_408_over_a_socket() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (url, _) = mock_worker().await;
    let st = state(vec![url], "slow", |c| c.body_timeout = Duration::from_millis(300));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app(st)).await.unwrap() });
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"mess").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
    let resp = String::from_utf8_lossy(&buf[..n]);
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(resp.contains("\"type\":\"timeout_error\""), "{resp}");
}

async fn image_server() -> String {
    use axum::response::{IntoResponse, Redirect};
    use axum::routing::get;
    let img = png(40, 30);
    let app = Router::new()
        .route("/img.png", get(move || { let img = img.clone(); async move { ([("content-type", "image/png")], img).into_response() } }))
        .route("/redirect", get(|| async { Redirect::temporary("/img.png") }))
        .route("/loop", get(|| async { Redirect::temporary("/loop") }))
        .route("/missing", get(|| async { StatusCode::NOT_FOUND }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn image_chat(url: &str) -> Value {
    json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what"}]}], "max_tokens": 1})
}

#[tokio::test]
async fn http_image_fetch_policy() {
    let (worker, seen) = mock_worker().await;
    let images = image_server().await;
    let open = app(state(vec![worker.clone()], "http-open", |c| {
        c.fetch.allow_http = true;
        c.fetch.allow_private_hosts = true;
        c.fetch.max_bytes = 1 << 20;
    }));
    for path in ["/img.png", "/redirect"] {
        let (s, v) = post_json(&open, "/v1/chat/completions", &image_chat(&format!("{images}{path}"))).await;
        assert_eq!(s, StatusCode::OK, "{path}: {v}");
        let body = seen.lock().unwrap().bodies.pop().unwrap();
        assert_eq!(body["image_data"].as_array().unwrap().len(), 1);
    }
    for path in ["/loop", "/missing"] {
        let (s, v) = post_json(&open, "/v1/chat/completions", &image_chat(&format!("{images}{path}"))).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path}: {v}");
        assert_eq!(v["error"]["code"], "image_fetch_failed", "{path}: {v}");
    }
    let small = app(state(vec![worker.clone()], "http-small", |c| {
        c.fetch.allow_http = true;
        c.fetch.allow_private_hosts = true;
        c.fetch.max_bytes = 100;
    }));
    let (s, v) = post_json(&small, "/v1/chat/completions", &image_chat(&format!("{images}/img.png"))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let private = app(state(vec![worker], "http-private", |c| c.fetch.allow_http = true));
    let (s, v) = post_json(&private, "/v1/chat/completions", &image_chat(&format!("{images}/img.png"))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], "image_url_forbidden", "loopback refused by default: {v}");
}
