//! The CLI contract: `dump-ir` output parses back, `--print-ir-after-all` prints after every pass,
//! `--dump-ir DIR` writes one numbered file per pass, `passes` lists them, `run --json` fields.

mod common;

use common::*;

#[test]
fn dump_ir_parses_back_and_verifies() {
    for case in ["llama_gqa_llama3", "gpt2"] {
        let text = ok(llmc().arg("dump-ir").arg(fixture(case)));
        let g = llmc_ir::parse(&text).unwrap_or_else(|e| panic!("{case}: dump-ir output does not parse: {e}"));
        llmc_ir::verify(&g).unwrap();
        assert_eq!(llmc_ir::print(&g), text, "{case}: print(parse(text)) != text");
        assert!(text.contains("kv_concat"), "{case}: the KV cache is explicit state");
    }
}

#[test]
fn print_ir_after_all_prints_after_every_pass() {
    let out = ok(llmc().arg("dump-ir").arg(fixture("llama_mha")).arg("--after").arg("all"));
    let pipeline = llmc_compiler::default_pipeline();
    for p in &pipeline {
        assert!(out.contains(&format!("; ---- IR after {p} ----")), "no dump after {p}");
    }
    let headers = out.lines().filter(|l| l.starts_with("; ---- IR after ")).count();
    assert_eq!(headers, pipeline.len(), "one dump per pass");
    // Each dumped graph parses.
    for chunk in out.split("; ---- IR after ").skip(1) {
        let body: String = chunk.lines().skip(1).collect::<Vec<_>>().join("\n");
        llmc_ir::parse(&body).unwrap();
    }
}

#[test]
fn compile_dump_ir_dir_writes_numbered_files() {
    let d = tmpdir("cli-dumpdir");
    let dump = d.join("ir");
    let out = ok(llmc()
        .arg("compile")
        .arg(fixture("llama_mha"))
        .arg("-o")
        .arg(d.join("m.llmc"))
        .arg("--dump-ir")
        .arg(&dump)
        .arg("--print-ir-after")
        .arg("cse"));
    assert!(out.contains("; ---- IR after cse ----"));
    let mut files: Vec<String> = std::fs::read_dir(&dump).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    assert_eq!(files.len(), llmc_compiler::default_pipeline().len() + 1, "input + one per pass: {files:?}");
    for f in &files {
        llmc_ir::parse(&std::fs::read_to_string(dump.join(f)).unwrap()).unwrap();
    }
}

#[test]
fn passes_lists_every_pass_with_a_summary() {
    let out = ok(llmc().arg("passes"));
    for p in llmc_compiler::passes() {
        assert!(out.contains(p.name) && out.contains(p.summary), "{} missing", p.name);
    }
}

#[test]
fn unknown_pass_is_named() {
    let mut c = llmc();
    c.arg("dump-ir").arg(fixture("llama_mha")).arg("--passes").arg("dce,fuse-everything");
    fails_with(&mut c, &["fuse-everything"]);
}

/// The binary holds CLI concerns only: it reaches the compiler through `llmc-compiler` and
/// imports no frontend, passes, codegen or IR item itself (tests may, as dev-dependencies).
#[test]
fn binary_uses_the_compile_library_and_the_runtime_only() {
    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let deps = manifest.split("\n[dependencies]\n").nth(1).expect("a [dependencies] table");
    let deps = deps.split("\n[").next().unwrap();
    assert!(deps.contains("llmc-compiler") && deps.contains("llmc-runtime"), "{deps}");
    for c in ["llmc-frontend", "llmc-passes", "llmc-codegen", "llmc-ir"] {
        assert!(!deps.contains(c), "the llmc binary depends on {c}:\n{deps}");
    }
    for e in std::fs::read_dir(repo().join("src")).unwrap() {
        let p = e.unwrap().path();
        let text = std::fs::read_to_string(&p).unwrap();
        for c in ["llmc_frontend", "llmc_passes", "llmc_codegen", "llmc_ir"] {
            assert!(!text.contains(c), "{} names {c}", p.display());
        }
    }
}
