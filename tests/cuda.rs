//! The CUDA target (built with `--features cuda`).
//!
//! Without a GPU: every golden fixture and seedlm, as checkpoint weights and with `--quant int8`
//! and `--quant int4` (seedlm, llama_gqa_llama3 and gpt2 also with `--quant w8a8`, `--quant
//! w4a8`, `--sparsity 2:4` and `--sparsity 2:4 --quant int8`), compiles with `--target cuda --emit ptx DIR`, and `ptxas` assembles every
//! emitted kernel for `sm_80` and `sm_90` (ptxas from `$LLMC_PTXAS`, `ptxas` on `PATH`, or the
//! `nvidia-cuda-nvcc-cu12` wheel in Python's site-packages; when `CI` is set and none is found
//! the test fails instead of skipping). A CUDA artifact run where no GPU can run it fails with a
//! clear error.
//!
//! With a GPU (`LLMC_GPU_TESTS=1`): logits against the committed transformers fixtures, with
//! `--weights-dtype f32` at the CPU golden tolerance and greedy ids equal, with the default f16
//! weights at [`F16_TOL`]; and `llmc bench` printing the HBM roofline beside decode speed.
#![cfg(feature = "cuda")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use llmc_runtime::npy;

/// Decoder fixtures of tests/golden.rs (BERT is compiled too: see [`PTX_CASES`]).
const GOLDEN: &[&str] = &[
    "llama_mha",
    "llama_gqa_llama3",
    "llama_tied_bf16",
    "llama_sharded_f16",
    "gpt2",
    "mistral_sliding",
    "qwen2",
    "qwen3",
    "gemma",
    "phi3",
    "neox",
    "neox_sequential",
    "mixtral",
];

/// Max abs logit error against transformers with f32 weights on the GPU (as the CPU golden tests).
const F32_TOL: f32 = 2e-3;
/// With f16 weights: each weight rounded to 11 significant bits (relative error <= 2^-11) moves
/// these tiny models' logits (|logit| < 10) by at most a few 1e-2.
const F16_TOL: f32 = 5e-2;

fn ptx_cases() -> Vec<(String, PathBuf)> {
    let mut v: Vec<(String, PathBuf)> = GOLDEN.iter().map(|c| (c.to_string(), fixture(c))).collect();
    v.push(("bert_tiny".into(), fixture("bert_tiny")));
    v.push(("seedlm".into(), repo().join("models/seedlm")));
    v
}

/// ptxas: `$LLMC_PTXAS`, else on `PATH`, else in the `nvidia-cuda-nvcc-cu12` wheel.
fn find_ptxas() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("LLMC_PTXAS") {
        return Some(PathBuf::from(p));
    }
    if Command::new("ptxas").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Some(PathBuf::from("ptxas"));
    }
    let out = Command::new("python3")
        .args(["-c", "import site,sys; print('\\n'.join(site.getsitepackages() + [site.getusersitepackages()]))"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|d| Path::new(d).join("nvidia/cuda_nvcc/bin/ptxas"))
        .find(|p| p.is_file())
}

fn ptxas_or_skip() -> Option<PathBuf> {
    match find_ptxas() {
        Some(p) => Some(p),
        None if std::env::var_os("CI").is_some() => {
            panic!("ptxas not found (set LLMC_PTXAS or `pip install nvidia-cuda-nvcc-cu12`); CI is set, so this fails instead of skipping")
        }
        None => {
            eprintln!("SKIP: ptxas not found (set LLMC_PTXAS or `pip install nvidia-cuda-nvcc-cu12`)");
            None
        }
    }
}

/// Compiles `model` for CUDA with `extra` args, PTX into `dir/ptx`; returns the PTX files.
fn compile_ptx(model: &Path, dir: &Path, extra: &[&str]) -> Vec<PathBuf> {
    let ptx = dir.join("ptx");
    let art = dir.join("model.llmc");
    let j = last_json(&ok(llmc()
        .arg("compile")
        .arg(model)
        .args(["--target", "cuda", "--json", "-o"])
        .arg(&art)
        .arg("--emit")
        .arg("ptx")
        .arg(&ptx)
        .args(extra)));
    let kernels = j["kernels"].as_u64().unwrap() as usize;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&ptx).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "ptx")).collect();
    files.sort();
    assert_eq!(files.len(), 2 * kernels, "{}: one PTX file per kernel and architecture", model.display());
    assert_eq!(j["ptx_files"].as_u64(), Some(files.len() as u64));
    files
}

