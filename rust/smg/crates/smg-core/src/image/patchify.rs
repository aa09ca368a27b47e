//! Rescale + normalise (CLIP mean/std) + bf16 + flatten to `[N, 1176]` patches.
//!
//! transformers' torchvision backend fuses rescale into normalise: mean and std become float32
//! tensors multiplied by `1 / rescale_factor` (= 255.0 exactly), and each pixel is
//! `(float32(x) - mean') / std'` in float32. Only 256 inputs exist per channel, so a lookup
//! table of the bf16 (round-to-nearest-even) of that float32 value is exact.
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

/// Patches (bf16 bits, `[gh·gw, 1176]`) and the grid `(gh, gw)` of a resized image whose sides
/// are multiples of 28.
///
/// One band of 28 source rows (one merge-block row) at a time: the band is normalised once into
/// three bf16 channel planes (table lookups, L2-resident), then the band's output rows are
/// appended in order, so the output is written exactly once and never zero-filled first.
pub fn normalize_patchify(img: &DecodedImage) -> (Vec<u16>, u32, u32) {
    let (w, h) = (img.width as usize, img.height as usize);
    let (gh, gw) = (h / PATCH, w / PATCH);
    let (bh_n, bw_n) = (gh / MERGE, gw / MERGE);
    let table = lut();
    let band = MERGE * PATCH;
    let plane = PATCH * PATCH;
    let mut out: Vec<u16> = Vec::with_capacity(bh_n * MERGE * bw_n * MERGE * PATCH_DIM);
    // planes[c][yy * w + x] for the band's 28 rows.
    let mut planes = vec![vec![0u16; band * w]; 3];
    let mut row = [0u16; PATCH_DIM];
    for bh in 0..bh_n {
        let src = &img.rgb[bh * band * w * 3..(bh + 1) * band * w * 3];
        let [pr, pg, pb] = &mut planes[..] else {
            unreachable!("three planes")
        };
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
        for bw in 0..bw_n {
            for mh in 0..MERGE {
                for mw in 0..MERGE {
                    let x0 = (bw * MERGE + mw) * PATCH;
                    for (c, pc) in planes.iter().enumerate() {
                        let base = c * TEMPORAL * plane;
                        for py in 0..PATCH {
                            let o = (mh * PATCH + py) * w + x0;
                            let vals = &pc[o..o + PATCH];
                            let d = base + py * PATCH;
                            row[d..d + PATCH].copy_from_slice(vals);
                            row[d + plane..d + plane + PATCH].copy_from_slice(vals);
                        }
                    }
                    out.extend_from_slice(&row);
                }
            }
        }
    }
    (out, (bh_n * MERGE) as u32, (bw_n * MERGE) as u32)
}
