//! Preprocessing against DeepSeek-OCR's own `infer()`.
//!
//! Gated: set `OCR_PATCH_UPSTREAM` to the folder of the Hub's remote code.
//! `tests/preprocess_ref/make_ref.py` (interpreter: `OCR_PATCH_REF_PYTHON`, default
//! `/root/.cache/tf-matrix/venv/bin/python`; `OCR_PATCH_REF_PYTHONPATH`, default transformers
//! 4.46.3) writes test images, runs the real `infer()` on each in every mode with `generate`
//! stubbed out, and records the views (uint8 and float32), the bf16 tensors handed to
//! `generate`, `input_ids`, `images_seq_mask`, `images_spatial_crop`, and
//! `find_closest_aspect_ratio`'s choices. `OCR_PATCH_REF_DIR` keeps and reuses them.
//!
//! Expected: PNG inputs equal bit for bit (Pillow's resampling is ported, not approximated);
//! the JPEG input differs only by the decoders (libjpeg-turbo vs zune-jpeg), within the
//! tolerance below; token layouts equal exactly.
#![cfg(feature = "model")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ocr_patch::model::preprocess::{self, Mode, TARGET_RATIOS};

/// Largest |difference| of a uint8 channel allowed for the JPEG case (decoder differences:
/// IDCT and chroma upsampling), and of the mean |difference|.
const JPEG_MAX_U8: u8 = 32;
const JPEG_MEAN_U8: f64 = 0.5;

fn ref_dir() -> Option<PathBuf> {
    let Ok(upstream) = std::env::var("OCR_PATCH_UPSTREAM") else {
        eprintln!("skipping: set OCR_PATCH_UPSTREAM to the folder of DeepSeek-OCR's remote code to compare against it");
        return None;
    };
    let base = std::env::var("OCR_PATCH_REF_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_TARGET_TMPDIR")).to_path_buf());
    let out = base.join("preprocess_ref");
    if std::env::var("OCR_PATCH_REF_DIR").is_ok() && out.join("index.json").exists() {
        return Some(out);
    }
    static ONCE: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut done = ONCE.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return Some(out);
    }
    let python = std::env::var("OCR_PATCH_REF_PYTHON")
        .unwrap_or_else(|_| "/root/.cache/tf-matrix/venv/bin/python".into());
    let pythonpath = std::env::var("OCR_PATCH_REF_PYTHONPATH")
        .unwrap_or_else(|_| "/root/.cache/tf-matrix/tf/4.46.3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/preprocess_ref/make_ref.py");
    let run = std::process::Command::new(&python)
        .arg(&script)
        .arg(&upstream)
        .arg(&out)
        .env("PYTHONPATH", pythonpath)
        .output()
        .unwrap_or_else(|e| panic!("{python}: cannot run the reference script: {e}"));
    assert!(
        run.status.success(),
        "{}: failed ({}):\n{}",
        script.display(),
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    *done = true;
    Some(out)
}

fn index(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("index.json")).unwrap()).unwrap()
}

#[test]
fn target_ratios_and_aspect_choices_match_python() {
    let Some(dir) = ref_dir() else { return };
    let idx = index(&dir);
    let py: Vec<(u32, u32)> = idx["target_ratios"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_u64().unwrap() as u32, r[1].as_u64().unwrap() as u32))
        .collect();
    assert_eq!(
        py,
        TARGET_RATIOS.to_vec(),
        "target_ratios order differs from dynamic_preprocess's"
    );
    let choices = idx["choices"].as_array().unwrap();
    let mut bad = vec![];
    for c in choices {
        let (w, h) = (c[0].as_u64().unwrap() as u32, c[1].as_u64().unwrap() as u32);
        let want = (
            c[2][0].as_u64().unwrap() as u32,
            c[2][1].as_u64().unwrap() as u32,
        );
        let got =
            preprocess::find_closest_aspect_ratio(w as f64 / h as f64, &TARGET_RATIOS, w, h, 640);
        if got != want {
            bad.push((w, h, want, got));
        }
    }
    eprintln!(
        "find_closest_aspect_ratio: {} sizes compared (ties included), {} differ",
        choices.len(),
        bad.len()
    );
    assert!(
        bad.is_empty(),
        "differs from Python: {:?}",
        &bad[..bad.len().min(10)]
    );
}

fn max_u8_diff(a: &[u8], b: &[u8]) -> (u8, f64) {
    assert_eq!(a.len(), b.len());
    let mut m = 0u8;
    let mut s = 0u64;
    for (x, y) in a.iter().zip(b) {
        let d = x.abs_diff(*y);
        m = m.max(d);
        s += d as u64;
    }
    (m, s as f64 / a.len().max(1) as f64)
}

