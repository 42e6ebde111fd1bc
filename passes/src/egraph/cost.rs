//! The cost model: an estimated run time per op on a target, from the bytes it moves and the
//! flops it does (a roofline: whichever bound is slower), plus a fixed cost per kernel launch.
//!
//! Symbolic dimensions are evaluated at the two regimes an artifact runs: one prefill chunk and
//! one decode step ([`CostModel::bindings`]); an op's cost is the sum over them. Compute is
//! divided among the workers the op can keep busy (its independent work items, modelled after
//! the CPU kernels: matmul rows in blocks of 4 and columns in chunks of 64, one item per row for
//! row-wise ops), so that narrow ops are charged for idle workers. Memory bandwidth is shared.
//!
//! Values that need no kernel cost nothing: leaves, attributes, `reshape` (a view of the same
//! buffer) and a `concat` of weights or consts (materialized at compile time). A new target is a
//! new [`Target`] row.

use llmc_ir::{Bindings, Op, TensorType, UnaryOp};

/// Threads the `cpu` target assumes unless told otherwise.
pub const CPU_WORKERS: usize = 8;

/// Throughput figures of one target. Deliberately coarse: only ratios between alternatives matter.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub name: &'static str,
    /// Workers (CPU threads, GPU SMs) a kernel can be split across.
    pub workers: usize,
    /// f32 flop/s of one worker.
    pub flops_per_worker: f64,
    /// Memory bandwidth in bytes/s, shared by all workers.
    pub bytes_per_s: f64,
    /// Seconds per kernel launch (dispatch, synchronisation).
    pub launch_s: f64,
    /// Matmul work-item tile `(rows, columns)` the target's kernels split work into.
    pub matmul_tile: (usize, usize),
}

impl Target {
    /// The Cranelift x86-64 backend: `workers` threads, f32x4 FMA kernels, one pool barrier per
    /// kernel. The default is [`CPU_WORKERS`], not this machine's parallelism, so that a compile
    /// gives the same artifact on every host.
    pub fn cpu(workers: Option<usize>) -> Target {
        let workers = workers.unwrap_or(CPU_WORKERS).max(1);
        Target { name: "cpu", workers, flops_per_worker: 8e9, bytes_per_s: 12e9, launch_s: 2e-6, matmul_tile: (4, 64) }
    }

    /// A data-centre GPU (H100-class): the costs `optimize` uses for `--target cuda`.
    pub fn cuda() -> Target {
        Target {
            name: "cuda",
            workers: 132,
            flops_per_worker: 3.5e11,
            bytes_per_s: 3.0e12,
            launch_s: 4e-6,
            matmul_tile: (64, 64),
        }
    }

    /// The target named `name` (`cpu`, `cuda`).
    pub fn by_name(name: &str) -> Option<Target> {
        match name {
            "cpu" => Some(Target::cpu(None)),
            "cuda" => Some(Target::cuda()),
            _ => None,
        }
    }
}

/// A target plus the step shapes at which costs are evaluated.
#[derive(Clone, Debug, PartialEq)]
pub struct CostModel {
    pub target: Target,
    /// Each binding is one step the artifact runs; an op costs the sum over them.
    pub bindings: Vec<Bindings>,
}

impl CostModel {
    /// `target` at a 512-token prefill chunk and a decode step with 511 tokens cached.
    pub fn new(target: Target) -> CostModel {
        CostModel { target, bindings: vec![Bindings { s: 512, p: 0 }, Bindings { s: 1, p: 511 }] }
    }

    /// A one-line description for reports.
    pub fn describe(&self) -> String {
        let t = &self.target;
        let b: Vec<String> = self.bindings.iter().map(|b| format!("S={},P={}", b.s, b.p)).collect();
        format!(
            "target {} ({} workers x {:.1} GFLOP/s, {:.1} GB/s, {:.1} us per kernel) at {}",
            t.name,
            t.workers,
            t.flops_per_worker / 1e9,
            t.bytes_per_s / 1e9,
            t.launch_s * 1e6,
            b.join(" + ")
        )
    }

    /// Estimated seconds for `op` with operand types `ins` and result `out`; `static_ins[i]` says
    /// operand `i` is known at compile time.
    pub fn op_cost(&self, op: &Op, ins: &[&TensorType], out: &TensorType, static_ins: &[bool]) -> f64 {
        self.bindings.iter().map(|&b| self.op_cost_at(op, ins, out, static_ins, b)).sum()
    }

