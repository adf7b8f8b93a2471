//! The decode step's timeline as the GPU ran it, from the kernels' probes
//! ([`crate::model::kernels::trace`] reads them; `ocr-patch bench --profile trace`): per launch
//! of the step, averaged over the steps, how long its first block sat at the wait for its inputs
//! (the overlap programmatic dependent launch gives), the time from its inputs being ready to the
//! next launch's (the step's critical path, kernel by kernel) and its marks; the same summed per
//! kernel. Plain arithmetic on the recorded times: no device needed.

use serde_json::{json, Value};

use super::median;

/// One launch's blocks as the probes saw them (times in ns of the GPU's global clock; of the
/// blocks that reached `inputs_ready`, about 256 a launch: every stride-th and the last).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// The kernel's module (`kernels/<module>.cu`).
    pub kernel: &'static str,
    /// The GPU's launch number (`%gridid`): increases with launch order.
    pub grid: u64,
    /// Blocks launched, and those the probes saw.
    pub blocks: u64,
    pub seen: u64,
    /// The first and the last block at the wait.
    pub first_arrival: u64,
    pub last_arrival: u64,
    /// The first and the last block through it: the first is when the kernel's inputs were
    /// ready (the launch before it had finished).
    pub first_release: u64,
    pub last_release: u64,
    /// The last passing of each mark (`TRACE_MARK(i)` in a kernel; 0: not passed).
    pub marks: [u64; 8],
}

