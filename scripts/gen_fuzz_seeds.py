#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets to fuzz/seeds/<target>/ (committed; see fuzz/README.md).

Seeds are tiny valid inputs the fuzzer mutates from, so it reaches past the first checks quickly:
  checkpoint/  config.json bytes, a NUL byte, a one-shard safetensors file (Llama in f32/f16/bf16,
               tied and biased variants, GPT-2 with and without the `transformer.` prefix)
  ir_text/     the printed IR of the tiny Llama (from `llmc dump-ir`) and the repo's filetests
  artifact/    a compiled tiny Llama, prefixed with the harness's mode byte (0: as is, 1: repair
               checksums)

Usage: python3 scripts/gen_fuzz_seeds.py   (after `cargo build`; needs torch and safetensors)
Deterministic: fixed seed, so rerunning rewrites the same bytes.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = os.path.join(ROOT, "fuzz", "seeds")
LLMC = os.path.join(ROOT, "target", "debug", "llmc")


def llama(dtype, tie=False, bias=False):
    h, inter, vocab, heads, kv, layers = 8, 16, 32, 2, 1, 1
    hd = h // heads
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 32,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": tie,
        "attention_bias": bias, "eos_token_id": 2,
    }
    g = torch.Generator().manual_seed(0)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.1).to(dtype)
    t = {"model.embed_tokens.weight": r(vocab, h), "model.norm.weight": r(h)}
    if not tie:
        t["lm_head.weight"] = r(vocab, h)
    p = "model.layers.0"
    t.update({
        f"{p}.input_layernorm.weight": r(h), f"{p}.post_attention_layernorm.weight": r(h),
        f"{p}.self_attn.q_proj.weight": r(heads * hd, h), f"{p}.self_attn.k_proj.weight": r(kv * hd, h),
        f"{p}.self_attn.v_proj.weight": r(kv * hd, h), f"{p}.self_attn.o_proj.weight": r(h, heads * hd),
        f"{p}.mlp.gate_proj.weight": r(inter, h), f"{p}.mlp.up_proj.weight": r(inter, h),
        f"{p}.mlp.down_proj.weight": r(h, inter),
    })
    if bias:
        for n, w in [("q_proj", heads * hd), ("k_proj", kv * hd), ("v_proj", kv * hd), ("o_proj", h)]:
            t[f"{p}.self_attn.{n}.bias"] = r(w)
    return cfg, t


def gpt2(prefix):
    e, vocab, pos = 8, 32, 16
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": e, "n_layer": 1,
           "n_head": 2, "n_positions": pos, "vocab_size": vocab, "eos_token_id": 1}
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1
    p = prefix
    t = {f"{p}wte.weight": r(vocab, e), f"{p}wpe.weight": r(pos, e),
         f"{p}ln_f.weight": r(e), f"{p}ln_f.bias": r(e)}
    b = f"{p}h.0"
    t.update({
        f"{b}.ln_1.weight": r(e), f"{b}.ln_1.bias": r(e), f"{b}.ln_2.weight": r(e), f"{b}.ln_2.bias": r(e),
        f"{b}.attn.c_attn.weight": r(e, 3 * e), f"{b}.attn.c_attn.bias": r(3 * e),
        f"{b}.attn.c_proj.weight": r(e, e), f"{b}.attn.c_proj.bias": r(e),
        f"{b}.mlp.c_fc.weight": r(e, 4 * e), f"{b}.mlp.c_fc.bias": r(4 * e),
        f"{b}.mlp.c_proj.weight": r(4 * e, e), f"{b}.mlp.c_proj.bias": r(e),
    })
    return cfg, t


def write(target, name, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def main():
    if not os.path.exists(LLMC):
        sys.exit(f"{LLMC} not found: run `cargo build` first")
    shutil.rmtree(SEEDS, ignore_errors=True)
    models = {
        "llama-f32": llama(torch.float32), "llama-f16": llama(torch.float16),
        "llama-bf16-tied": llama(torch.bfloat16, tie=True), "llama-bias": llama(torch.float32, bias=True),
        "gpt2": gpt2("transformer."), "gpt2-noprefix": gpt2(""),
    }
    for name, (cfg, tensors) in models.items():
        cfg_bytes = json.dumps(cfg, sort_keys=True).encode()
        write("checkpoint", name, cfg_bytes + b"\0" + save(tensors))

    with tempfile.TemporaryDirectory() as tmp:
        cfg, tensors = models["llama-f32"]
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f)
        with open(os.path.join(tmp, "model.safetensors"), "wb") as f:
            f.write(save(tensors))
        ir = subprocess.run([LLMC, "dump-ir", tmp, "--max-context", "16"], check=True, capture_output=True).stdout
        write("ir_text", "llama-tiny.ir", ir)
        art = os.path.join(tmp, "m.llmc")
        subprocess.run([LLMC, "compile", tmp, "--max-context", "16", "--max-chunk", "4", "-o", art],
                       check=True, capture_output=True)
        with open(art, "rb") as f:
            a = f.read()
        write("artifact", "llama-tiny-raw", b"\0" + a)
        write("artifact", "llama-tiny-fix", b"\1" + a)

    # The filetests' graphs, one seed per `; -----` case, comments kept (the parser skips them).
    fdir = os.path.join(ROOT, "tests", "filetests")
    for fn in sorted(os.listdir(fdir)):
        with open(os.path.join(fdir, fn)) as f:
            cases = f.read().split("; -----")
        for i, case in enumerate(cases):
            write("ir_text", f"{os.path.splitext(fn)[0]}-{i}.ir", case.strip().encode() + b"\n")
    for t in sorted(os.listdir(SEEDS)):
        print(t, len(os.listdir(os.path.join(SEEDS, t))), "seeds")


if __name__ == "__main__":
    main()
