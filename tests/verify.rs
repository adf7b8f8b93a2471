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
    let out = bin().args(["verify", "--golden", "Cargo.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// A golden's header names the sha256 of the weights it was made with; verify refuses other
/// weights (exit 2) before running anything.
#[test]
fn a_golden_made_with_other_weights_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(golden("cpu-tiny.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = meta.metadata().clone().unwrap();
    let right = meta["weights.sha256"].clone();
    meta.insert("weights.sha256".into(), "0".repeat(64));
    let views: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
    let p = dir.path().join("cpu-tiny.safetensors");
    safetensors::serialize_to_file(views, Some(meta), &p).unwrap();
    let opts = Options { goldens: vec![p.clone()], weights: None, device: candle_core::Device::Cpu, perturb: vec![] };
    let err = verify::verify(&opts).err().expect("a weights mismatch is an error").to_string();
    assert!(err.contains(&"0".repeat(64)) && err.contains(&right), "{err}");
    assert!(err.contains("not the weights the golden was made with"), "{err}");
    // (every verify error exits 2: `cli_exit_codes`; not run again here, hashing takes a while)
}

/// `--weights DIR`: a checkpoint folder (here the synthetic one the goldens were made with,
/// written as a file, as an HF snapshot holds its weights) is loaded instead of regenerating
/// the weights; its sha256 is the golden's. Another seed's checkpoint is refused.
#[test]
fn weights_from_a_checkpoint_folder() {
    let dir = tempfile::tempdir().unwrap();
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(golden("configs/mla.json")).unwrap()).unwrap();
    std::fs::copy(golden("configs/mla.json"), dir.path().join("config.json")).unwrap();
    let w = dir.path().join("model-00001-of-000001.safetensors");
    ocr_patch::model::synth::write_safetensors(&w, &cfg, 1, ocr_patch::model::synth::DType::Bf16).unwrap();
    let opts = Options {
        goldens: vec![golden("vision-tiny.safetensors")],
        weights: Some(dir.path().to_path_buf()),
        device: candle_core::Device::Cpu,
        perturb: vec![],
    };
    let r = verify::verify(&opts).expect("verify runs");
    assert!(r.passed, "{}", table(&r));
    assert_eq!(r.weights, dir.path().display().to_string());

    ocr_patch::model::synth::write_safetensors(&w, &cfg, 2, ocr_patch::model::synth::DType::Bf16).unwrap();
    let err = verify::verify(&opts).err().expect("another seed is refused").to_string();
    assert!(err.contains(&format!("the weights in {}", dir.path().display())), "{err}");
}

/// Rewrites a summary golden into `dir` with `edit` applied to one f32 tensor.
fn edited_summary(dir: &Path, name: &str, tensor: &str, edit: impl Fn(&mut [f32])) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/summary-group-tiny-f32.safetensors");
    let bytes = std::fs::read(src).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    for (n, _, _, b) in tensors.iter_mut().filter(|t| t.0 == tensor) {
        let mut v: Vec<f32> = b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        edit(&mut v);
        *b = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(n, tensor);
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let out = dir.join(name);
    safetensors::serialize_to_file(views, meta.metadata().clone(), &out).unwrap();
    out
}

/// Summary goldens (the GPU runs kept small, golden/gpu/README.md): the fixture is one made the
/// same way on the CPU (transformers 5.4.0 on the patched code, `group` config, tiny case,
/// f32); it passes, and an edited logit or norm fails at its stage.
#[test]
fn summary_goldens_pass_and_an_edited_one_fails_at_its_stage() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/summary-group-tiny-f32.safetensors");
    let logit = edited_summary(dir.path(), "logit.safetensors", "greedy.topk_values", |v| v[8 * 5 + 1] += 0.01);
    let norm = edited_summary(dir.path(), "norm.safetensors", "norms.hidden", |v| v[1] *= 1.001);
    let r = run(&[fixture, logit, norm], vec![]);
    let names: Vec<&str> = r.goldens[0].stages.iter().map(|s| s.stage.as_str()).collect();
    assert_eq!(
        names,
        ["vision_rows.norm", "inputs_embeds.norm", "layer.0.norm", "final_norm.norm", "greedy.topk_values", "greedy.tokens"]
    );
    assert!(r.goldens[0].passed, "{}", table(&r));
    let tokens = r.goldens[0].stages.iter().find(|s| s.stage == "greedy.tokens").unwrap();
    assert_eq!(tokens.top1, Some((32, 32)));
    assert_eq!(first_failure(&r, "logit.safetensors"), Some("greedy.topk_values"), "{}", table(&r));
    assert_eq!(first_failure(&r, "norm.safetensors"), Some("layer.0.norm"), "{}", table(&r));
}

/// The committed GPU summaries: what they say they are, and the fidelity they record.
#[test]
fn committed_gpu_summaries() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden/gpu");
    let open = |n: &str| verify::Golden::open(&dir.join(format!("{n}.safetensors"))).unwrap();
    for (name, layers, tf, state) in [
        ("real-base-bf16", 12, "5.17.0", "patched"),
        ("real-base-f32", 12, "5.17.0", "patched"),
        ("orig446-real-base-bf16", 12, "4.46.3", "original"),
        ("orig446-real-base-f32", 12, "4.46.3", "original"),
        ("group-base-f32", 2, "5.17.0", "patched"),
        ("group-base-bf16", 2, "5.17.0", "patched"),
        ("orig446-mla-base-f32", 2, "4.46.3", "original"),
        ("orig446-mla-base-bf16", 2, "4.46.3", "original"),
    ] {
        let g = open(name);
        assert_eq!(g.kind, verify::Kind::Summary, "{name}");
        assert_eq!((g.meta("transformers.version"), g.meta("remote_code.state")), (tf, state), "{name}");
        assert!(g.meta("device").contains("H100"), "{name}");
        assert_eq!(g.meta("dtype"), if name.ends_with("bf16") { "bfloat16" } else { "float32" });
        assert_eq!(g.meta("weights.sha256").len(), 64);
        assert_eq!(g.tensor("greedy.tokens").unwrap().shape, [32]);
        assert_eq!(g.tensor("greedy.topk_values").unwrap().shape, [32, 8]);
        assert_eq!(g.tensor("norms.hidden").unwrap().shape, [layers + 1]);
    }
    // Patched code on 5.17 and original code on 4.46.3 chose the same 32 tokens, f32 and bf16.
    for dt in ["bf16", "f32"] {
        let a = open(&format!("real-base-{dt}")).int_tensor("greedy.tokens").unwrap();
        let b = open(&format!("orig446-real-base-{dt}")).int_tensor("greedy.tokens").unwrap();
        assert_eq!(a, b, "{dt}");
    }
    // The small config's weights hash is the synthetic file's, computed in memory.
    let g = open("group-base-f32");
    let sha = verify::weights::synth_sha256(&g.config, 1, ocr_patch::model::synth::DType::Bf16, Some(g.meta("synth.tool"))).unwrap();
    assert_eq!(sha, g.meta("weights.sha256"));
}
