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
//!
//! Huge pages: on Linux a buffer above [`KEEP_MAX_BYTES`] is an anonymous mapping rounded up to
//! 2 MiB and advised `MADV_HUGEPAGE` (memmap2's safe `map_anon` + `advise`), not a `Vec`, so a
//! photo's 36.6 MB are 18 TLB entries instead of ~8,900: the decoder writes it row by row and
//! the horizontal resize pass reads it 16 rows (48 pages of 4 KB) at a time. Malloc does not
//! advise, and where THP is `madvise`-only (as on the dev box) its buffers get 4 KB pages.
//! Measured (4032×3024, builds alternated): the JPEG's whole call -7 %, the resize + normalise +
//! patchify stage -3 %. Where the mapping or the advice fails, or off Linux, it is a `Vec` as
//! before. [`PixelBuf`] is either; both deref to the bytes in use.

use std::cell::RefCell;
use std::fmt;
use std::ops::{Deref, DerefMut};

/// Buffers kept per thread (decoded, intermediate, resized).
const KEEP: usize = 3;
/// Larger buffers go to the one large slot, or are freed (8 MiB: a 1670×1670 RGB image).
pub const KEEP_MAX_BYTES: usize = 8 << 20;
/// The large slot's bound (40 MiB: a 12.6-megapixel RGB image); larger buffers are freed.
pub const KEEP_LARGE_MAX_BYTES: usize = 40 << 20;
/// A transparent huge page on x86-64 and most arm64 kernels; huge-page mappings are a multiple.
#[cfg(target_os = "linux")]
const HUGE_PAGE: usize = 2 << 20;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    static LARGE: RefCell<Option<PixelBuf>> = const { RefCell::new(None) };
}

/// Image bytes: a `Vec`, or (Linux, above [`KEEP_MAX_BYTES`]) an anonymous mapping advised for
/// huge pages. Derefs to the bytes in use; compares, clones and prints as those bytes.
pub struct PixelBuf(Repr);

enum Repr {
    Heap(Vec<u8>),
    #[cfg(target_os = "linux")]
    Huge {
        map: memmap2::MmapMut,
        len: usize,
    },
}

impl PixelBuf {
    /// `n` zero bytes in a new mapping of `n` rounded up to 2 MiB, advised `MADV_HUGEPAGE`;
    /// `None` if either call fails (the caller falls back to a `Vec`).
    #[cfg(target_os = "linux")]
    fn huge(n: usize) -> Option<Self> {
        let map = memmap2::MmapMut::map_anon(n.div_ceil(HUGE_PAGE) * HUGE_PAGE).ok()?;
        map.advise(memmap2::Advice::HugePage).ok()?;
        Some(Self(Repr::Huge { map, len: n }))
    }

    #[cfg(not(target_os = "linux"))]
    fn huge(_: usize) -> Option<Self> {
        None
    }

    /// Whether the bytes live in a huge-page advised mapping.
    pub fn is_huge(&self) -> bool {
        !matches!(self.0, Repr::Heap(_))
    }

    /// Bytes it holds without allocating.
    fn capacity(&self) -> usize {
        match &self.0 {
            Repr::Heap(v) => v.capacity(),
            #[cfg(target_os = "linux")]
            Repr::Huge { map, .. } => map.len(),
        }
    }

    /// The same buffer holding `n` bytes: those it held keep their values, new ones are zero
    /// (a `Vec` grows; a mapping too small, which [`take`] never resizes, becomes a `Vec`).
    fn resized(self, n: usize) -> Self {
        match self.0 {
            Repr::Heap(mut v) => {
                v.resize(n, 0);
                Self(Repr::Heap(v))
            }
            #[cfg(target_os = "linux")]
            Repr::Huge { map, .. } if map.len() >= n => Self(Repr::Huge { map, len: n }),
            #[cfg(target_os = "linux")]
            Repr::Huge { map, len } => {
                let mut v = map[..len].to_vec();
                v.resize(n, 0);
                Self(Repr::Heap(v))
            }
        }
    }
}

impl Deref for PixelBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.0 {
            Repr::Heap(v) => v,
            #[cfg(target_os = "linux")]
            Repr::Huge { map, len } => &map[..*len],
        }
    }
}

impl DerefMut for PixelBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.0 {
            Repr::Heap(v) => v,
            #[cfg(target_os = "linux")]
            Repr::Huge { map, len } => &mut map[..*len],
        }
    }
}

impl From<Vec<u8>> for PixelBuf {
    fn from(v: Vec<u8>) -> Self {
        Self(Repr::Heap(v))
    }
}

impl FromIterator<u8> for PixelBuf {
    fn from_iter<I: IntoIterator<Item = u8>>(bytes: I) -> Self {
        Vec::from_iter(bytes).into()
    }
}

