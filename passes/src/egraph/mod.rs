//! `optimize`: the e-graph optimizer. Fuses attention, norms and matmul epilogues, merges sibling
//! projections and cleans up layouts, choosing among equivalent forms by a per-target cost model.
//!
//! Processing order: [`layers`] cuts the graph into regions at the residual stream and abstracts
//! each into a name-free form; each *distinct* form is optimized once: [`bridge`] builds its
//! e-graph in the [`lang`] language with the [`analysis`] (types), egg's `Runner` applies the
//! [`rules`](crate::rules) under node and iteration fuel (time only as a safety valve whose trip
//! is an error: [`Limits`]), [`extract`] picks the cheapest DAG under [`cost`] within its move fuel, and [`bridge`] turns it back into a region; [`layers`] then replays the result
//! into every region of that form (weights and states renamed) and renumbers the graph.
//!
//! Statistics (`--pass-stats`): regions and how many were reused, e-graph time, size, iterations,
//! why saturation stopped (`stop-*` counters, one per distinct region) and how often each rule
//! fired (`fired:<rule>`, summed over distinct regions), plus the estimated cost before and after.
//! [`explain`] shows, for one value, the alternatives in its e-class and why the chosen one won.

pub mod analysis;
pub mod bridge;
pub mod cost;
pub mod extract;
pub mod lang;
pub mod layers;
#[cfg(test)]
mod tests;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::rc::Rc;
use std::time::{Duration, Instant};

use egg::{BackoffScheduler, Id, Language, Runner, StopReason};
use llmc_ir::{Graph, Op, TensorType};

use crate::error::{PassError, Result};
use crate::manager::{Pass, PassStats};
use crate::registry::{PassContext, PassOption, PassOptions, RegisteredPass};
use crate::rules::{self, RuleDef, Rw};
use analysis::{LeafKind, EG};
pub use cost::{CostModel, Target};
use extract::{Costs, Extractor, Selection};
use lang::Tn;
use layers::{Ref, Region};

/// Saturation and extraction limits, per distinct region. Every bound on the result is fuel (a
/// count), so an artifact never depends on machine load; `time_valve` only guards against a
/// runaway region, and tripping it is an error naming `time-limit`, never a different result.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// E-nodes in the e-graph (egg's node limit).
    pub nodes: usize,
    /// Rule-application rounds.
    pub iterations: usize,
    /// Candidate selections the extraction's local search evaluates.
    pub extract_moves: usize,
    /// Wall time one region's saturation, and then its extraction, may take before the pass
    /// fails (a safety valve, not a bound: see above).
    pub time_valve: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { nodes: 10_000, iterations: 24, extract_moves: 100_000, time_valve: Duration::from_secs(120) }
    }
}

/// The error of a tripped safety valve: which phase, the limit, and what to change.
fn valve_error(phase: &str, limits: &Limits) -> PassError {
    PassError::Optimize(format!(
        "{phase} of one region ran past the {:.3} s safety limit (`optimize{{time-limit=SECONDS}}`): raise time-limit, \
         or lower the fuel (node-limit={}, iterations={}, extract-moves={}); the limit is a valve, never a bound on the result",
        limits.time_valve.as_secs_f64(),
        limits.nodes,
        limits.iterations,
        limits.extract_moves
    ))
}

/// The pass, with its configuration.
pub struct Optimize {
    pub limits: Limits,
    pub cost: CostModel,
    pub rules: Vec<RuleDef>,
    /// Optimize each distinct region once and replay the result (off: every region on its own).
    pub reuse: bool,
    /// Extract with a penalty on the input's own e-nodes, so that every rewrite that applies is in
    /// the result (used by the soundness tests; never worth it for speed).
    pub prefer_rewrites: bool,
}

impl Default for Optimize {
    fn default() -> Self {
        Optimize::new(Target::cpu(None))
    }
}

