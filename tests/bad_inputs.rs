//! The bad-input corpus: one case per class of hostile or broken input. Every case runs the `llmc`
//! binary as a child under an address-space limit ([`MEM_LIMIT`]) and a wall-clock limit
//! ([`TIME_LIMIT`]) and asserts a clean failure: exit code 1 (not a signal, so no abort, SIGILL or
//! out-of-memory kill), no panic, and an error message naming the file, tensor, field or flag.
//! Files are damaged by hand (safetensors headers and artifact bytes are rewritten here), so each
//! case checks exactly one thing.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Address-space limit of every child (`ulimit -v`, in KiB): 4 GiB. It bounds everything the
/// process maps, checkpoint mappings included, so no case can run away with memory; the models
/// here are a few hundred KiB.
const MEM_LIMIT: u64 = 4 << 20;
/// Wall-clock limit of every child: a hang fails the test instead of stalling the suite.
const TIME_LIMIT: Duration = Duration::from_secs(120);

/// Runs `cmd` under [`MEM_LIMIT`] and [`TIME_LIMIT`] and asserts a clean failure whose stderr
/// contains every one of `needles`; returns stderr.
fn fails(cmd: &mut Command, needles: &[&str]) -> String {
    let mut c = Command::new("sh");
    c.arg("-c").arg(format!("ulimit -v {MEM_LIMIT} && exec \"$0\" \"$@\"")).arg(cmd.get_program()).args(cmd.get_args());
    if let Some(d) = cmd.get_current_dir() {
        c.current_dir(d);
    }
    c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn llmc");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for llmc") {
            break st;
        }
        if start.elapsed() > TIME_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("llmc hung (killed after {TIME_LIMIT:?}): {cmd:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
    assert_eq!(status.code(), Some(1), "expected exit code 1, got {status} (a crash or kill): {cmd:?}\nstdout:\n{out}\nstderr:\n{err}");
    assert!(!err.contains("panicked"), "llmc panicked: {cmd:?}\n{err}");
    for n in needles {
        assert!(err.contains(n), "error message lacks `{n}`: {cmd:?}\nstderr:\n{err}");
    }
    err
}

/// A copy of a fixture model directory (config.json and its safetensors files) to damage.
fn copy_model(case: &str, name: &str) -> PathBuf {
    let src = fixture(case);
    let dst = tmpdir(name);
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        let f = p.file_name().unwrap().to_str().unwrap().to_string();
        if f == "config.json" || f.ends_with(".safetensors") || f.ends_with(".index.json") {
            std::fs::copy(&p, dst.join(&f)).unwrap();
        }
    }
    dst
}

fn compile_cmd(model: &Path, out: &Path) -> Command {
    let mut c = llmc();
    c.arg("compile").arg(model).arg("--target").arg("cpu").arg("-o").arg(out);
    c
}

/// Compiles `dir` and asserts a clean failure naming `needles`, and that no artifact (not even
/// a partial one) was left behind.
fn compile_fails(dir: &Path, needles: &[&str]) -> String {
    let out = dir.join("o.llmc");
    let err = fails(&mut compile_cmd(dir, &out), needles);
    assert!(!out.exists(), "a failed compile left {}", out.display());
    assert!(!dir.join("o.llmc.partial").exists(), "a failed compile left a partial artifact");
    err
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v = read_json(&p);
    f(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Rewrites model.safetensors keeping the tensors `keep` accepts.
fn filter_tensors(dir: &Path, keep: impl Fn(&str) -> bool) {
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView)> = st.tensors().into_iter().filter(|(n, _)| keep(n)).collect();
    let out = safetensors::serialize(kept, None).unwrap();
    std::fs::write(&p, out).unwrap();
}

/// A safetensors file split into its JSON header and its data section.
struct RawSafetensors {
    header: serde_json::Value,
    data: Vec<u8>,
}

impl RawSafetensors {
    fn read(p: &Path) -> Self {
        let b = std::fs::read(p).unwrap();
        let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        RawSafetensors { header: serde_json::from_slice(&b[8..8 + n]).unwrap(), data: b[8 + n..].to_vec() }
    }

    /// The bytes of a file with this header, written by hand (no validation).
    fn bytes(&self) -> Vec<u8> {
        let h = serde_json::to_vec(&self.header).unwrap();
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(&h);
        b.extend_from_slice(&self.data);
        b
    }

    fn write(&self, p: &Path) {
        std::fs::write(p, self.bytes()).unwrap();
    }

    /// `(start, end)` of `name` within the data section.
    fn offsets(&self, name: &str) -> (usize, usize) {
        let o = &self.header[name]["data_offsets"];
        (o[0].as_u64().unwrap() as usize, o[1].as_u64().unwrap() as usize)
    }

    /// Tensor names in data order.
    fn by_offset(&self) -> Vec<String> {
        let mut v: Vec<(usize, String)> = self
            .header
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "__metadata__")
            .map(|k| (self.offsets(k).0, k.clone()))
            .collect();
        v.sort();
        v.into_iter().map(|(_, k)| k).collect()
    }
}

