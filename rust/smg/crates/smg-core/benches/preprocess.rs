//! Criterion benches of the image stages on one thread: decode (JPEG), the torch-exact
//! antialiased bicubic resize to M3's `smart_resize` size, normalise + patchify, and the fused
//! resize + normalise + patchify that `preprocess` runs.
//!
//! `cargo bench -p smg-core --bench preprocess` (add `-- resize` to run one group).
//! Inputs are synthetic but photo-like (smooth gradients plus hashed noise) so JPEG decode does
//! real entropy work; 640×480, 1280×960 and 4032×3024 as in issue 3's benchmark table.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use smg_core::image::{decode, fused, patchify, resize, sizing, DecodedImage, ImageOptions};

#[path = "common/synthetic.rs"]
mod synthetic;
use synthetic::synthetic;

const SIZES: [(u32, u32); 3] = [(640, 480), (1280, 960), (4032, 3024)];

fn jpeg(img: &DecodedImage) -> Vec<u8> {
    let image = turbojpeg::Image {
        pixels: &img.rgb[..],
        width: img.width as usize,
        pitch: img.width as usize * 3,
        height: img.height as usize,
        format: turbojpeg::PixelFormat::RGB,
    };
    turbojpeg::compress(image, 90, turbojpeg::Subsamp::Sub2x2)
        .expect("jpeg encode")
        .to_vec()
}

fn label(w: u32, h: u32) -> String {
    format!("{w}x{h}")
}

fn bench_decode(c: &mut Criterion) {
    let opts = ImageOptions::default();
    let mut g = c.benchmark_group("decode_jpeg");
    g.sample_size(20);
    for (w, h) in SIZES {
        let bytes = jpeg(&synthetic(w, h));
        g.throughput(Throughput::Elements(u64::from(w) * u64::from(h)));
        g.bench_with_input(BenchmarkId::from_parameter(label(w, h)), &bytes, |b, bytes| {
            b.iter(|| decode::decode_rgb(black_box(bytes), &opts).expect("decode"));
        });
    }
    g.finish();
}

fn bench_resize(c: &mut Criterion) {
    let opts = ImageOptions::default();
    let mut g = c.benchmark_group("resize_torch_bicubic_aa");
    g.sample_size(20);
    for (w, h) in SIZES {
        let img = synthetic(w, h);
        let (oh, ow) = sizing::target_size(h, w, &opts).expect("size");
        g.throughput(Throughput::Elements(u64::from(w) * u64::from(h)));
        g.bench_with_input(BenchmarkId::from_parameter(label(w, h)), &img, |b, img| {
            b.iter(|| resize::resize_torch_bicubic_aa(black_box(img), ow, oh));
        });
    }
    g.finish();
}

/// The two passes of the torch resize on their own at 1280×960 → M3's size: horizontal only
/// (rows keep their count) and vertical only (on the horizontally resized width).
fn bench_resize_passes(c: &mut Criterion) {
    let opts = ImageOptions::default();
    let mut g = c.benchmark_group("resize_pass");
    g.sample_size(20);
    let (w, h) = (1280, 960);
    let (oh, ow) = sizing::target_size(h, w, &opts).expect("size");
    let img = synthetic(w, h);
    g.bench_function("horizontal_1280x960", |b| {
        b.iter(|| resize::resize_torch_bicubic_aa(black_box(&img), ow, h));
    });
    let narrow = synthetic(ow, h);
    g.bench_function("vertical_1280x960", |b| {
        b.iter(|| resize::resize_torch_bicubic_aa(black_box(&narrow), ow, oh));
    });
    g.finish();
}

fn bench_patchify(c: &mut Criterion) {
    let opts = ImageOptions::default();
    let mut g = c.benchmark_group("normalize_patchify");
    g.sample_size(30);
    for (w, h) in SIZES {
        let (oh, ow) = sizing::target_size(h, w, &opts).expect("size");
        let img = synthetic(ow, oh);
        g.throughput(Throughput::Elements(u64::from(ow) * u64::from(oh)));
        g.bench_with_input(BenchmarkId::from_parameter(label(w, h)), &img, |b, img| {
            b.iter(|| patchify::normalize_patchify(black_box(img)));
        });
    }
    g.finish();
}

/// Resize + normalise + patchify from the decoded image, as `preprocess` runs it: the fused
/// path (torch resampler streamed into normalise + patchify, `image::fused`).
fn bench_fused(c: &mut Criterion) {
    let opts = ImageOptions::default();
    let mut g = c.benchmark_group("resize_normalize_patchify_fused");
    g.sample_size(20);
    for (w, h) in SIZES {
        let (oh, ow) = sizing::target_size(h, w, &opts).expect("size");
        let img = synthetic(w, h);
        g.throughput(Throughput::Elements(u64::from(w) * u64::from(h)));
        g.bench_with_input(BenchmarkId::from_parameter(label(w, h)), &img, |b, img| {
            b.iter(|| fused::resize_normalize_patchify(black_box(img), ow, oh));
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_decode,
    bench_resize,
    bench_resize_passes,
    bench_patchify,
    bench_fused
);
criterion_main!(benches);
