//! The language model, DeepSeek-V2 family (`modeling_deepseekv2.py`): token embeddings with the
//! vision rows scattered into the image-token positions, `num_hidden_layers` pre-norm layers
//! (RMSNorm, MHA or MLA attention, dense MLP or MoE), the final norm and `lm_head`; a KV cache;
//! per-layer hidden states on request (the verifier compares stage by stage).
//!
//! Owns: `model.embed_tokens`, `model.layers.*`, `model.norm`, `lm_head`. Does not own the
//! vision rows' computation (`vision`) nor the decoding loop (`generate`).

pub mod attention;
pub mod moe;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{embedding, linear_no_bias, Embedding, Linear, VarBuilder};

use crate::model::config::TextConfig;
use attention::{LayerCache, MhaAttention, MlaAttention};
use moe::{Mlp, Moe};

/// `DeepseekV2RMSNorm`: in f32, `weight * (x * rsqrt(mean(x^2) + eps)).to(input_dtype)`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
        let y = xf
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .to_dtype(dtype)?;
        y.broadcast_mul(&self.weight.to_dtype(dtype)?)
    }
}

enum Attention {
    Mha(MhaAttention),
    Mla(MlaAttention),
}

enum Ffn {
    Dense(Mlp),
    Moe(Moe),
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Ffn,
    span: tracing::Span,
}

impl DecoderLayer {
    fn new(cfg: &TextConfig, layer_idx: usize, vb: VarBuilder) -> Result<Self> {
        let self_attn = match &cfg.mla {
            Some(mla) => Attention::Mla(MlaAttention::new(cfg, mla, vb.pp("self_attn"))?),
            None => Attention::Mha(MhaAttention::new(cfg, vb.pp("self_attn"))?),
        };
        let mlp = match (&cfg.moe, cfg.is_moe_layer(layer_idx)) {
            (Some(m), true) => Ffn::Moe(Moe::new(cfg.hidden_size, m, vb.pp("mlp"))?),
            _ => Ffn::Dense(Mlp::new(
                cfg.hidden_size,
                cfg.intermediate_size,
                vb.pp("mlp"),
            )?),
        };
        Ok(Self {
            input_layernorm: RmsNorm::new(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb.pp("input_layernorm"),
            )?,
            self_attn,
            post_attention_layernorm: RmsNorm::new(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
            mlp,
            span: tracing::span!(tracing::Level::TRACE, "layer", idx = layer_idx),
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut Option<LayerCache>) -> Result<Tensor> {
        Ok(self.forward_traced(x, cache, false)?.0)
    }

    /// The layer's output and, with `routing` on a MoE layer, each position's experts.
    fn forward_traced(
        &self,
        x: &Tensor,
        cache: &mut Option<LayerCache>,
        routing: bool,
    ) -> Result<(Tensor, Option<Routing>)> {
        let _enter = self.span.enter();
        let h = self.input_layernorm.forward(x)?;
        let a = match &self.self_attn {
            Attention::Mha(a) => a.forward(&h, cache)?,
            Attention::Mla(a) => a.forward(&h, cache)?,
        };
        let x = (x + a)?;
        let h = self.post_attention_layernorm.forward(&x)?;
        let mut r = None;
        let m = match &self.mlp {
            Ffn::Dense(m) => m.forward(&h)?,
            Ffn::Moe(m) => {
                if routing {
                    r = Some(m.route_rows(&h.flatten_to(candle_core::D::Minus2)?)?);
                }
                m.forward(&h)?
            }
        };
        Ok(((x + m)?, r))
    }
}

/// Expert ids and weights of each position (batch rows flattened), as `MoEGate` returns them.
pub type Routing = Vec<(Vec<usize>, Vec<f32>)>;

/// What [`DeepseekV2::forward_embeds_traced`] returns for one layer.
pub struct LayerTrace {
    /// The layer's output `(b, t, hidden)` (before the final norm).
    pub output: Tensor,
    /// MoE layers only: each position's routing.
    pub routing: Option<Routing>,
}

/// The KV cache of every layer; its length is the number of positions already seen.
#[derive(Debug, Clone, Default)]
pub struct Cache {
    layers: Vec<Option<LayerCache>>,
}

impl Cache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
        }
    }

    pub fn seq_len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |l| l.seq_len())
    }

    pub fn layer(&self, i: usize) -> Option<&LayerCache> {
        self.layers.get(i).and_then(|l| l.as_ref())
    }
}

/// What a forward pass returns.
pub struct DecoderOutput {
    /// After `model.norm`: `(b, t, hidden)`.
    pub last_hidden_state: Tensor,
    /// With `output_hidden_states`: the input of each layer, then the normed output
    /// (`num_hidden_layers + 1` tensors, as transformers returns them).
    pub hidden_states: Option<Vec<Tensor>>,
}

/// `DeepseekV2Model` + `lm_head` (`DeepseekV2ForCausalLM`).
pub struct DeepseekV2 {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    cfg: TextConfig,
}

