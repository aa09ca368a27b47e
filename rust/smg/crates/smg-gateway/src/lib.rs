//! smg-gateway: the m3serve OpenAI-compatible gateway in front of SGLang workers.
//!
//! A request flows: limits + auth + timeout layers → [`routes`] parses the OpenAI body →
//! [`images`] fetches and preprocesses images (blocking pool) → chat template + tokenizer +
//! placeholder expansion (smg-core) → [`forward`] posts SGLang's `/generate` with `input_ids`
//! and one `m3serve.patches.v2` item per image (docs/wire-format.md) to the least-loaded
//! healthy worker → the answer (JSON or SSE) is converted back to OpenAI shapes.

// Product names (SGLang, OpenAI, MiniMax) and field names in prose are not code.
#![allow(clippy::doc_markdown)]

pub mod error;
pub mod forward;
pub mod images;
pub mod metrics;
pub mod openai;
pub mod routes;
pub mod shm;
pub mod workers;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::StreamExt as _;
use smg_core::fetch::FetchPolicy;
use smg_core::image::ImageOptions;
use smg_core::template::ChatTemplate;
use smg_core::tokenize::PromptTokenizer;
use tokio::sync::Semaphore;

use crate::error::ApiError;
use crate::images::ImageContext;
use crate::metrics::Metrics;
use crate::workers::WorkerPool;

/// Everything configurable (the `smg` binary fills it from its flags).
#[derive(Debug, Clone)]
pub struct Config {
    pub workers: Vec<String>,
    pub model_dir: PathBuf,
    /// Name reported by /v1/models and in responses.
    pub served_model_name: String,
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    pub max_images: usize,
    /// Width × height of one input image (checked from the header before decoding).
    pub max_image_pixels: u64,
    /// Sum over a request's images of their resized pixels (grid_h · grid_w · 14²).
    pub max_total_pixels: u64,
    pub max_prompt_tokens: usize,
    pub default_max_tokens: u32,
    pub max_max_tokens: u32,
    /// Reading the request body (slow clients get 408 past this).
    pub body_timeout: Duration,
    /// Whole request up to the response headers.
    pub request_timeout: Duration,
    /// Waiting for the worker: the whole answer when not streaming, each chunk when streaming.
    pub upstream_timeout: Duration,
    pub health_interval: Duration,
    /// One `/health` probe's time limit.
    pub health_timeout: Duration,
    /// Failed probes in a row that take a worker out of rotation (a failed call does at once).
    pub health_failures: usize,
    pub fetch: FetchPolicy,
    pub fetch_timeout: Duration,
    /// Concurrent image preprocessing tasks.
    pub preprocess_threads: usize,
    /// Send patches through /dev/shm files instead of base64 (gateway and worker on one host).
    pub shm: bool,
}

impl Config {
    /// Defaults for everything but the workers and the model directory.
    pub fn new(workers: Vec<String>, model_dir: PathBuf) -> Self {
        let served_model_name = model_dir
            .file_name()
            .map_or_else(|| "m3".to_owned(), |n| n.to_string_lossy().into_owned());
        Self {
            workers,
            model_dir,
            served_model_name,
            api_key: None,
            max_body_bytes: 64 << 20,
            max_images: 16,
            max_image_pixels: 64 << 20,
            max_total_pixels: 16 * 451_584,
            max_prompt_tokens: 131_072,
            default_max_tokens: 1024,
            max_max_tokens: 131_072,
            body_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_mins(10),
            upstream_timeout: Duration::from_mins(10),
            health_interval: Duration::from_secs(5),
            health_timeout: Duration::from_secs(5),
            health_failures: 3,
            fetch: FetchPolicy::default(),
            fetch_timeout: Duration::from_secs(10),
            preprocess_threads: std::thread::available_parallelism().map_or(2, std::num::NonZero::get),
            shm: false,
        }
    }
}

/// Shared state of all handlers.
#[derive(Debug)]
pub struct AppState {
    pub cfg: Config,
    pub template: ChatTemplate,
    pub tokenizer: PromptTokenizer,
    pub workers: Arc<WorkerPool>,
    pub client: reqwest::Client,
    pub metrics: Arc<Metrics>,
    pub images: ImageContext,
    pub started: Instant,
}

