//! The fused MoE of the decode step, on the device end to end (no `.to_vec` of routing
//! decisions, no per-expert loop on the host): `moe_route` (MoEGate: scores, top-k, weights,
//! then the slots grouped by expert in the same launch), `moe_plan` (that grouping alone, for
//! the dense layer's fixed slots), `moe_gate_up` and `moe_down` (launched together by
//! [`Kernels::moe_experts`]; a grouped GEMM: each
//! chosen expert's weights read once for all of its slots; the shared experts and the dense MLP
//! run as fixed experts of the same kernels), the weighted sum in `add_rmsnorm`.
//! Reference: [`crate::model::decoder::moe`]'s `route` and `Mlp`.

use candle_core::Result;

use super::norm::Delta;
use super::{cfg, launch, Kernels};
use crate::model::config::{MoeConfig, ScoringFunc, TopkMethod};

/// How `moe_route` routes: the gate's parameters from the config.
#[derive(Debug, Clone, Copy)]
pub struct RouteParams {
    pub experts: usize,
    pub topk: usize,
    /// Fixed slots after the routed ones (the shared experts' pieces), weight 1.
    pub n_fixed: usize,
    method: i32,
    scoring: i32,
    n_group: usize,
    topk_group: usize,
    norm_topk: bool,
    scale: f32,
}

impl RouteParams {
    pub fn new(cfg: &MoeConfig, n_fixed: usize) -> Result<Self> {
        if cfg.n_routed_experts > 512 || cfg.num_experts_per_tok > 32 {
            candle_core::bail!("moe_route: at most 512 experts and top-32 are supported");
        }
        Ok(Self {
            experts: cfg.n_routed_experts,
            topk: cfg.num_experts_per_tok,
            n_fixed,
            method: match cfg.topk_method {
                TopkMethod::Greedy => 0,
                TopkMethod::GroupLimitedGreedy => 1,
                TopkMethod::NoauxTc => 2,
            },
            scoring: match cfg.scoring_func {
                ScoringFunc::Softmax => 0,
                ScoringFunc::Sigmoid => 1,
            },
            n_group: cfg.n_group.max(1),
            topk_group: cfg.topk_group.max(1),
            norm_topk: cfg.norm_topk_prob,
            scale: cfg.routed_scaling_factor as f32,
        })
    }

    /// Slots per row.
    pub fn k(&self) -> usize {
        self.topk + self.n_fixed
    }
}

