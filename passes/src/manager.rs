//! The pass manager: a pipeline of [`Pass`] trait objects, run with the verifier after every
//! pass, optional IR printing after chosen passes (`; ---- IR after <entry> ----`, MLIR's header,
//! the entry printed with its options: `optimize{target=cuda}`), numbered dumps
//! (`DIR/00-input.ir`, `DIR/01-<pass>.ir`, ...) and per-pass statistics.
//!
//! A manager is built from a [`Pipeline`] (parsed from `dce,optimize{target=cuda}`) and a
//! [`PassContext`] through the registry ([`crate::registry`]), or from ready-made pass objects with
//! [`PassManager::from_passes`]. The headers of `--print-ir-after-all` spell each entry
//! canonically, so they parse back to the pipeline that ran. Statistics counters are free-form
//! `(name, count)` pairs so a new pass reports whatever it counts without touching the manager.

use std::fmt::Write as _;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use llmc_ir as ir;

use crate::error::{PassError, Result};
use crate::pipeline::{PassSpec, Pipeline};
use crate::registry::{self, PassContext};

/// A graph-to-graph transformation. Implementations are stateless or carry only configuration;
/// `run` must leave a graph the verifier accepts (the manager checks).
pub trait Pass {
    /// Kebab-case name used on the command line and in dumps (`constant-fold`).
    fn name(&self) -> &'static str;
    /// One line for `llmc passes`.
    fn summary(&self) -> &'static str;
    fn run(&self, g: &mut ir::Graph) -> Result<PassStats>;
}

/// What a pass did. `counters` are named event counts (`("removed", 12)`), in the order the pass
/// first reported them; `notes` are free-text remarks (limits hit, rewrites declined).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassStats {
    pub changed: bool,
    pub counters: Vec<(String, u64)>,
    pub notes: Vec<String>,
}

impl PassStats {
    /// Adds `n` to counter `name` (creating it), and marks the graph changed when `n > 0`.
    pub fn bump(&mut self, name: &str, n: u64) {
        match self.counters.iter_mut().find(|(k, _)| k == name) {
            Some((_, v)) => *v += n,
            None => self.counters.push((name.to_string(), n)),
        }
        if n > 0 {
            self.changed = true;
        }
    }

    /// The value of counter `name`, 0 when never reported.
    pub fn get(&self, name: &str) -> u64 {
        self.counters.iter().find(|(k, _)| k == name).map_or(0, |(_, v)| *v)
    }
}

/// Which passes print the IR after they run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PrintAfter {
    #[default]
    None,
    All,
    /// After each run of these passes; every name must be a pass of the pipeline.
    Passes(Vec<String>),
}

/// Runs a pipeline; see the module docs.
pub struct PassManager {
    /// Each pass with the entry it was built from (printed in headers).
    passes: Vec<(PassSpec, Box<dyn Pass>)>,
    print_after: PrintAfter,
    dump_dir: Option<PathBuf>,
    stats: bool,
}

impl PassManager {
    /// A manager for `pipeline`, each entry built by the registry with `ctx`: an unknown pass,
    /// an unknown option or a bad value is an error naming it.
    pub fn new(pipeline: &[PassSpec], ctx: &PassContext) -> Result<Self> {
        let passes = pipeline.iter().map(|spec| Ok((spec.clone(), registry::build(spec, ctx)?))).collect::<Result<_>>()?;
        Ok(PassManager { passes, print_after: PrintAfter::None, dump_dir: None, stats: false })
    }

    /// [`PassManager::new`] for a pipeline spec such as `dce,optimize{target=cuda}`.
    pub fn parse(spec: &str, ctx: &PassContext) -> Result<Self> {
        Self::new(&Pipeline::parse(spec)?, ctx)
    }

    /// A manager for ready-made pass objects (for configurations no pipeline entry spells, such
    /// as a rule subset); their headers print the bare pass name.
    pub fn from_passes(passes: Vec<Box<dyn Pass>>) -> Self {
        let passes = passes.into_iter().map(|p| (PassSpec::new(p.name()), p)).collect();
        PassManager { passes, print_after: PrintAfter::None, dump_dir: None, stats: false }
    }

    pub fn print_after(mut self, p: PrintAfter) -> Self {
        self.print_after = p;
        self
    }

