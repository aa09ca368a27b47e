//! The two uint8 resamplers of the reference pipeline, integer-exact.
//!
//! Both are separable convolutions with Keys' cubic (a = −0.5), antialiased by widening the
//! kernel by the downscale factor, weights computed in f64 exactly as the reference does and
//! then quantised to fixed point; a horizontal pass into a uint8 buffer, then a vertical pass.
//! They differ only in the fixed-point precision:
//! - torch (`_upsample_bicubic2d_aa` on uint8, what torchvision's `resize(antialias=True)` runs
//!   on CPU; both its AVX2 kernel and its generic uint8 path use this arithmetic): the precision
//!   is the largest p < 22 with `round(max_weight · 2^(p+1)) < 2^15`, so weights fit int16.
//! - Pillow (`Image.resize(..., BICUBIC)`, `Resample.c`): fixed 22-bit precision.
//!
//! Each output sample is `clamp((2^(p−1) + Σ w_i · x_i) >> p, 0, 255)` with weights rounded half
//! away from zero, which is what both reference kernels compute (in any tap order: the sum is
//! exact in i32).

use super::buffers::{self, PixelBuf};
use super::DecodedImage;

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(super) mod vnni;
/// Keys' cubic convolution kernel with a = −0.5 (Pillow's `bicubic_filter`, torch's
/// `aa_filter` for bicubic), same operation order so the f64 results are identical.
fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point weights of one axis: output i reads inputs `start[i] .. start[i] + len[i]`
/// with weights `w[i * stride ..][.. len[i]]`.
#[derive(Clone, Debug)]
pub struct AxisWeights {
    pub start: Vec<usize>,
    pub len: Vec<usize>,
    pub stride: usize,
    pub w: Vec<i32>,
    pub precision: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// torch uint8 path: derived from the largest weight, int16 weights.
    TorchInt16,
    /// Pillow: fixed 22 bits.
    Pillow22,
}

/// Float weights for `in_size → out_size` as both references compute them (f64).
fn float_weights(in_size: usize, out_size: usize) -> (Vec<usize>, Vec<usize>, usize, Vec<f64>) {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = if scale >= 1.0 { scale } else { 1.0 };
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let invscale = 1.0 / filterscale;
    let mut start = Vec::with_capacity(out_size);
    let mut len = Vec::with_capacity(out_size);
    let mut w = vec![0.0f64; out_size * ksize];
    for i in 0..out_size {
        let center = scale * (i as f64 + 0.5);
        // Truncation toward zero, then clamp: C's `(int64_t)(x + 0.5)`.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let n = (xmax - xmin).clamp(0, ksize as i64) as usize;
        let xmin = xmin as usize;
        let row = &mut w[i * ksize..i * ksize + n];
        let mut total = 0.0;
        for (j, wj) in row.iter_mut().enumerate() {
            *wj = cubic(((j + xmin) as f64 - center + 0.5) * invscale);
            total += *wj;
        }
        if total != 0.0 {
            for wj in row.iter_mut() {
                *wj /= total;
            }
        }
        start.push(xmin);
        len.push(n);
    }
    (start, len, ksize, w)
}

/// Weights of one axis quantised as the chosen reference does.
pub fn axis_weights(in_size: usize, out_size: usize, precision: Precision) -> AxisWeights {
    let (start, len, stride, wf) = float_weights(in_size, out_size);
    let precision = match precision {
        Precision::Pillow22 => 22,
        Precision::TorchInt16 => {
            let wt_max = wf.iter().copied().fold(0.0f64, f64::max);
            let mut p = 0u32;
            while p < 22 {
                let next = (0.5 + wt_max * f64::from(1u32 << (p + 1))) as i32;
                if next >= (1 << 15) {
                    break;
                }
                p += 1;
            }
            p
        }
    };
    let scale = f64::from(1u32 << precision);
    let w = wf
        .iter()
        .map(|&x| {
            let v = x * scale;
            if v < 0.0 {
                (-0.5 + v) as i32
            } else {
                (0.5 + v) as i32
            }
        })
        .collect();
    AxisWeights {
        start,
        len,
        stride,
        w,
        precision,
    }
}