impl Kernels {
    /// Routing of `rows` rows: `slot_expert` (i32) and `slot_w` (f32), `rows * k` each, then
    /// their plan into `g` (as [`Self::moe_plan`], over the routed and fixed experts), in one
    /// launch. `input`: the rows as normed, or the residual add and RMSNorm that make them
    /// (done in the same launch). `bias`: the noaux_tc correction (f32) or 0.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_route(
        &self,
        input: RouteInput,
        gate_w: u64,
        bias: u64,
        rows: usize,
        h: usize,
        p: &RouteParams,
        scratch: &RouteScratch,
        slot_expert: u64,
        slot_w: u64,
        g: &Groups,
    ) -> Result<()> {
        if h % 8 != 0 || p.experts + p.n_fixed > 1024 {
            candle_core::bail!("moe_route: hidden {h} must be a multiple of 8, at most 1024 experts with the fixed ones");
        }
        let (x, resid, delta, norm_w, eps, normed) = match input {
            RouteInput::Normed(x) => (x, 0, 0, 0, 0.0, 0),
            // the kernel holds a row of at most 2048 in shared memory, a thread per 8 columns
            RouteInput::AddNorm { resid, delta, weight, normed, eps } if h > 2048 => {
                self.add_rmsnorm(resid, Delta::Rows(delta), weight, normed, rows, h, eps)?;
                (normed, 0, 0, 0, 0.0, 0)
            }
            RouteInput::AddNorm { resid, delta, weight, normed, eps } => (0, resid, delta, weight, eps, normed),
        };
        launch!(
            self,
            self.moe_route,
            // a warp per expert's gate row, 8 per block; one more that publishes the normed rows
            cfg((rows as u32, (p.experts.div_ceil(8) + usize::from(p.n_fixed > 0)) as u32, 1), 256, 0),
            x, resid, delta, norm_w, eps as f32, normed, gate_w, bias, h as i32,
            p.experts as i32, p.topk as i32, p.n_fixed as i32, p.method, p.scoring,
            p.n_group as i32, p.topk_group as i32, p.norm_topk as i32, p.scale, scratch.logits,
            scratch.done, slot_expert, slot_w, (p.experts + p.n_fixed) as i32, g.offsets, g.list, g.active,
            g.n_active,
            // nobody waits for the rows without fixed experts
            if p.n_fixed > 0 { g.ready } else { 0 }
        )
    }

    /// Groups `n_slots` slots by expert (`offsets` `(e_total + 1)`, `list` `(n_slots)`, i32) and
    /// lists the experts that have slots (`active` `(e_total)`, `n_active` `(1)`, i32); counts
    /// `rows` rows ready for the fixed experts (`g.ready`: the rows are complete when it runs).
    pub fn moe_plan(&self, slot_expert: u64, n_slots: usize, e_total: usize, rows: usize, g: &Groups) -> Result<()> {
        launch!(
            self,
            self.moe_plan,
            cfg((1, 1, 1), 1024, (e_total * 4) as u32),
            slot_expert, n_slots as i32, e_total as i32, g.offsets, g.list, g.active, g.n_active,
            rows as i32, g.ready
        )
    }

    /// The grouped MLP of every slot of every expert, by the plan in `g`:
    /// `act[slot] = silu(gate x) * (up x)` (`moe_gate_up`), then `slot_out[slot] = down(act[slot])`
    /// (f32, rounded to bf16; `moe_down`). Follows `moe_route` or `moe_plan` on the same `g`
    /// (the fixed experts wait for the rows they count). The two launches stay together:
    /// `moe_down` reads the plan before it waits for `moe_gate_up` (see the kernel), which only
    /// holds when the plan was written before `moe_gate_up` began.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_experts(
        &self,
        w: &ExpertWeights,
        x: u64,
        g: &Groups,
        n_slots: usize,
        k: usize,
        h: usize,
        act: u64,
        slot_out: u64,
    ) -> Result<()> {
        let (e_total, inter) = (w.e_total, w.inter);
        if h % 8 != 0 || inter % 8 != 0 {
            candle_core::bail!("moe kernels: hidden {h} and intermediate {inter} must be multiples of 8");
        }
        if w.fixed > e_total.min(n_slots) {
            candle_core::bail!("moe kernels: {} fixed experts of {e_total} for {n_slots} slots", w.fixed);
        }
        if k == 0 || n_slots % k != 0 {
            candle_core::bail!("moe kernels: {n_slots} slots are not rows of {k}");
        }
        // one row: every expert has at most one slot (its chosen experts are distinct)
        let (gate_up, down) = if n_slots == k {
            (&self.moe_gate_up_one, &self.moe_down_one)
        } else {
            (&self.moe_gate_up, &self.moe_down)
        };
        launch!(
            self,
            *gate_up,
            // a warp per intermediate row, 8 per block; the fixed experts' blocks first (y)
            cfg((inter.div_ceil(8) as u32, e_total.min(n_slots) as u32, 1), 256, 0),
            w.gate, w.up, x, g.offsets, g.list, g.active, g.n_active, k as i32, inter as i32,
            h as i32, e_total as i32, w.fixed as i32, (n_slots / k) as i32, g.ready,
            g.fixed_done, act
        )?;
        launch!(
            self,
            *down,
            // a warp per 2 output rows (the kernel's RPW), 8 per block
            cfg((e_total.min(n_slots) as u32, h.div_ceil(8 * 2) as u32, 1), 256, 0),
            w.down, act, g.offsets, g.list, g.active, g.n_active, inter as i32, h as i32, slot_out
        )
    }
}

/// One MoE layer's stacked expert weights (device addresses, bf16): gate and up
/// `(e_total, inter, h)`, down `(e_total, h, inter)`. The last `fixed` experts (the shared
/// experts' pieces, the dense MLP) have slots in every row and start before the plan is known,
/// on the rows counted into `Groups::ready`: `fixed` must be the `n_fixed` of the `moe_route`
/// that made the plan (1 after `moe_plan`, which counts its rows too), or they wait for rows that
/// never come (the kernel traps after a second: a launch error, not a hang).
#[derive(Debug, Clone, Copy)]
pub struct ExpertWeights {
    pub gate: u64,
    pub up: u64,
    pub down: u64,
    pub e_total: usize,
    pub inter: usize,
    pub fixed: usize,
}

