//! `fetch`: image sources (data: URIs, file:// under a root, http(s) policy).
//!
//! `resolve_image_url` does everything that needs no network: it decodes `data:` URLs, reads
//! `file://` URLs confined to `file_root`, and hands `http(s)` URLs back for the gateway to fetch
//! asynchronously. The gateway must call [`check_http_host`] on every address it connects to
//! (after DNS resolution, and again on redirects) so that private hosts stay unreachable.

use std::fmt;
use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use base64::Engine as _;

/// What a request may fetch.
#[derive(Clone, Debug)]
pub struct FetchPolicy {
    /// `file://` URLs are allowed only inside this directory (after resolving symlinks).
    pub file_root: Option<PathBuf>,
    /// Whether `http://` / `https://` URLs are accepted at all.
    pub allow_http: bool,
    /// Whether loopback / private / link-local addresses may be fetched.
    pub allow_private_hosts: bool,
    /// Largest image in bytes (decoded `data:` payload, file size, HTTP body).
    pub max_bytes: usize,
}

impl Default for FetchPolicy {
    fn default() -> Self {
        Self {
            file_root: None,
            allow_http: false,
            allow_private_hosts: false,
            max_bytes: 32 * 1024 * 1024,
        }
    }
}

/// Where the image bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageSource {
    /// Already in memory (`data:` or `file://`).
    Bytes(Vec<u8>),
    /// An http(s) URL the gateway fetches after policy checks.
    Http(String),
}

/// Why an image URL was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FetchError {
    /// Not a URL form we accept (scheme, syntax).
    InvalidUrl(String),
    /// `data:` payload is not valid base64.
    InvalidBase64(String),
    /// The policy forbids this URL (scheme disabled, outside the root, private host).
    Forbidden(String),
    /// `file://` path does not exist or cannot be read.
    NotFound(String),
    /// Above `max_bytes`.
    TooLarge { bytes: usize, limit: usize },
}

impl FetchError {
    /// Stable machine-readable code (OpenAI-style `error.code`).
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidUrl(_) => "invalid_image_url",
            Self::InvalidBase64(_) => "invalid_base64",
            Self::Forbidden(_) => "image_url_forbidden",
            Self::NotFound(_) => "image_not_found",
            Self::TooLarge { .. } => "image_too_large",
        }
    }
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidUrl(why) => write!(f, "invalid image URL: {why}"),
            Self::InvalidBase64(why) => write!(f, "invalid base64 in data: URL: {why}"),
            Self::Forbidden(why) => write!(f, "image URL not allowed: {why}"),
            Self::NotFound(why) => write!(f, "image file not found: {why}"),
            Self::TooLarge { bytes, limit } => {
                write!(
                    f,
                    "image is at least {bytes} bytes, above the limit of {limit} bytes"
                )
            }
        }
    }
}

impl std::error::Error for FetchError {}

/// Resolve an `image_url` value to bytes (data:, file://) or an http(s) URL to fetch.
pub fn resolve_image_url(url: &str, policy: &FetchPolicy) -> Result<ImageSource, FetchError> {
    let url = url.trim();
    let lower_prefix = url
        .get(..url.len().min(8))
        .unwrap_or("")
        .to_ascii_lowercase();
    if lower_prefix.starts_with("data:") {
        decode_data_url(url, policy.max_bytes).map(ImageSource::Bytes)
    } else if lower_prefix.starts_with("file://") {
        read_file_url(&url[7..], policy).map(ImageSource::Bytes)
    } else if lower_prefix.starts_with("http://") || lower_prefix.starts_with("https://") {
        if !policy.allow_http {
            return Err(FetchError::Forbidden(
                "http(s) image URLs are disabled on this server".into(),
            ));
        }
        let rest = &url[url.find("://").map_or(0, |i| i + 3)..];
        let host = rest.split(['/', '?', '#']).next().unwrap_or("");
        if host.is_empty() || host.contains(char::is_whitespace) || host.contains('@') {
            return Err(FetchError::InvalidUrl(
                "http(s) URL needs a host (no user info)".into(),
            ));
        }
        Ok(ImageSource::Http(url.to_string()))
    } else {
        let scheme = url
            .split(':')
            .next()
            .unwrap_or("")
            .chars()
            .take(16)
            .collect::<String>();
        Err(FetchError::InvalidUrl(format!(
            "unsupported scheme {scheme:?}; use data:image/...;base64, file:// or http(s)://"
        )))
    }
}

const B64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

