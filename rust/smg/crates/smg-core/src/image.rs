//! `image`: decode, EXIF orientation, RGB conversion, M3 sizing, resize, normalize, patchify (bf16).
//!
//! The reference is what MiniMax-M3's processors compute from the same bytes:
//! `PIL.Image.open` → `ImageOps.exif_transpose` → `convert("RGB")` → then either
//! transformers 5.19's `MiniMaxM3VLImageProcessor` (torchvision backend: `smart_resize`, then
//! torch's uint8 antialiased bicubic) or, when `max_long_side_pixel` is set, SGLang 0.5.23's
//! `_resize_image_to_long_side` (Pillow bicubic) followed by the same processor with
//! `do_resize=False`. Every stage is integer-exact with that pipeline up to the uint8 resized
//! pixels; normalisation is the same float32 arithmetic, rounded to bf16 (round-to-nearest-even).
//!
//! Stages: [`decode`] (format sniffing, header-size guard, PIL-equal decode and RGB conversion),
//! [`exif`] (orientation), [`sizing`] (target size), [`resize`] (the two resamplers),
//! [`patchify`] (normalise + bf16 + merge-block-major flattening), [`fused`] (the torch
//! resampler streamed straight into normalise + patchify, what [`preprocess_image`] and
//! [`ResizedImage`] run where AVX2 is available).

// Prose names (SGLang, TurboJPEG, OpenAI) need no backticks; w/h/x/y/c are image math.
#![allow(clippy::doc_markdown, clippy::many_single_char_names)]

pub mod buffers;
pub mod decode;
pub mod exif;
pub mod fused;
pub mod patchify;
pub mod resize;
pub mod sizing;

use std::fmt;
use std::time::Instant;

pub use decode::{DecodedImage, ImageFormat};
pub use patchify::PATCH_DIM;

/// Options of one image's preprocessing. `Default` gives MiniMax-M3's values.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageOptions {
    /// Side multiple: patch size × merge size (14 × 2).
    pub factor: u32,
    /// Lower bound on resized pixels (transformers' `size["shortest_edge"]`).
    pub min_pixels: u64,
    /// Upper bound on resized pixels (transformers' `size["longest_edge"]`: 576 merged tokens).
    pub max_pixels: u64,
    /// Largest accepted `max(h, w) / min(h, w)`.
    pub max_aspect_ratio: f64,
    /// M3's per-image size option: long side capped to this (a multiple of `factor`,
    /// 112..=3584), resized with Pillow's bicubic as SGLang's processor does.
    pub max_long_side_pixel: Option<u32>,
    /// Decompression-bomb guard: width × height read from the header, checked before decoding.
    pub max_input_pixels: u64,
    /// Largest accepted encoded size.
    pub max_input_bytes: usize,
}

impl Default for ImageOptions {
    fn default() -> Self {
        Self {
            factor: 28,
            min_pixels: 3136,
            max_pixels: 451_584,
            max_aspect_ratio: 200.0,
            max_long_side_pixel: None,
            max_input_pixels: 64 * 1024 * 1024,
            max_input_bytes: 32 * 1024 * 1024,
        }
    }
}

/// Wall time of each stage, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageTimings {
    /// Header parse, decode, EXIF orientation and RGB conversion.
    pub decode_us: u64,
    /// Resampling to the target size (0 when the size is unchanged). When the torch
    /// resampler runs fused with normalise + patchify ([`fused`]), only the sizing: the
    /// resampling is then counted in `normalize_patchify_us`.
    pub resize_us: u64,
    /// Rescale + normalise + bf16 + patch flattening; with [`fused`], also the resampling (the
    /// sum of the two fields is always the whole resize + normalise + patchify).
    pub normalize_patchify_us: u64,
    /// The resampling ran fused with normalise + patchify: report the two as one stage
    /// (`resize_us` then holds only the sizing).
    pub resize_fused: bool,
}

/// The model-ready form of one image.
#[derive(Clone, Debug)]
pub struct PreprocessedImage {
    /// bf16 bit patterns, row-major `[num_patches, 1176]`; columns C → T → py → px.
    pub patches: Vec<u16>,
    /// Rows of `patches`: `grid_t * grid_h * grid_w`.
    pub num_patches: usize,
    /// `[t, h, w]` in 14-pixel patches (t is 1 for an image).
    pub grid_thw: [u32; 3],
    /// Hex SHA-256 content hash (see [`crate::hash`]).
    pub hash: String,
    /// Per-stage wall time.
    pub timings: StageTimings,
}

impl PreprocessedImage {
    /// `patches` as native-endian bytes, without a copy.
    pub fn patch_bytes(&self) -> &[u8] {
        pulp::bytemuck::cast_slice(&self.patches)
    }

