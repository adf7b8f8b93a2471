//! Synthetic weights: names and shapes against the real checkpoint's index, determinism, dtype,
//! scale. Tests that need `../shared/data/deepseek-ocr` skip (saying so) where it is absent.
#![cfg(feature = "model")]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use ocr_patch::model::synth::{self, DType, Init, SynthError, TensorSpec};
use serde_json::{json, Value};

fn shared_data() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/deepseek-ocr");
    if dir.join("model.safetensors.index.json").is_file() && dir.join("config.json").is_file() {
        Some(dir)
    } else {
        eprintln!(
            "skipped: {} is absent (it holds the Hub's config and index)",
            dir.display()
        );
        None
    }
}

fn read_json(path: PathBuf) -> Value {
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn golden_config(name: &str) -> Value {
    read_json(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("golden/configs/{name}.json")))
}

fn shapes(specs: &[TensorSpec]) -> BTreeMap<String, Vec<usize>> {
    specs
        .iter()
        .map(|s| (s.name.clone(), s.shape.clone()))
        .collect()
}

fn spec<'a>(specs: &'a [TensorSpec], name: &str) -> &'a TensorSpec {
    specs
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("{name} not in the plan"))
}

#[test]
fn real_config_gives_exactly_the_checkpoint_names_and_size() {
    let Some(dir) = shared_data() else { return };
    let config = read_json(dir.join("config.json"));
    let index = read_json(dir.join("model.safetensors.index.json"));
    let want: BTreeSet<String> = index["weight_map"]
        .as_object()
        .expect("weight_map is an object")
        .keys()
        .cloned()
        .collect();
    let specs = synth::plan(&config).expect("plan of the real config");
    let got: BTreeSet<String> = specs.iter().map(|s| s.name.clone()).collect();
    assert_eq!(got.len(), specs.len(), "duplicate names in the plan");
    let missing: Vec<_> = want.difference(&got).collect();
    let extra: Vec<_> = got.difference(&want).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, extra {extra:?}"
    );
    assert_eq!(got.len(), 2710);
    // The index records the checkpoint's bf16 byte size: the shapes must add up to it exactly.
    let bytes: u64 = specs.iter().map(|s| s.numel() as u64 * 2).sum();
    assert_eq!(
        bytes,
        index["metadata"]["total_size"]
            .as_u64()
            .expect("total_size")
    );
}

#[test]
fn real_config_shapes_read_from_the_remote_code() {
    let Some(dir) = shared_data() else { return };
    let specs = synth::plan(&read_json(dir.join("config.json"))).expect("plan");
    let s = shapes(&specs);
    let cases: &[(&str, &[usize])] = &[
        ("model.embed_tokens.weight", &[129280, 1280]),
        ("lm_head.weight", &[129280, 1280]),
        ("model.layers.0.mlp.gate_proj.weight", &[6848, 1280]),
        ("model.layers.0.self_attn.q_proj.weight", &[1280, 1280]),
        ("model.layers.0.self_attn.k_proj.weight", &[1280, 1280]),
        (
            "model.layers.11.mlp.experts.63.down_proj.weight",
            &[1280, 896],
        ),
        ("model.layers.1.mlp.gate.weight", &[64, 1280]),
        (
            "model.layers.1.mlp.shared_experts.up_proj.weight",
            &[1792, 1280],
        ),
        ("model.sam_model.pos_embed", &[1, 64, 64, 768]),
        ("model.sam_model.blocks.0.attn.rel_pos_h", &[27, 64]),
        ("model.sam_model.blocks.2.attn.rel_pos_w", &[127, 64]),
        ("model.sam_model.neck.0.weight", &[256, 768, 1, 1]),
        ("model.sam_model.net_3.weight", &[1024, 512, 3, 3]),
        (
            "model.vision_model.embeddings.position_embedding.weight",
            &[257, 1024],
        ),
        (
            "model.vision_model.embeddings.patch_embedding.weight",
            &[1024, 3, 14, 14],
        ),
        (
            "model.vision_model.transformer.layers.23.self_attn.qkv_proj.weight",
            &[3072, 1024],
        ),
        ("model.projector.layers.weight", &[1280, 2048]),
        ("model.image_newline", &[1280]),
        ("model.view_seperator", &[1280]),
    ];
    for (name, shape) in cases {
        assert_eq!(s.get(*name).map(Vec::as_slice), Some(*shape), "{name}");
    }
}

