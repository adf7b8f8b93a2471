//! `embed` (token rows) and `add_rmsnorm` (the residual add fused with the next RMSNorm; the
//! MoE's weighted sum of expert outputs folded in). Reference: `DeepseekV2RMSNorm` as
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
        let (mode, d, so, sw, k) = match delta {
            Delta::None => (0i32, 0u64, 0u64, 0u64, 0i32),
            Delta::Rows(p) => (1, p, 0, 0, 0),
            Delta::Slots { slot_out, w, k } => (2, 0, slot_out, w, k as i32),
        };
        launch!(
            self,
            self.add_rmsnorm,
            // a thread per 8 columns, whole warps
            cfg((rows as u32, 1, 1), (h / 8).div_ceil(32) as u32 * 32, 0),
            resid, d, so, sw, k, mode, weight, out, h as i32, eps as f32
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
