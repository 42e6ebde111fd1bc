//! Filetests, in the manner of Cranelift's filetests and MLIR's FileCheck: each file under
//! `tests/filetests/` holds cases separated by a line `; -----`. A case starts with a header,
//! `; test pass <pipeline>` (a pipeline spec with options, as `--passes` takes it:
//! `; test pass dce,optimize{target=cuda}`) or `; test roundtrip`, then the input IR, then
//! directives:
//!
//! - `; check: <text>` matches the next output line (searching forward, in order) that equals
//!   `<text>` after trimming both;
//! - `; check-not: <text>`: no output line between the previous match (or the start) and the next
//!   match (or the end) contains `<text>`.
//!
//! `test pass` runs the pipeline through the `PassManager` (verifier before and after every pass,
//! the default `cpu` context unless an entry says otherwise) and checks the printed result, which must also parse back to the same graph. `test roundtrip`
//! checks `parse(print(g)) == g` and `print(parse(print(g))) == print(g)`, then checks the print.
//!
//! `LLMC_BLESS=1 cargo test --test filetests` rewrites each case's `; check:` lines from the actual
//! output (every non-blank line), leaving `; check-not:` lines and everything else in place, then
//! checks the rewritten files as usual. Review the diff before committing it.

use std::path::{Path, PathBuf};

use llmc_ir as ir;
use llmc_passes::{PassContext, PassManager, Pipeline, PrintAfter};

#[derive(Clone, Debug, PartialEq)]
enum Directive {
    /// 1-based line in the file, text.
    Check(usize, String),
    CheckNot(usize, String),
}

#[derive(Clone, Debug, PartialEq)]
enum Mode {
    Pass(Pipeline),
    Roundtrip,
}

/// One case: its lines (with 1-based file line numbers), header and directives.
#[derive(Debug)]
struct Case {
    /// (file line number, text) for every line of the case, separator excluded.
    lines: Vec<(usize, String)>,
    mode: Mode,
    directives: Vec<Directive>,
}

const SEPARATOR: &str = "; -----";

fn directive(line: &str, ln: usize) -> Result<Option<Directive>, String> {
    let t = line.trim();
    if let Some(rest) = t.strip_prefix("; check:") {
        return Ok(Some(Directive::Check(ln, rest.trim().to_string())));
    }
    if let Some(rest) = t.strip_prefix("; check-not:") {
        return Ok(Some(Directive::CheckNot(ln, rest.trim().to_string())));
    }
    if t.starts_with("; check") {
        return Err(format!("line {ln}: unknown directive `{t}` (known: `; check:`, `; check-not:`)"));
    }
    Ok(None)
}

/// Splits a file into cases and reads each header and its directives.
fn parse_file(text: &str) -> Result<Vec<Case>, String> {
    let mut groups: Vec<Vec<(usize, String)>> = vec![Vec::new()];
    for (i, line) in text.lines().enumerate() {
        if line.trim() == SEPARATOR {
            groups.push(Vec::new());
        } else {
            groups.last_mut().unwrap().push((i + 1, line.to_string()));
        }
    }
    let mut cases = Vec::new();
    for lines in groups {
        let Some((hln, header)) = lines.iter().find(|(_, l)| !l.trim().is_empty()) else {
            return Err("empty case (two separators in a row, or a separator at the end)".into());
        };
        let h = header.trim();
        let mode = if let Some(rest) = h.strip_prefix("; test pass ") {
            let pipeline = Pipeline::parse(rest).map_err(|e| format!("line {hln}: {e}"))?;
            if pipeline.is_empty() {
                return Err(format!("line {hln}: `; test pass` names no pass"));
            }
            Mode::Pass(pipeline)
        } else if h == "; test roundtrip" {
            Mode::Roundtrip
        } else {
            return Err(format!(
                "line {hln}: a case must start with `; test pass <p>[,<p>..]` or `; test roundtrip`, found `{h}`"
            ));
        };
        let mut directives = Vec::new();
        for (ln, l) in &lines {
            if let Some(d) = directive(l, *ln)? {
                directives.push(d);
            }
        }
        cases.push(Case { lines, mode, directives });
    }
    Ok(cases)
}

