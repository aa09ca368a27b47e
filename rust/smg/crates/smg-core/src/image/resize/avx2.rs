//! AVX2 kernels of the torch (int16-weight) resampler, through pulp's safe intrinsic wrappers.
//!
//! Same arithmetic as the portable kernels in `resize.rs` (i32 sums of `w_i · x_i`, exact in
//! any tap order, then `clamp((half + Σ) >> p, 0, 255)`), laid out for `vpmaddwd`:
//! - horizontal: strips of 16 rows are transposed (16×16 byte blocks, two at a time in the
//!   128-bit lanes of a 256-bit transpose) so each byte column (`3x + c`) of the strip is one
//!   vector of 16 rows; tap pairs are then zero-extended, interleaved to i16 pairs and
//!   multiplied with the broadcast weight pair, as the vertical pass does down rows (R and G
//!   together: one 32-byte load holds both, see `Horizontal::filter_pixel`), and the
//!   results are transposed back. Every multiply lane is useful and nothing crosses 128-bit
//!   lanes in the inner loop. The transposed columns go to a small ring (a few KB, L1), each
//!   block followed by the output pixels it completes.
//! - vertical: rows k and k+1 are byte-interleaved (`vpunpck*bw`) and widened so one `vpmaddwd`
//!   applies two taps to 16 pixels; the in-lane unpack order is undone by the final packs.
//!
//! Vertical reads past a row's end hit either the next row or zero padding and always carry
//! weight 0.
//!
//! The multiply-accumulate of both tap loops goes through [`Taps`]: `vpmaddwd` + `vpaddd` with
//! pulp's [`V3`], one `vpdpwssd` with `vnni.rs`'s token, which the fused path takes where the
//! CPU has AVX-VNNI.
//!
//! Every function is `inline(always)` so it is compiled inside pulp's `#[target_feature]` entry
//! point (see "Speed" in `resize.rs`); closures would not inherit the features, hence none here.
//!
//! Speed of the horizontal pass (Xeon KVM guest, AVX-512 capable; 1280×960 → 756 columns, all
//! 60 strips, input hot): the filter is bound by vector-port throughput (per tap pair and
//! channel 2 `vpmovzxbw` + 2 unpacks + 2 `vpmaddwd` + 2 adds), about 0.6 ms; the 256-bit
//! transposes took the pass from 0.97-1.0 to 0.86-0.87 ms. Measured and not kept: widening
//! each byte column once per strip (i16 pairs of columns b and b + 3, so the tap loop is
//! `vpmaddwd` + add only; 1.08-1.13 ms, the widening costs what the tap loop saves, also with
//! the widened columns blocked to stay in L1); storing the columns zero-extended to u16 (4 %
//! faster on a hot input, no change in the stage); the same widened layout with AVX-512 BW
//! (`V4`, one strip at a time: 1.07-1.17 ms against 0.87-1.02 ms); software prefetch of the
//! next strip's input rows (within noise once the transposes were 256-bit). More in
//! `benchmarks/results/preprocess_cpu.md` (session 10).
//!
//! At 4032×3024 (→ 756 columns, the 36.6 MB input cold) the pass was 8.3 ms: the filter 4.4 ms,
//! the transposes in 3.5 ms, of which only 1.4 ms when the same rows are transposed again
//! (hot), so ~2 ms waited on memory, with no filter work to overlap it: the whole strip was
//! transposed into a 193 KB column buffer (L2) first, then filtered. Transposing block by
//! block into the L1 ring, each block followed by the pixels it completes, spreads the loads
//! over the filter's arithmetic: stage -10 % at 4032×3024, unchanged at 1280×960. Software
//! prefetch of the next strip into L2 took the transposes to 1.5 ms but slowed the filter by
//! 0.9 ms (its column loads then missed L1 and queued behind the prefetches), and with the ring
//! it was 3-5 % slower than none; `prefetchnta` 4 or 8 block pairs ahead +20 %; `prefetcht0`
//! 8 block pairs ahead in each row (what is kept, [`PREFETCH_PAIRS`]) -5 % (session 11).
//! R and G of each tap pair through one 32-byte load, byte unpack and unpacks with zero
//! (3 in-lane shuffles per channel, not 2 port-5-only `vpmovzxbw` + 2 unpacks), with the
//! tables holding byte offsets so each tap pixel costs one bounds check: stage -4 to -5 % at
//! 4032×3024 and 1280×960 (session 11, second pass).