/// What `moe_route` routes (device addresses, `(rows, h)` bf16).
#[derive(Debug, Clone, Copy)]
pub enum RouteInput {
    /// The rows as they are (already normed).
    Normed(u64),
    /// `resid += delta` (rounded to bf16), `normed = RMSNorm(resid) * weight`, as
    /// [`Kernels::add_rmsnorm`] with [`Delta::Rows`]; the routing reads `normed`.
    AddNorm { resid: u64, delta: u64, weight: u64, normed: u64, eps: f64 },
}

/// `moe_route`'s working memory (device addresses): `logits` `rows * experts` f32; `done`
/// `rows + 1` i32, zero when allocated (each launch leaves it zero again).
#[derive(Debug, Clone, Copy)]
pub struct RouteScratch {
    pub logits: u64,
    pub done: u64,
}

/// `moe_plan`'s output, read by the grouped kernels (device addresses of i32 arrays), and two
/// counters, zero when allocated (each layer leaves them zero again): `ready`, the rows
/// `moe_route` or `moe_plan` has made ready for the fixed experts (which `moe_gate_up` starts on
/// while the routing still runs), and `fixed_done`, the fixed experts' blocks that are done.
#[derive(Debug, Clone, Copy)]
pub struct Groups {
    pub offsets: u64,
    pub list: u64,
    pub active: u64,
    pub n_active: u64,
    pub ready: u64,
    pub fixed_done: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::decoder::moe::{route, Mlp};
    use crate::model::kernels::testutil::*;
    use crate::model::kernels::{tensor_ptr, Kernels};
    use candle_core::{DType, Device, Module, Tensor};
    use half::bf16;

    fn moe_cfg(method: TopkMethod, scoring: ScoringFunc) -> MoeConfig {
        MoeConfig {
            n_routed_experts: 16,
            num_experts_per_tok: 4,
            moe_intermediate_size: 96,
            n_shared_experts: Some(2),
            topk_method: method,
            n_group: 4,
            topk_group: 2,
            norm_topk_prob: method != TopkMethod::Greedy,
            routed_scaling_factor: if method == TopkMethod::Greedy { 1.0 } else { 2.5 },
            scoring_func: scoring,
            first_k_dense_replace: 0,
            moe_layer_freq: 1,
        }
    }

