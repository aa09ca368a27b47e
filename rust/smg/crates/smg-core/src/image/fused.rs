//! The torch resampler fused with normalise + patchify (AVX2 + FMA, and AVX-VNNI where the CPU
//! has it), streaming in L2.
//!
//! Unfused, the horizontal pass writes a whole intermediate image (2.2 MB for 1280×960 →
//! 756×560), the vertical pass reads it back and writes the resized uint8 image, and
//! [`super::patchify`] reads that back, deinterleaves the channels and normalises them. Here:
//! - the horizontal pass runs one 16-row strip at a time into a ring of `ksize + 16` rows
//!   (rounded up to 16), refilled just before the output rows that need its next rows, so the
//!   intermediate never leaves L2;
//! - its rows are channel-planar (`[R × w | G × w | B × w]`, no extra cost: see
//!   `resize/avx2.rs`), so each 32-column chunk of the vertical pass holds one channel, and its
//!   i32 sums go straight to `clamp(sum >> p, 0, 255) · scale + bias` (the FMA form of
//!   `patchify.rs`, proven equal to the reference for every uint8) and bf16, into the band
//!   planes of 28 rows that `patchify::emit_band` writes out as patches, in place.
//!
//! The resized uint8 image is never stored.
//!
//! Speed (1280×960 → 756×560, min of interleaved runs on the Zen 1 dev box): 4.6-4.7 ms
//! against 5.2-5.35 ms for resize then normalise + patchify; about 2.8 ms of it is the
//! horizontal pass, 1.35 ms the vertical pass with the bf16 epilogue, 0.5 ms the patch writes.
//! Measured and not kept (within noise): writing the previous band's patches a few per row
//! while the next band is filtered, and filtering band-major (all rows of a column chunk in
//! turn, the band's input rows in L2).
//!
//! The arithmetic is the unfused one step for step (same i32 sums, the same clamp as the pack
//! to uint8, the same FMA, and a rounding equal to round-to-nearest-even on every input), so
//! the patches are bit-identical; `tests::fused_equals_unfused` checks that on odd sizes. It is
//! taken only with AVX2, both sides resized and an output at least 32 pixels wide ([`applies`]);
//! otherwise callers run the unfused path (also the reference here and in the parity tests).

use super::patchify::{self, PatchOut, PATCH_DIM};
use super::DecodedImage;

/// Whether the fused path handles `img → out_w × out_h`.
pub fn applies(img: &DecodedImage, out_w: u32, out_h: u32) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        pulp::x86::V3::try_new().is_some()
            && out_w != img.width
            && out_h != img.height
            && out_w >= 32
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (img, out_w, out_h);
        false
    }
}

/// torchvision's antialiased bicubic resize of `img` to `out_w × out_h`, then normalise +
/// patchify: patches (bf16 bits, `[gh·gw, 1176]`) and the grid, as
/// [`patchify::normalize_patchify`] of [`super::resize::resize_torch_bicubic_aa`] gives them;
/// `None` where the fused path does not apply.
pub fn resize_normalize_patchify(
    img: &DecodedImage,
    out_w: u32,
    out_h: u32,
) -> Option<(Vec<u16>, u32, u32)> {
    let (gh, gw) = patchify::grid_of(out_w, out_h);
    let mut out: Vec<u16> = Vec::with_capacity(gh as usize * gw as usize * PATCH_DIM);
    run(img, out_w, out_h, &mut out).then_some((out, gh, gw))
}

/// [`resize_normalize_patchify`] into a caller's buffer of native-endian bf16 bytes
/// (`gh · gw · 1176 · 2` bytes, see [`patchify::normalize_patchify_into`]). Returns the grid,
/// or `None` (nothing written) where the fused path does not apply.
pub fn resize_normalize_patchify_into(
    img: &DecodedImage,
    out_w: u32,
    out_h: u32,
    out: &mut [u8],
) -> Option<(u32, u32)> {
    if !applies(img, out_w, out_h) {
        return None;
    }
    let (gh, gw) = patchify::grid_of(out_w, out_h);
    let mut sink = patchify::PatchSink::new(out, gh, gw);
    let done = run(img, out_w, out_h, &mut sink);
    sink.finish();
    done.then_some((gh, gw))
}

