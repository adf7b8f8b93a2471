//! The Rust model against DeepSeek-OCR's own remote code.
//!
//! Gated: set `OCR_PATCH_UPSTREAM` to the folder holding the Hub's `deepencoder.py`,
//! `modeling_deepseekv2.py`, `modeling_deepseekocr.py`, `configuration_deepseek_v2.py` and
//! `conversation.py`. `tests/model_ref/make_ref.py` then builds pieces of that code with seeded
//! random weights (float32, CPU) and records inputs and outputs; these tests load the same
//! weights into the Rust blocks and compare, printing the largest difference.
//! `OCR_PATCH_REF_PYTHON` (default `/root/.cache/tf-matrix/venv/bin/python`) and
//! `OCR_PATCH_REF_PYTHONPATH` (default `/root/.cache/tf-matrix/tf/4.46.3`, transformers 4.46.3)
//! choose the interpreter; `OCR_PATCH_REF_DIR` keeps the cases there and reuses them. With `OCR_PATCH_REF_FULL=1`
//! the real-size SAM-B and CLIP-L (`build_sam_vit_b()`, `build_clip_l()`) are compared too (slow:
//! a 1.6 GB case).
#![cfg(feature = "model")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, IndexOp, Tensor};
use ocr_patch::model::config::{DeepseekV2Config, TextConfig};
use ocr_patch::model::decoder::{merge_image_features, DeepseekV2};
use ocr_patch::model::generate::{generate, GenerationConfig, Sampling};
use ocr_patch::model::vision::{ClipConfig, DeepEncoder, LocalTiles, SamConfig, VisionConfig};
use ocr_patch::model::vision::{ImageEncoderViT, VitModel};
use ocr_patch::model::{DecoderSession, DeepseekOcr, ImageInput, Weights};

const TOL: f32 = 1e-4;

/// The folder of reference cases, made once per test process; `None` (skip) without upstream.
fn cases_dir() -> Option<&'static Path> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| make_cases("model_ref", "ocr_e2e_mha", &[]))
        .as_deref()
}

/// Runs make_ref.py with `args` into `target/tmp/<sub>` (or `OCR_PATCH_REF_DIR/<sub>`), unless
/// `OCR_PATCH_REF_DIR` already holds `<probe>.safetensors`.
fn make_cases(sub: &str, probe: &str, args: &[&str]) -> Option<PathBuf> {
    {
        let Ok(upstream) = std::env::var("OCR_PATCH_UPSTREAM") else {
            eprintln!("skipping: set OCR_PATCH_UPSTREAM to the folder of DeepSeek-OCR's remote code to compare against it");
            return None;
        };
        if let Ok(d) = std::env::var("OCR_PATCH_REF_DIR") {
            let d = PathBuf::from(d).join(sub);
            if d.join(format!("{probe}.safetensors")).exists() {
                return Some(d);
            }
        }
        // Rewritten on every run, in one place: no temp folders pile up.
        let out = std::env::var("OCR_PATCH_REF_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| Path::new(env!("CARGO_TARGET_TMPDIR")).to_path_buf())
            .join(sub);
        let python = std::env::var("OCR_PATCH_REF_PYTHON")
            .unwrap_or_else(|_| "/root/.cache/tf-matrix/venv/bin/python".into());
        let pythonpath = std::env::var("OCR_PATCH_REF_PYTHONPATH")
            .unwrap_or_else(|_| "/root/.cache/tf-matrix/tf/4.46.3".into());
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/model_ref/make_ref.py");
        let run = std::process::Command::new(&python)
            .arg(&script)
            .arg(&upstream)
            .arg(&out)
            .args(args)
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
        Some(out)
    }
}

struct Case {
    weights: Weights,
    tensors: HashMap<String, Tensor>,
    config: serde_json::Value,
}

impl Case {
    fn open(name: &str) -> Option<Self> {
        Self::open_in(cases_dir()?, name)
    }

    fn open_in(dir: &Path, name: &str) -> Option<Self> {
        let path = dir.join(format!("{name}.safetensors"));
        let weights = Weights::open_files(std::slice::from_ref(&path)).unwrap();
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let config = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("config"))
            .expect("config metadata");
        Some(Self {
            weights,
            tensors,
            config: serde_json::from_str(config).unwrap(),
        })
    }

    fn vb(&self) -> candle_nn::VarBuilder<'static> {
        self.weights.var_builder(DType::F32, &Device::Cpu)
    }

    fn input(&self, k: &str) -> &Tensor {
        self.tensors
            .get(&format!("ref.input.{k}"))
            .unwrap_or_else(|| panic!("no input {k}"))
    }

    fn output(&self, k: &str) -> &Tensor {
        self.tensors
            .get(&format!("ref.output.{k}"))
            .unwrap_or_else(|| panic!("no output {k}"))
    }

    /// For each size `s`: `f(x{s})` against the recorded `y{s}` (within TOL).
    fn compare_sizes(&self, what: &str, sizes: &[usize], f: impl Fn(&Tensor) -> Tensor) {
        for s in sizes {
            let y = f(self.input(&format!("x{s}")));
            compare(&format!("{what} {s}"), &y, self.output(&format!("y{s}")), TOL);
        }
    }
}

