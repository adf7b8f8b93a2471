//! The feed-forward blocks: `DeepseekV2MLP` (SiLU-gated, used dense, per expert and for the shared
//! experts) and `DeepseekV2MoE` with its `MoEGate` (softmax or sigmoid scores; greedy,
//! group-limited or noaux_tc top-k; `norm_topk_prob`; `routed_scaling_factor`).
//!
//! Owns: routing and the weighted sum of expert outputs (`moe_infer`). The routing decision is
//! made on the host from f32 scores: this is the reference path, kept simple to read; the fast
//! path's fused kernels are checked against it.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{linear_no_bias, Linear, VarBuilder};

use crate::model::config::{MoeConfig, ScoringFunc, TopkMethod};

/// `DeepseekV2MLP`: `down_proj(silu(gate_proj(x)) * up_proj(x))`.
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    span: tracing::Span,
}

impl Mlp {
    pub fn new(hidden: usize, intermediate: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            gate_proj: linear_no_bias(hidden, intermediate, vb.pp("gate_proj"))?,
            up_proj: linear_no_bias(hidden, intermediate, vb.pp("up_proj"))?,
            down_proj: linear_no_bias(intermediate, hidden, vb.pp("down_proj"))?,
            span: tracing::span!(tracing::Level::TRACE, "mlp"),
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        let g = self.gate_proj.forward(x)?.silu()?;
        self.down_proj.forward(&(g * self.up_proj.forward(x)?)?)
    }
}

