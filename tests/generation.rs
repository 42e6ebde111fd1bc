//! Generation from the command line: text prompts through the tokenizer the artifact carries,
//! streaming, stop tokens, chat templates, sampling, speculative decoding, `bench`, and the
//! scripting surface (`--json` on every command, `--quiet`, progress bars, `RUST_LOG`).
//!
//! The speculative tests use a draft made from seedlm itself: its first two of six layers with
//! seedlm's embedding, final norm and head (a "layer-skipping" self-draft, written by
//! [`draft_checkpoint`]). It shares the vocabulary, agrees with the target often but not always,
//! so both the accept and the reject paths run.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::*;

fn seedlm_dir() -> PathBuf {
    repo().join("models/seedlm")
}

/// seedlm compiled once per test binary.
fn seedlm_artifact() -> &'static Path {
    static ART: OnceLock<PathBuf> = OnceLock::new();
    ART.get_or_init(|| {
        let d = tmpdir("gen-seedlm");
        let art = d.join("seedlm.llmc");
        compile(&seedlm_dir(), &art);
        art
    })
}

/// The 2-layer self-draft of seedlm, compiled once per test binary.
fn draft_artifact() -> &'static Path {
    static ART: OnceLock<PathBuf> = OnceLock::new();
    ART.get_or_init(|| {
        let d = tmpdir("gen-draft");
        let ckpt = d.join("ckpt");
        draft_checkpoint(&seedlm_dir(), &ckpt, 2);
        let art = d.join("draft.llmc");
        compile(&ckpt, &art);
        art
    })
}

