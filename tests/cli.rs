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

/// The entries the `; ---- IR after ... ----` headers of a `--print-ir-after-all` output name.
fn header_entries(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.strip_prefix("; ---- IR after "))
        .map(|l| l.strip_suffix(" ----").expect("a whole header").to_string())
        .collect()
}

#[test]
fn passes_with_options_round_trip_through_print_ir_after_all() {
    let spec = "dce, cse, optimize{target=cuda, iterations=12}, dce, quantize{format=int4:g64,keep-fp=\"lm_head;*.down_proj*\"}";
    let out = ok(llmc().arg("dump-ir").arg(fixture("llama_mha")).arg("--passes").arg(spec).arg("--after").arg("all"));
    let entries = header_entries(&out);
    assert_eq!(
        entries,
        ["dce", "cse", "optimize{target=cuda,iterations=12}", "dce", "quantize{format=int4:g64,keep-fp=lm_head;*.down_proj*}"]
    );
    let want = llmc_passes::Pipeline::parse(spec).unwrap();
    assert_eq!(llmc_passes::Pipeline::parse(&entries.join(",")).unwrap(), want);
    // The canonical spelling runs the same passes: the same output.
    let again = ok(llmc().arg("dump-ir").arg(fixture("llama_mha")).arg("--passes").arg(want.to_string()).arg("--after").arg("all"));
    assert_eq!(again, out);
    // `dump-ir --target cuda` is `optimize{target=cuda}` for every bare `optimize`.
    let bare = ok(llmc().arg("dump-ir").arg(fixture("llama_mha")).args(["--target", "cuda", "--passes", "dce,optimize"]));
    let explicit = ok(llmc().arg("dump-ir").arg(fixture("llama_mha")).args(["--passes", "dce,optimize{target=cuda}"]));
    assert_eq!(bare, explicit);
}

#[test]
fn pipeline_errors_name_the_pass_the_option_and_the_allowed_values() {
    let fails = |spec: &str, needles: &[&str]| {
        fails_with(llmc().arg("dump-ir").arg(fixture("llama_mha")).arg("--passes").arg(spec), needles);
    };
    fails("dce,optimize{targte=cuda}", &["pass `optimize` has no option `targte`", "target=cpu|cuda", "iterations="]);
    fails("optimize{target=tpu}", &["option `target=tpu`", "allowed: cpu|cuda"]);
    fails("optimize{iterations=0}", &["option `iterations=0`", "a positive integer"]);
    fails("dce,optimize{target=cuda", &["column 13", "`{` of pass `optimize` is never closed"]);
    fails("dce{x=1}", &["pass `dce` has no option `x`; it takes no options"]);
    fails("quantize", &["pass `quantize`: needs `format` or `sparsity`"]);
    fails("quantize{format=int2}", &["option `format=int2`", "unknown format", "int4[:gN][:asym]"]);
    // A pattern that keeps nothing would change nothing (one with a comma never matches a name).
    fails("quantize{format=int8,keep-fp=\"lm_head;a,b\"}", &["--keep-fp `a,b` matches no weight of `llama`"]);
    fails("quantize{keep-fp=a b,format=int8}", &["option `keep-fp`", "quote"]);
    fails_with(llmc().arg("dump-ir").arg(fixture("llama_mha")).args(["--target", "tpu"]), &["target `tpu`", "cpu, cuda"]);
}

#[test]
fn passes_lists_each_pass_with_its_options() {
    let out = ok(llmc().arg("passes"));
    for p in llmc_passes::all_passes() {
        for o in p.options() {
            assert!(out.contains(&format!("{}={}", o.name, o.values)) && out.contains(o.summary), "{}: {} missing:\n{out}", p.name(), o.name);
        }
    }
    assert!(out.contains("target=cpu|cuda") && out.contains("format=int8|int4[:gN][:asym]|w8a8|w4a8[:gN]"), "{out}");
    let j = last_json(&ok(llmc().args(["passes", "--json"])));
    let opt = j["passes"].as_array().unwrap().iter().find(|p| p["name"] == "optimize").unwrap();
    let names: Vec<&str> = opt["options"].as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["target", "node-limit", "iterations", "extract-moves", "time-limit"]);
}

/// The optimizer's bounds are fuel; wall time is a safety valve whose trip is an error naming
/// the limit to raise, never a silently different artifact. Fuel set tiny still compiles, the
/// same bytes every time, and the stats say the fuel ran out.
#[test]
fn optimizer_fuel_is_deterministic_and_its_time_valve_is_an_error() {
    let d = tmpdir("cli-fuel");
    let e = fails_with(
        llmc().arg("compile").arg(fixture("llama_mha")).arg("-o").arg(d.join("v.llmc")).args(["--passes", "dce,optimize{time-limit=0.000000001}"]),
        &["time-limit"],
    );
    assert!(e.contains("safety limit") && e.contains("node-limit=10000"), "{e}");
    let tiny = "dce,optimize{node-limit=300,iterations=2,extract-moves=1},dce";
    let (a, b) = (d.join("a.llmc"), d.join("b.llmc"));
    let o = llmc().arg("compile").arg(fixture("llama_mha")).arg("-o").arg(&a).args(["--passes", tiny, "--pass-stats"]).output().unwrap();
    let stats = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stats}");
    assert!(stats.contains("extract-out-of-fuel=") && !stats.contains("extract-out-of-fuel=0 "), "{stats}");
    ok(llmc().arg("compile").arg(fixture("llama_mha")).arg("-o").arg(&b).args(["--passes", tiny]));
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(), "two compiles with the same fuel differ");
    fails_with(llmc().arg("compile").arg(fixture("llama_mha")).arg("-o").arg(d.join("x.llmc")).args(["--threads", "0"]), &["--threads 0"]);
}

/// `--quant`/`--keep-fp` append a `quantize{...}` entry: the same artifact as writing that entry
/// in `--passes`, its header among the `--print-ir-after-all` dumps, and both at once an error.
#[test]
fn quant_flags_are_a_quantize_entry_of_the_pipeline() {
    let d = tmpdir("cli-quant-entry");
    let (a, b) = (d.join("flags.llmc"), d.join("passes.llmc"));
    let out = ok(llmc()
        .arg("compile")
        .arg(fixture("llama_mha"))
        .arg("-o")
        .arg(&a)
        .args(["--quant", "int4:g32:asym", "--keep-fp", "lm_head", "--print-ir-after-all"]));
    let entries = header_entries(&out);
    let mut want: Vec<String> = llmc_passes::default_pipeline().iter().map(|p| p.to_string()).collect();
    want.push("quantize{format=int4:g32:asym,keep-fp=lm_head}".into());
    assert_eq!(entries, want);
    let spec = format!("{},quantize{{format=int4:g32:asym,keep-fp=lm_head}}", llmc_passes::default_pipeline());
    ok(llmc().arg("compile").arg(fixture("llama_mha")).arg("-o").arg(&b).arg("--passes").arg(&spec));
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(), "the two artifacts differ");
    fails_with(
        llmc().arg("compile").arg(fixture("llama_mha")).arg("-o").arg(d.join("x.llmc")).arg("--passes").arg(&spec).args(["--quant", "int8"]),
        &["--passes already has a quantize entry"],
    );
    assert!(!d.join("x.llmc").exists());
}
