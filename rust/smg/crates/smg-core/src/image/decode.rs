//! Decode to 8-bit RGB exactly as `PIL.Image.open(...)` + `exif_transpose` + `convert("RGB")`.
//!
//! - JPEG: libjpeg-turbo 3.1 built from source through the `turbojpeg` crate. PIL's wheels ship
//!   libjpeg-turbo 3.x and decode with the library defaults (accurate integer IDCT, fancy
//!   upsampling, library YCbCr→RGB), which is what TurboJPEG's defaults select too, so pixels
//!   are identical. Pure-Rust decoders (zune-jpeg, jpeg-decoder) use other IDCT/upsampling
//!   arithmetic and differ by ±1..2 on most pixels, which SMG's issue #1604 tied to accuracy loss.
//! - PNG (`png` crate, no transformations): lossless, then PIL's mode rules are applied by hand
//!   (16-bit RGB(A) keeps the high byte; 16-bit gray is PIL's "I;16", whose RGB conversion
//!   saturates at 255; 1/2/4-bit gray scale to 0..255; palette looked up; alpha dropped).
//! - WebP (`image-webp`): VP8 decoding is normative and the crate's default "fancy" chroma
//!   upsampling reproduces libwebp's; VP8L is lossless.
//! - GIF (`gif`): first frame on a canvas of the logical screen filled with the transparent
//!   index (else 0), as PIL's first frame; palette lookup.
//!
//! Dimensions are read from the header and checked against `max_input_pixels` before any
//! pixel buffer is allocated.

use std::io::Cursor;

use super::buffers::PixelBuf;
use super::{exif, ImageError, ImageOptions};

/// 8-bit interleaved RGB, row-major, `width * height * 3` bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedImage {
    pub width: u32,
    pub height: u32,
    /// A `Vec` or, for large images, a huge-page mapping from the pool (see `buffers`).
    pub rgb: PixelBuf,
}

/// Container formats recognised from magic bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    Jpeg,
    Png,
    WebP,
    Gif,
}

/// Recognise the format from magic bytes; names common unsupported formats in the error.
pub fn sniff(bytes: &[u8]) -> Result<ImageFormat, ImageError> {
    let unsupported = |name: &str| Err(ImageError::UnsupportedFormat(name.to_string()));
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Ok(ImageFormat::Jpeg)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Ok(ImageFormat::Png)
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Ok(ImageFormat::Gif)
    } else if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Ok(ImageFormat::WebP)
    } else if bytes.starts_with(b"BM") {
        unsupported("BMP")
    } else if bytes.starts_with(b"II*\0") || bytes.starts_with(b"MM\0*") {
        unsupported("TIFF")
    } else if bytes.len() >= 12 && &bytes[4..8] == b"ftyp" {
        unsupported("HEIF/AVIF")
    } else if bytes.is_empty() {
        Err(ImageError::InvalidImage("empty image data".into()))
    } else {
        unsupported("unrecognised bytes")
    }
}

fn check_pixels(width: u64, height: u64, opts: &ImageOptions) -> Result<(), ImageError> {
    if width == 0 || height == 0 {
        return Err(ImageError::InvalidImage(format!(
            "image has a zero side ({width}x{height})"
        )));
    }
    if width.saturating_mul(height) > opts.max_input_pixels {
        return Err(ImageError::TooManyPixels {
            width,
            height,
            limit: opts.max_input_pixels,
        });
    }
    Ok(())
}

fn invalid(what: &str, e: impl std::fmt::Display) -> ImageError {
    ImageError::InvalidImage(format!("{what}: {e}"))
}

/// Decode any supported format to RGB with EXIF orientation applied.
pub fn decode_rgb(bytes: &[u8], opts: &ImageOptions) -> Result<DecodedImage, ImageError> {
    if bytes.len() > opts.max_input_bytes {
        return Err(ImageError::TooManyBytes {
            bytes: bytes.len(),
            limit: opts.max_input_bytes,
        });
    }
    let (img, orientation) = match sniff(bytes)? {
        ImageFormat::Jpeg => decode_jpeg(bytes, opts)?,
        ImageFormat::Png => decode_png(bytes, opts)?,
        ImageFormat::WebP => decode_webp(bytes, opts)?,
        ImageFormat::Gif => (decode_gif(bytes, opts)?, 1),
    };
    Ok(exif::apply(img, orientation))
}

// -- JPEG ------------------------------------------------------------------------------------

/// First APP1 `Exif\0\0` segment (PIL keeps the first), scanning markers up to start-of-scan.
fn jpeg_exif(bytes: &[u8]) -> Option<&[u8]> {
    let mut i = 2;
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            return None;
        }
        let marker = bytes[i + 1];
        if marker == 0xFF {
            i += 1;
            continue;
        }
        if marker == 0xDA || marker == 0xD9 {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]));
        let seg = bytes.get(i + 4..(i + 2 + len).max(i + 4))?;
        if marker == 0xE1 && seg.starts_with(b"Exif\0\0") {
            return Some(seg);
        }
        i += 2 + len;
    }
    None
}

