//! AVX2 kernels of the torch (int16-weight) resampler, through pulp's safe intrinsic wrappers.
//!
//! Same arithmetic as the portable kernels in `resize.rs` (i32 sums of `w_i · x_i`, exact in
//! any tap order, then `clamp((half + Σ) >> p, 0, 255)`), laid out for `vpmaddwd`:
//! - horizontal: one 16-byte load covers 4 consecutive RGB taps (12 bytes); broadcast to both
//!   128-bit lanes, `vpshufb` puts taps 0,1 (low lane) and 2,3 (high lane) as zero-extended i16
//!   pairs `[R0 R1 G0 G1 B0 B1 _ _]`, and `vpmaddwd` with the matching weight pairs yields
//!   `[R G B _]` partial sums. No transpose, no scalar write-back: 4 output pixels are packed
//!   to 12 bytes with `packs`/`packus` (which saturate exactly as the clamp does) and a shuffle.
//! - vertical: rows k and k+1 are byte-interleaved (`vpunpck*bw`) and widened so one `vpmaddwd`
//!   applies two taps to 16 pixels; the in-lane unpack order is undone by the final packs.
//!
//! Reads past a row's end hit either the next row or zero padding and always carry weight 0.
//!
//! Every function is `inline(always)` so it is compiled inside pulp's `#[target_feature]` entry
//! point (see "Speed" in `resize.rs`); closures would not inherit the features, hence none here.

#![allow(clippy::inline_always)]

use core::arch::x86_64::{__m128i, __m256i};

use pulp::bytemuck::cast;
use pulp::x86::V3;

use super::AxisWeights;

/// Per output pixel, weight quads as i16 pairs: low lane `[w0 w1]×4`, high lane `[w2 w3]×4`.
struct QuadWeights {
    precision: u32,
    start: Vec<usize>,
    max_quads: usize,
    w: Vec<[i16; 16]>,
}

fn quad_weights(ax: &AxisWeights, w16: &[i16]) -> QuadWeights {
    let out = ax.start.len();
    let max_quads = ax.len.iter().map(|&n| n.div_ceil(4)).max().unwrap_or(0);
    let mut w = vec![[0i16; 16]; out * max_quads];
    for x in 0..out {
        let taps = &w16[x * ax.stride..x * ax.stride + ax.len[x]];
        let nq = taps.len().div_ceil(4);
        for q in 0..nq {
            let t = |k: usize| taps.get(4 * q + k).copied().unwrap_or(0);
            let v = &mut w[x * max_quads + q];
            for j in 0..4 {
                v[2 * j] = t(0);
                v[2 * j + 1] = t(1);
                v[8 + 2 * j] = t(2);
                v[8 + 2 * j + 1] = t(3);
            }
        }
    }
    QuadWeights {
        precision: ax.precision,
        start: ax.start.clone(),
        max_quads,
        w,
    }
}

#[inline(always)]
fn load16(s: &[u8], off: usize) -> __m128i {
    let a: [u8; 16] = s[off..off + 16].try_into().expect("16 bytes");
    cast(a)
}

#[inline(always)]
fn load32(s: &[u8], off: usize) -> __m256i {
    let a: [u8; 32] = s[off..off + 32].try_into().expect("32 bytes");
    cast(a)
}

/// `[R G B _]` i32 sums (without the rounding half) of one output pixel in two rows (low lane:
/// row `a`, high lane: row `b`), over `N` weight quads (zero-padded to the axis' maximum so the
/// loop has a fixed trip count).
#[inline(always)]
fn h_pixel2<const N: usize>(
    simd: V3,
    a: &[u8],
    b: &[u8],
    s: usize,
    w: &[[i16; 16]],
    shuf: __m256i,
) -> __m256i {
    let avx2 = simd.avx2;
    let (a, b) = (&a[s * 3..s * 3 + 12 * N + 4], &b[s * 3..s * 3 + 12 * N + 4]);
    let w = &w[..N];
    let mut acc_a = simd.avx._mm256_setzero_si256();
    let mut acc_b = acc_a;
    for (q, &wq) in w.iter().enumerate() {
        let wq: __m256i = cast(wq);
        let va =
            avx2._mm256_shuffle_epi8(avx2._mm256_broadcastsi128_si256(load16(a, 12 * q)), shuf);
        let vb =
            avx2._mm256_shuffle_epi8(avx2._mm256_broadcastsi128_si256(load16(b, 12 * q)), shuf);
        acc_a = avx2._mm256_add_epi32(acc_a, avx2._mm256_madd_epi16(va, wq));
        acc_b = avx2._mm256_add_epi32(acc_b, avx2._mm256_madd_epi16(vb, wq));
    }
    // [a.lo | b.lo] + [a.hi | b.hi]
    avx2._mm256_add_epi32(
        avx2._mm256_permute2x128_si256::<0x20>(acc_a, acc_b),
        avx2._mm256_permute2x128_si256::<0x31>(acc_a, acc_b),
    )
}

