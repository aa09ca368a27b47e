//! Python bindings for smg-core. Errors are converted in one place; CPU work releases the GIL.
//!
//! `preprocess(image, ...)` returns a dict:
//! - `patches`: numpy `uint16` array `[num_patches, 1176]` holding **bf16 bit patterns**
//!   (view it as bf16 without a copy: `torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)`);
//! - `grid_thw`: `(1, h, w)`; `hash`: hex SHA-256 content hash; `num_image_tokens`;
//! - `timings_us`: `{"decode", "resize", "normalize_patchify"}` in microseconds, and
//!   `resize_fused` (the resampling ran inside normalise + patchify and is counted there).
//!
//! `image` is `bytes` / `bytearray` / `memoryview` (encoded image) or a `str` / `os.PathLike`
//! path to a file.
mod error;

use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict};
use smg_core::image::{self, ImageOptions};

/// Wire-format version implemented by the bundled smg-core.
#[pyfunction]
fn wire_format_version() -> u32 {
    smg_core::WIRE_FORMAT_VERSION
}

/// Encoded bytes of `image`: borrowed for `bytes`, copied for mutable buffers, read for paths.
enum Input<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
    Path(String),
}

fn input<'a>(image: &'a Bound<'_, PyAny>) -> PyResult<Input<'a>> {
    if let Ok(b) = image.cast::<PyBytes>() {
        return Ok(Input::Borrowed(b.as_bytes()));
    }
    if let Ok(b) = image.cast::<PyByteArray>() {
        return Ok(Input::Owned(b.to_vec()));
    }
    if let Ok(p) = image.extract::<std::path::PathBuf>() {
        return Ok(Input::Path(p.to_string_lossy().into_owned()));
    }
    if let Ok(v) = image.extract::<Vec<u8>>() {
        return Ok(Input::Owned(v));
    }
    Err(pyo3::exceptions::PyTypeError::new_err(
        "image must be bytes, bytearray, memoryview, str or os.PathLike",
    ))
}

/// Run `f` on the encoded bytes with the GIL released.
fn with_bytes<T: Send>(
    py: Python<'_>,
    image: &Bound<'_, PyAny>,
    f: impl FnOnce(&[u8]) -> Result<T, image::ImageError> + Send,
) -> PyResult<T> {
    let inp = input(image)?;
    let out = py.detach(|| match &inp {
        Input::Borrowed(b) => Ok(f(b)),
        Input::Owned(v) => Ok(f(v)),
        Input::Path(p) => std::fs::read(p).map(|v| f(&v)).map_err(|e| (p.clone(), e)),
    });
    match out {
        Ok(r) => r.map_err(|e| error::image_error(&e)),
        Err((p, e)) => Err(error::io_error(&p, &e)),
    }
}

#[allow(clippy::too_many_arguments)]
fn options(
    max_long_side_pixel: Option<u32>,
    min_pixels: u64,
    max_pixels: u64,
    factor: u32,
    max_aspect_ratio: f64,
    max_input_pixels: Option<u64>,
    max_input_bytes: Option<usize>,
) -> ImageOptions {
    let d = ImageOptions::default();
    ImageOptions {
        factor,
        min_pixels,
        max_pixels,
        max_aspect_ratio,
        max_long_side_pixel,
        max_input_pixels: max_input_pixels.unwrap_or(d.max_input_pixels),
        max_input_bytes: max_input_bytes.unwrap_or(d.max_input_bytes),
    }
}

fn numpy_array<'py>(
    py: Python<'py>,
    data: &[u8],
    dtype: &str,
    shape: &[usize],
) -> PyResult<Bound<'py, PyAny>> {
    let np = py.import("numpy")?;
    let buf = PyByteArray::new(py, data);
    np.call_method1("frombuffer", (buf, dtype))?
        .call_method1("reshape", (shape.to_vec(),))
}

/// Decode, resize, normalise and patchify one image (MiniMax-M3 processor semantics).
#[pyfunction]
#[pyo3(signature = (image, *, max_long_side_pixel=None, min_pixels=3136, max_pixels=451_584,
    factor=28, max_aspect_ratio=200.0, max_input_pixels=None, max_input_bytes=None))]
#[allow(clippy::too_many_arguments)]
fn preprocess<'py>(
    py: Python<'py>,
    image: &Bound<'py, PyAny>,
    max_long_side_pixel: Option<u32>,
    min_pixels: u64,
    max_pixels: u64,
    factor: u32,
    max_aspect_ratio: f64,
    max_input_pixels: Option<u64>,
    max_input_bytes: Option<usize>,
) -> PyResult<Bound<'py, PyDict>> {
    let opts = options(
        max_long_side_pixel,
        min_pixels,
        max_pixels,
        factor,
        max_aspect_ratio,
        max_input_pixels,
        max_input_bytes,
    );
    let resized = with_bytes(py, image, |b| image::resize_and_hash(b, &opts))?;
    let (num_patches, grid_thw) = (resized.num_patches(), resized.grid_thw());
    let hash = resized.hash.clone();
    // The patches are written straight into the bytearray numpy views (GIL released while
    // they are computed): no second copy of the ~5 MB of bf16.
    let mut timings = image::StageTimings::default();
    let buf = PyByteArray::new_with(py, num_patches * image::PATCH_DIM * 2, |dst| {
        timings = py.detach(|| resized.patchify_into(dst));
        Ok(())
    })?;
    let np = py.import("numpy")?;
    let patches = np
        .call_method1("frombuffer", (buf, "uint16"))?
        .call_method1("reshape", ((num_patches, image::PATCH_DIM),))?;
    let d = PyDict::new(py);
    d.set_item("patches", patches)?;
    d.set_item("grid_thw", (grid_thw[0], grid_thw[1], grid_thw[2]))?;
    d.set_item("hash", hash)?;
    d.set_item(
        "num_image_tokens",
        num_patches / (image::patchify::MERGE * image::patchify::MERGE),
    )?;
    let t = PyDict::new(py);
    t.set_item("decode", timings.decode_us)?;
    t.set_item("resize", timings.resize_us)?;
    t.set_item("normalize_patchify", timings.normalize_patchify_us)?;
    t.set_item("resize_fused", timings.resize_fused)?;
    d.set_item("timings_us", t)?;
    Ok(d)
}

