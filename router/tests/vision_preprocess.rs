//! Image decoding and preprocessing against transformers' `Gemma4ImageProcessor` (torchvision backend):
//! `tests/fixtures/vision/processor.{json,safetensors}`, made by `tests/fixtures/make_vision_fixtures.py`.
//! Decoded RGB (transparency composited over white, GIF frame 0) equals Pillow's; the resized 8-bit
//! patches equal transformers' exactly, at every budget (block sums everywhere, every byte where the
//! fixture stores them); soft-token counts and grids equal.

use safetensors::SafeTensors;
use serde_json::Value;
use switchyard_router::media;
use switchyard_router::preprocess::{self, Patches};

fn dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/vision")
}

fn fixture() -> (Value, Vec<u8>) {
    let json = serde_json::from_str(&std::fs::read_to_string(dir().join("processor.json")).unwrap()).unwrap();
    (json, std::fs::read(dir().join("processor.safetensors")).unwrap())
}

fn u8s(st: &SafeTensors, name: &str) -> Option<Vec<u8>> {
    st.tensor(name).ok().map(|t| t.data().to_vec())
}

fn i32s(st: &SafeTensors, name: &str) -> Vec<i32> {
    st.tensor(name).unwrap().data().chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap())).collect()
}

/// Sum of the 8-bit values of each soft token's 3x3 patches, soft tokens row-major.
fn token_sums(p: &Patches) -> Vec<i32> {
    let mut sums = vec![0i32; p.soft_tokens()];
    for i in 0..p.len() {
        let (x, y) = p.position(i);
        let slot = x / 3 + (p.cols / 3) * (y / 3);
        sums[slot] += p.pixels[i * 768..(i + 1) * 768].iter().map(|&b| b as i32).sum::<i32>();
    }
    sums
}

#[test]
fn decoding_and_preprocessing_equal_transformers() {
    let (json, bytes) = fixture();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut checked = 0;
    for im in json["images"].as_array().unwrap() {
        let name = im["name"].as_str().unwrap();
        let file = std::fs::read(dir().join("images").join(im["file"].as_str().unwrap())).unwrap();
        let rgb = media::decode(&file, 1 << 26, "image").unwrap_or_else(|e| panic!("{name}: {}", e.message));
        let (w, h) = rgb.dimensions();
        assert_eq!((w as u64, h as u64), (im["width"].as_u64().unwrap(), im["height"].as_u64().unwrap()), "{name}");
        // Every format, JPEG included (libjpeg-turbo, as Pillow), decodes to Pillow's exact pixels.
        let reference_rgb = u8s(&st, &format!("{name}_rgb"));
        let input = match &reference_rgb {
            Some(r) => {
                assert!(switchyard_router::jpeg::available() || im["format"] != "JPEG", "libturbojpeg is not installed");
                assert!(r == rgb.as_raw(), "{name}: decoded RGB differs from Pillow's");
                r.clone()
            }
            None => rgb.into_raw(),
        };
        for res in json["results"].as_array().unwrap().iter().filter(|r| r["image"] == name) {
            let budget = res["max_soft_tokens"].as_u64().unwrap() as usize;
            let p = preprocess::preprocess(&input, h as usize, w as usize, budget).unwrap();
            let grid = res["patch_grid_hw"].as_array().unwrap();
            assert_eq!((p.rows as u64, p.cols as u64), (grid[0].as_u64().unwrap(), grid[1].as_u64().unwrap()), "{name} at {budget}");
            assert_eq!(p.soft_tokens() as u64, res["num_soft_tokens"].as_u64().unwrap(), "{name} at {budget}");
            assert_eq!(token_sums(&p), i32s(&st, &format!("{name}_{budget}_token_sums")), "{name} at {budget}: block sums");
            if let Some(exact) = u8s(&st, &format!("{name}_{budget}_pixels")) {
                assert!(exact == p.pixels, "{name} at {budget}: patches differ");
            }
            if budget == 70 {
                let pos: Vec<i32> = (0..p.len())
                    .flat_map(|i| {
                        let (x, y) = p.position(i);
                        [x as i32, y as i32]
                    })
                    .collect();
                assert_eq!(pos, i32s(&st, &format!("{name}_70_positions")), "{name}: positions");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 30, "six images at five budgets");
}