fn decode_data_url(url: &str, max_bytes: usize) -> Result<Vec<u8>, FetchError> {
    let comma = url
        .find(',')
        .ok_or_else(|| FetchError::InvalidUrl("data: URL has no ',' before the payload".into()))?;
    let meta = &url[5..comma];
    if !meta.split(';').any(|p| p.eq_ignore_ascii_case("base64")) {
        return Err(FetchError::InvalidUrl(
            "data: URL must be base64 (data:image/png;base64,...)".into(),
        ));
    }
    let payload = url[comma + 1..].trim();
    let approx = payload.len() / 4 * 3;
    if approx > max_bytes.saturating_add(3) {
        return Err(FetchError::TooLarge {
            bytes: approx,
            limit: max_bytes,
        });
    }
    let bytes = if payload.bytes().any(|b| b.is_ascii_whitespace()) {
        let cleaned: Vec<u8> = payload
            .bytes()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        B64.decode(cleaned)
    } else {
        B64.decode(payload)
    }
    .map_err(|e| FetchError::InvalidBase64(e.to_string()))?;
    if bytes.len() > max_bytes {
        return Err(FetchError::TooLarge {
            bytes: bytes.len(),
            limit: max_bytes,
        });
    }
    Ok(bytes)
}

fn percent_decode(s: &str) -> Result<Vec<u8>, FetchError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| FetchError::InvalidUrl("bad %-escape in file:// URL".into()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn read_file_url(rest: &str, policy: &FetchPolicy) -> Result<Vec<u8>, FetchError> {
    let root = policy.file_root.as_ref().ok_or_else(|| {
        FetchError::Forbidden("file:// image URLs are disabled on this server".into())
    })?;
    // file:///abs/path or file://localhost/abs/path; no other hosts.
    let path_part = rest.strip_prefix("localhost").unwrap_or(rest);
    if !path_part.starts_with('/') {
        return Err(FetchError::InvalidUrl(
            "file:// URL must be file:///absolute/path".into(),
        ));
    }
    let path_part = path_part.split(['?', '#']).next().unwrap_or("");
    let decoded = percent_decode(path_part)?;
    let path_str = String::from_utf8(decoded)
        .map_err(|_| FetchError::InvalidUrl("file:// path is not UTF-8".into()))?;
    if path_str.contains('\0') {
        return Err(FetchError::InvalidUrl("file:// path contains NUL".into()));
    }
    let root = root
        .canonicalize()
        .map_err(|e| FetchError::Forbidden(format!("file root is unusable: {e}")))?;
    // canonicalize resolves `..` and symlinks, so the prefix check below sees the real target.
    let real = Path::new(&path_str)
        .canonicalize()
        .map_err(|_| FetchError::NotFound(path_str.clone()))?;
    if !real.starts_with(&root) {
        return Err(FetchError::Forbidden(format!(
            "{path_str} is outside the allowed file root"
        )));
    }
    let file = std::fs::File::open(&real).map_err(|_| FetchError::NotFound(path_str.clone()))?;
    let meta = file
        .metadata()
        .map_err(|_| FetchError::NotFound(path_str.clone()))?;
    if !meta.is_file() {
        return Err(FetchError::NotFound(format!(
            "{path_str} is not a regular file"
        )));
    }
    let len = usize::try_from(meta.len()).unwrap_or(usize::MAX);
    if len > policy.max_bytes {
        return Err(FetchError::TooLarge {
            bytes: len,
            limit: policy.max_bytes,
        });
    }
    let mut bytes = Vec::with_capacity(len);
    file.take(policy.max_bytes as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| FetchError::NotFound(format!("{path_str}: {e}")))?;
    if bytes.len() > policy.max_bytes {
        return Err(FetchError::TooLarge {
            bytes: bytes.len(),
            limit: policy.max_bytes,
        });
    }
    Ok(bytes)
}

/// Whether `ip` is loopback, private, link-local, shared (CGNAT), unspecified, multicast,
/// broadcast, documentation or otherwise not a public unicast address.
pub fn is_non_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xC0) == 64) // 100.64.0.0/10 shared address space
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24 IETF protocol
                || (o[0] == 198 && (o[1] & 0xFE) == 18) // 198.18.0.0/15 benchmarking
                || o[0] >= 240 // reserved
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_non_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xFE00) == 0xFC00 // fc00::/7 unique local
                || (s[0] & 0xFFC0) == 0xFE80 // fe80::/10 link-local
                || (s[0] & 0xFFC0) == 0xFEC0 // fec0::/10 site-local (deprecated)
                || (s[0] == 0x2001 && s[1] == 0x0DB8) // documentation
                || (s[0] == 0x0064 && s[1] == 0xFF9B) // 64:ff9b::/96 NAT64 can reach v4 private space
                || (s[0..6] == [0, 0, 0, 0, 0, 0]) // deprecated IPv4-compatible ::a.b.c.d
        }
    }
}

/// Refuse non-public addresses unless the policy allows private hosts.
pub fn check_http_host(ip: IpAddr, policy: &FetchPolicy) -> Result<(), FetchError> {
    if !policy.allow_private_hosts && is_non_public(ip) {
        return Err(FetchError::Forbidden(format!(
            "{ip} is a private, loopback or link-local address"
        )));
    }
    Ok(())
}
