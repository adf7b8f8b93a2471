//! The language model's configuration: a serde mirror of `language_config` in the checkpoint's
//! `config.json` (the fields `DeepseekV2Config.__init__` reads), and [`TextConfig`], the same
//! numbers with every default resolved once so the blocks never see an `Option`.
//!
//! Owns: parsing and validating the decoder's config. Does not own the vision sizes: deepencoder.py
//! hard-codes them, so they live beside the vision blocks (`vision::sam::SamConfig`,
//! `vision::clip::ClipConfig`).
//!
//! Note on where the numbers come from: `DeepseekOCRConfig` is a `DeepseekV2Config` built from the
//! *top level* of config.json; DeepSeek-OCR's file repeats every language field there and inside
//! `language_config`, with equal values. [`OcrConfig::text`] prefers `language_config` and falls
//! back to the top level.

use serde::Deserialize;

/// `config.json`'s `language_config` (or its top level), as written; absent keys take the
/// defaults of `configuration_deepseek_v2.DeepseekV2Config.__init__`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct DeepseekV2Config {
    #[serde(default = "d::vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "d::hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "d::intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "d::moe_intermediate_size")]
    pub moe_intermediate_size: usize,
    #[serde(default = "d::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d::num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub n_shared_experts: Option<usize>,
    #[serde(default)]
    pub n_routed_experts: Option<usize>,
    #[serde(default = "d::one_f64")]
    pub routed_scaling_factor: f64,
    #[serde(default = "d::kv_lora_rank")]
    pub kv_lora_rank: Option<usize>,
    #[serde(default = "d::q_lora_rank")]
    pub q_lora_rank: Option<usize>,
    #[serde(default = "d::qk_rope_head_dim")]
    pub qk_rope_head_dim: usize,
    #[serde(default = "d::v_head_dim")]
    pub v_head_dim: usize,
    #[serde(default = "d::qk_nope_head_dim")]
    pub qk_nope_head_dim: usize,
    /// `'gready'` (sic) is the Python default; only the three spellings below select a method.
    #[serde(default = "d::topk_method")]
    pub topk_method: String,
    #[serde(default)]
    pub n_group: Option<usize>,
    #[serde(default)]
    pub topk_group: Option<usize>,
    #[serde(default)]
    pub num_experts_per_tok: Option<usize>,
    #[serde(default = "d::one_usize")]
    pub moe_layer_freq: usize,
    #[serde(default)]
    pub first_k_dense_replace: usize,
    #[serde(default)]
    pub norm_topk_prob: bool,
    #[serde(default = "d::scoring_func")]
    pub scoring_func: String,
    #[serde(default = "d::hidden_act")]
    pub hidden_act: String,
    #[serde(default = "d::max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "d::rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "d::rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "d::use_mla")]
    pub use_mla: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "d::bos")]
    pub bos_token_id: Option<u32>,
    #[serde(default = "d::eos")]
    pub eos_token_id: Option<u32>,
}

mod d {
    pub fn vocab_size() -> usize {
        102400
    }
    pub fn hidden_size() -> usize {
        4096
    }
    pub fn intermediate_size() -> usize {
        11008
    }
    pub fn moe_intermediate_size() -> usize {
        1407
    }
    pub fn num_hidden_layers() -> usize {
        30
    }
    pub fn num_attention_heads() -> usize {
        32
    }
    pub fn one_f64() -> f64 {
        1.0
    }
    pub fn one_usize() -> usize {
        1
    }
    pub fn kv_lora_rank() -> Option<usize> {
        Some(512)
    }
    pub fn q_lora_rank() -> Option<usize> {
        Some(1536)
    }
    pub fn qk_rope_head_dim() -> usize {
        64
    }
    pub fn v_head_dim() -> usize {
        128
    }
    pub fn qk_nope_head_dim() -> usize {
        128
    }
    pub fn topk_method() -> String {
        "gready".into()
    }
    pub fn scoring_func() -> String {
        "softmax".into()
    }
    pub fn hidden_act() -> String {
        "silu".into()
    }
    pub fn max_position_embeddings() -> usize {
        2048
    }
    pub fn rms_norm_eps() -> f64 {
        1e-6
    }
    pub fn rope_theta() -> f64 {
        10000.0
    }
    pub fn use_mla() -> bool {
        true
    }
    pub fn bos() -> Option<u32> {
        Some(100000)
    }
    pub fn eos() -> Option<u32> {
        Some(100001)
    }
}