    /// Placeholder tokens this image takes in the prompt: t·h·w / merge².
    pub fn num_image_tokens(&self) -> usize {
        let [t, h, w] = self.grid_thw;
        (t as usize * h as usize * w as usize) / 4
    }
}

/// Why an image was refused. `Display` says what the client can change.
#[derive(Clone, Debug, PartialEq)]
pub enum ImageError {
    /// Bytes are not a recognised image format.
    UnsupportedFormat(String),
    /// Bytes look like a supported format but cannot be decoded (truncated, corrupt).
    InvalidImage(String),
    /// Encoded size above `max_input_bytes`.
    TooManyBytes { bytes: usize, limit: usize },
    /// Header dimensions above `max_input_pixels` (checked before decoding).
    TooManyPixels { width: u64, height: u64, limit: u64 },
    /// `max(h, w) / min(h, w)` above `max_aspect_ratio`.
    AspectRatio {
        width: u32,
        height: u32,
        ratio: f64,
        limit: f64,
    },
    /// An option is out of its range (e.g. `max_long_side_pixel`).
    InvalidOption(String),
}

impl ImageError {
    /// Stable machine-readable code (OpenAI-style `error.code`).
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnsupportedFormat(_) => "unsupported_format",
            Self::InvalidImage(_) => "invalid_image",
            Self::TooManyBytes { .. } | Self::TooManyPixels { .. } => "image_too_large",
            Self::AspectRatio { .. } => "invalid_aspect_ratio",
            Self::InvalidOption(_) => "invalid_image_option",
        }
    }
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnsupportedFormat(what) => write!(
                f,
                "unsupported image format ({what}); send JPEG, PNG, WebP or GIF"
            ),
            Self::InvalidImage(why) => write!(f, "invalid image data: {why}"),
            Self::TooManyBytes { bytes, limit } => {
                write!(
                    f,
                    "image is {bytes} bytes, above the limit of {limit} bytes"
                )
            }
            Self::TooManyPixels {
                width,
                height,
                limit,
            } => write!(
                f,
                "image is {width}x{height} = {} pixels, above the limit of {limit} pixels",
                width * height
            ),
            Self::AspectRatio {
                width,
                height,
                ratio,
                limit,
            } => write!(
                f,
                "image is {width}x{height}: aspect ratio {ratio:.1} is above the limit of {limit}"
            ),
            Self::InvalidOption(why) => write!(f, "invalid image option: {why}"),
        }
    }
}

impl std::error::Error for ImageError {}

fn micros_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Decode (timed into `decode_us`) and the target `(width, height)`; the returned instant starts
/// the resize stage, sizing included.
fn decode_and_size(
    bytes: &[u8],
    opts: &ImageOptions,
) -> Result<(DecodedImage, (u32, u32), StageTimings, Instant), ImageError> {
    let mut timings = StageTimings::default();
    let t0 = Instant::now();
    let img = decode::decode_rgb(bytes, opts)?;
    timings.decode_us = micros_since(t0);
    let t1 = Instant::now();
    let (h, w) = sizing::target_size(img.height, img.width, opts)?;
    Ok((img, (w, h), timings, t1))
}

/// Resized uint8 RGB pixels (before normalisation) plus decode/resize timings: the stage that
/// parity tests compare bit for bit with the reference.
pub fn resize_for_model(
    bytes: &[u8],
    opts: &ImageOptions,
) -> Result<(DecodedImage, StageTimings), ImageError> {
    let (img, (w, h), mut timings, t1) = decode_and_size(bytes, opts)?;
    let out = resize_decoded(img, w, h, opts);
    timings.resize_us = micros_since(t1);
    Ok((out, timings))
}

/// `img` resized to `w × h` with the resampler `opts` selects (the decoded buffer goes back to
/// this thread's pool).
fn resize_decoded(img: DecodedImage, w: u32, h: u32, opts: &ImageOptions) -> DecodedImage {
    if (h, w) == (img.height, img.width) {
        return img;
    }
    let out = if opts.max_long_side_pixel.is_some() {
        resize::resize_pillow_bicubic(&img, w, h)
    } else {
        resize::resize_torch_bicubic_aa(&img, w, h)
    };
    buffers::give(img.rgb);
    out
}

/// One image decoded, sized (resized unless the fused path will do it) and hashed: everything
/// but normalise + patchify, which writes the output and so can go straight into a caller's
/// buffer ([`Self::patchify_into`]).
#[derive(Debug)]
pub struct ResizedImage {
    pixels: Pixels,
    /// Hex SHA-256 content hash (see [`crate::hash`]).
    pub hash: String,
    /// Decode and resize times (`normalize_patchify_us` is 0 until patchified).
    pub timings: StageTimings,
}

/// What the resize stage hands to normalise + patchify.
#[derive(Debug)]
enum Pixels {
    /// The model-size uint8 RGB image.
    Rgb(DecodedImage),
    /// The decoded image, to be resized to `width × height` by the torch resampler fused with
    /// normalise + patchify ([`fused`]).
    Fused {
        img: DecodedImage,
        width: u32,
        height: u32,
    },
}

