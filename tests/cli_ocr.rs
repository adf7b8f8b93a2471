//! `ocr-patch ocr`: bad inputs are clear errors (exit 2, no panic), and a run on synthetic
//! weights goes end to end (image file -> views -> prompt -> model -> streamed text / JSON).
#![cfg(feature = "model")]

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use predicates::prelude::*;

mod png_support;
use png_support::{png_bomb, png_header_only};

fn ocr() -> Command {
    let mut c = Command::cargo_bin("ocr-patch").unwrap();
    c.arg("ocr");
    c
}

/// `ocr IMAGE ARGS --synthetic CONFIG` (CONFIG: the `cpu` golden config unless given): refused
/// with exit 2 and no panic; the caller adds what stderr must say.
fn refused(image: &Path, args: &[&str], config: Option<&Path>) -> assert_cmd::assert::Assert {
    let cpu = golden_config("cpu");
    ocr()
        .arg(image)
        .args(args)
        .arg("--synthetic")
        .arg(config.unwrap_or(&cpu))
        .assert()
        .code(2)
        .stderr(predicate::str::contains("panicked").not())
}

fn golden_config(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("golden/configs")
        .join(format!("{name}.json"))
}

fn write_png(dir: &Path, name: &str, w: u32, h: u32) -> PathBuf {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x * y) % 256) as u8])
    });
    let p = dir.join(name);
    img.save(&p).unwrap();
    p
}

/// `ocr IMAGE ARGS --model DIR`: refused with exit 2 and no panic.
fn refused_model(image: &Path, args: &[&str], dir: &Path) -> assert_cmd::assert::Assert {
    ocr()
        .arg(image)
        .args(args)
        .arg("--model")
        .arg(dir)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("panicked").not())
}

/// A model folder with the given files (config from the `cpu` golden config).
fn model_dir(with_tokenizer: bool) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(golden_config("cpu"), d.path().join("config.json")).unwrap();
    if with_tokenizer {
        std::fs::write(d.path().join("tokenizer.json"), byte_level_json()).unwrap();
    }
    d
}

fn byte_level_json() -> String {
    // A minimal valid tokenizer.json (word-level, no special tokens: the CLI warns about them).
    let mut vocab = serde_json::Map::new();
    for b in 0..=255u8 {
        // any distinct printable names will do for this test
        vocab.insert(format!("b{b}"), (3 + b as u32).into());
    }
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "b0"}
    })
    .to_string()
}

#[test]
fn a_corrupt_image_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("page.png");
    let mut bytes = png_header_only(100, 100);
    bytes.extend_from_slice(b"\0\0\0\x10IDATgarbage-garbage-garbage");
    std::fs::write(&p, bytes).unwrap();
    let txt = d.path().join("notes.jpg");
    std::fs::write(&txt, "hello, I am text").unwrap();
    for f in [&p, &txt] {
        refused(f, &[], None).stderr(predicate::str::contains("not a readable image"));
    }
}

#[test]
fn a_missing_image_is_a_clear_error() {
    refused(Path::new("/nonexistent/page.png"), &[], None)
        .stderr(predicate::str::contains("/nonexistent/page.png: cannot read the image"));
}

#[test]
fn a_zero_size_image_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("empty.png");
    std::fs::write(&p, png_header_only(0, 10)).unwrap();
    refused(&p, &[], None).stderr(
        predicate::str::contains("empty.png").and(
            predicate::str::contains("no pixels").or(predicate::str::contains("not a readable image")),
        ),
    );
}

#[test]
fn a_huge_image_is_refused_from_its_header() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("bomb.png");
    // 100000 x 100000 claimed in 66 bytes: refused from the header, before any decoding.
    std::fs::write(&p, png_bomb(100_000, 100_000)).unwrap();
    refused(&p, &[], None).stderr(
        predicate::str::contains("100000x100000").and(predicate::str::contains("above the limit of 89478485")),
    );
    // the limit is adjustable
    let small = write_png(d.path(), "small.png", 100, 100);
    refused(&small, &["--max-pixels", "5000"], None).stderr(predicate::str::contains("above the limit of 5000"));
}

#[test]
fn a_prompt_longer_than_the_context_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden_config("cpu")).unwrap()).unwrap();
    cfg["max_position_embeddings"] = 200.into();
    cfg["language_config"]["max_position_embeddings"] = 200.into();
    let cfg_path = d.path().join("short.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let img = write_png(d.path(), "page.png", 64, 48);
    // base: 273 image tokens > 200 positions; refused before the model is built
    refused(&img, &["--mode", "base"], Some(&cfg_path)).stderr(
        predicate::str::contains("the model's context is 200").and(predicate::str::contains("273 of them image tokens")),
    );
    // a long text prompt does the same in tiny mode (73 image tokens)
    let long = format!("<image>\n{}", "word ".repeat(300));
    refused(&img, &["--mode", "tiny", "--prompt", &long], Some(&cfg_path))
        .stderr(predicate::str::contains("the model's context is 200"));
}

#[test]
fn a_prompt_without_image_placeholder_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let img = write_png(d.path(), "page.png", 64, 48);
    refused(&img, &["--prompt", "Free OCR."], None)
        .stderr(predicate::str::contains("0 `<image>` placeholder(s) for 1 image"));
}

#[test]
fn a_missing_tokenizer_is_a_clear_error() {
    let d = model_dir(false);
    let img = write_png(d.path(), "page.png", 64, 48);
    refused_model(&img, &[], d.path()).stderr(predicate::str::contains("tokenizer.json: not found"));
}

#[test]
fn missing_weights_are_a_clear_error() {
    let d = model_dir(true);
    let img = write_png(d.path(), "page.png", 64, 48);
    refused_model(&img, &["--mode", "tiny"], d.path())
        .stderr(predicate::str::contains("cannot load the model").and(predicate::str::contains("safetensors")));
}

#[test]
fn a_model_folder_needs_a_config() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("tokenizer.json"), byte_level_json()).unwrap();
    let img = write_png(d.path(), "page.png", 64, 48);
    refused_model(&img, &[], d.path()).stderr(predicate::str::contains("config.json"));
}

/// The whole pipeline on synthetic weights (full SAM-B + CLIP-L, 2-layer decoder): a 512 view,
/// 3 greedy tokens, as JSON.
#[test]
fn synthetic_weights_run_end_to_end() {
    let d = tempfile::tempdir().unwrap();
    let img = write_png(d.path(), "page.png", 300, 200);
    let out = ocr()
        .arg(&img)
        .args([
            "--mode",
            "tiny",
            "--max-tokens",
            "3",
            "--grounding",
            "--json",
            "--synthetic",
        ])
        .arg(golden_config("cpu"))
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let r = &v["results"][0];
    assert_eq!(r["mode"], "tiny");
    assert_eq!(r["width"], 300);
    // bos + 73 image tokens + "\n<|grounding|>Convert the document to markdown." in the
    // built-in byte tokenizer: 1 + 1 + 45 bytes
    assert_eq!(
        r["prompt_tokens"],
        1 + 73 + 1 + 1 + "Convert the document to markdown.".len()
    );
    assert_eq!(r["generated_tokens"], 3);
    assert_eq!(r["stop"], "MaxTokens");
    assert!(r["boxes"].is_array());
}

#[cfg(feature = "serve")]
#[test]
fn a_pdf_with_too_many_pages_is_refused_before_the_model_loads() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("big.pdf");
    std::fs::write(&p, ocr_patch::serve::pdf::synthetic_pdf(10_000, 10, 10)).unwrap();
    refused(&p, &[], None).stderr(predicate::str::contains("10000 pages, more than the limit of 500"));
}