/// Graph equality with consts compared bitwise (all NaNs alike). `ir::Graph`'s `PartialEq`
/// compares const values with `f32 ==`, under which a NaN const never equals itself and `-0.0`
/// equals `0.0`.
fn same_graph(a: &ir::Graph, b: &ir::Graph) -> bool {
    type Canon = (Vec<(String, ir::TensorType, Vec<usize>)>, Vec<usize>);
    fn canon(g: &ir::Graph) -> Option<Canon> {
        let order = g.topo_order().ok()?;
        let pos: std::collections::HashMap<_, _> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
        let nodes = g
            .canonical()
            .ok()?
            .into_iter()
            .map(|(op, ty, ins)| {
                let key = match &op {
                    ir::Op::Const { values } => {
                        // The text form writes every NaN as `NaN`, so payload and sign do not survive.
                        let bits: Vec<u32> =
                            values.iter().map(|v| if v.is_nan() { f32::NAN.to_bits() } else { v.to_bits() }).collect();
                        format!("const {bits:?}")
                    }
                    other => format!("{other:?}"),
                };
                (key, ty, ins)
            })
            .collect();
        let outs = g.outputs.iter().map(|o| pos.get(o).copied()).collect::<Option<Vec<_>>>()?;
        Some((nodes, outs))
    }
    a.name == b.name && a.meta == b.meta && a.states == b.states && canon(a).is_some() && canon(a) == canon(b)
}

/// Runs a case and returns its output text.
fn run_case(case: &Case) -> Result<String, String> {
    let text: String = case.lines.iter().map(|(_, l)| format!("{l}\n")).collect();
    let mut g = ir::parse(&text).map_err(|e| format!("input does not parse: {e}"))?;
    match &case.mode {
        Mode::Pass(pipeline) => {
            let pm =
                PassManager::new(pipeline, &PassContext::default()).map_err(|e| e.to_string())?.print_after(PrintAfter::None);
            pm.run(&mut g, &mut std::io::sink()).map_err(|e| e.to_string())?;
            let out = ir::print(&g);
            let back = ir::parse(&out).map_err(|e| format!("output does not parse: {e}\n{out}"))?;
            if !same_graph(&back, &g) {
                return Err(format!("output does not parse back to the same graph:\n{out}"));
            }
            Ok(out)
        }
        Mode::Roundtrip => {
            ir::verify(&g).map_err(|e| format!("input fails verification: {e}"))?;
            let p1 = ir::print(&g);
            let g2 = ir::parse(&p1).map_err(|e| format!("printed form does not parse: {e}\n{p1}"))?;
            if !same_graph(&g2, &g) {
                return Err(format!("parse(print(g)) != g; print(g):\n{p1}"));
            }
            let p2 = ir::print(&g2);
            if p2 != p1 {
                return Err(format!("printing is not stable:\n{p1}\nthen\n{p2}"));
            }
            Ok(p1)
        }
    }
}

/// Matches `directives` against `output`; the error says which directive failed and why.
fn check(output: &str, directives: &[Directive]) -> Result<(), String> {
    if !directives.iter().any(|d| matches!(d, Directive::Check(..))) {
        return Err("case has no `; check:` lines (run with LLMC_BLESS=1 to generate them)".into());
    }
    let lines: Vec<&str> = output.lines().map(str::trim).collect();
    let mut pos = 0; // next output line to search
    let mut nots: Vec<(usize, &str)> = Vec::new();
    let check_nots = |nots: &mut Vec<(usize, &str)>, from: usize, to: usize| -> Result<(), String> {
        for (ln, pat) in nots.drain(..) {
            if let Some(k) = (from..to).find(|&k| lines[k].contains(pat)) {
                return Err(format!("line {ln}: `; check-not: {pat}` found in output line {}: `{}`", k + 1, lines[k]));
            }
        }
        Ok(())
    };
    for d in directives {
        match d {
            Directive::CheckNot(ln, pat) => nots.push((*ln, pat)),
            Directive::Check(ln, pat) => {
                let Some(k) = (pos..lines.len()).find(|&k| lines[k] == pat.as_str()) else {
                    let why = if lines[..pos].contains(&pat.as_str()) {
                        " (it occurs earlier: checks match in order)"
                    } else {
                        ""
                    };
                    return Err(format!("line {ln}: `; check: {pat}` matches no output line after line {pos}{why}"));
                };
                check_nots(&mut nots, pos, k)?;
                pos = k + 1;
            }
        }
    }
    check_nots(&mut nots, pos, lines.len())
}