/// What optimizing one distinct region did.
#[derive(Clone, Debug)]
pub struct RegionReport {
    pub iterations: usize,
    pub stop: StopReason,
    pub egraph_nodes: usize,
    pub egraph_classes: usize,
    /// Times each rule changed the e-graph, in first-fired order.
    pub fired: Vec<(String, usize)>,
    pub saturate_time: Duration,
    pub extract_time: Duration,
    /// Candidate selections the extraction evaluated, and whether its fuel ran out first.
    pub extract_moves: usize,
    pub extract_out_of_fuel: bool,
    /// Estimated seconds of the region before and after (each value counted once).
    pub cost_before: f64,
    pub cost_after: f64,
}

/// One distinct region, optimized.
struct Outcome {
    template: Region,
    changed: bool,
    report: RegionReport,
}

/// The e-graph state of one region after saturation and extraction.
struct Session {
    built: bridge::Built,
    costs: Costs,
    sel: Selection,
    report: RegionReport,
    changed: bool,
    template: Region,
}

fn stop_name(s: &StopReason) -> &'static str {
    match s {
        StopReason::Saturated => "saturated",
        StopReason::IterationLimit(_) => "iteration-limit",
        StopReason::NodeLimit(_) => "node-limit",
        StopReason::TimeLimit(_) => "time-limit",
        StopReason::Other(_) => "other",
    }
}

fn us(s: f64) -> String {
    format!("{:.3}us", s * 1e6)
}

/// The estimated cost of a region under `model`: every node once.
pub fn region_cost(model: &CostModel, r: &Region) -> f64 {
    let mut statics: Vec<bool> = Vec::with_capacity(r.nodes.len());
    let mut total = 0.0;
    for n in &r.nodes {
        let ins: Vec<(&TensorType, bool)> = n
            .ins
            .iter()
            .map(|x| match *x {
                Ref::Leaf(l) => (&r.leaves[l as usize].ty, r.leaves[l as usize].is_static()),
                Ref::Node(i) => (&r.nodes[i as usize].ty, statics[i as usize]),
            })
            .collect();
        let tys: Vec<&TensorType> = ins.iter().map(|x| x.0).collect();
        let st: Vec<bool> = ins.iter().map(|x| x.1).collect();
        statics.push(matches!(n.op, Op::Concat { .. }) && st.iter().all(|&s| s));
        total += model.op_cost(&n.op, &tys, &n.ty, &st);
    }
    total
}

impl Optimize {
    /// All rules, default limits, layer reuse on, costs for `target`.
    pub fn new(target: Target) -> Self {
        Optimize {
            limits: Limits::default(),
            cost: CostModel::new(target),
            rules: rules::all_rules(),
            reuse: true,
            prefer_rewrites: false,
        }
    }

    /// The default configuration for the target named `name` (`cpu`, `cuda`), for `--target`.
    pub fn for_target(name: &str) -> Result<Self> {
        Ok(Optimize::new(PassContext::for_target(name)?.target))
    }

    /// The same configuration with only `rules`.
    pub fn with_rules(mut self, rules: Vec<RuleDef>) -> Self {
        self.rules = rules;
        self
    }

    /// The same configuration without the rules named in `names` (for a `--disable-rule` flag);
    /// an unknown name is an error listing the known ones.
    pub fn without_rules(mut self, names: &[&str]) -> Result<Self> {
        for n in names {
            if !self.rules.iter().any(|d| d.name() == *n) {
                let known: Vec<&str> = self.rules.iter().map(|d| d.name()).collect();
                return Err(PassError::Optimize(format!("unknown rule `{n}`; known rules: {}", known.join(", "))));
            }
        }
        self.rules.retain(|d| !names.contains(&d.name()));
        Ok(self)
    }

    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    fn compile_rules(&self) -> Result<Vec<Rw>> {
        rules::compile(&self.rules).map_err(PassError::Optimize)
    }

