//! The examples as applications use them: `examples/c` linked with the library `llmc compile
//! --emit lib` writes (built with `cc`, its ids checked against `llmc run`), and `examples/rust`
//! on the runtime crate alone.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::*;

fn seedlm_dir() -> PathBuf {
    repo().join("models/seedlm")
}

/// `llmc compile models/seedlm --emit lib` and `cc examples/c/main.c` against it, once.
fn c_example() -> &'static (PathBuf, PathBuf) {
    static BUILT: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BUILT.get_or_init(|| {
        let d = tmpdir("examples-c");
        let lib = d.join("lib");
        let j = last_json(&ok(llmc().arg("compile").arg(seedlm_dir()).args(["--emit", "lib", "-o"]).arg(&lib).arg("--json")));
        assert_eq!(j["emit"], "lib");
        for f in ["libllmc_model.a", "model.h", "model.llmc"] {
            assert!(lib.join(f).is_file(), "--emit lib did not write {f}");
        }
        let exe = d.join("generate");
        let o = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
            .arg(repo().join("examples/c/main.c"))
            .arg("-I")
            .arg(&lib)
            .arg("-L")
            .arg(&lib)
            .args(["-lllmc_model", "-lpthread", "-ldl", "-lm", "-o"])
            .arg(&exe)
            .output()
            .expect("run cc (a C compiler is needed for this test)");
        assert!(o.status.success(), "cc failed:\n{}", stderr(&o));
        (exe, lib)
    })
}

fn run_c(args: &[&str]) -> (Vec<u32>, String) {
    let (exe, _) = c_example();
    let out = ok(Command::new(exe).args(args));
    let mut lines = out.splitn(2, '\n');
    let ids = lines.next().unwrap().split(',').map(|t| t.parse().unwrap()).collect();
    let text = lines.next().unwrap_or_default().strip_suffix('\n').unwrap_or_default().to_string();
    (ids, text)
}

fn cli_ids(artifact: &Path, args: &[&str]) -> Vec<u32> {
    ids_of(&last_json(&ok(llmc().arg("run").arg(artifact).args(args).arg("--json")))["generated_ids"])
}

#[test]
fn c_example_generates_the_cli_greedy_ids() {
    let (_, lib) = c_example();
    let g = read_json(&seedlm_dir().join("golden_greedy.json"));
    for case in g["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let (ids, text) = run_c(&[prompt, "--max-new", "32"]);
        assert_eq!(ids, ids_of(&case["greedy_new_ids"]), "{prompt:?}");
        assert_eq!(ids, cli_ids(&lib.join("model.llmc"), &["--prompt", prompt, "--max-new-tokens", "32"]));
        assert_eq!(text, case["greedy_text"].as_str().unwrap());
    }
}

#[test]
fn c_example_samples_like_the_cli() {
    let (_, lib) = c_example();
    let sampling = ["--temperature", "0.8", "--top-k", "40", "--top-p", "0.9", "--repetition-penalty", "1.2", "--seed", "5"];
    let mut c_args = vec!["Speculative decoding", "--max-new", "24"];
    c_args.extend(sampling);
    let (ids, _) = run_c(&c_args);
    let mut cli_args = vec!["--prompt", "Speculative decoding", "--max-new-tokens", "24"];
    cli_args.extend(sampling);
    assert_eq!(ids, cli_ids(&lib.join("model.llmc"), &cli_args));
}

#[test]
fn c_example_loads_a_file_and_reports_errors() {
    let (exe, lib) = c_example();
    let art = lib.join("model.llmc");
    let (ids, _) = run_c(&["--file", art.to_str().unwrap(), "--ids", "4065,3025,3077", "--max-new", "8"]);
    assert_eq!(ids, cli_ids(&art, &["--input-ids", "4065,3025,3077", "--max-new-tokens", "8"]));
    // Errors come back as codes with a message naming the problem.
    let o = Command::new(exe).args(["--file", "/nonexistent/m.llmc", "x"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("/nonexistent/m.llmc") && err.contains("code 1"), "{err}");
    let o = Command::new(exe).args(["--ids", "5000", "--max-new", "1"]).output().unwrap();
    let err = stderr(&o);
    assert!(err.contains("token id 5000") && err.contains("code 4"), "{err}");
}

#[test]
fn header_declares_every_exported_function() {
    let (_, lib) = c_example();
    let header = std::fs::read_to_string(lib.join("model.h")).unwrap();
    let capi = std::fs::read_to_string(repo().join("runtime/capi/src/lib.rs")).unwrap();
    let exported: Vec<&str> = capi
        .lines()
        .filter_map(|l| l.split("extern \"C\" fn ").nth(1))
        .map(|rest| rest.split('(').next().unwrap())
        .collect();
    assert!(exported.len() >= 20, "{exported:?}");
    for f in exported {
        assert!(header.contains(&format!("{f}(")), "model.h does not declare {f}");
    }
    assert!(header.contains("llmc_model_load_embedded"));
}

#[test]
fn rust_example_runs_on_the_runtime_alone() {
    let d = tmpdir("examples-rust");
    let art = d.join("seedlm.llmc");
    compile(&seedlm_dir(), &art);
    let g = read_json(&seedlm_dir().join("golden_greedy.json"));
    let case = &g["cases"][0];
    let mut streamed = String::new();
    let out = llmc_example_rust::generate(&art, case["prompt"].as_str().unwrap(), 32, Default::default(), |p| streamed.push_str(p)).unwrap();
    assert_eq!(out.prompt_ids, ids_of(&case["prompt_ids"]));
    assert_eq!(out.ids, ids_of(&case["greedy_new_ids"]));
    assert_eq!(out.text, case["greedy_text"].as_str().unwrap());
    assert_eq!(streamed, out.text);
    // The example crate depends on llmc-runtime and nothing of the compiler.
    let manifest = std::fs::read_to_string(repo().join("examples/rust/Cargo.toml")).unwrap();
    for c in ["llmc-frontend", "llmc-passes", "llmc-codegen", "llmc-ir"] {
        assert!(!manifest.contains(c), "examples/rust depends on {c}");
    }
}