/// Emits every patch in order; false (nothing emitted) where the fused path does not apply.
fn run(img: &DecodedImage, out_w: u32, out_h: u32, out: &mut impl PatchOut) -> bool {
    if !applies(img, out_w, out_h) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let simd = pulp::x86::V3::try_new().expect("applies() found AVX2");
        let op = x86::Fused {
            simd,
            img,
            width: out_w as usize,
            height: out_h as usize,
            out,
        };
        // AVX-VNNI's one-instruction multiply-accumulate in the tap loops where the CPU has
        // it (see resize/vnni.rs), else AVX2.
        match super::resize::vnni::V3Vnni::try_new() {
            Some(vnni) => vnni.vectorize(op),
            None => pulp::Simd::vectorize(simd, op),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = out;
        unreachable!("applies() is false off x86_64")
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The driver inside pulp's `#[target_feature]` entry point (see "Speed" in `resize.rs`:
    //! every kernel is `inline(always)`, no closures carry the features).
    #![allow(clippy::inline_always)]

    use pulp::x86::V3;

    use std::cell::RefCell;
    use std::rc::Rc;

    use super::super::patchify::{emit_band, fma_coefficients, PatchOut, MERGE, PATCH};
    use super::super::resize::avx2::{
        self, Bf16Affine, Horizontal, HorizontalPlan, RowPairs, Taps, WritePrefetch, STRIP,
    };
    use super::super::resize::torch_axis;
    use super::super::resize::vnni::WithTaps;
    use super::super::DecodedImage;

    /// The tap tables of one `in_w × in_h → w × h` size, and its ring of horizontal-pass rows.
    struct Tables {
        key: [usize; 4],
        hplan: HorizontalPlan,
        vpairs: RowPairs,
        ring: usize,
    }

    /// Sizes whose tables are kept per thread: a serving thread sees the same few camera
    /// resolutions again and again, and building the tables (with their allocations, which
    /// page-fault) was ~0.15 ms of a 4032×3024 image, ~0.04 ms of a 1280×960 one.
    const TABLES_KEPT: usize = 4;

    thread_local! {
        /// Most recently used first.
        static TABLES: RefCell<Vec<Rc<Tables>>> = const { RefCell::new(Vec::new()) };
        /// The ring of horizontal-pass rows and the band planes of the last image, reused
        /// (every byte is written before it is read).
        static SCRATCH: RefCell<(Vec<u8>, Vec<Vec<u16>>)> =
            const { RefCell::new((Vec::new(), Vec::new())) };
    }

    fn tables(key: [usize; 4], make: impl FnOnce() -> Tables) -> Rc<Tables> {
        TABLES.with(|cache| {
            let mut cache = cache.borrow_mut();
            if let Some(i) = cache.iter().position(|t| t.key == key) {
                let hit = cache.remove(i);
                cache.insert(0, hit);
            } else {
                cache.insert(0, Rc::new(make()));
                cache.truncate(TABLES_KEPT);
            }
            cache[0].clone()
        })
    }

    pub struct Fused<'a, O> {
        /// What pulp's entry (the AVX2 path) passes on as the [`Taps`].
        pub simd: V3,
        pub img: &'a DecodedImage,
        pub width: usize,
        pub height: usize,
        pub out: &'a mut O,
    }

    impl<O: PatchOut> pulp::WithSimd for Fused<'_, O> {
        type Output = bool;

        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _simd: S) -> bool {
            let v3 = self.simd;
            self.with_taps(v3)
        }
    }

    impl<O: PatchOut> WithTaps for Fused<'_, O> {
        type Output = bool;

        #[inline(always)]
        fn with_taps<T: Taps>(self, taps: T) -> bool {
            let Self {
                simd: _,
                img,
                width: w,
                height,
                out,
            } = self;
            let (in_w, in_h) = (img.width as usize, img.height as usize);
            let (hx, vy) = (torch_axis(in_w, w), torch_axis(in_h, height));
            let (Some(hw), Some(vw)) = (hx.w16.as_deref(), vy.w16.as_deref()) else {
                return false;
            };
            let (hx, vy) = (&hx.ax, &vy.ax);
            let row_len = 3 * w;
            let t = tables([in_w, in_h, w, height], || {
                // -- the ring of horizontal-pass rows: input row k in slot k % ring --
                // Output row y reads rows end - len[y] .. end (len[y] <= ksize). Filling the
                // strip a .. a + 16 that holds row end - 1 overwrites the slots of rows below
                // a + 16 - ring <= end + 15 - ring, so ring >= ksize + 16 keeps all of them.
                let ring = (vy.stride + STRIP).div_ceil(STRIP) * STRIP;
                Tables {
                    key: [in_w, in_h, w, height],
                    hplan: HorizontalPlan::new(in_w, hx, hw),
                    vpairs: RowPairs::new(vy, vw, row_len, ring),
                    ring,
                }
            });
            let (pairs, ring) = (&t.vpairs, t.ring);
            let mut hpass = Horizontal::new(taps, &img.rgb, in_h, &t.hplan, true);
            let (mut rows, mut planes) = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
            rows.resize(ring * row_len, 0);
            let mut filled = 0; // input rows through the horizontal pass so far
            let norm: [Bf16Affine; 3] = core::array::from_fn(|c| {
                let (scale, bias) = fma_coefficients(c);
                Bf16Affine {
                    precision: vy.precision,
                    scale,
                    bias,
                }
            });
            // planes[c][yy * w + x] for one band of 28 output rows, as in patchify.rs.
            let band = MERGE * PATCH;
            planes.resize_with(3, Vec::new);
            for plane in &mut planes {
                plane.resize(band * w, 0);
            }
            // The band's patches are prefetched over its vertical rows (a few lines per 64- or
            // 32-column chunk: 28 rows × 3 channels × chunks per row), see `WritePrefetch`.
            let patches = w / PATCH / MERGE * MERGE * MERGE;
            let chunks = band * 3 * if w >= 64 { w.div_ceil(64) } else { 1 };
            for bh in 0..height / band {
                let mut pf = WritePrefetch::new(out.upcoming(patches), chunks);
                for yy in 0..band {
                    let y = bh * band + yy;
                    let end = vy.start[y] + vy.len[y];
                    while filled < end {
                        let n = STRIP.min(in_h - filled);
                        let slot = filled % ring;
                        hpass.strip(filled, &mut rows[slot * row_len..(slot + n) * row_len]);
                        filled += n;
                    }
                    for (c, plane) in planes.iter_mut().enumerate() {
                        avx2::vertical_bf16_row(
                            taps,
                            &rows,
                            c * w,
                            pairs.row(y),
                            norm[c],
                            &mut plane[yy * w..(yy + 1) * w],
                            &mut pf,
                        );
                    }
                }
                emit_band(&planes, w, out);
            }
            SCRATCH.with(|s| *s.borrow_mut() = (rows, planes));
            true
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::image::resize::resize_torch_bicubic_aa;
    use crate::image::resize::tests::noise;

    /// `in_w, in_h, out_w, out_h`: see `fused_equals_unfused`.
    const CASES: [(u32, u32, u32, u32); 12] = [
        (1280, 960, 756, 560),
        (640, 480, 644, 476),
        (4032, 3024, 756, 560),
        (333, 1111, 168, 588),
        (100, 100, 56, 56),
        (57, 3000, 56, 2996),
        (3000, 40, 2996, 56),
        (1500, 7, 84, 28),
        (90, 90, 61, 59),
        (31, 45, 33, 30),
        (28, 28, 56, 56),
        (700, 2000, 112, 84),
    ];

    /// Fused patches equal resize → normalize_patchify bit for bit: down- and upscaling, sides
    /// not multiples of 32 (overlapping last chunk), partial merge blocks (rows and columns
    /// past the last whole 28 dropped), extreme ratios, large downscales (ring of 48 rows).
    #[test]
    fn fused_equals_unfused() {
        let cases = CASES;
        let mut fused_runs = 0;
        for (i, &(w, h, ow, oh)) in cases.iter().enumerate() {
            let img = noise(w, h, i as u64 + 7);
            let Some(fused) = resize_normalize_patchify(&img, ow, oh) else {
                continue;
            };
            fused_runs += 1;
            let want = patchify::normalize_patchify(&resize_torch_bicubic_aa(&img, ow, oh));
            assert_eq!(fused.1, want.1, "{w}x{h} -> {ow}x{oh}: grid h");
            assert_eq!(fused.2, want.2, "{w}x{h} -> {ow}x{oh}: grid w");
            assert!(fused.0 == want.0, "{w}x{h} -> {ow}x{oh}: patches differ");
            // The byte-buffer entry writes the same values, in place where the buffer is
            // 2-byte aligned and through the L1 patch buffer where it is not.
            let mut bytes = vec![0xA5u8; fused.0.len() * 2 + 1];
            for skip in [0, 1] {
                let dst = &mut bytes[skip..skip + fused.0.len() * 2];
                resize_normalize_patchify_into(&img, ow, oh, dst).expect("applies again");
                assert!(
                    *dst == *pulp::bytemuck::cast_slice::<u16, u8>(&want.0),
                    "{w}x{h} -> {ow}x{oh}: byte entry differs (offset {skip})"
                );
            }
        }
        if pulp::x86::V3::try_new().is_some() {
            assert_eq!(fused_runs, cases.len(), "the fused path ran on every case");
        }
    }

    /// The AVX-VNNI tap loops give the AVX2 ones' patches bit for bit (skipped without
    /// AVX-VNNI; `fused_equals_unfused` then runs the AVX2 path).
    #[test]
    fn vnni_and_avx2_give_the_same_patches() {
        use crate::image::resize::vnni::V3Vnni;
        let (Some(simd), Some(vnni)) = (pulp::x86::V3::try_new(), V3Vnni::try_new()) else {
            eprintln!("no AVX-VNNI here: skipped");
            return;
        };
        for (i, &(w, h, ow, oh)) in CASES.iter().enumerate() {
            let img = noise(w, h, i as u64 + 70);
            let (gh, gw) = patchify::grid_of(ow, oh);
            let run_with = |use_vnni: bool| {
                let n = gh as usize * gw as usize * PATCH_DIM;
                let mut out: Vec<u16> = Vec::with_capacity(n);
                let op = x86::Fused {
                    simd,
                    img: &img,
                    width: ow as usize,
                    height: oh as usize,
                    out: &mut out,
                };
                let done = if use_vnni {
                    vnni.vectorize(op)
                } else {
                    pulp::Simd::vectorize(simd, op)
                };
                assert!(done && out.len() == n, "{w}x{h} -> {ow}x{oh}: ran");
                out
            };
            assert!(run_with(true) == run_with(false), "{w}x{h} -> {ow}x{oh}");
        }
    }

    /// The per-thread tables and scratch buffers carry nothing from one image to the next:
    /// six sizes (more than the tables kept) twice over, a new image each time, equal the
    /// unfused path.
    #[test]
    fn reused_tables_and_scratch_give_the_same_patches() {
        let sizes = [
            (640, 480, 644, 476),
            (1280, 960, 756, 560),
            (333, 1111, 168, 588),
            (90, 90, 61, 59),
            (700, 2000, 112, 84),
            (1500, 7, 84, 28),
        ];
        for round in 0..2u64 {
            for (i, &(w, h, ow, oh)) in sizes.iter().enumerate() {
                let img = noise(w, h, 100 * round + i as u64);
                let got = resize_normalize_patchify(&img, ow, oh).expect("fused applies");
                let want = patchify::normalize_patchify(&resize_torch_bicubic_aa(&img, ow, oh));
                assert!(
                    got.0 == want.0,
                    "{w}x{h} -> {ow}x{oh}, round {round}: patches differ"
                );
            }
        }
    }

    /// The vertical pass takes rows 64 columns at a time from 64 columns up (32 below), the
    /// last chunk overlapping the one before: widths around both chunk sizes equal the unfused
    /// path.
    #[test]
    fn vertical_chunk_widths_equal_unfused() {
        for (i, ow) in [32u32, 33, 63, 64, 65, 95, 96, 127, 128, 129, 191]
            .into_iter()
            .enumerate()
        {
            let (w, h) = (ow * 2 + 3, 90);
            let img = noise(w, h, 300 + i as u64);
            let got = resize_normalize_patchify(&img, ow, 56).expect("fused applies");
            let want = patchify::normalize_patchify(&resize_torch_bicubic_aa(&img, ow, 56));
            assert!(got.0 == want.0, "{w}x{h} -> {ow}x56: patches differ");
        }
    }

    /// Sizes the fused path must refuse: a side unchanged, an output narrower than 32 pixels.
    #[test]
    fn refuses_what_it_cannot_do() {
        let img = noise(100, 80, 1);
        assert!(resize_normalize_patchify(&img, 100, 56).is_none());
        assert!(resize_normalize_patchify(&img, 56, 80).is_none());
        assert!(resize_normalize_patchify(&img, 28, 56).is_none());
    }
}
