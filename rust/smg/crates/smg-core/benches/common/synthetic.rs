//! The photo-like synthetic image the criterion benches (`benches/preprocess.rs`) and the
//! `stage_min` example time: smooth gradients plus hashed noise, so JPEG decode does real entropy
//! work. Included by both with `#[path]` (a file directly in `benches/` would be a bench target).

use smg_core::image::DecodedImage;

pub fn synthetic(w: u32, h: u32) -> DecodedImage {
    let mut rgb = Vec::with_capacity(w as usize * h as usize * 3);
    for y in 0..h {
        for x in 0..w {
            let n = (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503)).rotate_left(7);
            let noise = (n >> 27) as u8;
            rgb.push(((x * 255 / w) as u8).wrapping_add(noise));
            rgb.push(((y * 255 / h) as u8).wrapping_add(noise / 2));
            rgb.push((((x + y) * 127 / (w + h)) as u8).wrapping_add(noise));
        }
    }
    DecodedImage {
        width: w,
        height: h,
        rgb: rgb.into(),
    }
}
