//! Deterministic synthetic weights for any DeepSeek-OCR config.
//!
//! No real weights can be downloaded where this project is built and tested, so correctness is
//! proven on synthetic weights of the real names and shapes. This module owns:
//!
//! * the **plan**: every tensor name and shape the remote code's `DeepseekOCRForCausalLM` holds for
//!   a given `config.json` (the vision tower's sizes are hard-coded in `deepencoder.py`, the
//!   language model's come from the config's top-level fields, which is what the remote code
//!   reads), with an initialiser per tensor;
//! * the **values**: a counter-based generator, so that every element is a pure function of
//!   `(seed, tensor name, element index)`: the bytes are the same on every machine, in any order,
//!   on any number of threads;
//! * **writing** a `.safetensors` file one tensor at a time (never two copies of the model in
//!   memory) with a deterministic header, atomically (temp file in the same folder, fsync, rename).
//!
//! It must not touch `patch` or `cache`, and it never reads weights.
//!
//! # The algorithm (`ocrp-synth-v1`)
//!
//! ```text
//! mix64(z)  = SplitMix64's finaliser: z ^= z>>30; z *= 0xBF58476D1CE4E5B9;
//!                                      z ^= z>>27; z *= 0x94D049BB133111EB; z ^= z>>31
//! G         = 0x9E3779B97F4A7C15
//! key(name) = mix64(seed + G) XOR u64_le(sha256(name)[0..8])
//! bits(i)   = mix64(key + (i + 1) * G)          (wrapping u64 arithmetic; i = flat index)
//! u(i)      = (2 * (bits(i) >> 40) + 1) / 2^24 - 1        in (-1, 1), 2^24 symmetric levels
//! value(i)  = f32(u(i) * sqrt(3) * std)   (computed in f64, rounded once to f32)
//! ```
//!
//! so each tensor is uniform with the given standard deviation; constant tensors (norm weights)
//! ignore the generator. bf16 is the f32 value rounded to nearest-even. The initialisers:
//!
//! | tensor | init |
//! |---|---|
//! | linear / conv weight | std `1/sqrt(fan_in)` (fan_in = in * kh * kw) |
//! | any bias (linear, conv, LayerNorm) | std [`BIAS_STD`] |
//! | RMSNorm / LayerNorm / LayerNorm2d weight | 1 |
//! | `model.embed_tokens.weight` | std [`EMBED_STD`] |
//! | `lm_head.weight`, MoE `gate.weight` | std `1/sqrt(hidden)` |
//! | SAM `pos_embed`, `rel_pos_h/w`; CLIP `class_embedding`, `position_embedding` | std [`POS_STD`] |
//! | `image_newline`, `view_seperator` | std `1/sqrt(1280)` (as the remote code's own init) |
//!
//! Changing any of this changes the bytes: bump [`ALGORITHM`] and regenerate the goldens.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rayon::prelude::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Name and version of the value generator and initialiser table; written into every file.
pub const ALGORITHM: &str = "ocrp-synth-v1";

/// One line describing [`ALGORITHM`], written into the file's metadata.
pub const ALGORITHM_DOC: &str = "per tensor key = splitmix64_mix(seed + 0x9E3779B97F4A7C15) ^ \
u64_le(sha256(name)[:8]); element i = splitmix64_mix(key + (i+1)*0x9E3779B97F4A7C15); \
u = (2*(bits>>40)+1)/2^24 - 1; value = f32(u*sqrt(3)*std); norm weights = 1; \
linear/conv std 1/sqrt(fan_in); biases 0.02; embed_tokens 0.5; lm_head, gate 1/sqrt(hidden); \
pos/rel_pos/class embeddings 0.02; image_newline, view_seperator 1/sqrt(1280)";

/// Standard deviation of every bias (linear, conv and LayerNorm biases).
pub const BIAS_STD: f64 = 0.02;
/// Standard deviation of `model.embed_tokens.weight`. Chosen by running greedy decoding on the
/// `cpu` config: at 0.02 (a trained-model-like size) the image features (rms ~4) swamp the new
/// token's embedding and greedy decoding repeats one token forever; at 0.5 the next token
/// depends on both the token and the context (16 distinct tokens in 32 steps); at 1.0 it
/// depends on the token alone (a 6-token cycle), which would hide KV-cache bugs.
pub const EMBED_STD: f64 = 0.5;
/// Standard deviation of learnt position tables and class tokens in the vision tower.
pub const POS_STD: f64 = 0.02;

