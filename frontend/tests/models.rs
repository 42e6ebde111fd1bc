//! End-to-end frontend tests: tiny Llama and GPT-2 checkpoints written here are loaded, verified,
//! printed and parsed back, run in the reference interpreter, and compared against straightforward
//! f64 Rust implementations of the two forward passes. Also: stored-dtype conversion, sharded
//! checkpoints, RoPE config spellings and Llama 3 frequencies.

mod common;

use std::collections::BTreeMap;

use common::*;
use llmc_frontend::llama::{rope_inv_freq, LlamaConfig, RopeScaling};
use llmc_frontend::{load, Checkpoint, Model, Options};
use llmc_ir::{DType, Dim, Interpreter, Op, TensorType, WeightSource};
use safetensors::Dtype;
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// Reference implementations (f64, one token at a time, no graph).

fn w64(t: &Tensors, name: &str) -> Vec<f64> {
    t.get(name).unwrap_or_else(|| panic!("reference needs {name}")).1.iter().map(|&x| x as f64).collect()
}

/// `W x + b` for `W [out, in]`.
fn linear(w: &[f64], b: Option<&[f64]>, x: &[f64]) -> Vec<f64> {
    let n = x.len();
    let out = w.len() / n;
    (0..out)
        .map(|o| (0..n).map(|i| w[o * n + i] * x[i]).sum::<f64>() + b.map_or(0.0, |b| b[o]))
        .collect()
}

/// `x W + b` for a Conv1D `W [in, out]`.
fn conv1d(w: &[f64], b: &[f64], x: &[f64]) -> Vec<f64> {
    let n = x.len();
    let out = w.len() / n;
    (0..out).map(|o| (0..n).map(|i| x[i] * w[i * out + o]).sum::<f64>() + b[o]).collect()
}

fn rms(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, w)| v * r * w).collect()
}

fn layer_norm(x: &[f64], w: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
    let n = x.len() as f64;
    let mu = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / n;
    x.iter().enumerate().map(|(i, v)| (v - mu) / (var + eps).sqrt() * w[i] + b[i]).collect()
}

/// Rotates each `hd`-wide head of `x` (half-rotation form) for position `pos`.
fn rope(x: &mut [f64], hd: usize, pos: usize, inv_freq: &[f64]) {
    let half = hd / 2;
    for head in x.chunks_mut(hd) {
        for i in 0..half {
            let th = pos as f64 * inv_freq[i];
            let (a, b) = (head[i], head[i + half]);
            head[i] = a * th.cos() - b * th.sin();
            head[i + half] = b * th.cos() + a * th.sin();
        }
    }
}

/// Causal multi-head attention with grouped KV heads: `q[s]` is `nh*hd`, `k[t]`, `v[t]` are `nkv*hd`.
fn attend(q: &[Vec<f64>], k: &[Vec<f64>], v: &[Vec<f64>], nh: usize, nkv: usize, hd: usize, scale: f64) -> Vec<Vec<f64>> {
    let g = nh / nkv;
    q.iter()
        .enumerate()
        .map(|(s, qs)| {
            let mut o = vec![0.0; nh * hd];
            for h in 0..nh {
                let kvh = h / g;
                let qh = &qs[h * hd..(h + 1) * hd];
                let scores: Vec<f64> = (0..=s)
                    .map(|t| qh.iter().zip(&k[t][kvh * hd..(kvh + 1) * hd]).map(|(a, b)| a * b).sum::<f64>() * scale)
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for t in 0..=s {
                    for d in 0..hd {
                        o[h * hd + d] += e[t] / z * v[t][kvh * hd + d];
                    }
                }
            }
            o
        })
        .collect()
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}

