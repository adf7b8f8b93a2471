//! The Rust side of `ocr-patch bench`: the fast path ([`crate::model::fast`]: the decoder, and
//! the vision encoder with SAM's fused attention, [`crate::model::fast::vision`]) on one CUDA
//! device, measured as the issue asks (see [`super`]); the reference vision encoder is measured
//! in the same run for comparison.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::{median, stats, time_ms, view_pixels, BenchConfig, IMAGE_TOKEN_ID, PROMPT_TAIL_IDS};
use crate::model::fast::{FastDecoder, FastOptions};
use crate::model::kernels::Kernels;
use crate::model::vision::{DeepEncoder, LocalTiles, VisionConfig};
use crate::model::config::TextConfig;
use crate::model::{OcrConfig, Weights};

/// Samples the device's used memory (`total - free`) every millisecond on a thread.
struct MemSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<usize>>,
}

impl MemSampler {
    fn start(cd: &candle_core::CudaDevice) -> Self {
        let ctx = cd.cuda_stream().context().clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = 0usize;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((free, tot)) = ctx.mem_get_info() {
                    peak = peak.max(tot - free);
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            peak
        });
        Self {
            stop,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.take().and_then(|h| h.join().ok()).unwrap_or(0)
    }
}

fn gib(b: usize) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// The fast decoder of the bench's model: `max_slots` sequences of `max_t` positions, prefill in
/// chunks of `max_rows`, no n-gram guard (the peer has none either).
fn fast_decoder(
    text: &TextConfig,
    weights: &Weights,
    cd: &candle_core::CudaDevice,
    max_slots: usize,
    max_t: usize,
    max_rows: usize,
) -> Result<FastDecoder> {
    let opts = FastOptions { max_slots, max_t, max_rows, no_repeat: None };
    Ok(FastDecoder::new(text, weights.var_builder(DType::BF16, &Device::Cpu), cd, opts)?)
}

/// Runs `steps` decode steps of `n` sequences, reading the tokens back after each (as a
/// streaming caller would); returns each step's wall time (ms) and sequence 0's tokens.
fn decode_run(fast: &FastDecoder, n: usize, steps: usize) -> Result<(Vec<f64>, Vec<u32>)> {
    let mut times = Vec::with_capacity(steps);
    let mut toks = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t = Instant::now();
        fast.step(n)?;
        let tk = fast.tokens(n)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        toks.push(tk[0]);
    }
    Ok((times, toks))
}

/// Prefills slot 0 with `embeds`, copies it to slots `1..n`, and gives every sequence its own
/// current token (so that the sequences route to different experts, as different prompts do).
/// Batch-1 decode as measured: warm-up steps, then `c.decode_runs` runs of `c.steps` steps
/// from the prompt; every step's ms and the last run's tokens.
fn timed_decode_runs(fast: &mut FastDecoder, embeds: &Tensor, vocab: usize, c: &BenchConfig) -> Result<(Vec<f64>, Vec<u32>)> {
    start_batch(fast, embeds, 1, vocab)?;
    decode_run(fast, 1, c.warmup_steps)?;
    let (mut times, mut tokens) = (vec![], vec![]);
    for _ in 0..c.decode_runs {
        start_batch(fast, embeds, 1, vocab)?;
        let (t, tk) = decode_run(fast, 1, c.steps)?;
        times.extend(t);
        tokens = tk;
    }
    Ok((times, tokens))
}

fn start_batch(fast: &mut FastDecoder, embeds: &Tensor, n: usize, vocab: usize) -> Result<()> {
    fast.prefill(0, embeds)?;
    let first = fast.tokens(1)?[0];
    for s in 1..n {
        fast.clone_slot(0, s)?;
    }
    if n > 1 {
        let toks: Vec<u32> = (0..n as u32)
            .map(|i| {
                if i == 0 {
                    first
                } else {
                    (first + 7919 * i) % vocab as u32
                }
            })
            .collect();
        fast.set_tokens(&toks)?;
    }
    Ok(())
}

