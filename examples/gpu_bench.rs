//! First GPU measurements of the Rust reference model (not the fast path of issue 6).
//!
//!     cargo build --release --features cuda --example gpu_bench
//!     gpu_bench --model-dir DIR --dtype bf16 --device cuda --json out.json --logits out.safetensors
//!
//! `DIR` holds `config.json` and the `*.safetensors` (e.g. `ocr-patch-synth --config
//! config.json --seed 1 -o DIR/model.safetensors`). Inputs are the goldens' (golden/README.md):
//! the integer pixel pattern (brightened by default, `--pixels`), `<image>\n<|grounding|>Convert the document to markdown.` as token
//! ids, Base = one 1024 view (273 image positions, 283 tokens), Gundam = 3x2 tiles of 640 + a
//! 1024 global view. Prints one JSON object (stdout and `--json`): load time; vision encode
//! latency for Base and Gundam; decoder prefill of the Base prompt (vision rows given); the
//! whole prompt (vision + prefill + last logits); 32 greedy steps (ms per token, tokens/s, the
//! tokens); peak device memory sampled every millisecond (`total - free`, whole device, CUDA
//! context included). `--logits` writes `tokens` (i64) and `logits` (steps x vocab, f32; row k
//! is what chose token k), `vision_rows` (the Base image's 273 rows) and `hidden` (the input of
//! every decoder layer and the final norm's output, every prompt position) for
//! `bench/gpu/tf_peer.py` to compare with transformers.
//!
//! Times are wall clock around the region with a device synchronisation at its end, after
//! `--warmup` untimed runs; the median of `--repeat` runs is reported.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use ocr_patch::bench::{median, stats, time_ms, view_pixels};
use ocr_patch::model::generate::{self, GenerationConfig, Sampling, Step};
use ocr_patch::model::{DeepseekOcr, LocalTiles, OcrConfig, VisionConfig, Weights};
use serde_json::json;

const IMAGE_TOKEN_ID: u32 = 128815;
const PROMPT_TAIL_IDS: [u32; 9] = [201, 128820, 21842, 270, 4940, 304, 2121, 7919, 16];

#[derive(Parser, Debug)]
struct Args {
    /// Folder with config.json and *.safetensors.
    #[arg(long)]
    model_dir: PathBuf,
    /// bf16, f16 or f32 (the weights are converted on load).
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// cuda or cpu.
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Greedy steps (tokens generated, the first from the prompt's logits).
    #[arg(long, default_value_t = 32)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Pixel pattern: `golden` (golden/README.md) or `page` (the same, brightened; see
    /// `view_pixels`).
    #[arg(long, default_value = "page")]
    pixels: String,
    /// Timed greedy generations (each --steps tokens from the same prompt cache).
    #[arg(long, default_value_t = 3)]
    decode_runs: usize,
    /// Skip the Gundam vision measurement.
    #[arg(long)]
    no_gundam: bool,
    /// Write the JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the greedy tokens and every step's logits here (safetensors).
    #[arg(long)]
    logits: Option<PathBuf>,
}

fn sync(dev: &Device) -> Result<()> {
    dev.synchronize()?;
    Ok(())
}


/// Samples the device's used memory (`total - free`) every millisecond on a thread.
struct MemSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<(usize, usize)>>,
}

impl MemSampler {
    #[cfg(feature = "cuda")]
    fn start(dev: &Device) -> Option<Self> {
        let Device::Cuda(cd) = dev else { return None };
        let ctx = cd.cuda_stream().context().clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = 0usize;
            let mut total = 0usize;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((free, tot)) = ctx.mem_get_info() {
                    total = tot;
                    peak = peak.max(tot - free);
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            (peak, total)
        });
        Some(Self {
            stop,
            handle: Some(handle),
        })
    }

    #[cfg(not(feature = "cuda"))]
    fn start(_dev: &Device) -> Option<Self> {
        None
    }

    fn finish(mut self) -> (usize, usize) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap_or((0, 0))
    }
}

#[cfg(feature = "cuda")]
fn used_now(dev: &Device) -> Option<usize> {
    let Device::Cuda(cd) = dev else { return None };
    let (free, total) = cd.cuda_stream().context().mem_get_info().ok()?;
    Some(total - free)
}

#[cfg(not(feature = "cuda"))]
fn used_now(_dev: &Device) -> Option<usize> {
    None
}

/// The decoder with its cache, timing each step and keeping its logits.
struct TimedSession<'m> {
    model: &'m ocr_patch::model::DeepseekV2,
    cache: ocr_patch::model::Cache,
    dev: Device,
    step_ms: Vec<f64>,
    logits: Vec<Vec<f32>>,
}