    /// The routing kernel against `moe::route` on the same f32 scores, every method; greedy also
    /// with 160 experts (a warp's gate rows in two turns) over rows too wide to stay in
    /// registers (1536 columns).
    #[test]
    fn moe_route_matches_route() {
        let (dev, cd) = device();
        let k = Kernels::load(&cd).unwrap();
        let rows = 33usize;
        // one scratch for the three launches: each must leave its counters at zero
        let logits = Tensor::zeros(rows * 160, DType::F32, &dev).unwrap();
        let done = Tensor::zeros(rows + 1, DType::U32, &dev).unwrap();
        let scratch = RouteScratch { logits: tensor_ptr::<f32>(&logits).unwrap(), done: tensor_ptr::<u32>(&done).unwrap() };
        let groups = |n_slots: usize, e_total: usize| plan_buffers(&dev, n_slots, e_total);
        for (method, scoring, experts, h) in [
            (TopkMethod::Greedy, ScoringFunc::Softmax, 16, 256),
            (TopkMethod::GroupLimitedGreedy, ScoringFunc::Softmax, 16, 256),
            (TopkMethod::NoauxTc, ScoringFunc::Sigmoid, 16, 256),
            (TopkMethod::Greedy, ScoringFunc::Softmax, 160, 1536),
        ] {
            let c = MoeConfig { n_routed_experts: experts, ..moe_cfg(method, scoring) };
            let e_total = experts + 2;
            let p = RouteParams::new(&c, 2).unwrap();
            let x = rand_bf16(&[rows, h], 1.0, 21);
            let gw = rand_bf16(&[c.n_routed_experts, h], 0.2, 22);
            let bias = rand(&[c.n_routed_experts], 0.05, 23);
            let logits = x.to_dtype(DType::F32).unwrap().matmul(&gw.to_dtype(DType::F32).unwrap().t().unwrap()).unwrap();
            let scores: Vec<Vec<f32>> = match scoring {
                ScoringFunc::Softmax => candle_nn::ops::softmax_last_dim(&logits).unwrap(),
                ScoringFunc::Sigmoid => candle_nn::ops::sigmoid(&logits).unwrap(),
            }
            .to_vec2()
            .unwrap();
            let bias_v: Vec<f32> = bias.to_vec1().unwrap();
            let (gx, ggw, gb) = (x.to_device(&dev).unwrap(), gw.to_device(&dev).unwrap(), bias.to_device(&dev).unwrap());
            let se = Tensor::zeros(rows * p.k(), DType::U32, &dev).unwrap(); // holds i32s
            let sw = Tensor::zeros(rows * p.k(), DType::F32, &dev).unwrap();
            let (plan, g) = groups(rows * p.k(), e_total);
            k.moe_route(
                RouteInput::Normed(tensor_ptr::<bf16>(&gx).unwrap()),
                tensor_ptr::<bf16>(&ggw).unwrap(),
                if method == TopkMethod::NoauxTc { tensor_ptr::<f32>(&gb).unwrap() } else { 0 },
                rows,
                h,
                &p,
                &scratch,
                tensor_ptr::<u32>(&se).unwrap(),
                tensor_ptr::<f32>(&sw).unwrap(),
                &g,
            )
            .unwrap();
            // the plan made in the same launch is the one moe_plan makes of the slots
            let (alone, ga) = groups(rows * p.k(), e_total);
            k.moe_plan(tensor_ptr::<u32>(&se).unwrap(), rows * p.k(), e_total, rows, &ga).unwrap();
            for (i, what) in [(0, "offsets"), (2, "active"), (3, "n_active")] {
                let (a, b): (Vec<u32>, Vec<u32>) = (plan[i].to_vec1().unwrap(), alone[i].to_vec1().unwrap());
                assert_eq!(a, b, "{method:?}: the route's {what} differ from moe_plan's");
            }
            let counters: Vec<u32> = done.to_vec1().unwrap();
            assert!(counters.iter().all(|&c| c == 0), "{method:?}: counters left at {counters:?}");
            let se: Vec<u32> = se.to_device(&Device::Cpu).unwrap().to_vec1().unwrap();
            let se: Vec<i32> = se.iter().map(|&v| v as i32).collect();
            let sw: Vec<f32> = sw.to_vec1().unwrap();
            let (mut same, mut worst) = (0usize, 0f32);
            for r in 0..rows {
                let (idx, w) = route(&scores[r], (method == TopkMethod::NoauxTc).then_some(bias_v.as_slice()), &c);
                let kk = p.k();
                let got: Vec<usize> = se[r * kk..r * kk + p.topk].iter().map(|&e| e as usize).collect();
                if got == idx {
                    same += 1;
                    for j in 0..p.topk {
                        worst = worst.max((sw[r * kk + j] - w[j]).abs());
                    }
                }
                assert_eq!(&se[r * kk + p.topk..(r + 1) * kk], &[experts as i32, experts as i32 + 1], "fixed slots");
                assert_eq!(&sw[r * kk + p.topk..(r + 1) * kk], &[1.0, 1.0], "fixed weights");
            }
            eprintln!("moe_route {method:?}/{scoring:?}, {experts} experts: {same}/{rows} rows choose the same experts, max |weight diff| {worst:.3e}");
            // the kernel's f32 gate logits may sum in another order: a near-tie can flip
            assert!(same >= rows - 1, "{method:?}: only {same}/{rows} rows agree");
            assert!(worst <= 1e-5, "{method:?}: weights differ by {worst}");
        }
    }