fn llama_reference(spec: &LlamaSpec, t: &Tensors, ids: &[usize], inv_freq: &[f64]) -> Vec<Vec<f64>> {
    let (hd, nh, nkv) = (spec.hd(), spec.heads, spec.kv_heads);
    let h = spec.hidden;
    let embed = w64(t, "model.embed_tokens.weight");
    let mut xs: Vec<Vec<f64>> = ids.iter().map(|&i| embed[i * h..(i + 1) * h].to_vec()).collect();
    let bias = |on: bool, n: String| if on { Some(w64(t, &n)) } else { None };
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}");
        let wn = w64(t, &format!("{p}.input_layernorm.weight"));
        let hn: Vec<Vec<f64>> = xs.iter().map(|x| rms(x, &wn, spec.eps)).collect();
        let proj = |n: &str, x: &[f64], on: bool| {
            linear(&w64(t, &format!("{p}.{n}.weight")), bias(on, format!("{p}.{n}.bias")).as_deref(), x)
        };
        let mut q: Vec<Vec<f64>> = hn.iter().map(|x| proj("self_attn.q_proj", x, spec.attn_bias)).collect();
        let mut k: Vec<Vec<f64>> = hn.iter().map(|x| proj("self_attn.k_proj", x, spec.attn_bias)).collect();
        let v: Vec<Vec<f64>> = hn.iter().map(|x| proj("self_attn.v_proj", x, spec.attn_bias)).collect();
        for s in 0..ids.len() {
            rope(&mut q[s], hd, s, inv_freq);
            rope(&mut k[s], hd, s, inv_freq);
        }
        let o = attend(&q, &k, &v, nh, nkv, hd, 1.0 / (hd as f64).sqrt());
        for (x, o) in xs.iter_mut().zip(&o) {
            let a = proj("self_attn.o_proj", o, spec.attn_bias);
            x.iter_mut().zip(&a).for_each(|(x, a)| *x += a);
        }
        let wn = w64(t, &format!("{p}.post_attention_layernorm.weight"));
        for x in xs.iter_mut() {
            let hn = rms(x, &wn, spec.eps);
            let gate = proj("mlp.gate_proj", &hn, spec.mlp_bias);
            let up = proj("mlp.up_proj", &hn, spec.mlp_bias);
            let m: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| silu(*g) * u).collect();
            let d = proj("mlp.down_proj", &m, spec.mlp_bias);
            x.iter_mut().zip(&d).for_each(|(x, d)| *x += d);
        }
    }
    let wn = w64(t, "model.norm.weight");
    let head = if spec.tie { embed.clone() } else { w64(t, "lm_head.weight") };
    xs.iter().map(|x| linear(&head, None, &rms(x, &wn, spec.eps))).collect()
}

fn gpt2_reference(spec: &Gpt2Spec, t: &Tensors, ids: &[usize]) -> Vec<Vec<f64>> {
    let (h, nh) = (spec.n_embd, spec.n_head);
    let hd = h / nh;
    let p0 = spec.prefix();
    let wte = w64(t, &format!("{p0}wte.weight"));
    let wpe = w64(t, &format!("{p0}wpe.weight"));
    let mut xs: Vec<Vec<f64>> =
        ids.iter().enumerate().map(|(s, &i)| (0..h).map(|j| wte[i * h + j] + wpe[s * h + j]).collect()).collect();
    for l in 0..spec.n_layer {
        let p = format!("{p0}h.{l}");
        let w = |n: &str| w64(t, &format!("{p}.{n}"));
        let (mut q, mut k, mut v) = (vec![], vec![], vec![]);
        for x in &xs {
            let hn = layer_norm(x, &w("ln_1.weight"), &w("ln_1.bias"), 1e-5);
            let qkv = conv1d(&w("attn.c_attn.weight"), &w("attn.c_attn.bias"), &hn);
            q.push(qkv[..h].to_vec());
            k.push(qkv[h..2 * h].to_vec());
            v.push(qkv[2 * h..].to_vec());
        }
        let o = attend(&q, &k, &v, nh, nh, hd, 1.0 / (hd as f64).sqrt());
        for (x, o) in xs.iter_mut().zip(&o) {
            let a = conv1d(&w("attn.c_proj.weight"), &w("attn.c_proj.bias"), o);
            x.iter_mut().zip(&a).for_each(|(x, a)| *x += a);
            let hn = layer_norm(x, &w("ln_2.weight"), &w("ln_2.bias"), 1e-5);
            let m: Vec<f64> = conv1d(&w("mlp.c_fc.weight"), &w("mlp.c_fc.bias"), &hn).into_iter().map(gelu_tanh).collect();
            let m = conv1d(&w("mlp.c_proj.weight"), &w("mlp.c_proj.bias"), &m);
            x.iter_mut().zip(&m).for_each(|(x, m)| *x += m);
        }
    }
    let (wf, bf) = (w64(t, &format!("{p0}ln_f.weight")), w64(t, &format!("{p0}ln_f.bias")));
    xs.iter().map(|x| linear(&wte, None, &layer_norm(x, &wf, &bf, 1e-5))).collect()
}