impl Step for TimedSession<'_> {
    type Error = anyhow::Error;
    fn step(&mut self, token: u32) -> Result<Vec<f32>> {
        let t = Instant::now();
        let ids = Tensor::new(&[[token]], &self.dev)?;
        let e = self.model.embed(&ids)?;
        let out = self.model.forward_embeds(&e, &mut self.cache, false)?;
        // to_vec1 copies to the host: the step is complete when it returns.
        let l: Vec<f32> = self
            .model
            .logits(&out.last_hidden_state)?
            .flatten_all()?
            .to_vec1()?;
        self.step_ms.push(t.elapsed().as_secs_f64() * 1e3);
        self.logits.push(l.clone());
        Ok(l)
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dtype = match args.dtype.as_str() {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        "f32" => DType::F32,
        d => bail!("--dtype {d}: expected bf16, f16 or f32"),
    };
    let dev = match args.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0).context("no CUDA device (built with --features cuda?)")?,
        d => bail!("--device {d}: expected cuda or cpu"),
    };
    let baseline_used = used_now(&dev);
    let sampler = MemSampler::start(&dev);

    // ---- load ----
    let t = Instant::now();
    let text = OcrConfig::from_file(&args.model_dir.join("config.json"))?.text()?;
    let weights = Weights::open_dir(&args.model_dir)?;
    let model =
        DeepseekOcr::from_weights(&text, &VisionConfig::deepseek_ocr(), &weights, dtype, &dev)?;
    sync(&dev)?;
    let load_s = t.elapsed().as_secs_f64();
    let after_load = used_now(&dev);
    let vocab = text.vocab_size as u32;
    eprintln!("loaded in {load_s:.1}s ({dtype:?} on {:?})", dev);

    // ---- inputs ----
    let page = match args.pixels.as_str() {
        "page" => true,
        "golden" => false,
        p => bail!("--pixels {p}: expected page or golden"),
    };
    let global = Tensor::from_vec(
        view_pixels(0, 1024, 1024, 0, 0, page),
        (1, 3, 1024, 1024),
        &dev,
    )?
    .to_dtype(dtype)?;
    let (wt, ht, ts) = (3usize, 2usize, 640usize);
    let mut tiles = Vec::with_capacity(wt * ht * 3 * ts * ts);
    for i in 0..wt * ht {
        tiles.extend(view_pixels(1, ts, ts, (i % wt) * ts, (i / wt) * ts, page));
    }
    let tiles = Tensor::from_vec(tiles, (wt * ht, 3, ts, ts), &dev)?.to_dtype(dtype)?;
    let n_img = ocr_patch::model::vision::image_token_count(1024, None);
    let mut real_ids = vec![0u32];
    real_ids.extend(std::iter::repeat(IMAGE_TOKEN_ID).take(n_img));
    real_ids.extend(PROMPT_TAIL_IDS);
    let ids: Vec<u32> = real_ids
        .iter()
        .map(|&i| if i < vocab { i } else { i % vocab })
        .collect();
    let mask: Vec<bool> = (0..ids.len()).map(|p| p >= 1 && p <= n_img).collect();
    let input_ids = Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?;

    // ---- vision ----
    let (vb_times, rows) = time_ms(&dev, args.warmup, args.repeat, || {
        Ok(model.vision.encode_image(&global, None)?)
    })?;
    let gundam = if args.no_gundam {
        None
    } else {
        let local = LocalTiles {
            pixels: &tiles,
            width_crop_num: wt,
            height_crop_num: ht,
        };
        // A failure here is reported and the rest still runs.
        Some(
            time_ms(&dev, args.warmup, args.repeat, || {
                Ok(model.vision.encode_image(&global, Some(local))?)
            })
            .and_then(|(times, g)| Ok((times, g.dim(0)?)))
            .map_err(|e| format!("{e:#}")),
        )
    };

    // ---- prefill (decoder only: vision rows given) ----
    let (prefill_times, _) = time_ms(&dev, args.warmup, args.repeat, || {
        let e = model.text.embed(&input_ids)?;
        let e = ocr_patch::model::decoder::merge_image_features(&e.squeeze(0)?, &mask, &rows)?
            .unsqueeze(0)?;
        let mut cache = model.text.new_cache();
        let out = model.text.forward_embeds(&e, &mut cache, false)?;
        let last = out.last_hidden_state.narrow(1, ids.len() - 1, 1)?;
        Ok(model.text.logits(&last)?.flatten_all()?.to_vec1::<f32>()?)
    })?;

    // ---- whole prompt: vision + merge + prefill + last logits to the host ----
    let mut cache = model.text.new_cache();
    let (prompt_times, first_logits) = time_ms(&dev, args.warmup, args.repeat, || {
        let images = [ocr_patch::model::ImageInput {
            global: &global,
            local: None,
        }];
        let e = model.prompt_embeds(&input_ids, &mask, &images)?;
        cache = model.text.new_cache();
        let out = model.text.forward_embeds(&e, &mut cache, false)?;
        let last = out.last_hidden_state.narrow(1, ids.len() - 1, 1)?;
        Ok(model.text.logits(&last)?.flatten_all()?.to_vec1::<f32>()?)
    })?;

    // ---- stages for the fidelity comparison (untimed): vision rows, every hidden state ----
    let stages = {
        let e = model.text.embed(&input_ids)?;
        let e = ocr_patch::model::decoder::merge_image_features(&e.squeeze(0)?, &mask, &rows)?
            .unsqueeze(0)?;
        let mut c = model.text.new_cache();
        let out = model.text.forward_embeds(&e, &mut c, true)?;
        let hs = out
            .hidden_states
            .unwrap_or_default()
            .iter()
            .map(|h| h.squeeze(0)?.to_dtype(DType::F32))
            .collect::<candle_core::Result<Vec<_>>>()?;
        (
            rows.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
            Tensor::stack(&hs, 0)?.to_device(&Device::Cpu)?,
        )
    };

    // ---- greedy decoding ----
    let gen_cfg = GenerationConfig {
        max_new_tokens: args.steps,
        stop_tokens: vec![],
        sampling: Sampling::Greedy,
        no_repeat: None,
        ngram_sees_prompt: false,
    };
    // Warm-up: a few steps from a copy of the prompt's cache.
    {
        let mut s = TimedSession {
            model: &model.text,
            cache: cache.clone(),
            dev: dev.clone(),
            step_ms: vec![],
            logits: vec![],
        };
        let mut c = gen_cfg.clone();
        c.max_new_tokens = 4.min(args.steps);
        generate::generate(&mut s, &ids, first_logits.clone(), &c, |_| {
            ControlFlow::Continue(())
        })?;
    }
    // --decode-runs generations from the same prompt cache; every step's time is kept, the
    // tokens and logits are the first run's (the others must give the same tokens).
    let mut step_ms = Vec::new();
    let mut decode_total_ms = Vec::new();
    let mut first: Option<(generate::Generated, TimedSession)> = None;
    let mut runs_identical = true;
    for _ in 0..args.decode_runs.max(1) {
        let mut session = TimedSession {
            model: &model.text,
            cache: cache.clone(),
            dev: dev.clone(),
            step_ms: vec![],
            logits: vec![first_logits.clone()],
        };
        let t = Instant::now();
        let g = generate::generate(&mut session, &ids, first_logits.clone(), &gen_cfg, |_| {
            ControlFlow::Continue(())
        })?;
        decode_total_ms.push(t.elapsed().as_secs_f64() * 1e3);
        step_ms.extend(session.step_ms.iter().copied());
        match &first {
            None => first = Some((g, session)),
            Some((g0, _)) => runs_identical &= g0.tokens == g.tokens,
        }
    }
    let (g, session) = first.unwrap();
    let ms_tok = median(&step_ms);
    let mean_ms = step_ms.iter().sum::<f64>() / step_ms.len().max(1) as f64;

    let (peak, total) = sampler.map(|s| s.finish()).unwrap_or((0, 0));

    if let Some(path) = &args.logits {
        let n = session.logits.len().min(g.tokens.len());
        let flat: Vec<f32> = session.logits[..n].iter().flatten().copied().collect();
        let mut t = HashMap::new();
        t.insert(
            "logits".to_string(),
            Tensor::from_vec(flat, (n, text.vocab_size), &Device::Cpu)?,
        );
        let toks: Vec<i64> = g.tokens[..n].iter().map(|&t| t as i64).collect();
        t.insert(
            "tokens".to_string(),
            Tensor::new(toks.as_slice(), &Device::Cpu)?,
        );
        t.insert("vision_rows".to_string(), stages.0.clone());
        t.insert("hidden".to_string(), stages.1.clone());
        candle_core::safetensors::save(&t, path)?;
    }

    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    let report = json!({
        "engine": "rust-candle reference path (examples/gpu_bench.rs)",
        "dtype": args.dtype,
        "pixels": args.pixels,
        "device": args.device,
        "load_s": load_s,
        "vision_base_ms": stats(&vb_times),
        "vision_gundam_ms": gundam.as_ref().map(|r| match r {
            Ok((t, n)) => json!({"median_ms": median(t), "runs_ms": t, "rows": n}),
            Err(e) => json!({"error": e}),
        }),
        "vision_base_rows": rows.dim(0)?,
        "prompt_tokens": ids.len(),
        "prefill_decoder_ms": stats(&prefill_times),
        "prompt_total_ms": stats(&prompt_times),
        "decode": {
            "steps_timed": step_ms.len(),
            "ms_per_token_median": ms_tok,
            "ms_per_token_mean": mean_ms,
            "tokens_per_s": 1e3 / ms_tok,
            "runs": args.decode_runs.max(1),
            "runs_tokens_identical": runs_identical,
            "total_ms_per_run": decode_total_ms,
            "step_ms": step_ms,
        },
        "greedy_tokens": g.tokens,
        "memory": {
            "baseline_used_gib": baseline_used.map(gib),
            "after_load_used_gib": after_load.map(gib),
            "peak_used_gib": gib(peak),
            "device_total_gib": gib(total),
            "note": "device-wide total-free, sampled every 1 ms, CUDA context included",
        },
    });
    let s = serde_json::to_string_pretty(&report)?;
    println!("{s}");
    if let Some(p) = &args.json {
        std::fs::write(p, &s)?;
    }
    Ok(())
}