/// Width of the vision features fed to the language model; hard-coded in the remote code
/// (`n_embed = 1280` in `DeepseekOCRModel.__init__`).
pub const N_EMBED: usize = 1280;

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// Element type of the synthetic weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// bfloat16, the checkpoint's own dtype.
    Bf16,
    /// float32.
    F32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::Bf16 => 2,
            DType::F32 => 4,
        }
    }

    /// The dtype's name in a safetensors header.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::Bf16 => "BF16",
            DType::F32 => "F32",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::Bf16 => "bf16",
            DType::F32 => "f32",
        })
    }
}

impl FromStr for DType {
    type Err = SynthError;
    fn from_str(s: &str) -> Result<Self, SynthError> {
        match s.to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" => Ok(DType::Bf16),
            "f32" | "float32" | "fp32" => Ok(DType::F32),
            _ => Err(SynthError::DType(s.to_string())),
        }
    }
}

/// How one tensor is filled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Uniform in `(-sqrt(3)*std, sqrt(3)*std)`, from the counter-based generator.
    Uniform {
        /// Standard deviation.
        std: f64,
    },
    /// Every element the same (norm weights).
    Const(f32),
}

/// One tensor of the plan: its checkpoint name, its shape and its initialiser.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    /// The checkpoint's own key, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// Shape, outermost first (PyTorch order).
    pub shape: Vec<usize>,
    /// How the values are made.
    pub init: Init,
}

impl TensorSpec {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A generated tensor in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorData {
    /// Element type of `data`.
    pub dtype: DType,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Little-endian bytes, row-major.
    pub data: Vec<u8>,
}

impl TensorData {
    /// The values as f32 (exact for both dtypes).
    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            DType::F32 => self
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            DType::Bf16 => self
                .data
                .chunks_exact(2)
                .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                .collect(),
        }
    }
}

/// What can go wrong while planning or writing synthetic weights.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// A config field is missing, null where a number is needed, or of the wrong type.
    #[error("config: `{key}` {problem}")]
    Config {
        /// The config.json key.
        key: String,
        /// What is wrong with it, and what to do.
        problem: String,
    },
    /// An unknown dtype name.
    #[error("unknown dtype `{0}`; use bf16 or f32")]
    DType(String),
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

fn config_err(key: &str, problem: impl Into<String>) -> SynthError {
    SynthError::Config {
        key: key.to_string(),
        problem: problem.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Config

/// The language-model fields the plan needs, resolved with `DeepseekV2Config`'s defaults
/// (`configuration_deepseek_v2.py`): a key that is absent takes the Python default, a key that
/// is `null` stays `None`. Read from the config's top level, as the remote code does
/// (`DeepseekOCRConfig` is a `DeepseekV2Config` built from the whole `config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct LmShape {
    /// `vocab_size` (default 102400).
    pub vocab_size: usize,
    /// `hidden_size` (default 4096; must be [`N_EMBED`] for the vision features to fit).
    pub hidden_size: usize,
    /// `intermediate_size` of dense MLP layers (default 11008).
    pub intermediate_size: usize,
    /// `moe_intermediate_size` of each expert (default 1407).
    pub moe_intermediate_size: usize,
    /// `num_hidden_layers` (default 30).
    pub num_hidden_layers: usize,
    /// `num_attention_heads` (default 32).
    pub num_attention_heads: usize,
    /// `num_key_value_heads` (default: `num_attention_heads`).
    pub num_key_value_heads: usize,
    /// `head_dim` for the MHA path (transformers' `LlamaAttention` reads it when present, else
    /// `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// `n_shared_experts` (default None).
    pub n_shared_experts: Option<usize>,
    /// `n_routed_experts` (default None: no MoE at all).
    pub n_routed_experts: Option<usize>,
    /// `first_k_dense_replace` (default 0).
    pub first_k_dense_replace: usize,
    /// `moe_layer_freq` (default 1).
    pub moe_layer_freq: usize,
    /// `topk_method` (default "gready", sic); `noaux_tc` adds `e_score_correction_bias`.
    pub topk_method: String,
    /// `use_mla` (default **true** in the Python class; the real config sets false).
    pub use_mla: bool,
    /// `q_lora_rank` (default 1536; null = plain `q_proj`).
    pub q_lora_rank: Option<usize>,
    /// `kv_lora_rank` (default 512).
    pub kv_lora_rank: Option<usize>,
    /// `qk_rope_head_dim` (default 64).
    pub qk_rope_head_dim: usize,
    /// `qk_nope_head_dim` (default 128).
    pub qk_nope_head_dim: usize,
    /// `v_head_dim` (default 128).
    pub v_head_dim: usize,
    /// `attention_bias` (default false).
    pub attention_bias: bool,
}

fn opt_usize(cfg: &Value, key: &str, default: Option<usize>) -> Result<Option<usize>, SynthError> {
    match cfg.get(key) {
        None => Ok(default),
        Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|x| Some(x as usize))
            .ok_or_else(|| config_err(key, format!("is {v}, expected a non-negative integer"))),
    }
}

