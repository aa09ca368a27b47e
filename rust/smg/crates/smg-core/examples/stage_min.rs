//! Min-of-N wall time of the image stages (robust on a shared box): `cargo run --release -p
//! smg-core --example stage_min`.
//!
//! `stage_min pystage <w>x<h> <rounds>` times the stage the way the Python benchmark does (see
//! [`pystage`]); run it from two builds alternately for an A/B of a change.
//!
//! `stage_min <hpass|vpass|resize|patchify|fused|whole> <w>x<h> <iters>` runs one stage only, for CPU-time
//! counters that ignore time spent preempted: `perf stat -e task-clock target/release/examples/
//! stage_min hpass 1280x960 200` (task-clock / iters ≈ CPU ms per call, plus set-up).
use std::time::Instant;

use smg_core::image::{buffers, fused, patchify, resize, sizing, ImageOptions};

#[path = "../benches/common/synthetic.rs"]
mod synthetic;
use synthetic::synthetic;

fn min_ms<T>(n: usize, mut f: impl FnMut() -> T) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..n {
        let t = Instant::now();
        std::hint::black_box(f());
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
    }
    best
}

/// The synthetic test image as a quality-90 4:2:0 JPEG.
fn synthetic_jpeg(w: u32, h: u32) -> Vec<u8> {
    let full = synthetic(w, h);
    turbojpeg::compress(
        turbojpeg::Image {
            pixels: &full.rgb,
            width: w as usize,
            pitch: w as usize * 3,
            height: h as usize,
            format: turbojpeg::PixelFormat::RGB,
        },
        90,
        turbojpeg::Subsamp::Sub2x2,
    )
    .expect("jpeg encode")
    .to_vec()
}

/// One stage `iters` times (see the module docs).
fn one_stage(stage: &str, size: &str, iters: usize) {
    let opts = ImageOptions::default();
    let (w, h) = size.split_once('x').expect("<w>x<h>");
    let (w, h): (u32, u32) = (w.parse().expect("width"), h.parse().expect("height"));
    let (oh, ow) = sizing::target_size(h, w, &opts).unwrap();
    let img = match stage {
        "vpass" => synthetic(ow, h),
        "patchify" => synthetic(ow, oh),
        _ => synthetic(w, h),
    };
    let jpeg = synthetic_jpeg(w, h);
    let t = Instant::now();
    let mut runs = Vec::new();
    for _ in 0..iters {
        match stage {
            "whole" => {
                let t1 = Instant::now();
                let p = smg_core::image::preprocess_image(&jpeg, &opts).expect("preprocess");
                let total = t1.elapsed().as_secs_f64() * 1e3;
                let tm = p.timings;
                let ms = |us: u64| us as f64 / 1e3;
                runs.push([
                    total,
                    ms(tm.decode_us),
                    ms(tm.resize_us),
                    ms(tm.normalize_patchify_us),
                ]);
            }
            "hpass" => drop(std::hint::black_box(resize::resize_torch_bicubic_aa(&img, ow, h))),
            "vpass" | "resize" => {
                drop(std::hint::black_box(resize::resize_torch_bicubic_aa(&img, ow, oh)));
            }
            "patchify" => drop(std::hint::black_box(patchify::normalize_patchify(&img))),
            "fused" => drop(std::hint::black_box(fused::resize_normalize_patchify(&img, ow, oh))),
            _ => panic!("stage: hpass, vpass, resize, patchify, fused or whole"),
        }
    }
    let ms = t.elapsed().as_secs_f64() * 1e3 / iters as f64;
    println!("{stage} {w}x{h} -> {ow}x{oh}: {ms:.3} ms wall per call");
    if !runs.is_empty() {
        for (i, name) in ["total", "decode", "resize", "normalize_patchify"].iter().enumerate() {
            let mut v: Vec<f64> = runs.iter().map(|r| r[i]).collect();
            v.sort_by(f64::total_cmp);
            println!("  {name}: min {:.3} p50 {:.3} ms", v[0], v[v.len() / 2]);
        }
    }
}

