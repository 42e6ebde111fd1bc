//! Merges: `linear`s of one input by different weights (Q, K and V; gate and up) become one
//! `linear` over the weights concatenated along the output dimension (a `concat` of weight nodes,
//! materialized at compile time), followed by one slice per original output. Biases are merged
//! the same way. One wide matmul instead of several narrow ones keeps more workers busy and
//! launches fewer kernels; the slices cost copies, so the cost model decides per target.
//!
//! This is a multi-match (a rule over a *set* of e-nodes), so it is not an egg pattern: pairwise
//! multi-patterns would merge every pair and then every merged pair again (Tensat's blow-up).
//! Instead one search groups all eligible `linear`s by (input, layout, bias present) and merges
//! each whole group once, in weight order. Only `linear`s whose right operand is a weight leaf take
//! part, so a merged `linear` (over a `concat`) is never merged again.

use std::collections::BTreeMap;

use egg::{Applier, Id, PatternAst, Rewrite, SearchMatches, Searcher, Subst, Symbol, Var};

use super::{well_typed, RuleDef, Rw};
use crate::egraph::analysis::{TensorAnalysis, EG};
use crate::egraph::lang::{Attr, Tn};

#[rustfmt::skip]
pub const RULES: &[RuleDef] = &[
    RuleDef::Custom { name: "merge-sibling-linears", build: sibling_linears }, // a x w1 (+b1), .., a x wn (+bn) = slices of a x [w1; ..; wn] (+ [b1; ..; bn])
];

/// Most members merged at once.
const MAX_GROUP: usize = 8;

fn sibling_linears(name: &'static str) -> Result<Rw, String> {
    Rewrite::new(name, Siblings, MergeSiblings).map_err(|e| format!("rule {name}: {e}"))
}

fn var(s: &str) -> Var {
    s.parse().expect("static variable name")
}

/// (input class, layout attribute class, has a bias).
type GroupKey = (Id, Id, bool);
/// (weight leaf, member class, weight class, bias class or `none`).
type Member = (u32, Id, Id, Id);

/// Finds the groups: one match per group, its class the shared input, one substitution per member
/// (`?m` the member's class, `?b` its weight, `?bias` its bias or `none`, `?tb` the layout).
struct Siblings;

impl Searcher<Tn, TensorAnalysis> for Siblings {
    fn search_eclass_with_limit(&self, _: &EG, _: Id, _: usize) -> Option<SearchMatches<'_, Tn>> {
        None
    }

    fn search_with_limit(&self, eg: &EG, limit: usize) -> Vec<SearchMatches<'_, Tn>> {
        let is_none = |id: Id| eg[id].data.attr == Some(Attr::None);
        let mut groups: BTreeMap<GroupKey, Vec<Member>> = BTreeMap::new();
        for class in eg.classes() {
            for node in class.iter() {
                let Tn::Linear([a, b, tb, act, bias, res]) = node else { continue };
                let (b, bias) = (eg.find(*b), eg.find(*bias));
                let Some(w) = eg[b].data.weight else { continue };
                let has_bias = !is_none(bias);
                let bias_ok = !has_bias || eg[bias].data.weight.is_some();
                let two_d = eg[b].data.ty.as_ref().is_some_and(|t| t.rank() == 2);
                if is_none(*act) && is_none(*res) && bias_ok && two_d {
                    groups.entry((eg.find(*a), eg.find(*tb), has_bias)).or_default().push((w, class.id, b, bias));
                }
            }
        }
        let mut out = Vec::new();
        let mut left = limit;
        for ((a, tb, _), mut members) in groups {
            members.sort();
            let mut seen = Vec::new();
            members.retain(|m| {
                !seen.contains(&m.1) && !seen.contains(&m.2) && {
                    seen.extend([m.1, m.2]);
                    true
                }
            });
            members.truncate(MAX_GROUP);
            if members.len() < 2 || members.len() > left {
                continue;
            }
            left -= members.len();
            let substs = members
                .iter()
                .map(|&(_, m, b, bias)| {
                    let mut s = Subst::with_capacity(4);
                    s.insert(var("?m"), m);
                    s.insert(var("?b"), b);
                    s.insert(var("?bias"), bias);
                    s.insert(var("?tb"), tb);
                    s
                })
                .collect();
            out.push(SearchMatches { eclass: a, substs, ast: None });
        }
        out
    }

    fn vars(&self) -> Vec<Var> {
        ["?m", "?b", "?bias", "?tb"].iter().map(|v| var(v)).collect()
    }
}