/// Cases also compiled with the 2:4 and activation-quantized layouts ([`NEW_LAYOUT_VARIANTS`]).
const NEW_LAYOUT_CASES: &[&str] = &["seedlm", "llama_gqa_llama3", "gpt2"];
const NEW_LAYOUT_VARIANTS: &[(&str, &[&str])] = &[
    ("w8a8", &["--quant", "w8a8"]),
    ("w4a8", &["--quant", "w4a8"]),
    ("sparse24", &["--sparsity", "2:4"]),
    ("sparse24-int8", &["--sparsity", "2:4", "--quant", "int8"]),
];

/// seedlm is also compiled with f32 and bf16 weights.
const WEIGHT_DTYPE_VARIANTS: &[(&str, &[&str])] = &[("f32", &["--weights-dtype", "f32"]), ("bf16", &["--weights-dtype", "bf16"])];

/// Code and data checksums of every artifact [`every_kernel_of_every_model_assembles_with_ptxas`]
/// compiles (`LLMC_BLESS=1` re-records them): the CUDA driver emits the same bytes as before a
/// refactor. PTX depends on the LLVM that wrote it, so on another LLVM version only the data
/// sections are compared.
const HASH_LIST: &str = "tests/artifact_hashes_cuda.txt";

/// `llvm-config --version` of the LLVM the build links (`$MLIR_SYS_220_PREFIX`).
fn llvm_version() -> String {
    let prefix = std::env::var("MLIR_SYS_220_PREFIX").unwrap_or_else(|_| "/usr/lib/llvm-22".into());
    Command::new(Path::new(&prefix).join("bin/llvm-config"))
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Every kernel of every artifact assembles, and the artifacts' sections are the recorded ones.
#[test]
fn every_kernel_of_every_model_assembles_with_ptxas() {
    let Some(ptxas) = ptxas_or_skip() else { return };
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    let mut failures = Vec::new();
    let mut hashes = std::collections::BTreeMap::new();
    for (case, model) in ptx_cases() {
        let mut variants: Vec<(&str, &[&str])> = vec![("f16", &[]), ("int8", &["--quant", "int8"]), ("int4", &["--quant", "int4"])];
        if NEW_LAYOUT_CASES.contains(&case.as_str()) {
            variants.extend(NEW_LAYOUT_VARIANTS.iter().copied());
        }
        if case == "seedlm" {
            variants.extend(WEIGHT_DTYPE_VARIANTS.iter().copied());
        }
        for (variant, extra) in variants {
            if (case.as_str(), variant) == ("gpt2", "sparse24") {
                // 2:4 alone prunes only transposed products, and GPT-2's Conv1D products are not
                // (its tied head and tables are not pruned): a flag that would change nothing.
                let dir = tmpdir("cuda-ptx-gpt2-sparse24");
                let out = llmc().arg("compile").arg(&model).args(["--target", "cuda", "-o"]).arg(dir.join("m.llmc")).args(extra).output().unwrap();
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(!out.status.success() && err.contains("--sparsity 2:4 would change nothing"), "{err}");
                continue;
            }
            let dir = tmpdir(&format!("cuda-ptx-{case}-{variant}"));
            let files = compile_ptx(&model, &dir, extra);
            let (_, code, data) = section_hashes(&dir.join("model.llmc"));
            hashes.insert(format!("{case}-{variant}"), (code, data));
            assert!(!files.is_empty(), "{case} {variant}: no kernels");
            for f in &files {
                let name = f.file_name().unwrap().to_string_lossy().into_owned();
                let arch = if name.ends_with(".sm_80.ptx") {
                    "sm_80"
                } else if name.ends_with(".sm_90.ptx") {
                    "sm_90"
                } else {
                    panic!("{name}: PTX file without an architecture in its name")
                };
                let ptx = std::fs::read_to_string(f).unwrap();
                assert!(ptx.contains(&format!(".target {arch}")), "{name}: PTX does not target {arch}");
                let out = Command::new(&ptxas)
                    .arg(format!("-arch={arch}"))
                    .arg(f)
                    .arg("-o")
                    .arg(dir.join("out.cubin"))
                    .output()
                    .unwrap_or_else(|e| panic!("running {}: {e}", ptxas.display()));
                if out.status.success() {
                    *counts.entry(arch).or_default() += 1;
                } else {
                    failures.push(format!("{case} {variant} {name}: {}", String::from_utf8_lossy(&out.stderr)));
                }
            }
        }
    }
    check_hash_list(HASH_LIST, "`llmc compile --target cuda` artifacts; tests/cuda.rs", ("llvm", "LLVM version"), &llvm_version(), &hashes);
    eprintln!("ptxas accepted: {counts:?}");
    assert!(failures.is_empty(), "ptxas rejected {} kernel(s):\n{}", failures.len(), failures.join("\n"));
    assert_eq!(counts.get("sm_80"), counts.get("sm_90"), "every kernel in both architectures");
    assert!(counts.get("sm_80").copied().unwrap_or(0) >= ptx_cases().len() * 3 + NEW_LAYOUT_CASES.len() * NEW_LAYOUT_VARIANTS.len(), "{counts:?}");
}

/// ptxas rejects broken PTX (so the test above can fail).
#[test]
fn ptxas_rejects_bad_ptx() {
    let Some(ptxas) = ptxas_or_skip() else { return };
    let dir = tmpdir("cuda-bad-ptx");
    let f = dir.join("bad.ptx");
    std::fs::write(&f, ".version 8.0\n.target sm_80\n.address_size 64\n.visible .entry k() { mov.u32 %r1, 1; ret; }\n").unwrap();
    let out = Command::new(&ptxas).args(["-arch=sm_80"]).arg(&f).arg("-o").arg(dir.join("o.cubin")).output().unwrap();
    assert!(!out.status.success(), "ptxas accepted an undeclared register");
}

/// Where no GPU can run it (no `libcuda`, no device), a CUDA artifact is a clear error.
#[test]
fn cuda_artifact_without_gpu_is_a_clear_error() {
    if llmc_runtime::cuda::unavailable_reason().is_none() {
        eprintln!("SKIP: a GPU is present");
        return;
    }
    let dir = tmpdir("cuda-no-gpu");
    let art = dir.join("m.llmc");
    ok(llmc().arg("compile").arg(fixture("llama_mha")).args(["--target", "cuda", "-o"]).arg(&art));
    fails_with(llmc().arg("run").arg(&art).args(["--input-ids", "1,2,3"]), &["cannot run this CUDA artifact", "m.llmc"]);
    fails_with(llmc().arg("bench").arg(&art), &["cannot run this CUDA artifact"]);
}

#[test]
fn cuda_flag_errors() {
    let dir = tmpdir("cuda-flags");
    let art = dir.join("m.llmc");
    let m = fixture("llama_mha");
    fails_with(llmc().arg("compile").arg(&m).args(["--target", "cpu", "--emit", "ptx"]).arg(dir.join("p")).arg("-o").arg(&art), &["--emit ptx DIR needs --target cuda"]);
    fails_with(llmc().arg("compile").arg(&m).args(["--target", "cuda", "--weights-dtype", "f8", "-o"]).arg(&art), &["--weights-dtype `f8`", "f32, f16, bf16 or keep"]);
    fails_with(llmc().arg("compile").arg(&m).args(["--target", "cpu", "--weights-dtype", "f8", "-o"]).arg(&art), &["--weights-dtype `f8`"]);
    fails_with(llmc().arg("compile").arg(&m).args(["--target", "cuda", "--no-microkernels", "-o"]).arg(&art), &["--no-microkernels applies to --target cpu"]);
    fails_with(llmc().arg("compile").arg(&m).args(["--target", "cuda", "--emit", "lib", "-o"]).arg(&art), &["--emit lib"]);
}

fn gpu_tests() -> bool {
    if std::env::var("LLMC_GPU_TESTS").as_deref() == Ok("1") {
        return true;
    }
    eprintln!("SKIP: GPU test (set LLMC_GPU_TESTS=1 on a machine with an NVIDIA GPU)");
    false
}

/// Prompt logits and greedy ids from a CUDA artifact against the transformers fixture.
fn gpu_golden(case: &str, dtype: &str, tol: f32) {
    let dir = fixture(case);
    let tmp = tmpdir(&format!("cuda-golden-{case}-{dtype}"));
    let art = tmp.join("model.llmc");
    ok(llmc().arg("compile").arg(&dir).args(["--target", "cuda", "--weights-dtype", dtype, "-o"]).arg(&art));
    let greedy = read_json(&dir.join("greedy.json"));
    let prompt = ids_of(&greedy["prompt_ids"]);
    let want_new = ids_of(&greedy["new_ids"]);
    let (shape, want_logits) = npy::read_f32(&dir.join("logits.npy")).unwrap();
    let logits_path = tmp.join("logits.npy");
    let out = run_greedy_with_logits(&art, &prompt, want_new.len(), &logits_path);
    let (gshape, got) = npy::read_f32(&logits_path).unwrap();
    assert_eq!(gshape, shape, "{case}: logits shape");
    let err = max_abs_diff(&got, &want_logits);
    eprintln!("{case} ({dtype} weights on the GPU): prompt logits max abs error vs transformers {err:.2e}");
    assert!(err <= tol, "{case} ({dtype}): prompt logits differ from transformers by {err} > {tol}");
    if dtype == "f32" {
        // Greedy ids up to the first near tie of the reference (as tests/golden.rs).
        let margins: Vec<f32> = greedy["margins"].as_array().unwrap().iter().map(|m| m.as_f64().unwrap() as f32).collect();
        let n = margins.iter().position(|&m| m < 5e-3).map(|i| i + 1).unwrap_or(want_new.len());
        let got_new = ids_of(&last_json(&out)["generated_ids"]);
        assert_eq!(&got_new[..n], &want_new[..n], "{case}: greedy ids differ on the GPU");
    }
}

#[test]
fn gpu_golden_f32_weights() {
    if !gpu_tests() {
        return;
    }
    for case in GOLDEN {
        gpu_golden(case, "f32", F32_TOL);
    }
}

#[test]
fn gpu_golden_f16_weights() {
    if !gpu_tests() {
        return;
    }
    for case in GOLDEN {
        gpu_golden(case, "f16", F16_TOL);
    }
}

#[test]
fn gpu_bench_prints_roofline() {
    if !gpu_tests() {
        return;
    }
    let tmp = tmpdir("cuda-bench");
    let art = tmp.join("seedlm.llmc");
    ok(llmc().arg("compile").arg(repo().join("models/seedlm")).args(["--target", "cuda", "-o"]).arg(&art));
    let j = last_json(&ok(llmc().arg("bench").arg(&art).args(["--prompt-len", "32", "--gen", "16", "--json"])));
    let roof = j["gpu"]["roofline_decode_tokens_per_s"].as_f64().expect("roofline in the bench JSON");
    let got = j["decode_tokens_per_s"].as_f64().unwrap();
    assert!(roof > 0.0 && got > 0.0, "{j}");
    let text = stdout(&llmc().arg("bench").arg(&art).args(["--prompt-len", "32", "--gen", "16"]).output().unwrap());
    assert!(text.contains("HBM roofline"), "{text}");
}

/// Without a GPU: the whole artifact (memory plan, step list, launch shapes, tables, scratch,
/// f16/f32 weights, the KV cache across a prefill and a decode step) run by the MLIR emulator
/// of `llmc_codegen::cuda::emulate`, against transformers' logits.
#[test]
fn emulated_artifacts_match_transformers() {
    for case in ["llama_mha", "llama_gqa_llama3", "gpt2", "mistral_sliding", "qwen3", "gemma", "phi3", "neox", "mixtral"] {
        let dir = fixture(case);
        let greedy = read_json(&dir.join("greedy.json"));
        let prompt = ids_of(&greedy["prompt_ids"]);
        let new = ids_of(&greedy["new_ids"]);
        let (_, want) = npy::read_f32(&dir.join("logits.npy")).unwrap();
        let (dshape, want_decode) = npy::read_f32(&dir.join("decode_logits.npy")).unwrap();
        let vocab = dshape[1];
        for (dtype, tol) in [("f32", F32_TOL), ("f16", F16_TOL)] {
            let tmp = tmpdir(&format!("cuda-emulated-{case}-{dtype}"));
            let art = tmp.join("m.llmc");
            let ptx = tmp.join("ptx");
            ok(llmc().arg("compile").arg(&dir).args(["--target", "cuda", "--weights-dtype", dtype, "-o"]).arg(&art).arg("--emit").arg("ptx").arg(&ptx));
            let a = llmc_runtime::Artifact::open(&art).unwrap();
            let mut names: Vec<PathBuf> = std::fs::read_dir(&ptx).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "mlir")).collect();
            names.sort();
            let mlir: Vec<String> = names.iter().map(|p| std::fs::read_to_string(p).unwrap()).collect();
            let out = llmc_codegen::cuda::emulate::run_artifact(&a, &mlir, &[&prompt, &new[..1]]);
            let err = max_abs_diff(&out[0], &want);
            let derr = max_abs_diff(&out[1], &want_decode[vocab..2 * vocab]);
            eprintln!("{case} ({dtype} weights, emulated): prompt logits max abs error {err:.2e}, decode step {derr:.2e}");
            assert!(err <= tol && derr <= tol, "{case} ({dtype}): emulated logits differ from transformers: prompt {err}, decode {derr} > {tol}");
        }
    }
}