pub fn run(c: &BenchConfig) -> Result<Value> {
    let dev = Device::new_cuda_with_stream(0).context("no CUDA device")?;
    let Device::Cuda(cd) = &dev else {
        unreachable!()
    };
    // one stream, our own ordering: cudarc's per-buffer events are not needed (and not capturable)
    unsafe { cd.disable_event_tracking() };
    let (free0, total) = cd.cuda_stream().context().mem_get_info()?;
    let baseline = total - free0;
    let sampler = MemSampler::start(cd);

    let t = Instant::now();
    let text = OcrConfig::from_file(&c.model_dir.join("config.json"))?.text()?;
    let weights = Weights::open_dir(&c.model_dir)?;
    let mut vision = DeepEncoder::new(
        &VisionConfig::deepseek_ocr(),
        weights.var_builder(DType::BF16, &dev).pp("model"),
    )?;
    let kernels = Arc::new(Kernels::load(cd)?);
    let vocab = text.vocab_size;
    let steps = c.steps;
    let n_img = crate::model::vision::image_token_count(1024, None);
    let prompt_len = 1 + n_img + PROMPT_TAIL_IDS.len();
    let max_t = (prompt_len + c.warmup_steps + steps + 8).next_multiple_of(64);
    let b1_max_t = max_t.max(c.max_t_b1);
    let mut fast = fast_decoder(&text, &weights, cd, 1, b1_max_t, 512)?;
    dev.synchronize()?;
    let load_s = t.elapsed().as_secs_f64();
    eprintln!("bench: loaded in {load_s:.1}s");

    // ---- inputs (examples/gpu_bench.rs, tf_peer.py) ----
    let (global, tiles) = views(&dev)?;
    let (wt, ht) = GUNDAM_CROP;
    let ids = base_prompt_ids(vocab);
    let mask: Vec<bool> = (0..ids.len()).map(|p| p >= 1 && p <= n_img).collect();

    // ---- vision: the reference encoder, then the fast path's (fused SAM attention) ----
    let local = LocalTiles {
        pixels: &tiles,
        width_crop_num: wt,
        height_crop_num: ht,
    };
    // Base (the global view) and Gundam (the tiles too): each mode's times and features
    let encode_modes = |vision: &DeepEncoder| -> Result<((Vec<f64>, Tensor), (Vec<f64>, Tensor))> {
        let base = time_ms(&dev, c.warmup, c.repeat, || Ok(vision.encode_image(&global, None)?))?;
        let gundam = time_ms(&dev, c.warmup, c.repeat, || Ok(vision.encode_image(&global, Some(local))?))?;
        Ok((base, gundam))
    };
    let ((vb_ref, rows_ref), (vg_ref, grows_ref)) = encode_modes(&vision)?;
    let peak_reference_vision = sampler.finish();
    let sampler = MemSampler::start(cd);
    crate::model::fast::vision::accelerate(&mut vision, kernels.clone());
    let ((vb, rows), (vg, grows)) = encode_modes(&vision)?;
    let diff = |a: &Tensor, b: &Tensor| -> Result<f64> {
        Ok((a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()? as f64)
    };
    let peak_abs = |a: &Tensor| -> Result<f64> {
        Ok(a.to_dtype(DType::F32)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()? as f64)
    };
    let vision_diff = json!({
        "base_max_abs_diff": diff(&rows, &rows_ref)?,
        "base_max_abs": peak_abs(&rows_ref)?,
        "gundam_max_abs_diff": diff(&grows, &grows_ref)?,
        "gundam_max_abs": peak_abs(&grows_ref)?,
    });
    // where the fast path's Base encode goes: SAM, CLIP, the projector and layout
    let (st_sam, sam_out) = time_ms(&dev, c.warmup, c.repeat, || {
        Ok(vision.sam.forward(&global)?)
    })?;
    let (st_clip, _) = time_ms(&dev, c.warmup, c.repeat, || {
        Ok(vision.clip.forward(&sam_out)?)
    })?;
    // ---- prefill (vision rows given) and the whole prompt ----
    let embed_ids = |fast: &FastDecoder| -> Result<Tensor> { Ok(fast.embed_ids(&ids)?) };
    let merge = |e: &Tensor, rows: &Tensor| -> Result<Tensor> {
        Ok(crate::model::decoder::merge_image_features(e, &mask, rows)?)
    };
    let embeds = merge(&embed_ids(&fast)?, &rows)?;
    let (pf, _) = time_ms(&dev, c.warmup, c.repeat, || Ok(fast.prefill(0, &embeds)?))?;
    let (pt, _) = time_ms(&dev, c.warmup, c.repeat, || {
        let rows = vision.encode_image(&global, None)?;
        let e = merge(&embed_ids(&fast)?, &rows)?;
        fast.prefill(0, &e)?;
        Ok(())
    })?;

    let peak_prompt = sampler.finish();
    let sampler = MemSampler::start(cd);
    // ---- batch-1 decode: eager launches, then the CUDA graph ----
    let (eager, eager_tokens) = timed_decode_runs(&mut fast, &embeds, vocab, c)?;
    let graph = match fast.capture(1) {
        Ok(()) => Ok(timed_decode_runs(&mut fast, &embeds, vocab, c)?),
        Err(e) => Err(format!("{e}")),
    };
    let peak_b1 = sampler.finish();
    drop(fast);
    dev.synchronize()?;

    // ---- batched decode: a decoder of max(batches) slots ----
    let sampler = MemSampler::start(cd);
    let max_b = c.batches.iter().copied().max().unwrap_or(1);
    let mut batched = vec![];
    if max_b > 1 {
        let mut fast = fast_decoder(&text, &weights, cd, max_b, max_t, 512.max(max_b))?;
        for &b in &c.batches {
            let graph_ok = fast.capture(b).map_err(|e| format!("{e}"));
            start_batch(&mut fast, &embeds, b, vocab)?;
            decode_run(&fast, b, c.warmup_steps)?;
            let mut times = vec![];
            for _ in 0..c.decode_runs {
                start_batch(&mut fast, &embeds, b, vocab)?;
                let t = Instant::now();
                decode_run(&fast, b, steps)?;
                times.push(t.elapsed().as_secs_f64());
            }
            let s = median(&times);
            batched.push(json!({
                "batch": b,
                "steps": steps,
                "ms_per_step": s * 1e3 / steps as f64,
                "tokens_per_s": (b * steps) as f64 / s,
                "cuda_graph": graph_ok.is_ok(),
                "graph_error": graph_ok.err(),
                "runs_s": times,
            }));
        }
    }
    let peak_batched = sampler.finish();

    let ms_e = median(&eager);
    let (b1, b1_err) = match &graph {
        Ok((g, _)) => (median(g), None),
        Err(e) => (ms_e, Some(e.clone())),
    };
    let graph_tokens = graph.as_ref().ok().map(|g| g.1.clone());
    Ok(json!({
        "engine": "rust fast path (src/model/fast: kernels/*.cu + cuBLAS, bf16)",
        "linear": if std::env::var("OCR_PATCH_LINEAR").is_ok_and(|v| v == "cublas") { "cublas" } else { "kernel up to 8 rows, cublas above" },
        "load_s": load_s,
        "vision_base_ms": stats(&vb),
        "vision_gundam_ms": {"median_ms": median(&vg), "runs_ms": vg, "rows": grows.dim(0)?},
        "vision_reference": {
            "note": "the reference encoder (SAM attention with the materialised bias, candle linears), same run",
            "base_ms": stats(&vb_ref),
            "gundam_ms": stats(&vg_ref),
            "peak_used_gib": gib(peak_reference_vision),
        },
        "vision_fast_vs_reference": vision_diff,
        "vision_base_stages_ms": {"sam": median(&st_sam), "clip": median(&st_clip)},
        "prompt_tokens": ids.len(),
        "prefill_decoder_ms": stats(&pf),
        "prompt_total_ms": stats(&pt),
        "decode": {
            "steps_timed": eager.len(),
            "ms_per_token_median": b1,
            "tokens_per_s": 1e3 / b1,
            "eager_ms_per_token_median": ms_e,
            "graph_ms_per_token_median": graph.as_ref().ok().map(|g| median(&g.0)),
            "graph_error": b1_err,
            "graph_tokens_equal_eager": graph_tokens.as_ref().map(|g| g == &eager_tokens),
            "note": "one step = one token in, the next token chosen on the device and read back",
        },
        "greedy_tokens": eager_tokens,
        "decode_batched": batched,
        "memory": {
            "baseline_used_gib": gib(baseline),
            "peak_used_gib_batch1": gib(peak_b1.max(peak_prompt)),
            "peak_used_gib_batch1_decode": gib(peak_b1),
            "peak_used_gib_batch1_vision_prefill": gib(peak_prompt),
            "note_vision_prefill": "fast vision (Base and Gundam) + prefill; the reference encoder's peak is under vision_reference",
            "peak_used_gib_batched": gib(peak_batched),
            "batch1_cache_positions": b1_max_t,
            "batched_cache": format!("{max_b} slots x {max_t} positions"),
            "device_total_gib": gib(total),
            "note": "device-wide total-free, sampled every 1 ms, CUDA context and vision encoder included",
        },
    }))
}

/// For a profiler (`ncu --profile-from-start off`): loads the vision encoder alone on the fast
/// path and encodes the Base view (or, `gundam`, Gundam's tiles and global view) once between
/// `cuProfilerStart` and `cuProfilerStop`, after two untimed encodes and five timed ones (in the
/// JSON: each one's time and how long the host took to queue it).
pub fn profile_vision(c: &BenchConfig, gundam: bool) -> Result<Value> {
    let dev = Device::new_cuda_with_stream(0).context("no CUDA device")?;
    let Device::Cuda(cd) = &dev else {
        unreachable!()
    };
    unsafe { cd.disable_event_tracking() };
    let weights = Weights::open_dir(&c.model_dir)?;
    let mut vision = DeepEncoder::new(
        &VisionConfig::deepseek_ocr(),
        weights.var_builder(DType::BF16, &dev).pp("model"),
    )?;
    crate::model::fast::vision::accelerate(&mut vision, Arc::new(Kernels::load(cd)?));
    let (global, tiles) = views(&dev)?;
    let (wt, ht) = GUNDAM_CROP;
    let local = gundam.then_some(LocalTiles { pixels: &tiles, width_crop_num: wt, height_crop_num: ht });
    let (warm, _) = time_ms(&dev, 0, 2, || Ok(vision.encode_image(&global, local)?))?;
    // how long the host takes to queue an encode against the encode: near each other, the GPU
    // waits on the host's launches
    let mut host_ms = vec![];
    let (queued, _) = time_ms(&dev, 0, 5, || {
        let t = std::time::Instant::now();
        let out = vision.encode_image(&global, local)?;
        host_ms.push(t.elapsed().as_secs_f64() * 1e3);
        Ok(out)
    })?;
    unsafe { candle_core::cuda_backend::cudarc::driver::sys::cuProfilerStart() };
    let (t, _) = time_ms(&dev, 0, 1, || Ok(vision.encode_image(&global, local)?))?;
    unsafe { candle_core::cuda_backend::cudarc::driver::sys::cuProfilerStop() };
    let mode = if gundam { "Gundam 3x2" } else { "Base" };
    Ok(json!({
        "profiled": format!("vision encode, {mode}, fast path"),
        "unprofiled_ms": warm,
        "ms_under_profiler": t,
        "encode_ms": queued,
        "host_queueing_ms": host_ms,
    }))
}

/// Gundam's tiles in the bench: 3 wide, 2 high, of 640 px.
const GUNDAM_CROP: (usize, usize) = (3, 2);
const GUNDAM_TILE: usize = 640;

/// The bench's views, bf16 on `dev`: the 1024 global view `(1, 3, 1024, 1024)` and Gundam's
/// tiles `(6, 3, 640, 640)` (the brightened pixel pattern, as tf_peer.py makes them).
fn views(dev: &Device) -> Result<(Tensor, Tensor)> {
    let global = Tensor::from_vec(view_pixels(0, 1024, 1024, 0, 0, true), (1, 3, 1024, 1024), dev)?
        .to_dtype(DType::BF16)?;
    let ((wt, ht), ts) = (GUNDAM_CROP, GUNDAM_TILE);
    let mut tiles = Vec::with_capacity(wt * ht * 3 * ts * ts);
    for i in 0..wt * ht {
        tiles.extend(view_pixels(1, ts, ts, (i % wt) * ts, (i / wt) * ts, true));
    }
    let tiles = Tensor::from_vec(tiles, (wt * ht, 3, ts, ts), dev)?.to_dtype(DType::BF16)?;
    Ok((global, tiles))
}

/// The device on its own stream, cudarc's per-buffer events off (one stream, our own ordering;
/// capturable), and the model's text config and weights: the decoder alone, for the profiles.
fn decoder_side(c: &BenchConfig) -> Result<(Device, TextConfig, Weights)> {
    let dev = Device::new_cuda_with_stream(0).context("no CUDA device")?;
    if let Device::Cuda(cd) = &dev {
        unsafe { cd.disable_event_tracking() };
    }
    let text = OcrConfig::from_file(&c.model_dir.join("config.json"))?.text()?;
    let weights = Weights::open_dir(&c.model_dir)?;
    Ok((dev, text, weights))
}

/// The Base prompt's token ids (BOS, the image's rows as the image token, the prompt's tail),
/// within the vocabulary.
fn base_prompt_ids(vocab: usize) -> Vec<u32> {
    let n_img = crate::model::vision::image_token_count(1024, None);
    let mut ids = vec![0u32];
    ids.extend(std::iter::repeat(IMAGE_TOKEN_ID).take(n_img));
    ids.extend(PROMPT_TAIL_IDS);
    ids.iter().map(|&i| i % vocab as u32).collect()
}

/// For a profiler (`ncu --profile-from-start off`): loads the decoder alone, prefills the Base
/// prompt's token rows, and runs `c.steps` eager batch-1 decode steps (every kernel launched on
/// its own) between `cuProfilerStart` and `cuProfilerStop`.
pub fn profile(c: &BenchConfig) -> Result<Value> {
    let (dev, text, weights) = decoder_side(c)?;
    let Device::Cuda(cd) = &dev else {
        unreachable!()
    };
    let mut fast = fast_decoder(&text, &weights, cd, 1, 512, 512)?;
    let e = fast.embed_ids(&base_prompt_ids(text.vocab_size))?;
    fast.prefill(0, &e)?;
    decode_run(&fast, 1, 2)?;
    unsafe { candle_core::cuda_backend::cudarc::driver::sys::cuProfilerStart() };
    let (t, _) = decode_run(&fast, 1, c.steps)?;
    unsafe { candle_core::cuda_backend::cudarc::driver::sys::cuProfilerStop() };
    Ok(json!({"profiled_steps": c.steps, "step_ms_under_profiler": t}))
}

/// The batch-1 decode step's timeline in the CUDA graph (`--profile trace`): the decoder of the
/// bench's batch-1 run (its cache size, the Base prompt prefilled), its kernels built with the
/// probes ([`crate::model::kernels::trace`]); the graph replayed `c.steps` times (at most what
/// the probes' slots hold). Per launch of the step, averaged over the steps: the kernel and its
/// blocks, how long its first block sat at the wait (the overlap programmatic launch gives), and
/// the time from its inputs being ready to the next launch's (the step's critical path, kernel
/// by kernel); the same summed per kernel. (The last launch of a step is followed by the host's
/// read of the token: its time to the next step's first launch is left out.)
pub fn profile_trace(c: &BenchConfig) -> Result<Value> {
    // the probes are chosen when the kernels load; nothing else runs in this process yet
    std::env::set_var("OCR_PATCH_KERNEL_TRACE", "1");
    let (dev, text, weights) = decoder_side(c)?;
    let Device::Cuda(cd) = &dev else {
        unreachable!()
    };
    let ids = base_prompt_ids(text.vocab_size);
    let max_t = (ids.len() + c.warmup_steps + c.steps + 8).next_multiple_of(64).max(c.max_t_b1);
    let mut fast = fast_decoder(&text, &weights, cd, 1, max_t, 512)?;
    let e = fast.embed_ids(&ids)?;
    fast.capture(1)?;
    start_batch(&mut fast, &e, 1, text.vocab_size)?;
    decode_run(&fast, 1, c.warmup_steps)?;
    let tracer = fast.kernels().tracer()?;
    // a step at a time: a graph's replays reuse its launches' grid ids (the probes' slots)
    let (mut launches, mut times, mut per_step) = (vec![], vec![], 0);
    for s in 0..c.steps.max(1) {
        tracer.reset()?;
        times.extend(decode_run(&fast, 1, 1)?.0);
        let step = tracer.take()?;
        if s == 0 {
            per_step = step.len();
        } else if step.len() != per_step {
            anyhow::bail!("step {s} made {} launches, the first {per_step}", step.len());
        }
        launches.extend(step);
    }
    Ok(super::timeline::report(&launches, c.steps.max(1), per_step, &times))
}
