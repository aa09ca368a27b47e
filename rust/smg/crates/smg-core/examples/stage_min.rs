//! Min-of-N wall time of the image stages (robust on a shared box): `cargo run --release -p
//! smg-core --example stage_min`.
use std::time::Instant;

use smg_core::image::{patchify, resize, sizing, DecodedImage, ImageOptions};

fn synthetic(w: u32, h: u32) -> DecodedImage {
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
        rgb,
    }
}

fn min_ms<T>(n: usize, mut f: impl FnMut() -> T) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..n {
        let t = Instant::now();
        std::hint::black_box(f());
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
    }
    best
}

fn main() {
    let opts = ImageOptions::default();
    for (w, h) in [(640u32, 480u32), (1280, 960), (4032, 3024)] {
        let img = synthetic(w, h);
        let (oh, ow) = sizing::target_size(h, w, &opts).unwrap();
        let n = if w > 2000 { 15 } else { 60 };
        let full = min_ms(n, || resize::resize_torch_bicubic_aa(&img, ow, oh));
        let hor = min_ms(n, || resize::resize_torch_bicubic_aa(&img, ow, h));
        let narrow = synthetic(ow, h);
        let ver = min_ms(n, || resize::resize_torch_bicubic_aa(&narrow, ow, oh));
        let small = synthetic(ow, oh);
        let pat = min_ms(n, || patchify::normalize_patchify(&small));
        println!("{w}x{h} -> {ow}x{oh}: resize {full:.3} ms (h-only {hor:.3}, v-only {ver:.3}), normalize_patchify {pat:.3} ms");
    }
}
