//! The two attentions of `DeepseekV2DecoderLayer`: MHA (`use_mla: false`, DeepSeek-OCR's own:
//! transformers' `LlamaAttention` with `q_proj`/`k_proj`/`v_proj`/`o_proj` and half-split RoPE
//! on whole heads) and MLA (`use_mla: true`, `DeepseekV2Attention` in its absorbed form: q LoRA
//! or plain q, a compressed kv of `kv_lora_rank` plus a decoupled RoPE key shared by all heads).
//!
//! Owns: both attentions, RoPE, the causal mask and the per-layer KV cache. The MLA cache is
//! latent: it holds the normalised compressed kv and the rotated `k_pe`, never expanded k/v.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{linear_b, linear_no_bias, Linear, VarBuilder};

use super::RmsNorm;
use crate::model::config::{MlaConfig, TextConfig};

/// One layer's cache.
#[derive(Debug, Clone)]
pub enum LayerCache {
    /// `(b, kv_heads, t, head_dim)` each, after RoPE.
    Mha { k: Tensor, v: Tensor },
    /// `compressed_kv`: `(b, t, kv_lora_rank)` after `kv_a_layernorm`; `k_pe`: `(b, 1, t, rope)`
    /// after RoPE.
    Mla { compressed_kv: Tensor, k_pe: Tensor },
}

impl LayerCache {
    pub fn seq_len(&self) -> usize {
        match self {
            LayerCache::Mha { k, .. } => k.dims()[2],
            LayerCache::Mla { compressed_kv, .. } => compressed_kv.dims()[1],
        }
    }
}

/// `(cos, sin)` of shape `(t, dim/2)` for positions `offset..offset+t`, computed in f32 like
/// both rotary classes (`inv_freq = 1 / base ** (arange(0, dim, 2) / dim)`), cast to `dtype`.
pub fn rope_tables(
    dim: usize,
    base: f64,
    offset: usize,
    t: usize,
    dtype: DType,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let inv_freq: Vec<f32> = (0..dim / 2)
        .map(|i| 1.0 / (base as f32).powf((2 * i) as f32 / dim as f32))
        .collect();
    let inv_freq = Tensor::from_vec(inv_freq, (1, dim / 2), dev)?;
    let pos = Tensor::arange(offset as u32, (offset + t) as u32, dev)?
        .to_dtype(DType::F32)?
        .reshape((t, 1))?;
    let freqs = pos.matmul(&inv_freq)?;
    Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
}

/// Causal mask `(t, offset + t)`: 0 where key `j <= offset + i`, `-inf` above
/// (`_prepare_4d_causal_attention_mask`; `None` for a single query, as there).
pub fn causal_mask(t: usize, offset: usize, dtype: DType, dev: &Device) -> Result<Option<Tensor>> {
    if t <= 1 {
        return Ok(None);
    }
    let total = offset + t;
    let m: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j <= offset + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(m, (t, total), dev)?
        .to_dtype(dtype)
        .map(Some)
}

/// softmax in f32 (`softmax(..., dtype=torch.float32).to(dtype)`).
fn softmax_f32(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    candle_nn::ops::softmax_last_dim(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)
}

/// transformers' `LlamaAttention` (4.46), as `ATTENTION_CLASSES["mha_eager"]`.
pub struct MhaAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    rope_theta: f64,
    span: tracing::Span,
}