/// Horizontal pass: `src` is `h × in_w × 3` interleaved RGB; result `h × out_w × 3`. `None`
/// past 64 taps per output pixel (downscales beyond ~16×), left to the portable kernel.
#[inline(always)]
pub fn horizontal(
    simd: V3,
    src: &[u8],
    h: usize,
    in_w: usize,
    ax: &AxisWeights,
    w16: &[i16],
) -> Option<Vec<u8>> {
    let qw = quad_weights(ax, w16);
    Some(match qw.max_quads {
        1 => horizontal_n::<1>(simd, src, h, in_w, &qw),
        2 => horizontal_n::<2>(simd, src, h, in_w, &qw),
        3 => horizontal_n::<3>(simd, src, h, in_w, &qw),
        4 => horizontal_n::<4>(simd, src, h, in_w, &qw),
        5 => horizontal_n::<5>(simd, src, h, in_w, &qw),
        6 => horizontal_n::<6>(simd, src, h, in_w, &qw),
        7 => horizontal_n::<7>(simd, src, h, in_w, &qw),
        8 => horizontal_n::<8>(simd, src, h, in_w, &qw),
        9..=16 => horizontal_n::<16>(simd, src, h, in_w, &qw.padded(16)),
        _ => return None,
    })
}

impl QuadWeights {
    /// The same weights with `n` quads per pixel (zero quads appended).
    fn padded(&self, n: usize) -> Self {
        assert!(
            n >= self.max_quads,
            "{n} quads cannot hold {}",
            self.max_quads
        );
        let mut w = vec![[0i16; 16]; self.start.len() * n];
        for (x, chunk) in self.w.chunks_exact(self.max_quads).enumerate() {
            w[x * n..x * n + self.max_quads].copy_from_slice(chunk);
        }
        Self {
            precision: self.precision,
            start: self.start.clone(),
            max_quads: n,
            w,
        }
    }
}

#[inline(always)]
fn horizontal_n<const N: usize>(
    simd: V3,
    src: &[u8],
    h: usize,
    in_w: usize,
    qw: &QuadWeights,
) -> Vec<u8> {
    let out_w = qw.start.len();
    let row_len = in_w * 3;
    // Loads reach 12·N + 4 bytes past a pixel's first tap, at most that far past the row end.
    let pad = 12 * N + 4;
    let mut out = vec![0u8; h * out_w * 3];
    let (avx2, sse2) = (simd.avx2, simd.sse2);
    // Low lane: taps 0,1 of the 4 loaded; high lane: taps 2,3 (bytes 6..12).
    let z = -128i8; // 0x80: vpshufb writes zero
    let shuf: [i8; 32] = [
        0, z, 3, z, 1, z, 4, z, 2, z, 5, z, z, z, z, z, //
        6, z, 9, z, 7, z, 10, z, 8, z, 11, z, z, z, z, z,
    ];
    let shuf: __m256i = cast(shuf);
    // Per lane, four [R G B _] pixels packed to u8 (x0 x1 x2 x3) → 12 contiguous bytes.
    let compact: [i8; 32] = [
        0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, z, z, z, z, //
        0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, z, z, z, z,
    ];
    let compact: __m256i = cast(compact);
    let half = simd.avx._mm256_set1_epi32(1 << (qw.precision - 1));
    let shift = sse2._mm_cvtsi32_si128(qw.precision as i32);
    // Rows near the end of `src` are read from zero-padded copies.
    let mut pa = vec![0u8; row_len + pad];
    let mut pb = vec![0u8; row_len + pad];
    let mut y = 0;
    while y < h {
        let y1 = (y + 1).min(h - 1); // an odd last row is computed twice, stored once
        let a: &[u8] = if src.len() - y * row_len >= row_len + pad {
            &src[y * row_len..]
        } else {
            pa[..row_len].copy_from_slice(&src[y * row_len..(y + 1) * row_len]);
            &pa
        };
        let b: &[u8] = if src.len() - y1 * row_len >= row_len + pad {
            &src[y1 * row_len..]
        } else {
            pb[..row_len].copy_from_slice(&src[y1 * row_len..(y1 + 1) * row_len]);
            &pb
        };
        let mut x = 0;
        while x < out_w {
            let n = (out_w - x).min(4);
            let mut p = [half; 4];
            for (i, pi) in p.iter_mut().enumerate().take(n) {
                let xi = x + i;
                let w = &qw.w[xi * qw.max_quads..(xi + 1) * qw.max_quads];
                let v = h_pixel2::<N>(simd, a, b, qw.start[xi], w, shuf);
                *pi = avx2._mm256_sra_epi32(avx2._mm256_add_epi32(v, half), shift);
            }
            let lo = avx2._mm256_packs_epi32(p[0], p[1]);
            let hi = avx2._mm256_packs_epi32(p[2], p[3]);
            let v = avx2._mm256_shuffle_epi8(avx2._mm256_packus_epi16(lo, hi), compact);
            let v: [u8; 32] = cast(v);
            let len = n * 3;
            out[(y * out_w + x) * 3..][..len].copy_from_slice(&v[..len]);
            if y1 != y {
                out[(y1 * out_w + x) * 3..][..len].copy_from_slice(&v[16..16 + len]);
            }
            x += 4;
        }
        y += 2;
    }
    out
}