    /// Writes `DIR/00-input.ir` and then `DIR/NN-<pass>.ir` after each pass; `DIR` is created.
    pub fn dump_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.dump_dir = dir;
        self
    }

    /// Writes a statistics table (time, node counts, counters per pass) to `out` after the run.
    pub fn stats(mut self, on: bool) -> Self {
        self.stats = on;
        self
    }

    /// The pipeline this manager runs, each entry as given (with its options).
    pub fn pipeline(&self) -> Pipeline {
        self.passes.iter().map(|(spec, _)| spec.clone()).collect()
    }

    fn check_print_after(&self) -> Result<()> {
        let PrintAfter::Passes(names) = &self.print_after else { return Ok(()) };
        let pipeline = self.pipeline();
        for name in names {
            if pipeline.iter().any(|p| p.name == *name) {
                continue;
            }
            let why = if registry::lookup(name).is_none() {
                format!("which is not a known pass; known passes: {}", registry::known_names())
            } else {
                format!("which is not in the pipeline ({pipeline})")
            };
            return Err(PassError::PrintAfter { name: name.clone(), why });
        }
        Ok(())
    }

    /// Writes `DIR/NN-<label>.ir`; the header names `spec` (none: the input).
    fn dump(&self, idx: usize, label: &str, spec: Option<&PassSpec>, g: &ir::Graph) -> Result<()> {
        let Some(dir) = &self.dump_dir else { return Ok(()) };
        std::fs::create_dir_all(dir).map_err(|source| PassError::Dump { path: dir.clone(), source })?;
        let path = dir.join(format!("{idx:02}-{label}.ir"));
        let header = match spec {
            None => "; ---- input IR ----".to_string(),
            Some(spec) => format!("; ---- IR after {spec} ----"),
        };
        let text = format!("{header}\n{}", ir::print(g));
        std::fs::write(&path, text).map_err(|source| PassError::Dump { path, source })
    }

    /// Verifies `g`, then runs each pass followed by the verifier. Returns each pass's name,
    /// statistics and wall time, in pipeline order. On error `g` holds the graph as the failing
    /// pass left it.
    pub fn run(&self, g: &mut ir::Graph, out: &mut dyn Write) -> Result<Vec<(String, PassStats, Duration)>> {
        self.check_print_after()?;
        ir::verify(g).map_err(|source| PassError::InvalidInput { source })?;
        self.dump(0, "input", None, g)?;
        let mut results = Vec::with_capacity(self.passes.len());
        let mut counts = Vec::with_capacity(self.passes.len());
        for (i, (spec, pass)) in self.passes.iter().enumerate() {
            let name = pass.name();
            let before = g.node_count();
            let t0 = Instant::now();
            let stats = pass.run(g).map_err(|e| PassError::Pass { pass: name.to_string(), source: Box::new(e) })?;
            let dt = t0.elapsed();
            counts.push((before, g.node_count()));
            let print = match &self.print_after {
                PrintAfter::None => false,
                PrintAfter::All => true,
                PrintAfter::Passes(ps) => ps.iter().any(|p| p == name),
            };
            if print {
                write!(out, "; ---- IR after {spec} ----\n{}", ir::print(g)).map_err(PassError::Output)?;
            }
            self.dump(i + 1, name, Some(spec), g)?;
            // Printed and dumped first, so a graph the verifier rejects can be read.
            ir::verify(g).map_err(|source| PassError::Verify { pass: name.to_string(), source })?;
            results.push((name.to_string(), stats, dt));
        }
        if self.stats {
            out.write_all(stats_table(&results, &counts).as_bytes()).map_err(PassError::Output)?;
        }
        Ok(results)
    }
}