#![allow(clippy::inline_always)]

use core::arch::x86_64::{__m128i, __m256, __m256i, _MM_HINT_T0};

use pulp::bytemuck::cast;
use pulp::x86::V3;

use super::AxisWeights;

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

/// The tap loops' multiply-accumulate, `acc + madd(pairs, w)` (per i32 lane, two i16 products
/// summed): `vpmaddwd` + `vpaddd` on [`V3`], one `vpdpwssd` on [`super::vnni::V3Vnni`]. The
/// kernels on the fused path are generic over it; everything else they do goes through
/// [`Taps::v3`].
pub trait Taps: Copy {
    fn v3(self) -> V3;
    fn madd_add(self, acc: __m256i, pairs: __m256i, w: __m256i) -> __m256i;
}

impl Taps for V3 {
    #[inline(always)]
    fn v3(self) -> V3 {
        self
    }

    #[inline(always)]
    fn madd_add(self, acc: __m256i, pairs: __m256i, w: __m256i) -> __m256i {
        let avx2 = self.avx2;
        avx2._mm256_add_epi32(acc, avx2._mm256_madd_epi16(pairs, w))
    }
}

/// One tap pair on 32 byte lanes: `a`, `b` are the two taps' bytes; interleaving them and
/// widening with zero gives four vectors of (a, b) u16 pairs (lanes 0-3 | 16-19, 4-7 | 20-23,
/// 8-11 | 24-27, 12-15 | 28-31: the order of the in-lane unpacks), and `acc[i] += madd(pairs,
/// w)` with `w` the weight pair. The horizontal filter (R | G of 16 rows) and the vertical
/// pass (32 columns) share it.
#[inline(always)]
fn madd_tap_pair<T: Taps>(taps: T, acc: &mut [__m256i; 4], a: __m256i, b: __m256i, w: __m256i) {
    let simd = taps.v3();
    let avx2 = simd.avx2;
    let zero = simd.avx._mm256_setzero_si256();
    let lo = avx2._mm256_unpacklo_epi8(a, b);
    let hi = avx2._mm256_unpackhi_epi8(a, b);
    let parts = [
        avx2._mm256_unpacklo_epi8(lo, zero),
        avx2._mm256_unpackhi_epi8(lo, zero),
        avx2._mm256_unpacklo_epi8(hi, zero),
        avx2._mm256_unpackhi_epi8(hi, zero),
    ];
    for (acc, p) in acc.iter_mut().zip(parts) {
        *acc = taps.madd_add(*acc, p, w);
    }
}

/// Rows per strip of the horizontal pass: one byte lane per row in a 16-byte vector.
pub const STRIP: usize = 16;

/// How far ahead (in 32-byte block pairs, along each row of the strip) the horizontal pass
/// prefetches its input into L1. 4032×3024 stage, in-process A/B: 6 to 12 all -4 to -7 %
/// (JPEG's pixels), -2 to -7 % (PNG's); 16 -4 %, 32 +3 %; none of them moved 1280×960.
const PREFETCH_PAIRS: usize = 8;

/// 16×16 byte transpose: four rounds of `out[2i] = lo(in[i], in[i+8])`,
/// `out[2i+1] = hi(in[i], in[i+8])`. Each round rotates the 8-bit (vector, byte) index left by
/// one bit, so four rounds swap vector and byte index.
#[inline(always)]
fn transpose16(simd: V3, mut a: [__m128i; 16]) -> [__m128i; 16] {
    let sse2 = simd.sse2;
    for _ in 0..4 {
        let mut b = a;
        for i in 0..8 {
            b[2 * i] = sse2._mm_unpacklo_epi8(a[i], a[i + 8]);
            b[2 * i + 1] = sse2._mm_unpackhi_epi8(a[i], a[i + 8]);
        }
        a = b;
    }
    a
}

/// [`transpose16`] of two 16×16 blocks at once, one per 128-bit lane (the unpacks are
/// in-lane): half the shuffle instructions per block, and the rows are 32-byte loads or stores.
#[inline(always)]
fn transpose16x2(simd: V3, mut a: [__m256i; 16]) -> [__m256i; 16] {
    let avx2 = simd.avx2;
    for _ in 0..4 {
        let mut b = a;
        for i in 0..8 {
            b[2 * i] = avx2._mm256_unpacklo_epi8(a[i], a[i + 8]);
            b[2 * i + 1] = avx2._mm256_unpackhi_epi8(a[i], a[i + 8]);
        }
        a = b;
    }
    a
}