#[test]
fn reduced_configs_keep_the_full_vision_tower() {
    let vision = |c: &Value| -> BTreeMap<String, Vec<usize>> {
        shapes(&synth::plan(c).expect("plan"))
            .into_iter()
            .filter(|(n, _)| {
                !n.starts_with("model.layers.")
                    && !n.starts_with("model.embed")
                    && !n.starts_with("lm_head")
                    && n != "model.norm.weight"
            })
            .collect()
    };
    let cpu = vision(&golden_config("cpu"));
    // SAM 179 + CLIP 293 + projector 2 + image_newline + view_seperator
    assert_eq!(cpu.len(), 476);
    assert_eq!(cpu, vision(&golden_config("mla")));
    assert_eq!(cpu, vision(&golden_config("group")));
    if let Some(dir) = shared_data() {
        assert_eq!(cpu, vision(&read_json(dir.join("config.json"))));
    }
}

#[test]
fn cpu_config_has_one_dense_and_one_moe_layer() {
    let specs = synth::plan(&golden_config("cpu")).expect("plan");
    let s = shapes(&specs);
    assert_eq!(s["model.embed_tokens.weight"], [1024, 1280]);
    assert_eq!(s["lm_head.weight"], [1024, 1280]);
    assert_eq!(s["model.layers.0.mlp.up_proj.weight"], [6848, 1280]);
    assert!(!s.contains_key("model.layers.0.mlp.gate.weight"));
    assert_eq!(s["model.layers.1.mlp.gate.weight"], [8, 1280]);
    assert_eq!(
        s["model.layers.1.mlp.experts.7.gate_proj.weight"],
        [896, 1280]
    );
    assert!(!s.contains_key("model.layers.1.mlp.experts.8.gate_proj.weight"));
    assert_eq!(
        s["model.layers.1.mlp.shared_experts.down_proj.weight"],
        [1280, 1792]
    );
    assert!(!s.keys().any(|k| k.starts_with("model.layers.2.")));
    // group-limited routing changes no tensor
    assert_eq!(
        s,
        shapes(&synth::plan(&golden_config("group")).expect("plan"))
    );
}

#[test]
fn mla_config_has_latent_attention_tensors() {
    let specs = synth::plan(&golden_config("mla")).expect("plan");
    let s = shapes(&specs);
    let a = "model.layers.1.self_attn";
    assert_eq!(s[&format!("{a}.q_a_proj.weight")], [384, 1280]);
    assert_eq!(s[&format!("{a}.q_a_layernorm.weight")], [384]);
    assert_eq!(s[&format!("{a}.q_b_proj.weight")], [10 * (128 + 64), 384]);
    assert_eq!(
        s[&format!("{a}.kv_a_proj_with_mqa.weight")],
        [256 + 64, 1280]
    );
    assert_eq!(s[&format!("{a}.kv_a_layernorm.weight")], [256]);
    assert_eq!(s[&format!("{a}.kv_b_proj.weight")], [10 * (128 + 128), 256]);
    assert_eq!(s[&format!("{a}.o_proj.weight")], [1280, 10 * 128]);
    assert!(!s.contains_key(&format!("{a}.k_proj.weight")));
    assert!(!s.contains_key(&format!("{a}.q_proj.weight")));
    assert_eq!(
        spec(&specs, &format!("{a}.kv_a_layernorm.weight")).init,
        Init::Const(1.0)
    );
}

fn small_lm(extra: Value) -> Value {
    let mut c = json!({
        "hidden_size": 1280, "vocab_size": 64, "num_hidden_layers": 1, "num_attention_heads": 10,
        "intermediate_size": 256, "use_mla": false
    });
    for (k, v) in extra.as_object().expect("object") {
        c[k] = v.clone();
    }
    c
}

#[test]
fn absent_keys_take_the_python_defaults() {
    // DeepseekV2Config defaults: use_mla true, q_lora_rank 1536, kv_lora_rank 512, rope 64,
    // nope 128, v 128; no routed experts.
    let mut c = small_lm(json!({}));
    c.as_object_mut().expect("object").remove("use_mla");
    let s = shapes(&synth::plan(&c).expect("plan"));
    assert_eq!(s["model.layers.0.self_attn.q_a_proj.weight"], [1536, 1280]);
    assert_eq!(
        s["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"],
        [512 + 64, 1280]
    );
    assert_eq!(s["model.layers.0.mlp.gate_proj.weight"], [256, 1280]);
}

#[test]
fn optional_tensors_follow_their_switches() {
    let s = shapes(
        &synth::plan(&small_lm(
            json!({"attention_bias": true, "num_key_value_heads": 2}),
        ))
        .expect("plan"),
    );
    assert_eq!(s["model.layers.0.self_attn.q_proj.bias"], [1280]);
    assert_eq!(s["model.layers.0.self_attn.k_proj.weight"], [256, 1280]);
    assert_eq!(s["model.layers.0.self_attn.o_proj.bias"], [1280]);
    let s = shapes(
        &synth::plan(&small_lm(
            json!({"n_routed_experts": 4, "topk_method": "noaux_tc", "moe_layer_freq": 1}),
        ))
        .expect("plan"),
    );
    assert_eq!(s["model.layers.0.mlp.gate.e_score_correction_bias"], [4]);
    assert!(!s.contains_key("model.layers.0.mlp.shared_experts.up_proj.weight"));
}