    fn op_cost_at(&self, op: &Op, ins: &[&TensorType], out: &TensorType, static_ins: &[bool], b: Bindings) -> f64 {
        let t = &self.target;
        let n = |x: &TensorType| x.numel(b) as f64;
        let nout = n(out);
        let nin: f64 = ins.iter().map(|x| n(x)).sum();
        let rows = |x: &TensorType| {
            let last = x.shape.last().map_or(1, |d| d.eval(b)).max(1);
            (x.numel(b) / last).max(1) as f64
        };
        // (flops, bytes, parallel work items)
        let (flops, bytes, items) = match op {
            Op::Input { .. } | Op::Weight { .. } | Op::Const { .. } | Op::Reshape => return 0.0,
            Op::Concat { .. } if static_ins.iter().all(|&s| s) => return 0.0,
            Op::Positions => (0.0, 4.0 * nout, 1.0),
            Op::Gather => (0.0, 4.0 * (n(ins[1]) + 2.0 * nout), rows(out)),
            Op::Unary(u) => (unary_flops(*u) * nout, 4.0 * (nin + nout), rows(out)),
            Op::Binary(_) => (nout, 4.0 * (nin + nout), rows(out)),
            Op::Reduce(_) => (nin, 4.0 * (nin + nout), rows(out)),
            Op::Softmax => (12.0 * nout, 4.0 * (2.0 * nin + nout), rows(out)),
            Op::Matmul { .. } => {
                let (m, k, nn, batch) = mm_dims(ins[0], out, b);
                let items = batch * div_up(m, t.matmul_tile.0) * div_up(nn, t.matmul_tile.1);
                (2.0 * batch * m * nn * k, 4.0 * (nin + nout), items)
            }
            Op::Linear { act, .. } => {
                let (m, k, nn, _) = mm_dims(ins[0], out, b);
                let items = div_up(m, t.matmul_tile.0) * div_up(nn, t.matmul_tile.1);
                let epi = act.map_or(0.0, unary_flops) * nout;
                (2.0 * m * nn * k + epi, 4.0 * (nin + nout), items)
            }
            Op::GatedLinear { act } => {
                let k = ins[0].shape.last().map_or(1, |d| d.eval(b)) as f64;
                let (m, nn) = (rows(out), out.shape.last().map_or(1, |d| d.eval(b)) as f64);
                let items = div_up(m, t.matmul_tile.0) * div_up(nn, t.matmul_tile.1);
                (4.0 * m * nn * k + (unary_flops(*act) + 1.0) * nout, 4.0 * (nin + nout), items)
            }
            Op::Moe { top_k, act } => {
                // Router over all experts, then `top_k` experts' gate/up and down per row; the
                // expert weights read are those of the experts some row chose (at most all).
                let (r, e) = (rows(out), ins[1].shape[0].eval(b) as f64);
                let (h, i) = (ins[1].shape[1].eval(b) as f64, ins[3].shape[2].eval(b) as f64);
                let k = *top_k as f64;
                let flops = r * (2.0 * e * h + k * (6.0 * i * h + (unary_flops(*act) + 1.0) * i));
                let experts = (r * k).min(e) / e.max(1.0);
                (flops, 4.0 * (n(ins[0]) + n(ins[1]) + experts * (n(ins[2]) + n(ins[3])) + nout), r)
            }
            Op::Attention { window, causal, .. } => {
                let (s, nh, d) = (b.s as f64, ins[0].shape[1].eval(b) as f64, ins[0].shape[2].eval(b) as f64);
                let visible = if *causal { visible_keys(b, *window) } else { s * ins[1].shape[0].eval(b) as f64 };
                (4.0 * visible * nh * d + 6.0 * visible * nh, 4.0 * (nin + nout), s * nh)
            }
            Op::RmsNorm { .. } => (4.0 * nout, 4.0 * (2.0 * n(ins[0]) + n(ins[1]) + nout), rows(out)),
            Op::LayerNorm { .. } => (7.0 * nout, 4.0 * (2.0 * n(ins[0]) + n(ins[1]) + n(ins[2]) + nout), rows(out)),
            Op::Rope { .. } => (6.0 * nout, 4.0 * (nin + nout), rows(out)),
            Op::CausalMask { .. } | Op::Transpose { .. } | Op::Slice { .. } | Op::Concat { .. } => {
                (0.0, 4.0 * (nin + nout), rows(out))
            }
            Op::KvConcat { .. } => (0.0, 4.0 * (nin + nout), rows(ins[0])),
        };
        let busy = (t.workers as f64).min(items.max(1.0));
        t.launch_s + (flops / (t.flops_per_worker * busy)).max(bytes / t.bytes_per_s)
    }
}

