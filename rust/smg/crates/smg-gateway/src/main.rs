//! `smg`: the m3serve gateway binary.
//!
//! `smg --worker http://127.0.0.1:30000 --model-dir /path/to/ckpt --port 8000`
//! `smg render --model-dir DIR --messages '[...]'` prints the prompt's input_ids (parity tests).

#![allow(clippy::doc_markdown)] // flag help text names files and products, not code

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use smg_core::fetch::FetchPolicy;
use smg_gateway::{AppState, Config};

#[derive(Parser, Debug)]
#[command(name = "smg", version, about = "m3serve's OpenAI-compatible multimodal gateway in front of SGLang workers")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Render + tokenize a chat (no images expanded) and print {"text", "input_ids"} as JSON.
    Render {
        #[arg(long)]
        model_dir: PathBuf,
        /// JSON array of OpenAI messages.
        #[arg(long)]
        messages: String,
    },
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// SGLang worker base URL (repeatable).
    #[arg(long = "worker", env = "SMG_WORKERS", value_delimiter = ',')]
    workers: Vec<String>,
    /// Checkpoint directory: tokenizer.json, tokenizer_config.json / chat_template.jinja, config.json.
    #[arg(long)]
    model_dir: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Model name reported to clients (default: the model directory's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Require `Authorization: Bearer <key>` on /v1/*.
    #[arg(long, env = "SMG_API_KEY")]
    api_key: Option<String>,
    #[arg(long, default_value_t = 64 << 20)]
    max_body_bytes: usize,
    #[arg(long, default_value_t = 16)]
    max_images: usize,
    /// Largest width × height of one input image (checked before decoding).
    #[arg(long, default_value_t = 64 << 20)]
    max_image_pixels: u64,
    /// Largest sum of resized pixels over a request's images.
    #[arg(long, default_value_t = 16 * 451_584)]
    max_total_pixels: u64,
    #[arg(long, default_value_t = 131_072)]
    max_prompt_tokens: usize,
    #[arg(long, default_value_t = 1024)]
    default_max_tokens: u32,
    #[arg(long, default_value_t = 131_072)]
    max_max_tokens: u32,
    /// Seconds to receive a request body.
    #[arg(long, default_value_t = 30.0)]
    body_timeout: f64,
    /// Seconds for a request up to its response headers.
    #[arg(long, default_value_t = 600.0)]
    request_timeout: f64,
    /// Seconds to wait for a worker (whole answer, or each stream chunk).
    #[arg(long, default_value_t = 600.0)]
    upstream_timeout: f64,
    /// Seconds between `/health` probes of every worker.
    #[arg(long, default_value_t = 5.0)]
    health_interval: f64,
    /// Seconds one `/health` probe may take.
    #[arg(long, default_value_t = 5.0)]
    health_timeout: f64,
    /// Failed probes in a row that take a worker out of rotation (a failed call does at once;
    /// one good probe brings it back).
    #[arg(long, default_value_t = 3)]
    health_failures: usize,
    /// Allow file:// image URLs under this directory.
    #[arg(long)]
    file_root: Option<PathBuf>,
    /// Allow http(s) image URLs.
    #[arg(long)]
    allow_http_images: bool,
    /// Allow http(s) image URLs that resolve to private / loopback addresses.
    #[arg(long)]
    allow_private_image_hosts: bool,
    #[arg(long, default_value_t = 32 << 20)]
    max_image_bytes: usize,
    #[arg(long, default_value_t = 10.0)]
    fetch_timeout: f64,
    /// Concurrent image preprocessing tasks (default: number of cores). A thread that ran one
    /// keeps up to 64 MiB of pixel buffers for its next image (smg-core `image::buffers`).
    #[arg(long)]
    preprocess_threads: Option<usize>,
    /// Pass patches through /dev/shm (gateway and workers on one host).
    #[arg(long)]
    shm: bool,
    /// Threads of the async runtime (HTTP in and out, templating, tokenizing; image work runs
    /// on the separate preprocessing pool). Default: a quarter of the cores, at least one.
    #[arg(long, env = "SMG_IO_THREADS")]
    io_threads: Option<usize>,
}