/// Torch weights of one axis with their i16 form, as the AVX2 kernels take them.
#[derive(Debug)]
pub(super) struct TorchAxis {
    pub ax: AxisWeights,
    /// `ax.w` narrowed to i16 (`None` if some weight does not fit, which torch's quantisation
    /// rules out).
    pub w16: Option<Vec<i16>>,
}

/// Axes kept per thread: a serving thread sees the same few (input, output) sizes again and
/// again (camera resolutions), and the f64 weights cost ~0.05 ms per axis at 1280 → 756.
const AXIS_CACHE: usize = 8;

/// `((in_size, out_size), axis)`, most recently used first.
type AxisCache = Vec<((usize, usize), std::rc::Rc<TorchAxis>)>;

thread_local! {
    static AXES: std::cell::RefCell<AxisCache> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`axis_weights`] for the torch resampler, from this thread's small cache (most recent first).
pub(super) fn torch_axis(in_size: usize, out_size: usize) -> std::rc::Rc<TorchAxis> {
    AXES.with(|cache| {
        let mut cache = cache.borrow_mut();
        let key = (in_size, out_size);
        if let Some(i) = cache.iter().position(|(k, _)| *k == key) {
            let hit = cache.remove(i);
            cache.insert(0, hit);
        } else {
            let ax = axis_weights(in_size, out_size, Precision::TorchInt16);
            let w16 = narrow(&ax);
            cache.insert(0, (key, std::rc::Rc::new(TorchAxis { ax, w16 })));
            cache.truncate(AXIS_CACHE);
        }
        cache[0].1.clone()
    })
}

/// Rows transposed together by the horizontal pass (16 rows × 3 channels = 48 lanes). With 8
/// rows (24 lanes) LLVM fully unrolls the lane loop before the loop vectoriser sees it and the
/// result stays scalar; 48 lanes stay a loop and become 6 AVX2 multiply-adds per tap.
const ROW_BLOCK: usize = 16;
const LANES: usize = ROW_BLOCK * 3;
/// Output bytes the vertical pass keeps in registers across all taps (4 AVX2 i32 vectors).
const V_CHUNK: usize = 32;

// Speed: every kernel below is plain safe Rust written so LLVM vectorises it (fixed-size lane
// arrays, accumulators that stay in registers across taps). `resize` runs them through
// `pulp::Arch::dispatch`, which enters a `#[target_feature(enable = "avx2,fma,...")]` function
// when the CPU has AVX2 (runtime check, the unsafe call lives inside pulp) and inlines the
// kernels there, so they are compiled twice: AVX2 and the SSE2 baseline. `inline(always)` is
// what carries the target features into the kernels; without it they stay SSE2.

/// Horizontal pass on interleaved RGB rows: `src` is `h × in_w × 3`, result `h × out_w × 3`.
///
/// Blocks of 16 rows are transposed to `[in_w][16 rows × 3 channels]` so the tap loop is a
/// fixed-width lane loop the compiler vectorises (no `unsafe`, no intrinsics). `W` is `i16` for
/// torch's int16 weights (16×16-bit products vectorise well) and `i32` for Pillow's 22-bit ones.
#[allow(clippy::inline_always)] // see "Speed" above
#[inline(always)]
fn horizontal<W: Copy + Into<i32>>(
    src: &[u8],
    h: usize,
    in_w: usize,
    ax: &AxisWeights,
    w: &[W],
) -> Vec<u8> {
    let out_w = ax.start.len();
    let mut out = vec![0u8; h * out_w * 3];
    let half = 1i32 << (ax.precision - 1);
    let p = ax.precision;
    // Pixels stay u8 in the transposed block: u8 × i16 products are what LLVM turns into
    // `vpmaddwd` (zero-extended lanes fit i16), twice the throughput of i32 `vpmulld`.
    let mut t = vec![[0u8; LANES]; in_w];
    let mut y0 = 0;
    while y0 < h {
        let rows = ROW_BLOCK.min(h - y0);
        for r in 0..rows {
            let row = &src[(y0 + r) * in_w * 3..(y0 + r + 1) * in_w * 3];
            for (tx, px) in t.iter_mut().zip(row.chunks_exact(3)) {
                tx[r * 3..r * 3 + 3].copy_from_slice(px);
            }
        }
        let out_block = &mut out[y0 * out_w * 3..(y0 + rows) * out_w * 3];
        for x in 0..out_w {
            let s = ax.start[x];
            let n = ax.len[x];
            let mut acc = [half; LANES];
            for (&wk, tk) in w[x * ax.stride..x * ax.stride + n].iter().zip(&t[s..s + n]) {
                let wk: i32 = wk.into();
                for (a, &v) in acc.iter_mut().zip(tk) {
                    *a += wk * i32::from(v);
                }
            }
            for (r, ar) in acc.chunks_exact(3).take(rows).enumerate() {
                let o = (r * out_w + x) * 3;
                for (dst, &a) in out_block[o..o + 3].iter_mut().zip(ar) {
                    *dst = (a >> p).clamp(0, 255) as u8;
                }
            }
        }
        y0 += rows;
    }
    out
}

