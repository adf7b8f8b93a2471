//! The GPU fast path of the decoder: bf16 weights repacked for the kernels of
//! [`crate::model::kernels`], a preallocated KV cache of `max_slots` sequences, and a decode step
//! that runs entirely on the device (embedding, attention over the cache, on-device MoE routing
//! and grouped experts, lm_head, n-gram guard, greedy pick and bookkeeping), so that it can be
//! replayed as one CUDA graph per batch size.
//!
//! Owns: the packed weights, the cache and the per-sequence decode state (token, position,
//! generated history); [`vision`] puts the vision towers' ops on fused kernels. Does not own the
//! vision encoder's structure nor the choice of tokens beyond greedy (sampling stays on
//! [`crate::model::generate`]).
//!
//! Prefill runs the same kernels with one row per prompt token (`decode_attn` is causal by
//! position), in chunks of `max_rows`. MHA decoders only (DeepSeek-OCR's): MLA configs and
//! biased attention are refused with an error and run on the reference path.

pub mod vision;

use std::collections::HashMap;

use candle_core::cuda_backend::cudarc;
use candle_core::{CudaDevice, DType, Result, Tensor};
use candle_nn::VarBuilder;
use half::bf16;

use crate::model::config::{TextConfig, TopkMethod};
use crate::model::generate::NoRepeatNgram;
use crate::model::kernels::attn::{AttnShape, SplitScratch};
use crate::model::kernels::moe::{ExpertWeights, Groups, RouteInput, RouteParams, RouteScratch};
use crate::model::kernels::norm::Delta;
use crate::model::kernels::sample::{NgramParams, StepState};
use crate::model::kernels::{copy_d2d, cuda_err, tensor_ptr, Buf, Kernels};

/// Sizes of the preallocated state.
#[derive(Debug, Clone)]
pub struct FastOptions {
    /// Concurrent sequences (cache slots; the decode batch is slots `0..n`).
    pub max_slots: usize,
    /// Positions per sequence (prompt + generated), at most 8192.
    pub max_t: usize,
    /// Rows per forward chunk (prefill tokens at once); at least `max_slots`.
    pub max_rows: usize,
    /// The no-repeat n-gram guard on the generated tokens, on the device.
    pub no_repeat: Option<NoRepeatNgram>,
}

/// A layer's feed-forward as grouped experts: a MoE (routed + shared pieces) or the dense MLP
/// (one fixed expert).
struct Experts {
    e_total: usize,
    /// Slots per row.
    k: usize,
    inter: usize,
    w_gate: Buf<bf16>,
    w_up: Buf<bf16>,
    w_down: Buf<bf16>,
    route: Option<(Buf<bf16>, Option<Buf<f32>>, RouteParams)>,
}

impl Experts {
    /// The grouped kernels' view of the weights; the fixed experts are the shared experts'
    /// pieces of a routed layer, or the dense MLP.
    fn weights(&self) -> ExpertWeights {
        ExpertWeights {
            gate: self.w_gate.ptr,
            up: self.w_up.ptr,
            down: self.w_down.ptr,
            e_total: self.e_total,
            inter: self.inter,
            fixed: self.route.as_ref().map_or(1, |(_, _, p)| p.n_fixed),
        }
    }
}

struct Layer {
    ln1: Buf<bf16>,
    ln2: Buf<bf16>,
    wqkv: Buf<bf16>,
    wo: Buf<bf16>,
    ffn: Experts,
}

