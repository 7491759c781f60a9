//! JPEG decoding as Pillow does it, with the same library: libjpeg-turbo (accurate integer IDCT,
//! "fancy" chroma upsampling), through its TurboJPEG API loaded at run time. Nothing of it is needed
//! to build; without it (`libturbojpeg.so.0`, Debian's `libturbojpeg0`) JPEGs fall back to the pure
//! Rust decoder, whose pixels differ from Pillow's by a few levels, and the server says so once.
//!
//! Colour as Pillow's `convert("RGB")` makes it: YCbCr through libjpeg's own conversion, grayscale
//! replicated, CMYK (inverted when the file carries Adobe's marker, as Photoshop writes it) through
//! Pillow's `cmyk2rgb`.

#![allow(unsafe_code)] // a C library's functions, called through pointers loaded at run time

use std::ffi::{CStr, c_char, c_int, c_ulong, c_void};
use std::sync::OnceLock;

type Handle = *mut c_void;

/// TurboJPEG 2.x's decompression entry points (kept by 3.x for compatibility).
struct Turbo {
    init: unsafe extern "C" fn() -> Handle,
    header: unsafe extern "C" fn(Handle, *const u8, c_ulong, *mut c_int, *mut c_int, *mut c_int, *mut c_int) -> c_int,
    decompress: unsafe extern "C" fn(Handle, *const u8, c_ulong, *mut u8, c_int, c_int, c_int, c_int, c_int) -> c_int,
    destroy: unsafe extern "C" fn(Handle) -> c_int,
    error: unsafe extern "C" fn(Handle) -> *mut c_char,
    /// Keeps the functions above loaded.
    _lib: libloading::Library,
}

const TJPF_RGB: c_int = 0;
const TJPF_GRAY: c_int = 6;
const TJPF_CMYK: c_int = 11;
const TJCS_GRAY: c_int = 2;
const TJCS_CMYK: c_int = 3;
const TJCS_YCCK: c_int = 4;

const LIBRARY_NAMES: [&str; 5] = ["libturbojpeg.so.0", "libturbojpeg.so", "libturbojpeg.0.dylib", "libturbojpeg.dylib", "turbojpeg.dll"];

fn load() -> Option<Turbo> {
    for name in LIBRARY_NAMES {
        // SAFETY: loading libturbojpeg runs only its (trivial) initialisers.
        let Ok(lib) = (unsafe { libloading::Library::new(name) }) else { continue };
        // SAFETY: each symbol is looked up by its TurboJPEG name and given that function's C
        // signature (turbojpeg.h, API 2.x); the pointers stay valid while `lib` is held by `Turbo`.
        let turbo = unsafe {
            (|| {
                Some(Turbo {
                    init: *lib.get(b"tjInitDecompress\0").ok()?,
                    header: *lib.get(b"tjDecompressHeader3\0").ok()?,
                    decompress: *lib.get(b"tjDecompress2\0").ok()?,
                    destroy: *lib.get(b"tjDestroy\0").ok()?,
                    error: *lib.get(b"tjGetErrorStr2\0").ok()?,
                    _lib: lib,
                })
            })()
        };
        if turbo.is_some() {
            return turbo;
        }
    }
    None
}

fn turbo() -> Option<&'static Turbo> {
    static TURBO: OnceLock<Option<Turbo>> = OnceLock::new();
    TURBO
        .get_or_init(|| {
            let t = load();
            match &t {
                Some(_) => tracing::info!("JPEG: libjpeg-turbo (TurboJPEG API), as Pillow decodes"),
                None => tracing::warn!(
                    "JPEG: libturbojpeg not found (Debian: apt-get install libturbojpeg0); JPEGs are decoded in Rust, \
                     within a few levels of the pixels Pillow (and so transformers) would see"
                ),
            }
            t
        })
        .as_ref()
}

/// Whether JPEGs are decoded by libjpeg-turbo here.
pub fn available() -> bool {
    turbo().is_some()
}

/// One decompressor, destroyed when dropped.
struct Decompressor<'a> {
    t: &'a Turbo,
    h: Handle,
}

impl Decompressor<'_> {
    fn error(&self) -> String {
        // SAFETY: the handle is live; TurboJPEG returns a NUL-terminated string it owns.
        let p = unsafe { (self.t.error)(self.h) };
        if p.is_null() {
            return "libjpeg-turbo failed".into();
        }
        // SAFETY: non-null and NUL-terminated (above); copied before the handle can change it.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

impl Drop for Decompressor<'_> {
    fn drop(&mut self) {
        // SAFETY: the handle came from `tjInitDecompress` and is destroyed once, here.
        unsafe { (self.t.destroy)(self.h) };
    }
}

/// A decoded image: width, height and `width * height * 3` RGB bytes.
pub type Rgb = (u32, u32, Vec<u8>);

/// Decodes a JPEG to RGB as Pillow's `Image.open(...).convert("RGB")` would; `None` when
/// libjpeg-turbo is not on this machine.
pub fn decode_rgb(bytes: &[u8]) -> Option<Result<Rgb, String>> {
    let t = turbo()?;
    Some(decode_with(t, bytes))
}