/// `1 / theta^(2i/d)` in f64.
fn default_inv_freq(theta: f64, d: usize) -> Vec<f64> {
    (0..d / 2).map(|i| 1.0 / theta.powf(2.0 * i as f64 / d as f64)).collect()
}

// ---------------------------------------------------------------------------------------------
// Helpers.

/// Runs `ids` in one step and returns the logits rows.
fn run(m: &Model, ids: &[i32]) -> Vec<Vec<f32>> {
    let mut it = Interpreter::new(&m.checkpoint);
    rows(m, &it.run(&m.graph, ids).expect("interpreter runs"))
}

fn rows(m: &Model, out: &[llmc_ir::Tensor]) -> Vec<Vec<f32>> {
    assert_eq!(out.len(), 1);
    let v: usize = m.graph.meta["vocab_size"].parse().unwrap();
    assert_eq!(out[0].shape[1], v);
    out[0].data.chunks(v).map(|r| r.to_vec()).collect()
}

fn assert_close(got: &[Vec<f32>], want: &[Vec<f64>], tol: f64) {
    assert_eq!(got.len(), want.len(), "row count");
    for (s, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len());
        for (j, (a, b)) in g.iter().zip(w).enumerate() {
            assert!((*a as f64 - b).abs() <= tol, "logit [{s},{j}]: got {a}, want {b}");
        }
    }
}

/// verify, print/parse round trip, finite logits of shape [S, vocab].
fn check_graph(m: &Model, ids: &[i32]) -> Vec<Vec<f32>> {
    llmc_ir::verify(&m.graph).expect("graph verifies");
    let text = llmc_ir::print(&m.graph);
    let back = llmc_ir::parse(&text).expect("printed graph parses");
    assert!(back == m.graph, "parse(print(g)) != g:\n{text}");
    let mut it = Interpreter::new(&m.checkpoint);
    let out = it.run(&m.graph, ids).expect("interpreter runs");
    let v: usize = m.graph.meta["vocab_size"].parse().unwrap();
    assert_eq!(out[0].shape, vec![ids.len(), v]);
    assert!(out[0].data.iter().all(|x| x.is_finite()));
    rows(m, &out)
}

/// [a,b,c] in one step vs [a,b] then [c]: the last rows agree.
fn check_kv_cache(m: &Model, ids: &[i32]) {
    let full = run(m, ids);
    let mut it = Interpreter::new(&m.checkpoint);
    let n = ids.len();
    rows(m, &it.run(&m.graph, &ids[..n - 1]).unwrap());
    let last = rows(m, &it.run(&m.graph, &ids[n - 1..]).unwrap());
    assert_eq!(it.past(), n);
    for (a, b) in full[n - 1].iter().zip(&last[0]) {
        assert!((a - b).abs() <= 1e-4, "one step {a} vs cached {b}");
    }
    // Token by token as well.
    let mut it = Interpreter::new(&m.checkpoint);
    let mut last = vec![];
    for &id in ids {
        last = rows(m, &it.run(&m.graph, &[id]).unwrap());
    }
    for (a, b) in full[n - 1].iter().zip(&last[0]) {
        assert!((a - b).abs() <= 1e-4, "one step {a} vs token-by-token {b}");
    }
}

fn count_ops(m: &Model, f: impl Fn(&Op) -> bool) -> usize {
    m.graph.g.node_indices().filter(|&n| f(m.graph.op(n))).count()
}

// ---------------------------------------------------------------------------------------------
// Llama.