fn req_usize(cfg: &Value, key: &str, default: usize) -> Result<usize, SynthError> {
    opt_usize(cfg, key, Some(default))?.ok_or_else(|| config_err(key, "is null; give it a number"))
}

fn get_bool(cfg: &Value, key: &str, default: bool) -> Result<bool, SynthError> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(config_err(key, format!("is {v}, expected true or false"))),
    }
}

fn get_str(cfg: &Value, key: &str, default: &str) -> Result<String, SynthError> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(default.to_string()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(config_err(key, format!("is {v}, expected a string"))),
    }
}

impl LmShape {
    /// Resolves the language-model fields of a DeepSeek-OCR `config.json`.
    pub fn from_config(cfg: &Value) -> Result<Self, SynthError> {
        if !cfg.is_object() {
            return Err(config_err(
                "<root>",
                "is not a JSON object; pass a config.json",
            ));
        }
        let hidden_size = req_usize(cfg, "hidden_size", 4096)?;
        let num_attention_heads = req_usize(cfg, "num_attention_heads", 32)?;
        if num_attention_heads == 0 {
            return Err(config_err("num_attention_heads", "is 0"));
        }
        let num_key_value_heads =
            opt_usize(cfg, "num_key_value_heads", None)?.unwrap_or(num_attention_heads);
        let head_dim =
            opt_usize(cfg, "head_dim", None)?.unwrap_or(hidden_size / num_attention_heads);
        let s = LmShape {
            vocab_size: req_usize(cfg, "vocab_size", 102400)?,
            hidden_size,
            intermediate_size: req_usize(cfg, "intermediate_size", 11008)?,
            moe_intermediate_size: req_usize(cfg, "moe_intermediate_size", 1407)?,
            num_hidden_layers: req_usize(cfg, "num_hidden_layers", 30)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            n_shared_experts: opt_usize(cfg, "n_shared_experts", None)?,
            n_routed_experts: opt_usize(cfg, "n_routed_experts", None)?,
            first_k_dense_replace: req_usize(cfg, "first_k_dense_replace", 0)?,
            moe_layer_freq: req_usize(cfg, "moe_layer_freq", 1)?,
            topk_method: get_str(cfg, "topk_method", "gready")?,
            use_mla: get_bool(cfg, "use_mla", true)?,
            q_lora_rank: opt_usize(cfg, "q_lora_rank", Some(1536))?,
            kv_lora_rank: opt_usize(cfg, "kv_lora_rank", Some(512))?,
            qk_rope_head_dim: req_usize(cfg, "qk_rope_head_dim", 64)?,
            qk_nope_head_dim: req_usize(cfg, "qk_nope_head_dim", 128)?,
            v_head_dim: req_usize(cfg, "v_head_dim", 128)?,
            attention_bias: get_bool(cfg, "attention_bias", false)?,
        };
        if s.hidden_size != N_EMBED {
            return Err(config_err(
                "hidden_size",
                format!(
                    "is {}, but the remote code hard-codes the vision features' width to {N_EMBED}; \
                     use hidden_size {N_EMBED}",
                    s.hidden_size
                ),
            ));
        }
        if s.moe_layer_freq == 0 {
            return Err(config_err("moe_layer_freq", "is 0; use 1"));
        }
        if get_usize_or(cfg, "ep_size", 1) > 1 {
            return Err(config_err(
                "ep_size",
                "is above 1: expert parallelism drops experts; use 1",
            ));
        }
        if s.use_mla && s.kv_lora_rank.is_none() {
            return Err(config_err(
                "kv_lora_rank",
                "is null but use_mla is true; give it a number",
            ));
        }
        Ok(s)
    }

