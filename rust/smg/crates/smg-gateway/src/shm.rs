//! Shared-memory transport (gateway and worker on one host): the gateway writes each image's
//! bf16 patch bytes to `/dev/shm/m3serve-<pid>-<seq>-<hash16>.bf16` and names it in the wire
//! item. Lifetime (docs/wire-format.md): the gateway deletes the files when the worker's answer
//! is complete (or the request fails or the client goes away), via [`ShmFiles`]'s `Drop`; the
//! worker only reads them, and reads them before it answers anything. Files left by a gateway
//! that crashed are removed by the next gateway at start-up ([`sweep_stale`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use smg_core::wire::SHM_PREFIX;

static SEQ: AtomicU64 = AtomicU64::new(0);

/// Files to delete when the request is over.
#[derive(Debug, Default)]
pub struct ShmFiles(Vec<PathBuf>);

impl Drop for ShmFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl ShmFiles {
    /// Write `bytes` to a new file; returns its path. The file is tracked for deletion.
    pub fn write(&mut self, hash: &str, bytes: &[u8]) -> std::io::Result<String> {
        let short: String = hash.chars().filter(char::is_ascii_alphanumeric).take(16).collect();
        let path = format!("{SHM_PREFIX}{}-{}-{short}.bf16", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        std::fs::write(&path, bytes)?;
        self.0.push(PathBuf::from(&path));
        Ok(path)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Remove `m3serve-<pid>-*` files whose pid is not a running process (Linux `/proc`).
pub fn sweep_stale() {
    let Ok(dir) = std::fs::read_dir("/dev/shm") else { return };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("m3serve-") else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_removed_on_drop() {
        if !std::path::Path::new("/dev/shm").is_dir() {
            return;
        }
        let mut f = ShmFiles::default();
        let p = f.write("abcdef", &[1, 2, 3, 4]).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), vec![1, 2, 3, 4]);
        drop(f);
        assert!(!std::path::Path::new(&p).exists());
    }
}
