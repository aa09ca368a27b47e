//! EXIF orientation (tag 0x0112), applied as `PIL.ImageOps.exif_transpose` does.

use super::DecodedImage;

/// Orientation from a TIFF-structured EXIF blob (the payload after `Exif\0\0`, or a PNG
/// `eXIf` / WebP `EXIF` chunk, which may also carry the `Exif\0\0` prefix). 1 when absent or
/// unreadable: a broken EXIF block never fails the image (PIL ignores it too).
pub fn orientation(blob: &[u8]) -> u16 {
    let tiff = blob.strip_prefix(b"Exif\0\0").unwrap_or(blob);
    read_orientation(tiff).unwrap_or(1)
}

fn read_orientation(t: &[u8]) -> Option<u16> {
    let le = match t.get(0..2)? {
        b"II" => true,
        b"MM" => false,
        _ => return None,
    };
    let u16_at = |o: usize| -> Option<u16> {
        let b: [u8; 2] = t.get(o..o + 2)?.try_into().ok()?;
        Some(if le {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        })
    };
    let u32_at = |o: usize| -> Option<u32> {
        let b: [u8; 4] = t.get(o..o + 4)?.try_into().ok()?;
        Some(if le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    };
    if u16_at(2)? != 42 {
        return None;
    }
    let ifd = u32_at(4)? as usize;
    let count = u16_at(ifd)? as usize;
    for i in 0..count {
        let e = ifd.checked_add(2 + 12 * i)?;
        if u16_at(e)? == 0x0112 {
            // SHORT (type 3), count 1: the value sits in the first 2 bytes of the value field.
            return match u16_at(e + 2)? {
                3 => u16_at(e + 8),
                4 => u32_at(e + 8).and_then(|v| u16::try_from(v).ok()),
                _ => None,
            };
        }
    }
    None
}

/// Apply orientation `o` (2..=8; anything else is a no-op) to an RGB image.
pub fn apply(img: DecodedImage, o: u16) -> DecodedImage {
    if !(2..=8).contains(&o) {
        return img;
    }
    let (w, h) = (img.width as usize, img.height as usize);
    // Orientations 5..=8 swap the sides; map each output pixel to its source pixel.
    let swap = o >= 5;
    let (ow, oh) = if swap { (h, w) } else { (w, h) };
    let mut out = vec![0u8; img.rgb.len()];
    for y in 0..oh {
        for x in 0..ow {
            let (sx, sy) = match o {
                2 => (w - 1 - x, y),         // FLIP_LEFT_RIGHT
                3 => (w - 1 - x, h - 1 - y), // ROTATE_180
                4 => (x, h - 1 - y),         // FLIP_TOP_BOTTOM
                5 => (y, x),                 // TRANSPOSE
                6 => (y, h - 1 - x),         // ROTATE_270 (90° clockwise)
                7 => (w - 1 - y, h - 1 - x), // TRANSVERSE
                _ => (w - 1 - y, x),         // 8: ROTATE_90 (90° counter-clockwise)
            };
            let s = (sy * w + sx) * 3;
            let d = (y * ow + x) * 3;
            out[d..d + 3].copy_from_slice(&img.rgb[s..s + 3]);
        }
    }
    DecodedImage {
        width: ow as u32,
        height: oh as u32,
        rgb: out.into(),
    }
}
