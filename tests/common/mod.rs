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

/// `(cpu_features, code_checksum, data_checksum)` from an artifact's header (the features joined
/// with commas; empty for a CUDA artifact).
pub fn section_hashes(art: &Path) -> (String, String, String) {
    let bytes = std::fs::read(art).unwrap();
    let hlen = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    let h: serde_json::Value = serde_json::from_slice(&bytes[32..32 + hlen]).unwrap();
    let feats: Vec<&str> = h["cpu_features"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    (feats.join(","), h["code_checksum"].as_str().unwrap().into(), h["data_checksum"].as_str().unwrap().into())
}

/// Checks artifact section checksums `got` (name -> (code, data)) against the list at `list`
/// (relative to the repository), or records them there when `LLMC_BLESS` is set.
///
/// Code sections depend on the machine that generated them (`host`: the list's `# KEY VALUE`
/// line, the ISA features Cranelift used or the LLVM version that wrote PTX): where this machine's
/// `host_value` differs from the recorded one, only the data sections are compared and the code
/// checksums are printed for a new record.
pub fn check_hash_list(
    list: &str,
    what: &str,
    (host_key, host_what): (&str, &str),
    host_value: &str,
    got: &std::collections::BTreeMap<String, (String, String)>,
) {
    let list_path = repo().join(list);
    if std::env::var_os("LLMC_BLESS").is_some() {
        let mut s = format!(
            "# Code and data section checksums (xxh3-64) of {what}.\n\
             # Code depends on the host's {host_what}; recorded with:\n# {host_key} {host_value}\n"
        );
        for (name, (code, data)) in got {
            s.push_str(&format!("{name} {code} {data}\n"));
        }
        std::fs::write(&list_path, s).unwrap();
        eprintln!("recorded {} artifacts in {list}", got.len());
        return;
    }
    let text = std::fs::read_to_string(&list_path).unwrap();
    let prefix = format!("# {host_key} ");
    let recorded = text.lines().find_map(|l| l.strip_prefix(prefix.as_str())).unwrap_or("").to_string();
    let want: std::collections::BTreeMap<&str, (&str, &str)> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 3, "{list}: bad line {l:?}");
            (f[0], (f[1], f[2]))
        })
        .collect();
    let same_host = recorded == host_value;
    if !same_host {
        eprintln!(
            "NOTE: this host's {host_what} differ from the recorded host's: comparing data sections only\n  here:     {host_value}\n  recorded: {recorded}"
        );
    }
    let mut bad = vec![];
    for (name, (code, data)) in got {
        let Some((wcode, wdata)) = want.get(name.as_str()) else {
            bad.push(format!("{name}: not in {list}"));
            continue;
        };
        if data != wdata {
            bad.push(format!("{name}: data section {data}, recorded {wdata}"));
        }
        if same_host && code != wcode {
            bad.push(format!("{name}: code section {code}, recorded {wcode}"));
        } else if !same_host {
            eprintln!("{name}: code {code} (recorded on the other host: {wcode})");
        }
    }
    assert_eq!(want.len(), got.len(), "{list} lists {} artifacts, the test compiles {}", want.len(), got.len());
    assert!(bad.is_empty(), "artifacts changed:\n{}", bad.join("\n"));
}
