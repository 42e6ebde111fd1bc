//! DAG-aware extraction: choose one e-node per needed e-class so that the *DAG* cost (each chosen
//! class counted once, however many users share it) is small.
//!
//! Tree-cost extraction (egg's `Extractor`) adds a shared operand's cost once per user, so it
//! prefers duplicating work and cannot see that three projections reading one merged matmul pay
//! for it once (Tensat's observation). Exact DAG extraction is an ILP; without a solver we use a
//! sharing-aware local search:
//! 1. start from the tree-cost optimum (a fixpoint over the classes);
//! 2. repeatedly try (a) switching one selected class to another of its e-nodes and (b) a *group
//!    move*: for a class `X`, switching every selected class that has an e-node reading `X` to
//!    that e-node at once, which is how a shared subgraph (a merged projection) pays off only when
//!    all its users adopt it; keep a change when the DAG cost of the whole selection drops;
//! 3. stop at a local optimum, after [`MAX_ROUNDS`] rounds, or when the move fuel runs out (a
//!    count of evaluated candidate selections, so the result never depends on machine load; a
//!    wall-clock safety valve is an error, [`ValveTripped`], not a different result).
//!
//! Each evaluation walks the selection from the roots, so a change that would make the selection
//! cyclic is rejected. E-nodes that do not type-check against their class cost infinity and are
//! never chosen.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use egg::{Id, Language};

use super::analysis::{node_type, EG};
use super::cost::CostModel;
use super::lang::{to_ir, Tn};

/// Rounds of the local search.
pub const MAX_ROUNDS: usize = 32;

/// The extraction ran past its wall-clock safety valve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValveTripped;

/// How a local search ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SearchStop {
    /// No move improved the selection (or `MAX_ROUNDS` passed).
    Converged,
    /// The move fuel ran out first.
    Fuel,
}

/// Own costs of every e-node, by class and position in the class.
pub struct Costs {
    own: BTreeMap<Id, Vec<f64>>,
}

impl Costs {
    /// Costs under `model`; `penalty(class, node)` is added to each e-node (tests use it to
    /// prefer rewritten forms).
    pub fn new(eg: &EG, model: &CostModel, penalty: &dyn Fn(Id, &Tn) -> f64) -> Costs {
        let mut own = BTreeMap::new();
        for class in eg.classes() {
            let v = class.nodes.iter().map(|n| node_cost(eg, model, class.id, n) + penalty(class.id, n)).collect();
            own.insert(class.id, v);
        }
        Costs { own }
    }

    pub fn get(&self, class: Id, node: usize) -> f64 {
        self.own.get(&class).and_then(|v| v.get(node)).copied().unwrap_or(f64::INFINITY)
    }
}

/// The cost of one e-node alone (infinity when it does not type-check as a member of `class`).
pub fn node_cost(eg: &EG, model: &CostModel, class: Id, node: &Tn) -> f64 {
    match node {
        Tn::Leaf(_) | Tn::Attr(_) => return 0.0,
        _ => {}
    }
    let Some((op, ins)) = to_ir(node, |id| eg[id].data.attr.clone()) else { return f64::INFINITY };
    let Some(out) = node_type(eg, node) else { return f64::INFINITY };
    if eg[class].data.ty.as_ref() != Some(&out) {
        return f64::INFINITY;
    }
    let tys: Option<Vec<_>> = ins.iter().map(|&i| eg[i].data.ty.as_ref()).collect();
    let Some(tys) = tys else { return f64::INFINITY };
    let statics: Vec<bool> = ins.iter().map(|&i| eg[i].data.is_static).collect();
    model.op_cost(&op, &tys, &out, &statics) + PER_NODE
}

/// A tie-breaker added to every op: of two forms that cost the same (a reshape chain and one
/// reshape, both free), the one with fewer ops wins.
pub const PER_NODE: f64 = 1e-12;

/// A choice of e-node (its index in the class) for every class the roots need.
#[derive(Clone, Debug, PartialEq)]
pub struct Selection {
    pub choice: BTreeMap<Id, usize>,
    /// DAG cost in seconds.
    pub cost: f64,
}