/// Horizontal pass: `src` is `h × in_w × 3` interleaved RGB; writes all of `out`
/// (`h × out_w × 3`) as interleaved RGB rows (see [`Horizontal`]).
#[inline(always)]
pub fn horizontal(
    simd: V3,
    src: &[u8],
    h: usize,
    in_w: usize,
    ax: &AxisWeights,
    w16: &[i16],
    out: &mut [u8],
) {
    let out_row = ax.start.len() * 3;
    assert_eq!(out.len(), h * out_row, "horizontal: output size");
    let plan = HorizontalPlan::new(in_w, ax, w16);
    let mut pass = Horizontal::new(simd, src, h, &plan, false);
    for (i, rows) in out.chunks_mut(STRIP * out_row).enumerate() {
        pass.strip(i * STRIP, rows);
    }
}

/// The horizontal pass one strip of 16 rows at a time, so a caller can consume rows as they
/// come (the fused path of `fused.rs` keeps them in an L2 ring instead of a whole image).
///
/// Each strip is transposed (16×16 byte blocks) so that each byte column of the strip
/// (`3x + c`: pixel x, channel c) is one 16-byte vector holding that byte of all 16 rows. The
/// filter then runs down these vectors as the vertical pass runs down rows: tap pairs
/// zero-extended and interleaved into i16 pairs, one `vpmaddwd` with the broadcast weight pair
/// per 8 rows, every lane useful. The 16 results per output byte column are transposed back,
/// into interleaved RGB rows or, with `planar`, rows of the three channel planes side by side
/// (`[R × out_w | G × out_w | B × out_w]`, what the fused vertical pass reads): the layout only
/// changes where each result column goes before the transpose back, so it costs nothing.
pub struct Horizontal<'a, T: Taps = V3> {
    taps: T,
    src: &'a [u8],
    h: usize,
    in_w: usize,
    planar: bool,
    plan: &'a HorizontalPlan,
    /// The ring of transposed byte columns: slot `b % ring` is byte column b of the 16 rows.
    cols: Vec<[u8; 16]>,
    /// Results per output byte column (16 rows), before the transpose back.
    res: Vec<[u8; 16]>,
}

/// The tap tables of one horizontal resize (`in_w → out_w`), independent of the image, so a
/// caller may keep them for the next image of the same size (`fused.rs` does: building them
/// with their allocations was ~0.15 ms a 4032-wide image).
#[derive(Debug)]
pub struct HorizontalPlan {
    in_w: usize,
    out_w: usize,
    precision: u32,
    /// Byte columns in the ring of transposed columns (see [`Self::new`]).
    ring: usize,
    /// Tap pairs of every output pixel as (byte offset of the first tap pixel's R column in
    /// the ring, that of the second, i16 weight pair): byte column b is in slot `b % ring`, at
    /// byte `16 · slot`; byte column 3k is pixel k's R, its G and B the next two slots. Output
    /// x's are `pairs[ranges[x]..ranges[x + 1]]`.
    pairs: Vec<(u32, u32, i32)>,
    ranges: Vec<usize>,
    /// Byte columns output x reads: all below `need[x]` (non-decreasing in x).
    need: Vec<usize>,
}

impl HorizontalPlan {
    /// The tables of `ax` (an axis of `in_w` inputs) with its i16 weights `w16`.
    pub fn new(in_w: usize, ax: &AxisWeights, w16: &[i16]) -> Self {
        let out_w = ax.start.len();
        // -- the ring of transposed columns --
        // Output x is filtered once the columns below need[x] are in, right after the block
        // that brought them (at most 32 columns), so the ring holds its window
        // 3·start[x] .. need[x] (at most 3·ksize + 3 columns) if it has that plus 32 more. A
        // multiple of 96 keeps each block (16 or 32 columns at a multiple of 16) and each
        // pixel's 3 columns (at a multiple of 3) contiguous in the ring.
        let ring = (3 * ax.stride + 3 + 32).div_ceil(96) * 96;
        let mut pairs: Vec<(u32, u32, i32)> = Vec::with_capacity(pair_count(ax));
        let mut ranges = Vec::with_capacity(out_w + 1);
        let mut need = Vec::with_capacity(out_w);
        let mut base = 0;
        ranges.push(0usize);
        for x in 0..out_w {
            let s = ax.start[x];
            let taps = &w16[x * ax.stride..x * ax.stride + ax.len[x]];
            // A lone last tap pairs with itself at weight 0.
            for (j, p) in taps.chunks(2).enumerate() {
                let k = s + 2 * j;
                let (k1, w1) = if p.len() == 2 { (k + 1, p[1]) } else { (k, 0) };
                let wp = (i32::from(w1) << 16) | i32::from(p[0] as u16);
                let b0 = modulo_near(3 * k, &mut base, ring);
                let b1 = modulo_near(3 * k1, &mut base, ring);
                pairs.push((16 * b0 as u32, 16 * b1 as u32, wp));
            }
            ranges.push(pairs.len());
            need.push(3 * (s + ax.len[x]));
        }
        Self {
            in_w,
            out_w,
            precision: ax.precision,
            ring,
            pairs,
            ranges,
            need,
        }
    }
}