    /// Whether decoder layer `i` holds a MoE block (the remote code's condition in
    /// `DeepseekV2DecoderLayer.__init__`).
    pub fn is_moe_layer(&self, i: usize) -> bool {
        self.n_routed_experts.is_some()
            && i >= self.first_k_dense_replace
            && i % self.moe_layer_freq == 0
    }
}

fn get_usize_or(cfg: &Value, key: &str, default: u64) -> u64 {
    cfg.get(key).and_then(Value::as_u64).unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// Plan

#[derive(Default)]
struct Plan(Vec<TensorSpec>);

impl Plan {
    fn push(&mut self, name: String, shape: &[usize], init: Init) {
        self.0.push(TensorSpec {
            name,
            shape: shape.to_vec(),
            init,
        });
    }
    fn param(&mut self, name: String, shape: &[usize], std: f64) {
        self.push(name, shape, Init::Uniform { std });
    }
    /// `nn.Linear(inp, out)`: `weight [out, inp]`, `bias [out]`.
    fn linear(&mut self, prefix: &str, inp: usize, out: usize, bias: bool) {
        self.param(
            format!("{prefix}.weight"),
            &[out, inp],
            1.0 / (inp as f64).sqrt(),
        );
        if bias {
            self.param(format!("{prefix}.bias"), &[out], BIAS_STD);
        }
    }
    /// `nn.Conv2d(inp, out, k)`: `weight [out, inp, k, k]`, `bias [out]`.
    fn conv(&mut self, prefix: &str, inp: usize, out: usize, k: usize, bias: bool) {
        let fan_in = (inp * k * k) as f64;
        self.param(
            format!("{prefix}.weight"),
            &[out, inp, k, k],
            1.0 / fan_in.sqrt(),
        );
        if bias {
            self.param(format!("{prefix}.bias"), &[out], BIAS_STD);
        }
    }
    /// RMSNorm (`bias` false) or LayerNorm / LayerNorm2d (`bias` true).
    fn norm(&mut self, prefix: &str, n: usize, bias: bool) {
        self.push(format!("{prefix}.weight"), &[n], Init::Const(1.0));
        if bias {
            self.param(format!("{prefix}.bias"), &[n], BIAS_STD);
        }
    }
}

// SAM ViT-B, as `_build_sam` in deepencoder.py builds it.
const SAM_WIDTH: usize = 768;
const SAM_DEPTH: usize = 12;
const SAM_HEADS: usize = 12;
const SAM_PATCH: usize = 16;
const SAM_IMG: usize = 1024;
const SAM_WINDOW: usize = 14;
const SAM_GLOBAL: [usize; 4] = [2, 5, 8, 11];
const SAM_MLP_RATIO: usize = 4;
const SAM_OUT: usize = 256;
// CLIP-L/14, as `vit_model_cfg` in deepencoder.py.
const CLIP_WIDTH: usize = 1024;
const CLIP_LAYERS: usize = 24;
const CLIP_FFN: usize = 4096;
const CLIP_PATCH: usize = 14;
const CLIP_IMG: usize = 224;
// `MlpProjector(Dict(projector_type="linear", input_dim=2048, n_embed=1280))`.
const PROJ_IN: usize = 2048;

fn plan_sam(p: &mut Plan) {
    let pre = "model.sam_model";
    let grid = SAM_IMG / SAM_PATCH;
    let head_dim = SAM_WIDTH / SAM_HEADS;
    p.conv(
        &format!("{pre}.patch_embed.proj"),
        3,
        SAM_WIDTH,
        SAM_PATCH,
        true,
    );
    p.param(
        format!("{pre}.pos_embed"),
        &[1, grid, grid, SAM_WIDTH],
        POS_STD,
    );
    for i in 0..SAM_DEPTH {
        let b = format!("{pre}.blocks.{i}");
        // `input_size=(img_size // patch_size, ...)` if global, else `(window_size, window_size)`.
        let side = if SAM_GLOBAL.contains(&i) {
            grid
        } else {
            SAM_WINDOW
        };
        p.norm(&format!("{b}.norm1"), SAM_WIDTH, true);
        p.linear(&format!("{b}.attn.qkv"), SAM_WIDTH, 3 * SAM_WIDTH, true);
        p.linear(&format!("{b}.attn.proj"), SAM_WIDTH, SAM_WIDTH, true);
        p.param(
            format!("{b}.attn.rel_pos_h"),
            &[2 * side - 1, head_dim],
            POS_STD,
        );
        p.param(
            format!("{b}.attn.rel_pos_w"),
            &[2 * side - 1, head_dim],
            POS_STD,
        );
        p.norm(&format!("{b}.norm2"), SAM_WIDTH, true);
        p.linear(
            &format!("{b}.mlp.lin1"),
            SAM_WIDTH,
            SAM_MLP_RATIO * SAM_WIDTH,
            true,
        );
        p.linear(
            &format!("{b}.mlp.lin2"),
            SAM_MLP_RATIO * SAM_WIDTH,
            SAM_WIDTH,
            true,
        );
    }
    p.conv(&format!("{pre}.neck.0"), SAM_WIDTH, SAM_OUT, 1, false);
    p.norm(&format!("{pre}.neck.1"), SAM_OUT, true);
    p.conv(&format!("{pre}.neck.2"), SAM_OUT, SAM_OUT, 3, false);
    p.norm(&format!("{pre}.neck.3"), SAM_OUT, true);
    p.conv(&format!("{pre}.net_2"), SAM_OUT, 512, 3, false);
    p.conv(&format!("{pre}.net_3"), 512, 1024, 3, false);
}

fn plan_clip(p: &mut Plan) {
    let pre = "model.vision_model";
    let positions = (CLIP_IMG / CLIP_PATCH).pow(2) + 1;
    p.param(
        format!("{pre}.embeddings.class_embedding"),
        &[CLIP_WIDTH],
        POS_STD,
    );
    p.conv(
        &format!("{pre}.embeddings.patch_embedding"),
        3,
        CLIP_WIDTH,
        CLIP_PATCH,
        false,
    );
    p.param(
        format!("{pre}.embeddings.position_embedding.weight"),
        &[positions, CLIP_WIDTH],
        POS_STD,
    );
    p.norm(&format!("{pre}.pre_layrnorm"), CLIP_WIDTH, true);
    for i in 0..CLIP_LAYERS {
        let l = format!("{pre}.transformer.layers.{i}");
        p.norm(&format!("{l}.layer_norm1"), CLIP_WIDTH, true);
        p.linear(
            &format!("{l}.self_attn.qkv_proj"),
            CLIP_WIDTH,
            3 * CLIP_WIDTH,
            true,
        );
        p.linear(
            &format!("{l}.self_attn.out_proj"),
            CLIP_WIDTH,
            CLIP_WIDTH,
            true,
        );
        p.norm(&format!("{l}.layer_norm2"), CLIP_WIDTH, true);
        p.linear(&format!("{l}.mlp.fc1"), CLIP_WIDTH, CLIP_FFN, true);
        p.linear(&format!("{l}.mlp.fc2"), CLIP_FFN, CLIP_WIDTH, true);
    }
}

fn plan_mlp(p: &mut Plan, prefix: &str, hidden: usize, inter: usize) {
    p.linear(&format!("{prefix}.gate_proj"), hidden, inter, false);
    p.linear(&format!("{prefix}.up_proj"), hidden, inter, false);
    p.linear(&format!("{prefix}.down_proj"), inter, hidden, false);
}

fn plan_language(p: &mut Plan, s: &LmShape) {
    let h = s.hidden_size;
    let heads = s.num_attention_heads;
    let bias = s.attention_bias;
    p.param(
        "model.embed_tokens.weight".into(),
        &[s.vocab_size, h],
        EMBED_STD,
    );
    for i in 0..s.num_hidden_layers {
        let l = format!("model.layers.{i}");
        let a = format!("{l}.self_attn");
        if s.use_mla {
            // DeepseekV2Attention.__init__
            let q_head_dim = s.qk_nope_head_dim + s.qk_rope_head_dim;
            match s.q_lora_rank {
                None => p.linear(&format!("{a}.q_proj"), h, heads * q_head_dim, false),
                Some(r) => {
                    p.linear(&format!("{a}.q_a_proj"), h, r, bias);
                    p.norm(&format!("{a}.q_a_layernorm"), r, false);
                    p.linear(&format!("{a}.q_b_proj"), r, heads * q_head_dim, false);
                }
            }
            let kv = s.kv_lora_rank.unwrap_or(0); // checked in from_config
            p.linear(
                &format!("{a}.kv_a_proj_with_mqa"),
                h,
                kv + s.qk_rope_head_dim,
                bias,
            );
            p.norm(&format!("{a}.kv_a_layernorm"), kv, false);
            p.linear(
                &format!("{a}.kv_b_proj"),
                kv,
                heads * (s.qk_nope_head_dim + s.v_head_dim),
                false,
            );
            p.linear(&format!("{a}.o_proj"), heads * s.v_head_dim, h, bias);
        } else {
            // transformers' LlamaAttention (the `mha_eager` entry of ATTENTION_CLASSES)
            let hd = s.head_dim;
            p.linear(&format!("{a}.q_proj"), h, heads * hd, bias);
            p.linear(&format!("{a}.k_proj"), h, s.num_key_value_heads * hd, bias);
            p.linear(&format!("{a}.v_proj"), h, s.num_key_value_heads * hd, bias);
            p.linear(&format!("{a}.o_proj"), heads * hd, h, bias);
        }
        let m = format!("{l}.mlp");
        match s.n_routed_experts {
            Some(n) if s.is_moe_layer(i) => {
                for e in 0..n {
                    plan_mlp(p, &format!("{m}.experts.{e}"), h, s.moe_intermediate_size);
                }
                p.param(format!("{m}.gate.weight"), &[n, h], 1.0 / (h as f64).sqrt());
                if s.topk_method == "noaux_tc" {
                    p.param(format!("{m}.gate.e_score_correction_bias"), &[n], BIAS_STD);
                }
                if let Some(k) = s.n_shared_experts {
                    plan_mlp(
                        p,
                        &format!("{m}.shared_experts"),
                        h,
                        s.moe_intermediate_size * k,
                    );
                }
            }
            _ => plan_mlp(p, &m, h, s.intermediate_size),
        }
        p.norm(&format!("{l}.input_layernorm"), h, false);
        p.norm(&format!("{l}.post_attention_layernorm"), h, false);
    }
    p.norm("model.norm", h, false);
    p.param(
        "lm_head.weight".into(),
        &[s.vocab_size, h],
        1.0 / (h as f64).sqrt(),
    );
}

/// Every tensor of `DeepseekOCRForCausalLM` for this `config.json`, in module order.
///
/// The vision tower, projector, `image_newline` and `view_seperator` are always full size
/// (their sizes are hard-coded in the remote code); the language model follows the config.
pub fn plan(config: &Value) -> Result<Vec<TensorSpec>, SynthError> {
    let lm = LmShape::from_config(config)?;
    let mut p = Plan::default();
    plan_sam(&mut p);
    plan_clip(&mut p);
    p.linear("model.projector.layers", PROJ_IN, N_EMBED, true);
    let newline_std = 1.0 / (N_EMBED as f64).sqrt();
    p.param("model.image_newline".into(), &[N_EMBED], newline_std);
    p.param("model.view_seperator".into(), &[N_EMBED], newline_std);
    plan_language(&mut p, &lm);
    Ok(p.0)
}

// ---------------------------------------------------------------------------------------------
// Values

#[inline]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The generator key of one tensor (see the module docs).
pub fn tensor_key(seed: u64, name: &str) -> u64 {
    let h = Sha256::digest(name.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[..8]);
    mix64(seed.wrapping_add(GOLDEN_GAMMA)) ^ u64::from_le_bytes(b)
}

/// Element `i` of the stream `key`, uniform in (-1, 1) with 2^24 symmetric levels.
#[inline]
pub fn unit(key: u64, i: u64) -> f64 {
    let bits = mix64(key.wrapping_add(i.wrapping_add(1).wrapping_mul(GOLDEN_GAMMA)));
    ((bits >> 40) * 2 + 1) as f64 * (1.0 / 16_777_216.0) - 1.0
}

const CHUNK: usize = 1 << 16;

/// Fills `out` (exactly `numel * dtype.size()` bytes) with the values of `spec`, in parallel.
pub fn fill(spec: &TensorSpec, seed: u64, dtype: DType, out: &mut [u8]) {
    let es = dtype.size();
    debug_assert_eq!(out.len(), spec.numel() * es);
    let (key, amp, constant) = match spec.init {
        Init::Uniform { std } => (tensor_key(seed, &spec.name), std * 3f64.sqrt(), None),
        Init::Const(c) => (0, 0.0, Some(c)),
    };
    out.par_chunks_mut(CHUNK * es)
        .enumerate()
        .for_each(|(c, buf)| {
            let base = (c * CHUNK) as u64;
            for (j, dst) in buf.chunks_exact_mut(es).enumerate() {
                let v = match constant {
                    Some(c) => c,
                    None => (unit(key, base + j as u64) * amp) as f32,
                };
                match dtype {
                    DType::Bf16 => {
                        dst.copy_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes())
                    }
                    DType::F32 => dst.copy_from_slice(&v.to_le_bytes()),
                }
            }
        });
}

