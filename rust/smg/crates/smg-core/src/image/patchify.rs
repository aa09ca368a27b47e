//! Rescale + normalise (CLIP mean/std) + bf16 + flatten to `[N, 1176]` patches.
//!
//! transformers' torchvision backend fuses rescale into normalise: mean and std become float32
//! tensors multiplied by `1 / rescale_factor` (= 255.0 exactly), and each pixel is
//! `(float32(x) - mean') / std'` in float32. Only 256 inputs exist per channel, so a lookup
//! table of the bf16 (round-to-nearest-even) of that float32 value is exact (the portable path).
//! With AVX2 + FMA the value is computed instead, 8 lanes at a time, as the fused
//! `x · (1 / std') + (−mean' / std')` (both constants rounded to float32) then rounded to bf16:
//! not the same float32 as the division for every x, but the same bf16 for all 3 × 256 inputs,
//! which `tests::fma_form_equals_reference_for_every_input` checks exhaustively.
//!
//! Row order is the 2×2-merge-block-major order of the reference `patchify`: rows
//! `(bh, bw, mh, mw)`, columns `C → T → py → px` with the single frame repeated for T = 2.

use super::DecodedImage;

pub const PATCH: usize = 14;
pub const MERGE: usize = 2;
pub const TEMPORAL: usize = 2;
/// Columns per patch row: 3 channels × 2 frames × 14 × 14.
pub const PATCH_DIM: usize = 3 * TEMPORAL * PATCH * PATCH;

/// OpenAI CLIP normalisation constants (transformers' `OPENAI_CLIP_MEAN` / `_STD`).
#[allow(clippy::excessive_precision)] // digits as in transformers' constants
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_1];

/// float32 → bf16 bits, round to nearest even (torch's conversion for finite values).
pub fn f32_to_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// The normalised float32 value of uint8 `x` in channel `c`, as the reference computes it.
pub fn normalize_f32(x: u8, c: usize) -> f32 {
    let mean = CLIP_MEAN[c] * 255.0;
    let std = CLIP_STD[c] * 255.0;
    (f32::from(x) - mean) / std
}

fn lut() -> [[u16; 256]; 3] {
    let mut t = [[0u16; 256]; 3];
    for (c, row) in t.iter_mut().enumerate() {
        for (x, v) in row.iter_mut().enumerate() {
            *v = f32_to_bf16(normalize_f32(x as u8, c));
        }
    }
    t
}

/// Per-channel `(scale, bias)` of the fused form `x · scale + bias` (see the module docs).
pub(crate) fn fma_coefficients(c: usize) -> (f32, f32) {
    let mean = CLIP_MEAN[c] * 255.0;
    let std = CLIP_STD[c] * 255.0;
    (1.0 / std, -mean / std)
}

