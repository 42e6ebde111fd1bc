#!/usr/bin/env python3
"""A random-weight Llama-family checkpoint of a named real-model shape, for speed work.

    python3 scripts/gen_shape_checkpoint.py --shape smollm2-135m --dtype bf16 -o /tmp/smollm2-135m-bf16
    python3 scripts/gen_shape_checkpoint.py --shape smollm2-1.7b --dtype bf16 --shards 3 -o /tmp/smollm2-1.7b

Shapes (issue "real models at real scale"): `125m` (the benchmark shape of gen_bench_model.py:
hidden 768, 12 layers, 12/4 heads, MLP 2048, vocab 32000, untied), `smollm2-135m` (576, 30 layers,
9/3 heads, MLP 1536, vocab 49152, tied, rope theta 100000), `smollm2-1.7b` (2048, 24 layers, 32
heads, MLP 8192, vocab 49152, tied, theta 130000) and `llama3.2-1b` (2048, 16 layers, 32/8 heads
of 64, MLP 8192, vocab 128256, tied, theta 500000 with llama3 scaling factor 32 from 8192).

Weights are seeded normal values (std 0.02; norms 1 + small noise), written as f32, bf16 (rounded
to nearest even) or f16, one file or N shards with an index. Needs numpy only (no torch), and
writes the safetensors format directly. Outputs are never committed.

`--tokenizer PATH/tokenizer.json` copies a tokenizer beside the weights (e.g. the bundled seedlm's
byte-level BPE, `shared/models/seedlm/tokenizer.json`, 4096 tokens): GGUF converters need one, and
llmc and llama.cpp then tokenize text the same way. A vocabulary smaller than the shape's is
fine (the ids above it are never produced; scripts/hf_to_gguf.py pads the GGUF's token list). The
config's bos/eos ids are taken from a config.json beside that tokenizer when there is one.
"""

import argparse
import json
import os
import shutil

import numpy as np

SHAPES = {
    "125m": dict(hidden=768, layers=12, heads=12, kv=4, inter=2048, vocab=32000, tied=False, theta=10000.0),
    "smollm2-135m": dict(hidden=576, layers=30, heads=9, kv=3, inter=1536, vocab=49152, tied=True, theta=100000.0),
    "smollm2-1.7b": dict(hidden=2048, layers=24, heads=32, kv=32, inter=8192, vocab=49152, tied=True, theta=130000.0),
    "llama3.2-1b": dict(hidden=2048, layers=16, heads=32, kv=8, inter=8192, vocab=128256, tied=True, theta=500000.0,
                        head_dim=64, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


def tensors(s):
    h, hd = s["hidden"], s.get("head_dim", s["hidden"] // s["heads"])
    out = [("model.embed_tokens.weight", (s["vocab"], h))]
    for i in range(s["layers"]):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (s["heads"] * hd, h)),
            (f"{p}.self_attn.k_proj.weight", (s["kv"] * hd, h)),
            (f"{p}.self_attn.v_proj.weight", (s["kv"] * hd, h)),
            (f"{p}.self_attn.o_proj.weight", (h, s["heads"] * hd)),
            (f"{p}.mlp.gate_proj.weight", (s["inter"], h)),
            (f"{p}.mlp.up_proj.weight", (s["inter"], h)),
            (f"{p}.mlp.down_proj.weight", (h, s["inter"])),
        ]
    out.append(("model.norm.weight", (h,)))
    if not s["tied"]:
        out.append(("lm_head.weight", (s["vocab"], h)))
    return out


def encode(x, dtype):
    """Little-endian bytes of f32 array `x` as `dtype`."""
    x = np.ascontiguousarray(x, dtype="<f4")
    if dtype == "f32":
        return x.tobytes()
    if dtype == "f16":
        return x.astype("<f2").tobytes()
    b = x.view("<u4").astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16  # round to nearest even
    return b.astype("<u2").tobytes()


def write_file(path, items, dtype):
    st = {"F32": "F32", "f32": "F32", "f16": "F16", "bf16": "BF16"}[dtype]
    header, off = {}, 0
    for name, shape, data in items:
        header[name] = {"dtype": st, "shape": list(shape), "data_offsets": [off, off + len(data)]}
        off += len(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for _, _, data in items:
            f.write(data)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="bf16")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=None, help="a tokenizer.json to copy beside the weights")
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args()
    s = SHAPES[a.shape]
    os.makedirs(a.out, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    names = tensors(s)
    per = -(-len(names) // a.shards)
    weight_map, total = {}, 0
    for k in range(a.shards):
        part = names[k * per:(k + 1) * per]
        items = []
        for name, shape in part:
            if name.endswith("norm.weight"):
                x = 1.0 + 0.05 * rng.standard_normal(shape, dtype=np.float32)
            else:
                x = 0.02 * rng.standard_normal(shape, dtype=np.float32)
            items.append((name, shape, encode(x, a.dtype)))
            total += len(items[-1][2])
        fname = "model.safetensors" if a.shards == 1 else f"model-{k + 1:05d}-of-{a.shards:05d}.safetensors"
        write_file(os.path.join(a.out, fname), items, a.dtype)
        for name, _ in part:
            weight_map[name] = fname
    if a.shards > 1:
        with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    hd = s.get("head_dim", s["hidden"] // s["heads"])
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s["hidden"],
        "intermediate_size": s["inter"], "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv"], "head_dim": hd, "vocab_size": s["vocab"],
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": s["theta"], "hidden_act": "silu",
        "tie_word_embeddings": s["tied"], "torch_dtype": {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}[a.dtype],
        "bos_token_id": 1, "eos_token_id": 2,
    }
    if "rope_scaling" in s:
        cfg["rope_scaling"] = s["rope_scaling"]
    if a.tokenizer:
        shutil.copyfile(a.tokenizer, os.path.join(a.out, "tokenizer.json"))
        tcfg = os.path.join(os.path.dirname(os.path.abspath(a.tokenizer)), "config.json")
        if os.path.isfile(tcfg):
            with open(tcfg) as f:
                t = json.load(f)
            for k in ("bos_token_id", "eos_token_id"):
                if isinstance(t.get(k), int) and t[k] < s["vocab"]:
                    cfg[k] = t[k]
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    print(f"{a.out}: {a.shape} {a.dtype}, {len(names)} tensors, {total / 2**20:.0f} MiB in {a.shards} file(s)")


if __name__ == "__main__":
    main()
