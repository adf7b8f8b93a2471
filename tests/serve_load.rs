//! Load test of `ocr-patch serve` on loopback (gated: set `OCR_PATCH_LOAD_TEST=1`, or run
//! `just load-test`): 1,000 requests from 64 concurrent clients against the synthetic `cpu`
//! model. Passes when every answer is a 200 or a documented 429, the process's resident memory
//! stops growing (second half of the run: under 32 MiB more than half-way), and the batch
//! drains; prints
//! p50/p99 latency and RSS (recorded in docs/benchmarks.md). Bounded: a fixed request count,
//! each client stops on its own, a 15-minute cap.
//!
//! `OCR_PATCH_LOAD_REQUESTS` and `OCR_PATCH_LOAD_CLIENTS` change the size.
#![cfg(feature = "serve")]

#[path = "serve_support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ocr_patch::serve::ServeConfig;
use serde_json::json;
use support::*;

fn rss_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn a_thousand_requests_from_64_clients() {
    if std::env::var("OCR_PATCH_LOAD_TEST").as_deref() != Ok("1") {
        eprintln!("skipping: set OCR_PATCH_LOAD_TEST=1 (or run `just load-test`)");
        return;
    }
    let total = env_usize("OCR_PATCH_LOAD_REQUESTS", 1000);
    let clients = env_usize("OCR_PATCH_LOAD_CLIENTS", 64);
    let srv = Arc::new(server(ServeConfig {
        max_batch: 32,
        queue: 32,
        ..ServeConfig::default()
    }));
    // Four page images, encoded once each (the vision cache serves the rest).
    let bodies: Arc<Vec<serde_json::Value>> = Arc::new(
        (0..4)
            .map(|i| {
                chat_body(
                    &png_data_url(&image(60 + 10 * i, 80, 40 + i)),
                    json!({"max_tokens": 8, "mode": "tiny", "ignore_eos": true}),
                )
            })
            .collect(),
    );
    for b in bodies.iter() {
        post(&srv, b).expect("warm-up request");
    }
    // warm-up at full concurrency, then measure
    let run = |n: usize| {
        let next = Arc::new(AtomicUsize::new(0));
        let t0 = Instant::now();
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                let (srv, bodies, next) = (srv.clone(), bodies.clone(), next.clone());
                std::thread::spawn(move || {
                    let c = client();
                    let mut lat = vec![];
                    let (mut ok, mut busy, mut other) = (0, 0, vec![]);
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        if k >= n || t0.elapsed() > Duration::from_secs(900) {
                            break;
                        }
                        let t = Instant::now();
                        let resp = c
                            .post(url(&srv, "/v1/chat/completions"))
                            .json(&bodies[k % bodies.len()])
                            .send();
                        match resp {
                            Ok(r) if r.status() == 200 => {
                                let _ = r.bytes();
                                ok += 1;
                                lat.push(t.elapsed().as_secs_f64());
                            }
                            Ok(r) if r.status() == 429 => {
                                let v = r.json_value().unwrap_or_default();
                                assert_eq!(v["error"]["type"], "rate_limit_error");
                                busy += 1;
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            Ok(r) => other.push(format!(
                                "{} {}",
                                r.status(),
                                r.text().unwrap_or_default()
                            )),
                            Err(e) => other.push(e.to_string()),
                        }
                    }
                    (lat, ok, busy, other)
                })
            })
            .collect();
        let mut lat = vec![];
        let (mut ok, mut busy, mut other) = (0, 0, vec![]);
        for h in handles {
            let (l, o, b, e) = h.join().unwrap();
            lat.extend(l);
            ok += o;
            busy += b;
            other.extend(e);
        }
        (lat, ok, busy, other, t0.elapsed())
    };
    let (_, _, _, other, _) = run(clients * 2);
    assert!(other.is_empty(), "warm-up errors: {other:?}");
    // two halves: memory may settle in the first (allocator arenas, buffers); it must not keep
    // growing in the second
    let rss_before = rss_mib();
    let (mut lat, ok1, busy1, mut other, wall1) = run(total / 2);
    let rss_mid = rss_mib();
    let (lat2, ok2, busy2, other2, wall2) = run(total - total / 2);
    let rss_after = rss_mib();
    lat.extend(lat2);
    other.extend(other2);
    let (ok, busy, wall) = (ok1 + ok2, busy1 + busy2, wall1 + wall2);
    assert!(
        other.is_empty(),
        "errors other than 429: {:?}",
        &other[..other.len().min(5)]
    );
    assert_eq!(ok + busy, total);
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1];
    let m = metrics(&srv);
    eprintln!(
        "load: {total} requests, {clients} clients: {ok} ok, {busy} x 429, wall {:.1} s, {:.1} req/s; \
         latency p50 {:.3} s, p99 {:.3} s, max {:.3} s; RSS after warm-up {:.0} MiB, half-way {:.0} MiB, \
         end {:.0} MiB; decode steps {}, tokens {}",
        wall.as_secs_f64(),
        ok as f64 / wall.as_secs_f64(),
        pct(0.50),
        pct(0.99),
        lat[lat.len() - 1],
        rss_before,
        rss_mid,
        rss_after,
        metric(&m, "ocr_decode_steps_total"),
        metric(&m, "ocr_generated_tokens_total"),
    );
    assert!(
        rss_after - rss_mid < 32.0 && rss_after - rss_before < 128.0,
        "memory kept growing: {rss_before:.0} -> {rss_mid:.0} -> {rss_after:.0} MiB"
    );
    // the batch drains (the gauges are updated by the scheduler between steps)
    let t = Instant::now();
    loop {
        let m = metrics(&srv);
        if metric(&m, "ocr_running_sequences") == 0.0 && metric(&m, "ocr_queue_depth") == 0.0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the batch did not drain:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