/// One `V_CHUNK`-wide (or shorter, at the row end) column strip of one output row: the
/// accumulators stay in registers while the taps stream through the input rows.
#[allow(clippy::inline_always)] // see "Speed" above
#[inline(always)]
fn vertical_strip<W: Copy + Into<i32>, const N: usize>(
    src: &[u8],
    row_len: usize,
    col: usize,
    s: usize,
    taps: &[W],
    p: u32,
    dst: &mut [u8],
) {
    let width = dst.len();
    let mut acc = [1i32 << (p - 1); N];
    for (k, &wk) in taps.iter().enumerate() {
        let wk: i32 = wk.into();
        let off = (s + k) * row_len + col;
        let row = &src[off..off + width];
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += wk * i32::from(v);
        }
    }
    for (o, &a) in dst.iter_mut().zip(&acc) {
        *o = (a >> p).clamp(0, 255) as u8;
    }
}

/// Vertical pass: `src` is `in_h` rows of `row_len` bytes; result `out_h` rows.
#[allow(clippy::inline_always)] // see "Speed" above
#[inline(always)]
fn vertical<W: Copy + Into<i32>>(src: &[u8], row_len: usize, ax: &AxisWeights, w: &[W]) -> Vec<u8> {
    let out_h = ax.start.len();
    let mut out = vec![0u8; out_h * row_len];
    let p = ax.precision;
    for (y, out_row) in out.chunks_exact_mut(row_len).enumerate() {
        let s = ax.start[y];
        let taps = &w[y * ax.stride..y * ax.stride + ax.len[y]];
        let mut chunks = out_row.chunks_exact_mut(V_CHUNK);
        let mut col = 0;
        for dst in &mut chunks {
            vertical_strip::<W, V_CHUNK>(src, row_len, col, s, taps, p, dst);
            col += V_CHUNK;
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            vertical_strip::<W, V_CHUNK>(src, row_len, col, s, taps, p, rest);
        }
    }
    out
}

/// One pass with the weight width the precision allows.
#[allow(clippy::inline_always)] // see "Speed" above
#[inline(always)]
fn hpass(src: &[u8], h: usize, in_w: usize, ax: &AxisWeights) -> Vec<u8> {
    match narrow(ax) {
        Some(w16) => horizontal(src, h, in_w, ax, &w16),
        None => horizontal(src, h, in_w, ax, &ax.w),
    }
}

#[allow(clippy::inline_always)] // see "Speed" above
#[inline(always)]
fn vpass(src: &[u8], row_len: usize, ax: &AxisWeights) -> Vec<u8> {
    match narrow(ax) {
        Some(w16) => vertical(src, row_len, ax, &w16),
        None => vertical(src, row_len, ax, &ax.w),
    }
}

/// The weights as i16 when they all fit (always true for torch's int16 quantisation).
pub(super) fn narrow(ax: &AxisWeights) -> Option<Vec<i16>> {
    ax.w.iter().map(|&v| i16::try_from(v).ok()).collect()
}