    /// Saturates and extracts one region.
    fn session(&self, r: &Region, rules: &[Rw]) -> Result<Session> {
        let t0 = Instant::now();
        let built = bridge::to_egraph(r)?;
        let original: Vec<Tn> = built.eg.classes().flat_map(|c| c.nodes.iter().cloned()).collect();
        let bridge::Built { eg, classes, roots, n_outputs } = built;
        // For `prefer_rewrites`: the iteration at which each e-node first appeared.
        let born: Rc<RefCell<Vec<(Tn, usize)>>> = Rc::default();
        let mut runner: Runner<Tn, analysis::TensorAnalysis> = Runner::default();
        if self.prefer_rewrites {
            let born = born.clone();
            runner = runner.with_hook(move |r| {
                let gen = r.iterations.len();
                let mut b = born.borrow_mut();
                for c in r.egraph.classes() {
                    b.extend(c.nodes.iter().map(|n| (n.clone(), gen)));
                }
                Ok(())
            });
        }
        let runner = runner
            .with_egraph(eg)
            .with_node_limit(self.limits.nodes)
            .with_iter_limit(self.limits.iterations)
            .with_time_limit(self.limits.time_valve)
            .with_scheduler(BackoffScheduler::default())
            .run(rules);
        let stop = runner.stop_reason.clone().unwrap_or(StopReason::Other("not run".into()));
        if matches!(stop, StopReason::TimeLimit(_)) {
            return Err(valve_error("saturation", &self.limits));
        }
        let mut fired: Vec<(String, usize)> = Vec::new();
        for it in &runner.iterations {
            for (name, &n) in &it.applied {
                match fired.iter_mut().find(|(k, _)| k.as_str() == name.as_str()) {
                    Some((_, v)) => *v += n,
                    None => fired.push((name.to_string(), n)),
                }
            }
        }
        let iterations = runner.iterations.len();
        let mut eg = runner.egraph;
        eg.rebuild();
        if let Some(c) = eg.analysis.conflicts.first() {
            return Err(PassError::Optimize(format!("unsound rewrite: {c}")));
        }
        let saturate_time = t0.elapsed();
        let t1 = Instant::now();
        let canon = |eg: &EG, n: &Tn| n.clone().map_children(|c| eg.find(c));
        let orig: HashSet<Tn> = original.iter().map(|n| canon(&eg, n)).collect();
        // Rewritten forms first: an e-node from an earlier iteration costs 1000x more per
        // iteration of age, so the extraction takes each rewrite chain as far as it went, however
        // many e-nodes the newer form has.
        let mut first_seen: HashMap<Tn, usize> = HashMap::new();
        for (n, gen) in born.borrow().iter() {
            let e = first_seen.entry(canon(&eg, n)).or_insert(*gen);
            *e = (*e).min(*gen);
        }
        let last = iterations + 1;
        let penalty = |_: Id, n: &Tn| {
            if !self.prefer_rewrites || matches!(n, Tn::Leaf(_) | Tn::Attr(_)) {
                return 0.0;
            }
            let c = canon(&eg, n);
            let gen = if orig.contains(&c) { 0 } else { first_seen.get(&c).copied().unwrap_or(last) };
            1000f64.powi((last - gen.min(last)).min(100) as i32)
        };
        let costs = Costs::new(&eg, &self.cost, &penalty);
        let built = bridge::Built { eg, classes, roots, n_outputs };
        let (sel, search_stop, moves) = Extractor::new(&built.eg, &costs, &built.roots)
            .run(self.limits.extract_moves, self.limits.time_valve)
            .map_err(|_| valve_error("extraction", &self.limits))?
            .ok_or_else(|| PassError::Optimize("no finite-cost extraction (an output has no well-typed form)".into()))?;
        let template = bridge::to_region(&built, &sel, &r.states)?;
        if template.written_states() != r.written_states() {
            return Err(PassError::Optimize(format!(
                "the optimized region writes states {:?}, the input {:?}",
                template.written_states(),
                r.written_states()
            )));
        }
        // Unchanged: every chosen non-leaf e-node is one of the input's, and all of them are chosen.
        let chosen: Vec<Tn> = Extractor::new(&built.eg, &costs, &built.roots)
            .walk(&sel.choice)
            .map(|(_, order)| order.iter().map(|c| canon(&built.eg, &built.eg[*c].nodes[sel.choice[c]])).collect())
            .unwrap_or_default();
        let non_leaf = |n: &&Tn| !matches!(n, Tn::Leaf(_) | Tn::Attr(_));
        let changed =
            chosen.iter().filter(non_leaf).count() != r.nodes.len() || !chosen.iter().all(|n| orig.contains(n));
        let report = RegionReport {
            iterations,
            stop,
            egraph_nodes: built.eg.total_number_of_nodes(),
            egraph_classes: built.eg.number_of_classes(),
            fired,
            saturate_time,
            extract_time: t1.elapsed(),
            extract_moves: moves,
            extract_out_of_fuel: search_stop == extract::SearchStop::Fuel,
            cost_before: region_cost(&self.cost, r),
            cost_after: region_cost(&self.cost, &template),
        };
        Ok(Session { built, costs, sel, report, changed, template })
    }