#[test]
fn bad_configs_are_refused_with_the_key() {
    let err = |c: Value| match synth::plan(&c) {
        Err(SynthError::Config { key, .. }) => key,
        other => panic!("expected a config error, got {other:?}"),
    };
    assert_eq!(err(small_lm(json!({"hidden_size": 1024}))), "hidden_size");
    assert_eq!(
        err(small_lm(json!({"use_mla": true, "kv_lora_rank": null}))),
        "kv_lora_rank"
    );
    assert_eq!(err(small_lm(json!({"vocab_size": "many"}))), "vocab_size");
    assert_eq!(err(json!([1, 2])), "<root>");
    assert!("bf17".parse::<DType>().is_err());
    assert_eq!("BF16".parse::<DType>().ok(), Some(DType::Bf16));
}

fn q_proj() -> TensorSpec {
    TensorSpec {
        name: "model.layers.0.self_attn.q_proj.weight".into(),
        shape: vec![1280, 1280],
        init: Init::Uniform {
            std: 1.0 / 1280f64.sqrt(),
        },
    }
}

#[test]
fn same_seed_same_bytes_other_seed_or_name_other_bytes() {
    let a = synth::generate(&q_proj(), 7, DType::Bf16);
    assert_eq!(a, synth::generate(&q_proj(), 7, DType::Bf16));
    assert_ne!(a.data, synth::generate(&q_proj(), 8, DType::Bf16).data);
    let mut other = q_proj();
    other.name = "model.layers.1.self_attn.q_proj.weight".into();
    assert_ne!(a.data, synth::generate(&other, 7, DType::Bf16).data);
}

#[test]
fn values_are_a_pure_function_of_the_index() {
    // Chunked parallel filling must equal the per-element definition, across chunk borders.
    let s = q_proj();
    let t = synth::generate(&s, 3, DType::F32).to_f32();
    let key = synth::tensor_key(3, &s.name);
    let amp = (1.0 / 1280f64.sqrt()) * 3f64.sqrt();
    for i in [0usize, 1, 65535, 65536, 65537, 1_000_000, 1280 * 1280 - 1] {
        assert_eq!(
            t[i],
            (synth::unit(key, i as u64) * amp) as f32,
            "element {i}"
        );
    }
}

#[test]
fn bf16_is_the_f32_value_rounded() {
    let s = q_proj();
    let f = synth::generate(&s, 5, DType::F32);
    let b = synth::generate(&s, 5, DType::Bf16);
    assert_eq!(
        (f.data.len(), b.data.len()),
        (1280 * 1280 * 4, 1280 * 1280 * 2)
    );
    assert_eq!(b.shape, [1280, 1280]);
    let want: Vec<f32> = f
        .to_f32()
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_f32())
        .collect();
    assert_eq!(b.to_f32(), want);
}

#[test]
fn the_algorithm_is_pinned() {
    // ocrp-synth-v1. If this fails the bytes changed: bump synth::ALGORITHM and regenerate
    // every golden file.
    assert_eq!(synth::ALGORITHM, "ocrp-synth-v1");
    let s = TensorSpec {
        name: "model.image_newline".into(),
        shape: vec![4],
        init: Init::Uniform { std: 1.0 },
    };
    let got = synth::generate(&s, 0, DType::F32).to_f32();
    let want = PINNED;
    assert_eq!(got, want, "got {got:?}");
}

// Cross-checked with an independent Python implementation of the documented algorithm.
const PINNED: [f32; 4] = [1.0357236, -1.1310774, -0.9395896, 1.6897453];

fn stats(v: &[f32]) -> (f64, f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    let max = v.iter().map(|&x| (x as f64).abs()).fold(0.0, f64::max);
    (mean, var.sqrt(), max)
}