/// Default async-runtime threads: a quarter of the cores, at least one. A text request costs
/// the runtime ~0.3 ms of CPU, so one thread already serves ~3000 requests/s; each extra
/// thread adds cross-thread wake-ups per request (hyper's client connection task, the IO
/// driver) that cost CPU and tail latency on a busy box: on the 2-core dev box one thread
/// instead of two cut the gateway's CPU per request from ~0.35 to ~0.29 ms and its p99
/// overhead by ~0.1 ms (benchmarks/bench_gateway.py).
fn default_io_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 4).max(1))
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.001))
}

fn config(a: ServeArgs) -> Result<Config, String> {
    let model_dir = a.model_dir.ok_or("--model-dir is required")?;
    if a.workers.is_empty() {
        return Err("at least one --worker URL is required".into());
    }
    let mut c = Config::new(a.workers, model_dir);
    if let Some(n) = a.served_model_name {
        c.served_model_name = n;
    }
    c.api_key = a.api_key.filter(|k| !k.is_empty());
    c.max_body_bytes = a.max_body_bytes;
    c.max_images = a.max_images;
    c.max_image_pixels = a.max_image_pixels;
    c.max_total_pixels = a.max_total_pixels;
    c.max_prompt_tokens = a.max_prompt_tokens;
    c.default_max_tokens = a.default_max_tokens;
    c.max_max_tokens = a.max_max_tokens;
    c.body_timeout = secs(a.body_timeout);
    c.request_timeout = secs(a.request_timeout);
    c.upstream_timeout = secs(a.upstream_timeout);
    c.health_interval = secs(a.health_interval);
    c.health_timeout = secs(a.health_timeout);
    c.health_failures = a.health_failures;
    c.fetch = FetchPolicy {
        file_root: a.file_root,
        allow_http: a.allow_http_images,
        allow_private_hosts: a.allow_private_image_hosts,
        max_bytes: a.max_image_bytes,
    };
    c.fetch_timeout = secs(a.fetch_timeout);
    if let Some(n) = a.preprocess_threads {
        c.preprocess_threads = n.max(1);
    }
    c.shm = a.shm;
    Ok(c)
}

fn render(model_dir: &std::path::Path, messages: &str) -> Result<(), String> {
    let template = smg_core::template::ChatTemplate::from_model_dir(model_dir).map_err(|e| e.to_string())?;
    let tok = smg_core::tokenize::PromptTokenizer::from_model_dir(model_dir).map_err(|e| e.to_string())?;
    let msgs: Vec<smg_gateway::openai::Message> = serde_json::from_str(messages).map_err(|e| e.to_string())?;
    let text = template.render(&smg_gateway::openai::template_messages(&msgs), true).map_err(|e| e.to_string())?;
    let ids = tok.encode(&text).map_err(|e| e.to_string())?;
    println!("{}", serde_json::json!({"text": text, "input_ids": ids}));
    Ok(())
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("SMG_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Render { model_dir, messages }) => render(&model_dir, &messages),
        None => run(cli.serve),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("smg: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: ServeArgs) -> Result<(), String> {
    let addr = format!("{}:{}", args.host, args.port);
    let io_threads = args.io_threads.unwrap_or_else(default_io_threads).max(1);
    let cfg = config(args)?;
    if cfg.shm {
        smg_gateway::shm::sweep_stale();
    }
    let state = Arc::new(AppState::load(cfg)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(io_threads)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr).await.map_err(|e| format!("bind {addr}: {e}"))?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        // Launchers wait for this line (python/m3serve/gateway.py).
        tracing::info!("smg listening on http://{local} ({} worker(s), model {})", state.cfg.workers.len(), state.cfg.served_model_name);
        eprintln!("SMG_READY http://{local}");
        smg_gateway::serve(state, listener).await.map_err(|e| e.to_string())
    })
}