    fn optimize_region(&self, r: &Region, rules: &[Rw]) -> Result<Outcome> {
        let s = self.session(r, rules)?;
        Ok(Outcome { template: s.template, changed: s.changed, report: s.report })
    }

    /// Why the optimized form of `value` won: `value` is a value of `g` as it prints (`%12`, or
    /// `12`), `g` the graph this pass would receive. Shows the value's region, the e-graph run, and
    /// the e-nodes of its e-class with their costs against the chosen one; a value that is no
    /// longer computed is explained through the nearest users that are.
    pub fn explain(&self, g: &Graph, value: &str) -> Result<String> {
        let idx: usize = value
            .trim()
            .trim_start_matches('%')
            .parse()
            .map_err(|_| PassError::Optimize(format!("--explain `{value}`: expected a value such as `%12`")))?;
        let order = g.topo_order()?;
        let Some(&node) = order.get(idx) else {
            return Err(PassError::Optimize(format!(
                "--explain `{value}`: the graph has values %0..%{}",
                order.len().saturating_sub(1)
            )));
        };
        let num: HashMap<_, _> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
        let mut out = String::new();
        let ins: Vec<String> = g.inputs(node).iter().map(|i| format!("%{}", num[i])).collect();
        let _ = writeln!(out, "; explain %{idx} = {} {} : {}", g.op(node).name(), ins.join(", "), g.ty(node));
        let regions = layers::split(g)?;
        let Some(ri) = regions.iter().position(|(_, inst)| inst.nodes.contains(&node)) else {
            let _ = writeln!(
                out,
                "; a leaf (weight, const, input or positions): not rewritten, kept as is where still used"
            );
            return Ok(out);
        };
        let (region, inst) = &regions[ri];
        let key = region.key();
        let same = regions.iter().filter(|(r, _)| r.key() == key).count();
        let (lo, hi) = (num[&inst.nodes[0]], num[inst.nodes.last().expect("regions are non-empty")]);
        let _ = writeln!(
            out,
            "; region {} of {}: {} nodes (%{lo} .. %{hi}); {} region(s) of this form, optimized once",
            ri + 1,
            regions.len(),
            region.nodes.len(),
            same
        );
        let rules = self.compile_rules()?;
        let s = self.session(region, &rules)?;
        let rep = &s.report;
        let fired: Vec<String> = rep.fired.iter().map(|(k, v)| format!("{k} x{v}")).collect();
        let _ = writeln!(
            out,
            "; e-graph: {} iterations, stopped: {:?}, {} e-nodes / {} e-classes; fired: {}",
            rep.iterations,
            rep.stop,
            rep.egraph_nodes,
            rep.egraph_classes,
            if fired.is_empty() { "none".to_string() } else { fired.join(", ") }
        );
        let _ = writeln!(out, "; cost model: {}", self.cost.describe());
        let _ = writeln!(
            out,
            "; region cost (DAG: each value once): {} before, {} after",
            us(rep.cost_before),
            us(rep.cost_after)
        );
        let local = inst.nodes.iter().position(|&n| n == node).expect("node is in its region");
        let eg = &s.built.eg;
        let class = eg.find(s.built.classes[local]);
        let ex = Extractor::new(eg, &s.costs, &s.built.roots);
        let selected: BTreeSet<Id> = ex.walk(&s.sel.choice).map(|(_, o)| o.into_iter().collect()).unwrap_or_default();
        let _ = writeln!(out, ";");
        if selected.contains(&class) {
            explain_class(&mut out, eg, &ex, &s, class);
        } else {
            let _ = writeln!(
                out,
                "; e-class c{class} ({}): not computed after optimization; no chosen e-node reads it",
                show_ty(eg, class)
            );
            for (i, n) in eg[class].nodes.iter().enumerate() {
                let _ = writeln!(out, ";     {}  own {}", show_node(eg, n), us(s.costs.get(class, i)));
            }
            // The nearest chosen classes above it explain what replaced it.
            let mut frontier = vec![class];
            let mut seen: BTreeSet<Id> = frontier.iter().copied().collect();
            let mut found = Vec::new();
            while let Some(c) = frontier.pop() {
                for &(u, _) in ex.users_of(c) {
                    if seen.insert(u) {
                        if selected.contains(&u) {
                            found.push(u);
                        } else {
                            frontier.push(u);
                        }
                    }
                }
            }
            found.sort();
            let _ = writeln!(out, "; nearest chosen users ({}):", found.len());
            for u in found.into_iter().take(3) {
                explain_class(&mut out, eg, &ex, &s, u);
            }
        }
        Ok(out)
    }
}