/// Prints and returns the largest absolute difference; fails above `tol`.
fn compare(what: &str, got: &Tensor, want: &Tensor, tol: f32) -> f32 {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let d = (got.to_dtype(DType::F32).unwrap() - want)
        .unwrap()
        .abs()
        .unwrap();
    let max = d
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = want
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    println!("{what}: max |diff| = {max:.3e} (max |ref| = {scale:.3e})");
    assert!(max <= tol, "{what}: max |diff| {max} > {tol}");
    max
}

fn u(v: &serde_json::Value, k: &str) -> usize {
    v[k].as_u64().unwrap_or_else(|| panic!("config {k}")) as usize
}

#[test]
fn sam_matches_remote_code() {
    let Some(case) = Case::open("sam_small") else {
        return;
    };
    let c = &case.config;
    let cfg = SamConfig {
        img_size: u(c, "img_size"),
        embed_dim: u(c, "embed_dim"),
        depth: u(c, "depth"),
        num_heads: u(c, "num_heads"),
        global_attn_indexes: c["global_attn_indexes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect(),
        ..SamConfig::vit_b()
    };
    let sam = ImageEncoderViT::new(&cfg, case.vb().pp("model.sam_model")).unwrap();
    case.compare_sizes("sam, px:", &[256, 160, 384], |x| sam.forward(x).unwrap());
}

fn clip_config(c: &serde_json::Value) -> ClipConfig {
    ClipConfig {
        num_layers: u(c, "num_layers"),
        hidden_size: u(c, "hidden_size"),
        num_attention_heads: u(c, "num_attention_heads"),
        ffn_hidden_size: u(c, "ffn_hidden_size"),
        ..ClipConfig::clip_l()
    }
}

#[test]
fn clip_matches_remote_code() {
    let Some(case) = Case::open("clip_small") else {
        return;
    };
    let clip = VitModel::new(
        &clip_config(&case.config),
        case.vb().pp("model.vision_model"),
    )
    .unwrap();
    case.compare_sizes("clip, grid side:", &[10, 16, 20], |x| clip.forward(x).unwrap());
}

fn text_config(c: &serde_json::Value) -> TextConfig {
    let raw: DeepseekV2Config = serde_json::from_value(c.clone()).unwrap();
    TextConfig::resolve(&raw).unwrap()
}

/// Prefill (hidden states and logits) and cached greedy steps against the Python run.
fn check_decoder(name: &str, model: &DeepseekV2, case: &Case, embeds: Tensor, tol: f32) {
    let mut cache = model.new_cache();
    let out = model.forward_embeds(&embeds, &mut cache, true).unwrap();
    let hs = out.hidden_states.unwrap();
    for (i, h) in hs.iter().enumerate() {
        compare(
            &format!("{name} hidden[{i}]"),
            &h.squeeze(0).unwrap(),
            case.output(&format!("hidden.{i}")),
            tol,
        );
    }
    let logits = model
        .logits(&out.last_hidden_state)
        .unwrap()
        .squeeze(0)
        .unwrap();
    compare(
        &format!("{name} logits"),
        &logits,
        case.output("logits"),
        tol,
    );
    // Cached decoding: feed Python's greedy tokens one at a time.
    let toks: Vec<i64> = case
        .input("step_tokens")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let want = case.output("step_logits");
    for (i, &t) in toks.iter().enumerate() {
        let e = model
            .embed(&Tensor::new(&[[t as u32]], &Device::Cpu).unwrap())
            .unwrap();
        let o = model.forward_embeds(&e, &mut cache, false).unwrap();
        let l = model
            .logits(&o.last_hidden_state)
            .unwrap()
            .flatten_all()
            .unwrap();
        compare(
            &format!("{name} cached step {i}"),
            &l,
            &want.i(i).unwrap(),
            tol,
        );
    }
    assert_eq!(cache.seq_len(), embeds.dim(1).unwrap() + toks.len());
}

fn decoder_case(name: &str) {
    let Some(case) = Case::open(name) else { return };
    let cfg = text_config(&case.config);
    let model = DeepseekV2::new(&cfg, case.vb()).unwrap();
    let ids = case.input("ids").to_dtype(DType::U32).unwrap();
    let embeds = model.embed(&ids).unwrap();
    check_decoder(name, &model, &case, embeds, TOL);
}

#[test]
fn decoder_mla_group_limited_matches_remote_code() {
    decoder_case("decoder_mla_group");
}

#[test]
fn decoder_mla_noaux_tc_matches_remote_code() {
    decoder_case("decoder_mla_noaux");
}

#[test]
fn ocr_end_to_end_mha_matches_remote_code() {
    let Some(case) = Case::open("ocr_e2e_mha") else {
        return;
    };
    let c = &case.config;
    let text = text_config(&c["language"]);
    let s = &c["sam"];
    let vision = VisionConfig {
        sam: SamConfig {
            img_size: u(s, "img_size"),
            embed_dim: u(s, "embed_dim"),
            depth: u(s, "depth"),
            num_heads: u(s, "num_heads"),
            global_attn_indexes: vec![1],
            ..SamConfig::vit_b()
        },
        clip: clip_config(&c["clip"]),
        n_embed: 1280,
    };
    // The top-level model, as `DeepseekOCRForCausalLM` holds it.
    let ocr = DeepseekOcr::new(&text, &vision, case.vb()).unwrap();
    let (enc, model) = (&ocr.vision, &ocr.text);
    let glob = case.input("global");
    compare(
        "ocr global view features",
        &enc.encode_views(glob).unwrap(),
        case.output("global_view"),
        TOL,
    );
    let crop: Vec<i64> = case.input("crop").flatten_all().unwrap().to_vec1().unwrap();
    let ids = case.input("ids").to_dtype(DType::U32).unwrap();
    let mask: Vec<bool> = case
        .input("mask")
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap()
        .into_iter()
        .map(|m| m != 0)
        .collect();
    let image = ImageInput {
        global: glob,
        local: Some(LocalTiles {
            pixels: case.input("tiles"),
            width_crop_num: crop[0] as usize,
            height_crop_num: crop[1] as usize,
        }),
    };
    let embeds = ocr.prompt_embeds(&ids, &mask, &[image]).unwrap();
    check_decoder("ocr", model, &case, embeds.clone(), TOL);

    // The global view alone (Base/Tiny-like layout: rows + newlines + separator).
    let ids2 = case.input("global_only_ids").to_dtype(DType::U32).unwrap();
    let mask2: Vec<bool> = case
        .input("global_only_mask")
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap()
        .into_iter()
        .map(|m| m != 0)
        .collect();
    let e2 = ocr
        .prompt_embeds(
            &ids2,
            &mask2,
            &[ImageInput {
                global: glob,
                local: None,
            }],
        )
        .unwrap();
    let o2 = model
        .forward_embeds(&e2, &mut model.new_cache(), false)
        .unwrap();
    let l2 = model
        .logits(&o2.last_hidden_state)
        .unwrap()
        .squeeze(0)
        .unwrap();
    compare(
        "ocr global-only logits",
        &l2,
        case.output("global_only_logits"),
        TOL,
    );

    // Greedy generation through `generate` with the cached session reproduces Python's tokens.
    let mut cache = model.new_cache();
    let out = model.forward_embeds(&embeds, &mut cache, false).unwrap();
    let logits = model.logits(&out.last_hidden_state).unwrap();
    let t = logits.dim(1).unwrap();
    let first: Vec<f32> = logits.i((0, t - 1)).unwrap().to_vec1().unwrap();
    let want: Vec<u32> = case
        .input("step_tokens")
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect();
    let cfg = GenerationConfig {
        max_new_tokens: want.len(),
        stop_tokens: vec![],
        sampling: Sampling::Greedy,
        no_repeat: None,
        ngram_sees_prompt: false,
    };
    let mut session = DecoderSession {
        model: &model,
        cache,
    };
    let g = generate(&mut session, &[], first, &cfg, |_| {
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(g.tokens, want);

    // The same weights in f16 stay close: catches dtype slips (candle's CPU backend has no bf16
    // matmul; bf16, the checkpoint's dtype, runs on CUDA).
    let vb16 = case.weights.var_builder(DType::F16, &Device::Cpu);
    let enc16 = DeepEncoder::new(&vision, vb16.pp("model")).unwrap();
    let model16 = DeepseekV2::new(&text, vb16).unwrap();
    let rows16 = enc16
        .encode_image(
            &glob.to_dtype(DType::F16).unwrap(),
            Some(LocalTiles {
                pixels: &case.input("tiles").to_dtype(DType::F16).unwrap(),
                width_crop_num: crop[0] as usize,
                height_crop_num: crop[1] as usize,
            }),
        )
        .unwrap();
    let e16 = merge_image_features(
        &model16.embed(&ids).unwrap().squeeze(0).unwrap(),
        &mask,
        &rows16,
    )
    .unwrap()
    .unsqueeze(0)
    .unwrap();
    let mut c16 = model16.new_cache();
    let o16 = model16.forward_embeds(&e16, &mut c16, false).unwrap();
    let l16 = model16
        .logits(&o16.last_hidden_state)
        .unwrap()
        .squeeze(0)
        .unwrap();
    compare(
        "ocr logits in f16 (loose)",
        &l16,
        case.output("logits"),
        0.25,
    );
}

#[test]
fn real_size_vision_matches_remote_code() {
    if std::env::var("OCR_PATCH_REF_FULL").is_err() {
        eprintln!("skipping: set OCR_PATCH_REF_FULL=1 (with OCR_PATCH_UPSTREAM) for the real-size vision towers");
        return;
    }
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    let Some(dir) = DIR
        .get_or_init(|| make_cases("model_ref_real", "vision_real", &["--real-vision"]))
        .as_deref()
    else {
        return;
    };
    let case = Case::open_in(dir, "vision_real").unwrap();
    let vb = case.vb();
    let sam = ImageEncoderViT::new(&SamConfig::vit_b(), vb.pp("model.sam_model")).unwrap();
    let clip = VitModel::new(&ClipConfig::clip_l(), vb.pp("model.vision_model")).unwrap();
    let f1 = sam.forward(case.input("x")).unwrap();
    compare("real SAM-B 640px", &f1, case.output("sam"), TOL);
    let f2 = clip.forward(case.output("sam")).unwrap();
    compare("real CLIP-L on SAM's 10x10", &f2, case.output("clip"), TOL);
}
