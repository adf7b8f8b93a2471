//! `ocr-patch bench`: the GPU fast path against the peer a user would otherwise run,
//! transformers executing the patched remote code, in the same run on the same GPU, with the
//! same synthetic weights and inputs; ratios to the peer and to the HBM roofline.
//!
//! Owns: the measured quantities and their inputs (the goldens' Base prompt: bos + 273 image
//! positions + 9 text ids; Gundam 3x2 tiles of 640 + a 1024 view; the brightened pixel pattern),
//! the roofline model, running the peer (`bench/gpu/tf_peer.py`, once per attention
//! implementation) and the report (JSON + a table). The Rust measurement itself needs the
//! `cuda` feature ([`rust`]); everything else builds and is tested everywhere.
//!
//! Roofline: a decode step must at least read every weight it uses once and the KV cache of
//! every sequence: for `b` sequences, the dense weights, the gate, the shared experts, the
//! expected number of distinct routed experts `E (1 - (1 - k/E)^b)` (uniform routing), lm_head
//! and `b` caches, in bf16; divided by the HBM bandwidth (3.35 TB/s, the H100 SXM datasheet,
//! unless `--bandwidth-gbs` says otherwise). Compute, launch latency and the activations'
//! traffic are left out, so the roofline is an upper bound on tokens/s.

#[cfg(feature = "cuda")]
pub mod rust;
pub mod timeline;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::model::config::TextConfig;

pub const IMAGE_TOKEN_ID: u32 = 128815;
/// `\n<|grounding|>Convert the document to markdown.` after the image positions.
pub const PROMPT_TAIL_IDS: [u32; 9] = [201, 128820, 21842, 270, 4940, 304, 2121, 7919, 16];

/// What `ocr-patch bench` measures and how.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub model_dir: PathBuf,
    /// The patched remote code (`.py` + config.json) for the peer; `None`: no peer.
    pub remote_code: Option<PathBuf>,
    /// Attention implementations to run the peer with (`eager`, `sdpa`).
    pub peer_attn: Vec<String>,
    pub python: String,
    pub peer_script: PathBuf,
    pub peer_timeout: Duration,
    /// Decode steps per timed run.
    pub steps: usize,
    pub warmup_steps: usize,
    pub decode_runs: usize,
    /// Untimed and timed runs of the vision and prefill measurements.
    pub warmup: usize,
    pub repeat: usize,
    /// Concurrent sequences for the batched decode measurement.
    pub batches: Vec<usize>,
    /// Cache positions of the batch-1 decoder (its memory is reported at this size).
    pub max_t_b1: usize,
    /// HBM bandwidth for the roofline, GB/s.
    pub bandwidth_gbs: f64,
    /// Where that bandwidth comes from (`--bandwidth-gbs`, the GPU's datasheet, or the H100's
    /// for a GPU not in [`hbm_bandwidth_gbs`]'s table): the report says it.
    pub bandwidth_source: String,
}

/// The datasheet HBM bandwidth (GB/s) of the GPU `name` (as nvidia-smi or the driver name it),
/// for the GPUs DeepSeek-OCR is served on; `None` for others. More specific names first.
pub fn hbm_bandwidth_gbs(name: &str) -> Option<f64> {
    const TABLE: [(&str, f64); 10] = [
        ("GH200", 4000.0),
        ("H200", 4800.0),
        ("H100 NVL", 3900.0),
        ("H100 PCIE", 2000.0),
        ("H100", 3350.0),
        ("H800", 3350.0),
        ("H20", 4000.0),
        ("A100-SXM4-80GB", 2039.0),
        ("A100 80GB", 1935.0),
        ("A100", 1555.0),
    ];
    let name = name.to_ascii_uppercase();
    TABLE.iter().find(|(key, _)| name.contains(key)).map(|&(_, gbs)| gbs)
}