// ---- checkpoints: the safetensors container ----

#[test]
fn missing_model_path() {
    let d = tmpdir("bad-nopath");
    fails(&mut compile_cmd(&d.join("nope"), &d.join("o.llmc")), &["nope", "not found"]);
}

#[test]
fn empty_safetensors() {
    let d = copy_model("llama_mha", "bad-empty-st");
    std::fs::write(d.join("model.safetensors"), b"").unwrap();
    compile_fails(&d, &["model.safetensors", "invalid safetensors file", "header too small"]);
}

#[test]
fn truncated_safetensors() {
    let d = copy_model("llama_mha", "bad-truncated");
    let p = d.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    compile_fails(&d, &["model.safetensors", "invalid safetensors file", "outside the", "data section"]);
    // Cut inside the header too.
    std::fs::write(&p, &bytes[..100]).unwrap();
    compile_fails(&d, &["model.safetensors", "invalid header length"]);
}

#[test]
fn safetensors_header_not_json() {
    let d = copy_model("llama_mha", "bad-header");
    let p = d.join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[8..40].fill(b'#');
    std::fs::write(&p, &bytes).unwrap();
    compile_fails(&d, &["model.safetensors", "invalid JSON in header"]);
    // Deep nesting is refused by the JSON parser's depth limit, not by a stack overflow.
    let deep = "[".repeat(100_000);
    let mut b = (deep.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(deep.as_bytes());
    std::fs::write(&p, &b).unwrap();
    compile_fails(&d, &["model.safetensors", "invalid JSON in header"]);
}

#[test]
fn header_length_larger_than_file() {
    let d = copy_model("llama_mha", "bad-headerlen");
    let p = d.join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    let len = bytes.len() as u64;
    bytes[..8].copy_from_slice(&len.to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    compile_fails(&d, &["model.safetensors", "invalid header length"]);
    // Larger than any header may be (1 TiB): refused before reading it.
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    compile_fails(&d, &["model.safetensors", "header too large"]);
}

#[test]
fn tensor_offsets_overlapping() {
    let d = copy_model("llama_mha", "bad-overlap");
    let p = d.join("model.safetensors");
    let mut st = RawSafetensors::read(&p);
    let order = st.by_offset();
    let (a, b) = (&order[0], &order[1]);
    let (s0, _) = st.offsets(a);
    let (s1, e1) = st.offsets(b);
    // `b` keeps its length but starts 4 bytes into `a`.
    st.header[b]["data_offsets"] = serde_json::json!([s0 + 4, s0 + 4 + (e1 - s1)]);
    st.write(&p);
    compile_fails(&d, &["model.safetensors", a, b, "overlap"]);
}

#[test]
fn tensor_offsets_outside_the_data() {
    let d = copy_model("llama_mha", "bad-outside");
    let p = d.join("model.safetensors");
    let mut st = RawSafetensors::read(&p);
    let last = st.by_offset().pop().unwrap();
    let (s, e) = st.offsets(&last);
    st.header[&last]["data_offsets"] = serde_json::json!([s + 1024, e + 1024]);
    st.write(&p);
    compile_fails(&d, &["model.safetensors", &last, "outside the"]);
    // Offsets that end before they start.
    let mut st = RawSafetensors::read(&fixture("llama_mha").join("model.safetensors"));
    st.header[&last]["data_offsets"] = serde_json::json!([e, s]);
    st.write(&p);
    compile_fails(&d, &["model.safetensors", &last, "end before they start"]);
    // A size that disagrees with dtype and shape.
    let mut st = RawSafetensors::read(&fixture("llama_mha").join("model.safetensors"));
    st.header[&last]["shape"][0] = serde_json::json!(st.header[&last]["shape"][0].as_u64().unwrap() + 1);
    st.write(&p);
    compile_fails(&d, &["model.safetensors", &last, "needs", "bytes"]);
}

#[test]
fn dtype_llmc_cannot_read_is_named() {
    let d = copy_model("llama_mha", "bad-dtype");
    let p = d.join("model.safetensors");
    let mut st = RawSafetensors::read(&p);
    let name = "model.layers.0.self_attn.k_proj.weight";
    // Same byte size: F32 [64, 64] read as I32 [64, 64].
    st.header[name]["dtype"] = serde_json::json!("I32");
    st.write(&p);
    compile_fails(&d, &[name, "dtype I32", "F32, F16 and BF16"]);
}

// ---- checkpoints: agreement with config.json ----

#[test]
fn missing_config_json() {
    let d = copy_model("llama_mha", "bad-noconfig");
    std::fs::remove_file(d.join("config.json")).unwrap();
    compile_fails(&d, &["no config.json"]);
}

#[test]
fn config_not_json() {
    let d = copy_model("llama_mha", "bad-configjson");
    std::fs::write(d.join("config.json"), "{ not json").unwrap();
    compile_fails(&d, &["config.json", "not valid JSON"]);
    std::fs::write(d.join("config.json"), "[".repeat(100_000)).unwrap();
    compile_fails(&d, &["config.json", "not valid JSON", "recursion limit"]);
    std::fs::write(d.join("config.json"), [0xff, 0xfe, 0x7b]).unwrap();
    compile_fails(&d, &["config.json", "UTF-8"]);
}

#[test]
fn oversized_config_is_refused_before_reading() {
    let d = copy_model("llama_mha", "bad-hugeconfig");
    // A sparse 1 GiB file: costs no disk, and would cost 1 GiB of RAM if it were read.
    std::fs::File::create(d.join("config.json")).unwrap().set_len(1 << 30).unwrap();
    compile_fails(&d, &["config.json", "limit for JSON files"]);
}

#[test]
fn unsupported_architecture_is_named_with_the_supported_list() {
    let d = copy_model("llama_mha", "bad-arch");
    edit_config(&d, |v| v["architectures"] = serde_json::json!(["FancyNetForCausalLM"]));
    compile_fails(&d, &["FancyNetForCausalLM", "LlamaForCausalLM", "GPT2LMHeadModel"]);
}

#[test]
fn missing_tensor_is_named() {
    let d = copy_model("llama_mha", "bad-missing-tensor");
    filter_tensors(&d, |n| n != "model.layers.1.mlp.up_proj.weight");
    compile_fails(&d, &["model.layers.1.mlp.up_proj.weight", "not found"]);
}

#[test]
fn shape_disagreeing_with_config_is_named() {
    let d = copy_model("llama_mha", "bad-shape");
    edit_config(&d, |v| {
        let i = v["intermediate_size"].as_u64().unwrap();
        v["intermediate_size"] = serde_json::json!(i + 8);
    });
    compile_fails(&d, &["model.layers.0.mlp.gate_proj.weight", "[168, 64]", "[160, 64]"]);
}

#[test]
fn nan_weight_is_reported_by_name_and_index() {
    let d = copy_model("llama_mha", "bad-nan");
    let p = d.join("model.safetensors");
    let mut st = RawSafetensors::read(&p);
    let name = "model.layers.1.mlp.down_proj.weight"; // F32 [64, 160]
    let (s, _) = st.offsets(name);
    let at = s + 4 * (160 + 37); // element [1, 37]
    st.data[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    st.write(&p);
    compile_fails(&d, &[name, "[1, 37]", "NaN", "non-finite"]);
}

#[test]
fn infinite_weight_is_reported_by_name_and_index() {
    // In a bf16 checkpoint, so the check sees the converted value.
    let d = copy_model("llama_tied_bf16", "bad-inf");
    let p = d.join("model.safetensors");
    let mut st = RawSafetensors::read(&p);
    let name = "model.norm.weight";
    let (s, _) = st.offsets(name);
    st.data[s + 2 * 5..s + 2 * 6].copy_from_slice(&0xff80u16.to_le_bytes()); // bf16 -inf at [5]
    st.write(&p);
    compile_fails(&d, &[name, "[5]", "-inf"]);
}

#[test]
fn sharded_index_naming_a_missing_file() {
    let d = copy_model("llama_sharded_f16", "bad-shard");
    std::fs::remove_file(d.join("model-00003-of-00004.safetensors")).unwrap();
    compile_fails(&d, &["model.safetensors.index.json", "model-00003-of-00004.safetensors", "does not exist"]);
}

#[test]
fn sharded_index_disagreeing_with_its_shards() {
    let d = copy_model("llama_sharded_f16", "bad-index");
    let p = d.join("model.safetensors.index.json");
    let mut v = read_json(&p);
    v["weight_map"]["lm_head.weight"] = serde_json::json!("model-00001-of-00004.safetensors");
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
    compile_fails(&d, &["model.safetensors.index.json", "lm_head.weight", "does not hold it"]);
    std::fs::write(&p, "{\"weight_map\": ").unwrap();
    compile_fails(&d, &["model.safetensors.index.json", "not valid JSON"]);
}

// ---- absurd configs: refused from the config and the tensor shapes, before any allocation ----

/// Sets `field` to `value` in a copy of llama_mha and asserts the compile fails naming `needles`.
fn absurd(name: &str, field: &str, value: serde_json::Value, needles: &[&str]) {
    let d = copy_model("llama_mha", name);
    edit_config(&d, |v| v[field] = value);
    compile_fails(&d, needles);
}

#[test]
fn negative_and_zero_sizes() {
    absurd("bad-neg-hidden", "hidden_size", serde_json::json!(-64), &["hidden_size", "positive integer", "-64"]);
    absurd("bad-zero-layers", "num_hidden_layers", serde_json::json!(0), &["num_hidden_layers", "must be positive"]);
    absurd("bad-zero-heads", "num_attention_heads", serde_json::json!(0), &["num_attention_heads", "must be positive"]);
    absurd("bad-float-vocab", "vocab_size", serde_json::json!(256.5), &["vocab_size", "positive integer"]);
    absurd("bad-string-inter", "intermediate_size", serde_json::json!("160"), &["intermediate_size", "positive integer"]);
    absurd("bad-neg-eps", "rms_norm_eps", serde_json::json!(-1e-6), &["rms_norm_eps", "negative"]);
}

#[test]
fn heads_not_dividing_hidden() {
    let d = copy_model("llama_mha", "bad-heads");
    edit_config(&d, |v| {
        v.as_object_mut().unwrap().remove("head_dim");
        v["num_attention_heads"] = serde_json::json!(5);
    });
    compile_fails(&d, &["num_attention_heads", "must divide hidden_size"]);
    absurd("bad-kvheads", "num_key_value_heads", serde_json::json!(3), &["num_key_value_heads", "must divide"]);
}

#[test]
fn huge_sizes_fail_fast_against_the_tensor_shapes() {
    // Beyond i32: refused by the config reader.
    absurd("bad-vocab-1e12", "vocab_size", serde_json::json!(1_000_000_000_000u64), &["vocab_size", "larger than the supported maximum"]);
    // Just within it: the tensor shapes disagree, so nothing sized by the vocabulary is built.
    absurd("bad-vocab-2e9", "vocab_size", serde_json::json!(2_000_000_000u64), &["model.embed_tokens.weight", "[2000000000, 64]"]);
    absurd("bad-hidden-1e9", "hidden_size", serde_json::json!(1_000_000_000u64), &["[256, 1000000000]"]);
    // Counts (layers, experts) are bounded outright: per-layer tables are built from them.
    absurd("bad-layers-2e9", "num_hidden_layers", serde_json::json!(2_000_000_000u64), &["num_hidden_layers", "larger than the supported maximum"]);
    // A count within the bound: the first missing layer tensor is named.
    absurd("bad-layers-60000", "num_hidden_layers", serde_json::json!(60_000), &["model.layers.2.", "not found"]);
    // A context far beyond what was trained is capped (by default to 4096), not allocated.
    let d = copy_model("llama_mha", "bad-context-huge");
    edit_config(&d, |v| v["max_position_embeddings"] = serde_json::json!(2_000_000_000u64));
    let out = d.join("o.llmc");
    ok(&mut compile_cmd(&d, &out));
    assert!(out.exists());
}

#[test]
fn unknown_target_is_an_error() {
    let d = tmpdir("bad-target");
    let mut c = llmc();
    c.arg("compile").arg(fixture("llama_mha")).arg("--target").arg("tpu").arg("-o").arg(d.join("o.llmc"));
    fails(&mut c, &["tpu", "cpu"]);
}

// ---- running: inputs and artifacts ----

/// A compiled artifact for the runtime bad-input tests.
fn artifact(name: &str, config: CompileConfig) -> PathBuf {
    let d = tmpdir(name);
    let art = d.join("m.llmc");
    compile_with(&fixture("llama_mha"), &art, config);
    art
}

fn run_cmd(art: &Path, ids: &str, new_tokens: usize) -> Command {
    let mut c = llmc();
    c.arg("run").arg(art).arg("--input-ids").arg(ids).arg("--max-new-tokens").arg(new_tokens.to_string());
    c
}

#[test]
fn token_id_out_of_range() {
    let art = artifact("bad-token", Default::default());
    fails(&mut run_cmd(&art, "1,2,256", 2), &["token id 256", "vocabulary has 256"]);
    fails(&mut run_cmd(&art, "1,-3", 2), &["-3"]);
    fails(&mut run_cmd(&art, "1,99999999999999999999", 2), &["99999999999999999999"]);
    fails(&mut run_cmd(&art, "", 2), &["token"]);
}

#[test]
fn prompt_longer_than_context() {
    let art = artifact("bad-context", CompileConfig { max_context: Some(16), ..Default::default() });
    let ids: Vec<String> = (0..20).map(|i| i.to_string()).collect();
    fails(&mut run_cmd(&art, &ids.join(","), 1), &["context of 16"]);
    // Prompt fits but prompt + generation does not.
    fails(&mut run_cmd(&art, "1,2,3,4,5,6,7,8,9,10", 10), &["context of 16"]);
}

/// The artifact's header JSON and the offset where its code starts (the end of the space
/// reserved for the header).
fn header_of(bytes: &[u8]) -> (serde_json::Value, usize) {
    let n = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    let v: serde_json::Value = serde_json::from_slice(&bytes[32..32 + n]).unwrap();
    let code = v["code_offset"].as_u64().unwrap() as usize;
    (v, code)
}

/// `bytes` with its header replaced by `v`, with a correct header checksum, so only the checks
/// after the checksum can refuse it.
fn with_header(bytes: &[u8], v: &serde_json::Value) -> Vec<u8> {
    let (_, code) = header_of(bytes);
    let json = serde_json::to_vec(v).unwrap();
    assert!(32 + json.len() <= code, "edited header fits the reserved space");
    let mut b = bytes.to_vec();
    b[16..24].copy_from_slice(&(json.len() as u64).to_le_bytes());
    b[24..32].copy_from_slice(&xxhash_rust::xxh3::xxh3_64(&json).to_le_bytes());
    b[32..32 + json.len()].copy_from_slice(&json);
    b[32 + json.len()..code].fill(b' ');
    b
}

#[test]
fn corrupt_artifacts_are_refused_before_running() {
    let art = artifact("bad-artifact", Default::default());
    let bytes = std::fs::read(&art).unwrap();
    let d = art.parent().unwrap();
    let run = |name: &str, b: &[u8], needles: &[&str]| {
        let p = d.join(name);
        std::fs::write(&p, b).unwrap();
        let mut n = vec![name];
        n.extend_from_slice(needles);
        fails(&mut run_cmd(&p, "1,2", 1), &n);
    };
    run("empty.llmc", b"", &["bad magic"]);
    run("not.llmc", b"hello, I am not an artifact", &["bad magic"]);
    run("short.llmc", &bytes[..20], &["shorter than the 32-byte preamble"]);
    run("trunc.llmc", &bytes[..bytes.len() * 2 / 3], &["corrupt artifact", "lies outside the file"]);
    run("trunc-header.llmc", &bytes[..200], &["header length", "exceeds the file"]);
    // A bit flipped in the header, the code and the data.
    let (v, code_off) = header_of(&bytes);
    let data_off = v["data_offset"].as_u64().unwrap() as usize;
    for (what, at) in [("header", 40), ("code", code_off + 5), ("data", data_off + 100)] {
        let mut b = bytes.clone();
        b[at] ^= 0x10;
        run(&format!("flip-{what}.llmc"), &b, &["checksum mismatch", what]);
    }
    // Another format version.
    let mut b = bytes.clone();
    b[8..12].copy_from_slice(&99u32.to_le_bytes());
    run("v99.llmc", &b, &["version 99"]);
    // A header length beyond any real header.
    let mut b = bytes.clone();
    b[16..24].copy_from_slice(&(1u64 << 62).to_le_bytes());
    run("hlen.llmc", &b, &["header length", "limit"]);
}

#[test]
fn hostile_artifact_headers_are_refused_before_allocating() {
    // Headers with valid checksums that claim absurd sizes or out-of-range indices: refused by
    // the consistency checks at load, before a session allocates its arena or KV cache.
    let art = artifact("bad-artifact-header", Default::default());
    let bytes = std::fs::read(&art).unwrap();
    let d = art.parent().unwrap();
    let (v, _) = header_of(&bytes);
    let case = |name: &str, edit: &dyn Fn(&mut serde_json::Value), needles: &[&str]| {
        let mut h = v.clone();
        edit(&mut h);
        let p = d.join(name);
        std::fs::write(&p, with_header(&bytes, &h)).unwrap();
        fails(&mut run_cmd(&p, "1,2", 1), needles);
    };
    case("arena.llmc", &|h| h["arena_bytes"] = serde_json::json!(1u64 << 39), &["arena", "larger than its buffers need"]);
    case("arena-huge.llmc", &|h| h["arena_bytes"] = serde_json::json!(u64::MAX), &["limit"]);
    case("state.llmc", &|h| h["states"][0]["bytes"] = serde_json::json!(1u64 << 50), &["limit"]);
    case("step.llmc", &|h| h["steps"][0]["kernel"] = serde_json::json!(1_000_000), &["step 0"]);
    case("kernel.llmc", &|h| h["kernels"][0]["offset"] = serde_json::json!(u64::MAX), &["outside the code section"]);
    case("code.llmc", &|h| h["code_len"] = serde_json::json!(u64::MAX), &["code section", "outside the file"]);
    case("chunk.llmc", &|h| h["max_chunk"] = serde_json::json!(0), &["max_chunk"]);
    case("entry.llmc", &|h| h["entries"][0]["steps"][0]["end"] = serde_json::json!(1_000_000), &["entry point `forward`", "step range"]);
    case("entry-input.llmc", &|h| h["entries"][0]["input"] = serde_json::json!(1_000_000), &["entry point `forward`", "input buffer"]);
    case("layout.llmc", &|h| h["states"][0]["layout"] = serde_json::json!("paged"), &["unknown KV-cache layout `paged`"]);
    case("notjson.llmc", &|h| *h = serde_json::json!({"target": 7}), &["header:"]);
    case("target.llmc", &|h| h["target"] = serde_json::json!("riscv64-cpu"), &["riscv64-cpu", "cannot run"]);
}

#[test]
fn artifact_requiring_a_missing_cpu_feature_is_refused() {
    // Rewrite the header of a valid artifact to require a feature name no CPU has, with a correct
    // header checksum, so only the feature check can refuse it.
    let art = artifact("bad-feature", Default::default());
    let bytes = std::fs::read(&art).unwrap();
    let (mut v, _) = header_of(&bytes);
    v["cpu_features"].as_array_mut().unwrap().push(serde_json::json!("amx-tile-imaginary"));
    let p = art.parent().unwrap().join("feature.llmc");
    std::fs::write(&p, with_header(&bytes, &v)).unwrap();
    fails(&mut run_cmd(&p, "1", 1), &["amx-tile-imaginary", "this CPU lacks"]);
    // A real feature that this CPU lacks, where there is one (the message must name it too).
    let lacking = ["avx512fp16", "avx512bf16", "avx512vbmi2", "avx512f"]
        .into_iter()
        .find(|f| llmc_runtime::exec::cpu_has(f) == Some(false));
    if let Some(f) = lacking {
        let (mut v, _) = header_of(&bytes);
        v["cpu_features"].as_array_mut().unwrap().push(serde_json::json!(f));
        std::fs::write(&p, with_header(&bytes, &v)).unwrap();
        fails(&mut run_cmd(&p, "1", 1), &[f, "this CPU lacks"]);
    }
}
