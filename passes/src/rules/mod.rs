//! Rewrite rules for the e-graph optimizer, one table per topic: [`algebra`] (layout and scale
//! identities), [`attention`], [`norm`], [`epilogue`] (matmul epilogues and gated units),
//! [`merge`] (sibling projections). RoPE has no table: the frontend already emits it as one op
//! (`rope`, between each projection's head reshape and attention / the KV-cache append), and the
//! attention rules take its output as `?q` and `kv_concat(rope(..))` as `?k` unchanged.
//!
//! A rule is one line: a kebab-case name, a left pattern, a right pattern and a guard, with a
//! comment giving the math. Patterns are egg s-expressions over [`Tn`]; attributes are operands,
//! so `(transpose ?x ?p)` binds the permutation to `?p` and `(matmul ?a ?b true)` matches only
//! `transpose_b`. The guard reads types and attributes from the analysis, rejects the match
//! (`None`) or accepts it, binding any right-side variable the left side lacks (a composed
//! permutation, a scale as an attribute, a folded const).
//!
//! Policy (Cranelift's): rules go one way, the right side is never worse, and there is no blanket
//! commutativity or associativity; which equivalent form is used is decided by the cost model at
//! extraction, not by the order rules fire. Every rule is checked for soundness in the reference
//! interpreter (see the tests of [`crate::egraph`]).

pub mod algebra;
pub mod attention;
pub mod epilogue;
pub mod merge;
pub mod norm;

use egg::{Applier, Id, Pattern, PatternAst, Rewrite, Subst, Symbol, Var};
use llmc_ir::{Dim, TensorType};

use crate::egraph::analysis::{node_type, TensorAnalysis, EG};
use crate::egraph::lang::{Attr, Tn};

/// A compiled rule, as egg runs it.
pub type Rw = Rewrite<Tn, TensorAnalysis>;

/// A value a guard binds to a right-side variable.
#[derive(Clone, Debug, PartialEq)]
pub enum Bind {
    Attr(Attr),
    /// A new const of the given type (created once per distinct value).
    Const(Vec<f32>, TensorType),
}

/// Right-side variables a guard binds.
pub type Binds = Vec<(&'static str, Bind)>;

/// Checks a match and binds the right side's extra variables; `None` rejects the match.
pub type Guard = fn(&Ctx<'_>) -> Option<Binds>;

/// One row of a rule table.
#[derive(Clone, Copy)]
pub enum RuleDef {
    Pattern {
        name: &'static str,
        lhs: &'static str,
        rhs: &'static str,
        guard: Guard,
    },
    /// A rule that is not a single pattern (a multi-match), built by `build`.
    Custom {
        name: &'static str,
        build: fn(&'static str) -> Result<Rw, String>,
    },
}

impl RuleDef {
    pub fn name(&self) -> &'static str {
        match self {
            RuleDef::Pattern { name, .. } | RuleDef::Custom { name, .. } => name,
        }
    }

    /// The egg rewrite; an error names the rule and the pattern that does not parse.
    pub fn compile(&self) -> Result<Rw, String> {
        match *self {
            RuleDef::Pattern { name, lhs, rhs, guard } => {
                let l: Pattern<Tn> = lhs.parse().map_err(|e| format!("rule {name}: left side: {e}"))?;
                let r: Pattern<Tn> = rhs.parse().map_err(|e| format!("rule {name}: right side: {e}"))?;
                let lvars = l.vars();
                let rvars = r.vars();
                Rewrite::new(name, l, Guarded { name, rhs: r.ast, rvars, lvars, guard })
                    .map_err(|e| format!("rule {name}: {e}"))
            }
            RuleDef::Custom { name, build } => build(name),
        }
    }
}

/// A table row: `rule("name", "(lhs ..)", "(rhs ..)", guard)`.
pub const fn rule(name: &'static str, lhs: &'static str, rhs: &'static str, guard: Guard) -> RuleDef {
    RuleDef::Pattern { name, lhs, rhs, guard }
}

/// The guard of an unconditional rule.
pub fn always(_: &Ctx<'_>) -> Option<Binds> {
    Some(vec![])
}

/// Every rule, topic by topic.
pub fn all_rules() -> Vec<RuleDef> {
    [algebra::RULES, attention::RULES, norm::RULES, epilogue::RULES, merge::RULES].concat()
}

/// Compiles `defs`.
pub fn compile(defs: &[RuleDef]) -> Result<Vec<Rw>, String> {
    defs.iter().map(RuleDef::compile).collect()
}

/// What a guard sees: the e-graph and the match.
pub struct Ctx<'a> {
    pub eg: &'a EG,
    pub subst: &'a Subst,
}

impl<'a> Ctx<'a> {
    /// The class bound to `var` (`"?x"`).
    pub fn id(&self, var: &str) -> Option<Id> {
        let v: Var = var.parse().ok()?;
        self.subst.get(v).map(|&id| self.eg.find(id))
    }
    pub fn ty(&self, var: &str) -> Option<&'a TensorType> {
        self.eg[self.id(var)?].data.ty.as_ref()
    }
    pub fn shape(&self, var: &str) -> Option<&'a [Dim]> {
        self.ty(var).map(|t| t.shape.as_slice())
    }
    pub fn attr(&self, var: &str) -> Option<&'a Attr> {
        self.eg[self.id(var)?].data.attr.as_ref()
    }
    pub fn perm(&self, var: &str) -> Option<Vec<usize>> {
        self.attr(var)?.as_usizes()
    }
    pub fn type_attr(&self, var: &str) -> Option<TensorType> {
        self.attr(var)?.as_type()
    }
    /// The value of a one-element const.
    pub fn scalar(&self, var: &str) -> Option<f32> {
        self.eg[self.id(var)?].data.scalar.map(f32::from_bits)
    }
    /// The value of a one-element const whose rank is at most `rank` (so broadcasting it changes
    /// no shape of a rank-`rank` operand).
    pub fn scalar_within(&self, var: &str, rank: usize) -> Option<f32> {
        let v = self.scalar(var)?;
        (self.ty(var)?.rank() <= rank).then_some(v)
    }
    /// The class holds a checkpoint weight.
    pub fn is_weight(&self, var: &str) -> bool {
        self.id(var).is_some_and(|id| self.eg[id].data.weight.is_some())
    }
}

