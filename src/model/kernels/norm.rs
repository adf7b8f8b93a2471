//! `embed` (token rows), `add_rmsnorm` (the residual add fused with the next RMSNorm; the
//! MoE's weighted sum of expert outputs folded in) and `norm_linear` (that and the projection
//! after it, for one row). Reference: `DeepseekV2RMSNorm` as
//! [`crate::model::decoder::RmsNorm`] computes it, after the reference path's bf16 add.

use candle_core::Result;

use super::{cfg, launch, Kernels};

/// What `add_rmsnorm` adds to the residual stream before normalising.
#[derive(Debug, Clone, Copy)]
pub enum Delta {
    /// Nothing: normalise `resid` as it is.
    None,
    /// `(rows, h)` bf16 at this address.
    Rows(u64),
    /// `sum_j w[r*k+j] * slot_out[r*k+j]`: `slot_out` `(rows*k, h)` f32, `w` `(rows*k)` f32.
    Slots { slot_out: u64, w: u64, k: usize },
}

/// A row `norm_linear` holds: a thread per 8 columns of one block of 256 (`xs` in the kernel).
fn norm_linear_holds(h: usize) -> bool {
    h % 8 == 0 && h <= 8 * 256
}

impl Delta {
    /// The kernels' arguments: mode, delta, slot outputs, slot weights, slots per row.
    fn args(self) -> (i32, u64, u64, u64, i32) {
        match self {
            Delta::None => (0, 0, 0, 0, 0),
            Delta::Rows(p) => (1, p, 0, 0, 0),
            Delta::Slots { slot_out, w, k } => (2, 0, slot_out, w, k as i32),
        }
    }
}

impl Kernels {
    /// `out[r] = table[ids[r]]` for `rows` rows of width `h`.
    pub fn embed(&self, table: u64, ids: u64, out: u64, rows: usize, h: usize) -> Result<()> {
        if h % 8 != 0 {
            candle_core::bail!("embed: hidden size {h} is not a multiple of 8");
        }
        launch!(self, self.embed, cfg((rows as u32, 1, 1), 128, 0), table, ids, out, h as i32)
    }

    /// `resid += delta` (rounded to bf16), `out = RMSNorm(resid) * weight`.
    #[allow(clippy::too_many_arguments)]
    pub fn add_rmsnorm(
        &self,
        resid: u64,
        delta: Delta,
        weight: u64,
        out: u64,
        rows: usize,
        h: usize,
        eps: f64,
    ) -> Result<()> {
        if h % 8 != 0 || h > 8192 {
            candle_core::bail!("add_rmsnorm: hidden size {h} must be a multiple of 8, at most 8192");
        }
        let (mode, d, so, sw, k) = delta.args();
        launch!(
            self,
            self.add_rmsnorm,
            // a thread per 8 columns, whole warps
            cfg((rows as u32, 1, 1), (h / 8).div_ceil(32) as u32 * 32, 0),
            resid, d, so, sw, k, mode, weight, out, h as i32, eps as f32
        )
    }

    /// Whether [`Self::norm_linear`] takes `rows` rows of hidden size `h` (one row, `h` a
    /// multiple of 8 up to 2048; not under `OCR_PATCH_LINEAR=cublas` nor
    /// `OCR_PATCH_NORM_LINEAR=0`).
    pub fn norm_linear_fits(&self, rows: usize, h: usize) -> bool {
        rows == 1 && norm_linear_holds(h) && !self.cublas_only && self.norm_rows != 0
    }