impl<'a, T: Taps> Horizontal<'a, T> {
    /// The pass over `src` (`h` rows of `plan`'s `in_w` pixels), writing interleaved RGB rows
    /// or, with `planar`, channel-planar ones (see above).
    #[inline(always)]
    pub fn new(taps: T, src: &'a [u8], h: usize, plan: &'a HorizontalPlan, planar: bool) -> Self {
        let in_w = plan.in_w;
        assert_eq!(src.len(), h * in_w * 3, "horizontal: input size");
        Self {
            taps,
            src,
            h,
            in_w,
            planar,
            plan,
            cols: vec![[0; 16]; plan.ring],
            res: vec![[0; 16]; (plan.out_w * 3).div_ceil(16) * 16],
        }
    }

    /// Rows `y0..y0 + n` (`y0` a multiple of 16, `n = min(16, h - y0)`) into `out`
    /// (`n × out_w × 3` bytes).
    ///
    /// The strip is transposed one block (pair) at a time into the ring, each block followed
    /// by the output pixels it completes, so the columns are read from L1 right after they are
    /// written, and the input's loads are spread over the filter's arithmetic.
    #[inline(always)]
    pub fn strip(&mut self, y0: usize, out: &mut [u8]) {
        let simd = self.taps.v3();
        let sse2 = simd.sse2;
        let (src, out_w) = (self.src, self.plan.out_w);
        let (in_row, out_row) = (self.in_w * 3, out_w * 3);
        let rows = STRIP.min(self.h - y0);
        assert_eq!(out.len(), rows * out_row, "horizontal: strip size");
        let zero = simd.avx._mm256_setzero_si256();
        let ring = self.cols.len();
        let mut slot = 0; // the next block's slot in the ring (a division per block is slow)
        let mut x = 0;
        // -- whole pairs of 16-byte blocks through the 256-bit transpose (block 2i in the low
        // lane, 2i + 1 in the high one), the rest (at most two blocks, the last maybe partial)
        // alone --
        let block_pairs = in_row / 32;
        for g2 in 0..block_pairs {
            // Each row's line PREFETCH_PAIRS block pairs ahead, once per 64-byte line: the
            // hardware prefetcher alone leaves the transposes waiting on a cold input.
            let ahead = 32 * (g2 + PREFETCH_PAIRS);
            if g2 % 2 == 0 && ahead < in_row {
                for r in 0..rows {
                    let p = src.as_ptr().wrapping_add((y0 + r) * in_row + ahead);
                    simd.sse._mm_prefetch::<_MM_HINT_T0>(p.cast());
                }
            }
            let mut blk = [zero; 16];
            for (r, v) in blk.iter_mut().enumerate().take(rows) {
                *v = load32(src, (y0 + r) * in_row + 32 * g2);
            }
            let (lo, hi) = self.cols[slot..slot + 32].split_at_mut(16);
            for ((d0, d1), v) in lo.iter_mut().zip(hi).zip(transpose16x2(simd, blk)) {
                [*d0, *d1] = cast::<__m256i, [[u8; 16]; 2]>(v);
            }
            slot = if slot + 32 == ring { 0 } else { slot + 32 };
            let done = 32 * (g2 + 1);
            while x < out_w && self.plan.need[x] <= done {
                self.filter_pixel(x);
                x += 1;
            }
        }
        for g in 2 * block_pairs..in_row.div_ceil(16) {
            let n = (in_row - 16 * g).min(16);
            let mut blk = [sse2._mm_setzero_si128(); 16];
            for (r, v) in blk.iter_mut().enumerate().take(rows) {
                let off = (y0 + r) * in_row + 16 * g;
                *v = if n == 16 {
                    load16(src, off)
                } else {
                    let mut b = [0u8; 16];
                    b[..n].copy_from_slice(&src[off..off + n]);
                    cast(b)
                };
            }
            for (d, v) in self.cols[slot..slot + 16]
                .iter_mut()
                .zip(transpose16(simd, blk))
            {
                *d = cast(v);
            }
            slot = if slot + 16 == ring { 0 } else { slot + 16 };
        }
        while x < out_w {
            self.filter_pixel(x);
            x += 1;
        }
        // -- transpose back into the strip's output rows (pairs of blocks as above) --
        let res = &self.res;
        let block_pairs = out_row / 32;
        for (g2, blk) in res[..block_pairs * 32].chunks_exact(32).enumerate() {
            let blk: [__m256i; 16] = core::array::from_fn(|i| cast([blk[i], blk[16 + i]]));
            for (r, v) in transpose16x2(simd, blk).into_iter().enumerate().take(rows) {
                let off = r * out_row + 32 * g2;
                out[off..off + 32].copy_from_slice(&cast::<__m256i, [u8; 32]>(v));
            }
        }
        for (g, blk) in res.chunks_exact(16).enumerate().skip(2 * block_pairs) {
            let n = (out_row - 16 * g).min(16);
            let blk: [__m128i; 16] = core::array::from_fn(|i| cast(blk[i]));
            for (r, v) in transpose16(simd, blk).into_iter().enumerate().take(rows) {
                let b: [u8; 16] = cast(v);
                let off = r * out_row + 16 * g;
                if n == 16 {
                    out[off..off + 16].copy_from_slice(&b);
                } else {
                    out[off..off + n].copy_from_slice(&b[..n]);
                }
            }
        }
    }