fn show_ty(eg: &EG, c: Id) -> String {
    eg[c].data.ty.as_ref().map_or("attribute".into(), |t| t.to_string())
}

/// An e-node with attribute operands inline and value operands as their classes.
fn show_node(eg: &EG, n: &Tn) -> String {
    match n {
        Tn::Leaf(l) => {
            let kind = eg.analysis.leaves.get(l.0 as usize).map_or("leaf", |i| match i.kind {
                LeafKind::Weight { .. } => "weight",
                LeafKind::Const { .. } => "const",
                LeafKind::Input { .. } => "input",
                LeafKind::Positions => "positions",
                LeafKind::Boundary => "boundary",
            });
            format!("{kind} {l}")
        }
        Tn::Attr(a) => a.to_string(),
        _ => {
            let kids: Vec<String> = n
                .children()
                .iter()
                .map(|&c| eg[c].data.attr.as_ref().map_or_else(|| format!("c{}", eg.find(c)), |a| a.to_string()))
                .collect();
            format!("({n} {})", kids.join(" "))
        }
    }
}

/// An e-node with its value operands expanded through their chosen e-nodes, `depth` levels deep.
fn show_expr(eg: &EG, choice: &BTreeMap<Id, usize>, n: &Tn, depth: usize) -> String {
    if depth == 0 || matches!(n, Tn::Leaf(_) | Tn::Attr(_)) {
        return show_node(eg, n);
    }
    let kids: Vec<String> = n
        .children()
        .iter()
        .map(|&c| {
            let c = eg.find(c);
            match (&eg[c].data.attr, choice.get(&c)) {
                (Some(a), _) => a.to_string(),
                (None, Some(&i)) if !matches!(eg[c].nodes[i], Tn::Leaf(_)) => {
                    show_expr(eg, choice, &eg[c].nodes[i], depth - 1)
                }
                _ => format!("c{c}"),
            }
        })
        .collect();
    format!("({n} {})", kids.join(" "))
}

fn explain_class(out: &mut String, eg: &EG, ex: &Extractor<'_>, s: &Session, class: Id) {
    let chosen = s.sel.choice.get(&class).copied();
    let _ = writeln!(out, "; e-class c{class} ({}), {} e-node(s):", show_ty(eg, class), eg[class].nodes.len());
    let _ = writeln!(
        out,
        ";   own = this op alone; tree = with its operands' cheapest forms (shared ones counted per use);"
    );
    let _ = writeln!(out, ";   dag = the region's cost if this e-node were chosen, everything else as extracted");
    for (i, n) in eg[class].nodes.iter().enumerate() {
        let own = s.costs.get(class, i);
        let mut trial = s.sel.choice.clone();
        trial.insert(class, i);
        let dag = ex.dag_cost(&trial);
        let mark = if Some(i) == chosen { "*" } else { " " };
        let why = if !own.is_finite() {
            "  (not extractable: does not type-check as this class)".to_string()
        } else if dag.is_none() {
            "  (would make the selection cyclic)".to_string()
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "; {mark} {}  own {}  tree {}  dag {}{why}",
            show_expr(eg, &s.sel.choice, n, 2),
            us(own),
            us(ex.node_tree_cost(class, i)),
            dag.map_or("-".into(), us)
        );
    }
}