#[test]
fn tiny_llama_verifies_round_trips_and_runs() {
    let dir = TempDir::new();
    let spec = LlamaSpec::default();
    write_model(dir.path(), &spec.config(), &spec.tensors(1), Dtype::F32);
    let m = load(dir.path(), &Options::default()).unwrap();
    check_graph(&m, &[1, 5, 3, 9]);
    check_kv_cache(&m, &[1, 5, 3]);

    let g = &m.graph;
    assert_eq!(g.name, "llama");
    assert_eq!(g.meta["architecture"], "LlamaForCausalLM");
    assert_eq!(g.meta["vocab_size"], "11");
    assert_eq!(g.meta["max_context"], "64");
    assert_eq!(g.meta["hidden_size"], "16");
    assert_eq!(g.meta["num_layers"], "2");
    assert_eq!(g.meta["bos_token_id"], "1");
    assert_eq!(g.meta["eos_token_id"], "2");
    let names: Vec<&str> = g.states.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["cache.0.k", "cache.0.v", "cache.1.k", "cache.1.v"]);
    for s in &g.states {
        assert_eq!(s.ty, TensorType::f32(vec![Dim::N(64), Dim::N(2), Dim::N(4)]));
    }
    assert_eq!(g.ty(g.outputs[0]), &TensorType::f32(vec![Dim::S, Dim::N(11)]));
    assert_eq!(m.dir, dir.path());
    // Every weight node is created once; one RoPE table; 2 ropes per layer.
    let n_tensors = spec.tensors(1).len();
    assert_eq!(count_ops(&m, |o| matches!(o, Op::Weight { .. })), n_tensors);
    assert_eq!(count_ops(&m, |o| matches!(o, Op::Rope { rotary_dim: 4 })), 4);
    assert_eq!(count_ops(&m, |o| matches!(o, Op::Const { values } if values.len() == 2)), 1);
}

#[test]
fn llama_matches_a_direct_implementation() {
    // hidden 8, explicit head_dim 4 with 6 query heads (q width 24 != hidden), 2 KV heads
    // (group 3, so a group/KV-head mix-up changes the numbers), all biases, untied head.
    let spec = LlamaSpec {
        hidden: 8,
        layers: 1,
        heads: 6,
        kv_heads: 2,
        head_dim: Some(4),
        inter: 12,
        vocab: 10,
        attn_bias: true,
        mlp_bias: true,
        ..LlamaSpec::default()
    };
    let dir = TempDir::new();
    let t = spec.tensors(7);
    write_model(dir.path(), &spec.config(), &t, Dtype::F32);
    let m = load(dir.path(), &Options::default()).unwrap();
    let ids = [3usize, 0, 7, 7, 2, 9];
    let got = check_graph(&m, &ids.map(|i| i as i32));
    let want = llama_reference(&spec, &t, &ids, &default_inv_freq(10000.0, 4));
    assert_close(&got, &want, 1e-4);
    // Sanity: the reference is sensitive to what it checks (a wrong RoPE would be caught).
    let off = llama_reference(&spec, &t, &ids, &default_inv_freq(500.0, 4));
    assert!(want.iter().flatten().zip(off.iter().flatten()).any(|(a, b)| (a - b).abs() > 1e-3));
}