/// Top-k indices of `v` by value, descending; ties keep the lower index first.
fn topk(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| {
        v[b].partial_cmp(&v[a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    idx.truncate(k);
    idx
}

/// `MoEGate.forward` for one token's f32 scores (after the scoring function): the chosen experts
/// and their weights (normalised and scaled).
pub fn route(scores: &[f32], bias: Option<&[f32]>, cfg: &MoeConfig) -> (Vec<usize>, Vec<f32>) {
    let k = cfg.num_experts_per_tok;
    let e = scores.len();
    let group_mask = |choice: &[f32], group_score: &dyn Fn(&[f32]) -> f32| -> Vec<f32> {
        let per = e / cfg.n_group;
        let gs: Vec<f32> = choice.chunks(per).map(group_score).collect();
        let keep = topk(&gs, cfg.topk_group);
        // tmp_scores = scores.masked_fill(~score_mask.bool(), 0.0)
        choice
            .iter()
            .enumerate()
            .map(|(i, &s)| if keep.contains(&(i / per)) { s } else { 0.0 })
            .collect()
    };
    let (idx, mut w): (Vec<usize>, Vec<f32>) = match cfg.topk_method {
        TopkMethod::Greedy => {
            let idx = topk(scores, k);
            let w = idx.iter().map(|&i| scores[i]).collect();
            (idx, w)
        }
        TopkMethod::GroupLimitedGreedy => {
            // group_scores = scores.view(n, n_group, -1).max(dim=-1).values
            let tmp = group_mask(scores, &|g: &[f32]| {
                g.iter().cloned().fold(f32::NEG_INFINITY, f32::max)
            });
            let idx = topk(&tmp, k);
            let w = idx.iter().map(|&i| tmp[i]).collect();
            (idx, w)
        }
        TopkMethod::NoauxTc => {
            // scores_for_choice = scores + e_score_correction_bias; groups by the sum of their top 2
            let choice: Vec<f32> = match bias {
                Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
                None => scores.to_vec(),
            };
            let tmp = group_mask(&choice, &|g: &[f32]| topk(g, 2).iter().map(|&i| g[i]).sum());
            let idx = topk(&tmp, k);
            // topk_weight = scores.gather(1, topk_idx)
            let w = idx.iter().map(|&i| scores[i]).collect();
            (idx, w)
        }
    };
    let scale = cfg.routed_scaling_factor as f32;
    if k > 1 && cfg.norm_topk_prob {
        // topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20) * routed_scaling_factor
        let denom: f32 = w.iter().sum::<f32>() + 1e-20;
        w.iter_mut().for_each(|x| *x = *x / denom * scale);
    } else {
        w.iter_mut().for_each(|x| *x *= scale);
    }
    (idx, w)
}

/// `DeepseekV2MoE` (inference path).
pub struct Moe {
    experts: Vec<Mlp>,
    gate_weight: Tensor,
    e_score_correction_bias: Option<Vec<f32>>,
    shared_experts: Option<Mlp>,
    cfg: MoeConfig,
    span: tracing::Span,
}

impl Moe {
    pub fn new(hidden: usize, cfg: &MoeConfig, vb: VarBuilder) -> Result<Self> {
        let experts = (0..cfg.n_routed_experts)
            .map(|i| {
                Mlp::new(
                    hidden,
                    cfg.moe_intermediate_size,
                    vb.pp(format!("experts.{i}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let gate = vb.pp("gate");
        let e_score_correction_bias = if cfg.topk_method == TopkMethod::NoauxTc {
            Some(
                gate.get(cfg.n_routed_experts, "e_score_correction_bias")?
                    .to_dtype(DType::F32)?
                    .to_vec1()?,
            )
        } else {
            None
        };
        let shared_experts = match cfg.n_shared_experts {
            // intermediate_size = config.moe_intermediate_size * config.n_shared_experts
            Some(n) => Some(Mlp::new(
                hidden,
                cfg.moe_intermediate_size * n,
                vb.pp("shared_experts"),
            )?),
            None => None,
        };
        Ok(Self {
            experts,
            gate_weight: gate.get((cfg.n_routed_experts, hidden), "weight")?,
            e_score_correction_bias,
            shared_experts,
            cfg: cfg.clone(),
            span: tracing::span!(tracing::Level::TRACE, "moe"),
        })
    }

    /// f32 routing scores `(n, experts)`: `F.linear(h.float(), weight.float())` then softmax/sigmoid.
    pub fn scores(&self, x: &Tensor) -> Result<Tensor> {
        let logits = x
            .to_dtype(DType::F32)?
            .matmul(&self.gate_weight.to_dtype(DType::F32)?.t()?)?;
        match self.cfg.scoring_func {
            ScoringFunc::Softmax => candle_nn::ops::softmax_last_dim(&logits),
            ScoringFunc::Sigmoid => candle_nn::ops::sigmoid(&logits),
        }
    }
}

impl Moe {
    /// The routing of each row of `x` `(n, hidden)`: expert ids and weights, as `MoEGate`
    /// returns `topk_idx`, `topk_weight` (the verifier compares them with the golden's).
    pub fn route_rows(&self, x: &Tensor) -> Result<Vec<(Vec<usize>, Vec<f32>)>> {
        let scores: Vec<Vec<f32>> = self.scores(x)?.to_vec2()?;
        Ok(scores
            .iter()
            .map(|s| route(s, self.e_score_correction_bias.as_deref(), &self.cfg))
            .collect())
    }
}

impl Module for Moe {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        let (b, t, h) = x.dims3()?;
        let flat = x.reshape((b * t, h))?;
        // Per expert: which tokens, with which weight.
        let mut per_expert: Vec<(Vec<u32>, Vec<f32>)> = vec![(vec![], vec![]); self.experts.len()];
        for (tok, (idx, w)) in self.route_rows(&flat)?.into_iter().enumerate() {
            for (e, w) in idx.into_iter().zip(w) {
                per_expert[e].0.push(tok as u32);
                per_expert[e].1.push(w);
            }
        }
        // final_out = sum_k expert_k(x) * topk_weight_k, accumulated in f32 then cast back.
        let mut y = Tensor::zeros((b * t, h), DType::F32, x.device())?;
        for (e, (toks, ws)) in per_expert.iter().enumerate() {
            if toks.is_empty() {
                continue;
            }
            let ids = Tensor::new(toks.as_slice(), x.device())?;
            let out = self.experts[e]
                .forward(&flat.index_select(&ids, 0)?)?
                .to_dtype(DType::F32)?;
            let w = Tensor::new(ws.as_slice(), x.device())?.unsqueeze(1)?;
            y = y.index_add(&ids, &out.broadcast_mul(&w)?, 0)?;
        }
        let mut y = y.to_dtype(x.dtype())?.reshape((b, t, h))?;
        if let Some(shared) = &self.shared_experts {
            y = (y + shared.forward(x)?)?;
        }
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(
        method: TopkMethod,
        k: usize,
        n_group: usize,
        topk_group: usize,
        norm: bool,
        scale: f64,
    ) -> MoeConfig {
        MoeConfig {
            n_routed_experts: 8,
            num_experts_per_tok: k,
            moe_intermediate_size: 4,
            n_shared_experts: None,
            topk_method: method,
            n_group,
            topk_group,
            norm_topk_prob: norm,
            routed_scaling_factor: scale,
            scoring_func: ScoringFunc::Softmax,
            first_k_dense_replace: 0,
            moe_layer_freq: 1,
        }
    }

    const S: [f32; 8] = [0.05, 0.30, 0.02, 0.08, 0.20, 0.15, 0.12, 0.08];

    #[test]
    fn greedy_takes_the_best_scores_and_scales() {
        let (idx, w) = route(&S, None, &cfg(TopkMethod::Greedy, 2, 1, 1, false, 2.0));
        assert_eq!(idx, vec![1, 4]);
        assert_eq!(w, vec![0.60, 0.40]);
    }

    #[test]
    fn norm_topk_prob_normalises_before_scaling() {
        let (_, w) = route(&S, None, &cfg(TopkMethod::Greedy, 2, 1, 1, true, 1.0));
        assert!(
            (w[0] - 0.6).abs() < 1e-6 && (w[1] - 0.4).abs() < 1e-6,
            "{w:?}"
        );
    }

    #[test]
    fn group_limited_greedy_stays_inside_the_best_groups() {
        // 4 groups of 2: maxima 0.30, 0.08, 0.20, 0.12 -> groups 0 and 2 -> experts {0,1,4,5}
        let (idx, _) = route(
            &S,
            None,
            &cfg(TopkMethod::GroupLimitedGreedy, 3, 4, 2, false, 1.0),
        );
        assert_eq!(idx, vec![1, 4, 5]);
    }

    #[test]
    fn noaux_tc_chooses_with_bias_but_weighs_without() {
        let bias = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0];
        let (idx, w) = route(
            &S,
            Some(&bias),
            &cfg(TopkMethod::NoauxTc, 1, 1, 1, false, 1.0),
        );
        assert_eq!(idx, vec![6]);
        assert_eq!(w, vec![0.12]);
    }
}