    /// One row's [`Self::add_rmsnorm`] and the [`Self::linear`] that reads its output in one
    /// launch: `x = resid + delta`, `resid_out = x` (unless `delta` is [`Delta::None`]),
    /// `y (1, out) = (RMSNorm(x) * norm_w) . w (out, h)^T`, the same values as the two launches.
    /// `resid_out` must not be `resid` (every block reads `resid`; the first writes `resid_out`).
    #[allow(clippy::too_many_arguments)]
    pub fn norm_linear(
        &self,
        resid: u64,
        resid_out: u64,
        delta: Delta,
        norm_w: u64,
        eps: f64,
        w: u64,
        y: u64,
        h: usize,
        out: usize,
    ) -> Result<()> {
        if !norm_linear_holds(h) || out == 0 {
            candle_core::bail!("norm_linear: hidden size {h} must be a multiple of 8, at most 2048 (out {out})");
        }
        if resid == resid_out && !matches!(delta, Delta::None) {
            candle_core::bail!("norm_linear: resid_out must be another buffer than resid");
        }
        let (mode, d, so, sw, k) = delta.args();
        // outputs a warp (8 warps a block)
        let (func, per_warp) = match self.norm_rows {
            1 => (&self.norm_linear[2], 1),
            2 => (&self.norm_linear[1], 2),
            _ => (&self.norm_linear[0], 4),
        };
        launch!(
            self,
            *func,
            cfg((out.div_ceil(8 * per_warp) as u32, 1, 1), 256, 0),
            resid, resid_out, d, so, sw, k, mode, norm_w, eps as f32, w, y, h as i32, out as i32
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::decoder::RmsNorm;
    use crate::model::kernels::testutil::*;
    use crate::model::kernels::{tensor_ptr, Kernels};
    use candle_core::{DType, Device, Module, Tensor};
    use half::bf16;

    fn reference_norm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
        let vb = candle_nn::VarBuilder::from_tensors(
            [("weight".to_string(), w.clone())].into(),
            DType::BF16,
            &Device::Cpu,
        );
        RmsNorm::new(w.dim(0).unwrap(), eps, vb).unwrap().forward(x).unwrap()
    }

    #[test]
    fn add_rmsnorm_matches_the_reference_in_every_mode() {
        let (dev, cd) = device();
        let k = Kernels::load(&cd).unwrap();
        let (rows, h, kk) = (5usize, 1280usize, 3usize);
        let x = rand_bf16(&[rows, h], 2.0, 1);
        let d = rand_bf16(&[rows, h], 1.0, 2);
        let w = rand_bf16(&[h], 1.5, 3);
        let slots = rand(&[rows * kk, h], 1.0, 4);
        let sw = rand(&[rows * kk], 1.0, 5);
        // the reference of mode 2: the weighted sum in f32, rounded to bf16, then the bf16 add
        let combined = slots
            .reshape((rows, kk, h))
            .unwrap()
            .broadcast_mul(&sw.reshape((rows, kk, 1)).unwrap())
            .unwrap()
            .sum(1)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let cases: Vec<(&str, Tensor, Tensor)> = vec![
            ("none", x.clone(), reference_norm(&x, &w, 1e-6)),
            ("rows", (&x + &d).unwrap(), reference_norm(&(&x + &d).unwrap(), &w, 1e-6)),
            ("slots", (&x + &combined).unwrap(), reference_norm(&(&x + &combined).unwrap(), &w, 1e-6)),
        ];
        for (i, (name, want_resid, want_out)) in cases.into_iter().enumerate() {
            let gx = x.to_device(&dev).unwrap();
            let gd = d.to_device(&dev).unwrap();
            let gw = w.to_device(&dev).unwrap();
            let gs = slots.to_device(&dev).unwrap();
            let gsw = sw.to_device(&dev).unwrap();
            let out = Tensor::zeros((rows, h), DType::BF16, &dev).unwrap();
            let delta = match i {
                0 => Delta::None,
                1 => Delta::Rows(tensor_ptr::<bf16>(&gd).unwrap()),
                _ => Delta::Slots {
                    slot_out: tensor_ptr::<f32>(&gs).unwrap(),
                    w: tensor_ptr::<f32>(&gsw).unwrap(),
                    k: kk,
                },
            };
            k.add_rmsnorm(
                tensor_ptr::<bf16>(&gx).unwrap(),
                delta,
                tensor_ptr::<bf16>(&gw).unwrap(),
                tensor_ptr::<bf16>(&out).unwrap(),
                rows,
                h,
                1e-6,
            )
            .unwrap();
            let dr = max_diff(&gx, &want_resid);
            let dn = max_diff(&out, &want_out);
            eprintln!("add_rmsnorm {name}: max |resid diff| {dr:.3e}, max |out diff| {dn:.3e}");
            // one bf16 ulp of the largest values (|out| < 8): 2^-5
            assert!(dr <= 1.6e-2 && dn <= 3.2e-2, "{name}: resid {dr}, out {dn}");
        }
    }

    /// `norm_linear` gives what `add_rmsnorm` then `linear` give, bit for bit, in every mode,
    /// for a row held in registers (1280) and one that is not (2048), an output count that is
    /// not a multiple of the block's 8; it refuses a hidden size it cannot hold and an in-place
    /// residual.
    #[test]
    fn norm_linear_equals_add_rmsnorm_then_linear() {
        let (dev, cd) = device();
        let mut k = Kernels::load(&cd).unwrap();
        let kk = 3usize;
        let p = |t: &Tensor| tensor_ptr::<bf16>(t).unwrap();
        let pf = |t: &Tensor| tensor_ptr::<f32>(t).unwrap();
        for (rows_per_warp, h, out) in [(4, 1280usize, 3840usize), (4, 2048, 100), (2, 1280, 100), (1, 1280, 100)] {
            k.norm_rows = rows_per_warp;
            let x = rand_bf16(&[1, h], 2.0, 41).to_device(&dev).unwrap();
            let d = rand_bf16(&[1, h], 1.0, 42).to_device(&dev).unwrap();
            let nw = rand_bf16(&[h], 1.5, 43).to_device(&dev).unwrap();
            let w = rand_bf16(&[out, h], 0.05, 44).to_device(&dev).unwrap();
            let slots = rand(&[kk, h], 1.0, 45).to_device(&dev).unwrap();
            let sw = rand(&[kk], 1.0, 46).to_device(&dev).unwrap();
            let deltas = [
                ("none", Delta::None),
                ("rows", Delta::Rows(p(&d))),
                ("slots", Delta::Slots { slot_out: pf(&slots), w: pf(&sw), k: kk }),
            ];
            for (name, delta) in deltas {
                // two launches, the residual in place on a copy
                let r2 = x.copy().unwrap();
                let normed = Tensor::zeros((1, h), DType::BF16, &dev).unwrap();
                let want = Tensor::zeros((1, out), DType::BF16, &dev).unwrap();
                k.add_rmsnorm(p(&r2), delta, p(&nw), p(&normed), 1, h, 1e-6).unwrap();
                k.linear_kernel(p(&normed), p(&w), p(&want), 1, h, out).unwrap();
                // one launch
                let r1 = x.copy().unwrap();
                let r1_out = x.copy().unwrap();
                let y = Tensor::zeros((1, out), DType::BF16, &dev).unwrap();
                k.norm_linear(p(&r1), p(&r1_out), delta, p(&nw), 1e-6, p(&w), p(&y), h, out).unwrap();
                let (dy, dr, dx) = (max_diff(&y, &want), max_diff(&r1_out, &r2), max_diff(&r1, &x));
                eprintln!("norm_linear {rows_per_warp} a warp, h {h} out {out} {name}: |y diff| {dy:.3e}, |resid diff| {dr:.3e}");
                assert_eq!((dy, dr, dx), (0.0, 0.0, 0.0), "{rows_per_warp} a warp, h {h} out {out} {name}");
                assert!(max_diff(&want, &Tensor::zeros((1, out), DType::BF16, &dev).unwrap()) > 0.0);
            }
            // refused: the residual in place (the other blocks still read it)
            let e = k.norm_linear(p(&x), p(&x), Delta::Rows(p(&d)), p(&nw), 1e-6, p(&w), p(&d), h, out);
            assert!(e.unwrap_err().to_string().contains("resid_out"));
        }
        let x = rand_bf16(&[1, 4096], 1.0, 47).to_device(&dev).unwrap();
        for h in [1284usize, 4096] {
            let e = k.norm_linear(p(&x), p(&x), Delta::None, p(&x), 1e-6, p(&x), p(&x), h, 8);
            assert!(e.unwrap_err().to_string().contains("hidden size"), "{h}");
        }
        assert!(k.norm_linear_fits(1, 1280) && !k.norm_linear_fits(2, 1280) && !k.norm_linear_fits(1, 4096));
        k.norm_rows = 0;
        assert!(!k.norm_linear_fits(1, 1280));
    }

    #[test]
    fn embed_copies_the_rows_of_the_ids() {
        let (dev, cd) = device();
        let k = Kernels::load(&cd).unwrap();
        let table = rand_bf16(&[50, 64], 1.0, 9).to_device(&dev).unwrap();
        let ids = Tensor::new(&[3u32, 0, 49, 3], &dev).unwrap();
        let out = Tensor::zeros((4, 64), DType::BF16, &dev).unwrap();
        k.embed(
            tensor_ptr::<bf16>(&table).unwrap(),
            tensor_ptr::<u32>(&ids).unwrap(),
            tensor_ptr::<bf16>(&out).unwrap(),
            4,
            64,
        )
        .unwrap();
        let want = table.index_select(&ids, 0).unwrap();
        let diff = max_diff(&out, &want);
        eprintln!("embed: max |diff| {diff:.3e}");
        assert_eq!(diff, 0.0);
    }
}