/// Packed int8/int4/2:4/W8A8/W4A8 weights (including the optimizer's merged gate/up concat,
/// packed row-wise) in an emulated CUDA artifact give the CPU artifact's logits for the same
/// quantized graph.
#[test]
fn emulated_quantized_artifacts_match_the_cpu_target() {
    let dir = fixture("llama_gqa_llama3");
    let prompt = ids_of(&read_json(&dir.join("greedy.json"))["prompt_ids"]);
    for (quant, flags) in [
        ("int8", &["--quant", "int8"][..]),
        ("int4", &["--quant", "int4"][..]),
        ("int4:g32:asym", &["--quant", "int4:g32:asym"][..]),
        ("sparse24", &["--sparsity", "2:4"][..]),
        ("sparse24-int8", &["--sparsity", "2:4", "--quant", "int8"][..]),
        ("w8a8", &["--quant", "w8a8"][..]),
        ("w4a8", &["--quant", "w4a8"][..]),
    ] {
        let tmp = tmpdir(&format!("cuda-emulated-quant-{}", quant.replace(':', "-")));
        let cpu = tmp.join("cpu.llmc");
        // w8a8/w4a8: the CPU target's generated loops, whose f32 summation order the CUDA kernels
        // share (see the tolerance below; the runtime's GEMV sums in another order and is checked
        // against the interpreter in the codegen tests).
        let a8 = quant.starts_with('w');
        let flag = |name: &str| flags.iter().position(|f| *f == name).map(|i| flags[i + 1].to_string());
        let q = QuantConfig { quant: flag("--quant"), sparsity: flag("--sparsity"), ..Default::default() };
        compile_with(&dir, &cpu, CompileConfig { quant: q, no_microkernels: a8, ..Default::default() });
        let logits = tmp.join("cpu.npy");
        ok(llmc().arg("run").arg(&cpu).arg("--input-ids").arg(join_ids(&prompt)).args(["--max-new-tokens", "1", "--logits-out"]).arg(&logits));
        let (_, want) = npy::read_f32(&logits).unwrap();
        let art = tmp.join("gpu.llmc");
        let ptx = tmp.join("ptx");
        // f32 for the weights that stay unpacked (embeddings, norms), so only packing differs.
        ok(llmc().arg("compile").arg(&dir).args(["--target", "cuda", "--weights-dtype", "f32"]).args(flags).arg("-o").arg(&art).arg("--emit").arg("ptx").arg(&ptx));
        let a = llmc_runtime::Artifact::open(&art).unwrap();
        assert!(a.header.buffers.iter().any(|b| matches!(b, llmc_runtime::BufferDecl::Data { name, .. } if name.starts_with("concat"))), "{quant}: a packed weight concat");
        let mut names: Vec<PathBuf> = std::fs::read_dir(&ptx).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "mlir")).collect();
        names.sort();
        let mlir: Vec<String> = names.iter().map(|p| std::fs::read_to_string(p).unwrap()).collect();
        assert!(mlir.iter().any(|m| m.contains("gated_linear")), "{quant}: a gated_linear kernel");
        // w8a8/w4a8: the products quantize their activations per token (the rounding of
        // `ir::quant::quantize_act`), and the other layouts' products do not.
        let rounds = mlir.iter().any(|m| m.contains("cvt.rni"));
        assert_eq!(rounds, quant.starts_with('w'), "{quant}: activation quantization in the kernels");
        let out = llmc_codegen::cuda::emulate::run_artifact(&a, &mlir, &[&prompt]);
        let err = max_abs_diff(&out[0], &want);
        eprintln!("{quant} (emulated CUDA vs CPU target): prompt logits max abs difference {err:.2e}");
        // Both targets decode the same packed bytes exactly; only summation order differs. (With
        // w8a8/w4a8 a last-bit difference could move an activation across a rounding boundary,
        // one int8 level; these fixtures' activations do not land on one: measured <= 4e-6.)
        assert!(err <= 1e-4, "{quant}: emulated CUDA logits differ from the CPU target's by {err}");
    }
}

