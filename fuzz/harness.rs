//! The fuzz harnesses, shared by the `cargo fuzz` targets (fuzz/fuzz_targets/*.rs) and the
//! regression test that replays every committed input in a normal `cargo test`
//! (tests/fuzz_regressions.rs). Each harness takes raw bytes, runs one loader on them and asserts
//! what must hold for any input: an error or a well-formed result, never a panic, and for inputs
//! that load, the invariants the rest of llmc relies on.
#![allow(dead_code)]

use std::path::Path;

/// The names of the harnesses, as fuzz targets and as directories under `fuzz/seeds/` and
/// `fuzz/regressions/`.
pub const TARGETS: &[&str] = &["checkpoint", "ir_text", "artifact"];

/// Runs the harness called `target` on `data`.
pub fn run(target: &str, data: &[u8]) {
    match target {
        "checkpoint" => checkpoint(data),
        "ir_text" => ir_text(data),
        "artifact" => artifact(data),
        other => panic!("unknown fuzz target `{other}`"),
    }
}

/// Splits `config.json bytes, 0x00, safetensors bytes` (no NUL: all of it is the config).
pub fn split_checkpoint_input(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

/// The safetensors + config.json loader: the input is a config and a one-shard safetensors file
/// (see [`split_checkpoint_input`]). Every tensor is read; when the config and tensors agree, the
/// graph is built, must verify, must round-trip through the text form, and every weight it
/// names must load or fail with an error.
pub fn checkpoint(data: &[u8]) {
    use llmc_frontend::{build_graph, Checkpoint, Options};
    use llmc_ir::{Op, WeightSource};

    let (config, tensors) = split_checkpoint_input(data);
    let ckpt = Checkpoint::from_bytes(Path::new("fuzz.safetensors"), tensors.to_vec());
    // The config is parsed as `read_config` does; a config that is not JSON is still fed to the
    // architectures as `null` so their field checks run.
    let config: serde_json::Value = serde_json::from_slice(config).unwrap_or(serde_json::Value::Null);
    let ckpt = match ckpt {
        Ok(c) => c,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    for name in ckpt.tensor_names() {
        let info = ckpt.info(name).expect("a listed tensor has info");
        match ckpt.read_f32(name) {
            Ok(v) => assert_eq!(v.len(), info.shape.iter().product::<usize>(), "`{name}`: element count"),
            Err(e) => assert!(info.dtype.is_none(), "`{name}` ({}) failed to read: {e}", info.stored),
        }
    }
    let Ok(graph) = build_graph(&config, &ckpt, &Options { max_context: Some(64) }) else {
        return;
    };
    if let Err(e) = llmc_ir::verify(&graph) {
        panic!("the frontend built a graph that does not verify: {e}");
    }
    let text = llmc_ir::print(&graph);
    match llmc_ir::parse(&text) {
        Ok(back) => assert_eq!(llmc_ir::print(&back), text, "print(parse(print(g))) != print(g)"),
        Err(e) => panic!("the printed graph does not parse: {e}\n{text}"),
    }
    for n in graph.g.node_indices() {
        if let Op::Weight { name, .. } = graph.op(n) {
            if let Ok(v) = ckpt.load(name, graph.ty(n)) {
                assert!(v.iter().all(|x| x.is_finite()), "`{name}`: load returned non-finite values");
            }
        }
    }
}

/// The IR text parser: any UTF-8 text either fails to parse with an error or parses to a graph
/// that prints without panicking; a graph that also verifies must print to text that parses back
/// to the same graph (compared as printed text, so NaN constants compare equal) and verifies.
pub fn ir_text(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let g = match llmc_ir::parse(text) {
        Ok(g) => g,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let printed = llmc_ir::print(&g);
    if llmc_ir::verify(&g).is_err() {
        return;
    }
    let back = match llmc_ir::parse(&printed) {
        Ok(b) => b,
        Err(e) => panic!("a verified graph printed to text that does not parse: {e}\n{printed}"),
    };
    assert_eq!(llmc_ir::print(&back), printed, "print(parse(print(g))) != print(g)");
    if let Err(e) = llmc_ir::verify(&back) {
        panic!("a verified graph no longer verifies after a text round trip: {e}\n{printed}");
    }
}

/// The artifact loader. The first byte picks a mode: even, the rest is checked as it is (almost
/// everything stops at a checksum); odd, the harness first repairs the rest's checksums (header,
/// and the code and data sections the header claims) so the fuzzer reaches the header's
/// consistency checks. An artifact that verifies must have in-bounds sections and buffers.
pub fn artifact(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode & 1 == 1 { fix_checksums(rest) } else { rest.to_vec() };
    let path = Path::new("fuzz.llmc");
    let h = match llmc_runtime::artifact::verify_bytes(path, &bytes) {
        Ok(h) => h,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let end = |off: u64, len: u64| off.checked_add(len).filter(|&e| e <= bytes.len() as u64);
    assert!(end(h.code_offset, h.code_len).is_some() && end(h.data_offset, h.data_len).is_some());
    for k in &h.kernels {
        assert!(end(k.offset, k.len).is_some_and(|e| e <= h.code_len), "kernel `{}` out of bounds", k.name);
    }
    for b in &h.buffers {
        if let llmc_runtime::BufferDecl::Data { offset, bytes: n, .. } = b {
            assert!(end(*offset, *n).is_some_and(|e| e <= h.data_len), "data buffer out of bounds");
        }
    }
    assert!(h.steps.iter().all(|s| (s.kernel as usize) < h.kernels.len()));
    for e in &h.entries {
        assert!(e.steps.iter().all(|r| r.start <= r.end && r.end as usize <= h.steps.len()), "entry `{}` out of bounds", e.name);
        assert!((e.input as usize) < h.buffers.len() && (e.output as usize) < h.buffers.len(), "entry `{}` buffers", e.name);
    }
}

/// `bytes` with the preamble's header checksum, and the header's code and data checksums,
/// recomputed; unchanged where the header cannot be read or rewritten in place.
pub fn fix_checksums(bytes: &[u8]) -> Vec<u8> {
    use xxhash_rust::xxh3::xxh3_64;
    let mut out = bytes.to_vec();
    let pre = llmc_runtime::artifact::PREAMBLE;
    let Some(hlen) = out.get(16..24).map(|w| u64::from_le_bytes(w.try_into().unwrap_or([0; 8]))) else {
        return out;
    };
    let Some(hend) = usize::try_from(hlen).ok().and_then(|n| n.checked_add(pre)).filter(|&e| e <= out.len()) else {
        return out;
    };
    if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&out[pre..hend]) {
        let sum = |off: &str, len: &str| -> Option<String> {
            let (o, l) = (v.get(off)?.as_u64()? as usize, v.get(len)?.as_u64()? as usize);
            let s = bytes.get(o..o.checked_add(l)?)?;
            Some(llmc_runtime::artifact::checksum_hex(xxh3_64(s)))
        };
        let (code, data) = (sum("code_offset", "code_len"), sum("data_offset", "data_len"));
        // Chunk sums, when the header has them, over the section its fields now name.
        let chunks = v.get("data_chunk_checksums").filter(|c| c.is_array()).and_then(|_| {
            let (o, l) = (v.get("data_offset")?.as_u64()? as usize, v.get("data_len")?.as_u64()? as usize);
            Some(llmc_runtime::artifact::data_chunk_sums(bytes.get(o..o.checked_add(l)?)?))
        });
        if let Some(obj) = v.as_object_mut() {
            if let Some(c) = code {
                obj.insert("code_checksum".into(), c.into());
            }
            if let Some(d) = data {
                obj.insert("data_checksum".into(), d.into());
            }
            if let Some(c) = chunks {
                obj.insert("data_chunk_checksums".into(), c.into());
            }
        }
        if let Ok(json) = serde_json::to_vec(&v) {
            if json.len() <= hend - pre {
                out[pre..pre + json.len()].copy_from_slice(&json);
                out[pre + json.len()..hend].fill(b' ');
            }
        }
    }
    let sum = xxh3_64(&out[pre..hend]);
    out[24..32].copy_from_slice(&sum.to_le_bytes());
    out
}