/// Builds the merged `linear` of one group and unions each member with its slice.
struct MergeSiblings;

impl Applier<Tn, TensorAnalysis> for MergeSiblings {
    fn apply_matches(&self, eg: &mut EG, matches: &[SearchMatches<Tn>], _rule: Symbol) -> Vec<Id> {
        let mut changed = Vec::new();
        for m in matches {
            let get = |s: &Subst, v: &str| s.get(var(v)).copied();
            let members: Vec<(Id, Id, Id)> =
                m.substs.iter().filter_map(|s| Some((get(s, "?m")?, get(s, "?b")?, get(s, "?bias")?))).collect();
            if members.len() < 2 {
                continue;
            }
            let Some(tb) = m.substs.first().and_then(|s| get(s, "?tb")) else { continue };
            let Some(transpose_b) = eg[tb].data.attr.as_ref().and_then(Attr::as_bool) else { continue };
            let has_bias = eg[members[0].2].data.attr != Some(Attr::None);
            // Output widths: rows of `[N, K]` weights, columns of `[K, N]` ones.
            let widths: Option<Vec<usize>> = members
                .iter()
                .map(|&(_, b, _)| {
                    eg[b].data.ty.as_ref().and_then(|t| t.shape[if transpose_b { 0 } else { 1 }].as_const())
                })
                .collect();
            let Some(widths) = widths else { continue };
            let concat = |eg: &mut EG, axis: i64, xs: Vec<Id>| {
                let mut c = vec![eg.add(Tn::Attr(Attr::Int(axis)))];
                c.extend(xs);
                eg.add(Tn::Concat(c.into_boxed_slice()))
            };
            let w = concat(eg, if transpose_b { 0 } else { 1 }, members.iter().map(|x| x.1).collect());
            let none = eg.add(Tn::Attr(Attr::None));
            let bias = if has_bias { concat(eg, 0, members.iter().map(|x| x.2).collect()) } else { none };
            let act = eg.add(Tn::Attr(Attr::None));
            let merged_node = Tn::Linear([m.eclass, w, tb, act, bias, none]);
            let merged = eg.add(merged_node);
            if eg[merged].data.ty.is_none() {
                eg.analysis.conflicts.push("rule merge-sibling-linears built an ill-typed merged linear".into());
                continue;
            }
            let mut start = 0;
            for (&(member, _, _), &n) in members.iter().zip(&widths) {
                let Some(rank) = eg[member].data.ty.as_ref().map(|t| t.rank()) else { continue };
                let axis = eg.add(Tn::Attr(Attr::Int(rank as i64 - 1)));
                let s = eg.add(Tn::Attr(Attr::Int(start as i64)));
                let e = eg.add(Tn::Attr(Attr::Int((start + n) as i64)));
                start += n;
                let slice = Tn::Slice([merged, axis, s, e]);
                if !well_typed(eg, &slice, member) {
                    eg.analysis.conflicts.push("rule merge-sibling-linears built a slice of the wrong type".into());
                    continue;
                }
                let sid = eg.add(slice);
                if eg.union(member, sid) {
                    changed.push(member);
                }
            }
        }
        changed
    }

    fn apply_one(&self, _: &mut EG, _: Id, _: &Subst, _: Option<&PatternAst<Tn>>, _: Symbol) -> Vec<Id> {
        // Groups are applied whole in `apply_matches`.
        vec![]
    }
}