fn flat_u8(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

fn flat_f32(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// Our f32 pixels as infer() hands them on: `.to(torch.bfloat16)`, read back as f32.
fn bf16_round(v: &[f32]) -> Vec<f32> {
    flat_f32(
        &Tensor::new(v, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap(),
    )
}

#[test]
fn views_pixels_and_token_layout_match_infer() {
    let Some(dir) = ref_dir() else { return };
    let idx = index(&dir);
    let cases = idx["cases"].as_array().unwrap();
    let mut exact = 0;
    let mut report = vec![];
    let mut failed: Vec<String> = vec![];
    for c in cases {
        let case = c["case"].as_str().unwrap();
        let image = c["image"].as_str().unwrap();
        let mode: Mode = c["mode"].as_str().unwrap().parse().unwrap();
        let prompt = c["prompt"].as_str().unwrap();
        let t: HashMap<String, Tensor> =
            candle_core::safetensors::load(dir.join(format!("{case}.safetensors")), &Device::Cpu)
                .unwrap();
        let img = preprocess::load_image(
            &dir.join("images").join(image),
            preprocess::MAX_IMAGE_PIXELS,
        )
        .unwrap();
        let v = preprocess::views(&img, mode);

        // token layout, exactly
        let enc =
            |s: &str| -> Result<Vec<u32>, ()> { Ok(s.bytes().map(|b| 1000 + b as u32).collect()) };
        let p = preprocess::build_prompt(prompt, std::slice::from_ref(&v), mode, enc)
            .unwrap()
            .unwrap();
        let ids: Vec<u32> = t["input_ids"]
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|x| x as u32)
            .collect();
        assert_eq!(p.input_ids, ids, "{case}: input_ids");
        let mask: Vec<bool> = flat_u8(&t["images_seq_mask"])
            .into_iter()
            .map(|x| x != 0)
            .collect();
        assert_eq!(p.images_seq_mask, mask, "{case}: images_seq_mask");
        let crop = t["images_spatial_crop"]
            .flatten_all()
            .unwrap()
            .to_vec1::<i64>()
            .unwrap();
        assert_eq!(
            vec![v.crop.0 as i64, v.crop.1 as i64],
            crop,
            "{case}: images_spatial_crop"
        );

        // views
        let want_g = flat_u8(&t["u8.global"]);
        let got_g = v.global.as_raw().clone();
        let want_tiles = t.get("u8.tiles").map(flat_u8).unwrap_or_default();
        let got_tiles: Vec<u8> = v.tiles.iter().flat_map(|x| x.as_raw().clone()).collect();
        assert_eq!(got_tiles.len(), want_tiles.len(), "{case}: tile count");
        let (gm, gmean) = max_u8_diff(&got_g, &want_g);
        let (tm, tmean) = max_u8_diff(&got_tiles, &want_tiles);
        if image.ends_with(".jpg") {
            report.push(format!(
                "{case}: uint8 max |d| global {gm} (mean {gmean:.3}), tiles {tm} (mean {tmean:.3})"
            ));
            if !(gm <= JPEG_MAX_U8
                && tm <= JPEG_MAX_U8
                && gmean <= JPEG_MEAN_U8
                && tmean <= JPEG_MEAN_U8)
            {
                failed.push(format!("{case}: JPEG beyond tolerance"));
            }
            continue;
        }
        if gm != 0 || tm != 0 {
            failed.push(format!("{case}: uint8 views differ: global max {gm} mean {gmean:.4}, tiles max {tm} mean {tmean:.4}"));
            continue;
        }

        // float32 after ToTensor + Normalize, and bf16 as passed to generate(): bit for bit
        let f_g = preprocess::to_chw(&v.global);
        assert_eq!(f_g, flat_f32(&t["f32.global"]), "{case}: f32 global");
        assert_eq!(
            bf16_round(&f_g),
            flat_f32(&t["bf16.global"]),
            "{case}: bf16 global"
        );
        if !v.tiles.is_empty() {
            let f_t: Vec<f32> = v.tiles.iter().flat_map(preprocess::to_chw).collect();
            assert_eq!(f_t, flat_f32(&t["f32.tiles"]), "{case}: f32 tiles");
            assert_eq!(
                bf16_round(&f_t),
                flat_f32(&t["bf16.crops"]),
                "{case}: bf16 tiles"
            );
        } else {
            // no crops: infer() passes zeros of (1, 3, base, base)
            let z = flat_f32(&t["bf16.crops"]);
            assert!(z.iter().all(|&x| x == 0.0), "{case}: crops should be zeros");
        }
        exact += 1;
    }
    for r in &report {
        eprintln!("{r}");
    }
    eprintln!(
        "{exact} of {} cases bit-identical (uint8 views, float32, bf16, tokens)",
        cases.len()
    );
    assert!(
        failed.is_empty(),
        "{} cases differ:\n{}",
        failed.len(),
        failed.join("\n")
    );
}