impl DeepseekV2 {
    /// `vb` is rooted at the checkpoint's top (`model.*`, `lm_head.*`).
    pub fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let m = vb.pp("model");
        let embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size, m.pp("embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, i, m.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed_tokens.embeddings().clone(), None)
        } else {
            linear_no_bias(cfg.hidden_size, cfg.vocab_size, vb.pp("lm_head"))?
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, m.pp("norm"))?,
            lm_head,
            cfg: cfg.clone(),
        })
    }

    pub fn embed_tokens_device(&self) -> &candle_core::Device {
        self.embed_tokens.embeddings().device()
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    pub fn new_cache(&self) -> Cache {
        Cache::new(self.layers.len())
    }

    /// `embed_tokens(input_ids)`: `(b, t)` ids -> `(b, t, hidden)`.
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.forward(input_ids)
    }

    /// Runs the layers on `inputs_embeds` `(b, t, hidden)` at positions `cache.seq_len()..`,
    /// appending to the cache.
    pub fn forward_embeds(
        &self,
        inputs_embeds: &Tensor,
        cache: &mut Cache,
        output_hidden_states: bool,
    ) -> Result<DecoderOutput> {
        let _span = tracing::span!(tracing::Level::TRACE, "decoder").entered();
        if cache.layers.len() != self.layers.len() {
            *cache = self.new_cache();
        }
        let mut all = output_hidden_states.then(Vec::new);
        let mut h = inputs_embeds.clone();
        for (layer, c) in self.layers.iter().zip(cache.layers.iter_mut()) {
            if let Some(all) = all.as_mut() {
                all.push(h.clone());
            }
            h = layer.forward(&h, c)?;
        }
        let h = self.norm.forward(&h)?;
        if let Some(all) = all.as_mut() {
            all.push(h.clone());
        }
        Ok(DecoderOutput {
            last_hidden_state: h,
            hidden_states: all,
        })
    }

    /// [`Self::forward_embeds`] keeping each layer's output and MoE routing (for the verifier,
    /// which compares them with the remote code's layer by layer).
    pub fn forward_embeds_traced(
        &self,
        inputs_embeds: &Tensor,
        cache: &mut Cache,
    ) -> Result<(Tensor, Vec<LayerTrace>)> {
        let _span = tracing::span!(tracing::Level::TRACE, "decoder").entered();
        if cache.layers.len() != self.layers.len() {
            *cache = self.new_cache();
        }
        let mut trace = Vec::with_capacity(self.layers.len());
        let mut h = inputs_embeds.clone();
        for (layer, c) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let (out, routing) = layer.forward_traced(&h, c, true)?;
            trace.push(LayerTrace {
                output: out.clone(),
                routing,
            });
            h = out;
        }
        Ok((self.norm.forward(&h)?, trace))
    }

    /// `lm_head(hidden_states).float()`: `(.., hidden)` -> f32 `(.., vocab)`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)?.to_dtype(DType::F32)
    }
}

/// `inputs_embeds[idx].masked_scatter_(images_seq_mask[idx].unsqueeze(-1), features)`: the
/// positions where `mask` is true take the rows of `features` in order. `embeds`: `(t, hidden)`.
///
/// torch would silently use the first rows when `features` has more rows than the mask has true
/// positions; here any mismatch is an error, since it means the prompt and the image disagree.
pub fn merge_image_features(embeds: &Tensor, mask: &[bool], features: &Tensor) -> Result<Tensor> {
    let (t, _) = embeds.dims2()?;
    let (n, _) = features.dims2()?;
    if mask.len() != t {
        candle_core::bail!("image mask has {} positions for {t} tokens", mask.len());
    }
    let wanted = mask.iter().filter(|&&m| m).count();
    if wanted != n {
        candle_core::bail!("the prompt has {wanted} image tokens but the images give {n} feature rows; was the prompt built for this image mode?");
    }
    let mut next = t as u32;
    let idx: Vec<u32> = mask
        .iter()
        .enumerate()
        .map(|(i, &m)| {
            if m {
                next += 1;
                next - 1
            } else {
                i as u32
            }
        })
        .collect();
    let idx = Tensor::new(idx.as_slice(), embeds.device())?;
    Tensor::cat(&[embeds, &features.to_dtype(embeds.dtype())?], 0)?.index_select(&idx, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rms_norm_hand_values() {
        let dev = Device::Cpu;
        let vb = VarBuilder::from_tensors(
            [(
                "weight".to_string(),
                Tensor::new(&[1f32, 2.0], &dev).unwrap(),
            )]
            .into(),
            DType::F32,
            &dev,
        );
        let n = RmsNorm::new(2, 0.0, vb).unwrap();
        // x = [3, 4]: rms = sqrt(12.5)
        let y = n
            .forward(&Tensor::new(&[[3f32, 4.0]], &dev).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let r = 12.5f32.sqrt();
        assert!((y[0][0] - 3.0 / r).abs() < 1e-6 && (y[0][1] - 8.0 / r).abs() < 1e-6);
    }

    #[test]
    fn masked_scatter_fills_in_order() {
        let dev = Device::Cpu;
        let e = Tensor::new(&[[0f32], [1.0], [2.0], [3.0]], &dev).unwrap();
        let f = Tensor::new(&[[10f32], [11.0]], &dev).unwrap();
        let y = merge_image_features(&e, &[false, true, false, true], &f).unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0.0, 10.0, 2.0, 11.0]
        );
        let err = merge_image_features(&e, &[true, true, true, false], &f)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("3 image tokens but the images give 2"),
            "{err}"
        );
    }
}
