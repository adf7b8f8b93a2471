//! `ngram_ban` (the no-repeat n-gram guard on the device) and `greedy_next` (argmax and the
//! step's bookkeeping: next token, position, history), so that a decode step needs nothing from
//! the host. Reference: [`crate::model::generate::NoRepeatNgram::banned`] and the greedy
//! argmax of [`crate::model::generate`] (ties to the lowest id).

use candle_core::Result;

use super::{cfg, launch, Kernels};

/// The decode state of `rows` sequences on the device (u32 arrays).
#[derive(Debug, Clone, Copy)]
pub struct StepState {
    pub token: u64,
    pub pos: u64,
    /// `(rows, hist_cap)`, or 0 for no history.
    pub hist: u64,
    pub hist_len: u64,
    pub hist_cap: usize,
}

/// The guard's parameters on the device.
#[derive(Debug, Clone, Copy)]
pub struct NgramParams {
    pub n: usize,
    /// 0: the whole history.
    pub window: usize,
    pub whitelist: u64,
    pub n_white: usize,
}

impl Kernels {
    /// Sets the logits of banned tokens to -inf, per row.
    pub fn ngram_ban(&self, s: &StepState, g: &NgramParams, logits: u64, rows: usize, vocab: usize) -> Result<()> {
        launch!(
            self,
            self.ngram_ban,
            cfg((rows as u32, 1, 1), 256, 0),
            s.hist, s.hist_len, s.hist_cap as i32, g.n as i32, g.window as i32, g.whitelist,
            g.n_white as i32, logits, vocab as i32
        )
    }

    /// `token[r] = argmax(logits[r])`; with `advance`, `pos[r] += 1` and the token joins the
    /// history.
    pub fn greedy_next(&self, s: &StepState, logits: u64, rows: usize, vocab: usize, advance: bool) -> Result<()> {
        launch!(
            self,
            self.greedy_next,
            cfg((rows as u32, 1, 1), 1024, 0),
            logits, vocab as i32, s.token, s.pos, s.hist, s.hist_len, s.hist_cap as i32,
            advance as i32
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::generate::NoRepeatNgram;
    use crate::model::kernels::testutil::*;
    use crate::model::kernels::{tensor_ptr, Kernels};
    use candle_core::{DType, Device, Tensor};
    use half::bf16;

    /// Histories with loops (so that n-grams repeat), the whitelist, the window; then the
    /// greedy pick of the banned logits against NoRepeatNgram::banned + argmax.
    #[test]
    fn ngram_ban_and_greedy_next_match_generate() {
        let (dev, cd) = device();
        let k = Kernels::load(&cd).unwrap();
        let (rows, vocab, cap) = (4usize, 300usize, 128usize);
        let guard = NoRepeatNgram { n: 3, window: Some(40), whitelist: [7u32].into() };
        let mut hist = vec![0u32; rows * cap];
        let mut lens = vec![];
        for r in 0..rows {
            let len = 20 + 17 * r;
            for i in 0..len {
                // short cycles through a few tokens, one of them whitelisted
                hist[r * cap + i] = [5u32, 7, 9, 11, 5, 7, 13][(i * (r + 1)) % 7] + (i % 11 == 10) as u32 * 100;
            }
            lens.push(len as u32);
        }
        let logits = rand(&[rows, vocab], 3.0, 99);
        // make the banned tokens attractive, so that the ban decides the pick
        let mut l: Vec<Vec<f32>> = logits.to_vec2().unwrap();
        let mut banned = vec![];
        for r in 0..rows {
            let hr = &hist[r * cap..r * cap + lens[r] as usize];
            let b = guard.banned(hr);
            for &t in &b {
                l[r][t as usize] = 10.0 + t as f32 * 1e-3;
            }
            banned.push(b);
        }
        assert!(banned.iter().any(|b| !b.is_empty()), "the test needs some banned tokens");
        let flat: Vec<f32> = l.iter().flatten().copied().collect();
        let gl = Tensor::from_vec(flat.clone(), (rows, vocab), &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap().to_device(&dev).unwrap();
        let ref_l: Vec<Vec<f32>> = Tensor::from_vec(flat, (rows, vocab), &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap().to_vec2().unwrap();
        let gh = Tensor::new(hist.as_slice(), &dev).unwrap();
        let glen = Tensor::new(lens.as_slice(), &dev).unwrap();
        let tok = Tensor::zeros(rows, DType::U32, &dev).unwrap();
        let pos = Tensor::new(&[3u32, 4, 5, 6], &dev).unwrap();
        let white = Tensor::new(&[7u32], &dev).unwrap();
        let pu = |t: &Tensor| tensor_ptr::<u32>(t).unwrap();
        let st = StepState { token: pu(&tok), pos: pu(&pos), hist: pu(&gh), hist_len: pu(&glen), hist_cap: cap };
        let gp = NgramParams { n: 3, window: 40, whitelist: pu(&white), n_white: 1 };
        k.ngram_ban(&st, &gp, tensor_ptr::<bf16>(&gl).unwrap(), rows, vocab).unwrap();
        k.greedy_next(&st, tensor_ptr::<bf16>(&gl).unwrap(), rows, vocab, true).unwrap();
        let got_l: Vec<Vec<f32>> = gl.to_dtype(DType::F32).unwrap().to_vec2().unwrap();
        let got_tok: Vec<u32> = tok.to_vec1().unwrap();
        let got_pos: Vec<u32> = pos.to_vec1().unwrap();
        let got_len: Vec<u32> = glen.to_vec1().unwrap();
        let got_hist: Vec<u32> = gh.to_vec1().unwrap();
        for r in 0..rows {
            let mut want = ref_l[r].clone();
            for &t in &banned[r] {
                want[t as usize] = f32::NEG_INFINITY;
            }
            let ninf = got_l[r].iter().filter(|v| **v == f32::NEG_INFINITY).count();
            assert_eq!(ninf, banned[r].len(), "row {r}: banned count");
            assert_eq!(got_l[r], want, "row {r}: logits after the ban");
            let mut best = 0usize;
            for (i, &v) in want.iter().enumerate() {
                if v > want[best] {
                    best = i;
                }
            }
            assert_eq!(got_tok[r], best as u32, "row {r}: greedy token");
            assert_eq!(got_pos[r], 4 + r as u32);
            assert_eq!(got_len[r], lens[r] + 1);
            assert_eq!(got_hist[r * cap + lens[r] as usize], best as u32);
        }
        eprintln!("ngram_ban + greedy_next: {} banned tokens over {rows} rows, identical bans and picks", banned.iter().map(Vec::len).sum::<usize>());
    }
}
