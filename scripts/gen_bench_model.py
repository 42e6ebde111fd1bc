#!/usr/bin/env python3
"""Writes the random-init benchmark checkpoint: the "125M" Llama shape (hidden 768, 12 heads,
4 KV heads, MLP 2048, vocab 32000, untied head), float32, with a fixed seed, for compile-time
and speed measurements of the optimizer (`llmc dump-ir`, `llmc compile --pass-stats`,
`llmc bench`). Never commit its output.

Usage: python3 scripts/gen_bench_model.py OUT_DIR [--layers N] [--seed S]
    python3 scripts/gen_bench_model.py /tmp/bench125m              # 12 layers, ~125M params, ~0.5 GB
    python3 scripts/gen_bench_model.py /tmp/bench32 --layers 32    # same width, 32 layers, ~1 GB

Needs torch and transformers (tests/fixtures/requirements.txt); CPU only, under a minute.
"""

import argparse
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output directory (created); config.json + model.safetensors")
    ap.add_argument("--layers", type=int, default=12, help="number of decoder layers (default 12)")
    ap.add_argument("--seed", type=int, default=0, help="torch seed (default 0)")
    a = ap.parse_args()
    if a.layers < 1:
        ap.error(f"--layers must be at least 1, got {a.layers}")
    torch.manual_seed(a.seed)
    torch.set_num_threads(1)  # leave the other core to whoever shares the machine
    cfg = LlamaConfig(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=a.layers,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.no_grad():
        model = LlamaForCausalLM(cfg).eval().to(torch.float32)
    model.config.torch_dtype = torch.float32
    n = sum(p.numel() for p in model.parameters())
    os.makedirs(a.out, exist_ok=True)
    model.save_pretrained(a.out, safe_serialization=True, max_shard_size="10GB")
    size = sum(os.path.getsize(os.path.join(a.out, f)) for f in os.listdir(a.out) if f.endswith(".safetensors"))
    print(f"{a.out}: {a.layers} layers, {n / 1e6:.1f} M parameters, float32, {size / 2**30:.2f} GiB of safetensors")


if __name__ == "__main__":
    main()
