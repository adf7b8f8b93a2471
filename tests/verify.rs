//! `ocr-patch verify`: the Rust model passes on the committed goldens, and fails, naming the
//! stage, when the model or a golden is perturbed (flip a weight, swap two layers, drop the
//! image_newline token, edit a golden's tensor).
#![cfg(feature = "model")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use assert_cmd::Command;
use ocr_patch::verify::{self, Options, Perturbation, Report};

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden").join(name)
}

fn run(goldens: &[PathBuf], perturb: Vec<Perturbation>) -> Report {
    let opts = Options {
        goldens: goldens.to_vec(),
        weights: None,
        device: candle_core::Device::Cpu,
        perturb,
    };
    verify::verify(&opts).expect("verify runs")
}

fn table(r: &Report) -> String {
    ocr_patch::cli::verify::render(r, true)
}

/// The first failing stage of the named golden.
fn first_failure<'a>(r: &'a Report, golden: &str) -> Option<&'a str> {
    r.goldens.iter().find(|g| g.golden == golden).and_then(|g| g.first_failure.as_deref())
}

#[test]
fn cpu_and_mla_goldens_pass_stage_by_stage() {
    let r = run(&[golden("cpu-tiny.safetensors"), golden("mla-tiny.safetensors")], vec![]);
    assert!(r.passed, "{}", table(&r));
    let names: Vec<&str> = r.goldens.iter().map(|g| g.golden.as_str()).collect();
    assert_eq!(names, ["cpu-tiny.safetensors", "mla-tiny.safetensors", "vision-tiny.safetensors"]);
    let vision: Vec<&str> = r.goldens[2].stages.iter().map(|s| s.stage.as_str()).collect();
    assert_eq!(vision, ["sam.global", "clip.global", "projector.global"]);
    // --json is the report itself.
    let v = serde_json::to_value(&r).unwrap();
    assert_eq!((v["passed"].as_bool(), v["goldens"][2]["stages"][0]["stage"].as_str()), (Some(true), Some("sam.global")));
    let lm: Vec<&str> = r.goldens[0].stages.iter().map(|s| s.stage.as_str()).collect();
    assert_eq!(
        lm,
        [
            "inputs_embeds",
            "layer.0",
            "layer.1",
            "layer.1.routing",
            "final_norm",
            "logits",
            "greedy.logits",
            "greedy.tokens"
        ]
    );
    for g in &r.goldens[..2] {
        let tokens = g.stages.iter().find(|s| s.stage == "greedy.tokens").unwrap();
        assert_eq!(tokens.top1, Some((32, 32)), "{}", table(&r));
        let logits = g.stages.iter().find(|s| s.stage == "greedy.logits").unwrap();
        assert!(logits.max_abs <= 1e-3, "{}", table(&r));
    }
}

#[test]
fn a_scaled_decoder_weight_fails_at_its_layer() {
    let r = run(
        &[golden("cpu-tiny.safetensors")],
        vec![Perturbation::Scale { name: "model.layers.1.self_attn.o_proj.weight".into(), factor: 1.001 }],
    );
    assert!(!r.passed);
    // Vision and everything before layer 1 still pass.
    assert_eq!(first_failure(&r, "vision-tiny.safetensors"), None, "{}", table(&r));
    assert_eq!(first_failure(&r, "cpu-tiny.safetensors"), Some("layer.1"), "{}", table(&r));
}

#[test]
fn swapped_sam_blocks_fail_at_sam() {
    let r = run(
        &[golden("vision-tiny.safetensors")],
        vec![Perturbation::Swap { a: "model.sam_model.blocks.0".into(), b: "model.sam_model.blocks.1".into() }],
    );
    assert_eq!(first_failure(&r, "vision-tiny.safetensors"), Some("sam.global"), "{}", table(&r));
}

#[test]
fn swapped_decoder_layers_fail_at_layer_0() {
    // Layer 0 is dense and layer 1 MoE: the attention halves (same shapes) trade places.
    let r = run(
        &[golden("mla-tiny.safetensors")],
        vec![Perturbation::Swap { a: "model.layers.0.self_attn".into(), b: "model.layers.1.self_attn".into() }],
    );
    assert_eq!(first_failure(&r, "mla-tiny.safetensors"), Some("layer.0"), "{}", table(&r));
    assert_eq!(first_failure(&r, "vision-tiny.safetensors"), None);
}

#[test]
fn a_dropped_image_newline_fails_at_the_image_merge() {
    let r = run(&[golden("cpu-tiny.safetensors")], vec![Perturbation::DropImageNewline]);
    assert_eq!(first_failure(&r, "cpu-tiny.safetensors"), Some("inputs_embeds"), "{}", table(&r));
    let g = r.goldens.iter().find(|g| g.golden == "cpu-tiny.safetensors").unwrap();
    assert!(g.stages[0].note.as_deref().unwrap_or("").contains("image tokens"), "{}", table(&r));
}

/// Rewrites a golden into `dir` with `edit` applied to its tensors (metadata kept).
fn edited_golden(dir: &Path, name: &str, edit: impl FnOnce(&mut HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>)) -> PathBuf {
    let bytes = std::fs::read(golden(name)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut tensors: HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let out = dir.join(name);
    safetensors::serialize_to_file(views, meta.metadata().clone(), &out).unwrap();
    // Its vision golden alongside, so the vision stages run too.
    std::fs::copy(golden("vision-tiny.safetensors"), dir.join("vision-tiny.safetensors")).unwrap();
    out
}

#[test]
fn a_golden_with_two_layers_swapped_fails_at_layer_0() {
    let dir = tempfile::tempdir().unwrap();
    let p = edited_golden(dir.path(), "cpu-tiny.safetensors", |t| {
        let a = t.remove("layer.0").unwrap();
        let b = t.remove("layer.1").unwrap();
        t.insert("layer.0".into(), b);
        t.insert("layer.1".into(), a);
    });
    let r = run(&[p], vec![]);
    assert_eq!(first_failure(&r, "cpu-tiny.safetensors"), Some("layer.0"), "{}", table(&r));
}

#[test]
fn a_golden_with_one_logit_flipped_fails_at_logits() {
    let dir = tempfile::tempdir().unwrap();
    let p = edited_golden(dir.path(), "mla-tiny.safetensors", |t| {
        let (_, _, b) = t.get_mut("logits").unwrap();
        let x = f32::from_le_bytes([b[40], b[41], b[42], b[43]]) + 0.01;
        b[40..44].copy_from_slice(&x.to_le_bytes());
    });
    let r = run(&[p], vec![]);
    assert_eq!(first_failure(&r, "mla-tiny.safetensors"), Some("logits"), "{}", table(&r));
}

/// One real run through the binary (exit 1, the stage named), then the argument errors (exit 2).
#[test]
fn cli_exit_codes() {
    let bin = || {
        let mut c = Command::cargo_bin("ocr-patch").unwrap();
        c.current_dir(env!("CARGO_MANIFEST_DIR"));
        c
    };
    let out = bin()
        .args(["verify", "--golden", "golden/vision-tiny.safetensors", "--perturb", "scale:model.sam_model.net_3.weight:1.01"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("FAIL at stage `sam.global`"), "{stdout}");

    if !cfg!(feature = "cuda") {
        let out = bin().args(["verify", "--device", "cuda"]).output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("built without cuda"));
    }
    let out = bin().args(["verify", "--against-python"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not yet"));
    let out = bin().args(["verify", "--golden", "Cargo.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