/// Pillow 13 runs the vertical pass first when the image loses more than twice as many rows as
/// columns (`max(in_h - out_h, 0) > 2 * max(in_w - out_w, 0)`); older Pillow and torch always go
/// horizontal first. The rule was measured against Pillow 13.0 on dense grids of sizes (every
/// case matched exactly one order); the pass order changes the uint8 intermediate, hence pixels.
fn pillow_vertical_first(in_w: usize, in_h: usize, out_w: usize, out_h: usize) -> bool {
    in_h.saturating_sub(out_h) > 2 * in_w.saturating_sub(out_w)
}

#[allow(clippy::inline_always)] // see "Speed" above
#[inline(always)]
fn resize_impl(img: &DecodedImage, out_w: u32, out_h: u32, precision: Precision) -> DecodedImage {
    let (in_w, in_h) = (img.width as usize, img.height as usize);
    let (ow, oh) = (out_w as usize, out_h as usize);
    if precision == Precision::Pillow22
        && ow != in_w
        && oh != in_h
        && pillow_vertical_first(in_w, in_h, ow, oh)
    {
        let tmp = vpass(&img.rgb, in_w * 3, &axis_weights(in_h, oh, precision));
        let rgb = hpass(&tmp, oh, in_w, &axis_weights(in_w, ow, precision));
        return DecodedImage {
            width: out_w,
            height: out_h,
            rgb: rgb.into(),
        };
    }
    let mut rgb = if ow == in_w {
        img.rgb.to_vec()
    } else {
        hpass(&img.rgb, in_h, in_w, &axis_weights(in_w, ow, precision))
    };
    if oh != in_h {
        rgb = vpass(&rgb, ow * 3, &axis_weights(in_h, oh, precision));
    }
    DecodedImage {
        width: out_w,
        height: out_h,
        rgb: rgb.into(),
    }
}

/// `resize_impl` compiled for the best instruction set this CPU has (see "Speed" above).
struct Resize<'a> {
    img: &'a DecodedImage,
    out_w: u32,
    out_h: u32,
    precision: Precision,
}

impl pulp::WithSimd for Resize<'_> {
    type Output = DecodedImage;

    #[allow(clippy::inline_always)] // see "Speed" above
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> DecodedImage {
        resize_impl(self.img, self.out_w, self.out_h, self.precision)
    }
}

/// The torch resampler with the explicit AVX2 kernels of [`avx2`].
#[cfg(target_arch = "x86_64")]
struct ResizeTorchV3<'a> {
    simd: pulp::x86::V3,
    img: &'a DecodedImage,
    out_w: u32,
    out_h: u32,
}

#[cfg(target_arch = "x86_64")]
impl pulp::WithSimd for ResizeTorchV3<'_> {
    type Output = Option<DecodedImage>;

    #[allow(clippy::inline_always)] // see "Speed" above
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> Option<DecodedImage> {
        let Self {
            simd,
            img,
            out_w,
            out_h,
        } = self;
        let (in_w, in_h) = (img.width as usize, img.height as usize);
        let (ow, oh) = (out_w as usize, out_h as usize);
        let (hx, vy) = (torch_axis(in_w, ow), torch_axis(in_h, oh));
        let (hw, vw) = (hx.w16.as_deref()?, vy.w16.as_deref()?);
        let (hx, vy) = (&hx.ax, &vy.ax);
        // Both outputs come from the per-thread pool: every byte is written, no zeroing.
        let mut h_out = PixelBuf::default();
        let rows: &[u8] = if ow == in_w {
            &img.rgb
        } else {
            h_out = buffers::take(in_h * ow * 3);
            avx2::horizontal(simd, &img.rgb, in_h, in_w, hx, hw, &mut h_out);
            &h_out
        };
        let rgb = if oh == in_h {
            rows.to_vec().into()
        } else {
            let mut rgb = buffers::take(oh * ow * 3);
            let tail = vertical_strip::<i16, V_CHUNK>;
            avx2::vertical(simd, rows, ow * 3, vy, vw, tail, &mut rgb);
            rgb
        };
        buffers::give(h_out);
        Some(DecodedImage {
            width: out_w,
            height: out_h,
            rgb,
        })
    }
}

