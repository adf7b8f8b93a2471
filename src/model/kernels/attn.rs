//! `rope_kv` (half-split RoPE of q and k at each row's position, k and v appended to the
//! preallocated cache: prefill) and `decode_attn` (one query row per block over its sequence's
//! cache, causal by position; for decode it also does rope_kv's work, in the same launch). Reference: [`crate::model::decoder::attention`]'s `rope_tables` +
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
    /// `split`: `None` runs one block per row and head (prefill: many rows); `Some` splits the
    /// keys into [`split_count`] shares of at least [`SPLIT_CHUNK`] keys over more blocks
    /// (decode: few rows), merged by the last block of each row and head. `rope`: `Some(theta)`
    /// does [`Self::rope_kv`]'s work for the rows in the same launch (decode: every row in a
    /// slot of its own); `None` expects q rotated and the cache written (prefill, after
    /// `rope_kv`).
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
        split: Option<&SplitScratch>,
        rope: Option<f64>,
    ) -> Result<()> {
        s.check()?;
        let stride = (s.heads + 2 * s.kv_heads) * s.head_dim;
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        let (chunk, splits, part, done) = match split {
            None => (s.max_t, 1, 0u64, 0u64),
            // the scores' room: the longest share
            Some(p) => {
                let splits = split_count(s.max_t);
                (s.max_t.div_ceil(splits).max(self.attn_share), splits, p.part, p.done)
            }
        };
        let groups = 256 / (s.head_dim / 8);
        let shared = ((s.head_dim + chunk + groups * s.head_dim) * 4) as u32;
        launch!(
            self,
            self.decode_attn,
            cfg((rows as u32, s.heads as u32, splits as u32), 256, shared),
            qkv, stride as i32, pos, slot, k_cache, v_cache, out, part, done, s.heads as i32,
            s.kv_heads as i32, s.head_dim as i32, s.max_t as i32, chunk as i32,
            self.attn_share as i32, scale, rope.is_some() as i32, rope.unwrap_or(0.0) as f32
        )
    }
}

/// The split attention's working memory (device addresses): `part` `rows * heads *
/// split_count(max_t) * (head_dim + 2)` f32; `done` `rows * heads` i32, zero when allocated
/// (each launch leaves it zero again).
#[derive(Debug, Clone, Copy)]
pub struct SplitScratch {
    pub part: u64,
    pub done: u64,
}

/// The fewest keys per block of the split attention (decode; `OCR_PATCH_ATTN_SHARE` overrides
/// it). On an H100 at ~300 positions, batch 1: 8-48 keys 0.83 ms/token, 64 0.84, 128 0.90,
/// 256 1.01, 512 (one block per head) 1.04.
pub const SPLIT_CHUNK: usize = 32;

/// Blocks per row and head of the split attention, at most: a row's keys go in shares of
/// `max(SPLIT_CHUNK, len / SPLITS)`, so a long cache (8,192 positions) launches 16 blocks per
/// head, not 128 of which all but a few return at once.
pub const SPLITS: usize = 16;

/// Splits of the split attention for a cache of `max_t` positions.
pub fn split_count(max_t: usize) -> usize {
    max_t.div_ceil(SPLIT_CHUNK).min(SPLITS)
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
        let s = AttnShape { heads: 4, kv_heads: 2, head_dim: 128, max_t: 2048 };
        let (nh, nkv, hd) = (s.heads, s.kv_heads, s.head_dim);
        let width = (nh + 2 * nkv) * hd;
        let theta = 10000.0;
        // sequence A (slot 1): 1,100 tokens (16 shares of 69 keys in the split form); sequence B
        // (slot 0): 20 tokens (one share of at least 32: written without a merge). All rows in
        // one call: the prefill of both at once (rows carry their own slot and position).
        let (na, nb) = (1100u32, 20u32);
        let lens = [(1u32, na as usize), (0u32, nb as usize)];
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
        k.decode_attn(p(&g_qkv), pu(&g_pos), pu(&g_slot), p(&kc), p(&vc), p(&out), rows, s, None, None).unwrap();
        // the split form, merged by the last block of each row and head; twice over the same
        // scratch (its counters must be back at zero after each launch)
        let part = Tensor::zeros(rows * nh * split_count(s.max_t) * (hd + 2), DType::F32, &dev).unwrap();
        let done = Tensor::zeros(rows * nh, DType::U32, &dev).unwrap();
        let split = SplitScratch { part: tensor_ptr::<f32>(&part).unwrap(), done: pu(&done) };
        for round in 0..2 {
            let split_out = Tensor::zeros((rows, nh * hd), DType::BF16, &dev).unwrap();
            k.decode_attn(p(&g_qkv), pu(&g_pos), pu(&g_slot), p(&kc), p(&vc), p(&split_out), rows, s, Some(&split), None).unwrap();
            let split_diff = max_diff(&split_out, &out);
            eprintln!("decode_attn split vs one block (launch {round}): max |diff| {split_diff:.3e}");
            assert!(split_diff <= 8e-3, "split attention, launch {round}: {split_diff}");
            let left: Vec<u32> = done.to_vec1().unwrap();
            assert!(left.iter().all(|&c| c == 0), "counters left at {left:?}");
        }
        // decode's form: the last row of each sequence, q and k not yet rotated and the cache
        // holding the earlier positions only; the kernel rotates, appends and attends
        let earlier: Vec<u32> = [(0u32, na - 1), (na, na + nb - 1)].iter().flat_map(|&(a, b)| a..b).collect();
        let earlier = Tensor::new(earlier.as_slice(), &Device::Cpu).unwrap();
        let sub = |t: &Tensor| t.index_select(&earlier.to_device(t.device()).unwrap(), 0).unwrap();
        let (kc2, vc2) = (kc.zeros_like().unwrap(), vc.zeros_like().unwrap());
        let n_early = earlier.dims1().unwrap();
        let (e_qkv, e_pos, e_slot) = (sub(&qkv).to_device(&dev).unwrap(), sub(&g_pos), sub(&g_slot));
        k.rope_kv(p(&e_qkv), pu(&e_pos), pu(&e_slot), p(&kc2), p(&vc2), n_early, s, theta).unwrap();
        let last = Tensor::new(&[na - 1, na + nb - 1], &dev).unwrap();
        let d_qkv = qkv.to_device(&dev).unwrap().index_select(&last, 0).unwrap();
        let (d_pos, d_slot) = (g_pos.index_select(&last, 0).unwrap(), g_slot.index_select(&last, 0).unwrap());
        let d_out = Tensor::zeros((2, nh * hd), DType::BF16, &dev).unwrap();
        k.decode_attn(p(&d_qkv), pu(&d_pos), pu(&d_slot), p(&kc2), p(&vc2), p(&d_out), 2, s, Some(&split), Some(theta)).unwrap();
        let fused_diff = max_diff(&d_out, &out.index_select(&last, 0).unwrap());
        eprintln!("decode_attn with RoPE and the append in the launch: max |diff| {fused_diff:.3e} from rope_kv + decode_attn");
        assert!(fused_diff <= 8e-3, "fused decode attention: {fused_diff}");
        assert_eq!(max_diff(&kc2, &kc), 0.0, "the appended keys differ from rope_kv's");
        assert_eq!(max_diff(&vc2, &vc), 0.0, "the appended values differ from rope_kv's");

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