/// The statistics table, as IR comments so it can sit in the middle of a dump.
fn stats_table(results: &[(String, PassStats, Duration)], counts: &[(usize, usize)]) -> String {
    let mut s = String::from("; ---- pass statistics ----\n");
    let _ = writeln!(s, "; {:<3} {:<16} {:>10}  {:>15}  counters", "#", "pass", "time", "nodes");
    let mut total = Duration::ZERO;
    for (i, ((name, st, dt), (b, a))) in results.iter().zip(counts).enumerate() {
        total += *dt;
        let ctrs: Vec<String> = st.counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let nodes = format!("{b} -> {a}");
        let _ = writeln!(
            s,
            "; {:<3} {:<16} {:>8.3}ms  {:>15}  {}",
            i + 1,
            name,
            dt.as_secs_f64() * 1e3,
            nodes,
            ctrs.join(" ")
        );
        for n in &st.notes {
            let _ = writeln!(s, ";     note: {n}");
        }
    }
    let _ = writeln!(s, "; total {:.3}ms", total.as_secs_f64() * 1e3);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::default_pipeline;
    use crate::testutil::*;
    use ir::{BinaryOp, Op, UnaryOp};

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// The manager for pipeline `spec` on the default (cpu) context.
    fn pm(spec: &str) -> PassManager {
        PassManager::parse(spec, &PassContext::default()).unwrap_or_else(|e| panic!("{spec}: {e}"))
    }

    /// `exp(x)` twice (a CSE target), a dead `tanh`, `1 * 2` on consts.
    fn sample() -> ir::Graph {
        let mut g = ir::Graph::new("sample");
        let (_, x) = embed(&mut g, 8, 4);
        let e1 = g.add(Op::Unary(UnaryOp::Exp), &[x], None).unwrap();
        let e2 = g.add(Op::Unary(UnaryOp::Exp), &[x], None).unwrap();
        let _dead = g.add(Op::Unary(UnaryOp::Tanh), &[x], None).unwrap();
        let a = constant(&mut g, &[4], vec![1.0; 4]);
        let b = constant(&mut g, &[4], vec![2.0; 4]);
        let c = g.add(Op::Binary(BinaryOp::Mul), &[a, b], None).unwrap();
        let s = g.add(Op::Binary(BinaryOp::Add), &[e1, e2], None).unwrap();
        let y = g.add(Op::Binary(BinaryOp::Mul), &[s, c], None).unwrap();
        g.outputs = vec![y];
        g
    }

    /// Breaks the graph: retypes the first output to a wrong shape.
    struct Breaker;
    impl Pass for Breaker {
        fn name(&self) -> &'static str {
            "breaker"
        }
        fn summary(&self) -> &'static str {
            "test pass that corrupts a type"
        }
        fn run(&self, g: &mut ir::Graph) -> Result<PassStats> {
            let o = g.outputs[0];
            g.g[o].ty = ir::TensorType::f32(vec![ir::Dim::N(3)]);
            Ok(PassStats { changed: true, ..Default::default() })
        }
    }

    #[test]
    fn default_pipeline_resolves_and_the_manager_keeps_each_entry() {
        let ctx = PassContext::default();
        assert_eq!(PassManager::new(&default_pipeline(), &ctx).unwrap().pipeline(), default_pipeline());
        let spec = "dce, optimize{ iterations = 3 ,target=cuda}";
        assert_eq!(pm(spec).pipeline().to_string(), "dce,optimize{iterations=3,target=cuda}");
        // A syntax error is reported before any pass is built.
        let e = PassManager::parse("dce,fuse-everything{", &ctx).err().unwrap();
        assert!(matches!(e, PassError::Syntax { column: 20, .. }), "{e:?}");
    }

    #[test]
    fn unknown_pass_is_an_error_listing_known_ones() {
        let e = PassManager::parse("dce,fuse-everything", &PassContext::default()).err().unwrap();
        let msg = e.to_string();
        assert!(matches!(e, PassError::UnknownPass { ref name, .. } if name == "fuse-everything"));
        assert!(msg.contains("fuse-everything") && msg.contains("dce, cse, constant-fold"), "{msg}");
    }

    #[test]
    fn print_after_names_are_checked() {
        let mut g = sample();
        let mut out = Vec::new();
        let m = pm("dce").print_after(PrintAfter::Passes(names(&["nope"])));
        let e = m.run(&mut g, &mut out).unwrap_err();
        assert!(e.to_string().contains("`nope`, which is not a known pass"), "{e}");
        let m = pm("dce,optimize{target=cuda}").print_after(PrintAfter::Passes(names(&["cse"])));
        let e = m.run(&mut g, &mut out).unwrap_err();
        assert!(e.to_string().contains("`cse`, which is not in the pipeline (dce,optimize{target=cuda})"), "{e}");
        assert!(out.is_empty());
    }

    #[test]
    fn runs_pipeline_and_prints_after_chosen_passes() {
        let before = sample();
        let mut g = before.clone();
        let mut out = Vec::new();
        let pipeline = "dce,cse,constant-fold,dce";
        let res = pm(pipeline).print_after(PrintAfter::Passes(names(&["cse"]))).run(&mut g, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(res.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(), vec!["dce", "cse", "constant-fold", "dce"]);
        assert_eq!(res[0].1.get("removed"), 1);
        assert_eq!(res[1].1.get("merged"), 1);
        assert_eq!(res[2].1.get("folded"), 1);
        assert_eq!(res[3].1.get("removed"), 2);
        assert_eq!(text.matches("; ---- IR after cse ----\ngraph @sample {").count(), 1, "{text}");
        assert!(!text.contains("after dce"));
        assert_eq!(g.node_count(), 7, "{}", ir::print(&g));
        assert_same_outputs(&before, &g, &[3, 1]);

        let mut g = before.clone();
        let mut out = Vec::new();
        pm(pipeline).print_after(PrintAfter::All).run(&mut g, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let headers: Vec<&str> = text.lines().filter(|l| l.starts_with("; ----")).collect();
        assert_eq!(
            headers,
            vec![
                "; ---- IR after dce ----",
                "; ---- IR after cse ----",
                "; ---- IR after constant-fold ----",
                "; ---- IR after dce ----"
            ]
        );
        // What is printed is the graph after that pass: the last print parses to the result.
        let last = text.rsplit("; ---- IR after dce ----\n").next().unwrap();
        assert!(ir::parse(last).unwrap() == g);
    }

    #[test]
    fn verifier_failure_names_the_pass() {
        let mut g = sample();
        let pm = PassManager::from_passes(vec![Box::new(crate::Dce), Box::new(Breaker), Box::new(crate::Cse)]);
        let e = pm.run(&mut g, &mut Vec::new()).unwrap_err();
        match &e {
            PassError::Verify { pass, .. } => assert_eq!(pass, "breaker"),
            other => panic!("wrong error {other:?}"),
        }
        assert!(e.to_string().starts_with("verifier failed after pass `breaker`: verifier: %"), "{e}");
    }

    #[test]
    fn invalid_input_is_rejected_before_any_pass() {
        let mut g = sample();
        g.outputs.clear();
        let e = pm("dce").run(&mut g, &mut Vec::new()).unwrap_err();
        assert!(matches!(e, PassError::InvalidInput { .. }), "{e:?}");
        assert!(e.to_string().contains("has no outputs"), "{e}");
    }

    #[test]
    fn dumps_one_numbered_file_per_pass_and_stats() {
        let dir = std::env::temp_dir().join(format!("llmc-passes-dump-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut g = sample();
        let mut out = Vec::new();
        pm("dce,cse,constant-fold,dce").dump_dir(Some(dir.clone())).stats(true).run(&mut g, &mut out).unwrap();
        let mut files: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        files.sort();
        assert_eq!(files, vec!["00-input.ir", "01-dce.ir", "02-cse.ir", "03-constant-fold.ir", "04-dce.ir"]);
        let input = std::fs::read_to_string(dir.join("00-input.ir")).unwrap();
        assert!(input.starts_with("; ---- input IR ----\n"));
        assert!(std::fs::read_to_string(dir.join("02-cse.ir")).unwrap().starts_with("; ---- IR after cse ----\n"));
        assert!(ir::parse(&input).unwrap() == sample());
        let last = std::fs::read_to_string(dir.join("04-dce.ir")).unwrap();
        assert!(ir::parse(&last).unwrap() == g);
        let _ = std::fs::remove_dir_all(&dir);

        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("; ---- pass statistics ----\n"), "{text}");
        assert!(text.contains("cse") && text.contains("merged=1") && text.contains("folded=1"), "{text}");
        assert!(text.contains("11 -> 10"), "{text}");
        assert!(text.lines().all(|l| l.starts_with(';')));
    }

    #[test]
    fn dump_into_a_file_path_is_an_error_naming_it() {
        let file = std::env::temp_dir().join(format!("llmc-passes-notadir-{}", std::process::id()));
        std::fs::write(&file, "x").unwrap();
        let mut g = sample();
        let e = pm("dce")
            .dump_dir(Some(file.clone()))
            .run(&mut g, &mut Vec::new())
            .unwrap_err();
        assert!(matches!(e, PassError::Dump { .. }), "{e:?}");
        assert!(e.to_string().contains(&*file.to_string_lossy()), "{e}");
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn stats_bump_accumulates() {
        let mut st = PassStats::default();
        st.bump("a", 0);
        assert!(!st.changed);
        st.bump("a", 2);
        st.bump("b", 1);
        st.bump("a", 3);
        assert!(st.changed);
        assert_eq!(st.counters, vec![("a".to_string(), 5), ("b".to_string(), 1)]);
        assert_eq!(st.get("c"), 0);
    }
}