/// Vertical pass: `src` is rows of `row_len` bytes; result `ax.start.len()` rows. Columns past
/// the last full 32-byte chunk go through `tail` (the portable strip).
#[inline(always)]
pub fn vertical(
    simd: V3,
    src: &[u8],
    row_len: usize,
    ax: &AxisWeights,
    w16: &[i16],
    tail: impl Fn(&[u8], usize, usize, usize, &[i16], u32, &mut [u8]),
) -> Vec<u8> {
    let out_h = ax.start.len();
    let mut out = vec![0u8; out_h * row_len];
    let avx2 = simd.avx2;
    let zero = simd.avx._mm256_setzero_si256();
    let half = simd.avx._mm256_set1_epi32(1 << (ax.precision - 1));
    let shift = simd.sse2._mm_cvtsi32_si128(ax.precision as i32);
    let full = row_len / 32 * 32;
    for (y, out_row) in out.chunks_exact_mut(row_len).enumerate() {
        let s = ax.start[y];
        let taps = &w16[y * ax.stride..y * ax.stride + ax.len[y]];
        let pairs: Vec<(usize, usize, i32)> = taps
            .chunks(2)
            .enumerate()
            .map(|(j, p)| {
                let (w0, w1) = (p[0], p.get(1).copied().unwrap_or(0));
                let k = s + 2 * j;
                // A lone last tap pairs with itself at weight 0.
                let k1 = if p.len() == 2 { k + 1 } else { k };
                let wp = (i32::from(w1) << 16) | i32::from(w0 as u16);
                (k * row_len, k1 * row_len, wp)
            })
            .collect();
        let mut col = 0;
        while col < full {
            let mut acc = [half; 4];
            for &(o0, o1, wp) in &pairs {
                let wp = simd.avx._mm256_set1_epi32(wp);
                let a = load32(src, o0 + col);
                let b = load32(src, o1 + col);
                let lo = avx2._mm256_unpacklo_epi8(a, b);
                let hi = avx2._mm256_unpackhi_epi8(a, b);
                let parts = [
                    avx2._mm256_unpacklo_epi8(lo, zero),
                    avx2._mm256_unpackhi_epi8(lo, zero),
                    avx2._mm256_unpacklo_epi8(hi, zero),
                    avx2._mm256_unpackhi_epi8(hi, zero),
                ];
                for (a, p) in acc.iter_mut().zip(parts) {
                    *a = avx2._mm256_add_epi32(*a, avx2._mm256_madd_epi16(p, wp));
                }
            }
            let [a0, a1, a2, a3] = acc;
            let (a0, a1) = (
                avx2._mm256_sra_epi32(a0, shift),
                avx2._mm256_sra_epi32(a1, shift),
            );
            let (a2, a3) = (
                avx2._mm256_sra_epi32(a2, shift),
                avx2._mm256_sra_epi32(a3, shift),
            );
            let v = avx2._mm256_packus_epi16(
                avx2._mm256_packs_epi32(a0, a1),
                avx2._mm256_packs_epi32(a2, a3),
            );
            let v: [u8; 32] = cast(v);
            out_row[col..col + 32].copy_from_slice(&v);
            col += 32;
        }
        if full < row_len {
            tail(
                src,
                row_len,
                full,
                s,
                taps,
                ax.precision,
                &mut out_row[full..],
            );
        }
    }
    out
}
