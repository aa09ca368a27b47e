//! SGLang workers: least-outstanding choice among healthy workers, a worker that fails a
//! call is taken out of rotation, and a background probe of `GET /health` brings it back.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// One SGLang worker (`http://host:port`, no trailing slash).
#[derive(Debug)]
pub struct Worker {
    pub url: String,
    outstanding: AtomicUsize,
    healthy: AtomicBool,
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
}

impl WorkerPool {
    /// Workers start healthy: the first probe runs at once and corrects that.
    pub fn new(urls: &[String]) -> Self {
        let workers = urls
            .iter()
            .map(|u| {
                Arc::new(Worker {
                    url: u.trim_end_matches('/').to_owned(),
                    outstanding: AtomicUsize::new(0),
                    healthy: AtomicBool::new(true),
                })
            })
            .collect();
        Self { workers, next: AtomicUsize::new(0) }
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
            let was = w.healthy.swap(ok, Ordering::Relaxed);
            if ok != was {
                tracing::info!(worker = %w.url, healthy = ok, "worker health changed");
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
        let pool = WorkerPool::new(&["http://a/".into(), "http://b".into()]);
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
}