/// The report of `--profile trace` from its launches (`steps` steps of `per_step` launches, in
/// order) and the steps' wall times (ms); prints the per-kernel table to stderr.
pub fn report(launches: &[Launch], steps: usize, per_step: usize, times: &[f64]) -> Value {
    let us = |ns: f64| ns / 1e3;
    let mut rows = Vec::with_capacity(per_step);
    let mut by_kernel: std::collections::BTreeMap<String, (usize, f64)> = Default::default();
    let mut resolution = 0u64;
    for p in 0..per_step {
        let (mut wait, mut path, mut spread, mut n) = (0f64, 0f64, 0f64, 0usize);
        let mut marks = [0f64; 8];
        for s in 0..steps {
            let l = &launches[s * per_step + p];
            for (m, &t) in marks.iter_mut().zip(&l.marks) {
                *m += t.saturating_sub(l.first_release) as f64;
            }
            wait += l.first_release.saturating_sub(l.first_arrival) as f64;
            spread += l.last_release.saturating_sub(l.first_release) as f64;
            // the step's last launch: the host reads the token before the next step
            if p + 1 < per_step {
                let next = &launches[s * per_step + p + 1];
                path += next.first_release.saturating_sub(l.first_release) as f64;
                n += 1;
            }
            for t in [
                l.first_arrival,
                l.last_arrival,
                l.first_release,
                l.last_release,
            ] {
                resolution = gcd(resolution, t - launches[0].first_arrival.min(t));
            }
        }
        let l = &launches[p];
        let name = if l.kernel == "linear" {
            format!("linear ({} blocks)", l.blocks)
        } else {
            l.kernel.to_string()
        };
        let path = if n > 0 { path / n as f64 } else { 0.0 };
        let e = by_kernel.entry(name.clone()).or_default();
        e.0 += 1;
        e.1 += path;
        rows.push(json!({
            "launch": p,
            "kernel": name,
            "blocks": l.blocks,
            "first_block_waited_us": us(wait / steps as f64),
            "releases_spread_us": us(spread / steps as f64),
            "inputs_ready_to_next_us": us(path),
            // the kernel's marks, after its first release
            "marks_us": launches[p].marks.iter().zip(marks).filter(|(&t, _)| t > 0).map(|(_, m)| us(m / steps as f64)).collect::<Vec<_>>(),
        }));
    }
    let total: f64 = by_kernel.values().map(|v| v.1).sum();
    let mut kernels: Vec<_> = by_kernel.into_iter().collect();
    kernels.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
    eprintln!(
        "{:28} {:>9} {:>10} {:>6}",
        "kernel", "launches", "us/step", "share"
    );
    for (name, (n, t)) in &kernels {
        eprintln!(
            "{name:28} {n:9} {:10.1} {:5.1}%",
            us(*t),
            100.0 * t / total.max(f64::MIN_POSITIVE)
        );
    }
    eprintln!("step, the first launch's inputs ready to the last's: {:.1} us; wall {:.3} ms/step (synchronised each step)", us(total), median(times));
    json!({
        "profiled": "batch-1 decode steps in the CUDA graph, kernels with timeline probes",
        "steps": steps,
        "launches_per_step": per_step,
        "clock_resolution_ns": resolution,
        "step_wall_ms_median": median(times),
        "critical_path_us_by_kernel": kernels.iter().map(|(k, (n, t))| json!({"kernel": k, "launches": n, "us": us(*t)})).collect::<Vec<_>>(),
        "launches": rows,
    })
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(
        kernel: &'static str,
        blocks: u64,
        arrival: u64,
        release: u64,
        marks: &[u64],
    ) -> Launch {
        let mut m = [0u64; 8];
        m[..marks.len()].copy_from_slice(marks);
        Launch {
            kernel,
            grid: 0,
            blocks,
            seen: blocks.min(256),
            first_arrival: arrival,
            last_arrival: arrival + 64,
            first_release: release,
            last_release: release + 32,
            marks: m,
        }
    }

    /// Two steps of three launches: each launch's time to the next one's release, its wait,
    /// its marks (after its own release) and the per-kernel sums, averaged over the steps; the
    /// step's last launch has no successor; the clock's step is the times' common divisor.
    #[test]
    fn the_report_averages_each_launch_over_the_steps() {
        let step = |t0: u64, attn: u64| {
            vec![
                launch("linear", 480, t0, t0 + 1_000, &[]),
                launch(
                    "decode_attn",
                    160,
                    t0 + 1_500,
                    t0 + 3_000,
                    &[t0 + 3_000 + attn, t0 + 3_000 + 2 * attn],
                ),
                launch("linear", 160, t0 + 4_000, t0 + 3_000 + 3 * attn, &[]),
            ]
        };
        let mut launches = step(0, 2_000);
        launches.extend(step(1_000_000, 4_000));
        let r = report(&launches, 2, 3, &[0.7, 0.9]);
        let rows = r["launches"].as_array().unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0]["kernel"], "linear (480 blocks)");
        assert_eq!(rows[0]["inputs_ready_to_next_us"], 2.0); // 3,000 - 1,000 ns, both steps
        assert_eq!(rows[0]["first_block_waited_us"], 1.0);
        assert_eq!(rows[1]["inputs_ready_to_next_us"], 9.0); // 3 x 2,000 and 3 x 4,000 ns
        assert_eq!(rows[1]["first_block_waited_us"], 1.5);
        assert_eq!(rows[1]["marks_us"], json!([3.0, 6.0]));
        assert_eq!(rows[1]["releases_spread_us"], 0.032);
        assert_eq!(
            rows[2]["inputs_ready_to_next_us"], 0.0,
            "the step's last launch"
        );
        assert_eq!(rows[2]["kernel"], "linear (160 blocks)");
        let by: Vec<(String, f64)> = r["critical_path_us_by_kernel"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| {
                (
                    k["kernel"].as_str().unwrap().to_string(),
                    k["us"].as_f64().unwrap(),
                )
            })
            .collect();
        assert_eq!(by[0], ("decode_attn".to_string(), 9.0), "largest first");
        // the times' common divisor (1,000 and 1,500 apart, the last block 64 and 32 later)
        assert_eq!(r["clock_resolution_ns"], 4);
        assert_eq!(r["step_wall_ms_median"], 0.8);
    }
}
