//! The one place where smg-core errors become Python exceptions.
//!
//! Every exception is a `ValueError` subclass (bad input, not a server fault) carrying the
//! stable `code` of the core error as its `.code` attribute's source: the class name maps 1:1.

use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use smg_core::fetch::FetchError;
use smg_core::image::ImageError;

create_exception!(
    _smg,
    SmgError,
    PyValueError,
    "Base class of m3serve preprocessing errors."
);
create_exception!(
    _smg,
    InvalidImageError,
    SmgError,
    "Truncated, corrupt or empty image data."
);
create_exception!(
    _smg,
    UnsupportedImageFormatError,
    SmgError,
    "Not JPEG, PNG, WebP or GIF."
);
create_exception!(
    _smg,
    ImageTooLargeError,
    SmgError,
    "Above a byte or pixel limit."
);
create_exception!(
    _smg,
    ImageAspectRatioError,
    SmgError,
    "Aspect ratio above the limit (200)."
);
create_exception!(
    _smg,
    InvalidImageOptionError,
    SmgError,
    "An option is out of range."
);
create_exception!(
    _smg,
    ImageUrlError,
    SmgError,
    "An image URL was refused or unreadable."
);

/// Python exception for a core image error.
pub fn image_error(e: &ImageError) -> PyErr {
    let msg = format!("[{}] {e}", e.code());
    match e {
        ImageError::UnsupportedFormat(_) => UnsupportedImageFormatError::new_err(msg),
        ImageError::InvalidImage(_) => InvalidImageError::new_err(msg),
        ImageError::TooManyBytes { .. } | ImageError::TooManyPixels { .. } => {
            ImageTooLargeError::new_err(msg)
        }
        ImageError::AspectRatio { .. } => ImageAspectRatioError::new_err(msg),
        ImageError::InvalidOption(_) => InvalidImageOptionError::new_err(msg),
    }
}

/// Python exception for a core fetch error.
pub fn fetch_error(e: &FetchError) -> PyErr {
    let msg = format!("[{}] {e}", e.code());
    match e {
        FetchError::TooLarge { .. } => ImageTooLargeError::new_err(msg),
        _ => ImageUrlError::new_err(msg),
    }
}

/// Python exception for an unreadable path argument.
pub fn io_error(path: &str, e: &std::io::Error) -> PyErr {
    InvalidImageError::new_err(format!("[invalid_image] cannot read {path}: {e}"))
}

/// Register the exception classes on the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("SmgError", py.get_type::<SmgError>())?;
    m.add("InvalidImageError", py.get_type::<InvalidImageError>())?;
    m.add(
        "UnsupportedImageFormatError",
        py.get_type::<UnsupportedImageFormatError>(),
    )?;
    m.add("ImageTooLargeError", py.get_type::<ImageTooLargeError>())?;
    m.add(
        "ImageAspectRatioError",
        py.get_type::<ImageAspectRatioError>(),
    )?;
    m.add(
        "InvalidImageOptionError",
        py.get_type::<InvalidImageOptionError>(),
    )?;
    m.add("ImageUrlError", py.get_type::<ImageUrlError>())?;
    Ok(())
}