/// golden/README.md's pixel pattern, `u8 = (3x(c+1) + 5y + 2((x^y)&63) + 50c + 37 view) mod 256`;
/// with `page`, `255 - (u8 >> 2)` (bright, so that the remote code does not take the image for
/// "no image"); normalised to `(u8/255 - 0.5)/0.5`. `(3, h, w)` values.
pub fn view_pixels(view: u64, h: usize, w: usize, x0: usize, y0: usize, page: bool) -> Vec<f32> {
    let mut out = Vec::with_capacity(3 * h * w);
    for c in 0..3u64 {
        for y in 0..h as u64 {
            for x in 0..w as u64 {
                let (x, y) = (x + x0 as u64, y + y0 as u64);
                let u = (3 * x * (c + 1) + 5 * y + 2 * ((x ^ y) & 63) + 50 * c + 37 * view) % 256;
                let u = if page { 255 - (u >> 2) } else { u };
                out.push((u as f32 / 255.0 - 0.5) / 0.5);
            }
        }
    }
    out
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Runs `f` `warmup` times untimed, then `repeat` (at least once) timed: each run's ms, the
/// device synchronised before and after, and the last run's output.
pub fn time_ms<T>(
    dev: &candle_core::Device,
    warmup: usize,
    repeat: usize,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<(Vec<f64>, T)> {
    for _ in 0..warmup {
        f()?;
        dev.synchronize()?;
    }
    let mut times = vec![];
    let mut last = None;
    for _ in 0..repeat.max(1) {
        dev.synchronize()?;
        let t = std::time::Instant::now();
        let out = f()?;
        dev.synchronize()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        last = Some(out);
    }
    Ok((times, last.expect("at least one run")))
}

/// A timing's JSON: the median and every run (ms).
pub fn stats(t: &[f64]) -> Value {
    json!({"median_ms": median(t), "runs_ms": t})
}

/// Bytes a decode step of `batch` sequences at context `ctx` must move, and the tokens/s that
/// bounds at `bandwidth_gbs`.
#[derive(Debug, Clone, PartialEq)]
pub struct Roofline {
    pub batch: usize,
    pub weight_bytes: f64,
    pub kv_bytes: f64,
    pub tokens_per_s: f64,
}

pub fn roofline(cfg: &TextConfig, batch: usize, ctx: usize, bandwidth_gbs: f64) -> Roofline {
    let (h, b) = (cfg.hidden_size as f64, batch as f64);
    let (nh, nkv, hd) = (cfg.num_attention_heads as f64, cfg.num_key_value_heads as f64, cfg.head_dim as f64);
    let mut params = cfg.vocab_size as f64 * h + h; // lm_head, final norm
    params += b * h; // embedding rows
    for i in 0..cfg.num_hidden_layers {
        params += (nh + 2.0 * nkv) * hd * h + nh * hd * h + 2.0 * h;
        match (&cfg.moe, cfg.is_moe_layer(i)) {
            (Some(m), true) => {
                let (e, k) = (m.n_routed_experts as f64, m.num_experts_per_tok as f64);
                let expert = 3.0 * h * m.moe_intermediate_size as f64;
                let distinct = e * (1.0 - (1.0 - k / e).powf(b));
                params += e * h + m.n_shared_experts.unwrap_or(0) as f64 * expert + distinct * expert;
            }
            _ => params += 3.0 * h * cfg.intermediate_size as f64,
        }
    }
    let weight_bytes = 2.0 * params;
    let kv_bytes = 2.0 * b * cfg.num_hidden_layers as f64 * 2.0 * nkv * hd * (ctx as f64 + 1.0);
    Roofline {
        batch,
        weight_bytes,
        kv_bytes,
        tokens_per_s: b * bandwidth_gbs * 1e9 / (weight_bytes + kv_bytes),
    }
}

/// Runs the peer once (`tf_peer.py run --attn ATTN`); its JSON, or `{"error": ...}`.
pub fn run_peer(c: &BenchConfig, remote: &std::path::Path, attn: &str) -> Value {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => return json!({"attn": attn, "error": format!("temp dir: {e}")}),
    };
    let out = dir.path().join("peer.json");
    let batches: Vec<String> = c.batches.iter().map(|b| b.to_string()).collect();
    let mut cmd = Command::new(&c.python);
    cmd.arg(&c.peer_script)
        .args(["run", "--dtype", "bf16", "--attn", attn, "--steps"])
        .arg(c.steps.to_string())
        .arg("--batches")
        .arg(batches.join(","))
        .arg("--model-dir")
        .arg(&c.model_dir)
        .arg("--remote-code")
        .arg(remote)
        .arg("--json")
        .arg(&out);
    eprintln!("bench: transformers ({attn}) ...");
    let status = run_with_timeout(cmd, c.peer_timeout);
    match (status, std::fs::read_to_string(&out)) {
        (Ok(true), Ok(s)) => serde_json::from_str(&s).unwrap_or_else(|e| json!({"attn": attn, "error": format!("peer JSON: {e}")})),
        (Ok(false), _) | (Ok(true), Err(_)) => json!({"attn": attn, "error": "the peer failed (its stderr is above)"}),
        (Err(e), _) => json!({"attn": attn, "error": e}),
    }
}

fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<bool, String> {
    let mut child = cmd.spawn().map_err(|e| format!("cannot start the peer: {e}"))?;
    let start = std::time::Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Ok(s.success()),
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("the peer ran past {}s and was stopped", timeout.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => return Err(format!("waiting for the peer: {e}")),
        }
    }
}

