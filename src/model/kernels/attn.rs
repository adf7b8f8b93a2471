//! `rope_kv` (half-split RoPE of q and k at each row's position, k and v appended to the
//! preallocated cache) and `decode_attn` (one query row per block over its sequence's cache,
//! causal by position). Reference: [`crate::model::decoder::attention`]'s `rope_tables` +
//! candle's `rope` and the MHA's `softmax(q k^T / sqrt(d)) v` with grouped kv heads.
//!
//! MHA only (DeepSeek-OCR's decoder): MLA's latent attention stays on the reference path.

use candle_core::Result;

use super::{cfg, launch, Kernels};

/// Shapes of the attention and its cache.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Positions per slot in the cache.
    pub max_t: usize,
}

impl AttnShape {
    fn check(&self) -> Result<()> {
        if self.head_dim % 32 != 0 || self.head_dim > 256 || self.heads % self.kv_heads != 0 {
            candle_core::bail!("attention kernels: unsupported shape {self:?} (head_dim a multiple of 32 up to 256, heads a multiple of kv_heads)");
        }
        Ok(())
    }
}

impl Kernels {
    /// RoPE on the q and k heads of `qkv` `(rows, (heads + 2 kv_heads) * head_dim)` at positions
    /// `pos` (u32 per row); k and v to the cache at `[slot[r], :, pos[r]]`.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_kv(
        &self,
        qkv: u64,
        pos: u64,
        slot: u64,
        k_cache: u64,
        v_cache: u64,
        rows: usize,
        s: AttnShape,
        theta: f64,
    ) -> Result<()> {
        s.check()?;
        launch!(
            self,
            self.rope_kv,
            cfg((rows as u32, (s.heads + 2 * s.kv_heads) as u32, 1), 64, 0),
            qkv, pos, slot, k_cache, v_cache, s.heads as i32, s.kv_heads as i32,
            s.head_dim as i32, s.max_t as i32, theta as f32
        )
    }

    /// `out (rows, heads * head_dim)`: each row's attention over keys `0..=pos[r]` of its slot.
    /// `split`: `None` runs one block per row and head (prefill: many rows); `Some(part)` splits
    /// the keys into chunks of [`SPLIT_CHUNK`] over more blocks (decode: few rows), `part` holding
    /// `rows * heads * split_count(max_t) * (head_dim + 2)` f32, merged by a second kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_attn(
        &self,
        qkv: u64,
        pos: u64,
        slot: u64,
        k_cache: u64,
        v_cache: u64,
        out: u64,
        rows: usize,
        s: AttnShape,
        split: Option<u64>,
    ) -> Result<()> {
        s.check()?;
        let stride = (s.heads + 2 * s.kv_heads) * s.head_dim;
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        let (chunk, splits, part) = match split {
            None => (s.max_t, 1, 0u64),
            Some(p) => (SPLIT_CHUNK, split_count(s.max_t), p),
        };
        let groups = 256 / (s.head_dim / 8);
        let shared = ((s.head_dim + chunk + groups * s.head_dim) * 4) as u32;
        launch!(
            self,
            self.decode_attn,
            cfg((rows as u32, s.heads as u32, splits as u32), 256, shared),
            qkv, stride as i32, pos, slot, k_cache, v_cache, out, part, s.heads as i32,
            s.kv_heads as i32, s.head_dim as i32, s.max_t as i32, chunk as i32, scale
        )?;
        if splits > 1 {
            launch!(
                self,
                self.decode_attn_combine,
                cfg((rows as u32, s.heads as u32, 1), s.head_dim as u32, 0),
                part, pos, out, s.heads as i32, s.head_dim as i32, s.max_t as i32, chunk as i32,
                splits as i32
            )?;
        }
        Ok(())
    }
}

/// Keys per block of the split attention (decode).
pub const SPLIT_CHUNK: usize = 64;

