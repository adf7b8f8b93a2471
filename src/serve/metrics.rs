//! Counters, gauges and histograms of the server, written in Prometheus' text format at
//! `/metrics`. Lock-free counters; histograms behind a mutex (a few updates per request).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Latency buckets in seconds.
const BUCKETS: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

#[derive(Debug, Default)]
pub struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        for (c, b) in self.counts.iter_mut().zip(BUCKETS) {
            if v <= b {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum += v;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (c, b) in self.counts.iter().zip(BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

/// How a request ended (the `outcome` label of `ocr_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    BadRequest,
    Unauthorized,
    TooLarge,
    Overloaded,
    Cancelled,
    Timeout,
    Error,
}

impl Outcome {
    const ALL: [Outcome; 8] = [
        Outcome::Ok,
        Outcome::BadRequest,
        Outcome::Unauthorized,
        Outcome::TooLarge,
        Outcome::Overloaded,
        Outcome::Cancelled,
        Outcome::Timeout,
        Outcome::Error,
    ];
    fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::BadRequest => "bad_request",
            Outcome::Unauthorized => "unauthorized",
            Outcome::TooLarge => "too_large",
            Outcome::Overloaded => "overloaded",
            Outcome::Cancelled => "cancelled",
            Outcome::Timeout => "timeout",
            Outcome::Error => "error",
        }
    }
}

#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    outcomes: [AtomicU64; 8],
    pub queue_depth: AtomicU64,
    pub running: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub vision_cache_hits: AtomicU64,
    pub vision_cache_misses: AtomicU64,
    pub decode_steps: AtomicU64,
    /// Tokens per second of the last measuring window (f64 bits).
    tokens_per_second: AtomicU64,
    window: Mutex<(Instant, u64)>,
    latency: Mutex<Histogram>,
    first_token: Mutex<Histogram>,
    queue_wait: Mutex<Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            outcomes: Default::default(),
            queue_depth: AtomicU64::new(0),
            running: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            vision_cache_hits: AtomicU64::new(0),
            vision_cache_misses: AtomicU64::new(0),
            decode_steps: AtomicU64::new(0),
            tokens_per_second: AtomicU64::new(0f64.to_bits()),
            window: Mutex::new((Instant::now(), 0)),
            latency: Mutex::default(),
            first_token: Mutex::default(),
            queue_wait: Mutex::default(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Metrics {
    pub fn outcome(&self, o: Outcome) {
        let i = Outcome::ALL.iter().position(|&x| x == o).unwrap_or(0);
        self.outcomes[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn outcome_count(&self, o: Outcome) -> u64 {
        let i = Outcome::ALL.iter().position(|&x| x == o).unwrap_or(0);
        self.outcomes[i].load(Ordering::Relaxed)
    }

    pub fn latency(&self, secs: f64) {
        lock(&self.latency).observe(secs);
    }

    pub fn first_token(&self, secs: f64) {
        lock(&self.first_token).observe(secs);
    }

    pub fn queue_wait(&self, secs: f64) {
        lock(&self.queue_wait).observe(secs);
    }

    /// `n` tokens were generated; updates the tokens/s gauge about once a second.
    pub fn generated(&self, n: u64) {
        let total = self.generated_tokens.fetch_add(n, Ordering::Relaxed) + n;
        let mut w = lock(&self.window);
        let dt = w.0.elapsed().as_secs_f64();
        if dt >= 1.0 {
            let rate = (total - w.1) as f64 / dt;
            self.tokens_per_second
                .store(rate.to_bits(), Ordering::Relaxed);
            *w = (Instant::now(), total);
        }
    }

    /// The gauge decays to 0 when nothing runs.
    fn tokens_per_second(&self) -> f64 {
        let w = lock(&self.window);
        if w.0.elapsed().as_secs_f64() > 2.0 {
            let total = self.generated_tokens.load(Ordering::Relaxed);
            return (total - w.1) as f64 / w.0.elapsed().as_secs_f64();
        }
        f64::from_bits(self.tokens_per_second.load(Ordering::Relaxed))
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let g = |s: &mut String, name: &str, kind: &str, help: &str, v: String| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        let _ = writeln!(
            s,
            "# HELP ocr_requests_total Requests by outcome.\n# TYPE ocr_requests_total counter"
        );
        for o in Outcome::ALL {
            let _ = writeln!(
                s,
                "ocr_requests_total{{outcome=\"{}\"}} {}",
                o.name(),
                self.outcome_count(o)
            );
        }
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        g(
            &mut s,
            "ocr_queue_depth",
            "gauge",
            "Requests and pages waiting for a batch slot.",
            ld(&self.queue_depth),
        );
        g(
            &mut s,
            "ocr_running_sequences",
            "gauge",
            "Sequences in the running batch.",
            ld(&self.running),
        );
        g(
            &mut s,
            "ocr_prompt_tokens_total",
            "counter",
            "Prompt tokens prefilled.",
            ld(&self.prompt_tokens),
        );
        g(
            &mut s,
            "ocr_generated_tokens_total",
            "counter",
            "Tokens generated.",
            ld(&self.generated_tokens),
        );
        g(
            &mut s,
            "ocr_tokens_per_second",
            "gauge",
            "Generated tokens per second, last window.",
            format!("{:.3}", self.tokens_per_second()),
        );
        g(
            &mut s,
            "ocr_decode_steps_total",
            "counter",
            "Batch decoding steps run.",
            ld(&self.decode_steps),
        );
        g(
            &mut s,
            "ocr_vision_cache_hits_total",
            "counter",
            "Images whose vision rows came from the cache.",
            ld(&self.vision_cache_hits),
        );
        g(
            &mut s,
            "ocr_vision_cache_misses_total",
            "counter",
            "Images run through the vision encoder.",
            ld(&self.vision_cache_misses),
        );
        g(
            &mut s,
            "ocr_uptime_seconds",
            "gauge",
            "Seconds since the server started.",
            format!("{:.3}", self.started.elapsed().as_secs_f64()),
        );
        lock(&self.latency).write(
            &mut s,
            "ocr_request_latency_seconds",
            "Request latency, received to last byte queued.",
        );
        lock(&self.first_token).write(
            &mut s,
            "ocr_time_to_first_token_seconds",
            "Received to first generated token.",
        );
        lock(&self.queue_wait).write(
            &mut s,
            "ocr_queue_wait_seconds",
            "Queued to admitted into the batch.",
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.outcome(Outcome::Overloaded);
        m.outcome(Outcome::Overloaded);
        m.latency(0.03);
        m.latency(7.0);
        let t = m.render();
        assert!(
            t.contains("ocr_requests_total{outcome=\"overloaded\"} 2"),
            "{t}"
        );
        assert!(
            t.contains("ocr_request_latency_seconds_bucket{le=\"0.05\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("ocr_request_latency_seconds_bucket{le=\"10\"} 2"),
            "{t}"
        );
        assert!(t.contains("ocr_request_latency_seconds_count 2"), "{t}");
    }
}