#[test]
fn scales_are_those_of_an_initialiser() {
    let specs = synth::plan(&golden_config("cpu")).expect("plan");
    let check = |name: &str, std: f64| {
        let v = synth::generate(spec(&specs, name), 1, DType::Bf16).to_f32();
        let (mean, sd, max) = stats(&v);
        let n = v.len() as f64;
        assert!(mean.abs() < 5.0 * std / n.sqrt(), "{name}: mean {mean}");
        assert!(
            (sd / std - 1.0).abs() < 0.05 + 3.0 / n.sqrt(),
            "{name}: std {sd}, want {std}"
        );
        assert!(max <= 3f64.sqrt() * std * 1.01, "{name}: max {max}");
    };
    check(
        "model.layers.0.self_attn.q_proj.weight",
        1.0 / 1280f64.sqrt(),
    );
    check("model.layers.0.mlp.down_proj.weight", 1.0 / 6848f64.sqrt());
    check("model.layers.1.mlp.gate.weight", 1.0 / 1280f64.sqrt());
    check(
        "model.sam_model.neck.2.weight",
        1.0 / (256.0 * 9.0f64).sqrt(),
    );
    check("model.sam_model.blocks.3.attn.qkv.bias", synth::BIAS_STD);
    check("model.embed_tokens.weight", synth::EMBED_STD);
    check("lm_head.weight", 1.0 / 1280f64.sqrt());
    check("model.image_newline", 1.0 / 1280f64.sqrt());
    for name in [
        "model.norm.weight",
        "model.layers.1.input_layernorm.weight",
        "model.sam_model.neck.1.weight",
        "model.vision_model.pre_layrnorm.weight",
    ] {
        let v = synth::generate(spec(&specs, name), 1, DType::Bf16).to_f32();
        assert!(v.iter().all(|&x| x == 1.0), "{name} is not all ones");
    }
}

#[test]
fn written_file_is_deterministic_and_readable() {
    let specs = vec![
        q_proj(),
        TensorSpec {
            name: "model.norm.weight".into(),
            shape: vec![1280],
            init: Init::Const(1.0),
        },
        TensorSpec {
            name: "a.conv".into(),
            shape: vec![2, 3, 3, 3],
            init: Init::Uniform { std: 0.1 },
        },
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let meta: BTreeMap<String, String> = [
        ("format".to_string(), "pt".to_string()),
        ("ocrp.synth.seed".to_string(), "9".to_string()),
    ]
    .into();
    let (p1, p2) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    for (p, dtype) in [(&p1, DType::Bf16), (&p2, DType::Bf16)] {
        let s = synth::write_specs(p, &specs, 9, dtype, &meta).expect("write");
        assert_eq!(s.tensors, 3);
        assert_eq!(s.bytes, std::fs::metadata(p).expect("stat").len());
    }
    let bytes = std::fs::read(&p1).expect("read");
    assert_eq!(
        bytes,
        std::fs::read(&p2).expect("read"),
        "two writes differ"
    );
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).expect("header");
    assert_eq!(
        header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("ocrp.synth.seed"))
            .map(String::as_str),
        Some("9")
    );
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse");
    let mut names = st.names();
    names.sort();
    assert_eq!(
        names,
        [
            "a.conv",
            "model.layers.0.self_attn.q_proj.weight",
            "model.norm.weight"
        ]
    );
    for s in &specs {
        let t = st.tensor(&s.name).expect("tensor");
        assert_eq!(t.dtype(), safetensors::Dtype::BF16);
        assert_eq!(t.shape(), s.shape.as_slice());
        assert_eq!(
            t.data(),
            synth::generate(s, 9, DType::Bf16).data.as_slice(),
            "{}",
            s.name
        );
    }
}

#[test]
fn metadata_names_the_algorithm_and_config() {
    let c = golden_config("cpu");
    let m = synth::metadata(&c, 3, DType::F32);
    assert_eq!(m["format"], "pt");
    assert_eq!(m["ocrp.synth.algorithm"], synth::ALGORITHM);
    assert_eq!(m["ocrp.synth.seed"], "3");
    assert_eq!(m["ocrp.synth.dtype"], "f32");
    // key order in the file does not change the hash
    let mut shuffled = serde_json::Map::new();
    let obj = c.as_object().expect("object");
    for k in obj.keys().rev() {
        shuffled.insert(k.clone(), obj[k].clone());
    }
    assert_eq!(
        synth::config_sha256(&Value::Object(shuffled)),
        m["ocrp.synth.config_sha256"]
    );
}

/// `cargo test --release --test synth -- --ignored --nocapture synth_speed`: generation speed
/// of the real model without writing (the file write is bound by the disk).
#[test]
#[ignore]
fn synth_speed_real() {
    let Some(dir) = shared_data() else { return };
    let specs = synth::plan(&read_json(dir.join("config.json"))).expect("plan");
    let largest = specs.iter().map(TensorSpec::numel).max().unwrap_or(0);
    let mut buf = vec![0u8; largest * 2];
    let t = std::time::Instant::now();
    let mut n = 0u64;
    for s in &specs {
        synth::fill(s, 1, DType::Bf16, &mut buf[..s.numel() * 2]);
        n += s.numel() as u64;
    }
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "{n} params in {secs:.2}s on {} threads: {:.0} M params/s",
        rayon::current_num_threads(),
        n as f64 / secs / 1e6
    );
}