/// Generates one tensor in memory.
pub fn generate(spec: &TensorSpec, seed: u64, dtype: DType) -> TensorData {
    let mut data = vec![0u8; spec.numel() * dtype.size()];
    fill(spec, seed, dtype, &mut data);
    TensorData {
        dtype,
        shape: spec.shape.clone(),
        data,
    }
}

/// Every tensor of the model in memory, in module order. Holds the whole model: for the real
/// config prefer [`write_safetensors`], which streams.
pub fn synthesize(
    config: &Value,
    seed: u64,
    dtype: DType,
) -> Result<Vec<(String, TensorData)>, SynthError> {
    Ok(plan(config)?
        .into_iter()
        .map(|s| {
            let d = generate(&s, seed, dtype);
            (s.name, d)
        })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Files

/// sha256 of the config in canonical form (compact JSON, object keys sorted), hex.
pub fn config_sha256(config: &Value) -> String {
    fn canon(v: &Value, out: &mut String) {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push(':');
                    canon(&m[k], out);
                }
                out.push('}');
            }
            Value::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    canon(x, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut s = String::new();
    canon(config, &mut s);
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// The `__metadata__` written into every synthetic checkpoint (`format: pt` is what
/// transformers' loader requires).
pub fn metadata(config: &Value, seed: u64, dtype: DType) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("format".into(), "pt".into());
    m.insert("ocrp.synth.algorithm".into(), ALGORITHM.into());
    m.insert("ocrp.synth.algorithm_doc".into(), ALGORITHM_DOC.into());
    m.insert("ocrp.synth.seed".into(), seed.to_string());
    m.insert("ocrp.synth.dtype".into(), dtype.to_string());
    m.insert("ocrp.synth.config_sha256".into(), config_sha256(config));
    m.insert(
        "ocrp.synth.tool".into(),
        format!("ocr-patch {}", env!("CARGO_PKG_VERSION")),
    );
    m
}

/// The safetensors header for `specs` (already in file order): deterministic bytes, padded
/// with spaces to a multiple of 8 as the reference writer does.
fn header(specs: &[&TensorSpec], dtype: DType, meta: &BTreeMap<String, String>) -> Vec<u8> {
    let q = |s: &str| Value::String(s.to_string()).to_string();
    let mut h = String::from("{\"__metadata__\":{");
    for (i, (k, v)) in meta.iter().enumerate() {
        if i > 0 {
            h.push(',');
        }
        h.push_str(&format!("{}:{}", q(k), q(v)));
    }
    h.push('}');
    let mut offset = 0usize;
    for s in specs {
        let n = s.numel() * dtype.size();
        let shape: Vec<String> = s.shape.iter().map(|d| d.to_string()).collect();
        h.push_str(&format!(
            ",{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
            q(&s.name),
            dtype.safetensors_name(),
            shape.join(","),
            offset,
            offset + n
        ));
        offset += n;
    }
    h.push('}');
    let mut bytes = h.into_bytes();
    let padded = bytes.len().div_ceil(8) * 8;
    bytes.resize(padded, b' ');
    bytes
}

/// What [`write_safetensors`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteSummary {
    /// Number of tensors.
    pub tensors: usize,
    /// Number of parameters (elements).
    pub params: u64,
    /// Size of the file in bytes.
    pub bytes: u64,
}

/// Writes the synthetic checkpoint for `config` to `path`, tensors sorted by name. See
/// [`write_specs`].
pub fn write_safetensors(
    path: &Path,
    config: &Value,
    seed: u64,
    dtype: DType,
) -> Result<WriteSummary, SynthError> {
    let specs = plan(config)?;
    write_specs(path, &specs, seed, dtype, &metadata(config, seed, dtype))
}

/// Writes `specs` (sorted by name in the file) with the given `__metadata__`. One tensor is
/// generated (in parallel) while the previous one is written, so at most three tensors are in
/// memory, never the whole model. Atomic: a temp file in the same folder is fsynced and renamed
/// over `path`.
pub fn write_specs(
    path: &Path,
    specs: &[TensorSpec],
    seed: u64,
    dtype: DType,
    meta: &BTreeMap<String, String>,
) -> Result<WriteSummary, SynthError> {
    let mut order: Vec<&TensorSpec> = specs.iter().collect();
    order.sort_by(|a, b| a.name.cmp(&b.name));
    let head = header(&order, dtype, meta);

    let io = |source| SynthError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = tempfile::NamedTempFile::new_in(&dir).map_err(io)?;
    let params: u64 = order.iter().map(|s| s.numel() as u64).sum();

    // Generator (this thread, rayon inside) -> writer thread; buffers go back for reuse.
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(Vec<u8>, usize)>(1);
    let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let file = tmp.as_file();
    let written = std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> std::io::Result<()> {
            let mut w = std::io::BufWriter::with_capacity(1 << 22, file);
            w.write_all(&(head.len() as u64).to_le_bytes())?;
            w.write_all(&head)?;
            for (buf, n) in full_rx {
                w.write_all(&buf[..n])?;
                // The generator may have finished; a closed return channel is fine.
                let _ = free_tx.send(buf);
            }
            w.flush()
        });
        for s in &order {
            let n = s.numel() * dtype.size();
            let mut buf = free_rx.try_recv().unwrap_or_default();
            if buf.len() < n {
                buf.resize(n, 0);
            }
            fill(s, seed, dtype, &mut buf[..n]);
            if full_tx.send((buf, n)).is_err() {
                break; // the writer failed; its error is reported below
            }
        }
        drop(full_tx);
        writer
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("writer thread panicked")))
    });
    written.map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let perm = std::fs::Permissions::from_mode(0o644);
        file.set_permissions(perm).map_err(io)?;
    }
    file.sync_all().map_err(io)?;
    let bytes = file.metadata().map_err(io)?.len();
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(WriteSummary {
        tensors: order.len(),
        params,
        bytes,
    })
}