/// The extraction state for one e-graph.
pub struct Extractor<'a> {
    eg: &'a EG,
    costs: &'a Costs,
    roots: Vec<Id>,
    /// Tree-cost optimum per class: (cost, node).
    tree: BTreeMap<Id, (f64, usize)>,
    /// For each class, the (class, node) pairs whose e-node reads it.
    users: BTreeMap<Id, Vec<(Id, usize)>>,
}

impl<'a> Extractor<'a> {
    pub fn new(eg: &'a EG, costs: &'a Costs, roots: &[Id]) -> Self {
        let roots: Vec<Id> = roots.iter().map(|&r| eg.find(r)).collect();
        let mut users: BTreeMap<Id, Vec<(Id, usize)>> = BTreeMap::new();
        for class in eg.classes() {
            for (i, n) in class.nodes.iter().enumerate() {
                let kids: BTreeSet<Id> = n.children().iter().map(|&c| eg.find(c)).collect();
                for k in kids {
                    users.entry(k).or_default().push((class.id, i));
                }
            }
        }
        let tree = tree_costs(eg, costs);
        Extractor { eg, costs, roots, tree, users }
    }

    fn children(&self, class: Id, node: usize) -> impl Iterator<Item = Id> + '_ {
        self.eg[class].nodes[node].children().iter().map(|&c| self.eg.find(c))
    }

    /// The (class, node) pairs whose e-node reads `class`.
    pub fn users_of(&self, class: Id) -> &[(Id, usize)] {
        self.users.get(&self.eg.find(class)).map_or(&[], |v| v.as_slice())
    }

    /// The tree-cost optimum of `class` (cost, node), if it has a finite one.
    pub fn tree_cost(&self, class: Id) -> Option<(f64, usize)> {
        self.tree.get(&self.eg.find(class)).copied()
    }

    /// The tree cost of one e-node: its own cost plus its operands' tree optima.
    pub fn node_tree_cost(&self, class: Id, node: usize) -> f64 {
        let kids: BTreeSet<Id> = self.children(class, node).collect();
        self.costs.get(class, node) + kids.iter().map(|k| self.tree.get(k).map_or(f64::INFINITY, |t| t.0)).sum::<f64>()
    }

    /// The DAG cost of `choice` from the roots, or `None` if it is cyclic or misses a class.
    pub fn dag_cost(&self, choice: &BTreeMap<Id, usize>) -> Option<f64> {
        self.walk(choice).map(|(c, _)| c)
    }

    /// The classes `choice` reaches from the roots, in post-order (operands first), and its cost.
    pub fn walk(&self, choice: &BTreeMap<Id, usize>) -> Option<(f64, Vec<Id>)> {
        #[derive(Clone, Copy, PartialEq)]
        enum S {
            Open,
            Done,
        }
        let mut state: BTreeMap<Id, S> = BTreeMap::new();
        let mut order = Vec::new();
        let mut total = 0.0;
        for &root in &self.roots {
            let mut stack = vec![(root, false)];
            while let Some((c, expanded)) = stack.pop() {
                if expanded {
                    state.insert(c, S::Done);
                    order.push(c);
                    total += self.costs.get(c, *choice.get(&c)?);
                    continue;
                }
                match state.get(&c) {
                    Some(S::Done) => continue,
                    Some(S::Open) => return None,
                    None => {}
                }
                state.insert(c, S::Open);
                stack.push((c, true));
                let node = *choice.get(&c)?;
                for k in self.children(c, node) {
                    match state.get(&k) {
                        Some(S::Done) => {}
                        Some(S::Open) => return None,
                        None => stack.push((k, false)),
                    }
                }
            }
        }
        total.is_finite().then_some((total, order))
    }

    /// The tree-cost optimum of every class, with its DAG cost (step 1 of the module docs).
    pub fn tree_selection(&self) -> Option<Selection> {
        let choice: BTreeMap<Id, usize> = self.tree.iter().map(|(&c, &(_, n))| (c, n)).collect();
        let cost = self.dag_cost(&choice)?;
        Some(Selection { choice, cost })
    }

    /// Tree-cost start, then the local search of the module docs, evaluating at most `moves`
    /// candidate selections; `Err` if it runs longer than `valve` (wall clock).
    pub fn run(&self, moves: usize, valve: Duration) -> Result<Option<(Selection, SearchStop, usize)>, ValveTripped> {
        let t0 = Instant::now();
        let Some(Selection { mut choice, cost: mut cur }) = self.tree_selection() else { return Ok(None) };
        let mut used = 0usize;
        // One candidate evaluated: false when the fuel is gone; the valve is an error.
        let mut spend = || -> Result<bool, ValveTripped> {
            if used >= moves {
                return Ok(false);
            }
            used += 1;
            if t0.elapsed() > valve {
                return Err(ValveTripped);
            }
            Ok(true)
        };
        let mut stop = SearchStop::Converged;
        'rounds: for _ in 0..MAX_ROUNDS {
            let mut improved = false;
            let Some((_, selected)) = self.walk(&choice) else { return Ok(None) };
            // (a) single moves
            for &c in &selected {
                let n = self.eg[c].nodes.len();
                for i in 0..n {
                    let old = choice[&c];
                    if i == old || !self.costs.get(c, i).is_finite() {
                        continue;
                    }
                    if !spend()? {
                        stop = SearchStop::Fuel;
                        break 'rounds;
                    }
                    choice.insert(c, i);
                    match self.dag_cost(&choice) {
                        Some(x) if x < cur * (1.0 - 1e-12) => {
                            cur = x;
                            improved = true;
                        }
                        _ => {
                            choice.insert(c, old);
                        }
                    }
                }
            }
            // (b) group moves around each shared class
            let Some((_, selected)) = self.walk(&choice) else { return Ok(None) };
            let selected: BTreeSet<Id> = selected.into_iter().collect();
            for (&x, users) in &self.users {
                if self.eg[x].data.attr.is_some() {
                    continue; // sharing an attribute saves nothing
                }
                let mut best: BTreeMap<Id, (f64, usize)> = BTreeMap::new();
                for &(c, i) in users {
                    if !selected.contains(&c) || choice.get(&c) == Some(&i) || !self.costs.get(c, i).is_finite() {
                        continue;
                    }
                    let tc = self.node_tree_cost(c, i);
                    if best.get(&c).is_none_or(|b| tc < b.0) {
                        best.insert(c, (tc, i));
                    }
                }
                if best.len() < 2 {
                    continue;
                }
                if !spend()? {
                    stop = SearchStop::Fuel;
                    break 'rounds;
                }
                let saved: Vec<(Id, usize)> = best.keys().map(|c| (*c, choice[c])).collect();
                for (&c, &(_, i)) in &best {
                    choice.insert(c, i);
                }
                match self.dag_cost(&choice) {
                    Some(v) if v < cur * (1.0 - 1e-12) => {
                        cur = v;
                        improved = true;
                    }
                    _ => {
                        for (c, i) in saved {
                            choice.insert(c, i);
                        }
                    }
                }
            }
            if !improved {
                break;
            }
        }
        Ok(Some((Selection { choice, cost: cur }, stop, used)))
    }
}

/// The tree-cost optimum of every class with a finite one (Bellman-Ford style fixpoint).
fn tree_costs(eg: &EG, costs: &Costs) -> BTreeMap<Id, (f64, usize)> {
    let mut best: BTreeMap<Id, (f64, usize)> = BTreeMap::new();
    let mut ids: Vec<Id> = eg.classes().map(|c| c.id).collect();
    ids.sort();
    loop {
        let mut changed = false;
        for &c in &ids {
            for (i, n) in eg[c].nodes.iter().enumerate() {
                let own = costs.get(c, i);
                if !own.is_finite() {
                    continue;
                }
                let kids: BTreeSet<Id> = n.children().iter().map(|&k| eg.find(k)).collect();
                let mut total = own;
                for k in kids {
                    match best.get(&k) {
                        Some(b) => total += b.0,
                        None => {
                            total = f64::INFINITY;
                            break;
                        }
                    }
                }
                if total.is_finite() && best.get(&c).is_none_or(|b| total < b.0 * (1.0 - 1e-12)) {
                    best.insert(c, (total, i));
                    changed = true;
                }
            }
        }
        if !changed {
            return best;
        }
    }
}