/// The file with each case's `; check:` lines replaced by `outputs[i]` (non-blank lines).
/// New checks go where the case's first check was, or after its last non-blank line.
fn bless(text: &str, cases: &[Case], outputs: &[String]) -> String {
    let mut insert_at = std::collections::HashMap::new(); // file line -> case index
    let mut drop = std::collections::HashSet::new();
    for (ci, case) in cases.iter().enumerate() {
        let checks: Vec<usize> = case
            .directives
            .iter()
            .filter_map(|d| if let Directive::Check(ln, _) = d { Some(*ln) } else { None })
            .collect();
        drop.extend(checks.iter().copied());
        let at = match checks.first() {
            Some(&ln) => (ln, true),
            None => (case.lines.iter().rev().find(|(_, l)| !l.trim().is_empty()).map_or(0, |(ln, _)| *ln), false),
        };
        insert_at.insert(at.0, (ci, at.1));
    }
    let emit = |s: &mut String, ci: usize| {
        for l in outputs[ci].lines().map(str::trim).filter(|l| !l.is_empty()) {
            s.push_str("; check: ");
            s.push_str(l);
            s.push('\n');
        }
    };
    let mut s = String::new();
    for (i, line) in text.lines().enumerate() {
        let ln = i + 1;
        match insert_at.get(&ln) {
            Some(&(ci, true)) => emit(&mut s, ci), // replaces the first old check
            Some(&(ci, false)) => {
                s.push_str(line);
                s.push('\n');
                emit(&mut s, ci);
            }
            None if drop.contains(&ln) => {}
            None => {
                s.push_str(line);
                s.push('\n');
            }
        }
    }
    s
}

/// Runs every case of one file; with `bless`, first rewrites the file's checks.
fn run_file(path: &Path, bless_it: bool) -> Result<usize, String> {
    let mut text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut cases = parse_file(&text)?;
    if bless_it {
        let outputs: Vec<String> = cases
            .iter()
            .map(|c| run_case(c).map_err(|e| format!("case at line {}: {e}", c.lines[0].0)))
            .collect::<Result<_, _>>()?;
        let blessed = bless(&text, &cases, &outputs);
        if blessed != text {
            std::fs::write(path, &blessed).map_err(|e| format!("cannot write: {e}"))?;
            text = blessed;
            cases = parse_file(&text)?;
        }
    }
    let mut errors = Vec::new();
    for case in &cases {
        let start = case.lines[0].0;
        match run_case(case) {
            Err(e) => errors.push(format!("case at line {start}: {e}")),
            Ok(out) => {
                if let Err(e) = check(&out, &case.directives) {
                    errors.push(format!("case at line {start}: {e}\n--- output ---\n{out}--------------"));
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(cases.len())
    } else {
        Err(errors.join("\n"))
    }
}

fn filetest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("filetests")
}

#[test]
fn filetests() {
    let bless_it = std::env::var("LLMC_BLESS").is_ok_and(|v| v == "1");
    let mut files: Vec<PathBuf> = std::fs::read_dir(filetest_dir())
        .expect("tests/filetests exists")
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "ir"))
        .collect();
    files.sort();
    assert!(files.len() >= 8, "expected at least 8 filetests, found {files:?}");
    let mut failures = Vec::new();
    let mut total = 0;
    for f in &files {
        match run_file(f, bless_it) {
            Ok(n) => total += n,
            Err(e) => failures.push(format!("{}:\n{e}", f.display())),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} filetest files failed:\n\n{}",
        failures.len(),
        files.len(),
        failures.join("\n\n")
    );
    eprintln!("{total} filetest cases in {} files passed", files.len());
}

// ---- the harness itself: proven able to fail ----

const OUT: &str =
    "graph @t {\n  %0 = input {name = \"ids\"} : i32[S]\n  %1 = weight {name = \"w\"} : f32[4,4]\n  return %0\n}\n";

fn checks(lines: &[&str]) -> Vec<Directive> {
    lines.iter().enumerate().map(|(i, l)| directive(l, i + 1).unwrap().expect("a directive")).collect()
}

#[test]
fn checker_accepts_matching_checks_in_order_with_gaps() {
    check(OUT, &checks(&["; check: graph @t {", "; check: return %0", "; check: }"])).unwrap();
    check(OUT, &checks(&["; check: %1 = weight {name = \"w\"} : f32[4,4]", "; check-not: kv_concat"])).unwrap();
}

#[test]
fn checker_rejects_a_wrong_check_line() {
    let e =
        check(OUT, &checks(&["; check: graph @t {", "; check: %1 = weight {name = \"v\"} : f32[4,4]"])).unwrap_err();
    assert!(e.contains("line 2") && e.contains("matches no output line"), "{e}");
    // A check must match a whole line, not a fragment of one.
    assert!(check(OUT, &checks(&["; check: weight"])).is_err());
}

#[test]
fn checker_rejects_out_of_order_checks() {
    let e = check(OUT, &checks(&["; check: return %0", "; check: graph @t {"])).unwrap_err();
    assert!(e.contains("occurs earlier"), "{e}");
}