/// The decoder on the GPU, with its cache and decode state.
pub struct FastDecoder {
    k: Kernels,
    dev: CudaDevice,
    cfg: TextConfig,
    shape: AttnShape,
    opts: FastOptions,
    embed: Buf<bf16>,
    norm: Buf<bf16>,
    lm_head: Option<Buf<bf16>>,
    layers: Vec<Layer>,
    // activations, `max_rows` rows
    x: Buf<bf16>,
    /// One row's other residual buffer: `norm_linear` reads the row from one and writes the
    /// updated row to the other (its other blocks are still reading), so one row's layers
    /// alternate between `x` and this.
    x_alt: Buf<bf16>,
    h: Buf<bf16>,
    qkv: Buf<bf16>,
    attn: Buf<bf16>,
    attn_part: Buf<f32>,
    attn_done: Buf<i32>,
    delta: Buf<bf16>,
    slot_expert: Buf<i32>,
    slot_w: Buf<f32>,
    route_logits: Buf<f32>,
    route_done: Buf<i32>,
    dense_expert: Buf<i32>,
    ones: Buf<f32>,
    offsets: Buf<i32>,
    list: Buf<i32>,
    active: Buf<i32>,
    n_active: Buf<i32>,
    /// `Groups::ready` and `Groups::fixed_done`.
    counters: Buf<i32>,
    act: Buf<bf16>,
    slot_out: Buf<f32>,
    logits: Buf<bf16>,
    row_pos: Buf<u32>,
    row_slot: Buf<u32>,
    // decode state, `max_slots` sequences
    token: Buf<u32>,
    pos: Buf<u32>,
    slot_ids: Buf<u32>,
    hist: Buf<u32>,
    hist_len: Buf<u32>,
    whitelist: Buf<u32>,
    hist_cap: usize,
    kc: Vec<Buf<bf16>>,
    vc: Vec<Buf<bf16>>,
    graphs: HashMap<usize, cudarc::driver::CudaGraph>,
}

/// Copies a host bf16 tensor into `buf` at element `off`; returns the offset after it.
fn put(k: &Kernels, buf: &Buf<bf16>, off: usize, t: &Tensor) -> Result<usize> {
    let v: Vec<bf16> = t.to_dtype(DType::BF16)?.flatten_all()?.to_vec1()?;
    buf.upload(&k.stream, off, &v)?;
    Ok(off + v.len())
}