pub type Shared = Arc<AppState>;

impl AppState {
    /// Load the template and tokenizer from `cfg.model_dir`.
    pub fn load(cfg: Config) -> Result<Self, String> {
        let template = ChatTemplate::from_model_dir(&cfg.model_dir).map_err(|e| e.to_string())?;
        let tokenizer = PromptTokenizer::from_model_dir(&cfg.model_dir).map_err(|e| e.to_string())?;
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            // A worker never redirects; skipping the policy layer saves work per request.
            .redirect(reqwest::redirect::Policy::none())
            .read_timeout(cfg.upstream_timeout)
            .build()
            .map_err(|e| e.to_string())?;
        let options = ImageOptions { max_input_pixels: cfg.max_image_pixels, max_input_bytes: cfg.fetch.max_bytes, ..ImageOptions::default() };
        let images = ImageContext {
            policy: cfg.fetch.clone(),
            options,
            fetch_timeout: cfg.fetch_timeout,
            pool: Arc::new(Semaphore::new(cfg.preprocess_threads.max(1))),
            raw_patches: cfg.shm,
        };
        Ok(Self {
            workers: Arc::new(WorkerPool::new(&cfg.workers, cfg.health_failures)),
            cfg,
            template,
            tokenizer,
            client,
            metrics: Arc::new(Metrics::default()),
            images,
            started: Instant::now(),
        })
    }
}

/// When the gateway took the request (its headers parsed, the route matched, the body not yet
/// read): the start of the wall time in the gateway's overhead (see [`forward::run`]).
#[derive(Debug, Clone, Copy)]
pub struct RequestStart(pub Instant);

/// Count requests by route and status, time them to the response headers, and keep the
/// in-flight gauge up until the body (an SSE stream) ends.
async fn track(State(state): State<Shared>, mut req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let guard = state.metrics.in_flight();
    let t0 = Instant::now();
    req.extensions_mut().insert(RequestStart(t0));
    let resp = next.run(req).await;
    state.metrics.record_request(&route, resp.status().as_u16(), t0.elapsed().as_secs_f64());
    let streaming = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if !streaming {
        // Whole bodies are already produced: keep their Content-Length, drop the guard now.
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let body = Body::from_stream(body.into_data_stream().map(move |chunk| {
        let _held = &guard;
        chunk
    }));
    Response::from_parts(parts, body)
}

/// Deadline for everything up to the response headers (body read, images, worker answer).
async fn deadline(State(state): State<Shared>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(state.cfg.request_timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::timeout("request took longer than the gateway's request timeout").into_response(),
    }
}

/// `Authorization: Bearer <key>` on /v1/*, when a key is configured.
async fn auth(State(state): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.cfg.api_key {
        let given = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Length-independent comparison so timing does not leak the key prefix.
        let ok = given.len() == key.len() && given.bytes().zip(key.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        if !ok {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// The gateway's router; tests drive it without a socket.
pub fn app(state: Shared) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/models", get(routes::models))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(v1)
        .route("/health", get(routes::health))
        .route("/metrics", get(routes::metrics))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), deadline))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(DefaultBodyLimit::max(state.cfg.max_body_bytes))
        .with_state(state)
}

/// Start the health probes, bind, serve until SIGINT/SIGTERM, then drain in-flight requests.
pub async fn serve(state: Shared, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    let probe_client = reqwest::Client::new();
    let probes = tokio::spawn(Arc::clone(&state.workers).probe_loop(probe_client, state.cfg.health_interval, state.cfg.health_timeout));
    let router = app(state);
    // Small SSE events and JSON answers must not wait on Nagle + delayed ACK.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let result = axum::serve(listener, router).with_graceful_shutdown(shutdown_signal()).await;
    probes.abort();
    result
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { () = ctrl_c => {}, () = term => {} }
    tracing::info!("shutting down: draining in-flight requests");
}
