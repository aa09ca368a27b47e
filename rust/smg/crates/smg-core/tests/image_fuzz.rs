//! Bounded property test: random and mutated bytes through decode + preprocess never panic,
//! and every success is a well-formed tensor. Runs for a fixed number of cases (< 2 s).

use smg_core::image::{preprocess_image, ImageError, ImageOptions, PATCH_DIM};

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn png_bytes(
    w: u32,
    h: u32,
    color: png::ColorType,
    depth: png::BitDepth,
    rng: &mut Rng,
) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(color);
        enc.set_depth(depth);
        if color == png::ColorType::Indexed {
            enc.set_palette((0..768).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>());
        }
        let mut writer = enc.write_header().unwrap();
        let bits = match depth {
            png::BitDepth::One => 1,
            png::BitDepth::Two => 2,
            png::BitDepth::Four => 4,
            png::BitDepth::Eight => 8,
            png::BitDepth::Sixteen => 16,
        };
        let line = (w as usize * color.samples() * bits).div_ceil(8);
        let data: Vec<u8> = (0..line * h as usize).map(|_| rng.next() as u8).collect();
        writer.write_image_data(&data).unwrap();
    }
    out
}

fn jpeg_bytes(w: usize, h: usize, rng: &mut Rng) -> Vec<u8> {
    let pixels: Vec<u8> = (0..w * h * 3)
        .map(|i| ((i / 3 % w) * 3 + (rng.next() % 40) as usize) as u8)
        .collect();
    let img = turbojpeg::Image {
        pixels: pixels.as_slice(),
        width: w,
        pitch: w * 3,
        height: h,
        format: turbojpeg::PixelFormat::RGB,
    };
    turbojpeg::compress(img, 85, turbojpeg::Subsamp::Sub2x2)
        .unwrap()
        .to_vec()
}

fn check(bytes: &[u8], opts: &ImageOptions) {
    match preprocess_image(bytes, opts) {
        Ok(p) => {
            assert_eq!(p.patches.len(), p.num_patches * PATCH_DIM);
            assert_eq!(p.num_patches, (p.grid_thw[1] * p.grid_thw[2]) as usize);
            assert_eq!(p.grid_thw[1] % 2, 0);
            assert_eq!(p.hash.len(), 64);
        }
        Err(e) => {
            // Every error has a code and a message a client can read.
            assert!(!e.code().is_empty());
            assert!(!e.to_string().is_empty());
        }
    }
}

#[test]
fn random_and_mutated_inputs_never_panic() {
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let opts = ImageOptions::default();
    let seeds = vec![
        png_bytes(37, 23, png::ColorType::Rgb, png::BitDepth::Eight, &mut rng),
        png_bytes(
            16,
            40,
            png::ColorType::Indexed,
            png::BitDepth::Four,
            &mut rng,
        ),
        png_bytes(
            30,
            30,
            png::ColorType::GrayscaleAlpha,
            png::BitDepth::Sixteen,
            &mut rng,
        ),
        png_bytes(
            9,
            70,
            png::ColorType::Grayscale,
            png::BitDepth::One,
            &mut rng,
        ),
        jpeg_bytes(48, 32, &mut rng),
        jpeg_bytes(17, 65, &mut rng),
    ];
    for s in &seeds {
        assert!(preprocess_image(s, &opts).is_ok(), "seed image must decode");
    }
    for case in 0..400 {
        let mut b = seeds[case % seeds.len()].clone();
        match case % 4 {
            0 => {
                for _ in 0..=rng.below(8) {
                    let i = rng.below(b.len());
                    b[i] = rng.next() as u8;
                }
            }
            1 => b.truncate(rng.below(b.len())),
            2 => {
                let i = rng.below(b.len());
                let extra: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
                b.splice(i..i, extra);
            }
            _ => {
                let keep = rng.below(16).min(b.len());
                b.truncate(keep);
                b.extend((0..rng.below(256)).map(|_| rng.next() as u8));
            }
        }
        check(&b, &opts);
    }
}

#[test]
fn header_bomb_is_refused_before_decode() {
    let mut rng = Rng(7);
    let png = png_bytes(
        300,
        300,
        png::ColorType::Rgb,
        png::BitDepth::Eight,
        &mut rng,
    );
    let opts = ImageOptions {
        max_input_pixels: 10_000,
        ..ImageOptions::default()
    };
    let err = preprocess_image(&png, &opts).unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::TooManyPixels {
                width: 300,
                height: 300,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.code(), "image_too_large");
}

#[test]
fn aspect_ratio_limit() {
    let mut rng = Rng(9);
    let wide = png_bytes(
        2011,
        10,
        png::ColorType::Grayscale,
        png::BitDepth::Eight,
        &mut rng,
    );
    let err = preprocess_image(&wide, &ImageOptions::default()).unwrap_err();
    assert_eq!(err.code(), "invalid_aspect_ratio");
    assert!(err.to_string().contains("2011x10"), "{err}");
}