fn get(v: &Value, path: &str) -> Option<f64> {
    path.split('.').try_fold(v, |v, k| v.get(k))?.as_f64()
}

fn batched_tps(v: &Value, b: usize) -> Option<f64> {
    v.get("decode_batched")?
        .as_array()?
        .iter()
        .find(|x| x.get("batch").and_then(Value::as_u64) == Some(b as u64))?
        .get("tokens_per_s")?
        .as_f64()
}

/// The report: both engines' numbers, the ratios (peer / Rust for times, Rust / peer for
/// throughputs, against the fastest peer that measured it), the roofline and the targets. For
/// the timed stages (vision, prefill, the whole prompt) also the ratio against the fastest
/// single run of any peer, and for the vision targets whether they hold against it: transformers'
/// eager Python moves by up to 2x between runs of one process, so a target met against its
/// median alone may not hold on the next run.
pub fn report(c: &BenchConfig, cfg: &TextConfig, gpu: &str, rust: &Value, peers: &[Value]) -> Value {
    let prompt = rust.get("prompt_tokens").and_then(Value::as_u64).unwrap_or(283) as usize;
    let ctx = prompt + c.steps / 2;
    let best_peer = |f: &dyn Fn(&Value) -> Option<f64>, lower_is_better: bool| -> Option<(f64, String)> {
        peers
            .iter()
            .filter_map(|p| Some((f(p)?, p.get("attn").and_then(Value::as_str).unwrap_or("?").to_string())))
            .filter(|(v, _)| v.is_finite() && *v > 0.0)
            .min_by(|a, b| if lower_is_better { a.0.total_cmp(&b.0) } else { b.0.total_cmp(&a.0) })
    };
    // the fastest single run of a timed stage (`key`: its `{median_ms, runs_ms}`) over the peers
    let fastest_run = |key: &str| -> Option<f64> {
        peers
            .iter()
            .filter_map(|p| p.get(key)?.get("runs_ms")?.as_array().cloned())
            .flatten()
            .filter_map(|v| v.as_f64())
            .filter(|v| v.is_finite() && *v > 0.0)
            .min_by(f64::total_cmp)
    };
    let mut rows = vec![];
    let row = |name: &str, unit: &str, r: Option<f64>, p: Option<(f64, String)>, lower: bool| {
        let ratio = match (r, &p) {
            (Some(r), Some((p, _))) if r > 0.0 => Some(if lower { p / r } else { r / p }),
            _ => None,
        };
        json!({"metric": name, "unit": unit, "rust": r, "peer": p.as_ref().map(|x| x.0),
            "peer_attn": p.as_ref().map(|x| x.1.clone()), "speedup_vs_peer": ratio})
    };
    let time = |key: &'static str| move |v: &Value| get(v, key);
    // a timed stage's row, with the ratio against the peers' fastest run
    let stages = [
        ("vision encode, Base", "vision_base_ms"),
        ("vision encode, Gundam 3x2", "vision_gundam_ms"),
        ("prefill, Base prompt (vision rows given)", "prefill_decoder_ms"),
        ("whole prompt (vision + prefill)", "prompt_total_ms"),
    ];
    for (name, key) in stages {
        let r = get(rust, &format!("{key}.median_ms"));
        let mut stage = row(name, "ms", r, best_peer(&|v: &Value| get(v, &format!("{key}.median_ms")), true), true);
        let fastest = fastest_run(key);
        stage["peer_fastest_run"] = json!(fastest);
        stage["speedup_vs_peer_fastest_run"] = json!(match (r, fastest) {
            (Some(r), Some(p)) if r > 0.0 => Some(p / r),
            _ => None,
        });
        rows.push(stage);
    }
    rows.push(row("decode batch 1", "ms/token", get(rust, "decode.ms_per_token_median"), best_peer(&time("decode.ms_per_token_median"), true), true));
    rows.push(row("decode batch 1", "tokens/s", get(rust, "decode.tokens_per_s"), best_peer(&time("decode.tokens_per_s"), false), false));
    for &b in &c.batches {
        rows.push(row(&format!("decode, {b} sequences"), "tokens/s", batched_tps(rust, b), best_peer(&move |v: &Value| batched_tps(v, b), false), false));
    }
    rows.push(row("peak device memory, batch 1", "GiB", get(rust, "memory.peak_used_gib_batch1"), best_peer(&|v: &Value| get(v, "memory.device_used_before_batched_gib").or_else(|| get(v, "memory.device_used_end_gib")), true), true));
    let mut roof = vec![];
    let mut batches = vec![1];
    batches.extend(c.batches.iter().copied());
    for b in batches {
        let r = roofline(cfg, b, ctx, c.bandwidth_gbs);
        let measured = if b == 1 { get(rust, "decode.tokens_per_s") } else { batched_tps(rust, b) };
        roof.push(json!({"batch": b, "context": ctx, "weight_bytes": r.weight_bytes, "kv_bytes": r.kv_bytes,
            "roofline_tokens_per_s": r.tokens_per_s, "rust_tokens_per_s": measured,
            "fraction_of_roofline": measured.map(|m| m / r.tokens_per_s)}));
    }
    let ratio_of = |metric: &str, unit: &str, field: &str| {
        rows.iter().find(|r| r["metric"] == metric && r["unit"] == unit).and_then(|r| r[field].as_f64())
    };
    let speed = |metric: &str, unit: &str| ratio_of(metric, unit, "speedup_vs_peer");
    let frac1 = roof[0]["fraction_of_roofline"].as_f64();
    let tps64 = batched_tps(rust, 64);
    let mem = get(rust, "memory.peak_used_gib_batch1").map(|g| g * (1u64 << 30) as f64 / 1e9);
    let target = |name: &str, value: Option<f64>, goal: f64, pass: Option<bool>| json!({"target": name, "value": value, "goal": goal, "met": pass});
    // a vision target: 5x against the peer's median, and against its fastest run too
    let vision = |name: &str, metric: &str| {
        let mut t = target(name, speed(metric, "ms"), 5.0, speed(metric, "ms").map(|s| s >= 5.0));
        t["met_vs_fastest_run"] = json!(ratio_of(metric, "ms", "speedup_vs_peer_fastest_run").map(|s| s >= 5.0));
        t
    };
    let targets = vec![
        target("batch-1 decode speedup vs transformers", speed("decode batch 1", "tokens/s"), 10.0, speed("decode batch 1", "tokens/s").map(|s| s >= 10.0)),
        target("batch-1 decode fraction of HBM roofline", frac1, 0.5, frac1.map(|f| f >= 0.5)),
        vision("vision Base speedup vs transformers", "vision encode, Base"),
        vision("vision Gundam speedup vs transformers", "vision encode, Gundam 3x2"),
        target("64 sequences, tokens/s", tps64, 5000.0, tps64.map(|t| t >= 5000.0)),
        target("peak memory at batch 1, GB", mem, 9.0, mem.map(|m| m < 9.0)),
    ];
    json!({
        "gpu": gpu,
        "bandwidth_gbs": c.bandwidth_gbs,
        "bandwidth_source": c.bandwidth_source,
        "rows": rows,
        "roofline": roof,
        "targets": targets,
        "rust": rust,
        "peers": peers,
    })
}

