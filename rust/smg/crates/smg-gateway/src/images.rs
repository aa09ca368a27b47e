//! Image work of one request: resolve each `image_url` (data:, file: under a root, or an
//! http(s) fetch that re-checks every resolved address and redirect), then decode / resize /
//! patchify on the blocking pool, bounded by a semaphore so image work never starves the
//! async runtime, and encode the wire payload in the same blocking task.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smg_core::fetch::{check_http_host, resolve_image_url, FetchPolicy, ImageSource};
use smg_core::image::{preprocess_image, ImageOptions, StageTimings};
use tokio::sync::Semaphore;

use crate::error::ApiError;
use crate::openai::ImageUrl;

/// One image, ready for the wire except for its place in `input_ids`.
#[derive(Debug)]
pub struct ReadyImage {
    pub grid_thw: [u32; 3],
    pub num_patches: usize,
    pub hash: String,
    /// Base64 of the bf16 patch bytes (inline mode), or the raw patches (shm mode).
    pub payload: Payload,
    pub timings: StageTimings,
    pub fetch_us: u64,
}

#[derive(Debug)]
pub enum Payload {
    Base64(String),
    Patches(Vec<u16>),
}

impl ReadyImage {
    pub fn num_image_tokens(&self) -> usize {
        let [t, h, w] = self.grid_thw;
        (t as usize * h as usize * w as usize) / 4
    }
}

/// What image work needs from the gateway's state.
#[derive(Debug, Clone)]
pub struct ImageContext {
    pub policy: FetchPolicy,
    pub options: ImageOptions,
    pub fetch_timeout: Duration,
    pub pool: Arc<Semaphore>,
    /// Keep raw patches (shared-memory mode) instead of base64.
    pub raw_patches: bool,
}

const MAX_REDIRECTS: usize = 5;

fn fetch_err(msg: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("cannot fetch image: {msg}")).with_param("image_url").with_code("image_fetch_failed")
}

/// GET an http(s) image: every hop's host is resolved here, each address checked against the
/// policy, and the connection pinned to the checked addresses (no second DNS lookup that a
/// rebinding attacker could answer differently).
async fn fetch_http(url: &str, ctx: &ImageContext) -> Result<Vec<u8>, ApiError> {
    let mut current = reqwest::Url::parse(url).map_err(fetch_err)?;
    let deadline = Instant::now() + ctx.fetch_timeout;
    for _ in 0..=MAX_REDIRECTS {
        if !matches!(current.scheme(), "http" | "https") {
            return Err(fetch_err(format!("scheme {} not allowed", current.scheme())));
        }
        let host = current.host_str().ok_or_else(|| fetch_err("URL has no host"))?.to_owned();
        let port = current.port_or_known_default().ok_or_else(|| fetch_err("URL has no port"))?;
        let lookup_host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let addrs: Vec<SocketAddr> = tokio::time::timeout_at(deadline.into(), tokio::net::lookup_host((lookup_host.as_str(), port)))
            .await
            .map_err(|_| fetch_err("DNS timeout"))?
            .map_err(|e| fetch_err(format!("cannot resolve {host}: {e}")))?
            .collect();
        if addrs.is_empty() {
            return Err(fetch_err(format!("{host} has no address")));
        }
        for a in &addrs {
            check_http_host(a.ip(), &ctx.policy).map_err(|e| fetch_err(&e).with_code(e.code()))?;
        }
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .resolve_to_addrs(&lookup_host, &addrs)
            .build()
            .map_err(fetch_err)?;
        let left = deadline.saturating_duration_since(Instant::now());
        let mut resp = client.get(current.clone()).timeout(left).send().await.map_err(fetch_err)?;
        if resp.status().is_redirection() {
            let loc = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| fetch_err("redirect without Location"))?;
            current = current.join(loc).map_err(fetch_err)?;
            continue;
        }
        if !resp.status().is_success() {
            return Err(fetch_err(format!("HTTP {}", resp.status())));
        }
        let max = ctx.policy.max_bytes;
        if resp.content_length().is_some_and(|n| n > max as u64) {
            return Err(fetch_err(format!("image larger than {max} bytes")));
        }
        let mut body = Vec::new();
        loop {
            let chunk = tokio::time::timeout_at(deadline.into(), resp.chunk())
                .await
                .map_err(|_| fetch_err("timed out"))?
                .map_err(fetch_err)?;
            let Some(chunk) = chunk else { break };
            if body.len() + chunk.len() > max {
                return Err(fetch_err(format!("image larger than {max} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        return Ok(body);
    }
    Err(fetch_err(format!("more than {MAX_REDIRECTS} redirects")))
}

async fn prepare_one(image: &ImageUrl, ctx: &ImageContext) -> Result<ReadyImage, ApiError> {
    let t0 = Instant::now();
    let bytes = match resolve_image_url(&image.url, &ctx.policy) {
        Ok(ImageSource::Bytes(b)) => b,
        Ok(ImageSource::Http(u)) => fetch_http(&u, ctx).await?,
        Err(e) => return Err(ApiError::bad_request(e.to_string()).with_param("image_url").with_code(e.code())),
    };
    let fetch_us = t0.elapsed().as_micros() as u64;
    let mut options = ctx.options.clone();
    if image.max_long_side_pixel.is_some() {
        options.max_long_side_pixel = image.max_long_side_pixel;
    }
    let raw = ctx.raw_patches;
    let _permit = ctx.pool.acquire().await.map_err(|_| ApiError::unavailable("shutting down"))?;
    let result = tokio::task::spawn_blocking(move || {
        let pre = preprocess_image(&bytes, &options)?;
        let payload = if raw {
            Payload::Patches(pre.patches)
        } else {
            use base64::Engine as _;
            Payload::Base64(base64::engine::general_purpose::STANDARD.encode(smg_core::wire::frame_le_bytes(&pre.patches)))
        };
        Ok::<_, smg_core::image::ImageError>(ReadyImage {
            grid_thw: pre.grid_thw,
            num_patches: pre.num_patches,
            hash: pre.hash,
            payload,
            timings: pre.timings,
            fetch_us,
        })
    })
    .await
    .map_err(|e| ApiError::internal(format!("image task failed: {e}")))?;
    result.map_err(|e| ApiError::bad_request(e.to_string()).with_param("image_url").with_code(e.code()))
}

/// Prepare every image of a request concurrently; the first error wins.
pub async fn prepare_all(images: &[&ImageUrl], ctx: &ImageContext) -> Result<Vec<ReadyImage>, ApiError> {
    futures_util::future::try_join_all(images.iter().map(|im| prepare_one(im, ctx))).await
}