/// A copy of the bf16 fixture `llama_tied_bf16` with one element of `tensor` set to `value`
/// (rounded to bf16), in a new directory.
fn bf16_checkpoint_with(name: &str, tensor: &str, index: usize, value: f32) -> PathBuf {
    use safetensors::tensor::TensorView;
    let src = fixture("llama_tied_bf16");
    let dir = tmpdir(name);
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut datas: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (n, t) in st.tensors() {
        let mut d = t.data().to_vec();
        if n == tensor {
            assert_eq!(t.dtype(), safetensors::Dtype::BF16);
            d[2 * index..2 * index + 2].copy_from_slice(&((value.to_bits() >> 16) as u16).to_le_bytes());
        }
        datas.push((n, t.dtype(), t.shape().to_vec(), d));
    }
    let views: Vec<(String, TensorView)> = datas.iter().map(|(n, dt, s, d)| (n.clone(), TensorView::new(*dt, s.clone(), d).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    dir
}

/// `--weights-dtype`: a bf16 weight beyond f16's range is an error naming the tensor when the
/// target would store it as f16 (the CUDA default; on the CPU when asked for), and compiles as
/// bf16, keep or f32.
#[test]
fn weights_dtype_overflow_names_the_tensor() {
    let tensor = "model.layers.1.self_attn.o_proj.weight";
    let model = bf16_checkpoint_with("cuda-f16-overflow", tensor, 5, 1.0e6);
    let art = model.join("m.llmc");
    let err = fails_with(llmc().arg("compile").arg(&model).args(["--target", "cuda", "-o"]).arg(&art), &["--weights-dtype f16", tensor, "beyond f16's range"]);
    assert!(err.contains("element 5"), "{err}");
    assert!(!art.exists(), "a failed compile leaves no artifact");
    for d in ["bf16", "keep", "f32"] {
        ok(llmc().arg("compile").arg(&model).args(["--target", "cuda", "--weights-dtype", d, "-o"]).arg(&art));
    }
    fails_with(llmc().arg("compile").arg(&model).args(["--target", "cpu", "--weights-dtype", "f16", "-o"]).arg(&art), &["--weights-dtype f16", tensor, "beyond f16's range"]);
    for d in ["bf16", "keep", "f32"] {
        ok(llmc().arg("compile").arg(&model).args(["--target", "cpu", "--weights-dtype", d, "-o"]).arg(&art));
    }
}