impl ResizedImage {
    /// `[t, h, w]` in 14-pixel patches.
    pub fn grid_thw(&self) -> [u32; 3] {
        let (gh, gw) = match &self.pixels {
            Pixels::Rgb(img) => patchify::grid(img),
            Pixels::Fused { width, height, .. } => patchify::grid_of(*width, *height),
        };
        [1, gh, gw]
    }

    /// Rows of the patch matrix.
    pub fn num_patches(&self) -> usize {
        let [t, h, w] = self.grid_thw();
        t as usize * h as usize * w as usize
    }

    /// Normalise + patchify into `out` (native-endian bf16 bits, `num_patches · 1176 · 2`
    /// bytes); returns the stage timings. The pixel buffer goes back to this thread's pool.
    pub fn patchify_into(self, out: &mut [u8]) -> StageTimings {
        let mut timings = self.timings;
        let t = Instant::now();
        match self.pixels {
            Pixels::Rgb(img) => {
                patchify::normalize_patchify_into(&img, out);
                buffers::give(img.rgb);
            }
            Pixels::Fused { img, width, height } => {
                if fused::resize_normalize_patchify_into(&img, width, height, out).is_none() {
                    // Not reached (resize_and_hash checked fused::applies); the unfused path
                    // gives the same patches.
                    let resized = resize::resize_torch_bicubic_aa(&img, width, height);
                    patchify::normalize_patchify_into(&resized, out);
                    buffers::give(resized.rgb);
                }
                buffers::give(img.rgb);
            }
        }
        timings.normalize_patchify_us = micros_since(t);
        timings
    }

    /// Normalise + patchify into a new [`PreprocessedImage`].
    pub fn patchify(self) -> PreprocessedImage {
        let mut timings = self.timings;
        let t = Instant::now();
        let (patches, grid_h, grid_w) = match self.pixels {
            Pixels::Rgb(img) => {
                let out = patchify::normalize_patchify(&img);
                buffers::give(img.rgb);
                out
            }
            Pixels::Fused { img, width, height } => {
                let out =
                    fused::resize_normalize_patchify(&img, width, height).unwrap_or_else(|| {
                        // Not reached (see patchify_into).
                        let resized = resize::resize_torch_bicubic_aa(&img, width, height);
                        let out = patchify::normalize_patchify(&resized);
                        buffers::give(resized.rgb);
                        out
                    });
                buffers::give(img.rgb);
                out
            }
        };
        timings.normalize_patchify_us = micros_since(t);
        PreprocessedImage {
            num_patches: (grid_h * grid_w) as usize,
            patches,
            grid_thw: [1, grid_h, grid_w],
            hash: self.hash,
            timings,
        }
    }
}

/// Decode, orient, convert, size, resize and hash one image (see [`ResizedImage`]). Where the
/// torch resampler can run fused with normalise + patchify ([`fused::applies`]), the resize is
/// left to [`ResizedImage::patchify`] / [`ResizedImage::patchify_into`].
pub fn resize_and_hash(bytes: &[u8], opts: &ImageOptions) -> Result<ResizedImage, ImageError> {
    // The hash (of the encoded bytes) comes first, within the byte limit that decoding checks
    // first, so the decoded pixels are the last thing this thread touched when the resize
    // reads them, and the bytes are still in cache for the decoder. Hashed after decoding, a
    // 12-megapixel PNG's 20 MB of bytes pushed its pixels out of cache: the resize stage read
    // ~1.2 ms slower on the PNG's pixels than on the same-size JPEG's. (An image that then
    // fails to decode was hashed for nothing: at most `max_input_bytes`, like a valid one.)
    let hash = (bytes.len() <= opts.max_input_bytes).then(|| crate::hash::image_hash(bytes, opts));
    let (img, (w, h), mut timings, t1) = decode_and_size(bytes, opts)?;
    let pixels = if opts.max_long_side_pixel.is_none() && fused::applies(&img, w, h) {
        timings.resize_fused = true;
        Pixels::Fused {
            img,
            width: w,
            height: h,
        }
    } else {
        Pixels::Rgb(resize_decoded(img, w, h, opts))
    };
    timings.resize_us = micros_since(t1);
    Ok(ResizedImage {
        pixels,
        // Always hashed above: decoding refuses what is over the byte limit.
        hash: hash.unwrap_or_else(|| crate::hash::image_hash(bytes, opts)),
        timings,
    })
}

/// Decode, orient, convert, size, resize, normalise and patchify one image.
pub fn preprocess_image(
    bytes: &[u8],
    opts: &ImageOptions,
) -> Result<PreprocessedImage, ImageError> {
    Ok(resize_and_hash(bytes, opts)?.patchify())
}