/// Splits of the split attention for a cache of `max_t` positions.
pub fn split_count(max_t: usize) -> usize {
    max_t.div_ceil(SPLIT_CHUNK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::decoder::attention::rope_tables;
    use crate::model::kernels::testutil::*;
    use crate::model::kernels::{tensor_ptr, Kernels};
    use candle_core::{DType, Device, Tensor, D};
    use half::bf16;

    /// Two sequences (slots 1 and 0) at different lengths, GQA (4 heads on 2 kv heads): the
    /// kernels against the reference's RoPE and attention, decode and prefill shapes.
    #[test]
    fn rope_kv_and_decode_attn_match_the_reference() {
        let (dev, cd) = device();
        let k = Kernels::load(&cd).unwrap();
        let s = AttnShape { heads: 4, kv_heads: 2, head_dim: 128, max_t: 256 };
        let (nh, nkv, hd) = (s.heads, s.kv_heads, s.head_dim);
        let width = (nh + 2 * nkv) * hd;
        let theta = 10000.0;
        // sequence A (slot 1): 150 tokens (3 chunks of 64 in the split form); sequence B (slot 0):
        // 20 tokens. All rows in one call:
        // the prefill of both at once (rows carry their own slot and position).
        let lens = [(1u32, 150usize), (0u32, 20usize)];
        let rows: usize = lens.iter().map(|l| l.1).sum();
        let qkv = rand_bf16(&[rows, width], 2.0, 11);
        let (mut pos, mut slot) = (vec![], vec![]);
        for &(sl, n) in &lens {
            for p in 0..n {
                pos.push(p as u32);
                slot.push(sl);
            }
        }
        let g_qkv = qkv.to_device(&dev).unwrap();
        let g_pos = Tensor::new(pos.as_slice(), &dev).unwrap();
        let g_slot = Tensor::new(slot.as_slice(), &dev).unwrap();
        let kc = Tensor::zeros((2, nkv, s.max_t, hd), DType::BF16, &dev).unwrap();
        let vc = Tensor::zeros((2, nkv, s.max_t, hd), DType::BF16, &dev).unwrap();
        let out = Tensor::zeros((rows, nh * hd), DType::BF16, &dev).unwrap();
        let p = |t: &Tensor| tensor_ptr::<bf16>(t).unwrap();
        let pu = |t: &Tensor| tensor_ptr::<u32>(t).unwrap();
        k.rope_kv(p(&g_qkv), pu(&g_pos), pu(&g_slot), p(&kc), p(&vc), rows, s, theta).unwrap();
        k.decode_attn(p(&g_qkv), pu(&g_pos), pu(&g_slot), p(&kc), p(&vc), p(&out), rows, s, None).unwrap();
        // the split form (decode's), merged by the second kernel
        let split_out = Tensor::zeros((rows, nh * hd), DType::BF16, &dev).unwrap();
        let part = Tensor::zeros(rows * nh * split_count(s.max_t) * (hd + 2), DType::F32, &dev).unwrap();
        k.decode_attn(p(&g_qkv), pu(&g_pos), pu(&g_slot), p(&kc), p(&vc), p(&split_out), rows, s, Some(tensor_ptr::<f32>(&part).unwrap())).unwrap();
        let split_diff = max_diff(&split_out, &out);
        eprintln!("decode_attn split vs one block: max |diff| {split_diff:.3e}");
        assert!(split_diff <= 8e-3, "split attention: {split_diff}");

        let mut start = 0;
        let (mut worst_q, mut worst_k, mut worst_o) = (0f32, 0f32, 0f32);
        for &(sl, n) in &lens {
            let part = qkv.narrow(0, start, n).unwrap();
            let heads = |off: usize, c: usize| {
                part.narrow(1, off * hd, c * hd).unwrap().reshape((1, n, c, hd)).unwrap()
                    .transpose(1, 2).unwrap().contiguous().unwrap()
            };
            let (q, kk, v) = (heads(0, nh), heads(nh, nkv), heads(nh + nkv, nkv));
            let (cos, sin) = rope_tables(hd, theta, 0, n, DType::BF16, &Device::Cpu).unwrap();
            let q = candle_nn::rotary_emb::rope(&q, &cos, &sin).unwrap();
            let kk = candle_nn::rotary_emb::rope(&kk, &cos, &sin).unwrap();
            // kernel's q (rotated in place) and cached k/v
            let gq = g_qkv.narrow(0, start, n).unwrap().narrow(1, 0, nh * hd).unwrap()
                .reshape((1, n, nh, hd)).unwrap().transpose(1, 2).unwrap();
            worst_q = worst_q.max(max_diff(&gq, &q));
            let gk = kc.narrow(0, sl as usize, 1).unwrap().narrow(2, 0, n).unwrap();
            worst_k = worst_k.max(max_diff(&gk, &kk));
            assert_eq!(max_diff(&vc.narrow(0, sl as usize, 1).unwrap().narrow(2, 0, n).unwrap(), &v), 0.0);
            // attention in f32 with a causal mask, kv heads repeated
            let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let rep = |t: Tensor| {
                t.unsqueeze(2).unwrap().broadcast_as((1, nkv, nh / nkv, n, hd)).unwrap()
                    .reshape((1, nh, n, hd)).unwrap()
            };
            let (kr, vr) = (rep(f(&kk)), rep(f(&v)));
            let att = (f(&q).matmul(&kr.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
            let mask = crate::model::decoder::attention::causal_mask(n, 0, DType::F32, &Device::Cpu)
                .unwrap()
                .unwrap();
            let att = att.broadcast_add(&mask).unwrap();
            let att = candle_nn::ops::softmax(&att, D::Minus1).unwrap();
            let o = att.matmul(&vr).unwrap().transpose(1, 2).unwrap().reshape((n, nh * hd)).unwrap();
            worst_o = worst_o.max(max_diff(&out.narrow(0, start, n).unwrap(), &o));
            start += n;
        }
        eprintln!("rope_kv: max |q diff| {worst_q:.3e}, max |k diff| {worst_k:.3e}; decode_attn: max |out diff| {worst_o:.3e}");
        // |q|, |k| < 2.9: a bf16 ulp there is 2^-6; the attention output |o| < 2: the kernel
        // keeps f32 where the reference rounds to bf16 once more.
        assert!(worst_q <= 3.2e-2 && worst_k <= 3.2e-2, "rope: q {worst_q}, k {worst_k}");
        assert!(worst_o <= 1.6e-2, "attention: {worst_o}");
    }
}