/// The whole `config.json` of DeepSeek-OCR, as far as the model needs it.
#[derive(Debug, Clone, Deserialize)]
pub struct OcrConfig {
    #[serde(default)]
    pub language_config: Option<DeepseekV2Config>,
    #[serde(flatten)]
    pub top_level: serde_json::Map<String, serde_json::Value>,
}

impl OcrConfig {
    pub fn from_json_str(s: &str) -> Result<Self, ConfigError> {
        serde_json::from_str(s).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let s = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            source: e,
        })?;
        Self::from_json_str(&s)
    }

    /// The language model's config, defaults resolved.
    pub fn text(&self) -> Result<TextConfig, ConfigError> {
        let raw = match &self.language_config {
            Some(c) => c.clone(),
            None => serde_json::from_value(serde_json::Value::Object(self.top_level.clone()))
                .map_err(|e| ConfigError::Parse(e.to_string()))?,
        };
        TextConfig::resolve(&raw)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read config: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config.json: {0}; is this DeepSeek-OCR's config?")]
    Parse(String),
    #[error("config.json: {0}")]
    Invalid(String),
}

/// Which experts a token goes to (`MoEGate.topk_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkMethod {
    /// `torch.topk(scores, k)`.
    Greedy,
    /// Best `topk_group` groups by their max score, then top-k inside them.
    GroupLimitedGreedy,
    /// DeepSeek-V3's: groups by the sum of their top-2 corrected scores; needs `e_score_correction_bias`.
    NoauxTc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoringFunc {
    Softmax,
    Sigmoid,
}

/// Multi-head latent attention sizes (`use_mla: true`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlaConfig {
    /// `None`: a plain `q_proj`.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
}

/// Routed-expert settings; present when `n_routed_experts` is set.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub n_routed_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    pub n_shared_experts: Option<usize>,
    pub topk_method: TopkMethod,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
    pub scoring_func: ScoringFunc,
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
}

/// The decoder's configuration with every default resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// `getattr(config, "head_dim", hidden_size // num_heads)` (LlamaAttention; MHA only).
    pub head_dim: usize,
    /// `None`: MHA with transformers' `LlamaAttention` semantics.
    pub mla: Option<MlaConfig>,
    pub moe: Option<MoeConfig>,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub attention_bias: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