    /// The residual add and RMSNorm inside the routing launch against `add_rmsnorm` followed by
    /// routing the normed rows: the same residual, normed rows, slots and plan, to the bit;
    /// one row (no second counter) and several.
    #[test]
    fn moe_route_with_the_norm_matches_add_rmsnorm_then_route() {
        let (dev, cd) = device();
        let k = Kernels::load(&cd).unwrap();
        let pb = |t: &Tensor| tensor_ptr::<bf16>(t).unwrap();
        let pu = |t: &Tensor| tensor_ptr::<u32>(t).unwrap();
        let pf = |t: &Tensor| tensor_ptr::<f32>(t).unwrap();
        // one row (also at the model's 64 experts of 1280) and several
        for (rows, h, e, topk) in [(1usize, 256usize, 16usize, 4usize), (1, 1280, 64, 6), (5, 256, 16, 4)] {
            let mut c = moe_cfg(TopkMethod::Greedy, ScoringFunc::Softmax);
            (c.n_routed_experts, c.num_experts_per_tok) = (e, topk);
            let p = RouteParams::new(&c, 2).unwrap();
            let kk = p.k();
            let gw = rand_bf16(&[e, h], 0.2, 31).to_device(&dev).unwrap();
            let weight = rand_bf16(&[h], 1.0, 32).to_device(&dev).unwrap();
            let resid = rand_bf16(&[rows, h], 1.0, 33 + rows as u64).to_device(&dev).unwrap();
            let delta = rand_bf16(&[rows, h], 1.0, 34 + rows as u64).to_device(&dev).unwrap();
            // each way: its own residual copy, normed rows, slots, plan and scratch
            let run = |fused: bool| {
                let z = |n: usize, dt| Tensor::zeros(n, dt, &dev).unwrap();
                let r = resid.copy().unwrap();
                let normed = Tensor::zeros((rows, h), DType::BF16, &dev).unwrap();
                let (se, sw) = (z(rows * kk, DType::U32), z(rows * kk, DType::F32));
                let (plan, g) = plan_buffers(&dev, rows * kk, e + 2);
                let (logits, done) = (z(rows * e, DType::F32), z(rows + 1, DType::U32));
                let scratch = RouteScratch { logits: pf(&logits), done: pu(&done) };
                let input = if fused {
                    RouteInput::AddNorm { resid: pb(&r), delta: pb(&delta), weight: pb(&weight), normed: pb(&normed), eps: 1e-6 }
                } else {
                    k.add_rmsnorm(pb(&r), Delta::Rows(pb(&delta)), pb(&weight), pb(&normed), rows, h, 1e-6).unwrap();
                    RouteInput::Normed(pb(&normed))
                };
                k.moe_route(input, pb(&gw), 0, rows, h, &p, &scratch, pu(&se), pf(&sw), &g).unwrap();
                let left: Vec<u32> = done.to_vec1().unwrap();
                assert!(left.iter().all(|&v| v == 0), "{rows} rows: counters left at {left:?}");
                // the route's plan (one row: made directly, plan_row) is moe_plan's of its slots
                let (again, ga) = plan_buffers(&dev, rows * kk, e + 2);
                k.moe_plan(pu(&se), rows * kk, e + 2, rows, &ga).unwrap();
                // (the order of several slots of one expert in `list` is the atomics')
                let compared: &[usize] = if rows == 1 { &[0, 1, 2, 3] } else { &[0, 2, 3] };
                for &i in compared {
                    assert_eq!(v_of(&plan[i]), v_of(&again[i]), "{rows} rows of {h}: plan part {i} differs from moe_plan's");
                }
                // the fixed experts' count of rows made (moe_gate_up would reset it)
                let ready: Vec<u32> = plan[4].to_vec1().unwrap();
                let plan: Vec<Vec<f32>> = [&plan[0], &plan[2], &plan[3]].iter().map(|t| v_of(t)).collect();
                (v_of(&r), v_of(&normed), v_of(&se), v_of(&sw), plan, ready[0])
            };
            let (fused, apart) = (run(true), run(false));
            let case = format!("{rows} rows of {h}, {e} experts");
            assert_eq!(fused.0, apart.0, "{case}: residuals differ");
            assert_eq!(fused.1, apart.1, "{case}: normed rows differ");
            assert_eq!(fused.2, apart.2, "{case}: chosen experts differ");
            assert_eq!(fused.3, apart.3, "{case}: weights differ");
            assert_eq!(fused.4, apart.4, "{case}: plans differ");
            assert_eq!((fused.5, apart.5), (rows as u32, rows as u32), "{case}: rows published");
            assert_ne!(fused.0, v_of(&resid), "{case}: the residual was not updated");
        }
    }

