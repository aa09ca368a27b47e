//! SGLang workers: least-outstanding choice among healthy workers, a worker that fails a
//! call is taken out of rotation, and a background probe of `GET /health` brings it back.
//! A probe alone takes a worker out only after `probe_failures` failed probes in a row: a busy
//! SGLang answers `/health` late under load (seconds at 32 concurrent requests on a small CPU
//! box), and one slow answer must not turn every request into a 503.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// One SGLang worker (`http://host:port`, no trailing slash).
#[derive(Debug)]
pub struct Worker {
    pub url: String,
    outstanding: AtomicUsize,
    healthy: AtomicBool,
    /// Failed probes since the last good one.
    failed_probes: AtomicUsize,
}

impl Worker {
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }
}

/// A worker chosen for one request; its outstanding count drops when this is dropped
/// (streams hold it until their last byte).
#[derive(Debug)]
pub struct Lease(Arc<Worker>);

impl Lease {
    pub fn worker(&self) -> &Worker {
        &self.0
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The worker set.
#[derive(Debug)]
pub struct WorkerPool {
    workers: Vec<Arc<Worker>>,
    next: AtomicUsize,
    /// Failed probes in a row that take a worker out (at least 1).
    probe_failures: usize,
}

impl WorkerPool {
    /// Workers start healthy: a failed call or `probe_failures` failed probes correct that.
    pub fn new(urls: &[String], probe_failures: usize) -> Self {
        let workers = urls
            .iter()
            .map(|u| {
                Arc::new(Worker {
                    url: u.trim_end_matches('/').to_owned(),
                    outstanding: AtomicUsize::new(0),
                    healthy: AtomicBool::new(true),
                    failed_probes: AtomicUsize::new(0),
                })
            })
            .collect();
        Self { workers, next: AtomicUsize::new(0), probe_failures: probe_failures.max(1) }
    }

    pub fn workers(&self) -> &[Arc<Worker>] {
        &self.workers
    }

    pub fn any_healthy(&self) -> bool {
        self.workers.iter().any(|w| w.is_healthy())
    }

    /// Least outstanding among healthy workers not in `exclude`; ties are broken by a
    /// rotating start so equal workers share the load.
    pub fn pick(&self, exclude: &[String]) -> Option<Lease> {
        let n = self.workers.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let chosen = (0..n)
            .map(|i| &self.workers[(start + i) % n])
            .filter(|w| w.is_healthy() && !exclude.contains(&w.url))
            .min_by_key(|w| w.outstanding())?;
        chosen.outstanding.fetch_add(1, Ordering::Relaxed);
        Some(Lease(Arc::clone(chosen)))
    }

    /// Take a worker out of rotation until a probe succeeds.
    pub fn mark_failed(&self, url: &str) {
        if let Some(w) = self.workers.iter().find(|w| w.url == url) {
            if w.healthy.swap(false, Ordering::Relaxed) {
                tracing::warn!(worker = url, "worker taken out of rotation");
            }
        }
    }

    /// `(url, healthy, outstanding)` for /metrics and /health.
    pub fn snapshot(&self) -> Vec<(String, bool, usize)> {
        self.workers.iter().map(|w| (w.url.clone(), w.is_healthy(), w.outstanding())).collect()
    }

    /// Probe every worker's `/health` once.
    pub async fn probe_all(&self, client: &reqwest::Client, timeout: Duration) {
        let probes = self.workers.iter().map(|w| async move {
            let ok = client
                .get(format!("{}/health", w.url))
                .timeout(timeout)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            let failed = if ok {
                w.failed_probes.store(0, Ordering::Relaxed);
                0
            } else {
                w.failed_probes.fetch_add(1, Ordering::Relaxed) + 1
            };
            // a good probe brings a worker back at once; bad ones take it out only in a row
            let now = ok || (failed < self.probe_failures && w.is_healthy());
            let was = w.healthy.swap(now, Ordering::Relaxed);
            if now != was {
                tracing::info!(worker = %w.url, healthy = now, failed_probes = failed, "worker health changed");
            }
        });
        futures_util::future::join_all(probes).await;
    }

    /// Probe forever every `interval` (spawned once at start-up).
    pub async fn probe_loop(self: Arc<Self>, client: reqwest::Client, interval: Duration, timeout: Duration) {
        loop {
            self.probe_all(&client, timeout).await;
            tokio::time::sleep(interval).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_outstanding_and_failover() {
        let pool = WorkerPool::new(&["http://a/".into(), "http://b".into()], 3);
        let l1 = pool.pick(&[]).unwrap();
        let l2 = pool.pick(&[]).unwrap();
        assert_ne!(l1.worker().url, l2.worker().url, "second pick goes to the idle worker");
        drop(l2);
        let l3 = pool.pick(&[]).unwrap();
        assert_ne!(l3.worker().url, l1.worker().url);
        pool.mark_failed(&l1.worker().url.clone());
        let l4 = pool.pick(&[]).unwrap();
        assert_eq!(l4.worker().url, l3.worker().url, "failed worker is skipped");
        assert!(pool.pick(&[l3.worker().url.clone()]).is_none());
        assert_eq!(pool.snapshot().iter().map(|s| s.2).sum::<usize>(), 3);
    }

    /// A probe that fails takes a worker out only after `probe_failures` in a row; one good
    /// probe brings it back. Probes a closed local port (connection refused at once).
    #[tokio::test]
    async fn probes_take_a_worker_out_only_after_failures_in_a_row() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        }; // closed again: nothing listens there
        let pool = WorkerPool::new(&[format!("http://127.0.0.1:{port}")], 3);
        let client = reqwest::Client::new();
        let timeout = Duration::from_secs(2);
        for expect_healthy in [true, true, false, false] {
            pool.probe_all(&client, timeout).await;
            assert_eq!(pool.any_healthy(), expect_healthy);
        }
        // a listener on that port answers /health 200: one good probe brings the worker back
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let server = tokio::spawn(async move {
            let app = axum::Router::new().route("/health", axum::routing::get(|| async { "ok" }));
            axum::serve(listener, app).await.unwrap();
        });
        pool.probe_all(&client, timeout).await;
        assert!(pool.any_healthy());
        server.abort();
    }
}
