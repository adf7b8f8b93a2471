//! The committed goldens (golden/*.safetensors) are what the README says: inputs rebuildable bit
//! for bit from the documented pixel formula, the token layout `infer()` produces, headers.
#![cfg(feature = "model")]

use std::path::PathBuf;

use safetensors::SafeTensors;
use sha2::{Digest, Sha256};

fn golden(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("golden")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}; run golden/generate.py", p.display()))
}

fn meta(bytes: &[u8]) -> std::collections::HashMap<String, String> {
    let (_, m) = SafeTensors::read_metadata(bytes).expect("safetensors header");
    m.metadata().clone().expect("__metadata__")
}

/// `u8[view][c][y][x]` of golden/README.md, normalised as BasicImageTransform does.
fn pixel(view: u64, c: u64, y: u64, x: u64) -> f32 {
    let u = (3 * x * (c + 1) + 5 * y + 2 * ((x ^ y) & 63) + 50 * c + 37 * view) % 256;
    (u as f32 / 255.0 - 0.5) / 0.5
}

fn view_sha(views: &[(u64, u64, u64)], size: u64) -> String {
    let mut h = Sha256::new();
    for &(view, x0, y0) in views {
        for c in 0..3 {
            for y in 0..size {
                for x in 0..size {
                    h.update(pixel(view, c, y0 + y, x0 + x).to_le_bytes());
                }
            }
        }
    }
    hex::encode(h.finalize())
}

#[test]
fn pixels_rebuild_bit_for_bit() {
    for (case, global) in [("tiny", 512), ("base", 1024), ("gundam", 1024)] {
        let m = meta(&golden(&format!("vision-{case}.safetensors")));
        assert_eq!(
            m["pixels.global.sha256"],
            view_sha(&[(0, 0, 0)], global),
            "{case} global"
        );
        if case == "gundam" {
            let tiles: Vec<_> = (0..6).map(|i| (1, (i % 3) * 640, (i / 3) * 640)).collect();
            assert_eq!(
                m["pixels.tiles.sha256"],
                view_sha(&tiles, 640),
                "gundam tiles"
            );
        }
    }
}

#[test]
fn token_layout_is_infer_s() {
    for config in ["cpu", "mla", "group"] {
        for (case, image_positions) in [("tiny", 73usize), ("base", 273), ("gundam", 893)] {
            let name = format!("{config}-{case}.safetensors");
            let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("golden")
                .join(&name);
            if !p.exists() {
                eprintln!("skipped: {name} not generated");
                continue;
            }
            let bytes = golden(&name);
            let st = SafeTensors::deserialize(&bytes).expect("parse");
            let mask = st.tensor("images_seq_mask").expect("images_seq_mask");
            let mask = mask.data();
            assert_eq!(mask.len(), 1 + image_positions + 9, "{name}");
            assert_eq!(
                mask.iter().filter(|&&b| b == 1).count(),
                image_positions,
                "{name}"
            );
            assert!(
                mask[0] == 0
                    && mask[1] == 1
                    && mask[image_positions] == 1
                    && mask[image_positions + 1] == 0
            );
            let tokens = st.tensor("greedy.tokens").expect("greedy.tokens");
            assert_eq!(tokens.shape(), [32]);
            let m = meta(&bytes);
            assert_eq!(m["ocrp.golden.format_version"], "1");
            assert_eq!(m["config.name"], config);
            assert_eq!(m["synth.algorithm"], ocr_patch::model::synth::ALGORITHM);
            assert_eq!(m["transformers.version"], "4.46.3");
        }
    }
}