#[test]
fn checker_rejects_check_not_in_its_range() {
    // Between the two matches lies the weight line.
    let e = check(OUT, &checks(&["; check: graph @t {", "; check-not: weight", "; check: return %0"])).unwrap_err();
    assert!(e.contains("`; check-not: weight` found in output line 3"), "{e}");
    // After the last match, to the end.
    assert!(check(OUT, &checks(&["; check: graph @t {", "; check-not: return"])).is_err());
    // Outside its range it does not apply.
    check(OUT, &checks(&["; check: return %0", "; check-not: weight", "; check: }"])).unwrap();
}

#[test]
fn checker_rejects_a_case_without_checks() {
    assert!(check(OUT, &checks(&["; check-not: weight"])).is_err());
    assert!(check(OUT, &[]).is_err());
}

#[test]
fn same_graph_compares_consts_bitwise() {
    let a = ir::parse("graph @t {\n  %0 = const {values = [NaN, -0.0]} : f32[2]\n  return %0\n}\n").unwrap();
    let b = ir::parse("graph @t {\n  %0 = const {values = [NaN, 0.0]} : f32[2]\n  return %0\n}\n").unwrap();
    assert!(same_graph(&a, &a.clone()));
    assert!(!same_graph(&a, &b));
}

#[test]
fn unknown_directives_and_headers_are_errors() {
    assert!(directive("; check-next: foo", 3).is_err());
    assert!(parse_file("; test nothing\ngraph @t {\n}\n").is_err());
    assert!(parse_file("; test pass dce\ngraph @t {\n}\n; -----\n").is_err());
}

const CASE: &str = "\
; test pass dce
graph @t {
  %0 = input {name = \"ids\"} : i32[S]
  %1 = weight {name = \"w\"} : f32[4,4]
  return %0
}
; check: stale line
; check-not: weight
; check: another stale line
; -----
; test roundtrip
graph @u {
  %0 = input {name = \"ids\"} : i32[S]
  return %0
}
";

#[test]
fn a_failing_case_fails_the_file_and_bless_fixes_it() {
    let cases = parse_file(CASE).unwrap();
    assert_eq!(cases.len(), 2);
    assert_eq!(cases[0].mode, Mode::Pass(Pipeline::parse("dce").unwrap()));
    assert_eq!(cases[1].mode, Mode::Roundtrip);
    let outputs: Vec<String> = cases.iter().map(|c| run_case(c).unwrap()).collect();
    assert!(check(&outputs[0], &cases[0].directives).is_err());
    assert!(check(&outputs[1], &cases[1].directives).is_err());

    let blessed = bless(CASE, &cases, &outputs);
    let want = "\
; test pass dce
graph @t {
  %0 = input {name = \"ids\"} : i32[S]
  %1 = weight {name = \"w\"} : f32[4,4]
  return %0
}
; check: graph @t {
; check: %0 = input {name = \"ids\"} : i32[S]
; check: return %0
; check: }
; check-not: weight
; -----
; test roundtrip
graph @u {
  %0 = input {name = \"ids\"} : i32[S]
  return %0
}
; check: graph @u {
; check: %0 = input {name = \"ids\"} : i32[S]
; check: return %0
; check: }
";
    assert_eq!(blessed, want);
    for c in parse_file(&blessed).unwrap() {
        check(&run_case(&c).unwrap(), &c.directives).unwrap();
    }
}

#[test]
fn bad_input_or_unknown_pass_fails_the_case() {
    // Input that does not verify (gather of an f32 id tensor) is reported, not panicked on.
    let text = "; test pass dce\ngraph @t {\n  %0 = weight {name = \"w\"} : f32[4,4]\n  %1 = gather %0, %0 : f32[4,4,4]\n  return %1\n}\n; check: x\n";
    let cases = parse_file(text).unwrap();
    let e = run_case(&cases[0]).unwrap_err();
    assert!(e.contains("input graph fails verification"), "{e}");
    let text = "; test pass no-such-pass\ngraph @t {\n}\n";
    let e = run_case(&parse_file(text).unwrap()[0]).unwrap_err();
    assert!(e.contains("unknown pass `no-such-pass`"), "{e}");
    // Options in the header: a bad one fails the case, a malformed header fails the file.
    let text = "; test pass optimize{target=tpu}\ngraph @t {\n}\n";
    let e = run_case(&parse_file(text).unwrap()[0]).unwrap_err();
    assert!(e.contains("pass `optimize`, option `target=tpu`"), "{e}");
    let e = parse_file("; test pass dce,optimize{target=cuda\ngraph @t {\n}\n").unwrap_err();
    assert!(e.starts_with("line 1: pipeline `dce,optimize{target=cuda`") && e.contains("never closed"), "{e}");
    let cases = parse_file("; test pass dce, optimize{ target = cuda }\ngraph @t {\n}\n").unwrap();
    assert_eq!(cases[0].mode, Mode::Pass(Pipeline::parse("dce,optimize{target=cuda}").unwrap()));
}