/// Writes a checkpoint with the first `layers` layers of the Llama checkpoint in `src` (and its
/// embedding, final norm, head and tokenizer) to `dst`.
fn draft_checkpoint(src: &Path, dst: &Path, layers: usize) {
    std::fs::create_dir_all(dst).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let keep = |name: &str| match name.strip_prefix("model.layers.") {
        Some(rest) => rest.split('.').next().unwrap().parse::<usize>().unwrap() < layers,
        None => true,
    };
    let kept: Vec<_> = st.tensors().into_iter().filter(|(n, _)| keep(n)).collect();
    std::fs::write(dst.join("model.safetensors"), safetensors::serialize(kept, None).unwrap()).unwrap();
    let mut cfg = read_json(&src.join("config.json"));
    cfg["num_hidden_layers"] = serde_json::json!(layers);
    std::fs::write(dst.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(src.join("tokenizer.json"), dst.join("tokenizer.json")).unwrap();
}

fn golden() -> serde_json::Value {
    read_json(&seedlm_dir().join("golden_greedy.json"))
}

fn run_json(args: &[&str]) -> serde_json::Value {
    last_json(&ok(llmc().arg("run").arg(seedlm_artifact()).args(args).arg("--json")))
}

#[test]
fn prompt_text_tokenizes_like_transformers_and_decodes_the_greedy_text() {
    for case in golden()["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let j = run_json(&["--prompt", prompt, "--max-new-tokens", "32"]);
        assert_eq!(ids_of(&j["prompt_ids"]), ids_of(&case["prompt_ids"]), "{prompt:?}: prompt ids");
        assert_eq!(ids_of(&j["generated_ids"]), ids_of(&case["greedy_new_ids"]), "{prompt:?}: generated ids");
        assert_eq!(j["text"], case["greedy_text"], "{prompt:?}: text");
        assert_eq!(j["stop_reason"], "max_new_tokens");
    }
}

#[test]
fn prompt_text_streams_to_stdout() {
    let case = &golden()["cases"][1];
    let out = ok(llmc().arg("run").arg(seedlm_artifact()).arg("--prompt").arg(case["prompt"].as_str().unwrap()).arg("--max-new-tokens").arg("32"));
    assert_eq!(out, format!("{}\n", case["greedy_text"].as_str().unwrap()));
    // The text arrives while generating: read stdout piece by piece from a slow run.
    use std::io::Read;
    let mut child = llmc()
        .arg("run")
        .arg(seedlm_artifact())
        .arg("--prompt")
        .arg("def forward(self, x):")
        .args(["--max-new-tokens", "200", "--ignore-eos", "--threads", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut reads = 0;
    let mut buf = [0u8; 4096];
    while stdout.read(&mut buf).unwrap() > 0 {
        reads += 1;
    }
    assert!(child.wait().unwrap().success());
    assert!(reads > 3, "stdout came in {reads} piece(s): not streamed");
}

#[test]
fn stop_tokens_by_id_and_by_name() {
    let case = &golden()["cases"][0];
    let want = ids_of(&case["greedy_new_ids"]);
    let prompt = case["prompt"].as_str().unwrap();
    // 344 is the 4th greedy token; its string is "Ġ(" (byte-level BPE for " (").
    for stop in ["344", "Ġ("] {
        let j = run_json(&["--prompt", prompt, "--max-new-tokens", "32", "--stop", stop]);
        assert_eq!(ids_of(&j["generated_ids"]), want[..4], "--stop {stop}");
        assert_eq!(j["stop_reason"], "stop_token");
    }
    let mut c = llmc();
    c.arg("run").arg(seedlm_artifact()).args(["--prompt", prompt, "--stop", "not-a-token"]);
    fails_with(&mut c, &["--stop", "not-a-token"]);
}

#[test]
fn eos_from_generation_config_stops_generation() {
    // A checkpoint whose generation_config.json lists an extra end-of-sequence id (344).
    let d = tmpdir("gen-eos");
    let ckpt = d.join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(seedlm_dir().join(f), ckpt.join(f)).unwrap();
    }
    std::fs::write(ckpt.join("generation_config.json"), r#"{"eos_token_id": [1, 344]}"#).unwrap();
    let art = d.join("m.llmc");
    compile(&ckpt, &art);
    let case = &golden()["cases"][0];
    let prompt = case["prompt"].as_str().unwrap();
    let run = |extra: &[&str]| last_json(&ok(llmc().arg("run").arg(&art).args(["--prompt", prompt, "--max-new-tokens", "32", "--json"]).args(extra)));
    let j = run(&[]);
    assert_eq!(ids_of(&j["generated_ids"]), ids_of(&case["greedy_new_ids"])[..4]);
    assert_eq!(j["stop_reason"], "stop_token");
    assert_eq!(j["text"], " large language models (", "the stop token's text is part of the output");
    let j = run(&["--ignore-eos"]);
    assert_eq!(j["generated_tokens"], 32);
}

#[test]
fn chat_template_is_carried_and_applied() {
    // seedlm has no chat template: --chat is refused with the reason.
    let mut c = llmc();
    c.arg("run").arg(seedlm_artifact()).args(["--prompt", "hi", "--chat"]);
    fails_with(&mut c, &["no chat template", "--chat"]);
    // The same checkpoint with a tokenizer_config.json holding one.
    let d = tmpdir("gen-chat");
    let ckpt = d.join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(seedlm_dir().join(f), ckpt.join(f)).unwrap();
    }
    let template = "{{ bos_token }}{% for m in messages %}{{ m.role | upper }}: {{ m.content }}\n{% endfor %}\
                    {% if add_generation_prompt %}ASSISTANT:{% endif %}";
    let cfg = serde_json::json!({ "chat_template": template, "bos_token": "<|bos|>", "eos_token": {"content": "<|eos|>"} });
    std::fs::write(ckpt.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let art = d.join("chat.llmc");
    let report = last_json(&ok(llmc().arg("compile").arg(&ckpt).arg("-o").arg(&art).arg("--json")));
    assert_eq!(report["chat_template"], true);
    let j = last_json(&ok(llmc().arg("run").arg(&art).args(["--prompt", "hi", "--chat", "--system", "be brief", "--max-new-tokens", "4", "--json"])));
    let rendered = "<|bos|>SYSTEM: be brief\nUSER: hi\nASSISTANT:";
    assert_eq!(j["prompt_text"], rendered);
    let ids = ids_of(&j["prompt_ids"]);
    assert_eq!(ids[0], 0, "<|bos|> in the template text becomes the special token");
    // The rendered text tokenizes the same through the plain path.
    let plain = last_json(&ok(llmc().arg("run").arg(&art).args(["--prompt", rendered, "--max-new-tokens", "1", "--json"])));
    assert_eq!(ids_of(&plain["prompt_ids"]), ids);
}

#[test]
fn sampling_is_reproducible_by_seed() {
    let p = "Speculative decoding";
    let run = |seed: &str| {
        let j = run_json(&["--prompt", p, "--max-new-tokens", "24", "--temperature", "0.9", "--top-k", "50", "--top-p", "0.95", "--seed", seed]);
        (ids_of(&j["generated_ids"]), j["text"].as_str().unwrap().to_string())
    };
    let a = run("7");
    assert_eq!(a, run("7"), "same seed, same text");
    assert_ne!(a.0, run("8").0, "another seed, other text");
    let greedy = ids_of(&golden()["cases"][2]["greedy_new_ids"]);
    assert_ne!(a.0, greedy[..24], "sampling at temperature 0.9 is not greedy");
    // Temperature 0 is greedy whatever the seed.
    let j = run_json(&["--prompt", p, "--max-new-tokens", "32", "--temperature", "0", "--seed", "99"]);
    assert_eq!(ids_of(&j["generated_ids"]), greedy);
    // A repetition penalty changes greedy output (the greedy continuation repeats tokens).
    let j = run_json(&["--prompt", p, "--max-new-tokens", "32", "--repetition-penalty", "1.5"]);
    assert_ne!(ids_of(&j["generated_ids"]), greedy);
}

#[test]
fn bad_sampling_parameters_are_named() {
    for (flag, value, needle) in [("--temperature", "-1", "temperature"), ("--top-p", "0", "top-p"), ("--repetition-penalty", "0", "repetition penalty")] {
        let mut c = llmc();
        c.arg("run").arg(seedlm_artifact()).args(["--input-ids", "1,2", flag, value]);
        fails_with(&mut c, &[needle]);
    }
}

#[test]
fn speculative_greedy_output_equals_the_target_alone() {
    let draft = draft_artifact();
    let mut saw_rejections = false;
    for case in golden()["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        for k in ["1", "3", "6"] {
            let j = run_json(&["--prompt", prompt, "--max-new-tokens", "32", "--draft", draft.to_str().unwrap(), "--speculate", k, "--threads", "1"]);
            assert_eq!(ids_of(&j["generated_ids"]), ids_of(&case["greedy_new_ids"]), "{prompt:?} k={k}");
            assert_eq!(j["text"], case["greedy_text"]);
            let s = &j["speculative"];
            let rate = s["acceptance_rate"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&rate));
            assert!(s["accepted"].as_u64().unwrap() > 0, "{prompt:?} k={k}: the 2-layer draft never agreed: {s}");
            saw_rejections |= s["accepted"] != s["proposed"];
            // Fewer target steps than tokens.
            assert!(s["rounds"].as_u64().unwrap() < 31, "{s}");
        }
    }
    assert!(saw_rejections, "the rejection path never ran");
}

#[test]
fn speculative_with_the_target_as_draft_accepts_everything() {
    // The same model compiled with another chunk size proposes exactly the target's tokens.
    let d = tmpdir("gen-selfdraft");
    let art = d.join("chunk3.llmc");
    compile_with(&seedlm_dir(), &art, CompileConfig { max_chunk: Some(3), ..Default::default() });
    let case = &golden()["cases"][0];
    let j = run_json(&["--prompt", case["prompt"].as_str().unwrap(), "--max-new-tokens", "32", "--draft", art.to_str().unwrap(), "--speculate", "4"]);
    assert_eq!(ids_of(&j["generated_ids"]), ids_of(&case["greedy_new_ids"]));
    assert_eq!(j["speculative"]["acceptance_rate"], 1.0, "{}", j["speculative"]);
    // 31 tokens after the prefill's first, 5 per round (4 drafted + 1 of the target's own).
    assert_eq!(j["speculative"]["rounds"], 7);
}

#[test]
fn speculative_sampling_equals_plain_sampling_with_the_same_seed() {
    let args = ["--prompt", "Quantization", "--max-new-tokens", "40", "--temperature", "0.8", "--top-k", "40", "--seed", "11"];
    let plain = run_json(&args);
    let mut with_draft = args.to_vec();
    with_draft.extend(["--draft", draft_artifact().to_str().unwrap(), "--speculate", "4", "--threads", "1"]);
    let spec = run_json(&with_draft);
    assert_eq!(spec["generated_ids"], plain["generated_ids"]);
}

#[test]
fn speculative_needs_the_same_vocabulary() {
    let d = tmpdir("gen-vocab");
    let other = d.join("mha.llmc");
    compile(&fixture("llama_mha"), &other);
    let mut c = llmc();
    c.arg("run").arg(seedlm_artifact()).args(["--input-ids", "1,2", "--draft"]).arg(&other);
    fails_with(&mut c, &["vocabulary", "256", "4096"]);
    let mut c = llmc();
    c.arg("run").arg(seedlm_artifact()).args(["--input-ids", "1,2", "--draft"]).arg(draft_artifact()).args(["--speculate", "0"]);
    fails_with(&mut c, &["speculation length"]);
}

#[test]
fn bench_reports_rates_memory_and_speculation() {
    let out = ok(llmc()
        .arg("bench")
        .arg(seedlm_artifact())
        .args(["--prompt-len", "32", "--gen", "16", "--reps", "2", "--threads", "1", "--json", "--draft"])
        .arg(draft_artifact())
        .args(["--speculate", "3"]));
    let j = last_json(&out);
    assert!(j["prefill_tokens_per_s"].as_f64().unwrap() > 0.0, "{j}");
    assert!(j["decode_tokens_per_s"].as_f64().unwrap() > 0.0, "{j}");
    assert_eq!(j["prefill_tokens_per_s_runs"].as_array().unwrap().len(), 2);
    assert!(j["peak_rss_bytes"].as_u64().unwrap() > 25 << 20, "the weights alone are 24 MiB: {j}");
    let s = &j["speculative"];
    let rate = s["acceptance_rate"].as_f64().unwrap();
    assert!(rate > 0.0 && rate <= 1.0, "{s}");
    assert!(s["speedup"].as_f64().unwrap() > 0.0, "{s}");
    assert_eq!(s["identical_output"], true);
    assert!(out.contains("prefill") && out.contains("tokens/s") && out.contains("acceptance"));
    // Without a draft there is no speculative section; a prompt too long for the context is named.
    let j = last_json(&ok(llmc().arg("bench").arg(seedlm_artifact()).args(["--prompt-len", "8", "--gen", "4", "--reps", "1", "--json"])));
    assert!(j["speculative"].is_null());
    let mut c = llmc();
    c.arg("bench").arg(seedlm_artifact()).args(["--prompt-len", "500", "--gen", "64"]);
    fails_with(&mut c, &["context of 512"]);
}

/// `--roofline`: the read bandwidth measured in the same run, the bytes a decode step reads per
/// token (worked out here from seedlm's config, independently of the header), and the fraction of
/// the roofline reached. No timing is asserted beyond being measured.
#[test]
fn bench_roofline_reports_bandwidth_and_bytes_per_token() {
    let (prompt, gen) = (16usize, 8usize);
    let j = last_json(&ok(llmc()
        .arg("bench")
        .arg(seedlm_artifact())
        .args(["--prompt-len", &prompt.to_string(), "--gen", &gen.to_string(), "--reps", "1", "--roofline", "--json"])));
    let r = &j["roofline"];
    // seedlm: hidden 256, MLP 688, 6 layers, 8 heads of 32 / 2 KV heads, vocab 4096, untied
    // head: every matrix and norm once, one row of the embedding, K and V rows of every layer.
    let (h, i, l, kvd, v) = (256f64, 688f64, 6f64, 64f64, 4096f64);
    let matrices = l * (h * h + 2.0 * kvd * h + h * h + 3.0 * h * i) + v * h;
    let norms = l * 2.0 * h + h;
    let kv_row = l * 2.0 * kvd * 4.0;
    let want = 4.0 * (matrices + norms + h) + kv_row * (prompt as f64 + gen as f64 / 2.0);
    let got = r["bytes_per_decode_token"].as_f64().unwrap();
    // Constant tables (rope frequencies) are the only other data read.
    assert!(got >= want && got < want * 1.01, "bytes per token {got}, seedlm reads {want}: {r}");
    for k in ["read_bytes_per_s", "read_bytes_per_s_before", "read_bytes_per_s_after", "roofline_decode_tokens_per_s", "fraction_of_roofline"] {
        let x = r[k].as_f64().unwrap_or(0.0);
        assert!(x > 0.0 && x.is_finite(), "{k}: {r}");
    }
    assert!([1, 2, 4, 8, 16].contains(&r["best_streams"].as_u64().unwrap()), "{r}");
    assert!(!r["cpu"].as_str().unwrap().is_empty());
    // Without the flag the probe does not run.
    let j = last_json(&ok(llmc().arg("bench").arg(seedlm_artifact()).args(["--prompt-len", "4", "--gen", "2", "--reps", "1", "--json"])));
    assert!(j["roofline"].is_null(), "{j}");
}

#[test]
fn artifact_carries_the_tokenizer_under_the_data_checksum() {
    let bytes = std::fs::read(seedlm_artifact()).unwrap();
    let hlen = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    let h: serde_json::Value = serde_json::from_slice(&bytes[32..32 + hlen]).unwrap();
    let blob = h["blobs"].as_array().unwrap().iter().find(|b| b["name"] == "tokenizer.json").expect("tokenizer blob");
    let at = (h["data_offset"].as_u64().unwrap() + blob["offset"].as_u64().unwrap()) as usize;
    let len = blob["bytes"].as_u64().unwrap() as usize;
    assert_eq!(&bytes[at..at + len], std::fs::read(seedlm_dir().join("tokenizer.json")).unwrap());
    // A changed tokenizer byte is caught by the data checksum.
    let mut b = bytes.clone();
    b[at + len / 2] ^= 0x01;
    let p = tmpdir("gen-tokflip").join("flip.llmc");
    std::fs::write(&p, &b).unwrap();
    let mut c = llmc();
    c.arg("run").arg(&p).args(["--prompt", "hi"]);
    fails_with(&mut c, &["checksum", "data"]);
    // --no-tokenizer leaves it out; text prompts are then refused with the reason.
    let p = tmpdir("gen-notok").join("notok.llmc");
    compile_with(&seedlm_dir(), &p, CompileConfig { no_tokenizer: true, ..Default::default() });
    let mut c = llmc();
    c.arg("run").arg(&p).args(["--prompt", "hi"]);
    fails_with(&mut c, &["carries no tokenizer", "--input-ids"]);
    let j = last_json(&ok(llmc().arg("run").arg(&p).args(["--input-ids", "50,86", "--max-new-tokens", "2", "--json"])));
    assert!(j["text"].is_null());
}

#[test]
fn every_command_has_json_output() {
    let d = tmpdir("gen-json");
    let j = last_json(&ok(llmc().arg("compile").arg(fixture("llama_mha")).arg("-o").arg(d.join("m.llmc")).arg("--json")));
    assert!(j["file_bytes"].as_u64().unwrap() > 0);
    let j = last_json(&ok(llmc().arg("run").arg(d.join("m.llmc")).args(["--input-ids", "1,2", "--max-new-tokens", "2", "--json"])));
    assert_eq!(j["generated_tokens"], 2);
    let j = last_json(&ok(llmc().arg("bench").arg(d.join("m.llmc")).args(["--prompt-len", "4", "--gen", "2", "--reps", "1", "--json"])));
    assert!(j["decode_tokens_per_s"].as_f64().is_some());
    let j = last_json(&ok(llmc().arg("dump-ir").arg(fixture("llama_mha")).arg("--json")));
    let g = llmc_ir::parse(j["ir"].as_str().unwrap()).unwrap();
    llmc_ir::verify(&g).unwrap();
    assert_eq!(j["passes"].as_array().unwrap().len(), llmc_compiler::default_pipeline().len());
    let j = last_json(&ok(llmc().arg("dump-ir").arg(fixture("llama_mha")).args(["--after", "all", "--json"])));
    assert!(j["ir"].as_str().unwrap().contains("; ---- IR after "));
    let j = last_json(&ok(llmc().arg("passes").arg("--json")));
    assert_eq!(j["passes"].as_array().unwrap().len(), llmc_compiler::passes().len());
    assert!(j["passes"][0]["summary"].as_str().is_some());
}

#[test]
fn quiet_and_non_terminal_stderr_have_no_progress_bars() {
    let d = tmpdir("gen-quiet");
    let o = llmc().arg("compile").arg(seedlm_dir()).arg("-o").arg(d.join("a.llmc")).output().unwrap();
    assert!(o.status.success());
    let err = stderr(&o);
    assert!(!err.contains("writing weights") && !err.contains('\r'), "a bar was drawn on a pipe: {err:?}");
    assert!(err.contains("compiled"), "the summary is printed: {err:?}");
    let o = llmc().arg("--quiet").arg("compile").arg(seedlm_dir()).arg("-o").arg(d.join("b.llmc")).output().unwrap();
    assert!(o.status.success());
    assert_eq!(stderr(&o), "", "--quiet prints nothing on success");
    let o = llmc().arg("run").arg(d.join("b.llmc")).args(["--input-ids", "1,2", "--max-new-tokens", "2", "-q"]).output().unwrap();
    assert!(o.status.success());
    assert_eq!(stderr(&o), "");
}

/// With a terminal (`script` gives the command a pseudo-terminal), compile draws its bar;
/// `--quiet` hides it.
#[test]
fn progress_bar_on_a_terminal() {
    if std::process::Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: `script` (util-linux) is not installed");
        return;
    }
    let d = tmpdir("gen-tty");
    let exe = env!("CARGO_BIN_EXE_llmc");
    let tty = |extra: &str, out: &str| {
        let cmd = format!("{exe} {extra} compile {} -o {}", seedlm_dir().display(), d.join(out).display());
        let o = std::process::Command::new("script").args(["-qec", &cmd, "/dev/null"]).output().unwrap();
        assert!(o.status.success(), "{cmd}: {}", stdout(&o));
        stdout(&o)
    };
    assert!(tty("", "a.llmc").contains("tensors"), "no progress bar on a terminal");
    assert!(!tty("--quiet", "b.llmc").contains("tensors"));
}

#[test]
fn rust_log_enables_phase_logs() {
    let d = tmpdir("gen-log");
    let o = llmc().env("RUST_LOG", "info").arg("compile").arg(fixture("llama_mha")).arg("-o").arg(d.join("m.llmc")).output().unwrap();
    let err = stderr(&o);
    for phase in ["checkpoint loaded", "passes done", "artifact written"] {
        assert!(err.contains(phase), "no `{phase}` log: {err}");
    }
    let o = llmc().env("RUST_LOG", "info").arg("run").arg(d.join("m.llmc")).args(["--input-ids", "1,2", "--max-new-tokens", "2"]).output().unwrap();
    let err = stderr(&o);
    assert!(err.contains("artifact loaded") && err.contains("generation done"), "{err}");
    let o = llmc().env_remove("RUST_LOG").arg("run").arg(d.join("m.llmc")).args(["--input-ids", "1,2", "--max-new-tokens", "2"]).output().unwrap();
    assert!(!stderr(&o).contains("INFO"));
}
