//! Per-thread reuse of the large byte buffers of one image (decoded pixels, the horizontal
//! pass's intermediate, the resized pixels).
//!
//! Why: a fresh `vec![0u8; n]` of a few MiB costs a memset (and, when malloc maps new pages,
//! page faults) on every image: about 0.5 ms of a 1280×960 JPEG's ~13 ms. Every writer here
//! overwrites the whole buffer, so a reused buffer needs no zeroing; safe Rust cannot hand out
//! uninitialised memory, so the saving comes from keeping initialised buffers around.
//!
//! [`take`] returns a buffer of exactly `n` bytes with unspecified contents; [`give`] returns it
//! to this thread's pool. Only a few buffers of at most [`KEEP_MAX_BYTES`] each are kept, plus
//! one larger one of at most [`KEEP_LARGE_MAX_BYTES`] (a phone photo's decoded pixels: 4032×3024
//! RGB is 36.6 MB, whose fresh allocation cost ~8,900 page faults and whose free a 1-1.3 ms
//! munmap on every such image), so a thread holds at most 3 × 8 + 40 = 64 MiB between images.

use std::cell::RefCell;

/// Buffers kept per thread (decoded, intermediate, resized).
const KEEP: usize = 3;
/// Larger buffers go to the one large slot, or are freed (8 MiB: a 1670×1670 RGB image).
pub const KEEP_MAX_BYTES: usize = 8 << 20;
/// The large slot's bound (40 MiB: a 12.6-megapixel RGB image); larger buffers are freed.
pub const KEEP_LARGE_MAX_BYTES: usize = 40 << 20;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    static LARGE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of length `n`; its bytes are whatever a previous image left (callers overwrite all
/// of them). Zero-fills only what no kept buffer already covers.
pub fn take(n: usize) -> Vec<u8> {
    let reused = if n > KEEP_MAX_BYTES {
        Some(LARGE.with(|l| std::mem::take(&mut *l.borrow_mut())))
    } else {
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            // The smallest kept buffer that is long enough, else the longest one.
            let pick = p
                .iter()
                .enumerate()
                .filter(|(_, b)| b.len() >= n)
                .min_by_key(|(_, b)| b.len())
                .or_else(|| p.iter().enumerate().max_by_key(|(_, b)| b.len()))
                .map(|(i, _)| i);
            pick.map(|i| p.swap_remove(i))
        })
    };
    let mut buf = reused.unwrap_or_default();
    if buf.len() >= n {
        buf.truncate(n);
    } else {
        buf.resize(n, 0);
    }
    buf
}

/// Hands `buf` back for the next image on this thread (dropped if too large or the pool is
/// full).
pub fn give(buf: Vec<u8>) {
    if buf.is_empty() || buf.len() > KEEP_LARGE_MAX_BYTES {
        return;
    }
    if buf.len() > KEEP_MAX_BYTES {
        // the large slot keeps the longer buffer: it serves every smaller large image
        LARGE.with(|l| {
            let mut l = l.borrow_mut();
            if l.len() < buf.len() {
                *l = buf;
            }
        });
        return;
    }
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < KEEP {
            p.push(buf);
        } else if let Some(i) = (0..p.len()).min_by_key(|&i| p[i].len()) {
            // Keep the longer buffers: they serve every smaller request without zero-filling.
            if p[i].len() < buf.len() {
                p[i] = buf;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_and_bounds() {
        let a = take(1000);
        assert_eq!(a.len(), 1000);
        let ptr = a.as_ptr();
        give(a);
        let b = take(500);
        assert_eq!(b.len(), 500);
        assert_eq!(b.as_ptr(), ptr, "the kept buffer is reused");
        give(b);
        let c = take(2000);
        assert_eq!(c.len(), 2000);
        give(c);
        give(vec![0; KEEP_MAX_BYTES + 1]);
        POOL.with(|p| {
            let p = p.borrow();
            assert!(p.len() <= KEEP);
            assert!(p.iter().all(|b| b.len() <= KEEP_MAX_BYTES));
        });
    }

    #[test]
    fn one_large_buffer_is_kept_and_bounded() {
        let n = KEEP_MAX_BYTES + 4096;
        let a = take(n);
        assert_eq!(a.len(), n);
        let ptr = a.as_ptr();
        give(a);
        let b = take(n - 100);
        assert_eq!(b.len(), n - 100);
        assert_eq!(b.as_ptr(), ptr, "the large slot is reused");
        give(b);
        // a small request never takes the large buffer
        let small = take(1000);
        assert_ne!(small.as_ptr(), ptr);
        give(small);
        // a buffer past the large bound is freed, and the slot keeps what it had
        give(vec![0; KEEP_LARGE_MAX_BYTES + 1]);
        LARGE.with(|l| {
            let l = l.borrow();
            assert!(l.len() <= KEEP_LARGE_MAX_BYTES);
            assert_eq!(l.as_ptr(), ptr);
        });
        // a larger request than the slot holds grows it
        let c = take(n + 8192);
        assert_eq!(c.len(), n + 8192);
        give(c);
        LARGE.with(|l| assert_eq!(l.borrow().len(), n + 8192));
    }
}