/// [`Optimize::explain`] with the default configuration.
pub fn explain(g: &Graph, value: &str) -> Result<String> {
    Optimize::default().explain(g, value)
}

/// A positive integer option value.
fn positive(v: &str) -> std::result::Result<usize, String> {
    match v.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        Ok(_) => Err("must be at least 1".into()),
        Err(_) => Err("not a positive integer".into()),
    }
}

impl RegisteredPass for Optimize {
    const NAME: &'static str = "optimize";
    const SUMMARY: &'static str =
        "e-graph optimizer: fuse attention, norms, matmul epilogues; merge projections; cost-based, layers optimized once";
    const OPTIONS: &'static [PassOption] = &[
        PassOption {
            name: "target",
            values: "cpu|cuda",
            default: "the pipeline's target (llmc compile --target)",
            summary: "whose cost model chooses among equivalent forms",
        },
        PassOption {
            name: "node-limit",
            values: "a positive integer",
            default: "10000",
            summary: "e-nodes per distinct region before saturation stops",
        },
        PassOption {
            name: "iterations",
            values: "a positive integer",
            default: "24",
            summary: "rule-application rounds per distinct region",
        },
        PassOption {
            name: "extract-moves",
            values: "a positive integer",
            default: "100000",
            summary: "candidate selections the extraction's local search evaluates per distinct region",
        },
        PassOption {
            name: "time-limit",
            values: "seconds (a positive number)",
            default: "120",
            summary: "safety valve per region: running past it is an error, never a different result",
        },
    ];

    /// Costs for the context's target unless `target` says otherwise; the default [`Limits`]
    /// with the fuel (`node-limit`, `iterations`, `extract-moves`) and the valve (`time-limit`)
    /// replaced when given.
    fn from_options(opts: &PassOptions<'_>, ctx: &PassContext) -> Result<Self> {
        let target = opts
            .parse("target", |v| Target::by_name(v).ok_or_else(|| format!("no cost model for target `{v}`")))?
            .unwrap_or_else(|| ctx.target.clone());
        let mut limits = Limits::default();
        if let Some(n) = opts.parse("node-limit", positive)? {
            limits.nodes = n;
        }
        if let Some(n) = opts.parse("iterations", positive)? {
            limits.iterations = n;
        }
        if let Some(n) = opts.parse("extract-moves", positive)? {
            limits.extract_moves = n;
        }
        if let Some(t) = opts.parse("time-limit", |v| match v.parse::<f64>() {
            Ok(t) if t > 0.0 && t.is_finite() => Ok(Duration::from_secs_f64(t)),
            _ => Err(format!("`{v}` is not a positive number of seconds")),
        })? {
            limits.time_valve = t;
        }
        Ok(Optimize::new(target).with_limits(limits))
    }
}

