//! The verifier: structural and type invariants every pass must preserve.

use std::collections::HashSet;

use petgraph::Direction;

use crate::error::{IrError, Result};
use crate::graph::{Graph, KvLayout, StateKind};
use crate::op::Op;
use crate::types::{DType, Layout};

fn ident_ok(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Checks `g`; the error names the offending value as it would print (`%12`) where it can.
pub fn verify(g: &Graph) -> Result<()> {
    let err = |node: String, msg: String| Err(IrError::Verify { node, msg });
    if !ident_ok(&g.name) {
        return err("graph".into(), format!("graph name `{}` must be [A-Za-z0-9_.-]+", g.name));
    }
    let order = g.topo_order()?;
    let pos: std::collections::HashMap<_, _> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut states = HashSet::new();
    for s in &g.states {
        if !ident_ok(&s.name) {
            return err(format!("@{}", s.name), "state names must be [A-Za-z0-9_.-]+".into());
        }
        if !states.insert(s.name.as_str()) {
            return err(format!("@{}", s.name), "declared twice".into());
        }
        match s.kind {
            // One buffer of `C` rows: f32, every dimension known.
            StateKind::Kv { layout: KvLayout::Contiguous } => {
                if s.ty.dtype != DType::F32 || s.ty.shape.iter().any(|d| !d.is_const()) || s.ty.rank() == 0 {
                    return err(format!("@{}", s.name), format!("state must be f32 with static shape, got {}", s.ty));
                }
            }
            // Rows of vectors of the last dimension, each with its scale.
            StateKind::Kv { layout: KvLayout::Int8 } => {
                if s.ty.dtype != DType::F32 || s.ty.shape.iter().any(|d| !d.is_const()) || s.ty.rank() < 2 {
                    return err(
                        format!("@{}", s.name),
                        format!("a kv<int8> state must be f32 with a static shape of rank 2 or more, got {}", s.ty),
                    );
                }
            }
        }
    }
    let mut writers = HashSet::new();
    for &n in &order {
        let name = format!("%{}", pos[&n]);
        let node = g.node(n);
        let mut slots: Vec<u32> = g.g.edges_directed(n, Direction::Incoming).map(|e| *e.weight()).collect();
        slots.sort();
        if slots != (0..node.op.arity() as u32).collect::<Vec<_>>() {
            return err(name, format!("`{}` takes {} operands, its operand slots are {slots:?}", node.op.name(), node.op.arity()));
        }
        let ins = g.inputs(n);
        let tys: Vec<_> = ins.iter().map(|&i| g.ty(i)).collect();
        let declared = node.op.declares_type().then_some(&node.ty);
        let want = node.op.infer_type(&tys, declared).map_err(|e| IrError::Verify { node: name.clone(), msg: e.to_string() })?;
        if want != node.ty {
            return err(name, format!("`{}` has type {} but its operands give {want}", node.op.name(), node.ty));
        }
        match &node.op {
            Op::KvConcat { state } => {
                let Some(decl) = g.state(state) else {
                    return err(name, format!("kv_concat names undeclared state @{state}"));
                };
                match decl.kind {
                    // Appends whole rows: the row shape is the state's.
                    StateKind::Kv { layout: KvLayout::Contiguous | KvLayout::Int8 } => {
                        if decl.ty.shape[1..] != node.ty.shape[1..] {
                            return err(name, format!("kv_concat row shape {} disagrees with @{state} : {}", node.ty, decl.ty));
                        }
                    }
                }
                if !writers.insert(state.clone()) {
                    return err(name, format!("state @{state} is written twice"));
                }
            }
            Op::Input { name: iname } if !ident_ok(iname) => {
                return err(name, format!("input name `{iname}` must be [A-Za-z0-9_.-]+"));
            }
            Op::Weight { stored: DType::I32, .. } => return err(name, "weights are stored as f32, f16 or bf16".into()),
            Op::Weight { layout, .. } if *layout != Layout::Dense && node.ty.rank() != 2 => {
                return err(name, format!("layout {layout} needs a 2-D weight, got {}", node.ty));
            }
            Op::Weight { layout: layout @ Layout::Sparse24 { .. }, .. }
                if node.ty.shape[1].as_const().is_none_or(|k| k % 4 != 0) =>
            {
                return err(name, format!("layout {layout} needs K to be a multiple of 4, got {}", node.ty));
            }
            _ => {}
        }
    }
    if g.outputs.is_empty() {
        return err("graph".into(), "graph has no outputs".into());
    }
    for o in &g.outputs {
        if !g.g.contains_node(*o) {
            return err("return".into(), "returns a removed value".into());
        }
    }
    Ok(())
}
