//! Prometheus text metrics, kept by hand: a few counters and histograms behind mutexes are
//! cheaper than a metrics framework for the dozen series the gateway exports.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

/// Upper bounds (seconds) of the request and stage histograms: 100 µs .. 60 s.
const BUCKETS: [f64; 17] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0];

/// Upper bounds (seconds) of the gateway's own time per request: 25 µs steps up to the 1 ms
/// target (issue 3), then coarser up to 1 s (image requests spend their preprocessing here).
const OVERHEAD_BUCKETS: [f64; 20] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_15, 0.000_2, 0.000_25, 0.000_3, 0.000_4, 0.000_5, 0.000_6, 0.000_75, 0.001, 0.0015, 0.002,
    0.005, 0.01, 0.025, 0.1, 0.25, 1.0,
];

#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new(&BUCKETS)
    }
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }

    fn observe(&mut self, secs: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| secs <= b) {
            self.counts[i] += 1;
        }
        self.sum += secs;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cum += c;
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {}", self.count);
        let labels = labels.trim_end_matches(',');
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// Everything /metrics reports.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    /// By (route, streamed).
    overhead: Mutex<BTreeMap<(&'static str, bool), Histogram>>,
    stages: Mutex<BTreeMap<&'static str, Histogram>>,
    worker_errors: Mutex<BTreeMap<String, u64>>,
    images: AtomicI64,
    in_flight: AtomicI64,
}

