//! The int8 KV cache (`llmc compile --kv-dtype int8`): whole models against the reference
//! interpreter running the same IR (the `kv-cache{dtype=int8}` pass applied), prefill and
//! decode through the runtime; the cache's size; the flag's errors.

mod common;

use std::sync::Arc;

use common::*;
use llmc_compiler::CompileConfig;
use llmc_passes::{KvCache, Pass};
use llmc_runtime::{Model, Session};

/// Prompt logits (every position) and then each decode step's, through the runtime.
fn compiled_logits(art: &std::path::Path, prompt: &[u32], decode: &[u32]) -> Vec<Vec<f32>> {
    let model = Model::load(art).unwrap();
    let mut s = Session::new(Arc::clone(&model)).unwrap();
    let mut out = vec![s.forward(prompt, true).unwrap()];
    for &t in decode {
        out.push(s.forward(&[t], false).unwrap());
    }
    out
}

/// The same steps in the reference interpreter over the optimized IR with an int8 cache.
fn interpreter_logits(dir: &std::path::Path, prompt: &[u32], decode: &[u32]) -> Vec<Vec<f32>> {
    let mut m = optimized(dir);
    KvCache { layout: llmc_ir::KvLayout::Int8 }.run(&mut m.graph).unwrap();
    let mut it = llmc_ir::Interpreter::new(&m.checkpoint);
    let ids = |x: &[u32]| x.iter().map(|&i| i as i32).collect::<Vec<_>>();
    let mut out = vec![it.run(&m.graph, &ids(prompt)).unwrap()[0].data.clone()];
    for &t in decode {
        out.push(it.run(&m.graph, &ids(&[t])).unwrap()[0].data.clone());
    }
    out
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().zip(b).map(|(x, y)| max_abs_diff(x, y)).fold(0.0, f32::max)
}

#[test]
fn int8_kv_models_match_the_interpreter_and_differ_from_f32() {
    // MHA (the bundled trained model), GQA with llama3 RoPE, a sliding window.
    for (case, dir) in [("seedlm", repo().join("models/seedlm")), ("llama_gqa_llama3", fixture("llama_gqa_llama3")), ("mistral_sliding", fixture("mistral_sliding"))] {
        let tmp = tmpdir(&format!("kv-int8-{case}"));
        let (a8, a32) = (tmp.join("int8.llmc"), tmp.join("f32.llmc"));
        let r8 = compile_with(&dir, &a8, CompileConfig { kv_dtype: Some("int8".into()), ..Default::default() });
        let r32 = compile_with(&dir, &a32, CompileConfig::default());
        // Codes are a quarter of the f32 bytes, plus one f32 scale per head vector (1/D of them;
        // these fixtures' heads are 8 wide or more).
        assert!(r8.kv_cache_bytes * 8 <= r32.kv_cache_bytes * 3 + 64 * 8, "{case}: {} vs {}", r8.kv_cache_bytes, r32.kv_cache_bytes);
        let vocab = Model::load(&a8).unwrap().token_vocab_size() as u32;
        let prompt: Vec<u32> = (0..19).map(|i| (i * 37 + 11) % vocab).collect();
        let decode: Vec<u32> = (0..4).map(|i| (i * 101 + 5) % vocab).collect();
        let got = compiled_logits(&a8, &prompt, &decode);
        let want = interpreter_logits(&dir, &prompt, &decode);
        let f32_cache = compiled_logits(&a32, &prompt, &decode);
        let (err, moved) = (max_diff(&got, &want), max_diff(&got, &f32_cache));
        eprintln!("{case}: int8 KV vs interpreter {err:.2e}, vs the f32 cache {moved:.2e}");
        assert!(err <= 2e-3, "{case}: int8-KV logits differ from the interpreter's by {err}");
        assert!(moved > 0.0, "{case}: the int8 cache changed nothing: is it in use?");
    }
}

#[test]
fn kv_dtype_flag_errors_name_it() {
    let tmp = tmpdir("kv-int8-flags");
    let out = tmp.join("x.llmc");
    let e = fails_with(llmc().args(["compile"]).arg(repo().join("models/seedlm")).arg("-o").arg(&out).args(["--kv-dtype", "int4"]), &["--kv-dtype"]);
    assert!(e.contains("int4") && e.contains("f32 or int8"), "{e}");
    let e = fails_with(
        llmc().args(["compile"]).arg(repo().join("models/seedlm")).arg("-o").arg(&out).args(["--kv-dtype", "int8", "--passes", "dce,kv-cache{dtype=f32}"]),
        &["--kv-dtype"],
    );
    assert!(e.contains("kv-cache entry"), "{e}");
    // Through --passes alone, the IR says what the cache is.
    let ir = ok(llmc().args(["dump-ir"]).arg(repo().join("models/seedlm")).args(["--passes", "dce,kv-cache{dtype=int8}"]));
    assert!(ir.contains("kv<int8> f32["), "{}", &ir[..ir.len().min(2000)]);
}