    /// Zeroed plan buffers for `n_slots` slots over `e_total` experts (offsets, list, active,
    /// n_active, the two counters) and their [`Groups`].
    fn plan_buffers(dev: &Device, n_slots: usize, e_total: usize) -> ([Tensor; 5], Groups) {
        let t = |n| Tensor::zeros(n, DType::U32, dev).unwrap();
        let ts = [t(e_total + 1), t(n_slots), t(e_total), t(1), t(2)];
        let p = |i: usize| tensor_ptr::<u32>(&ts[i]).unwrap();
        let g = Groups {
            offsets: p(0),
            list: p(1),
            active: p(2),
            n_active: p(3),
            ready: p(4),
            fixed_done: p(4) + 4,
        };
        (ts, g)
    }

    /// A tensor's values as f32 (u32 indices are exact below 2^24).
    fn v_of(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Routing, plan, the grouped gate/up and down and the weighted sum (add_rmsnorm mode 2,
    /// checked here through its residual) against `Mlp` per chosen expert plus the shared
    /// experts, for one row (decode) and 40 rows (prefill, several slots per expert).
    #[test]
    fn grouped_moe_matches_the_experts() {
        let (dev, cd) = device();
        let k = Kernels::load(&cd).unwrap();
        let c = moe_cfg(TopkMethod::Greedy, ScoringFunc::Softmax);
        let (h, inter, e) = (256usize, c.moe_intermediate_size, c.n_routed_experts);
        let n_shared = 2;
        let p = RouteParams::new(&c, n_shared).unwrap();
        let kk = p.k();
        let e_total = e + n_shared;
        // experts' weights; the shared MLP (intermediate 2*inter) is split into two fixed experts
        let mut tensors = std::collections::HashMap::new();
        for i in 0..e {
            for (name, shape) in [("gate_proj", [inter, h]), ("up_proj", [inter, h]), ("down_proj", [h, inter])] {
                tensors.insert(format!("experts.{i}.{name}.weight"), rand_bf16(&shape, 0.1, (i * 3 + name.len()) as u64));
            }
        }
        for (name, shape) in [("gate_proj", [2 * inter, h]), ("up_proj", [2 * inter, h]), ("down_proj", [h, 2 * inter])] {
            tensors.insert(format!("shared_experts.{name}.weight"), rand_bf16(&shape, 0.1, 1000 + name.len() as u64));
        }
        let gw = rand_bf16(&[e, h], 0.3, 77);
        let stack = |rows: Vec<Tensor>| Tensor::cat(&rows, 0).unwrap();
        let mut g = vec![];
        let mut u = vec![];
        let mut d = vec![];
        for i in 0..e {
            g.push(tensors[&format!("experts.{i}.gate_proj.weight")].clone());
            u.push(tensors[&format!("experts.{i}.up_proj.weight")].clone());
            d.push(tensors[&format!("experts.{i}.down_proj.weight")].clone());
        }
        for s in 0..n_shared {
            g.push(tensors["shared_experts.gate_proj.weight"].narrow(0, s * inter, inter).unwrap());
            u.push(tensors["shared_experts.up_proj.weight"].narrow(0, s * inter, inter).unwrap());
            d.push(tensors["shared_experts.down_proj.weight"].narrow(1, s * inter, inter).unwrap().contiguous().unwrap());
        }
        let (wg, wu, wd) = (stack(g).to_device(&dev).unwrap(), stack(u).to_device(&dev).unwrap(), stack(d).to_device(&dev).unwrap());
        // the reference experts run on the GPU too (candle's CPU matmul has no bf16)
        let mlp = |name: &str, i: usize| {
            let vb = candle_nn::VarBuilder::from_tensors(tensors.clone(), DType::BF16, &dev);
            Mlp::new(h, i, vb.pp(name)).unwrap()
        };
        let shared = mlp("shared_experts", 2 * inter);
        for rows in [1usize, 40] {
            let x = rand_bf16(&[rows, h], 1.0, 5 + rows as u64);
            let resid = rand_bf16(&[rows, h], 1.0, 6 + rows as u64);
            // reference: route on f32 scores, experts' outputs in f32, weighted sum -> bf16, + shared
            let logits = x.to_dtype(DType::F32).unwrap().matmul(&gw.to_dtype(DType::F32).unwrap().t().unwrap()).unwrap();
            let scores: Vec<Vec<f32>> = candle_nn::ops::softmax_last_dim(&logits).unwrap().to_vec2().unwrap();
            let mut want = vec![];
            for r in 0..rows {
                let xr = x.narrow(0, r, 1).unwrap().to_device(&dev).unwrap();
                let (idx, w) = route(&scores[r], None, &c);
                let mut acc = Tensor::zeros((1, h), DType::F32, &dev).unwrap();
                for (&ei, &wi) in idx.iter().zip(&w) {
                    let o = mlp(&format!("experts.{ei}"), inter).forward(&xr).unwrap().to_dtype(DType::F32).unwrap();
                    acc = (acc + (o * wi as f64).unwrap()).unwrap();
                }
                let y = (acc.to_dtype(DType::BF16).unwrap() + shared.forward(&xr).unwrap()).unwrap();
                want.push((resid.narrow(0, r, 1).unwrap().to_device(&dev).unwrap() + y).unwrap());
            }
            let want = Tensor::cat(&want, 0).unwrap();
            // kernels
            let gx = x.to_device(&dev).unwrap();
            let gr = resid.to_device(&dev).unwrap();
            let ggw = gw.to_device(&dev).unwrap();
            let se = Tensor::zeros(rows * kk, DType::U32, &dev).unwrap();
            let sw = Tensor::zeros(rows * kk, DType::F32, &dev).unwrap();
            let offsets = Tensor::zeros(e_total + 1, DType::U32, &dev).unwrap();
            let list = Tensor::zeros(rows * kk, DType::U32, &dev).unwrap();
            let active = Tensor::zeros(e_total, DType::U32, &dev).unwrap();
            let n_active = Tensor::zeros(1, DType::U32, &dev).unwrap();
            let counters = Tensor::zeros(2, DType::U32, &dev).unwrap();
            let act = Tensor::zeros((rows * kk, inter), DType::BF16, &dev).unwrap();
            let so = Tensor::zeros((rows * kk, h), DType::F32, &dev).unwrap();
            let normed = Tensor::zeros((rows, h), DType::BF16, &dev).unwrap();
            let ones = Tensor::ones(h, DType::BF16, &dev).unwrap();
            let pb = |t: &Tensor| tensor_ptr::<bf16>(t).unwrap();
            let pu = |t: &Tensor| tensor_ptr::<u32>(t).unwrap();
            let pf = |t: &Tensor| tensor_ptr::<f32>(t).unwrap();
            let logits = Tensor::zeros(rows * e, DType::F32, &dev).unwrap();
            let done = Tensor::zeros(rows + 1, DType::U32, &dev).unwrap();
            let scratch = RouteScratch { logits: pf(&logits), done: pu(&done) };
            let g = Groups {
                offsets: pu(&offsets),
                list: pu(&list),
                active: pu(&active),
                n_active: pu(&n_active),
                ready: pu(&counters),
                fixed_done: pu(&counters) + 4,
            };
            let ns = rows * kk;
            k.moe_route(RouteInput::Normed(pb(&gx)), pb(&ggw), 0, rows, h, &p, &scratch, pu(&se), pf(&sw), &g).unwrap();
            let w = ExpertWeights { gate: pb(&wg), up: pb(&wu), down: pb(&wd), e_total, inter, fixed: n_shared };
            k.moe_experts(&w, pb(&gx), &g, ns, kk, h, pb(&act), pf(&so)).unwrap();
            let left: Vec<u32> = counters.to_vec1().unwrap();
            assert_eq!(left, [0, 0], "{rows} rows: the fixed experts' counters left at {left:?}");
            // one row: its 4 routed experts and the 2 shared pieces are all that run
            let na: Vec<u32> = n_active.to_vec1().unwrap();
            assert!(rows > 1 || na[0] == 6, "active experts for one row: {}", na[0]);
            k.add_rmsnorm(pb(&gr), Delta::Slots { slot_out: pf(&so), w: pf(&sw), k: kk }, pb(&ones), pb(&normed), rows, h, 1e-6).unwrap();
            let diff = max_diff(&gr, &want);
            let scale = want.to_dtype(DType::F32).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            eprintln!("grouped moe, {rows} rows: max |diff| {diff:.3e} (max |value| {scale:.2})");
            // the shared experts are summed as two pieces, each rounded to bf16: 2 ulps
            assert!(diff <= scale * 2f32.powi(-6), "{rows} rows: {diff}");
        }
    }
}