fn resize(img: &DecodedImage, out_w: u32, out_h: u32, precision: Precision) -> DecodedImage {
    #[cfg(target_arch = "x86_64")]
    if precision == Precision::TorchInt16 {
        if let Some(simd) = pulp::x86::V3::try_new() {
            let op = ResizeTorchV3 {
                simd,
                img,
                out_w,
                out_h,
            };
            if let Some(out) = pulp::Simd::vectorize(simd, op) {
                return out;
            }
        }
    }
    resize_portable(img, out_w, out_h, precision)
}

/// The portable kernels (LLVM-vectorised for the best ISA pulp finds); also the cross-check of
/// the AVX2 ones in the tests.
pub fn resize_portable(
    img: &DecodedImage,
    out_w: u32,
    out_h: u32,
    precision: Precision,
) -> DecodedImage {
    pulp::Arch::new().dispatch(Resize {
        img,
        out_w,
        out_h,
        precision,
    })
}

/// torchvision `resize(uint8, [h, w], BICUBIC, antialias=True)` on CPU.
pub fn resize_torch_bicubic_aa(img: &DecodedImage, out_w: u32, out_h: u32) -> DecodedImage {
    resize(img, out_w, out_h, Precision::TorchInt16)
}

/// Pillow `Image.resize((w, h), Resampling.BICUBIC)` on an RGB image.
pub fn resize_pillow_bicubic(img: &DecodedImage, out_w: u32, out_h: u32) -> DecodedImage {
    resize(img, out_w, out_h, Precision::Pillow22)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Seeded noise image for the resampler tests (here and in `fused.rs`).
    pub(crate) fn noise(w: u32, h: u32, seed: u64) -> DecodedImage {
        let mut s = seed.wrapping_mul(6_364_136_223_846_793_005) | 1;
        let rgb = (0..w as usize * h as usize * 3)
            .map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (s >> 56) as u8
            })
            .collect();
        DecodedImage {
            width: w,
            height: h,
            rgb,
        }
    }

    /// The dispatched (AVX2 where available) torch resampler equals the portable kernels on
    /// odd sizes, up- and downscaling, tiny images and partial last chunks.
    #[test]
    fn simd_matches_portable() {
        let cases = [
            (1, 1, 28, 28),
            (2, 3, 56, 28),
            (27, 29, 28, 28),
            (5, 400, 28, 224),
            (400, 5, 224, 28),
            (1280, 960, 756, 560),
            (641, 479, 644, 476),
            (333, 1111, 168, 588),
            (4032, 3024, 756, 560),
            (100, 100, 100, 56),
            (100, 100, 56, 100),
            (13, 3000, 28, 2996),
            (3000, 13, 28, 28),
            (1500, 7, 84, 28),
        ];
        for (i, &(w, h, ow, oh)) in cases.iter().enumerate() {
            let img = noise(w, h, i as u64);
            let fast = resize_torch_bicubic_aa(&img, ow, oh);
            let slow = resize_portable(&img, ow, oh, Precision::TorchInt16);
            assert_eq!(fast.rgb, slow.rgb, "{w}x{h} -> {ow}x{oh}");
        }
    }

    /// The AVX2 horizontal pass (its ring of transposed columns: windows of 5 to ~100 pixels,
    /// wrapping many times per strip; 0, 1 or 2 lone 16-column blocks, the last partial) equals
    /// the portable one on seeded random widths, with a partial last strip (17 rows).
    #[test]
    fn horizontal_matches_portable_random_widths() {
        let mut s = 0x5eed_u64;
        let mut next = |n: u64| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (s >> 33) % n
        };
        for i in 0..40 {
            let w = 1 + next(2500) as u32;
            let ow = if i % 4 == 0 {
                w + 1 + next(300) as u32 // upscale
            } else {
                (28 + next(u64::from(w.max(29)))) as u32 // mostly downscale
            };
            if ow == w {
                continue;
            }
            let img = noise(w, 17, 100 + i);
            let fast = resize_torch_bicubic_aa(&img, ow, 17);
            let slow = resize_portable(&img, ow, 17, Precision::TorchInt16);
            assert_eq!(fast.rgb, slow.rgb, "{w}x17 -> {ow}x17");
        }
    }
}