impl FastDecoder {
    /// Packs the decoder's weights from `vb` (rooted at the checkpoint's top, on the CPU, bf16)
    /// onto `dev` and allocates the cache and activations.
    pub fn new(cfg: &TextConfig, vb: VarBuilder, dev: &CudaDevice, opts: FastOptions) -> Result<Self> {
        if cfg.mla.is_some() {
            candle_core::bail!("the fast path runs MHA decoders (DeepSeek-OCR's); this config uses MLA: use the reference path");
        }
        if cfg.attention_bias {
            candle_core::bail!("the fast path has no attention bias; use the reference path");
        }
        if opts.max_t > 8192 || opts.max_t < 2 || opts.max_slots == 0 {
            candle_core::bail!("fast path: max_t must be 2..=8192 and max_slots at least 1");
        }
        let k = Kernels::load(dev)?;
        let (hs, v) = (cfg.hidden_size, cfg.vocab_size);
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let shape = AttnShape { heads: nh, kv_heads: nkv, head_dim: hd, max_t: opts.max_t };
        let m = vb.pp("model");
        let load = |name: &str, t: Tensor| -> Result<Buf<bf16>> {
            let b = Buf::<bf16>::zeros(dev, t.elem_count())?;
            put(&k, &b, 0, &t).map_err(|e| e.context(name.to_string()))?;
            Ok(b)
        };
        let embed = load("embed_tokens", m.pp("embed_tokens").get((v, hs), "weight")?)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(load("lm_head", vb.pp("lm_head").get((v, hs), "weight")?)?)
        };
        let norm = load("norm", m.pp("norm").get(hs, "weight")?)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = m.pp(format!("layers.{i}"));
            let a = l.pp("self_attn");
            let wqkv = Buf::<bf16>::zeros(dev, (nh + 2 * nkv) * hd * hs)?;
            let mut off = put(&k, &wqkv, 0, &a.pp("q_proj").get((nh * hd, hs), "weight")?)?;
            off = put(&k, &wqkv, off, &a.pp("k_proj").get((nkv * hd, hs), "weight")?)?;
            put(&k, &wqkv, off, &a.pp("v_proj").get((nkv * hd, hs), "weight")?)?;
            let wo = load("o_proj", a.pp("o_proj").get((hs, nh * hd), "weight")?)?;
            let mlp = l.pp("mlp");
            let ffn = match (&cfg.moe, cfg.is_moe_layer(i)) {
                (Some(mc), true) => {
                    let (e, inter) = (mc.n_routed_experts, mc.moe_intermediate_size);
                    let n_fixed = mc.n_shared_experts.unwrap_or(0);
                    let e_total = e + n_fixed;
                    let w_gate = Buf::<bf16>::zeros(dev, e_total * inter * hs)?;
                    let w_up = Buf::<bf16>::zeros(dev, e_total * inter * hs)?;
                    let w_down = Buf::<bf16>::zeros(dev, e_total * hs * inter)?;
                    let (mut og, mut ou, mut od) = (0, 0, 0);
                    for j in 0..e {
                        let x = mlp.pp(format!("experts.{j}"));
                        og = put(&k, &w_gate, og, &x.pp("gate_proj").get((inter, hs), "weight")?)?;
                        ou = put(&k, &w_up, ou, &x.pp("up_proj").get((inter, hs), "weight")?)?;
                        od = put(&k, &w_down, od, &x.pp("down_proj").get((hs, inter), "weight")?)?;
                    }
                    if n_fixed > 0 {
                        // the shared MLP (intermediate n_fixed*inter) as n_fixed experts of inter
                        let s = mlp.pp("shared_experts");
                        let g = s.pp("gate_proj").get((n_fixed * inter, hs), "weight")?;
                        let u = s.pp("up_proj").get((n_fixed * inter, hs), "weight")?;
                        let d = s.pp("down_proj").get((hs, n_fixed * inter), "weight")?;
                        put(&k, &w_gate, og, &g)?;
                        put(&k, &w_up, ou, &u)?;
                        for p in 0..n_fixed {
                            od = put(&k, &w_down, od, &d.narrow(1, p * inter, inter)?.contiguous()?)?;
                        }
                    }
                    let gate = mlp.pp("gate");
                    let gw = load("gate", gate.get((e, hs), "weight")?)?;
                    let bias = if mc.topk_method == TopkMethod::NoauxTc {
                        let b: Vec<f32> = gate.get(e, "e_score_correction_bias")?.to_dtype(DType::F32)?.to_vec1()?;
                        let buf = Buf::<f32>::zeros(dev, e)?;
                        buf.upload(&k.stream, 0, &b)?;
                        Some(buf)
                    } else {
                        None
                    };
                    let p = RouteParams::new(mc, n_fixed)?;
                    Experts { e_total, k: p.k(), inter, w_gate, w_up, w_down, route: Some((gw, bias, p)) }
                }
                _ => {
                    let inter = cfg.intermediate_size;
                    Experts {
                        e_total: 1,
                        k: 1,
                        inter,
                        w_gate: load("gate_proj", mlp.pp("gate_proj").get((inter, hs), "weight")?)?,
                        w_up: load("up_proj", mlp.pp("up_proj").get((inter, hs), "weight")?)?,
                        w_down: load("down_proj", mlp.pp("down_proj").get((hs, inter), "weight")?)?,
                        route: None,
                    }
                }
            };
            layers.push(Layer {
                ln1: load("input_layernorm", l.pp("input_layernorm").get(hs, "weight")?)?,
                ln2: load("post_attention_layernorm", l.pp("post_attention_layernorm").get(hs, "weight")?)?,
                wqkv,
                wo,
                ffn,
            });
        }
        let r = opts.max_rows.max(opts.max_slots);
        let kmax = layers.iter().map(|l| l.ffn.k).max().unwrap_or(1);
        let act_row = layers.iter().map(|l| l.ffn.k * l.ffn.inter).max().unwrap_or(1);
        let e_max = layers.iter().map(|l| l.ffn.e_total).max().unwrap_or(1);
        let s = opts.max_slots;
        let hist_cap = opts.max_t;
        let ones = Buf::<f32>::zeros(dev, r)?;
        ones.upload(&k.stream, 0, &vec![1f32; r])?;
        let slot_ids = Buf::<u32>::zeros(dev, s)?;
        slot_ids.upload(&k.stream, 0, &(0..s as u32).collect::<Vec<_>>())?;
        let whitelist = match &opts.no_repeat {
            Some(g) if !g.whitelist.is_empty() => {
                let mut w: Vec<u32> = g.whitelist.iter().copied().collect();
                w.sort_unstable();
                let b = Buf::<u32>::zeros(dev, w.len())?;
                b.upload(&k.stream, 0, &w)?;
                b
            }
            _ => Buf::<u32>::zeros(dev, 1)?,
        };
        let cache_len = s * nkv * opts.max_t * hd;
        let mut kc = Vec::new();
        let mut vc = Vec::new();
        for _ in 0..cfg.num_hidden_layers {
            kc.push(Buf::<bf16>::zeros(dev, cache_len)?);
            vc.push(Buf::<bf16>::zeros(dev, cache_len)?);
        }
        Ok(Self {
            x: Buf::zeros(dev, r * hs)?,
            x_alt: Buf::zeros(dev, hs)?,
            h: Buf::zeros(dev, r * hs)?,
            qkv: Buf::zeros(dev, r * (nh + 2 * nkv) * hd)?,
            attn: Buf::zeros(dev, r * nh * hd)?,
            attn_part: Buf::zeros(dev, s * nh * crate::model::kernels::attn::split_count(opts.max_t) * (hd + 2))?,
            attn_done: Buf::zeros(dev, s * nh)?,
            delta: Buf::zeros(dev, r * hs)?,
            slot_expert: Buf::zeros(dev, r * kmax)?,
            slot_w: Buf::zeros(dev, r * kmax)?,
            route_logits: Buf::zeros(dev, r * e_max)?,
            route_done: Buf::zeros(dev, r + 1)?,
            dense_expert: Buf::zeros(dev, r)?,
            ones,
            offsets: Buf::zeros(dev, e_max + 1)?,
            list: Buf::zeros(dev, r * kmax)?,
            active: Buf::zeros(dev, e_max)?,
            n_active: Buf::zeros(dev, 1)?,
            counters: Buf::zeros(dev, 2)?,
            act: Buf::zeros(dev, r * act_row)?,
            slot_out: Buf::zeros(dev, r * kmax * hs)?,
            logits: Buf::zeros(dev, s * v)?,
            row_pos: Buf::zeros(dev, r)?,
            row_slot: Buf::zeros(dev, r)?,
            token: Buf::zeros(dev, s)?,
            pos: Buf::zeros(dev, s)?,
            slot_ids,
            hist: Buf::zeros(dev, s * hist_cap)?,
            hist_len: Buf::zeros(dev, s)?,
            whitelist,
            hist_cap,
            kc,
            vc,
            graphs: HashMap::new(),
            dev: dev.clone(),
            k,
            cfg: cfg.clone(),
            shape,
            opts,
            embed,
            norm,
            lm_head,
            layers,
        })
    }

    /// The kernels the step launches (the bench reads their timeline, [`crate::model::kernels::trace`]).
    pub fn kernels(&self) -> &Kernels {
        &self.k
    }

    pub fn options(&self) -> &FastOptions {
        &self.opts
    }

    fn lm_head_ptr(&self) -> u64 {
        self.lm_head.as_ref().unwrap_or(&self.embed).ptr
    }

    /// The layers over `n` rows of `x` at positions `pos` in slots `slot` (device u32 arrays):
    /// appends their k/v to the cache; leaves the final norm's output in `h`.
    fn forward_rows(&self, n: usize, pos: u64, slot: u64, decode: bool) -> Result<()> {
        let k = &self.k;
        let (hs, eps) = (self.cfg.hidden_size, self.cfg.rms_norm_eps);
        let s = self.shape;
        let width = (s.heads + 2 * s.kv_heads) * s.head_dim;
        // the residual stream's buffer, and what the next norm adds to it first
        let (mut resid, mut alt) = (self.x.ptr, self.x_alt.ptr);
        let mut pending = Delta::None;
        for (li, l) in self.layers.iter().enumerate() {
            if k.norm_linear_fits(n, hs) {
                // one row: the norm inside the q/k/v projection's blocks (no launch between)
                k.norm_linear(resid, alt, pending, l.ln1.ptr, eps, l.wqkv.ptr, self.qkv.ptr, hs, width)?;
                if !matches!(pending, Delta::None) {
                    std::mem::swap(&mut resid, &mut alt);
                }
            } else {
                k.add_rmsnorm(resid, pending, l.ln1.ptr, self.h.ptr, n, hs, eps)?;
                k.linear(self.h.ptr, l.wqkv.ptr, self.qkv.ptr, n, hs, width)?;
            }
            let (kc, vc) = (self.kc[li].ptr, self.vc[li].ptr);
            // decode (few rows): keys split over more blocks; prefill: one block per row and head
            // (from 16 rows on, rows x heads blocks fill the GPU without splitting)
            let split = SplitScratch { part: self.attn_part.ptr, done: self.attn_done.ptr };
            let split = (decode && n < 16).then_some(&split);
            if decode {
                // every row its own slot: RoPE and the cache append inside the attention's launch
                k.decode_attn(self.qkv.ptr, pos, slot, kc, vc, self.attn.ptr, n, s, split, Some(self.cfg.rope_theta))?;
            } else {
                k.rope_kv(self.qkv.ptr, pos, slot, kc, vc, n, s, self.cfg.rope_theta)?;
                k.decode_attn(self.qkv.ptr, pos, slot, kc, vc, self.attn.ptr, n, s, split, None)?;
            }
            k.linear(self.attn.ptr, l.wo.ptr, self.delta.ptr, n, s.heads * s.head_dim, hs)?;
            let f = &l.ffn;
            let g = Groups {
                offsets: self.offsets.ptr,
                list: self.list.ptr,
                active: self.active.ptr,
                n_active: self.n_active.ptr,
                ready: self.counters.at(0),
                fixed_done: self.counters.at(1),
            };
            let ns = n * f.k;
            let sw = match &f.route {
                Some((gw, bias, p)) => {
                    // the residual add, the post-attention norm, the routing and the slots' plan:
                    // one launch
                    let b = bias.as_ref().map_or(0, |b| b.ptr);
                    let scratch = RouteScratch { logits: self.route_logits.ptr, done: self.route_done.ptr };
                    let input = RouteInput::AddNorm {
                        resid,
                        delta: self.delta.ptr,
                        weight: l.ln2.ptr,
                        normed: self.h.ptr,
                        eps,
                    };
                    k.moe_route(input, gw.ptr, b, n, hs, p, &scratch, self.slot_expert.ptr, self.slot_w.ptr, &g)?;
                    self.slot_w.ptr
                }
                None => {
                    // the dense layer: its slots are fixed
                    k.add_rmsnorm(resid, Delta::Rows(self.delta.ptr), l.ln2.ptr, self.h.ptr, n, hs, eps)?;
                    k.moe_plan(self.dense_expert.ptr, ns, f.e_total, n, &g)?;
                    self.ones.ptr
                }
            };
            k.moe_experts(&f.weights(), self.h.ptr, &g, ns, f.k, hs, self.act.ptr, self.slot_out.ptr)?;
            pending = Delta::Slots { slot_out: self.slot_out.ptr, w: sw, k: f.k };
        }
        k.add_rmsnorm(resid, pending, self.norm.ptr, self.h.ptr, n, hs, eps)
    }

    fn state(&self, slot: usize) -> StepState {
        StepState {
            token: self.token.at(slot),
            pos: self.pos.at(slot),
            hist: self.hist.at(slot * self.hist_cap),
            hist_len: self.hist_len.at(slot),
            hist_cap: self.hist_cap,
        }
    }

    /// Prefills sequence `slot` with the prompt's embeddings `(t, hidden)` (bf16, on this
    /// device; image rows already merged), replacing what the slot held, and chooses its first
    /// token greedily: after this the slot is ready for [`Self::step`].
    pub fn prefill(&mut self, slot: usize, embeds: &Tensor) -> Result<()> {
        let (t, hs) = embeds.dims2()?;
        if slot >= self.opts.max_slots || t == 0 || t >= self.opts.max_t || hs != self.cfg.hidden_size {
            candle_core::bail!("prefill: slot {slot} of {}, {t} positions of at most {} (hidden {hs})", self.opts.max_slots, self.opts.max_t - 1);
        }
        let e = embeds.to_dtype(DType::BF16)?.contiguous()?;
        let src = tensor_ptr::<bf16>(&e)?;
        let r = self.opts.max_rows.max(self.opts.max_slots);
        let mut start = 0;
        let mut last = 0;
        while start < t {
            let c = (t - start).min(r);
            copy_d2d(&self.k.stream, self.x.ptr, src + (start * hs * 2) as u64, c * hs * 2)?;
            self.row_pos.upload(&self.k.stream, 0, &(start as u32..(start + c) as u32).collect::<Vec<_>>())?;
            self.row_slot.upload(&self.k.stream, 0, &vec![slot as u32; c])?;
            self.forward_rows(c, self.row_pos.ptr, self.row_slot.ptr, false)?;
            last = c - 1;
            start += c;
        }
        let v = self.cfg.vocab_size;
        self.k.linear(self.h.at(last * hs), self.lm_head_ptr(), self.logits.at(slot * v), 1, hs, v)?;
        // the first token is generated at position t (pos advances from t - 1), history empty
        self.pos.upload(&self.k.stream, slot, &[t as u32 - 1])?;
        self.hist_len.upload(&self.k.stream, slot, &[0])?;
        self.k.greedy_next(&self.state(slot), self.logits.at(slot * v), 1, v, true)?;
        self.k.stream.synchronize().map_err(cuda_err)?;
        drop(e);
        Ok(())
    }

    /// Copies slot `from`'s cache and decode state to slot `to` (a batch of one prompt).
    pub fn clone_slot(&mut self, from: usize, to: usize) -> Result<()> {
        if from >= self.opts.max_slots || to >= self.opts.max_slots {
            candle_core::bail!("clone_slot: slots {from}, {to} of {}", self.opts.max_slots);
        }
        let per = self.cfg.num_key_value_heads * self.opts.max_t * self.cfg.head_dim;
        let st = &self.k.stream;
        for (kc, vc) in self.kc.iter().zip(&self.vc) {
            copy_d2d(st, kc.at(to * per), kc.at(from * per), per * 2)?;
            copy_d2d(st, vc.at(to * per), vc.at(from * per), per * 2)?;
        }
        for b in [&self.token, &self.pos, &self.hist_len] {
            copy_d2d(st, b.at(to), b.at(from), 4)?;
        }
        copy_d2d(st, self.hist.at(to * self.hist_cap), self.hist.at(from * self.hist_cap), self.hist_cap * 4)?;
        st.synchronize().map_err(cuda_err)
    }

    fn step_launches(&self, n: usize) -> Result<()> {
        let (hs, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        self.k.embed(self.embed.ptr, self.token.ptr, self.x.ptr, n, hs)?;
        self.forward_rows(n, self.pos.ptr, self.slot_ids.ptr, true)?;
        self.k.linear(self.h.ptr, self.lm_head_ptr(), self.logits.ptr, n, hs, v)?;
        let st = self.state(0);
        if let Some(g) = &self.opts.no_repeat {
            let p = NgramParams {
                n: g.n,
                window: g.window.unwrap_or(0),
                whitelist: self.whitelist.ptr,
                n_white: g.whitelist.len(),
            };
            self.k.ngram_ban(&st, &p, self.logits.ptr, n, v)?;
        }
        self.k.greedy_next(&st, self.logits.ptr, n, v, true)
    }

    /// One decode step of sequences `0..n`: each appends its current token to its cache and
    /// chooses the next greedily. Asynchronous: [`Self::tokens`] waits for it. Replays the
    /// CUDA graph of `n` when [`Self::capture`] made one. The caller keeps every sequence below
    /// `max_t` positions ([`Self::positions`]): a step past the cache writes nothing to it and
    /// its attention sees only the first `max_t` positions.
    pub fn step(&self, n: usize) -> Result<()> {
        if n == 0 || n > self.opts.max_slots {
            candle_core::bail!("step: {n} sequences, the decoder holds {}", self.opts.max_slots);
        }
        match self.graphs.get(&n) {
            Some(g) => g.launch().map_err(cuda_err),
            None => self.step_launches(n),
        }
    }

    /// Records the decode step of `n` sequences as a CUDA graph; later [`Self::step`]s of `n`
    /// replay it (one launch instead of ~11 per layer). Needs a non-default stream
    /// (`Device::new_cuda_with_stream`). The capture does not run the step.
    pub fn capture(&mut self, n: usize) -> Result<()> {
        if n == 0 || n > self.opts.max_slots {
            candle_core::bail!("capture: {n} sequences, the decoder holds {}", self.opts.max_slots);
        }
        let graph = self.k.capture(|| self.step_launches(n))?;
        self.graphs.insert(n, graph);
        Ok(())
    }

    /// The current tokens of sequences `0..n` (waits for the device).
    pub fn tokens(&self, n: usize) -> Result<Vec<u32>> {
        self.token.download(&self.k.stream, 0, n)
    }

    /// The last logits of rows `0..n` (a step's: row i is sequence i; after a prefill of slot
    /// s, row s), after the n-gram ban, as f32.
    pub fn logits(&self, n: usize) -> Result<Vec<Vec<f32>>> {
        let v = self.cfg.vocab_size;
        let flat: Vec<bf16> = self.logits.download(&self.k.stream, 0, n * v)?;
        Ok(flat.chunks(v).map(|c| c.iter().map(|x| x.to_f32()).collect()).collect())
    }

    /// The token embeddings of `ids` `(ids.len(), hidden)` bf16 on the device (the prompt's
    /// text rows, before the image rows are merged in).
    pub fn embed_ids(&self, ids: &[u32]) -> Result<Tensor> {
        let d = candle_core::Device::Cuda(self.dev.clone());
        let hs = self.cfg.hidden_size;
        let v = self.cfg.vocab_size as u32;
        if let Some(&bad) = ids.iter().find(|&&i| i >= v) {
            candle_core::bail!("embed_ids: token {bad} is outside the vocabulary ({v})");
        }
        let gids = Tensor::new(ids, &d)?;
        let out = Tensor::zeros((ids.len(), hs), DType::BF16, &d)?;
        self.k.embed(self.embed.ptr, tensor_ptr::<u32>(&gids)?, tensor_ptr::<bf16>(&out)?, ids.len(), hs)?;
        self.synchronize()?;
        Ok(out)
    }

    /// Overrides the current tokens of sequences `0..tokens.len()` (a token chosen on the host,
    /// e.g. by sampling, for the next step to append).
    pub fn set_tokens(&self, tokens: &[u32]) -> Result<()> {
        if tokens.len() > self.opts.max_slots {
            candle_core::bail!("set_tokens: {} sequences, the decoder holds {}", tokens.len(), self.opts.max_slots);
        }
        self.token.upload(&self.k.stream, 0, tokens)
    }

    /// Positions of sequences `0..n` (prompt + generated so far).
    pub fn positions(&self, n: usize) -> Result<Vec<u32>> {
        self.pos.download(&self.k.stream, 0, n)
    }

    pub fn synchronize(&self) -> Result<()> {
        self.k.stream.synchronize().map_err(cuda_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::OcrConfig;
    use crate::model::decoder::DeepseekV2;
    use crate::model::kernels::testutil::*;
    use candle_core::{Device, Shape};
    use candle_nn::var_builder::SimpleBackend;

    /// Deterministic weights by name: the same tensor for the reference and the fast path.
    #[derive(Clone)]
    struct Named;

    impl SimpleBackend for Named {
        fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
            let seed = name.bytes().fold(1469598103934665603u64, |h, b| (h ^ b as u64).wrapping_mul(1099511628211));
            let t = if name.ends_with("norm.weight") {
                (rand(s.dims(), 0.2, seed) + 1.0)?
            } else if name.contains("embed_tokens") {
                rand(s.dims(), 1.0, seed)
            } else if name.ends_with("e_score_correction_bias") {
                rand(s.dims(), 0.01, seed)
            } else {
                rand(s.dims(), 0.06, seed)
            };
            t.to_dtype(dtype)?.to_device(dev)
        }
        fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
            candle_core::bail!("unchecked get of {name}")
        }
        fn contains_tensor(&self, _: &str) -> bool {
            true
        }
    }

    fn config() -> TextConfig {
        OcrConfig::from_json_str(r#"{"language_config": {"vocab_size": 1000, "hidden_size": 256,
            "intermediate_size": 512, "moe_intermediate_size": 96, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 2, "n_routed_experts": 16,
            "n_shared_experts": 2, "num_experts_per_tok": 4, "first_k_dense_replace": 1,
            "moe_layer_freq": 1, "topk_method": "greedy", "use_mla": false}}"#)
        .unwrap()
        .text()
        .unwrap()
    }

    fn argmax(v: &[f32]) -> u32 {
        let mut b = 0;
        for (i, &x) in v.iter().enumerate() {
            if x > v[b] {
                b = i;
            }
        }
        b as u32
    }

    /// Three sequences (two prompts, one cloned) decoded together, eagerly then from a CUDA
    /// graph, against the reference decoder (bf16, same device) fed the same tokens: logits at
    /// every step, and the greedy tokens.
    #[test]
    fn fast_decoder_matches_the_reference_decoder() {
        let (dev, cd) = device();
        let cfg = config();
        let reference = DeepseekV2::new(&cfg, VarBuilder::from_backend(Box::new(Named), DType::BF16, dev.clone())).unwrap();
        let opts = FastOptions { max_slots: 3, max_t: 128, max_rows: 16, no_repeat: None };
        let mut fast = FastDecoder::new(&cfg, VarBuilder::from_backend(Box::new(Named), DType::BF16, Device::Cpu), &cd, opts).unwrap();
        let prompts = [rand_bf16(&[23, 256], 1.0, 5), rand_bf16(&[40, 256], 1.0, 6)];
        let mut caches = vec![];
        let mut want_logits = vec![];
        let mut worst = 0f32;
        let mut scale = 0f32;
        for (slot, p) in prompts.iter().enumerate() {
            let e = p.to_device(&dev).unwrap();
            fast.prefill(slot, &e).unwrap();
            let mut c = reference.new_cache();
            let out = reference.forward_embeds(&e.unsqueeze(0).unwrap(), &mut c, false).unwrap();
            let l: Vec<f32> = reference.logits(&out.last_hidden_state.narrow(1, p.dim(0).unwrap() - 1, 1).unwrap()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let got = &fast.logits(slot + 1).unwrap()[slot];
            worst = worst.max(got.iter().zip(&l).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max));
            scale = scale.max(l.iter().map(|x| x.abs()).fold(0.0, f32::max));
            caches.push(c);
            want_logits.push(l);
        }
        eprintln!("prefill (chunks of 16 rows): max |logit diff| {worst:.3e} (max |logit| {scale:.2})");
        fast.clone_slot(0, 2).unwrap();
        caches.push(caches[0].clone());
        want_logits.push(want_logits[0].clone());
        let mut tokens: Vec<u32> = want_logits.iter().map(|l| argmax(l)).collect();
        let fast_first = fast.tokens(3).unwrap();
        let mut agree = fast_first.iter().zip(&tokens).filter(|(a, b)| a == b).count();
        let mut total = 3;
        let mut step_worst = 0f32;
        for step in 0..8 {
            if step == 4 {
                fast.capture(3).unwrap();
            }
            // both sides append the reference's tokens
            fast.set_tokens(&tokens).unwrap();
            fast.step(3).unwrap();
            let got_tokens = fast.tokens(3).unwrap();
            let got = fast.logits(3).unwrap();
            for r in 0..3 {
                let ids = Tensor::new(&[[tokens[r]]], &dev).unwrap();
                let out = reference.forward_embeds(&reference.embed(&ids).unwrap(), &mut caches[r], false).unwrap();
                let l: Vec<f32> = reference.logits(&out.last_hidden_state).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                step_worst = step_worst.max(got[r].iter().zip(&l).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max));
                scale = scale.max(l.iter().map(|x| x.abs()).fold(0.0, f32::max));
                assert_eq!(got_tokens[r], argmax(&got[r]), "the device's pick is the argmax of its logits");
                let t = argmax(&l);
                agree += (got_tokens[r] == t) as usize;
                total += 1;
                tokens[r] = t;
            }
        }
        assert_eq!(fast.positions(3).unwrap(), vec![23 + 8, 40 + 8, 23 + 8]);
        eprintln!("decode, 3 sequences x 8 steps (4 eager, 4 from a CUDA graph): max |logit diff| {step_worst:.3e} (max |logit| {scale:.2}); greedy tokens agree {agree}/{total}");
        assert!(worst <= 0.03 * scale && step_worst <= 0.03 * scale, "logits differ: prefill {worst}, decode {step_worst}, scale {scale}");
        assert!(agree * 10 >= total * 9, "greedy tokens agree only {agree}/{total}");
    }
}