fn decode_jpeg(bytes: &[u8], opts: &ImageOptions) -> Result<(DecodedImage, u16), ImageError> {
    let mut dec = turbojpeg::Decompressor::new().map_err(|e| invalid("JPEG decoder", e))?;
    let header = dec
        .read_header(bytes)
        .map_err(|e| invalid("JPEG header", e))?;
    check_pixels(header.width as u64, header.height as u64, opts)?;
    match header.colorspace {
        turbojpeg::Colorspace::CMYK | turbojpeg::Colorspace::YCCK => {
            return Err(ImageError::UnsupportedFormat("CMYK JPEG".into()));
        }
        _ => {}
    }
    let (w, h) = (header.width, header.height);
    // From the per-thread pool (see `buffers`): the decoder writes every byte.
    let mut rgb = super::buffers::take(w * h * 3);
    let out = turbojpeg::Image {
        pixels: &mut rgb[..],
        width: w,
        pitch: w * 3,
        height: h,
        format: turbojpeg::PixelFormat::RGB,
    };
    dec.decompress(bytes, out)
        .map_err(|e| invalid("JPEG data", e))?;
    let orientation = jpeg_exif(bytes).map_or(1, exif::orientation);
    Ok((
        DecodedImage {
            width: w as u32,
            height: h as u32,
            rgb,
        },
        orientation,
    ))
}

// -- PNG -------------------------------------------------------------------------------------

fn decode_png(bytes: &[u8], opts: &ImageOptions) -> Result<(DecodedImage, u16), ImageError> {
    let mut decoder = png::Decoder::new(Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::IDENTITY);
    decoder.set_ignore_text_chunk(true);
    let hdr = decoder
        .read_header_info()
        .map_err(|e| invalid("PNG header", e))?;
    check_pixels(u64::from(hdr.width), u64::from(hdr.height), opts)?;
    let mut reader = decoder.read_info().map_err(|e| invalid("PNG", e))?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| ImageError::InvalidImage("PNG: image too large".into()))?;
    let (w, h, rgb) = if reader.output_color_type() == (png::ColorType::Rgb, png::BitDepth::Eight) {
        // 8-bit RGB rows are already what convert_png_row would write: decode straight into
        // the pooled output (next_frame writes every byte of a frame), no second buffer or copy
        let mut rgb = super::buffers::take(size);
        let frame = reader
            .next_frame(&mut rgb)
            .map_err(|e| invalid("PNG data", e))?;
        let (w, h) = (frame.width as usize, frame.height as usize);
        if frame.line_size != w * 3 || w * h * 3 != size {
            return Err(ImageError::InvalidImage(
                "PNG: unexpected RGB row layout".into(),
            ));
        }
        (w, h, rgb)
    } else {
        let mut raw = vec![0u8; size];
        let frame = reader
            .next_frame(&mut raw)
            .map_err(|e| invalid("PNG data", e))?;
        let (w, h) = (frame.width as usize, frame.height as usize);
        let line = frame.line_size;
        // From the per-thread pool (see `buffers`): convert_png_row writes every pixel of every row.
        let mut rgb = super::buffers::take(w * h * 3);
        let depth = frame.bit_depth as u8;
        let palette = reader.info().palette.as_deref();
        for y in 0..h {
            let row = &raw[y * line..(y + 1) * line];
            let out = &mut rgb[y * w * 3..(y + 1) * w * 3];
            convert_png_row(row, out, w, frame.color_type, depth, palette)?;
        }
        (w, h, rgb)
    };
    let orientation = reader
        .info()
        .exif_metadata
        .as_deref()
        .map_or(1, exif::orientation);
    Ok((
        DecodedImage {
            width: w as u32,
            height: h as u32,
            rgb,
        },
        orientation,
    ))
}

/// Sample `x` of a row packed at `depth` bits (1, 2, 4) per sample, MSB first.
fn packed(row: &[u8], x: usize, depth: u8) -> u8 {
    let per_byte = 8 / usize::from(depth);
    let byte = row[x / per_byte];
    let shift = 8 - depth as usize * (x % per_byte + 1);
    (byte >> shift) & ((1u8 << depth) - 1)
}