/// Normalise interleaved RGB `src` into the three bf16 planes (table lookups).
fn planes_lut(table: &[[u16; 256]; 3], src: &[u8], pr: &mut [u16], pg: &mut [u16], pb: &mut [u16]) {
    for (((px, r), g), b) in src
        .chunks_exact(3)
        .zip(pr.iter_mut())
        .zip(pg.iter_mut())
        .zip(pb.iter_mut())
    {
        *r = table[0][usize::from(px[0])];
        *g = table[1][usize::from(px[1])];
        *b = table[2][usize::from(px[2])];
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The plane fill with AVX2 + FMA (pulp's safe intrinsics): 16 pixels per step,
    //! deinterleaved with `pshufb`, widened to f32, one FMA, rounded to bf16 in integer lanes.
    #![allow(clippy::inline_always)] // compiled inside pulp's #[target_feature] entry point

    use core::arch::x86_64::{__m128i, __m256, __m256i};

    use pulp::bytemuck::cast;
    use pulp::x86::V3;

    /// `pshufb` masks taking channel c of 16 RGB pixels from the three 16-byte loads.
    #[allow(clippy::needless_range_loop)] // k picks both the output byte and the source byte
    fn masks() -> [[[i8; 16]; 3]; 3] {
        let mut m = [[[-128i8; 16]; 3]; 3];
        for (c, mc) in m.iter_mut().enumerate() {
            for k in 0..16 {
                let i = 3 * k + c;
                mc[i / 16][k] = (i % 16) as i8;
            }
        }
        m
    }

    /// bf16 bits (round to nearest even) of 8 f32 lanes, in the low 16 bits of i32 lanes.
    #[inline(always)]
    fn bf16_bits(simd: V3, v: __m256) -> __m256i {
        let avx2 = simd.avx2;
        let b = simd.avx._mm256_castps_si256(v);
        let odd = avx2._mm256_and_si256(
            avx2._mm256_srli_epi32::<16>(b),
            simd.avx._mm256_set1_epi32(1),
        );
        let r = avx2._mm256_add_epi32(
            b,
            avx2._mm256_add_epi32(odd, simd.avx._mm256_set1_epi32(0x7FFF)),
        );
        avx2._mm256_srli_epi32::<16>(r)
    }

    /// 16 u8 → 16 bf16 of `x · a + b`.
    #[inline(always)]
    fn channel16(simd: V3, v: __m128i, a: __m256, b: __m256) -> [u16; 16] {
        let (avx, avx2, fma) = (simd.avx, simd.avx2, simd.fma);
        let lo = avx._mm256_cvtepi32_ps(avx2._mm256_cvtepu8_epi32(v));
        let hi =
            avx._mm256_cvtepi32_ps(avx2._mm256_cvtepu8_epi32(simd.sse2._mm_srli_si128::<8>(v)));
        let lo = bf16_bits(simd, fma._mm256_fmadd_ps(lo, a, b));
        let hi = bf16_bits(simd, fma._mm256_fmadd_ps(hi, a, b));
        // packus is per 128-bit lane: [lo0-3 hi0-3 | lo4-7 hi4-7] → reorder the 64-bit quarters
        cast(avx2._mm256_permute4x64_epi64::<0b11_01_10_00>(avx2._mm256_packus_epi32(lo, hi)))
    }

    #[inline(always)]
    pub fn planes(
        simd: V3,
        table: &[[u16; 256]; 3],
        src: &[u8],
        pr: &mut [u16],
        pg: &mut [u16],
        pb: &mut [u16],
    ) {
        let m = masks();
        let coef: [(__m256, __m256); 3] = core::array::from_fn(|c| {
            let (a, b) = super::fma_coefficients(c);
            (cast([a; 8]), cast([b; 8]))
        });
        let full = src.len() / 48;
        for (i, px) in src.chunks_exact(48).enumerate() {
            let v: [__m128i; 3] = core::array::from_fn(|j| {
                let b: [u8; 16] = px[16 * j..16 * j + 16].try_into().expect("16 bytes");
                cast(b)
            });
            for (c, plane) in [&mut *pr, &mut *pg, &mut *pb].into_iter().enumerate() {
                let (ssse3, sse2) = (simd.ssse3, simd.sse2);
                let part = |j: usize| ssse3._mm_shuffle_epi8(v[j], cast(m[c][j]));
                let ch = sse2._mm_or_si128(sse2._mm_or_si128(part(0), part(1)), part(2));
                let out = channel16(simd, ch, coef[c].0, coef[c].1);
                plane[16 * i..16 * i + 16].copy_from_slice(&out);
            }
        }
        let d = full * 16;
        super::planes_lut(
            table,
            &src[d * 3..],
            &mut pr[d..],
            &mut pg[d..],
            &mut pb[d..],
        );
    }
}

/// Fills the bf16 planes with the best instruction set this CPU has.
struct FillPlanes<'a> {
    table: &'a [[u16; 256]; 3],
    src: &'a [u8],
    planes: &'a mut [Vec<u16>],
}

impl pulp::WithSimd for FillPlanes<'_> {
    type Output = ();

    #[allow(clippy::inline_always)] // carries the target features into the kernel
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let [pr, pg, pb] = self.planes else {
            unreachable!("three planes")
        };
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = pulp::x86::V3::try_new() {
            return avx2::planes(simd, self.table, self.src, pr, pg, pb);
        }
        planes_lut(self.table, self.src, pr, pg, pb);
    }
}