    /// The filter on the 3 byte columns of output pixel x, 16 rows each (its columns are in
    /// the ring), into `res`.
    #[inline(always)]
    fn filter_pixel(&mut self, x: usize) {
        let taps = self.taps;
        let simd = taps.v3();
        let (avx, avx2, sse2) = (simd.avx, simd.avx2, simd.sse2);
        let zero = avx._mm256_setzero_si256();
        let plan = self.plan;
        let half = avx._mm256_set1_epi32(1 << (plan.precision - 1));
        let shift = sse2._mm_cvtsi32_si128(plan.precision as i32);
        let cols = &self.cols;
        let flat: &[u8] = pulp::bytemuck::cast_slice(cols);
        // R and G of a pixel are adjacent ring slots, so one 32-byte load holds both (R in the
        // low lane): one byte unpack interleaves the two taps of both channels, and unpacks
        // with zero widen them, 3 in-lane shuffles per channel against 4 (two of them the
        // port-5-only `vpmovzxbw`) for B, which is done as before.
        let mut rg = [half; 4]; // rows 0-3, 4-7, 8-11, 12-15, each [R | G]
        let mut bb = [half; 2];
        for &(k0, k1, wp) in &plan.pairs[plan.ranges[x]..plan.ranges[x + 1]] {
            let wv = avx._mm256_set1_epi32(wp);
            // One bounds check per pixel's 3 columns; the loads inside are then unchecked.
            let a3: &[u8; 48] = flat[k0 as usize..k0 as usize + 48].try_into().expect("48");
            let b3: &[u8; 48] = flat[k1 as usize..k1 as usize + 48].try_into().expect("48");
            // [R | G] rows 0-3, 4-7, 8-11, 12-15
            madd_tap_pair(taps, &mut rg, load32(a3, 0), load32(b3, 0), wv);
            let a = avx2._mm256_cvtepu8_epi16(load16(a3, 32));
            let b = avx2._mm256_cvtepu8_epi16(load16(b3, 32));
            // lo: rows 0-3 | 8-11, hi: rows 4-7 | 12-15 (in-lane unpacks)
            bb[0] = taps.madd_add(bb[0], avx2._mm256_unpacklo_epi16(a, b), wv);
            bb[1] = taps.madd_add(bb[1], avx2._mm256_unpackhi_epi16(a, b), wv);
        }
        let slot = |c: usize| {
            if self.planar {
                c * plan.out_w + x
            } else {
                3 * x + c
            }
        };
        // [R rows 0-15 | G rows 0-15] as bytes: the packs undo the unpacks' row order.
        let [s0, s1, s2, s3] = rg.map(|a| avx2._mm256_sra_epi32(a, shift));
        let v = avx2._mm256_packus_epi16(
            avx2._mm256_packs_epi32(s0, s1),
            avx2._mm256_packs_epi32(s2, s3),
        );
        let (r, g): ([u8; 16], [u8; 16]) = (
            cast(avx._mm256_castsi256_si128(v)),
            cast(avx2._mm256_extracti128_si256::<1>(v)),
        );
        let v = avx2._mm256_packs_epi32(
            avx2._mm256_sra_epi32(bb[0], shift),
            avx2._mm256_sra_epi32(bb[1], shift),
        ); // rows 0-7 | 8-15 as i16
        let v = avx2._mm256_packus_epi16(v, zero);
        let v = sse2._mm_unpacklo_epi64(
            avx._mm256_castsi256_si128(v),
            avx2._mm256_extracti128_si256::<1>(v),
        );
        let (sr, sg, sb) = (slot(0), slot(1), slot(2));
        self.res[sr] = r;
        self.res[sg] = g;
        self.res[sb] = cast(v);
    }
}

