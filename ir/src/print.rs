//! The text form of a graph. Values are numbered in topological order (`%0`, `%1`, ...); a weight's
//! checkpoint name is an attribute, so a dump reads like the model.
//!
//! ```text
//! graph @seedlm {
//!   meta vocab_size = "4096"
//!   state @cache.0.k : kv<contiguous> f32[512,2,32]
//!   %0 = input {name = "ids"} : i32[S]
//!   %1 = weight {name = "model.embed_tokens.weight"} : f32[4096,256]
//!   %2 = gather %1, %0 : f32[S,256]
//!   return %2
//! }
//! ```

use std::collections::HashMap;
use std::fmt::Write;

use crate::graph::Graph;
use crate::op::Op;
use crate::types::{DType, Layout};

/// Prints `g`; a graph with a cycle prints its nodes in index order with a comment saying so.
pub fn print(g: &Graph) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "graph @{} {{", g.name);
    for (k, v) in &g.meta {
        let _ = writeln!(s, "  meta {k} = {}", quote(v));
    }
    for st in &g.states {
        let _ = writeln!(s, "  state @{} : {} {}", st.name, st.kind, st.ty);
    }
    let order = match g.topo_order() {
        Ok(o) => o,
        Err(_) => {
            let _ = writeln!(s, "  ; error: the graph has a cycle; nodes in index order");
            g.g.node_indices().collect()
        }
    };
    let names: HashMap<_, _> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    for &n in &order {
        let node = g.node(n);
        let _ = write!(s, "  %{} = {}", names[&n], node.op.name());
        let ins = g.inputs(n);
        for (i, x) in ins.iter().enumerate() {
            let _ = write!(s, "{}%{}", if i == 0 { " " } else { ", " }, names[x]);
        }
        let attrs = attrs(&node.op);
        if !attrs.is_empty() {
            let _ = write!(s, " {{{}}}", attrs.join(", "));
        }
        let _ = writeln!(s, " : {}", node.ty);
    }
    let outs: Vec<String> = g
        .outputs
        .iter()
        .map(|o| names.get(o).map(|i| format!("%{i}")).unwrap_or_else(|| "%<dangling>".into()))
        .collect();
    let _ = writeln!(s, "  return {}", outs.join(", "));
    s.push_str("}\n");
    s
}

/// Prints a float so that it parses back to the same bits: the shortest decimal that round-trips,
/// `inf`/`-inf`, and NaNs as `nan_XXXXXXXX` with their bit pattern (sign and payload kept).
pub fn fmt_f32(x: f32) -> String {
    if x.is_nan() {
        format!("nan_{:08x}", x.to_bits())
    } else {
        format!("{x:?}")
    }
}

/// Parses what [`fmt_f32`] prints (and any decimal float).
pub fn parse_f32(s: &str) -> Option<f32> {
    match s.strip_prefix("nan_") {
        Some(hex) if hex.len() == 8 => u32::from_str_radix(hex, 16).ok().map(f32::from_bits).filter(|v| v.is_nan()),
        Some(_) => None,
        None => s.parse().ok(),
    }
}

pub(crate) fn quote(v: &str) -> String {
    let mut q = String::from("\"");
    for c in v.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

fn attrs(op: &Op) -> Vec<String> {
    match op {
        Op::Input { name } => vec![format!("name = {}", quote(name))],
        Op::Weight { name, stored, layout } => {
            let mut v = vec![format!("name = {}", quote(name))];
            if *stored != DType::F32 {
                v.push(format!("stored = {stored}"));
            }
            if *layout != Layout::Dense {
                v.push(format!("layout = {layout}"));
            }
            v
        }
        Op::Const { values } => {
            let vals: Vec<String> = values.iter().map(|&x| fmt_f32(x)).collect();
            vec![format!("values = [{}]", vals.join(", "))]
        }
        Op::Matmul { transpose_b: true } => vec!["transpose_b".into()],
        Op::Transpose { perm } => {
            let p: Vec<String> = perm.iter().map(|x| x.to_string()).collect();
            vec![format!("perm = [{}]", p.join(", "))]
        }
        Op::Slice { axis, start, end } => vec![format!("axis = {axis}"), format!("start = {start}"), format!("end = {end}")],
        Op::Rope { rotary_dim } => vec![format!("rotary_dim = {rotary_dim}")],
        Op::CausalMask { window: Some(w) } => vec![format!("window = {w}")],
        Op::KvConcat { state } => vec![format!("state = @{state}")],
        Op::Concat { axis, n } => vec![format!("axis = {axis}"), format!("n = {n}")],
        Op::Attention { scale, window, causal } => {
            let mut v = vec![format!("scale = {}", fmt_f32(*scale))];
            if let Some(w) = window {
                v.push(format!("window = {w}"));
            }
            if !causal {
                v.push("bidirectional".into());
            }
            v
        }
        Op::RmsNorm { eps } | Op::LayerNorm { eps } => vec![format!("eps = {}", fmt_f32(*eps))],
        Op::Linear { transpose_b, bias, act, residual } => {
            let mut v = Vec::new();
            if *transpose_b {
                v.push("transpose_b".into());
            }
            if *bias {
                v.push("bias".into());
            }
            if let Some(a) = act {
                v.push(format!("act = {}", a.name()));
            }
            if *residual {
                v.push("residual".into());
            }
            v
        }
        Op::GatedLinear { act } => vec![format!("act = {}", act.name())],
        Op::Moe { top_k, act } => vec![format!("top_k = {top_k}"), format!("act = {}", act.name())],
        Op::Matmul { transpose_b: false }
        | Op::CausalMask { window: None }
        | Op::Positions
        | Op::Gather
        | Op::Unary(_)
        | Op::Binary(_)
        | Op::Reduce(_)
        | Op::Softmax
        | Op::Reshape => vec![],
    }
}