#[test]
fn tied_llama_with_linear_rope_matches_reference_incrementally() {
    let spec = LlamaSpec { hidden: 8, layers: 2, heads: 2, kv_heads: 1, inter: 16, vocab: 9, tie: true, ..LlamaSpec::default() };
    let mut cfg = spec.config();
    cfg["rope_scaling"] = json!({"type": "linear", "factor": 2.0});
    let dir = TempDir::new();
    let t = spec.tensors(11);
    write_model(dir.path(), &cfg, &t, Dtype::F32);
    let m = load(dir.path(), &Options::default()).unwrap();
    // One weight node for the embedding, used by both the gather and the head matmul.
    let embeds: Vec<_> = m
        .graph
        .g
        .node_indices()
        .filter(|&n| matches!(m.graph.op(n), Op::Weight { name, .. } if name == "model.embed_tokens.weight"))
        .collect();
    assert_eq!(embeds.len(), 1);
    let users: Vec<&Op> = m.graph.users(embeds[0]).into_iter().map(|u| m.graph.op(u)).collect();
    assert!(users.iter().any(|o| matches!(o, Op::Gather)) && users.iter().any(|o| matches!(o, Op::Matmul { transpose_b: true })));
    assert_eq!(count_ops(&m, |o| matches!(o, Op::Weight { name, .. } if name == "lm_head.weight")), 0);

    let ids = [4usize, 1, 8, 0, 3];
    let inv: Vec<f64> = default_inv_freq(10000.0, 4).into_iter().map(|f| f / 2.0).collect();
    let want = llama_reference(&spec, &t, &ids, &inv);
    check_graph(&m, &ids.map(|i| i as i32));
    // Step by step through the KV cache: each step's row equals the reference row.
    let mut it = Interpreter::new(&m.checkpoint);
    for (s, &id) in ids.iter().enumerate() {
        let r = rows(&m, &it.run(&m.graph, &[id as i32]).unwrap());
        assert_close(&r, &want[s..s + 1], 1e-4);
    }
}

#[test]
fn max_context_option_caps_the_cache() {
    let dir = TempDir::new();
    let spec = LlamaSpec { max_pos: 100_000, ..LlamaSpec::default() };
    write_model(dir.path(), &spec.config(), &spec.tensors(2), Dtype::F32);
    let m = load(dir.path(), &Options::default()).unwrap();
    assert_eq!(m.graph.meta["max_context"], "4096");
    let m = load(dir.path(), &Options { max_context: Some(8) }).unwrap();
    assert_eq!(m.graph.meta["max_context"], "8");
    assert_eq!(m.graph.states[0].ty.shape[0], Dim::N(8));
    // Running past the context is the interpreter's error, not a panic.
    let mut it = Interpreter::new(&m.checkpoint);
    assert!(it.run(&m.graph, &[1; 9]).is_err());
}

#[test]
fn eos_lists_are_stored_comma_separated() {
    let dir = TempDir::new();
    let spec = LlamaSpec::default();
    let mut cfg = spec.config();
    cfg["eos_token_id"] = json!([2, 7]);
    cfg["model_type"] = json!("llama 3/x");
    write_model(dir.path(), &cfg, &spec.tensors(2), Dtype::F32);
    let m = load(dir.path(), &Options::default()).unwrap();
    assert_eq!(m.graph.meta["eos_token_id"], "2,7");
    assert_eq!(m.graph.name, "llama_3_x");
    llmc_ir::verify(&m.graph).unwrap();
}

// ---------------------------------------------------------------------------------------------
// GPT-2.

#[test]
fn tiny_gpt2_verifies_round_trips_runs_and_matches_reference() {
    for prefixed in [true, false] {
        let spec = Gpt2Spec { prefixed, ..Gpt2Spec::default() };
        let dir = TempDir::new();
        let t = spec.tensors(3);
        write_model(dir.path(), &spec.config(), &t, Dtype::F32);
        let m = load(dir.path(), &Options::default()).unwrap();
        let ids = [5usize, 12, 0, 5, 8];
        let got = check_graph(&m, &ids.map(|i| i as i32));
        assert_close(&got, &gpt2_reference(&spec, &t, &ids), 1e-4);
        check_kv_cache(&m, &[5, 12, 0]);
        let g = &m.graph;
        assert_eq!(g.name, "gpt2");
        assert_eq!(g.meta["architecture"], "GPT2LMHeadModel");
        assert_eq!(g.meta["max_context"], "16");
        assert_eq!(g.meta["hidden_size"], "8");
        assert_eq!(g.meta["num_layers"], "2");
        assert_eq!(g.states.len(), 4);
        assert_eq!(g.states[0].ty, TensorType::f32(vec![Dim::N(16), Dim::N(2), Dim::N(4)]));
        assert_eq!(count_ops(&m, |o| matches!(o, Op::Rope { .. })), 0);
        assert_eq!(count_ops(&m, |o| matches!(o, Op::Slice { axis: 1, .. })), 6);
        // The `attn.bias` mask buffers are not weights of the graph.
        assert_eq!(count_ops(&m, |o| matches!(o, Op::Weight { name, .. } if name.ends_with(".attn.bias"))), 0);
    }
}