/// Tap pairs of all outputs of `ax` (a lone last tap makes a pair).
fn pair_count(ax: &AxisWeights) -> usize {
    ax.len.iter().map(|n| n.div_ceil(2)).sum()
}

/// `v % ring` without a division, for values that move little from one call to the next (the
/// taps of consecutive outputs): `base` is a multiple of `ring` near the previous value. The
/// tables are built per image, and a division per tap pair was ~0.1 ms at 4032×3024.
fn modulo_near(v: usize, base: &mut usize, ring: usize) -> usize {
    while v < *base {
        *base -= ring;
    }
    while v - *base >= ring {
        *base += ring;
    }
    v - *base
}

/// Tap pairs of every output row of the vertical pass, as (offset of input row k, offset of
/// row k1, i16 weight pair) with rows `row_len` bytes apart; output row y's pairs are
/// `pairs[ranges[y]..ranges[y + 1]]`. A lone last tap pairs with itself at weight 0.
pub struct RowPairs {
    pairs: Vec<(usize, usize, i32)>,
    ranges: Vec<usize>,
}

impl RowPairs {
    /// Input row k lives at offset `(k % ring) · row_len` (`usize::MAX`: no ring).
    pub fn new(ax: &AxisWeights, w16: &[i16], row_len: usize, ring: usize) -> Self {
        let mut pairs = Vec::with_capacity(pair_count(ax));
        let mut ranges = Vec::with_capacity(ax.start.len() + 1);
        let mut base = 0;
        ranges.push(0);
        for (y, &s) in ax.start.iter().enumerate() {
            let taps = &w16[y * ax.stride..y * ax.stride + ax.len[y]];
            for (j, p) in taps.chunks(2).enumerate() {
                let (w0, w1) = (p[0], p.get(1).copied().unwrap_or(0));
                let k = s + 2 * j;
                let k1 = if p.len() == 2 { k + 1 } else { k };
                let wp = (i32::from(w1) << 16) | i32::from(w0 as u16);
                let r0 = modulo_near(k, &mut base, ring);
                let r1 = modulo_near(k1, &mut base, ring);
                pairs.push((r0 * row_len, r1 * row_len, wp));
            }
            ranges.push(pairs.len());
        }
        Self { pairs, ranges }
    }

    /// Output row y's tap pairs.
    #[inline(always)]
    pub fn row(&self, y: usize) -> &[(usize, usize, i32)] {
        &self.pairs[self.ranges[y]..self.ranges[y + 1]]
    }
}

/// The vertical filter on the 32 byte columns `col..col + 32` of one output row: four i32
/// vectors of `half + Σ w · x` holding columns `[0-3 | 16-19]`, `[4-7 | 20-23]`, `[8-11 | 24-27]`,
/// `[12-15 | 28-31]` (the order of the in-lane unpacks).
#[inline(always)]
fn vertical32<T: Taps>(
    taps: T,
    src: &[u8],
    col: usize,
    pairs: &[(usize, usize, i32)],
    half: __m256i,
) -> [__m256i; 4] {
    let [acc] = vertical_n::<T, 1>(taps, src, col, pairs, half);
    acc
}