fn decode_with(t: &Turbo, bytes: &[u8]) -> Result<Rgb, String> {
    // SAFETY: no arguments; a null handle is checked below.
    let h = unsafe { (t.init)() };
    if h.is_null() {
        return Err("libjpeg-turbo could not start a decompressor".into());
    }
    let d = Decompressor { t, h };
    let (mut w, mut hgt, mut sub, mut cs): (c_int, c_int, c_int, c_int) = (0, 0, 0, 0);
    let len = c_ulong::try_from(bytes.len()).map_err(|_| "the JPEG is too large".to_string())?;
    // SAFETY: `bytes` is valid for `len` bytes; the four out-pointers are live locals.
    if unsafe { (t.header)(h, bytes.as_ptr(), len, &mut w, &mut hgt, &mut sub, &mut cs) } != 0 {
        return Err(d.error());
    }
    let (wu, hu) = (usize::try_from(w).map_err(|_| "bad width")?, usize::try_from(hgt).map_err(|_| "bad height")?);
    let (format, channels) = match cs {
        TJCS_GRAY => (TJPF_GRAY, 1),
        TJCS_CMYK | TJCS_YCCK => (TJPF_CMYK, 4),
        _ => (TJPF_RGB, 3),
    };
    let pitch = wu.checked_mul(channels).ok_or("the JPEG is too large")?;
    let mut out = vec![0u8; pitch.checked_mul(hu).ok_or("the JPEG is too large")?];
    let pitch_c = c_int::try_from(pitch).map_err(|_| "the JPEG is too large")?;
    // SAFETY: `out` holds `pitch * height` bytes, exactly what a `width x height` image of `format`
    // needs at this pitch; flags 0 = accurate IDCT and fancy upsampling (libjpeg's defaults, Pillow's).
    if unsafe { (t.decompress)(h, bytes.as_ptr(), len, out.as_mut_ptr(), w, pitch_c, hgt, format, 0) } != 0 {
        return Err(d.error());
    }
    let rgb = match channels {
        1 => out.iter().flat_map(|&g| [g, g, g]).collect(),
        4 => {
            let inverted = has_adobe_marker(bytes);
            out.chunks_exact(4).flat_map(|p| cmyk_to_rgb(p, inverted)).collect()
        }
        _ => out,
    };
    Ok((wu as u32, hu as u32, rgb))
}

/// Pillow's `cmyk2rgb` (Convert.c) after its `CMYK;I` unpacking of Adobe files: `nk = 255 - K`,
/// each channel `nk - C * nk / 255` with its rounding.
fn cmyk_to_rgb(p: &[u8], inverted: bool) -> [u8; 3] {
    let v = |x: u8| if inverted { 255 - x as i32 } else { x as i32 };
    let (c, m, y, k) = (v(p[0]), v(p[1]), v(p[2]), v(p[3]));
    let nk = 255 - k;
    let muldiv255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let clip = |x: i32| x.clamp(0, 255) as u8;
    [clip(nk - muldiv255(c, nk)), clip(nk - muldiv255(m, nk)), clip(nk - muldiv255(y, nk))]
}

/// Whether the file has an Adobe APP14 segment (before its first scan), which marks inverted CMYK.
fn has_adobe_marker(b: &[u8]) -> bool {
    let mut i = 2; // after SOI
    while i + 4 <= b.len() {
        if b[i] != 0xFF {
            return false;
        }
        let marker = b[i + 1];
        if marker == 0xFF {
            i += 1; // fill byte
            continue;
        }
        if marker == 0xDA || marker == 0xD9 {
            return false; // start of scan, end of image
        }
        let len = u16::from_be_bytes([b[i + 2], b[i + 3]]) as usize;
        if marker == 0xEE && b.get(i + 4..i + 9) == Some(b"Adobe".as_slice()) {
            return true;
        }
        i += 2 + len;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmyk_conversion_is_pillows() {
        // No ink is white, full black is black, whatever the inversion.
        assert_eq!(cmyk_to_rgb(&[0, 0, 0, 0], false), [255, 255, 255]);
        assert_eq!(cmyk_to_rgb(&[255, 255, 255, 255], true), [255, 255, 255]);
        assert_eq!(cmyk_to_rgb(&[0, 0, 0, 255], false), [0, 0, 0]);
        // Pillow 13's convert("RGB") of these CMYK pixels.
        assert_eq!(cmyk_to_rgb(&[100, 50, 0, 20], false), [143, 189, 235]);
        assert_eq!(cmyk_to_rgb(&[13, 200, 77, 99], false), [148, 34, 109]);
        assert_eq!(cmyk_to_rgb(&[255 - 13, 255 - 200, 255 - 77, 255 - 99], true), [148, 34, 109]);
    }

    #[test]
    fn the_adobe_marker_is_found_before_the_scan_only() {
        let seg = |m: u8, body: &[u8]| {
            let mut v = vec![0xFF, m];
            v.extend(((body.len() + 2) as u16).to_be_bytes());
            v.extend(body);
            v
        };
        let mut with = vec![0xFF, 0xD8];
        with.extend(seg(0xE0, b"JFIF\0xxxxxxxxx"));
        with.extend(seg(0xEE, b"Adobe\0\x64\0\0\0\0\x02"));
        with.extend(seg(0xDA, b"scan"));
        assert!(has_adobe_marker(&with));
        let mut without = vec![0xFF, 0xD8];
        without.extend(seg(0xE0, b"JFIF\0xxxxxxxxx"));
        without.extend(seg(0xDA, b"Adobe in the scan data"));
        assert!(!has_adobe_marker(&without));
    }
}