impl Default for PixelBuf {
    fn default() -> Self {
        Vec::new().into()
    }
}

impl Clone for PixelBuf {
    fn clone(&self) -> Self {
        self.to_vec().into()
    }
}

impl PartialEq for PixelBuf {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for PixelBuf {}

impl fmt::Debug for PixelBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// A buffer of length `n`; its bytes are whatever a previous image left (callers overwrite all
/// of them). Zero-fills only what no kept buffer already covers.
pub fn take(n: usize) -> PixelBuf {
    if n > KEEP_MAX_BYTES {
        let kept = LARGE.with(|l| l.borrow_mut().take());
        return match kept {
            Some(buf) if buf.capacity() >= n => buf.resized(n),
            kept => PixelBuf::huge(n).unwrap_or_else(|| kept.unwrap_or_default().resized(n)),
        };
    }
    let reused = POOL.with(|p| {
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
    });
    let mut buf = reused.unwrap_or_default();
    if buf.len() >= n {
        buf.truncate(n);
    } else {
        buf.resize(n, 0);
    }
    buf.into()
}

/// Hands `buf` back for the next image on this thread (dropped if too large or the pool is
/// full).
pub fn give(buf: PixelBuf) {
    let buf = match buf.0 {
        Repr::Heap(v) if v.len() <= KEEP_MAX_BYTES => return give_small(v),
        repr => PixelBuf(repr),
    };
    if buf.capacity() > KEEP_LARGE_MAX_BYTES {
        return;
    }
    LARGE.with(|l| {
        let mut l = l.borrow_mut();
        // the large slot keeps the buffer that serves more images: a huge-page one, else the
        // longer one (it serves every smaller large image)
        let rank = |b: &PixelBuf| (b.is_huge(), b.capacity());
        let better = match l.as_ref() {
            Some(kept) => rank(kept) < rank(&buf),
            None => true,
        };
        if better {
            *l = Some(buf);
        }
    });
}

fn give_small(buf: Vec<u8>) {
    if buf.is_empty() {
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
        give(vec![0; KEEP_MAX_BYTES + 1].into());
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
        give(vec![0; KEEP_LARGE_MAX_BYTES + 1].into());
        let cap = LARGE.with(|l| {
            let l = l.borrow();
            let l = l.as_ref().expect("the large slot holds a buffer");
            assert!(l.capacity() <= KEEP_LARGE_MAX_BYTES);
            assert_eq!(l.as_ptr(), ptr);
            l.capacity()
        });
        // a larger request than the slot holds grows it
        let c = take(cap + 8192);
        assert_eq!(c.len(), cap + 8192);
        give(c);
        LARGE.with(|l| assert!(l.borrow().as_ref().unwrap().capacity() >= cap + 8192));
    }

    /// The `VmFlags` line of the mapping in /proc/self/smaps that holds `addr`.
    #[cfg(target_os = "linux")]
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("read /proc/self/smaps");
        let hex = |s: &str| usize::from_str_radix(s, 16).ok();
        let mut inside = false;
        for line in smaps.lines() {
            // a mapping's first line starts "lo-hi " in hex; its fields follow
            let range = line.split_once(' ').and_then(|(r, _)| r.split_once('-'));
            if let Some((Some(lo), Some(hi))) = range.map(|(lo, hi)| (hex(lo), hex(hi))) {
                inside = (lo..hi).contains(&addr);
            } else if inside && line.starts_with("VmFlags:") {
                return line.to_string();
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn large_buffer_is_a_reused_huge_page_mapping() {
        let n = 4032 * 3024 * 3;
        let mut a = take(n);
        assert!(a.is_huge(), "a large buffer is a huge-page mapping");
        assert_eq!(a.len(), n);
        assert_eq!(a.capacity() % HUGE_PAGE, 0, "rounded up to 2 MiB");
        assert!(a.iter().all(|&b| b == 0), "a fresh mapping is zeroed");
        let flags = vm_flags(a.as_ptr() as usize);
        assert!(
            flags.split_whitespace().any(|f| f == "hg"),
            "MADV_HUGEPAGE: {flags}"
        );
        a.fill(7);
        let (ptr, cap) = (a.as_ptr(), a.capacity());
        give(a);
        // reused for a smaller large image, its bytes untouched (the callers overwrite them)
        let b = take(n - 4032 * 3);
        assert_eq!((b.as_ptr(), b.len()), (ptr, n - 4032 * 3));
        assert!(b.is_huge());
        // what callers see of it: the bytes in use, compared and cloned as bytes
        assert_eq!(b.clone(), PixelBuf::from(vec![7; b.len()]));
        give(b);
        // a longer heap buffer does not displace the mapping
        give(vec![0; cap + 1].into());
        LARGE.with(|l| assert_eq!(l.borrow().as_ref().unwrap().as_ptr(), ptr));
    }
}
