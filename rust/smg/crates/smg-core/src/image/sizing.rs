//! Target size of the resized image, with the reference's float arithmetic.
//!
//! Python's `round` is round-half-to-even and `int / int` is a correctly rounded division;
//! for sides below 2^26 every product here is exact in f64, so `f64` ops reproduce Python bit
//! for bit (`round_ties_even`, IEEE division and `sqrt`).

use super::{ImageError, ImageOptions};

/// SGLang 0.5.23's bounds on `max_long_side_pixel` and on the pixels it may produce.
pub const MIN_LONG_SIDE_PIXEL: u32 = 112;
pub const MAX_LONG_SIDE_PIXEL: u32 = 3584;
pub const MIN_SHORT_SIDE: u32 = 112;
pub const MAX_LONG_SIDE_OUTPUT_PIXELS: u64 = 12_845_056;

fn check_aspect(height: u32, width: u32, limit: f64) -> Result<(), ImageError> {
    if height == 0 || width == 0 {
        return Err(ImageError::InvalidImage(format!(
            "image has a zero side ({width}x{height})"
        )));
    }
    let ratio = f64::from(height.max(width)) / f64::from(height.min(width));
    if ratio > limit {
        return Err(ImageError::AspectRatio {
            width,
            height,
            ratio,
            limit,
        });
    }
    Ok(())
}

/// transformers 5.19 `minimax_m3_vl.smart_resize`: both sides multiples of `factor`, pixels
/// within `[min_pixels, max_pixels]`, aspect kept as closely as possible. Returns `(h, w)`.
pub fn smart_resize(
    height: u32,
    width: u32,
    opts: &ImageOptions,
) -> Result<(u32, u32), ImageError> {
    check_aspect(height, width, opts.max_aspect_ratio)?;
    if opts.factor == 0 {
        return Err(ImageError::InvalidOption("factor must be positive".into()));
    }
    let f = f64::from(opts.factor);
    let (h, w) = (f64::from(height), f64::from(width));
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    let (min_p, max_p) = (opts.min_pixels as f64, opts.max_pixels as f64);
    if h_bar * w_bar > max_p {
        let beta = ((h * w) / max_p).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_p {
        let beta = (min_p / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    to_sides(h_bar, w_bar)
}

fn to_sides(h: f64, w: f64) -> Result<(u32, u32), ImageError> {
    if !(h >= 1.0 && w >= 1.0 && h <= f64::from(u32::MAX) && w <= f64::from(u32::MAX)) {
        return Err(ImageError::InvalidOption(format!(
            "size options give an invalid target {w}x{h}"
        )));
    }
    Ok((h as u32, w as u32))
}

/// SGLang 0.5.23 `_compute_aligned_size`: long side shrunk to the cap, else a short side below
/// 112 enlarged; each side rounded (half-even) to a multiple of `factor`, at least `factor`.
pub fn aligned_long_side(
    height: u32,
    width: u32,
    factor: u32,
    max_long_side_pixel: u32,
    max_aspect_ratio: f64,
) -> Result<(u32, u32), ImageError> {
    check_aspect(height, width, max_aspect_ratio)?;
    if factor == 0
        || !(MIN_LONG_SIDE_PIXEL..=MAX_LONG_SIDE_PIXEL).contains(&max_long_side_pixel)
        || !max_long_side_pixel.is_multiple_of(factor)
    {
        return Err(ImageError::InvalidOption(format!(
            "max_long_side_pixel must be a multiple of {factor} in \
             [{MIN_LONG_SIDE_PIXEL}, {MAX_LONG_SIDE_PIXEL}], got {max_long_side_pixel}"
        )));
    }
    let cap = f64::from(max_long_side_pixel - max_long_side_pixel % factor);
    let (h, w, f) = (f64::from(height), f64::from(width), f64::from(factor));
    let (long, short) = (h.max(w), h.min(w));
    let beta = if long > cap {
        cap / long
    } else if short < f64::from(MIN_SHORT_SIDE) {
        (f64::from(MIN_SHORT_SIDE) / short).min(cap / long)
    } else {
        1.0
    };
    let h_bar = f.max((h * beta / f).round_ties_even() * f);
    let w_bar = f.max((w * beta / f).round_ties_even() * f);
    let (oh, ow) = to_sides(h_bar, w_bar)?;
    if u64::from(oh) * u64::from(ow) > MAX_LONG_SIDE_OUTPUT_PIXELS {
        return Err(ImageError::InvalidOption(format!(
            "max_long_side_pixel gives {ow}x{oh}, above {MAX_LONG_SIDE_OUTPUT_PIXELS} pixels"
        )));
    }
    Ok((oh, ow))
}

/// The `(h, w)` this image is resized to under `opts`.
pub fn target_size(height: u32, width: u32, opts: &ImageOptions) -> Result<(u32, u32), ImageError> {
    match opts.max_long_side_pixel {
        Some(cap) => aligned_long_side(height, width, opts.factor, cap, opts.max_aspect_ratio),
        None => smart_resize(height, width, opts),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_known_values() {
        let o = ImageOptions::default();
        assert_eq!(smart_resize(960, 1280, &o).unwrap(), (560, 756));
        assert_eq!(smart_resize(1, 1, &o).unwrap(), (56, 56));
        assert_eq!(smart_resize(29, 27, &o).unwrap(), (84, 56));
        assert!(matches!(
            smart_resize(50, 10_001, &o),
            Err(ImageError::AspectRatio { .. })
        ));
        assert_eq!(
            smart_resize(50, 10_001, &o).unwrap_err().code(),
            "invalid_aspect_ratio"
        );
    }

    #[test]
    fn long_side_known_values() {
        assert_eq!(
            aligned_long_side(960, 1280, 28, 1008, 200.0).unwrap(),
            (756, 1008)
        );
        assert!(aligned_long_side(960, 1280, 28, 1000, 200.0).is_err());
    }
}