/// Decrements the in-flight gauge when dropped (held by streaming bodies until they end).
#[derive(Debug)]
pub struct InFlight(Arc<Metrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a metrics lock leaves plain numbers behind: keep using them.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Escape a Prometheus label value.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Metrics {
    /// Count one finished request (status known when headers are sent).
    pub fn record_request(&self, route: &str, status: u16, secs: f64) {
        *lock(&self.requests).entry((route.to_owned(), status)).or_default() += 1;
        lock(&self.latency).entry(route.to_owned()).or_default().observe(secs);
    }

    /// The gateway's own time on one forwarded request: its wall time minus the time it
    /// waited on the worker (definitions in `forward.rs`, [`crate::forward::run`]).
    pub fn record_overhead(&self, route: &'static str, streamed: bool, secs: f64) {
        lock(&self.overhead).entry((route, streamed)).or_insert_with(|| Histogram::new(&OVERHEAD_BUCKETS)).observe(secs);
    }

    /// One preprocessing stage of one image (`fetch`, `decode`, `resize`, ...), or
    /// `template_tokenize` per request.
    pub fn record_stage(&self, stage: &'static str, secs: f64) {
        lock(&self.stages).entry(stage).or_default().observe(secs);
    }

    pub fn record_images(&self, n: usize) {
        self.images.fetch_add(n as i64, Ordering::Relaxed);
    }

    pub fn record_worker_error(&self, worker: &str) {
        *lock(&self.worker_errors).entry(worker.to_owned()).or_default() += 1;
    }

    pub fn in_flight(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    /// Prometheus text exposition; `workers` is (url, healthy, outstanding).
    pub fn render(&self, workers: &[(String, bool, usize)]) -> String {
        let mut out = String::with_capacity(8192);
        out.push_str("# HELP smg_requests_total Requests by route and HTTP status.\n# TYPE smg_requests_total counter\n");
        for ((route, status), n) in lock(&self.requests).iter() {
            let _ = writeln!(out, "smg_requests_total{{route=\"{}\",status=\"{status}\"}} {n}", esc(route));
        }
        out.push_str("# HELP smg_request_duration_seconds Time to response headers by route.\n# TYPE smg_request_duration_seconds histogram\n");
        for (route, h) in lock(&self.latency).iter() {
            h.write(&mut out, "smg_request_duration_seconds", &format!("route=\"{}\",", esc(route)));
        }
        out.push_str(
            "# HELP smg_gateway_overhead_seconds Gateway time per forwarded request minus the time spent waiting on the worker \
             (streamed: to the first relayed chunk, minus the worker's time to its first chunk).\n\
             # TYPE smg_gateway_overhead_seconds histogram\n",
        );
        for ((route, streamed), h) in lock(&self.overhead).iter() {
            h.write(&mut out, "smg_gateway_overhead_seconds", &format!("route=\"{}\",stream=\"{streamed}\",", esc(route)));
        }
        out.push_str("# HELP smg_preprocess_stage_seconds Per-image preprocessing stage time (and per-request template+tokenize).\n# TYPE smg_preprocess_stage_seconds histogram\n");
        for (stage, h) in lock(&self.stages).iter() {
            h.write(&mut out, "smg_preprocess_stage_seconds", &format!("stage=\"{stage}\","));
        }
        let _ = writeln!(
            out,
            "# HELP smg_images_total Images preprocessed.\n# TYPE smg_images_total counter\nsmg_images_total {}",
            self.images.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP smg_in_flight_requests Requests being served (streams until their last byte).\n# TYPE smg_in_flight_requests gauge\nsmg_in_flight_requests {}",
            self.in_flight.load(Ordering::Relaxed)
        );
        out.push_str("# HELP smg_worker_errors_total Failed calls to a worker (connect, 5xx, bad body, timeout).\n# TYPE smg_worker_errors_total counter\n");
        let errors = lock(&self.worker_errors);
        for (url, _, _) in workers {
            let n = errors.get(url).copied().unwrap_or(0);
            let _ = writeln!(out, "smg_worker_errors_total{{worker=\"{}\"}} {n}", esc(url));
        }
        drop(errors);
        out.push_str("# HELP smg_worker_healthy 1 if the worker is in rotation.\n# TYPE smg_worker_healthy gauge\n");
        for (url, healthy, _) in workers {
            let _ = writeln!(out, "smg_worker_healthy{{worker=\"{}\"}} {}", esc(url), u8::from(*healthy));
        }
        out.push_str("# HELP smg_worker_outstanding Requests in flight per worker.\n# TYPE smg_worker_outstanding gauge\n");
        for (url, _, n) in workers {
            let _ = writeln!(out, "smg_worker_outstanding{{worker=\"{}\"}} {n}", esc(url));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Arc::new(Metrics::default());
        m.record_request("/v1/chat/completions", 200, 0.003);
        m.record_stage("decode", 0.01);
        m.record_overhead("/v1/chat/completions", false, 0.000_12);
        m.record_overhead("/v1/chat/completions", false, 0.000_9);
        m.record_worker_error("http://w");
        let g = m.in_flight();
        let text = m.render(&[("http://w".into(), true, 2)]);
        drop(g);
        assert!(text.contains("smg_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 1"));
        assert!(text.contains("smg_request_duration_seconds_bucket{route=\"/v1/chat/completions\",le=\"0.005\"} 1"));
        assert!(text.contains("smg_preprocess_stage_seconds_count{stage=\"decode\"} 1"));
        // Overhead buckets resolve below 1 ms: 120 µs falls in (100, 150] µs, 900 µs in (750 µs, 1 ms].
        let oh = "smg_gateway_overhead_seconds_bucket{route=\"/v1/chat/completions\",stream=\"false\",le=";
        assert!(text.contains(&format!("{oh}\"0.0001\"}} 0")), "{text}");
        assert!(text.contains(&format!("{oh}\"0.00015\"}} 1")), "{text}");
        assert!(text.contains(&format!("{oh}\"0.00075\"}} 1")), "{text}");
        assert!(text.contains(&format!("{oh}\"0.001\"}} 2")), "{text}");
        assert!(text.contains("smg_gateway_overhead_seconds_count{route=\"/v1/chat/completions\",stream=\"false\"} 2"));
        assert!(text.contains("smg_in_flight_requests 1"));
        assert!(text.contains("smg_worker_errors_total{worker=\"http://w\"} 1"));
        assert!(text.contains("smg_worker_outstanding{worker=\"http://w\"} 2"));
    }
}
