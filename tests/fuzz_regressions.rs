//! Replays the fuzz corpus that is committed to the repository through the same harnesses the
//! `cargo fuzz` targets run (fuzz/harness.rs): the seeds (fuzz/seeds/<target>/) and every input
//! that once crashed a target (fuzz/regressions/<target>/). CI runs this, not the fuzzer.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The files directly inside `dir`, sorted; none when it does not exist.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.expect("read_dir entry").path()).filter(|p| p.is_file()).collect(),
        Err(_) => vec![],
    };
    v.sort();
    v
}

/// Runs every input of `target` under `kind` (seeds or regressions); returns how many ran.
/// Every failing input is reported, not just the first.
fn replay(kind: &str, target: &str) -> usize {
    let files = inputs(&repo().join("fuzz").join(kind).join(target));
    let mut failed = Vec::new();
    for f in &files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        if catch_unwind(AssertUnwindSafe(|| harness::run(target, &data))).is_err() {
            failed.push(f.display().to_string());
        }
    }
    assert!(failed.is_empty(), "fuzz inputs that fail the `{target}` harness:\n{}", failed.join("\n"));
    files.len()
}

#[test]
fn every_target_has_seeds() {
    for t in harness::TARGETS {
        assert!(replay("seeds", t) > 0, "fuzz/seeds/{t} holds no seed inputs");
    }
}

#[test]
fn seeds_exercise_the_whole_loader() {
    // The seeds must get past the first checks, or the fuzzer starts from nothing: the
    // checkpoint seeds build a graph, the IR seeds parse, the artifact seeds verify.
    for f in inputs(&repo().join("fuzz/seeds/checkpoint")) {
        let data = std::fs::read(&f).unwrap();
        let (config, tensors) = harness::split_checkpoint_input(&data);
        let ckpt = llmc_frontend::Checkpoint::from_bytes(&f, tensors.to_vec()).unwrap();
        let config: serde_json::Value = serde_json::from_slice(config).unwrap();
        llmc_frontend::build_graph(&config, &ckpt, &llmc_frontend::Options { max_context: Some(64) })
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    }
    for f in inputs(&repo().join("fuzz/seeds/ir_text")) {
        llmc_ir::parse(&std::fs::read_to_string(&f).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    }
    for f in inputs(&repo().join("fuzz/seeds/artifact")) {
        let data = std::fs::read(&f).unwrap();
        let bytes = if data[0] & 1 == 1 { harness::fix_checksums(&data[1..]) } else { data[1..].to_vec() };
        match llmc_runtime::artifact::verify_bytes(&f, &bytes) {
            // The seed was compiled on a machine whose CPU may have features this one lacks; the
            // feature check is the last one, so everything else was verified.
            Ok(_) | Err(llmc_runtime::RuntimeError::CpuFeature { .. }) => {}
            Err(e) => panic!("{}: {e}", f.display()),
        }
    }
}

#[test]
fn crash_regressions() {
    for t in harness::TARGETS {
        replay("regressions", t);
    }
}

#[test]
fn harnesses_catch_what_they_claim() {
    // The artifact harness's checksum repair turns a header edit into one only the header checks
    // can refuse (so the fuzzer reaches them): an arena far larger than its buffers is refused.
    let seed = std::fs::read(repo().join("fuzz/seeds/artifact/llama-tiny-raw")).unwrap();
    let a = &seed[1..];
    let hlen = u64::from_le_bytes(a[16..24].try_into().unwrap()) as usize;
    let text = std::str::from_utf8(&a[32..32 + hlen]).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(text).unwrap();
    v["arena_bytes"] = serde_json::json!(1u64 << 39);
    let json = serde_json::to_vec(&v).unwrap();
    let code_offset = v["code_offset"].as_u64().unwrap() as usize;
    assert!(32 + json.len() <= code_offset, "the edited header fits the space reserved for it");
    let mut b = a.to_vec();
    b[16..24].copy_from_slice(&(json.len() as u64).to_le_bytes());
    b[32..32 + json.len()].copy_from_slice(&json);
    b[32 + json.len()..code_offset].fill(b' ');
    let p = Path::new("edited.llmc");
    let e = llmc_runtime::artifact::verify_bytes(p, &b).unwrap_err().to_string();
    assert!(e.contains("checksum mismatch in the header"), "{e}");
    let e = llmc_runtime::artifact::verify_bytes(p, &harness::fix_checksums(&b)).unwrap_err().to_string();
    assert!(e.contains("arena") && e.contains("larger than its buffers need"), "{e}");
}