impl MhaAttention {
    pub fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let (h, nh, nkv, hd) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let bias = cfg.attention_bias;
        Ok(Self {
            q_proj: linear_b(h, nh * hd, bias, vb.pp("q_proj"))?,
            k_proj: linear_b(h, nkv * hd, bias, vb.pp("k_proj"))?,
            v_proj: linear_b(h, nkv * hd, bias, vb.pp("v_proj"))?,
            o_proj: linear_b(nh * hd, h, bias, vb.pp("o_proj"))?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            rope_theta: cfg.rope_theta,
            span: tracing::span!(tracing::Level::TRACE, "mha"),
        })
    }

    pub fn forward(&self, x: &Tensor, cache: &mut Option<LayerCache>) -> Result<Tensor> {
        let _enter = self.span.enter();
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let offset = cache.as_ref().map_or(0, |c| c.seq_len());
        let q = self
            .q_proj
            .forward(x)?
            .reshape((b, t, nh, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let k = self
            .k_proj
            .forward(x)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let v = self
            .v_proj
            .forward(x)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        // q_embed = (q * cos) + (rotate_half(q) * sin)
        let (cos, sin) = rope_tables(hd, self.rope_theta, offset, t, q.dtype(), q.device())?;
        let q = candle_nn::rotary_emb::rope(&q, &cos, &sin)?;
        let k = candle_nn::rotary_emb::rope(&k, &cos, &sin)?;
        let (k, v) = match cache.take() {
            Some(LayerCache::Mha { k: pk, v: pv }) => {
                (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?)
            }
            _ => (k, v),
        };
        *cache = Some(LayerCache::Mha {
            k: k.clone(),
            v: v.clone(),
        });
        // repeat_kv: each kv head serves num_heads / num_kv_heads query heads
        let (k, v) = if nkv != nh {
            let rep = nh / nkv;
            let total = k.dim(2)?;
            let r = |x: &Tensor| {
                x.unsqueeze(2)?
                    .broadcast_as((b, nkv, rep, total, hd))?
                    .reshape((b, nh, total, hd))
            };
            (r(&k)?, r(&v)?)
        } else {
            (k, v)
        };
        let mut att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        if let Some(m) = causal_mask(t, offset, att.dtype(), att.device())? {
            att = att.broadcast_add(&m)?;
        }
        let att = softmax_f32(&att)?;
        let o = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        self.o_proj.forward(&o)
    }
}

/// `DeepseekV2Attention` (MLA, absorbed form) of modeling_deepseekv2.py.
pub struct MlaAttention {
    q_proj: Option<Linear>,
    q_a: Option<(Linear, RmsNorm, Linear)>,
    kv_a_proj_with_mqa: Linear,
    kv_a_layernorm: RmsNorm,
    /// `kv_b_proj.weight.view(num_heads, -1, kv_lora_rank)[:, :qk_nope_head_dim]`
    q_absorb: Tensor,
    /// `kv_b_proj.weight.view(num_heads, -1, kv_lora_rank)[:, qk_nope_head_dim:]`
    out_absorb: Tensor,
    o_proj: Linear,
    cfg: MlaConfig,
    num_heads: usize,
    rope_theta: f64,
    softmax_scale: f64,
    span: tracing::Span,
}

impl MlaAttention {
    pub fn new(cfg: &TextConfig, mla: &MlaConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let nh = cfg.num_attention_heads;
        let q_head_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim;
        // DeepseekV2RMSNorm(q_lora_rank) / (kv_lora_rank): the default eps 1e-6, not rms_norm_eps
        let (q_proj, q_a) = match mla.q_lora_rank {
            None => (
                Some(linear_no_bias(h, nh * q_head_dim, vb.pp("q_proj"))?),
                None,
            ),
            Some(r) => (
                None,
                Some((
                    linear_b(h, r, cfg.attention_bias, vb.pp("q_a_proj"))?,
                    RmsNorm::new(r, 1e-6, vb.pp("q_a_layernorm"))?,
                    linear_no_bias(r, nh * q_head_dim, vb.pp("q_b_proj"))?,
                )),
            ),
        };
        let kv_b = vb.pp("kv_b_proj").get(
            (
                nh * (mla.qk_nope_head_dim + mla.v_head_dim),
                mla.kv_lora_rank,
            ),
            "weight",
        )?;
        let kv_b = kv_b.reshape((nh, mla.qk_nope_head_dim + mla.v_head_dim, mla.kv_lora_rank))?;
        Ok(Self {
            q_proj,
            q_a,
            kv_a_proj_with_mqa: linear_b(
                h,
                mla.kv_lora_rank + mla.qk_rope_head_dim,
                cfg.attention_bias,
                vb.pp("kv_a_proj_with_mqa"),
            )?,
            kv_a_layernorm: RmsNorm::new(mla.kv_lora_rank, 1e-6, vb.pp("kv_a_layernorm"))?,
            q_absorb: kv_b.narrow(1, 0, mla.qk_nope_head_dim)?.contiguous()?,
            out_absorb: kv_b
                .narrow(1, mla.qk_nope_head_dim, mla.v_head_dim)?
                .contiguous()?,
            o_proj: linear_b(nh * mla.v_head_dim, h, cfg.attention_bias, vb.pp("o_proj"))?,
            cfg: *mla,
            num_heads: nh,
            rope_theta: cfg.rope_theta,
            // self.softmax_scale = self.q_head_dim ** (-0.5)   (no rope_scaling)
            softmax_scale: (q_head_dim as f64).powf(-0.5),
            span: tracing::span!(tracing::Level::TRACE, "mla"),
        })
    }

    /// `apply_rotary_pos_emb` of modeling_deepseekv2.py: de-interleave the pairs first
    /// (`q.view(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d)`), then half-split RoPE.
    fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (b, h, s, d) = x.dims4()?;
        let x = x
            .reshape((b, h, s, d / 2, 2))?
            .transpose(3, 4)?
            .reshape((b, h, s, d))?
            .contiguous()?;
        candle_nn::rotary_emb::rope(&x, cos, sin)
    }

    pub fn forward(&self, x: &Tensor, cache: &mut Option<LayerCache>) -> Result<Tensor> {
        let _enter = self.span.enter();
        let (b, t, _) = x.dims3()?;
        let nh = self.num_heads;
        let MlaConfig {
            kv_lora_rank,
            qk_nope_head_dim: nope,
            qk_rope_head_dim: rope,
            v_head_dim,
            ..
        } = self.cfg;
        let offset = cache.as_ref().map_or(0, |c| c.seq_len());
        let q = match (&self.q_proj, &self.q_a) {
            (Some(q_proj), _) => q_proj.forward(x)?,
            // q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
            (None, Some((a, norm, bp))) => bp.forward(&norm.forward(&a.forward(x)?)?)?,
            (None, None) => unreachable!("one of q_proj / q_a_proj is always built"),
        };
        let q = q.reshape((b, t, nh, nope + rope))?.transpose(1, 2)?;
        let q_nope = q.narrow(D::Minus1, 0, nope)?.contiguous()?;
        let q_pe = q.narrow(D::Minus1, nope, rope)?.contiguous()?;
        // compressed_kv, k_pe = torch.split(self.kv_a_proj_with_mqa(h), [kv_lora_rank, rope], -1)
        let ckv = self.kv_a_proj_with_mqa.forward(x)?;
        let compressed_kv = self
            .kv_a_layernorm
            .forward(&ckv.narrow(D::Minus1, 0, kv_lora_rank)?.contiguous()?)?;
        let k_pe = ckv
            .narrow(D::Minus1, kv_lora_rank, rope)?
            .reshape((b, t, 1, rope))?
            .transpose(1, 2)?
            .contiguous()?;
        let (cos, sin) = rope_tables(
            rope,
            self.rope_theta,
            offset,
            t,
            q_pe.dtype(),
            q_pe.device(),
        )?;
        let q_pe = Self::rope(&q_pe, &cos, &sin)?;
        let k_pe = Self::rope(&k_pe, &cos, &sin)?;
        let (compressed_kv, k_pe) = match cache.take() {
            Some(LayerCache::Mla {
                compressed_kv: pc,
                k_pe: pk,
            }) => (
                Tensor::cat(&[&pc, &compressed_kv], 1)?,
                Tensor::cat(&[&pk, &k_pe], 2)?,
            ),
            _ => (compressed_kv, k_pe),
        };
        *cache = Some(LayerCache::Mla {
            compressed_kv: compressed_kv.clone(),
            k_pe: k_pe.clone(),
        });
        let total = compressed_kv.dim(1)?;
        // q_nope = torch.matmul(q_nope, q_absorb): (b, h, t, nope) x (h, nope, rank)
        let q_nope = q_nope.broadcast_matmul(&self.q_absorb.unsqueeze(0)?)?;
        // attn = (q_pe @ k_pe.mT + q_nope @ compressed_kv.unsqueeze(-3).mT) * softmax_scale
        let ckv_t = compressed_kv.unsqueeze(1)?.transpose(2, 3)?; // (b, 1, rank, total)
        let att_pe = q_pe.broadcast_matmul(&k_pe.transpose(2, 3)?)?;
        let att_nope = q_nope.broadcast_matmul(&ckv_t)?;
        let mut att = ((att_pe + att_nope)? * self.softmax_scale)?;
        if let Some(m) = causal_mask(t, offset, att.dtype(), att.device())? {
            att = att.broadcast_add(&m)?;
        }
        let att = softmax_f32(&att)?;
        // attn_output = torch.einsum('bhql,blc->bhqc', attn_weights, compressed_kv)
        let o = att.broadcast_matmul(&compressed_kv.unsqueeze(1)?)?; // (b, h, t, rank)
                                                                     // attn_output = torch.matmul(attn_output, out_absorb.mT): (b, h, t, v_head_dim)
        let o = o.broadcast_matmul(&self.out_absorb.transpose(1, 2)?.unsqueeze(0)?)?;
        debug_assert_eq!(o.dims(), &[b, nh, t, v_head_dim]);
        let _ = total;
        let o = o.transpose(1, 2)?.reshape((b, t, nh * v_head_dim))?;
        self.o_proj.forward(&o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_mask_with_offset() {
        let m = causal_mask(2, 3, DType::F32, &Device::Cpu)
            .unwrap()
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(m[0], vec![0.0, 0.0, 0.0, 0.0, f32::NEG_INFINITY]);
        assert_eq!(m[1], vec![0.0; 5]);
        assert!(causal_mask(1, 7, DType::F32, &Device::Cpu)
            .unwrap()
            .is_none());
    }

    #[test]
    fn rope_rotates_pairs_half_apart() {
        // dim 4, position 1, base 1: inv_freq = [1, 1]; x = [1, 0, 0, 0] -> [cos1, 0, sin1, 0]
        let (cos, sin) = rope_tables(4, 1.0, 1, 1, DType::F32, &Device::Cpu).unwrap();
        let x = Tensor::new(&[1f32, 0.0, 0.0, 0.0], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 4))
            .unwrap();
        let y = candle_nn::rotary_emb::rope(&x, &cos, &sin)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let (c, s) = (1f32.cos(), 1f32.sin());
        assert!(
            (y[0] - c).abs() < 1e-6
                && y[1].abs() < 1e-6
                && (y[2] - s).abs() < 1e-6
                && y[3].abs() < 1e-6,
            "{y:?}"
        );
    }
}
