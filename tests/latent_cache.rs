//! The MLA decoder's KV cache is latent: per token and layer it holds the normalised compressed
//! kv (`kv_lora_rank`) and the rotated shared RoPE key (`qk_rope_head_dim`), as the remote
//! code's absorbed MLA does, never the expanded per-head keys and values
//! (`num_heads * (qk_nope_head_dim + qk_rope_head_dim)` + `num_heads * v_head_dim`) that a
//! plain attention cache would hold. Measured here from the cache tensors themselves after a
//! prompt (golden/configs/mla.json, and the MHA cache of cpu.json for comparison);
//! docs/model-reference.md records the numbers, with transformers' cache measured on the GPU.
#![cfg(feature = "model")]

use candle_core::{DType, Device, Tensor};
use ocr_patch::model::decoder::attention::LayerCache;
use ocr_patch::model::{synth, DeepseekV2, OcrConfig};
use ocr_patch::verify::weights::Source;

fn config(name: &str) -> serde_json::Value {
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("golden/configs")
        .join(name);
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

/// Bytes per token per layer of every layer's cache after a `t`-token prompt, in `dtype`.
fn cache_bytes(cfg: &serde_json::Value, t: usize, dtype: DType) -> (Vec<usize>, Vec<LayerCache>) {
    let text = OcrConfig::from_json_str(&cfg.to_string())
        .unwrap()
        .text()
        .unwrap();
    let vb = Source::synth(cfg, 1, synth::DType::Bf16)
        .unwrap()
        .var_builder(&[], dtype, &Device::Cpu);
    let model = DeepseekV2::new(&text, vb).unwrap();
    let ids: Vec<u32> = (0..t as u32)
        .map(|i| (i * 37 + 5) % text.vocab_size as u32)
        .collect();
    let e = model
        .embed(
            &Tensor::new(ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        )
        .unwrap();
    let mut cache = model.new_cache();
    model.forward_embeds(&e, &mut cache, false).unwrap();
    assert_eq!(cache.seq_len(), t);
    let layers: Vec<LayerCache> = (0..text.num_hidden_layers)
        .map(|i| cache.layer(i).unwrap().clone())
        .collect();
    let bytes = layers
        .iter()
        .map(|l| {
            let ts: Vec<&Tensor> = match l {
                LayerCache::Mha { k, v } => vec![k, v],
                LayerCache::Mla {
                    compressed_kv,
                    k_pe,
                } => vec![compressed_kv, k_pe],
            };
            ts.iter()
                .map(|x| x.elem_count() * x.dtype().size_in_bytes())
                .sum::<usize>()
                / t
        })
        .collect();
    (bytes, layers)
}

#[test]
fn mla_cache_is_latent_and_ten_times_smaller_than_expanded_kv() {
    let cfg = config("mla.json");
    let g = |k: &str| cfg[k].as_u64().unwrap() as usize;
    let (heads, rank, rope, nope, v) = (
        g("num_attention_heads"),
        g("kv_lora_rank"),
        g("qk_rope_head_dim"),
        g("qk_nope_head_dim"),
        g("v_head_dim"),
    );
    // f32 (candle's CPU matmul has no bf16); the cache holds `dtype` values, so bf16 halves
    // both sides and the ratio is the same.
    for dtype in [DType::F32] {
        let (bytes, layers) = cache_bytes(&cfg, 12, dtype);
        let size = dtype.size_in_bytes();
        for (l, b) in layers.iter().zip(&bytes) {
            match l {
                LayerCache::Mla {
                    compressed_kv,
                    k_pe,
                } => {
                    assert_eq!(compressed_kv.dims(), [1, 12, rank]);
                    assert_eq!(k_pe.dims(), [1, 1, 12, rope]);
                }
                LayerCache::Mha { .. } => panic!("an MLA config built an MHA cache"),
            }
            // measured: (256 + 64) values per token per layer
            assert_eq!(*b, (rank + rope) * size);
        }
        // what a cache of expanded keys (nope + rope per head) and values would hold
        let expanded = heads * (nope + rope) * size + heads * v * size;
        assert_eq!(expanded, 3200 * size);
        assert_eq!(
            expanded / bytes[0],
            10,
            "latent {} B vs expanded {expanded} B per token per layer",
            bytes[0]
        );
    }
}

#[test]
fn mha_cache_holds_whole_heads() {
    let cfg = config("cpu.json");
    let heads = cfg["num_attention_heads"].as_u64().unwrap() as usize;
    let head_dim = cfg["hidden_size"].as_u64().unwrap() as usize / heads;
    let (bytes, layers) = cache_bytes(&cfg, 12, DType::F32);
    assert!(matches!(layers[0], LayerCache::Mha { .. }));
    for b in bytes {
        assert_eq!(b, 2 * heads * head_dim * 4); // k and v, 10 heads of 128, f32
    }
}