fn div_up(a: f64, b: usize) -> f64 {
    (a / b as f64).ceil().max(1.0)
}

/// `(M, K, N, batch)` of a matmul-like op at `b`.
fn mm_dims(a: &TensorType, out: &TensorType, b: Bindings) -> (f64, f64, f64, f64) {
    let e = |x: &TensorType, i: usize| x.shape[i].eval(b) as f64;
    let (ra, ro) = (a.rank(), out.rank());
    let k = e(a, ra - 1);
    let nn = e(out, ro - 1);
    let m = if ro >= 2 { e(out, ro - 2) } else { 1.0 };
    let batch = out.numel(b) as f64 / (m * nn).max(1.0);
    (m, k, nn, batch)
}

/// Query-key pairs a causal (windowed) attention visits in one step, summed over queries.
fn visible_keys(b: Bindings, window: Option<usize>) -> f64 {
    (0..b.s).map(|s| ((b.p + s + 1).min(window.unwrap_or(usize::MAX))) as f64).sum()
}

/// Flops per element of a unary op (transcendentals as polynomial evaluations).
fn unary_flops(u: UnaryOp) -> f64 {
    match u {
        UnaryOp::Neg => 1.0,
        UnaryOp::Sqrt | UnaryOp::Rsqrt => 4.0,
        UnaryOp::Exp | UnaryOp::Tanh => 12.0,
        UnaryOp::Sigmoid | UnaryOp::Silu => 14.0,
        UnaryOp::Gelu | UnaryOp::GeluTanh => 20.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmc_ir::Dim;

    fn t(shape: &[Dim]) -> TensorType {
        TensorType::f32(shape.to_vec())
    }

    #[test]
    fn fused_attention_is_cheaper_than_its_parts_and_weight_concat_is_free() {
        let m = CostModel::new(Target::cpu(Some(2)));
        use Dim::*;
        let q = t(&[S, N(8), N(64)]);
        let kv = t(&[T, N(2), N(64)]);
        let att = m.op_cost(&Op::Attention { scale: 0.125, window: None, causal: true }, &[&q, &kv, &kv], &q, &[false; 3]);
        // The primitive form: scores = q' k'ᵀ (full S x T), scale, mask, softmax, p v'.
        let (qh, kh) = (t(&[N(2), N(4), S, N(64)]), t(&[N(2), N(1), T, N(64)]));
        let scores = t(&[N(2), N(4), S, T]);
        let one = t(&[]);
        let prim = m.op_cost(&Op::Matmul { transpose_b: true }, &[&qh, &kh], &scores, &[false; 2])
            + m.op_cost(&Op::Binary(llmc_ir::BinaryOp::Mul), &[&scores, &one], &scores, &[false, true])
            + m.op_cost(&Op::CausalMask { window: None }, &[&scores], &scores, &[false])
            + m.op_cost(&Op::Softmax, &[&scores], &scores, &[false])
            + m.op_cost(&Op::Matmul { transpose_b: false }, &[&scores, &kh], &qh, &[false; 2]);
        assert!(att < prim / 2.0, "attention {att} vs its primitive form {prim}");
        let w = t(&[N(64), N(64)]);
        let cat = t(&[N(128), N(64)]);
        assert_eq!(m.op_cost(&Op::Concat { axis: 0, n: 2 }, &[&w, &w], &cat, &[true, true]), 0.0);
        assert!(m.op_cost(&Op::Concat { axis: 0, n: 2 }, &[&w, &w], &cat, &[true, false]) > 0.0);
        assert_eq!(m.op_cost(&Op::Reshape, &[&q], &t(&[S, N(512)]), &[false]), 0.0);
    }

    #[test]
    fn narrow_matmuls_pay_for_idle_workers() {
        use Dim::*;
        let m = CostModel { target: Target::cpu(Some(16)), bindings: vec![Bindings { s: 1, p: 0 }] };
        let a = t(&[S, N(768)]);
        let cost = |n: usize| {
            let w = t(&[N(n), N(768)]);
            m.op_cost(&Op::Matmul { transpose_b: true }, &[&a, &w], &t(&[S, N(n)]), &[false, true])
        };
        // Three narrow matmuls cost more than one over the concatenated weights.
        assert!(cost(768) + 2.0 * cost(256) > cost(1280), "{} {} {}", cost(768), cost(256), cost(1280));
    }
}