/// The resized uint8 RGB image `[h, w, 3]` (before normalisation), for parity tests.
#[pyfunction]
#[pyo3(signature = (image, *, max_long_side_pixel=None, min_pixels=3136, max_pixels=451_584,
    factor=28, max_aspect_ratio=200.0, max_input_pixels=None, max_input_bytes=None))]
#[allow(clippy::too_many_arguments)]
fn resize_rgb<'py>(
    py: Python<'py>,
    image: &Bound<'py, PyAny>,
    max_long_side_pixel: Option<u32>,
    min_pixels: u64,
    max_pixels: u64,
    factor: u32,
    max_aspect_ratio: f64,
    max_input_pixels: Option<u64>,
    max_input_bytes: Option<usize>,
) -> PyResult<Bound<'py, PyAny>> {
    let opts = options(
        max_long_side_pixel,
        min_pixels,
        max_pixels,
        factor,
        max_aspect_ratio,
        max_input_pixels,
        max_input_bytes,
    );
    let img = with_bytes(py, image, |b| {
        image::resize_for_model(b, &opts).map(|r| r.0)
    })?;
    numpy_array(
        py,
        &img.rgb,
        "uint8",
        &[img.height as usize, img.width as usize, 3],
    )
}

/// Decoded, EXIF-oriented uint8 RGB `[h, w, 3]` (PIL `exif_transpose` + `convert("RGB")`).
#[pyfunction]
#[pyo3(signature = (image, *, max_input_pixels=None, max_input_bytes=None))]
fn decode_rgb<'py>(
    py: Python<'py>,
    image: &Bound<'py, PyAny>,
    max_input_pixels: Option<u64>,
    max_input_bytes: Option<usize>,
) -> PyResult<Bound<'py, PyAny>> {
    let opts = options(
        None,
        3136,
        451_584,
        28,
        200.0,
        max_input_pixels,
        max_input_bytes,
    );
    let img = with_bytes(py, image, |b| image::decode::decode_rgb(b, &opts))?;
    numpy_array(
        py,
        &img.rgb,
        "uint8",
        &[img.height as usize, img.width as usize, 3],
    )
}

/// `(h, w)` the image is resized to (transformers' `smart_resize`, or the long-side rule).
#[pyfunction]
#[pyo3(signature = (height, width, *, max_long_side_pixel=None, min_pixels=3136,
    max_pixels=451_584, factor=28, max_aspect_ratio=200.0))]
fn target_size(
    height: u32,
    width: u32,
    max_long_side_pixel: Option<u32>,
    min_pixels: u64,
    max_pixels: u64,
    factor: u32,
    max_aspect_ratio: f64,
) -> PyResult<(u32, u32)> {
    let opts = options(
        max_long_side_pixel,
        min_pixels,
        max_pixels,
        factor,
        max_aspect_ratio,
        None,
        None,
    );
    image::sizing::target_size(height, width, &opts).map_err(|e| error::image_error(&e))
}

/// Resolve an image URL (data:, file:// under `file_root`) to bytes; http(s) is refused here.
#[pyfunction]
#[pyo3(signature = (url, *, file_root=None, max_bytes=33_554_432))]
fn load_image_url<'py>(
    py: Python<'py>,
    url: &str,
    file_root: Option<std::path::PathBuf>,
    max_bytes: usize,
) -> PyResult<Bound<'py, PyBytes>> {
    let policy = smg_core::fetch::FetchPolicy {
        file_root,
        allow_http: false,
        allow_private_hosts: false,
        max_bytes,
    };
    let src = py
        .detach(|| smg_core::fetch::resolve_image_url(url, &policy))
        .map_err(|e| error::fetch_error(&e))?;
    match src {
        smg_core::fetch::ImageSource::Bytes(b) => Ok(PyBytes::new(py, &b)),
        smg_core::fetch::ImageSource::Http(_) => {
            Err(error::fetch_error(&smg_core::fetch::FetchError::Forbidden(
                "http(s) URLs are fetched by the gateway".into(),
            )))
        }
    }
}

#[pymodule]
fn _smg(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(wire_format_version, m)?)?;
    m.add_function(wrap_pyfunction!(preprocess, m)?)?;
    m.add_function(wrap_pyfunction!(resize_rgb, m)?)?;
    m.add_function(wrap_pyfunction!(decode_rgb, m)?)?;
    m.add_function(wrap_pyfunction!(target_size, m)?)?;
    m.add_function(wrap_pyfunction!(load_image_url, m)?)?;
    m.add("PATCH_DIM", image::PATCH_DIM)?;
    error::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