/// Patches (bf16 bits, `[gh·gw, 1176]`) and the grid `(gh, gw)` of a resized image whose sides
/// are multiples of 28.
pub fn normalize_patchify(img: &DecodedImage) -> (Vec<u16>, u32, u32) {
    let (gh, gw) = grid(img);
    let mut out: Vec<u16> = Vec::with_capacity(gh as usize * gw as usize * PATCH_DIM);
    patch_rows(img, &mut out);
    (out, gh, gw)
}

/// [`normalize_patchify`] into a caller's buffer of native-endian bf16 bytes (e.g. Python's
/// bytearray, so the patches are written once and never copied); `out` must be
/// `gh · gw · 1176 · 2` bytes. Returns the grid.
pub fn normalize_patchify_into(img: &DecodedImage, out: &mut [u8]) -> (u32, u32) {
    let (gh, gw) = grid(img);
    let mut sink = PatchSink::new(out, gh, gw);
    patch_rows(img, &mut sink);
    sink.finish();
    (gh, gw)
}

/// Patch grid `(gh, gw)` of a resized image: sides in 14-pixel patches, whole 2×2 merge blocks.
pub fn grid(img: &DecodedImage) -> (u32, u32) {
    grid_of(img.width, img.height)
}

/// Patch grid `(gh, gw)` of a `w × h` resized image (see [`grid`]).
pub fn grid_of(w: u32, h: u32) -> (u32, u32) {
    let (gh, gw) = (h as usize / PATCH, w as usize / PATCH);
    ((gh / MERGE * MERGE) as u32, (gw / MERGE * MERGE) as u32)
}

/// Where [`emit_band`] writes patches: each call of `next` hands out the next patch's
/// `[u16; 1176]` to fill in place.
pub(crate) trait PatchOut {
    fn next(&mut self) -> &mut [u16; PATCH_DIM];

    /// The addresses the next `n` patches will be written to (at most to the end of the
    /// output), for prefetching; never dereferenced.
    fn upcoming(&self, n: usize) -> core::ops::Range<usize>;
}

/// Appends to a `Vec` (reserved up front; each new patch is zero-filled in L1, then written).
impl PatchOut for Vec<u16> {
    fn upcoming(&self, n: usize) -> core::ops::Range<usize> {
        let start = self.as_ptr() as usize + 2 * self.len();
        let room = self.capacity() - self.len();
        start..start + 2 * room.min(n * PATCH_DIM)
    }

    fn next(&mut self) -> &mut [u16; PATCH_DIM] {
        let n = self.len();
        self.resize(n + PATCH_DIM, 0);
        (&mut self[n..]).try_into().expect("one patch")
    }
}

/// Writes whole patches, in order, straight into a caller's byte buffer of `gh · gw` patches
/// (through an L1 buffer only if the bytes are not 2-byte aligned).
pub(crate) struct PatchSink<'a> {
    out: core::slice::ChunksExactMut<'a, u8>,
    pending: Option<&'a mut [u8]>,
    buf: [u16; PATCH_DIM],
    /// Address of the next patch and the end of `out` (for [`PatchOut::upcoming`]).
    next_addr: usize,
    end_addr: usize,
}

impl<'a> PatchSink<'a> {
    pub(crate) fn new(out: &'a mut [u8], gh: u32, gw: u32) -> Self {
        assert_eq!(
            out.len(),
            gh as usize * gw as usize * PATCH_DIM * 2,
            "patch buffer size"
        );
        let next_addr = out.as_ptr() as usize;
        Self {
            next_addr,
            end_addr: next_addr + out.len(),
            out: out.chunks_exact_mut(PATCH_DIM * 2),
            pending: None,
            buf: [0; PATCH_DIM],
        }
    }