#[test]
fn gpt2_activation_and_scaling_options() {
    let spec = Gpt2Spec::default();
    let dir = TempDir::new();
    let mut cfg = spec.config();
    cfg["activation_function"] = json!("gelu");
    cfg["scale_attn_weights"] = json!(false);
    write_model(dir.path(), &cfg, &spec.tensors(4), Dtype::F32);
    let m = load(dir.path(), &Options::default()).unwrap();
    llmc_ir::verify(&m.graph).unwrap();
    assert_eq!(count_ops(&m, |o| matches!(o, Op::Unary(llmc_ir::UnaryOp::Gelu))), 2);
    assert_eq!(count_ops(&m, |o| matches!(o, Op::Unary(llmc_ir::UnaryOp::GeluTanh))), 0);
    // No scale constant: the only scalar consts are the LayerNorm epsilon.
    assert_eq!(count_ops(&m, |o| matches!(o, Op::Const { values } if values.len() == 1)), 1);
}

// ---------------------------------------------------------------------------------------------
// Stored dtypes.

#[test]
fn bf16_and_f16_convert_exactly() {
    let dir = TempDir::new();
    let p = dir.path().join("raw.safetensors");
    // Bit patterns with known values, independent of the `half` crate.
    let bf: Vec<u8> = [0x3F80u16, 0xC000, 0x3EAB, 0x0001, 0x7F80].iter().flat_map(|b| b.to_le_bytes()).collect();
    let hf: Vec<u8> = [0x3C00u16, 0xC000, 0x3555, 0x0001, 0x7BFF].iter().flat_map(|b| b.to_le_bytes()).collect();
    let f: Vec<u8> = [1.5f32, -0.25].iter().flat_map(|v| v.to_le_bytes()).collect();
    write_raw(
        &p,
        &[
            ("bf".into(), Dtype::BF16, vec![5], bf),
            ("hf".into(), Dtype::F16, vec![5], hf),
            ("f".into(), Dtype::F32, vec![1, 2], f),
        ],
    );
    write_config(dir.path(), &json!({}));
    let (ck, cfg_path) = Checkpoint::open(&p).unwrap();
    assert_eq!(cfg_path, dir.path().join("config.json"));
    assert_eq!(ck.tensor_names(), ["bf", "f", "hf"]);
    assert_eq!(
        ck.read_f32("bf").unwrap(),
        [1.0, -2.0, f32::from_bits(0x3EAB_0000), f32::from_bits(0x0001_0000), f32::INFINITY]
    );
    assert_eq!(ck.read_f32("hf").unwrap(), [1.0, -2.0, 0.333_251_95, 2f32.powi(-24), 65504.0]);
    assert_eq!(ck.read_f32("f").unwrap(), [1.5, -0.25]);
    let info = ck.info("bf").unwrap();
    assert_eq!((info.dtype, info.stored.as_str(), info.shape), (Some(DType::BF16), "BF16", vec![5]));
    assert_eq!(ck.info("hf").unwrap().dtype, Some(DType::F16));
    assert!(ck.info("nope").is_none());
    // Through the WeightSource interface: element count checked against the type.
    let ty = TensorType::f32(vec![Dim::N(2)]);
    assert_eq!(ck.load("f", &ty).unwrap(), [1.5, -0.25]);
    assert!(ck.load("f", &TensorType::f32(vec![Dim::N(3)])).is_err());
    assert!(ck.load("missing", &ty).is_err());
}

