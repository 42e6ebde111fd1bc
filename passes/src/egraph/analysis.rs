//! Shape and dtype inference as an egg [`Analysis`]: every value e-class knows its
//! [`TensorType`] (from [`Op::infer_type`](llmc_ir::Op::infer_type), the IR's own type rule), every
//! attribute class its [`Attr`]. Rule guards read these facts; extraction re-checks each e-node's
//! type against its class, so an ill-typed e-node can never reach the IR.
//!
//! Two classes whose types differ must never merge: that would be an unsound rule. The analysis
//! records such a merge in [`TensorAnalysis::conflicts`] and the pass reports it as an error.

use std::collections::HashMap;

use egg::{Analysis, DidMerge, EGraph, Id};
use llmc_ir::{DType, TensorType};

use super::lang::{to_ir, Attr, Leaf, Tn};

pub type EG = EGraph<Tn, TensorAnalysis>;

/// What a leaf of the region is. Names are not kept: a region's e-graph is the same for every
/// layer, and names come back when the result is replayed (see [`layers`](super::layers)).
#[derive(Clone, Debug, PartialEq)]
pub enum LeafKind {
    /// A checkpoint tensor (its checkpoint element type).
    Weight {
        stored: DType,
    },
    Const {
        values: Vec<f32>,
    },
    Input {
        name: String,
    },
    Positions,
    /// A value computed outside the region (the residual stream entering a layer).
    Boundary,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LeafInfo {
    pub kind: LeafKind,
    pub ty: TensorType,
}

impl LeafInfo {
    /// Known at compile time (weights and consts): a `concat` of such values costs nothing at run time.
    pub fn is_static(&self) -> bool {
        matches!(self.kind, LeafKind::Weight { .. } | LeafKind::Const { .. })
    }
}

/// The analysis state: the region's leaf table (rules may append consts) and merge conflicts.
#[derive(Debug, Default)]
pub struct TensorAnalysis {
    pub leaves: Vec<LeafInfo>,
    consts: HashMap<(Vec<u32>, TensorType), u32>,
    /// Type conflicts seen while merging classes (each one an unsound rewrite).
    pub conflicts: Vec<String>,
}

impl TensorAnalysis {
    pub fn new(leaves: Vec<LeafInfo>) -> Self {
        let mut a = TensorAnalysis { leaves: Vec::new(), consts: HashMap::new(), conflicts: Vec::new() };
        for l in leaves {
            a.push_leaf(l);
        }
        a
    }

    fn push_leaf(&mut self, l: LeafInfo) -> u32 {
        let i = self.leaves.len() as u32;
        if let LeafKind::Const { values } = &l.kind {
            self.consts.entry((values.iter().map(|v| v.to_bits()).collect(), l.ty.clone())).or_insert(i);
        }
        self.leaves.push(l);
        i
    }

    /// The leaf for a const of type `ty` (created once per distinct value and type).
    pub fn const_leaf(&mut self, values: Vec<f32>, ty: TensorType) -> Leaf {
        let key = (values.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), ty.clone());
        if let Some(&i) = self.consts.get(&key) {
            return Leaf(i);
        }
        Leaf(self.push_leaf(LeafInfo { kind: LeafKind::Const { values }, ty }))
    }
}

/// Per-class facts.
#[derive(Clone, Debug, PartialEq)]
pub struct Data {
    /// The value's type; `None` for attribute classes.
    pub ty: Option<TensorType>,
    /// The attribute, for attribute classes.
    pub attr: Option<Attr>,
    /// The bits of the value when the class holds a one-element const.
    pub scalar: Option<u32>,
    /// The leaf index when the class holds a weight.
    pub weight: Option<u32>,
    /// The class holds a value known at compile time (weight, const, concat of such).
    pub is_static: bool,
}

/// The type of `node` from its children's types, or `None` when it does not type-check.
pub fn node_type(eg: &EG, node: &Tn) -> Option<TensorType> {
    let (op, ins) = to_ir(node, |id| eg[id].data.attr.clone())?;
    let tys: Vec<&TensorType> = ins.iter().map(|i| eg[*i].data.ty.as_ref()).collect::<Option<_>>()?;
    let declared = match node {
        Tn::Reshape([_, t]) => Some(eg[*t].data.attr.as_ref()?.as_type()?),
        _ => None,
    };
    op.infer_type(&tys, declared.as_ref()).ok()
}

impl Analysis<Tn> for TensorAnalysis {
    type Data = Data;

    fn make(eg: &mut EG, enode: &Tn, _id: Id) -> Data {
        let mut d = Data { ty: None, attr: None, scalar: None, weight: None, is_static: false };
        match enode {
            Tn::Attr(a) => d.attr = Some(a.clone()),
            Tn::Leaf(l) => {
                if let Some(info) = eg.analysis.leaves.get(l.0 as usize) {
                    d.ty = Some(info.ty.clone());
                    d.is_static = info.is_static();
                    match &info.kind {
                        LeafKind::Weight { .. } => d.weight = Some(l.0),
                        LeafKind::Const { values } if values.len() == 1 => d.scalar = Some(values[0].to_bits()),
                        _ => {}
                    }
                }
            }
            Tn::Concat(c) => {
                d.ty = node_type(eg, enode);
                d.is_static = c[1..].iter().all(|&x| eg[x].data.is_static);
            }
            _ => d.ty = node_type(eg, enode),
        }
        d
    }

    fn merge(&mut self, a: &mut Data, b: Data) -> DidMerge {
        let mut changed_a = false;
        let mut changed_b = false;
        match (&a.ty, b.ty) {
            (Some(x), Some(y)) if *x != y => {
                self.conflicts.push(format!("a class of type {x} was merged with one of type {y}"))
            }
            (Some(_), None) => changed_b = true,
            (None, Some(y)) => {
                a.ty = Some(y);
                changed_a = true;
            }
            _ => {}
        }
        macro_rules! or_field {
            ($f:ident) => {
                match (&a.$f, b.$f) {
                    (Some(_), None) => changed_b = true,
                    (None, Some(v)) => {
                        a.$f = Some(v);
                        changed_a = true;
                    }
                    _ => {}
                }
            };
        }
        or_field!(attr);
        or_field!(scalar);
        or_field!(weight);
        if a.is_static != b.is_static {
            if b.is_static {
                a.is_static = true;
                changed_a = true;
            } else {
                changed_b = true;
            }
        }
        DidMerge(changed_a, changed_b)
    }
}