/// The right side of a pattern rule: runs the guard, binds its variables, instantiates the
/// pattern and merges it with the matched class. A right side whose type differs from the
/// matched class is a bug in the rule: it is recorded as a conflict (the pass reports it) and not
/// merged.
struct Guarded {
    name: &'static str,
    rhs: PatternAst<Tn>,
    lvars: Vec<Var>,
    rvars: Vec<Var>,
    guard: Guard,
}

impl Applier<Tn, TensorAnalysis> for Guarded {
    fn apply_one(
        &self,
        eg: &mut EG,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Tn>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let binds = match (self.guard)(&Ctx { eg, subst }) {
            Some(b) => b,
            None => return vec![],
        };
        let mut s = subst.clone();
        for (var, b) in binds {
            let Ok(v) = var.parse::<Var>() else {
                eg.analysis.conflicts.push(format!("rule {}: guard binds `{var}`, not a variable", self.name));
                return vec![];
            };
            let id = match b {
                Bind::Attr(a) => eg.add(Tn::Attr(a)),
                Bind::Const(values, ty) => {
                    let leaf = eg.analysis.const_leaf(values, ty);
                    eg.add(Tn::Leaf(leaf))
                }
            };
            s.insert(v, id);
        }
        if let Some(v) = self.rvars.iter().find(|v| s.get(**v).is_none()) {
            eg.analysis.conflicts.push(format!("rule {}: right side uses {v}, which neither side binds", self.name));
            return vec![];
        }
        let new = eg.add_instantiation(&self.rhs, &s);
        let (want, got) = (eg[eclass].data.ty.clone(), eg[new].data.ty.clone());
        if want != got || got.is_none() {
            let show = |t: Option<TensorType>| t.map_or("an ill-typed value".to_string(), |t| t.to_string());
            eg.analysis.conflicts.push(format!("rule {} rewrites {} into {}", self.name, show(want), show(got)));
            return vec![];
        }
        if eg.union(eclass, new) {
            vec![eclass]
        } else {
            vec![]
        }
    }

    fn vars(&self) -> Vec<Var> {
        // Right-side variables the guard binds are not the searcher's; report only shared ones.
        self.rvars.iter().filter(|v| self.lvars.contains(v)).copied().collect()
    }
}

/// Whether `node` type-checks and has the type of class `id` (used by custom appliers).
pub(crate) fn well_typed(eg: &EG, node: &Tn, id: Id) -> bool {
    node_type(eg, node).is_some_and(|t| eg[id].data.ty.as_ref() == Some(&t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_compiles_and_names_are_unique_kebab_case() {
        let defs = all_rules();
        let mut seen = std::collections::HashSet::new();
        for d in &defs {
            assert!(d.name().chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'), "{}", d.name());
            assert!(seen.insert(d.name()), "duplicate rule {}", d.name());
            d.compile().unwrap_or_else(|e| panic!("{e}"));
        }
        assert!(defs.len() >= 20, "{} rules", defs.len());
    }
}