impl TextConfig {
    pub fn resolve(c: &DeepseekV2Config) -> Result<Self, ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if c.hidden_act != "silu" {
            return bad(format!(
                "hidden_act `{}` is not supported (only silu)",
                c.hidden_act
            ));
        }
        if c.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return bad("rope_scaling is not supported (DeepSeek-OCR has none)".into());
        }
        if c.num_attention_heads == 0 || c.hidden_size % c.num_attention_heads != 0 {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                c.hidden_size, c.num_attention_heads
            ));
        }
        // `if num_key_value_heads is None: num_key_value_heads = num_attention_heads`
        let num_key_value_heads = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
        if num_key_value_heads == 0 || c.num_attention_heads % num_key_value_heads != 0 {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {num_key_value_heads}",
                c.num_attention_heads
            ));
        }
        let mla = if c.use_mla {
            let Some(kv_lora_rank) = c.kv_lora_rank else {
                return bad("use_mla is true but kv_lora_rank is null".into());
            };
            if c.qk_rope_head_dim % 2 != 0 {
                return bad(format!(
                    "qk_rope_head_dim {} must be even",
                    c.qk_rope_head_dim
                ));
            }
            Some(MlaConfig {
                q_lora_rank: c.q_lora_rank,
                kv_lora_rank,
                qk_nope_head_dim: c.qk_nope_head_dim,
                qk_rope_head_dim: c.qk_rope_head_dim,
                v_head_dim: c.v_head_dim,
            })
        } else {
            None
        };
        let moe = match c.n_routed_experts {
            None => None,
            Some(n_routed_experts) => {
                let topk_method = match c.topk_method.as_str() {
                    "greedy" => TopkMethod::Greedy,
                    "group_limited_greedy" => TopkMethod::GroupLimitedGreedy,
                    "noaux_tc" => TopkMethod::NoauxTc,
                    other => return bad(format!("topk_method `{other}` is not supported")),
                };
                let scoring_func = match c.scoring_func.as_str() {
                    "softmax" => ScoringFunc::Softmax,
                    "sigmoid" => ScoringFunc::Sigmoid,
                    other => return bad(format!("scoring_func `{other}` is not supported")),
                };
                let Some(k) = c.num_experts_per_tok else {
                    return bad("n_routed_experts is set but num_experts_per_tok is null".into());
                };
                let n_group = c.n_group.unwrap_or(1);
                let topk_group = c.topk_group.unwrap_or(1);
                if topk_method != TopkMethod::Greedy
                    && (n_group == 0 || n_routed_experts % n_group != 0 || topk_group > n_group)
                {
                    return bad(format!(
                        "n_group {n_group} / topk_group {topk_group} do not divide {n_routed_experts} experts"
                    ));
                }
                if k == 0 || k > n_routed_experts {
                    return bad(format!(
                        "num_experts_per_tok {k} is not in 1..={n_routed_experts}"
                    ));
                }
                if c.moe_layer_freq == 0 {
                    return bad("moe_layer_freq must be at least 1".into());
                }
                Some(MoeConfig {
                    n_routed_experts,
                    num_experts_per_tok: k,
                    moe_intermediate_size: c.moe_intermediate_size,
                    n_shared_experts: c.n_shared_experts,
                    topk_method,
                    n_group,
                    topk_group,
                    norm_topk_prob: c.norm_topk_prob,
                    routed_scaling_factor: c.routed_scaling_factor,
                    scoring_func,
                    first_k_dense_replace: c.first_k_dense_replace,
                    moe_layer_freq: c.moe_layer_freq,
                })
            }
        };
        Ok(Self {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads,
            head_dim: c.hidden_size / c.num_attention_heads,
            mla,
            moe,
            max_position_embeddings: c.max_position_embeddings,
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta,
            attention_bias: c.attention_bias,
            tie_word_embeddings: c.tie_word_embeddings,
            bos_token_id: c.bos_token_id,
            eos_token_id: c.eos_token_id,
        })
    }

    /// `DeepseekV2DecoderLayer.__init__`: MoE where
    /// `layer_idx >= first_k_dense_replace and layer_idx % moe_layer_freq == 0`.
    pub fn is_moe_layer(&self, layer_idx: usize) -> bool {
        self.moe.as_ref().is_some_and(|m| {
            layer_idx >= m.first_k_dense_replace && layer_idx % m.moe_layer_freq == 0
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real_config() -> Option<OcrConfig> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/data/deepseek-ocr/config.json");
        match OcrConfig::from_file(&p) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("skipping: {e}");
                None
            }
        }
    }

    #[test]
    fn real_config_resolves_to_the_documented_architecture() {
        let Some(c) = real_config() else { return };
        let t = c.text().unwrap();
        assert_eq!(t.hidden_size, 1280);
        assert_eq!(t.num_hidden_layers, 12);
        assert_eq!(
            (t.num_attention_heads, t.num_key_value_heads, t.head_dim),
            (10, 10, 128)
        );
        assert!(t.mla.is_none());
        assert_eq!(t.rope_theta, 10000.0);
        assert_eq!(t.rms_norm_eps, 1e-6);
        assert_eq!(t.vocab_size, 129280);
        assert_eq!((t.bos_token_id, t.eos_token_id), (Some(0), Some(1)));
        let m = t.moe.as_ref().unwrap();
        assert_eq!(
            (
                m.n_routed_experts,
                m.num_experts_per_tok,
                m.moe_intermediate_size
            ),
            (64, 6, 896)
        );
        assert_eq!(m.topk_method, TopkMethod::Greedy);
        assert_eq!(m.n_shared_experts, Some(2));
        assert!(!m.norm_topk_prob);
        assert_eq!(m.routed_scaling_factor, 1.0);
        assert!(!t.is_moe_layer(0));
        assert!((1..12).all(|i| t.is_moe_layer(i)));
        // The top level says the same as language_config.
        let top: DeepseekV2Config =
            serde_json::from_value(serde_json::Value::Object(c.top_level.clone())).unwrap();
        assert_eq!(TextConfig::resolve(&top).unwrap(), t);
    }

    #[test]
    fn python_defaults_apply_to_absent_keys() {
        let c: DeepseekV2Config = serde_json::from_str("{}").unwrap();
        assert!(c.use_mla);
        assert_eq!(c.kv_lora_rank, Some(512));
        assert_eq!(c.topk_method, "gready");
        let t = TextConfig::resolve(&c).unwrap();
        assert_eq!(t.mla.unwrap().qk_rope_head_dim, 64);
        assert!(t.moe.is_none());
    }

    #[test]
    fn unknown_topk_method_is_a_clear_error() {
        let c: DeepseekV2Config =
            serde_json::from_str(r#"{"n_routed_experts": 4, "num_experts_per_tok": 2}"#).unwrap();
        let e = TextConfig::resolve(&c).unwrap_err().to_string();
        assert!(e.contains("topk_method `gready`"), "{e}");
    }
}
