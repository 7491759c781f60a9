//! JPEGs decode to the exact pixels Pillow gives (`Image.open(f).convert("RGB")`, Pillow's own
//! libjpeg-turbo): baseline 4:2:0, 4:2:2 and 4:4:4, progressive, optimized with restart intervals,
//! grayscale and Adobe CMYK (tests/fixtures/make_jpeg_fixtures.py). Needs libjpeg-turbo on the machine
//! (Debian's libturbojpeg0, which scripts/test.sh installs); without it the server falls back to a
//! decoder that is close but not exact, and this test says so instead of passing.

use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/vision/jpeg"))
}

#[test]
fn jpegs_decode_to_pillows_pixels() {
    assert!(
        switchyard_router::jpeg::available(),
        "libturbojpeg is not installed (apt-get install libturbojpeg0): JPEG input cannot match Pillow without it"
    );
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir().join("index.json")).unwrap()).unwrap();
    let images = index["images"].as_object().unwrap();
    assert!(images.len() >= 7);
    for (name, meta) in images {
        let bytes = std::fs::read(dir().join(format!("{name}.jpg"))).unwrap();
        let want = std::fs::read(dir().join(format!("{name}.rgb"))).unwrap();
        let img = switchyard_router::media::decode(&bytes, 1 << 30, "image").unwrap_or_else(|e| panic!("{name}: {}", e.message));
        assert_eq!(
            (img.width() as u64, img.height() as u64),
            (meta["width"].as_u64().unwrap(), meta["height"].as_u64().unwrap()),
            "{name}"
        );
        let got = img.into_raw();
        let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        let worst = got.iter().zip(&want).map(|(&a, &b)| (a as i32 - b as i32).abs()).max().unwrap_or(0);
        assert!(differ == 0 && got.len() == want.len(), "{name}: {differ} of {} bytes differ from Pillow's (worst by {worst})", want.len());
    }
}

#[test]
fn a_broken_jpeg_is_refused_not_a_crash() {
    let mut bytes = std::fs::read(dir().join("baseline_420.jpg")).unwrap();
    bytes.truncate(bytes.len() / 2);
    // A truncated file: libjpeg-turbo pads it (as Pillow with LOAD_TRUNCATED_IMAGES would not); either a
    // clean refusal or an image, never a panic.
    let _ = switchyard_router::media::decode(&bytes, 1 << 30, "image");
    let garbage = [0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x11, 0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0x03];
    assert!(switchyard_router::media::decode(&garbage, 1 << 30, "image").is_err());
}