#[test]
fn half_precision_checkpoints_load_and_match_reference() {
    for dtype in [Dtype::BF16, Dtype::F16] {
        let spec = LlamaSpec { hidden: 8, layers: 1, heads: 2, kv_heads: 2, inter: 8, vocab: 7, ..LlamaSpec::default() };
        let dir = TempDir::new();
        let t = spec.tensors(5);
        write_model(dir.path(), &spec.config(), &t, dtype);
        let m = load(dir.path(), &Options::default()).unwrap();
        let want_stored = if dtype == Dtype::BF16 { DType::BF16 } else { DType::F16 };
        assert!(count_ops(&m, |o| matches!(o, Op::Weight { stored, .. } if *stored == want_stored)) > 0);
        assert!(llmc_ir::print(&m.graph).contains(&format!("stored = {want_stored}")));
        let ids = [1usize, 6, 2];
        let got = check_graph(&m, &ids.map(|i| i as i32));
        assert_close(&got, &llama_reference(&spec, &rounded(&t, dtype), &ids, &default_inv_freq(10000.0, 4)), 1e-4);
    }
}

// ---------------------------------------------------------------------------------------------
// Sharded checkpoints.

#[test]
fn sharded_index_loads_like_a_single_file() {
    let spec = LlamaSpec::default();
    let t = spec.tensors(9);
    let single = TempDir::new();
    write_model(single.path(), &spec.config(), &t, Dtype::F32);
    let sharded = TempDir::new();
    write_config(sharded.path(), &spec.config());
    let (mut a, mut b) = (Tensors::new(), Tensors::new());
    let mut weight_map = BTreeMap::new();
    for (i, (n, v)) in t.iter().enumerate() {
        let shard = if i % 2 == 0 { "model-00001-of-00002.safetensors" } else { "model-00002-of-00002.safetensors" };
        weight_map.insert(n.clone(), shard);
        if i % 2 == 0 { &mut a } else { &mut b }.insert(n.clone(), v.clone());
    }
    write_tensors(&sharded.path().join("model-00001-of-00002.safetensors"), &a, Dtype::F32);
    write_tensors(&sharded.path().join("model-00002-of-00002.safetensors"), &b, Dtype::BF16);
    let index = sharded.path().join("model.safetensors.index.json");
    std::fs::write(&index, json!({"metadata": {"total_size": 0}, "weight_map": weight_map}).to_string()).unwrap();

    let ms = load(single.path(), &Options::default()).unwrap();
    for path in [sharded.path().to_path_buf(), index.clone()] {
        let m = load(&path, &Options::default()).unwrap();
        assert_eq!(m.checkpoint.tensor_names().len(), t.len());
        let name_b = b.keys().next().unwrap();
        assert!(m.checkpoint.shard_path(name_b).unwrap().ends_with("model-00002-of-00002.safetensors"));
        assert_eq!(m.checkpoint.info(name_b).unwrap().dtype, Some(DType::BF16));
        let ids = [2, 4, 6];
        let (x, y) = (check_graph(&m, &ids), run(&ms, &ids));
        // The BF16 shard rounds its weights, so agreement is approximate but close.
        let diff = x.iter().flatten().zip(y.iter().flatten()).map(|(p, q)| (p - q).abs()).fold(0.0, f32::max);
        assert!(diff < 0.2, "sharded vs single differ by {diff}");
        let (name_a, (_, va)) = a.iter().next().unwrap();
        assert_eq!(&m.checkpoint.read_f32(name_a).unwrap(), va);
    }
    // A single .safetensors path works as well.
    let m = load(&single.path().join("model.safetensors"), &Options::default()).unwrap();
    assert_eq!(m.graph, ms.graph);
}

// ---------------------------------------------------------------------------------------------
// RoPE configuration.