/// The sha256 (hex) of the file [`write_safetensors`] writes for `config`, `seed` and `dtype`,
/// computed without writing it (tensors are generated one by one and hashed). `tool` replaces
/// the `ocrp.synth.tool` metadata value (the file records the writer's version, so a golden made
/// by another version names it); `None` keeps this build's.
pub fn file_sha256(config: &Value, seed: u64, dtype: DType, tool: Option<&str>) -> Result<String, SynthError> {
    file_sha256_with(config, seed, dtype, tool, |s, buf| fill(s, seed, dtype, buf))
}

/// [`file_sha256`] with the tensors' bytes supplied by `bytes_of(spec, buf)` (which must fill
/// `buf`, `numel * dtype.size()` bytes, with what [`fill`] would write): lets a caller that
/// keeps the generated tensors anyway hash them without generating them twice.
pub fn file_sha256_with(
    config: &Value,
    seed: u64,
    dtype: DType,
    tool: Option<&str>,
    mut bytes_of: impl FnMut(&TensorSpec, &mut [u8]),
) -> Result<String, SynthError> {
    let specs = plan(config)?;
    let mut meta = metadata(config, seed, dtype);
    if let Some(t) = tool {
        meta.insert("ocrp.synth.tool".into(), t.to_string());
    }
    let mut order: Vec<&TensorSpec> = specs.iter().collect();
    order.sort_by(|a, b| a.name.cmp(&b.name));
    let head = header(&order, dtype, &meta);
    let mut h = Sha256::new();
    h.update((head.len() as u64).to_le_bytes());
    h.update(&head);
    let mut buf = Vec::new();
    for s in order {
        let n = s.numel() * dtype.size();
        buf.resize(n, 0);
        bytes_of(s, &mut buf[..n]);
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}