impl Pass for Optimize {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn summary(&self) -> &'static str {
        Self::SUMMARY
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats> {
        let t0 = Instant::now();
        let rules = self.compile_rules()?;
        let regions = layers::split(g)?;
        let mut cache: HashMap<String, usize> = HashMap::new();
        let mut outcomes: Vec<(Outcome, usize)> = Vec::new();
        let mut moved = HashMap::new();
        let mut removed = Vec::new();
        let mut reused = 0;
        let mut cost = (0.0, 0.0);
        for (r, inst) in &regions {
            let key = r.key();
            let idx = match cache.get(&key).copied().filter(|_| self.reuse) {
                Some(i) => {
                    reused += 1;
                    i
                }
                None => {
                    outcomes.push((self.optimize_region(r, &rules)?, 0));
                    cache.insert(key, outcomes.len() - 1);
                    outcomes.len() - 1
                }
            };
            let (o, uses) = &mut outcomes[idx];
            *uses += 1;
            cost.0 += o.report.cost_before;
            cost.1 += if o.changed { o.report.cost_after } else { o.report.cost_before };
            if !o.changed {
                continue;
            }
            let outs = layers::instantiate(g, &o.template, inst, &moved)?;
            for (&old, new) in inst.outputs.iter().zip(outs) {
                g.replace_all_uses(old, new);
                moved.insert(old, new);
            }
            removed.extend(inst.nodes.iter().copied());
        }
        let changed = !removed.is_empty();
        for n in removed {
            g.remove(n);
        }
        if changed {
            *g = layers::renumber(g)?;
        }

        let mut st = PassStats::default();
        st.bump("regions", regions.len() as u64);
        st.bump("distinct-regions", outcomes.len() as u64);
        st.bump("reused-regions", reused);
        st.bump("changed-regions", outcomes.iter().filter(|o| o.0.changed).map(|o| o.1 as u64).sum());
        let sum = |f: &dyn Fn(&RegionReport) -> u64| outcomes.iter().map(|(o, _)| f(&o.report)).sum::<u64>();
        st.bump("egraph-us", sum(&|r| (r.saturate_time + r.extract_time).as_micros() as u64));
        st.bump("saturate-us", sum(&|r| r.saturate_time.as_micros() as u64));
        st.bump("extract-us", sum(&|r| r.extract_time.as_micros() as u64));
        st.bump("egraph-nodes", sum(&|r| r.egraph_nodes as u64));
        st.bump("egraph-classes", sum(&|r| r.egraph_classes as u64));
        st.bump("egraph-nodes-max", outcomes.iter().map(|(o, _)| o.report.egraph_nodes as u64).max().unwrap_or(0));
        st.bump("iterations", sum(&|r| r.iterations as u64));
        st.bump("extract-moves", sum(&|r| r.extract_moves as u64));
        st.bump("extract-out-of-fuel", outcomes.iter().filter(|(o, _)| o.report.extract_out_of_fuel).count() as u64);
        for name in ["saturated", "iteration-limit", "node-limit", "time-limit", "other"] {
            st.bump(
                &format!("stop-{name}"),
                outcomes.iter().filter(|(o, _)| stop_name(&o.report.stop) == name).count() as u64,
            );
        }
        let mut fired: BTreeMap<String, u64> = BTreeMap::new();
        for (o, _) in &outcomes {
            for (k, v) in &o.report.fired {
                *fired.entry(k.clone()).or_default() += *v as u64;
            }
        }
        for d in &self.rules {
            if let Some(&v) = fired.get(d.name()) {
                st.bump(&format!("fired:{}", d.name()), v);
            }
        }
        st.bump("cost-before-us", (cost.0 * 1e6).round() as u64);
        st.bump("cost-after-us", (cost.1 * 1e6).round() as u64);
        st.bump("pass-us", t0.elapsed().as_micros() as u64);
        st.notes.push(format!(
            "fuel per distinct region: {} e-nodes, {} iterations, {} extraction moves (safety valve {:?}); {}",
            self.limits.nodes,
            self.limits.iterations,
            self.limits.extract_moves,
            self.limits.time_valve,
            self.cost.describe()
        ));
        for (i, (o, uses)) in outcomes.iter().enumerate() {
            let r = &o.report;
            st.notes.push(format!(
                "region form {} (x{uses}): {} iterations, stop {:?}, {} e-nodes / {} e-classes, {:.2} ms saturate + {:.2} ms extract, cost {} -> {}{}",
                i + 1,
                r.iterations,
                r.stop,
                r.egraph_nodes,
                r.egraph_classes,
                r.saturate_time.as_secs_f64() * 1e3,
                r.extract_time.as_secs_f64() * 1e3,
                us(r.cost_before),
                us(if o.changed { r.cost_after } else { r.cost_before }),
                if o.changed { "" } else { " (unchanged)" }
            ));
        }
        st.changed = changed;
        Ok(st)
    }
}
