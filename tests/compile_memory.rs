//! Compiling streams the checkpoint: resident memory must not grow with the model's size. Two
//! generated Llama checkpoints of the same width, 1 and 40 layers (~8 MB and ~340 MB of f16),
//! are compiled and the compiler's peak RSS is read from `wait4`. The difference must be a small
//! fraction of the difference in checkpoint size. Holding the checkpoint resident once (mapped
//! pages kept) or converting it all to f32 before writing would make the difference at least the
//! size difference. The artifact keeps the products' weights in f16, as the checkpoint has them. The full-size figure (a 1.1 B-parameter checkpoint) comes from
//! scripts/measure_compile_rss.sh and is reported in docs/reliability.md.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use common::*;

const HIDDEN: usize = 512;
const INTER: usize = 2048;
const VOCAB: usize = 4096;

/// Writes a Llama checkpoint with `layers` layers, f16 weights of small finite values.
fn write_model(dir: &Path, layers: usize) -> u64 {
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": 8,
        "num_key_value_heads": 8, "vocab_size": VOCAB, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": false,
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
    let mut tensors: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN]), ("model.norm.weight".into(), vec![HIDDEN]), ("lm_head.weight".into(), vec![VOCAB, HIDDEN])];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for (n, s) in [
            ("input_layernorm", vec![HIDDEN]),
            ("post_attention_layernorm", vec![HIDDEN]),
            ("self_attn.q_proj", vec![HIDDEN, HIDDEN]),
            ("self_attn.k_proj", vec![HIDDEN, HIDDEN]),
            ("self_attn.v_proj", vec![HIDDEN, HIDDEN]),
            ("self_attn.o_proj", vec![HIDDEN, HIDDEN]),
            ("mlp.gate_proj", vec![INTER, HIDDEN]),
            ("mlp.up_proj", vec![INTER, HIDDEN]),
            ("mlp.down_proj", vec![HIDDEN, INTER]),
        ] {
            tensors.push((format!("{p}.{n}.weight"), s));
        }
    }
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (name, shape) in &tensors {
        let bytes = 2 * shape.iter().product::<usize>();
        header.insert(name.clone(), serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [off, off + bytes]}));
        off += bytes;
    }
    let h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("model.safetensors")).unwrap());
    f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&h).unwrap();
    // f16 bit patterns 0x2000..0x23ff: finite values around 0.008.
    let chunk: Vec<u8> = (0..1 << 20).flat_map(|i: u32| (0x2000u16 + (i % 1024) as u16).to_le_bytes()).collect();
    let mut left = off;
    while left > 0 {
        let n = left.min(chunk.len());
        f.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    f.flush().unwrap();
    (8 + h.len() + off) as u64
}

/// Compiles `model` to `out` and returns the compiler's peak RSS in bytes.
fn compile_peak_rss(model: &Path, out: &Path) -> u64 {
    let child = llmc().arg("compile").arg(model).arg("-o").arg(out).stdout(std::process::Stdio::null()).spawn().unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 fills it for this child only.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child by pid (std's Child is not waited on afterwards).
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut ru) };
    assert_eq!(pid, child.id() as libc::pid_t, "wait4 failed");
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "llmc compile {} failed: status {status}", model.display());
    ru.ru_maxrss as u64 * 1024
}

#[test]
fn compile_memory_does_not_grow_with_the_checkpoint() {
    let root = tmpdir("compile-memory");
    let run = |layers: usize| -> (u64, u64) {
        let d: PathBuf = root.join(format!("l{layers}"));
        std::fs::create_dir_all(&d).unwrap();
        let size = write_model(&d, layers);
        let out = d.join("m.llmc");
        let rss = compile_peak_rss(&d, &out);
        let art = std::fs::metadata(&out).unwrap().len();
        // The products' weights stay f16 (`--weights-dtype keep`, the CPU default); the gathered
        // embedding and the norms are f32: the artifact is the checkpoint plus the embedding's
        // second half, and the rope table.
        let f32_extra = (VOCAB * HIDDEN * 2 + (2 * layers + 1) * HIDDEN * 2) as u64;
        assert!(
            art >= size + f32_extra && art < size + f32_extra + (1 << 20),
            "the artifact holds the products' weights as f16 and the rest as f32: {art} bytes for a {size}-byte checkpoint"
        );
        std::fs::remove_dir_all(&d).unwrap();
        (size, rss)
    };
    let (small, rss_small) = run(1);
    let (large, rss_large) = run(40);
    let grew = rss_large.saturating_sub(rss_small);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "checkpoint {:.0} MiB -> peak RSS {:.0} MiB; checkpoint {:.0} MiB -> peak RSS {:.0} MiB",
        mib(small), mib(rss_small), mib(large), mib(rss_large)
    );
    assert!(
        grew < (large - small) / 4,
        "peak RSS grew by {:.0} MiB for {:.0} MiB more checkpoint: the compiler holds the model in memory",
        mib(grew),
        mib(large - small)
    );
}