    /// Copies out the patch written into the L1 buffer (the unaligned case); call once at the end.
    pub(crate) fn finish(&mut self) {
        if let Some(dst) = self.pending.take() {
            dst.copy_from_slice(pulp::bytemuck::cast_slice(&self.buf));
        }
    }
}

impl PatchOut for PatchSink<'_> {
    fn upcoming(&self, n: usize) -> core::ops::Range<usize> {
        let start = self.next_addr;
        start..self.end_addr.min(start + n * PATCH_DIM * 2)
    }

    fn next(&mut self) -> &mut [u16; PATCH_DIM] {
        self.finish();
        self.next_addr += PATCH_DIM * 2;
        let dst = self.out.next().expect("patch buffer holds every patch");
        if pulp::bytemuck::try_cast_slice::<u8, u16>(dst).is_ok() {
            let dst: &mut [u16] = pulp::bytemuck::cast_slice_mut(dst);
            return dst.try_into().expect("one patch");
        }
        self.pending = Some(dst);
        &mut self.buf
    }
}

/// Writes the patches of one band of 28 rows (one merge-block row), in memory order, from its
/// three bf16 channel planes (`planes[c][yy * w + x]`) to `out`, each in place: columns
/// C → T → py → px, the frame repeated for T = 2.
pub(crate) fn emit_band(planes: &[Vec<u16>], w: usize, out: &mut impl PatchOut) {
    const FRAME: usize = PATCH * PATCH;
    for i in 0..w / PATCH / MERGE * MERGE * MERGE {
        // Patch i of the band is merge block bw = i / 4, sub-patch (mh, mw).
        let (bw, mh, mw) = (i / (MERGE * MERGE), i / MERGE % MERGE, i % MERGE);
        let x0 = (bw * MERGE + mw) * PATCH;
        let patch = out.next();
        for (pc, dst) in planes.iter().zip(patch.chunks_exact_mut(TEMPORAL * FRAME)) {
            let (first, rest) = dst.split_at_mut(FRAME);
            for (py, run) in first.chunks_exact_mut(PATCH).enumerate() {
                let o = (mh * PATCH + py) * w + x0;
                run.copy_from_slice(&pc[o..o + PATCH]);
            }
            for frame in rest.chunks_exact_mut(FRAME) {
                frame.copy_from_slice(first);
            }
        }
    }
}