fn llama3_params() -> serde_json::Value {
    json!({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
}

#[test]
fn rope_spellings_parse_alike() {
    let spec = LlamaSpec { hidden: 64, heads: 4, ..LlamaSpec::default() };
    // transformers 4: rope_theta + rope_scaling{rope_type}
    let mut v4 = spec.config();
    v4["rope_theta"] = json!(500000.0);
    v4["rope_scaling"] = llama3_params();
    v4["rope_scaling"]["rope_type"] = json!("llama3");
    // transformers 5: rope_parameters holding theta and the scaling
    let mut v5 = spec.config();
    v5.as_object_mut().unwrap().remove("rope_theta");
    v5.as_object_mut().unwrap().remove("rope_scaling");
    v5["rope_parameters"] = llama3_params();
    v5["rope_parameters"]["rope_type"] = json!("llama3");
    v5["rope_parameters"]["rope_theta"] = json!(500000.0);
    let (a, b) = (LlamaConfig::from_json(&v4).unwrap(), LlamaConfig::from_json(&v5).unwrap());
    assert_eq!(a, b);
    assert_eq!(a.rope_theta, 500000.0);
    assert!(matches!(a.rope_scaling, RopeScaling::Llama3 { original_max_position_embeddings: 8192, .. }));

    // Legacy `type`, and rope_parameters with only a theta.
    let mut lin = spec.config();
    lin["rope_scaling"] = json!({"type": "linear", "factor": 4});
    assert_eq!(LlamaConfig::from_json(&lin).unwrap().rope_scaling, RopeScaling::Linear { factor: 4.0 });
    let mut dflt = spec.config();
    dflt.as_object_mut().unwrap().remove("rope_theta");
    dflt["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 1234.0});
    let c = LlamaConfig::from_json(&dflt).unwrap();
    assert_eq!((c.rope_theta, c.rope_scaling), (1234.0, RopeScaling::Default));
    // Absent everywhere: theta 10000.
    let mut none = spec.config();
    none.as_object_mut().unwrap().remove("rope_theta");
    assert_eq!(LlamaConfig::from_json(&none).unwrap().rope_theta, 10000.0);
}

#[test]
fn llama3_inv_freq_matches_independent_formula() {
    // head_dim 16, theta 500000: wavelengths span all three bands of the Llama 3 scaling
    // (high: unchanged, low: divided by factor, between: interpolated).
    let (theta, d, factor, low, high, old) = (500000.0f64, 16usize, 8.0f64, 1.0f64, 4.0f64, 8192.0f64);
    let got = rope_inv_freq(
        theta,
        d,
        &RopeScaling::Llama3 { factor, low_freq_factor: low, high_freq_factor: high, original_max_position_embeddings: 8192 },
    );
    let base = default_inv_freq(theta, d);
    let mut bands = [0; 3];
    for (i, (&g, &f)) in got.iter().zip(&base).enumerate() {
        let wavelen = 2.0 * std::f64::consts::PI / f;
        let want = if wavelen < old / high {
            bands[0] += 1;
            f
        } else if wavelen > old / low {
            bands[1] += 1;
            f / factor
        } else {
            bands[2] += 1;
            let smooth = (old / wavelen - low) / (high - low);
            (1.0 - smooth) * f / factor + smooth * f
        };
        assert!(((g as f64 - want) / want).abs() < 1e-5, "inv_freq[{i}] = {g}, want {want}");
    }
    assert!(bands.iter().all(|&n| n > 0), "bands {bands:?}");

    // And the graph carries exactly these values.
    let spec = LlamaSpec { hidden: 64, heads: 4, layers: 1, ..LlamaSpec::default() };
    let mut cfg = spec.config();
    cfg["rope_theta"] = json!(theta);
    cfg["rope_scaling"] = llama3_params();
    cfg["rope_scaling"]["rope_type"] = json!("llama3");
    let dir = TempDir::new();
    write_model(dir.path(), &cfg, &spec.tensors(1), Dtype::F32);
    let m = load(dir.path(), &Options::default()).unwrap();
    let consts: Vec<Vec<f32>> = m
        .graph
        .g
        .node_indices()
        .filter_map(|n| match m.graph.op(n) {
            Op::Const { values } if values.len() == 8 => Some(values.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(consts, vec![got]);
}

#[test]
fn default_inv_freq_is_the_f32_formula() {
    let got = rope_inv_freq(10000.0, 8, &RopeScaling::Default);
    let want: Vec<f32> = (0..4).map(|i| 1.0f32 / 10000f32.powf((2 * i) as f32 / 8.0)).collect();
    assert_eq!(got, want);
    assert_eq!(got[0], 1.0);
    assert!((got[1] as f64 - 0.1).abs() < 1e-7);
}
