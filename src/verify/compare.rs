//! Comparing one stage: largest absolute and relative differences, top-1 agreement, the
//! tolerance and the verdict.

use serde::Serialize;

/// Pass when `max |ours - golden| <= abs + rel * max |golden|` over the stage.
///
/// The relative part is taken against the stage's largest golden value rather than element by
/// element: elements near zero would otherwise dominate "max rel" with meaningless ratios.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Tolerance {
    pub abs: f64,
    pub rel: f64,
}

impl Tolerance {
    pub const fn new(abs: f64, rel: f64) -> Self {
        Self { abs, rel }
    }

    pub fn bound(&self, ref_max: f64) -> f64 {
        self.abs + self.rel * ref_max
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
    /// The model could not produce the stage for the golden's inputs.
    Error,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "FAIL",
            Verdict::Error => "ERROR",
        }
    }
}

/// One line of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    pub stage: String,
    pub shape: Vec<usize>,
    pub max_abs: f64,
    /// `max_abs / max |golden|`.
    pub max_rel: f64,
    /// `max |golden|`: the stage's scale.
    pub ref_max: f64,
    /// Rows (last-dimension vectors) whose argmax agrees, out of how many; logits stages and
    /// the greedy tokens only. Reported, not judged (see [`compare`]).
    pub top1: Option<(usize, usize)>,
    pub tolerance: Tolerance,
    pub verdict: Verdict,
    /// Where the largest difference is, or why the stage failed.
    pub note: Option<String>,
}

impl Stage {
    /// A stage the model could not compute.
    pub fn error(stage: &str, message: String) -> Self {
        Self {
            stage: stage.to_string(),
            shape: vec![],
            max_abs: f64::NAN,
            max_rel: f64::NAN,
            ref_max: f64::NAN,
            top1: None,
            tolerance: Tolerance::new(0.0, 0.0),
            verdict: Verdict::Error,
            note: Some(message),
        }
    }

    pub fn passed(&self) -> bool {
        self.verdict == Verdict::Pass
    }
}

/// Index of the largest value (the first one on ties, as `torch.argmax`).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// `top1 - top2` of a row.
pub fn margin(v: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &x in v {
        if x > a {
            b = a;
            a = x;
        } else if x > b {
            b = x;
        }
    }
    a - b
}

/// Compares `ours` with `golden` (same length, C order, `shape` the golden's). `row_len`:
/// also count top-1 agreement over rows of that length.
pub fn compare(
    stage: &str,
    shape: &[usize],
    ours: &[f32],
    golden: &[f32],
    tol: Tolerance,
    row_len: Option<usize>,
) -> Stage {
    if ours.len() != golden.len() {
        return Stage::error(
            stage,
            format!("the model gives {} values, the golden {} (shape {shape:?})", ours.len(), golden.len()),
        );
    }
    let (mut max_abs, mut worst, mut ref_max) = (0f64, 0usize, 0f64);
    let mut nan = false;
    for (i, (&a, &b)) in ours.iter().zip(golden).enumerate() {
        let d = (a as f64 - b as f64).abs();
        if d.is_nan() {
            nan = true;
        }
        if d > max_abs {
            max_abs = d;
            worst = i;
        }
        ref_max = ref_max.max((b as f64).abs());
    }
    let top1 = row_len.filter(|&n| n > 0).map(|n| {
        let rows = golden.len() / n;
        let agree = (0..rows)
            .filter(|&r| argmax(&ours[r * n..(r + 1) * n]) == argmax(&golden[r * n..(r + 1) * n]))
            .count();
        (agree, rows)
    });
    let max_rel = if ref_max > 0.0 { max_abs / ref_max } else { max_abs };
    // Top-1 is reported, not judged: within the bound an argmax can only flip where the golden's
    // top-2 margin is under twice the bound, which is a tie at this precision.
    let ok = !nan && max_abs <= tol.bound(ref_max);
    let note = if nan {
        Some("NaN in the model's output".to_string())
    } else if max_abs > 0.0 {
        Some(format!("largest at {}", position(shape, worst)))
    } else {
        None
    };
    Stage {
        stage: stage.to_string(),
        shape: shape.to_vec(),
        max_abs: if nan { f64::NAN } else { max_abs },
        max_rel: if nan { f64::NAN } else { max_rel },
        ref_max,
        top1,
        tolerance: tol,
        verdict: if ok { Verdict::Pass } else { Verdict::Fail },
        note,
    }
}

/// `[i, j, k]` of a flat index.
fn position(shape: &[usize], mut flat: usize) -> String {
    let mut idx = vec![0; shape.len()];
    for (d, &n) in shape.iter().enumerate().rev() {
        if n > 0 {
            idx[d] = flat % n;
            flat /= n;
        }
    }
    format!("{idx:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_and_verdict() {
        let g = [1.0f32, -4.0, 2.0, 0.5];
        let o = [1.0f32, -4.001, 2.0, 0.6];
        let s = compare("x", &[2, 2], &o, &g, Tolerance::new(0.2, 0.0), Some(2));
        assert!((s.max_abs - 0.1).abs() < 1e-6 && (s.ref_max - 4.0).abs() < 1e-12);
        assert_eq!(s.top1, Some((2, 2)));
        assert!(s.passed());
        assert_eq!(s.note.as_deref(), Some("largest at [1, 1]"));
        let s = compare("x", &[2, 2], &o, &g, Tolerance::new(0.01, 0.0), None);
        assert_eq!(s.verdict, Verdict::Fail);
        // A flipped near-tie is reported; the verdict follows the bound.
        let s = compare("x", &[1, 2], &[1.0, 1.01], &[1.01, 1.0], Tolerance::new(0.02, 0.0), Some(2));
        assert_eq!((s.top1, s.verdict), (Some((0, 1)), Verdict::Pass));
        assert_eq!(margin(&[0.0, 3.0, 2.5]), 0.5);
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }
}
