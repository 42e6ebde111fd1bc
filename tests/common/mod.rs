//! Helpers shared by the integration tests: compiling through the library, running the `llmc`
//! binary, temp dirs, fixtures.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[allow(unused_imports)] // not every test names each
pub use llmc_compiler::{CompileConfig, CompileReport, QuantConfig};

pub fn llmc() -> Command {
    Command::new(env!("CARGO_BIN_EXE_llmc"))
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(case: &str) -> PathBuf {
    repo().join("tests/fixtures").join(case)
}

/// A fresh directory under cargo's per-target tmp dir.
pub fn tmpdir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs `cmd`, asserting success; returns stdout.
pub fn ok(cmd: &mut Command) -> String {
    let o = cmd.output().expect("spawn llmc");
    assert!(o.status.success(), "command failed: {cmd:?}\nstdout:\n{}\nstderr:\n{}", stdout(&o), stderr(&o));
    stdout(&o)
}

/// Runs `cmd`, asserting a clean failure: non-zero exit code (not a signal), no panic, and an
/// error message containing every one of `needles`.
pub fn fails_with(cmd: &mut Command, needles: &[&str]) -> String {
    let o = cmd.output().expect("spawn llmc");
    let err = stderr(&o);
    assert!(!o.status.success(), "expected failure: {cmd:?}\nstdout:\n{}", stdout(&o));
    assert_eq!(o.status.code(), Some(1), "expected exit code 1 (not a crash): {cmd:?}\nstderr:\n{err}");
    assert!(!err.contains("panicked"), "llmc panicked: {cmd:?}\n{err}");
    for n in needles {
        assert!(err.contains(n), "error message lacks `{n}`: {cmd:?}\nstderr:\n{err}");
    }
    err
}

/// Compiles `model` to the artifact `out` for the CPU with the default options, through the
/// library (`llmc_compiler::compile`).
pub fn compile(model: &Path, out: &Path) -> CompileReport {
    compile_with(model, out, CompileConfig::default())
}

/// Compiles `model` to `out` with `config` (its `output` replaced by `out`), through the library.
pub fn compile_with(model: &Path, out: &Path, config: CompileConfig) -> CompileReport {
    let config = CompileConfig { output: out.to_path_buf(), ..config };
    llmc_compiler::compile(model, &config, &mut |_| {}, &mut std::io::sink())
        .unwrap_or_else(|e| panic!("compiling {} to {}: {e}", model.display(), out.display()))
}

/// The model loaded and run through the default pass pipeline (what `compile` generates code
/// for), for the reference interpreter.
pub fn optimized(model: &Path) -> llmc_compiler::Model {
    llmc_compiler::optimize(model, Default::default(), None, &Default::default(), &mut std::io::sink())
        .unwrap_or_else(|e| panic!("optimizing {}: {e}", model.display()))
        .model
}

pub fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

pub fn join_ids(ids: &[u32]) -> String {
    ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")
}

/// The last stdout line parsed as JSON.
pub fn last_json(out: &str) -> serde_json::Value {
    let line = out.lines().last().expect("some output");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {line}"))
}

/// The largest elementwise difference of two equally long vectors.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// `llmc run ART --input-ids PROMPT --max-new-tokens N --ignore-eos --logits-out LOGITS --json`:
/// greedy generation from token ids, every prompt position's logits written to `logits`; returns
/// stdout.
pub fn run_greedy_with_logits(art: &Path, prompt: &[u32], new_tokens: usize, logits: &Path) -> String {
    ok(llmc()
        .arg("run")
        .arg(art)
        .arg("--input-ids")
        .arg(join_ids(prompt))
        .arg("--max-new-tokens")
        .arg(new_tokens.to_string())
        .arg("--ignore-eos")
        .arg("--logits-out")
        .arg(logits)
        .arg("--json"))
}