/// [`vertical32`] on `N` consecutive 32-column chunks at once: each tap pair's weight
/// broadcast, table entries and bounds checks serve `N` chunks.
#[inline(always)]
fn vertical_n<T: Taps, const N: usize>(
    taps: T,
    src: &[u8],
    col: usize,
    pairs: &[(usize, usize, i32)],
    half: __m256i,
) -> [[__m256i; 4]; N] {
    let mut acc = [[half; 4]; N];
    for &(o0, o1, wp) in pairs {
        let wp = taps.v3().avx._mm256_set1_epi32(wp);
        let ra = &src[o0 + col..o0 + col + 32 * N];
        let rb = &src[o1 + col..o1 + col + 32 * N];
        for (j, acc) in acc.iter_mut().enumerate() {
            madd_tap_pair(taps, acc, load32(ra, 32 * j), load32(rb, 32 * j), wp);
        }
    }
    acc
}

/// Vertical pass: `src` is rows of `row_len` bytes; writes all of `out` (`ax.start.len()`
/// rows). Columns past the last full 32-byte chunk go through `tail` (the portable strip).
#[inline(always)]
pub fn vertical(
    simd: V3,
    src: &[u8],
    row_len: usize,
    ax: &AxisWeights,
    w16: &[i16],
    tail: impl Fn(&[u8], usize, usize, usize, &[i16], u32, &mut [u8]),
    out: &mut [u8],
) {
    assert_eq!(out.len(), ax.start.len() * row_len, "vertical: output size");
    let avx2 = simd.avx2;
    let half = simd.avx._mm256_set1_epi32(1 << (ax.precision - 1));
    let shift = simd.sse2._mm_cvtsi32_si128(ax.precision as i32);
    let full = row_len / 32 * 32;
    let pairs = RowPairs::new(ax, w16, row_len, usize::MAX);
    for (y, out_row) in out.chunks_exact_mut(row_len).enumerate() {
        let mut col = 0;
        while col < full {
            let [a0, a1, a2, a3] = vertical32(simd, src, col, pairs.row(y), half);
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
            let s = ax.start[y];
            let taps = &w16[y * ax.stride..y * ax.stride + ax.len[y]];
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
}

/// Per-channel constants of the fused normalisation (see `patchify.rs`): `x · scale + bias`
/// rounded to bf16, with `x = clamp(sum >> precision, 0, 255)` the uint8 value of the
/// resampler (`precision`: its fixed-point weights' fraction bits).
#[derive(Clone, Copy)]
pub struct Bf16Affine {
    pub precision: u32,
    pub scale: f32,
    pub bias: f32,
}

/// The bf16 bits (in the low half of each i32 lane) of `clamp(acc >> p, 0, 255) · scale +
/// bias`, rounded to nearest: `(b + 0x8000) >> 16` on the f32 bits b. That is round half up,
/// which equals round-to-nearest-even unless the low 16 bits are exactly 0x8000; no uint8 input
/// of any channel gives such a tie (`patchify::tests::fma_form_has_no_bf16_ties`, exhaustive).
#[inline(always)]
fn bf16_lanes(simd: V3, acc: __m256i, shift: __m128i, scale: __m256, bias: __m256) -> __m256i {
    let (avx, avx2) = (simd.avx, simd.avx2);
    let v = avx2._mm256_sra_epi32(acc, shift);
    let v = avx2._mm256_max_epi32(v, avx._mm256_setzero_si256());
    let v = avx2._mm256_min_epi32(v, avx._mm256_set1_epi32(255));
    let f = simd
        .fma
        ._mm256_fmadd_ps(avx._mm256_cvtepi32_ps(v), scale, bias);
    let b = avx2._mm256_add_epi32(avx._mm256_castps_si256(f), avx._mm256_set1_epi32(0x8000));
    avx2._mm256_srli_epi32::<16>(b)
}

/// Prefetches of a range of lines that will be written soon, spread over many calls of
/// [`Self::lines`] (a few lines each) so they never queue up on the fill buffers.
///
/// The fused path points it at each band's patches before filtering the band: the caller's
/// output buffer was zero-filled before the call, but by the time the band's patches are
/// written the horizontal pass's input has pushed it out of L2, and each store waited on a
/// read for ownership (the patch writes were ~0.3 ms at 1280×960, ~0.7 ms at 4032×3024; half of
/// that with the prefetches). `prefetcht0`: a line no other core holds is filled exclusive, so
/// the stores then need no further request; `prefetchw` needs the `prfchw` feature, which
/// pulp's V3 does not enable.
pub struct WritePrefetch {
    next: usize,
    end: usize,
    per_call: usize,
}

impl WritePrefetch {
    /// The lines of the addresses `bytes`, spread evenly over `calls` calls of [`Self::lines`].
    pub fn new(bytes: core::ops::Range<usize>, calls: usize) -> Self {
        let lines = (bytes.end - bytes.start).div_ceil(64);
        Self {
            next: bytes.start & !63,
            end: bytes.end,
            per_call: lines.div_ceil(calls.max(1)),
        }
    }

    /// The next few lines (an address is only a hint to the CPU: nothing is dereferenced).
    #[inline(always)]
    pub fn lines(&mut self, simd: V3) {
        for _ in 0..self.per_call {
            if self.next >= self.end {
                return;
            }
            simd.sse._mm_prefetch::<_MM_HINT_T0>(self.next as *const i8);
            self.next += 64;
        }
    }
}

/// One output row of one channel plane, straight to bf16: the vertical filter on byte columns
/// `col0..col0 + dst.len()` of the (planar) rows in `src`, clamped to uint8 as the resampler
/// does, then `x · scale + bias` (FMA) rounded to bf16, written to `dst`. Needs
/// `dst.len() >= 32`: the last 32 (or 64) columns are one chunk that may overlap the previous
/// one (recomputing the same values), so there is no scalar tail. Rows of 64 columns or more
/// go 64 at a time ([`vertical_n`]): one weight broadcast, table read and bounds check per tap
/// pair for both halves; stage -2 to -7 % at 4032×3024 and -3 % at 1280×960 (session 11,
/// second pass). Each chunk also issues `pf`'s next prefetches (see [`WritePrefetch`]).
#[inline(always)]
pub fn vertical_bf16_row<T: Taps>(
    taps: T,
    src: &[u8],
    col0: usize,
    pairs: &[(usize, usize, i32)],
    norm: Bf16Affine,
    dst: &mut [u16],
    pf: &mut WritePrefetch,
) {
    let simd = taps.v3();
    let avx = simd.avx;
    let width = dst.len();
    assert!(width >= 32, "vertical_bf16_row: at least 32 columns");
    let precision = norm.precision;
    let half = avx._mm256_set1_epi32(1 << (precision - 1));
    let shift = simd.sse2._mm_cvtsi32_si128(precision as i32);
    // 64 columns at a time where the row has them (the last chunk may overlap), else 32.
    let step = if width >= 64 { 64 } else { 32 };
    let mut col = 0;
    loop {
        let c = col.min(width - step);
        pf.lines(simd);
        if step == 64 {
            let [lo, hi] = vertical_n::<T, 2>(taps, src, col0 + c, pairs, half);
            store_bf16(simd, lo, shift, norm, &mut dst[c..c + 32]);
            store_bf16(simd, hi, shift, norm, &mut dst[c + 32..c + 64]);
        } else {
            let acc = vertical32(taps, src, col0 + c, pairs, half);
            store_bf16(simd, acc, shift, norm, &mut dst[c..c + 32]);
        }
        if c == width - step {
            break;
        }
        col += step;
    }
}

/// The 32 columns of [`vertical32`]'s sums as bf16 (see [`bf16_lanes`]) into `d`.
#[inline(always)]
fn store_bf16(
    simd: V3,
    [a0, a1, a2, a3]: [__m256i; 4],
    shift: __m128i,
    norm: Bf16Affine,
    d: &mut [u16],
) {
    let (avx, avx2) = (simd.avx, simd.avx2);
    let (scale, bias) = (
        avx._mm256_set1_ps(norm.scale),
        avx._mm256_set1_ps(norm.bias),
    );
    // Columns [0-7 | 16-23] and [8-15 | 24-31] as u16; each 128-bit half stored where it
    // belongs (cheaper than a cross-lane permute on Zen 1).
    let p01 = avx2._mm256_packus_epi32(
        bf16_lanes(simd, a0, shift, scale, bias),
        bf16_lanes(simd, a1, shift, scale, bias),
    );
    let p23 = avx2._mm256_packus_epi32(
        bf16_lanes(simd, a2, shift, scale, bias),
        bf16_lanes(simd, a3, shift, scale, bias),
    );
    let parts: [[u16; 8]; 4] = [
        cast(avx._mm256_castsi256_si128(p01)),
        cast(avx._mm256_castsi256_si128(p23)),
        cast(avx2._mm256_extracti128_si256::<1>(p01)),
        cast(avx2._mm256_extracti128_si256::<1>(p23)),
    ];
    for (d, p) in d.chunks_exact_mut(8).zip(&parts) {
        d.copy_from_slice(p);
    }
}