/// `stage_min ab <w>x<h> <rounds>`: unfused (resize, then normalise + patchify), fused resize +
/// normalise + patchify into a `Vec`, and fused into a zero-filled byte buffer (what the
/// Python binding does) alternated call by call, so all see the same box load; prints min and p25.
fn ab(size: &str, rounds: usize) {
    let opts = ImageOptions::default();
    let (w, h) = size.split_once('x').expect("<w>x<h>");
    let (w, h): (u32, u32) = (w.parse().expect("width"), h.parse().expect("height"));
    let (oh, ow) = sizing::target_size(h, w, &opts).unwrap();
    let img = synthetic(w, h);
    let (gh, gw) = patchify::grid_of(ow, oh);
    let mut bytes = vec![0u8; gh as usize * gw as usize * smg_core::image::PATCH_DIM * 2];
    let (mut unfused, mut fused_vec, mut fused_into) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        // As the PyO3 binding: a zero-filled buffer, then the patches written into it.
        bytes.fill(0);
        fused_into.push(min_ms(1, || {
            fused::resize_normalize_patchify_into(&img, ow, oh, &mut bytes)
        }));
        unfused.push(min_ms(1, || {
            let resized = resize::resize_torch_bicubic_aa(&img, ow, oh);
            let patches = patchify::normalize_patchify(&resized);
            buffers::give(resized.rgb);
            patches
        }));
        fused_vec.push(min_ms(1, || fused::resize_normalize_patchify(&img, ow, oh)));
    }
    for (name, v) in [
        ("unfused", &mut unfused),
        ("fused", &mut fused_vec),
        ("fused_into", &mut fused_into),
    ] {
        v.sort_by(f64::total_cmp);
        println!("{name}: min {:.3} p25 {:.3} ms", v[0], v[v.len() / 4]);
    }
}

/// `stage_min pystage <w>x<h> <rounds>`: the resize + normalise + patchify stage as the Python
/// benchmark times it: before each call a fresh decode (`resize_and_hash`, so the decoded image
/// is as cold as a caller's) and a fresh zero-filled output (what the binding's
/// `PyByteArray::new_with` hands `patchify_into`); prints min / p25 / p50.
fn pystage(size: &str, rounds: usize) {
    let (w, h) = size.split_once('x').expect("<w>x<h>");
    let (w, h): (u32, u32) = (w.parse().expect("width"), h.parse().expect("height"));
    let runs = stage_runs(&synthetic_jpeg(w, h), rounds, &mut Vec::new());
    let q = |f: usize| runs[runs.len() * f / 4];
    println!(
        "pystage {w}x{h}: min {:.3} p25 {:.3} p50 {:.3} ms",
        runs[0],
        q(1),
        q(2)
    );
}

/// `stage_min pyfile <path> <rounds>`: [`pystage`] on an encoded image file (e.g. the Python
/// benchmark's own JPEG and PNG, written out), so both formats' pixels can be timed.
/// Also prints the whole call (decode, hash, output buffer and the stage).
fn pyfile(path: &str, rounds: usize) {
    let bytes = std::fs::read(path).expect("read the image file");
    let mut whole = Vec::with_capacity(rounds);
    let runs = stage_runs(&bytes, rounds, &mut whole);
    whole.sort_by(f64::total_cmp);
    let q = |v: &[f64], f: usize| v[v.len() * f / 4];
    println!(
        "pyfile {path}: min {:.3} p25 {:.3} p50 {:.3} ms (whole call p50 {:.3} ms)",
        runs[0],
        q(&runs, 1),
        q(&runs, 2),
        q(&whole, 2)
    );
}

/// The stage's wall times (ms, sorted) over `rounds` calls, each after a fresh decode + hash and
/// a fresh zero-filled output, as the Python binding runs it; each whole call's time is pushed
/// to `whole`.
fn stage_runs(bytes: &[u8], rounds: usize, whole: &mut Vec<f64>) -> Vec<f64> {
    let opts = ImageOptions::default();
    let mut runs = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t0 = Instant::now();
        let resized = smg_core::image::resize_and_hash(bytes, &opts).expect("decode");
        let n = resized.num_patches() * smg_core::image::PATCH_DIM * 2;
        // malloc + memset as PyByteArray::new_with does; `vec![0; n]` (calloc) could hand out
        // untouched zero pages and move their page faults into the timed call.
        #[allow(clippy::slow_vector_initialization)]
        let mut out: Vec<u8> = Vec::with_capacity(n);
        out.resize(n, 0);
        let t = Instant::now();
        std::hint::black_box(resized.patchify_into(&mut out));
        runs.push(t.elapsed().as_secs_f64() * 1e3);
        whole.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    runs.sort_by(f64::total_cmp);
    runs
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let [_, mode, size, rounds] = &args[..] {
        if mode == "ab" {
            return ab(size, rounds.parse().expect("rounds"));
        }
        if mode == "pystage" {
            return pystage(size, rounds.parse().expect("rounds"));
        }
        if mode == "pyfile" {
            return pyfile(size, rounds.parse().expect("rounds"));
        }
    }
    if let [_, stage, size, iters] = &args[..] {
        return one_stage(stage, size, iters.parse().expect("iters"));
    }
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
        // Resize + normalise + patchify end to end: unfused vs fused (what preprocess runs).
        let unfused = min_ms(n, || {
            let r = resize::resize_torch_bicubic_aa(&img, ow, oh);
            let p = patchify::normalize_patchify(&r);
            buffers::give(r.rgb); // as preprocess does
            p
        });
        let fused = min_ms(n, || fused::resize_normalize_patchify(&img, ow, oh));
        println!("  resize+normalize+patchify: unfused {unfused:.3} ms, fused {fused:.3} ms");
    }
}