/// The report as a Markdown table.
pub fn table(r: &Value) -> String {
    let f = |v: &Value| v.as_f64().map_or("-".to_string(), |x| if x >= 100.0 { format!("{x:.0}") } else { format!("{x:.2}") });
    let mut s = format!("GPU: {}\n\n| metric | unit | Rust | transformers (best) | speedup |\n|---|---|---|---|---|\n", r["gpu"].as_str().unwrap_or("?"));
    for row in r["rows"].as_array().into_iter().flatten() {
        s += &format!(
            "| {} | {} | {} | {} {} | {} |\n",
            row["metric"].as_str().unwrap_or(""),
            row["unit"].as_str().unwrap_or(""),
            f(&row["rust"]),
            f(&row["peer"]),
            row["peer_attn"].as_str().map(|a| format!("({a})")).unwrap_or_default(),
            row["speedup_vs_peer"].as_f64().map_or("-".into(), |x| format!("{x:.2}x")),
        );
    }
    s += "\n| batch | roofline tokens/s | Rust tokens/s | fraction |\n|---|---|---|---|\n";
    for x in r["roofline"].as_array().into_iter().flatten() {
        s += &format!("| {} | {} | {} | {} |\n", x["batch"], f(&x["roofline_tokens_per_s"]), f(&x["rust_tokens_per_s"]),
            x["fraction_of_roofline"].as_f64().map_or("-".into(), |v| format!("{:.0}%", v * 100.0)));
    }
    let yes_no = |v: &Value| match v.as_bool() {
        Some(true) => "yes",
        Some(false) => "no",
        None => "not measured",
    };
    s += "\n| target | value | goal | met | met against the peer's fastest run |\n|---|---|---|---|---|\n";
    for t in r["targets"].as_array().into_iter().flatten() {
        let robust = t.get("met_vs_fastest_run").map_or("-", yes_no);
        s += &format!("| {} | {} | {} | {} | {} |\n", t["target"].as_str().unwrap_or(""), f(&t["value"]), f(&t["goal"]), yes_no(&t["met"]), robust);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::OcrConfig;

    fn real() -> TextConfig {
        OcrConfig::from_json_str(r#"{"language_config": {"vocab_size": 129280, "hidden_size": 1280,
            "intermediate_size": 6848, "moe_intermediate_size": 896, "num_hidden_layers": 12,
            "num_attention_heads": 10, "num_key_value_heads": 10, "n_routed_experts": 64,
            "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
            "topk_method": "greedy", "use_mla": false}}"#)
        .unwrap()
        .text()
        .unwrap()
    }

    #[test]
    fn roofline_of_the_real_config() {
        let cfg = real();
        let r = roofline(&cfg, 1, 300, 3350.0);
        // attention 12 x 6.55M, dense 26.3M, 11 x (gate 0.08M + 8 experts x 3.44M), lm_head 165.5M
        let params = r.weight_bytes / 2.0;
        assert!((params / 1e6 - 574.0).abs() < 2.0, "{params}");
        // one token's cache at 300 positions: 12 layers x k,v x 1280 values x 301 x 2 bytes
        assert_eq!(r.kv_bytes, 2.0 * 12.0 * 2.0 * 1280.0 * 301.0);
        assert!((2800.0..2950.0).contains(&r.tokens_per_s), "{}", r.tokens_per_s);
        // 64 sequences touch nearly every expert: far more bytes per step, far more tokens/s
        let r64 = roofline(&cfg, 64, 300, 3350.0);
        assert!(r64.weight_bytes > 3.5 * r.weight_bytes && r64.tokens_per_s > 10.0 * r.tokens_per_s);
    }

    /// The roofline's bandwidth by the GPU's name: nvidia-smi's names of the cards in the table,
    /// the more specific before the general (an H100 NVL is not an SXM), none for the unknown.
    #[test]
    fn bandwidth_by_gpu_name() {
        for (name, gbs) in [
            ("NVIDIA H100 80GB HBM3", Some(3350.0)),
            ("NVIDIA H200", Some(4800.0)),
            ("NVIDIA GH200 480GB", Some(4000.0)),
            ("NVIDIA H100 NVL", Some(3900.0)),
            ("NVIDIA H100 PCIe", Some(2000.0)),
            ("NVIDIA A100-SXM4-80GB", Some(2039.0)),
            ("NVIDIA A100-SXM4-40GB", Some(1555.0)),
            ("NVIDIA H20", Some(4000.0)),
            ("NVIDIA GeForce RTX 4090", None),
            ("unnamed GPU", None),
        ] {
            assert_eq!(hbm_bandwidth_gbs(name), gbs, "{name}");
        }
    }

    /// A bench configuration for the report's tests, batched decode at `batches`.
    fn report_config(batches: Vec<usize>) -> BenchConfig {
        BenchConfig {
            model_dir: "w".into(), remote_code: None, peer_attn: vec![], python: "python3".into(),
            peer_script: "p".into(), peer_timeout: Duration::from_secs(1), steps: 64, warmup_steps: 4,
            decode_runs: 1, warmup: 1, repeat: 1, batches, max_t_b1: 8192, bandwidth_gbs: 3350.0,
            bandwidth_source: "test".into(),
        }
    }

    #[test]
    fn report_ratios_and_targets() {
        let cfg = real();
        let c = report_config(vec![64]);
        let rust = json!({"prompt_tokens": 283, "vision_base_ms": {"median_ms": 10.0},
            "decode": {"ms_per_token_median": 1.0, "tokens_per_s": 1000.0},
            "decode_batched": [{"batch": 64, "tokens_per_s": 6000.0}],
            "memory": {"peak_used_gib_batch1": 7.0}});
        let eager = json!({"attn": "eager", "vision_base_ms": {"median_ms": 30.0, "runs_ms": [30.0, 45.0, 28.0]},
            "decode": {"ms_per_token_median": 20.0, "tokens_per_s": 50.0}});
        let sdpa = json!({"attn": "sdpa", "vision_base_ms": {"median_ms": 20.0, "runs_ms": [20.0, 21.0, 19.0]},
            "decode": {"ms_per_token_median": 25.0, "tokens_per_s": 40.0}});
        let r = report(&c, &cfg, "test", &rust, &[eager, sdpa]);
        let row = |m: &str, u: &str| r["rows"].as_array().unwrap().iter().find(|x| x["metric"] == m && x["unit"] == u).unwrap().clone();
        // against the best peer: sdpa's 20 ms vision, eager's 50 tokens/s
        assert_eq!(row("vision encode, Base", "ms")["speedup_vs_peer"], 2.0);
        assert_eq!(row("vision encode, Base", "ms")["peer_attn"], "sdpa");
        assert_eq!(row("decode batch 1", "tokens/s")["speedup_vs_peer"], 20.0);
        let t = |name: &str| r["targets"].as_array().unwrap().iter().find(|x| x["target"] == name).unwrap()["met"].clone();
        assert_eq!(t("batch-1 decode speedup vs transformers"), true);
        assert_eq!(t("vision Base speedup vs transformers"), false);
        assert_eq!(t("64 sequences, tokens/s"), true);
        assert_eq!(t("vision Gundam speedup vs transformers"), Value::Null);
        assert!(table(&r).contains("| decode batch 1 | tokens/s | 1000 | 50.00 (eager) | 20.00x |"), "{}", table(&r));
        // the fastest single run over both peers: sdpa's 19 ms
        assert_eq!(row("vision encode, Base", "ms")["peer_fastest_run"], 19.0);
        assert_eq!(row("vision encode, Base", "ms")["speedup_vs_peer_fastest_run"], 1.9);
        assert_eq!(row("vision encode, Gundam 3x2", "ms")["speedup_vs_peer_fastest_run"], Value::Null);
        let robust = |name: &str| r["targets"].as_array().unwrap().iter().find(|x| x["target"] == name).unwrap()["met_vs_fastest_run"].clone();
        assert_eq!(robust("vision Base speedup vs transformers"), false);
        assert_eq!(robust("vision Gundam speedup vs transformers"), Value::Null);
        assert!(table(&r).contains("| vision Base speedup vs transformers | 2.00 | 5.00 | no | no |"), "{}", table(&r));
        assert!(table(&r).contains("| 64 sequences, tokens/s | 6000 | 5000 | yes | - |"), "{}", table(&r));
    }

    /// A vision target met against the peer's median but not against its fastest run (the
    /// tenth and eleventh sessions' case): both verdicts in the report.
    #[test]
    fn vision_targets_against_the_peers_fastest_run() {
        let cfg = real();
        let c = report_config(vec![]);
        let rust = json!({"vision_base_ms": {"median_ms": 4.8}, "vision_gundam_ms": {"median_ms": 11.3}});
        let eager = json!({"attn": "eager",
            "vision_base_ms": {"median_ms": 30.1, "runs_ms": [27.1, 30.1, 33.4]},
            "vision_gundam_ms": {"median_ms": 63.0, "runs_ms": [41.3, 63.0, 67.6]}});
        let r = report(&c, &cfg, "test", &rust, &[eager]);
        let t = |name: &str| r["targets"].as_array().unwrap().iter().find(|x| x["target"] == name).unwrap().clone();
        let (base, gundam) = (t("vision Base speedup vs transformers"), t("vision Gundam speedup vs transformers"));
        assert_eq!((base["met"].clone(), base["met_vs_fastest_run"].clone()), (json!(true), json!(true)));
        assert_eq!((gundam["met"].clone(), gundam["met_vs_fastest_run"].clone()), (json!(true), json!(false)));
        let row = r["rows"].as_array().unwrap().iter().find(|x| x["metric"] == "vision encode, Gundam 3x2").unwrap().clone();
        assert!((row["speedup_vs_peer_fastest_run"].as_f64().unwrap() - 41.3 / 11.3).abs() < 1e-9);
        assert!(table(&r).contains("| vision Gundam speedup vs transformers | 5.58 | 5.00 | yes | no |"), "{}", table(&r));
    }
}