/// Emits the patch matrix in memory order, one patch at a time.
///
/// One band of 28 source rows (one merge-block row) at a time: the band is normalised once into
/// three bf16 channel planes (L2-resident), then the band's patches are emitted in order, so
/// the output is written exactly once and never zero-filled first.
fn patch_rows(img: &DecodedImage, out: &mut impl PatchOut) {
    let (w, h) = (img.width as usize, img.height as usize);
    let bh_n = h / PATCH / MERGE;
    let table = lut();
    let band = MERGE * PATCH;
    // planes[c][yy * w + x] for the band's 28 rows.
    let mut planes = vec![vec![0u16; band * w]; 3];
    let arch = pulp::Arch::new();
    for bh in 0..bh_n {
        let src = &img.rgb[bh * band * w * 3..(bh + 1) * band * w * 3];
        arch.dispatch(FillPlanes {
            table: &table,
            src,
            planes: &mut planes,
        });
        emit_band(&planes, w, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused form rounds to the reference's bf16 for every channel and every uint8 input.
    #[test]
    fn fma_form_equals_reference_for_every_input() {
        for c in 0..3 {
            let (a, b) = fma_coefficients(c);
            for x in 0..=255u8 {
                let fused = f32_to_bf16(f32::from(x).mul_add(a, b));
                assert_eq!(
                    fused,
                    f32_to_bf16(normalize_f32(x, c)),
                    "channel {c}, x = {x}"
                );
            }
        }
    }

    /// No channel's FMA form lands exactly halfway between two bf16 values for any uint8
    /// input, so rounding half up (`(bits + 0x8000) >> 16`, what the fused kernel of
    /// `resize/avx2.rs` does) equals round-to-nearest-even on every input.
    #[test]
    fn fma_form_has_no_bf16_ties() {
        for c in 0..3 {
            let (a, b) = fma_coefficients(c);
            for x in 0..=255u8 {
                let bits = f32::from(x).mul_add(a, b).to_bits();
                assert_ne!(bits & 0xFFFF, 0x8000, "channel {c}, x = {x}: a tie");
                assert_eq!(
                    ((bits + 0x8000) >> 16) as u16,
                    f32_to_bf16(f32::from_bits(bits))
                );
            }
        }
    }

    /// The byte-buffer entry writes exactly the bytes of the `Vec` one.
    #[test]
    fn into_bytes_matches_vec() {
        let (w, h) = (84u32, 56u32);
        let rgb = (0..w * h * 3).map(|i| (i * 31 % 251) as u8).collect();
        let img = DecodedImage {
            width: w,
            height: h,
            rgb,
        };
        let (want, gh, gw) = normalize_patchify(&img);
        // In place (aligned) and through the L1 patch buffer (odd offset).
        let mut got = vec![0xAAu8; want.len() * 2 + 1];
        for skip in [0, 1] {
            let dst = &mut got[skip..skip + want.len() * 2];
            assert_eq!(normalize_patchify_into(&img, dst), (gh, gw));
            assert_eq!(*dst, *pulp::bytemuck::cast_slice::<u16, u8>(&want));
        }
    }

    /// Patch order against the reference's index formula, element by element: row
    /// `((bh · gw/2 + bw) · 2 + mh) · 2 + mw`, column `c · 392 + t · 196 + py · 14 + px`, on an
    /// image with a partial merge block on both sides (dropped).
    #[test]
    fn patch_order_matches_index_formula() {
        let (w, h) = (98u32, 71u32);
        let rgb: Vec<u8> = (0..w * h * 3).map(|i| (i * 37 % 253) as u8).collect();
        let img = DecodedImage {
            width: w,
            height: h,
            rgb: rgb.clone().into(),
        };
        let (got, gh, gw) = normalize_patchify(&img);
        assert_eq!((gh, gw), (4, 6));
        let (gh, gw) = (gh as usize, gw as usize);
        assert_eq!(got.len(), gh * gw * PATCH_DIM);
        let table = lut();
        for (bh, bw, mh, mw) in (0..gh / 2).flat_map(|bh| {
            (0..gw / 2).flat_map(move |bw| (0..4).map(move |m| (bh, bw, m / 2, m % 2)))
        }) {
            let row = ((bh * gw / 2 + bw) * 2 + mh) * 2 + mw;
            for (c, t, py, px) in (0..3).flat_map(|c| {
                (0..TEMPORAL).flat_map(move |t| {
                    (0..PATCH).flat_map(move |py| (0..PATCH).map(move |px| (c, t, py, px)))
                })
            }) {
                let (y, x) = ((bh * 2 + mh) * PATCH + py, (bw * 2 + mw) * PATCH + px);
                let v = rgb[(y * w as usize + x) * 3 + c];
                let col = c * 392 + t * 196 + py * PATCH + px;
                assert_eq!(got[row * PATCH_DIM + col], table[c][usize::from(v)]);
            }
        }
    }

    /// The dispatched (AVX2 where available) path equals the table on every value, including
    /// the tail pixels that are not a multiple of 16.
    #[test]
    fn simd_planes_match_table() {
        let table = lut();
        let n = 16 * 50 + 7;
        let src: Vec<u8> = (0..n * 3).map(|i| ((i * 97 + i / 7) % 256) as u8).collect();
        let mut planes = vec![vec![0u16; n]; 3];
        pulp::Arch::new().dispatch(FillPlanes {
            table: &table,
            src: &src,
            planes: &mut planes,
        });
        let mut want = vec![vec![0u16; n]; 3];
        let [r, g, b] = &mut want[..] else {
            unreachable!()
        };
        planes_lut(&table, &src, r, g, b);
        assert_eq!(planes, want);
    }
}