fn convert_png_row(
    row: &[u8],
    out: &mut [u8],
    w: usize,
    color: png::ColorType,
    depth: u8,
    palette: Option<&[u8]>,
) -> Result<(), ImageError> {
    use png::ColorType as C;
    let put = |out: &mut [u8], x: usize, r: u8, g: u8, b: u8| {
        out[3 * x] = r;
        out[3 * x + 1] = g;
        out[3 * x + 2] = b;
    };
    // Bytes per sample: 16-bit samples are big-endian; PIL keeps the high byte for RGB(A)/LA.
    let bps = if depth == 16 { 2 } else { 1 };
    match color {
        C::Grayscale => {
            for x in 0..w {
                let v = match depth {
                    // "1" → RGB: 0/255. "L;2" / "L;4" unpack by scaling to 0..255.
                    1 | 2 | 4 => packed(row, x, depth) * (255 / ((1u8 << depth) - 1)),
                    8 => row[x],
                    // "I;16" → RGB saturates: values above 255 become 255.
                    _ => {
                        let v = u16::from_be_bytes([row[2 * x], row[2 * x + 1]]);
                        u8::try_from(v).unwrap_or(255)
                    }
                };
                put(out, x, v, v, v);
            }
        }
        C::GrayscaleAlpha => {
            for x in 0..w {
                let v = row[2 * bps * x];
                put(out, x, v, v, v);
            }
        }
        C::Rgb => {
            for x in 0..w {
                let p = 3 * bps * x;
                put(out, x, row[p], row[p + bps], row[p + 2 * bps]);
            }
        }
        C::Rgba => {
            for x in 0..w {
                let p = 4 * bps * x;
                put(out, x, row[p], row[p + bps], row[p + 2 * bps]);
            }
        }
        C::Indexed => {
            let pal = palette.ok_or_else(|| {
                ImageError::InvalidImage("PNG: palette image without PLTE".into())
            })?;
            for x in 0..w {
                let i = if depth == 8 {
                    row[x]
                } else {
                    packed(row, x, depth)
                };
                let (r, g, b) = palette_entry(pal, i);
                put(out, x, r, g, b);
            }
        }
    }
    Ok(())
}

/// PIL palettes start as a gray ramp (entry i = (i, i, i)) and the file's colours overwrite
/// the first entries; an index past the stored colours keeps its ramp value.
fn palette_entry(pal: &[u8], i: u8) -> (u8, u8, u8) {
    let p = 3 * usize::from(i);
    match pal.get(p..p + 3) {
        Some(c) => (c[0], c[1], c[2]),
        None => (i, i, i),
    }
}

// -- WebP ------------------------------------------------------------------------------------

fn decode_webp(bytes: &[u8], opts: &ImageOptions) -> Result<(DecodedImage, u16), ImageError> {
    let mut dec =
        image_webp::WebPDecoder::new(Cursor::new(bytes)).map_err(|e| invalid("WebP", e))?;
    let (w, h) = dec.dimensions();
    check_pixels(u64::from(w), u64::from(h), opts)?;
    let size = dec
        .output_buffer_size()
        .ok_or_else(|| ImageError::InvalidImage("WebP: image too large".into()))?;
    let mut buf = vec![0u8; size];
    dec.read_image(&mut buf)
        .map_err(|e| invalid("WebP data", e))?;
    let (w, h) = (w as usize, h as usize);
    let rgb = if dec.has_alpha() {
        let mut rgb = Vec::with_capacity(w * h * 3);
        for px in buf.chunks_exact(4) {
            rgb.extend_from_slice(&px[..3]);
        }
        rgb
    } else {
        buf
    }
    .into();
    let orientation = dec
        .exif_metadata()
        .ok()
        .flatten()
        .map_or(1, |b| exif::orientation(&b));
    Ok((
        DecodedImage {
            width: w as u32,
            height: h as u32,
            rgb,
        },
        orientation,
    ))
}

// -- GIF -------------------------------------------------------------------------------------

fn decode_gif(bytes: &[u8], opts: &ImageOptions) -> Result<DecodedImage, ImageError> {
    let mut o = gif::DecodeOptions::new();
    o.set_color_output(gif::ColorOutput::Indexed);
    let mut dec = o
        .read_info(Cursor::new(bytes))
        .map_err(|e| invalid("GIF", e))?;
    let (sw, sh) = (usize::from(dec.width()), usize::from(dec.height()));
    check_pixels(sw as u64, sh as u64, opts)?;
    let global = dec.global_palette().map(<[u8]>::to_vec);
    let frame = dec
        .read_next_frame()
        .map_err(|e| invalid("GIF data", e))?
        .ok_or_else(|| ImageError::InvalidImage("GIF has no frames".into()))?;
    let pal: Vec<u8> = frame.palette.clone().or(global).unwrap_or_default();
    let mut idx = vec![frame.transparent.unwrap_or(0); sw * sh];
    let (fl, ft) = (usize::from(frame.left), usize::from(frame.top));
    let (fw, fh) = (usize::from(frame.width), usize::from(frame.height));
    for y in 0..fh.min(sh.saturating_sub(ft)) {
        let cols = fw.min(sw.saturating_sub(fl));
        let src = &frame.buffer[y * fw..y * fw + cols];
        idx[(ft + y) * sw + fl..(ft + y) * sw + fl + cols].copy_from_slice(src);
    }
    let mut rgb = Vec::with_capacity(sw * sh * 3);
    for &i in &idx {
        let (r, g, b) = palette_entry(&pal, i);
        rgb.extend_from_slice(&[r, g, b]);
    }
    Ok(DecodedImage {
        width: sw as u32,
        height: sh as u32,
        rgb: rgb.into(),
    })
}
