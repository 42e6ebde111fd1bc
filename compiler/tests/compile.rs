//! The library's compile on real fixtures: the phases' progress events in order, the report
//! agreeing with the artifact the runtime opens, quantization with `--report` rows, `Emit::Lib`'s
//! archive, IR printing to the caller's writer, and a config error before any file is written.

use std::path::{Path, PathBuf};

use llmc_compiler::{compile, CompileConfig, DumpAfter, DumpIrConfig, Emit, PipelineConfig, Progress, QuantConfig};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tmpdir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("compiler-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The progress events of a compile, by name (one `Tensor` entry for all tensor events) and the
/// number of tensor events.
fn events(model: &Path, config: &CompileConfig, ir: &mut Vec<u8>) -> (llmc_compiler::CompileReport, Vec<&'static str>, usize, usize) {
    let (mut names, mut reads, mut total) = (Vec::new(), 0, 0);
    let r = compile(
        model,
        config,
        &mut |p| {
            let name = match p {
                Progress::Loaded { .. } => "loaded",
                Progress::PassesDone { .. } => "passes",
                Progress::Calibrated { .. } => "calibrated",
                Progress::Codegen { tensors } => {
                    total = tensors;
                    "codegen"
                }
                Progress::Tensor { index, total: t } => {
                    reads += 1;
                    assert_eq!((index, t), (reads, total), "tensor events count up to the total");
                    if names.last() == Some(&"tensor") {
                        return;
                    }
                    "tensor"
                }
                Progress::Written { .. } => "written",
                Progress::Library { .. } => "library",
                Progress::Done { .. } => "done",
            };
            names.push(name);
        },
        ir,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    (r, names, reads, total)
}

#[test]
fn compile_reports_its_phases_and_what_it_wrote() {
    let d = tmpdir("phases");
    let model = repo().join("tests/fixtures/llama_mha");
    let config = CompileConfig {
        output: d.join("m.llmc"),
        max_chunk: Some(8),
        pipeline: PipelineConfig { print_ir_after: vec!["cse".into()], ..Default::default() },
        ..Default::default()
    };
    let mut ir = Vec::new();
    let (r, names, reads, total) = events(&model, &config, &mut ir);
    assert_eq!(names, ["loaded", "passes", "codegen", "tensor", "written", "done"]);
    assert!(total > 0 && reads >= total, "{reads} reads of {total} tensors");
    // The IR printed after each run of `cse` (the default pipeline runs it twice).
    let text = String::from_utf8(ir).unwrap();
    assert_eq!(text.matches("; ---- IR after cse ----").count(), 2, "{text}");
    assert_eq!(r.passes.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), llmc_compiler::default_pipeline());
    // The report agrees with the artifact.
    let a = llmc_runtime::Artifact::open(&d.join("m.llmc")).unwrap();
    assert_eq!(r.artifact, d.join("m.llmc"));
    assert_eq!(r.file_bytes, std::fs::metadata(&r.artifact).unwrap().len());
    assert_eq!((r.max_chunk, r.max_context), (8, a.header.max_context as usize));
    assert_eq!(r.kernels, a.header.kernels.len());
    assert_eq!((r.target, r.tokenizer, r.quant.is_none(), r.library.is_none()), ("cpu", false, true, true));
    assert!(r.params > 0 && r.nodes > 0 && r.timings.total >= r.timings.codegen);
}

#[test]
fn quantized_compile_with_calibration_and_report_rows() {
    let d = tmpdir("quant");
    let model = repo().join("models/seedlm");
    let config = CompileConfig {
        output: d.join("q.llmc"),
        max_context: Some(128),
        quant: QuantConfig {
            quant: Some("int4:g32".into()),
            keep_fp: vec!["lm_head".into()],
            calib: Some(model.join("calib.txt")),
            calib_tokens: 128,
            report: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let (r, names, _, _) = events(&model, &config, &mut Vec::new());
    assert_eq!(names, ["loaded", "passes", "calibrated", "codegen", "tensor", "written", "done"]);
    let q = r.quant.as_ref().unwrap();
    assert_eq!((q.layout.name(), q.method, q.calib_windows, q.format.as_deref()), ("int4_g32".into(), "gptq", 1, Some("int4:g32")));
    let rows = r.matrices.as_ref().unwrap();
    assert_eq!(rows.len() as u64, q.tensors);
    // Every matrix but the kept head, the embedding table included (gathered from: no product
    // input, so no output error).
    assert!(rows.iter().all(|m| !m.name.contains("lm_head") && (m.output_error.is_some() == !m.name.contains("embed_tokens"))), "{rows:?}");
    assert!(rows.iter().any(|m| m.name == "model.embed_tokens.weight"), "{rows:?}");
    let floats: Vec<(&str, &str)> = q.float_weights.iter().map(|f| (f.name.as_str(), f.why.as_str())).collect();
    assert_eq!(floats, [("lm_head.weight", "--keep-fp `lm_head`")]);
    assert!(r.tokenizer && r.bits_per_weight() < 32.0, "{}", r.bits_per_weight());
}

#[test]
fn emit_lib_writes_the_archive_header_and_artifact() {
    let d = tmpdir("lib");
    let out = d.join("lib");
    let config = CompileConfig { output: out.clone(), emit: Emit::Lib, ..Default::default() };
    let (r, names, _, _) = events(&repo().join("tests/fixtures/llama_mha"), &config, &mut Vec::new());
    assert_eq!(names, ["loaded", "passes", "codegen", "tensor", "written", "library", "done"]);
    let lib = r.library.as_ref().unwrap();
    assert_eq!((lib.library.clone(), lib.header.clone(), r.artifact.clone()), (out.join("libllmc_model.a"), out.join("model.h"), out.join("model.llmc")));
    let ar = std::fs::read(&lib.library).unwrap();
    assert!(ar.starts_with(b"!<arch>\n") && ar.windows(19).any(|w| w == llmc_compiler::emit_lib::ARTIFACT_SYMBOL.as_bytes()));
    assert!(std::fs::read_to_string(&lib.header).unwrap().contains("llmc_model_load_embedded"));
    // An explicit runtime library that does not exist is an error naming it.
    let bad = CompileConfig { runtime_lib: Some(d.join("nope.a")), ..config };
    let e = compile(&repo().join("tests/fixtures/llama_mha"), &bad, &mut |_| {}, &mut std::io::sink()).unwrap_err().to_string();
    assert!(e.contains("nope.a") && e.contains("no such file"), "{e}");
}

#[test]
fn invalid_config_fails_before_reading_or_writing() {
    let d = tmpdir("invalid");
    let config = CompileConfig {
        output: d.join("lib"),
        emit: Emit::Lib,
        quant: QuantConfig { report: true, ..Default::default() },
        ..Default::default()
    };
    // The checkpoint does not exist: the config error comes first, and no directory is made.
    let e = compile(&d.join("no-model"), &config, &mut |_| panic!("no progress"), &mut std::io::sink()).unwrap_err();
    assert_eq!(e.to_string(), "--report needs --quant or --sparsity");
    assert!(!d.join("lib").exists());
    let e = compile(&d.join("no-model"), &CompileConfig { output: d.join("m.llmc"), ..Default::default() }, &mut |_| {}, &mut std::io::sink())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no-model"), "{e}");
}

#[test]
fn dump_ir_prints_the_final_graph_or_every_pass() {
    let model = repo().join("tests/fixtures/llama_mha");
    let mut out = Vec::new();
    llmc_compiler::dump_ir(&model, &DumpIrConfig::default(), &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    llmc_ir::verify(&llmc_ir::parse(&text).unwrap()).unwrap();
    let mut out = Vec::new();
    let cfg = DumpIrConfig { passes: Some("dce,cse".into()), after: DumpAfter::All, ..Default::default() };
    llmc_compiler::dump_ir(&model, &cfg, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.matches("; ---- IR after ").count(), 2, "{text}");
    let cfg = DumpIrConfig { after: DumpAfter::Pass("fold-everything".into()), ..Default::default() };
    let e = llmc_compiler::dump_ir(&model, &cfg, &mut Vec::new()).unwrap_err().to_string();
    assert!(e.contains("fold-everything") && e.contains("not a known pass"), "{e}");
}
