#!/usr/bin/env python3
"""Writes a random-init ~1.1B-parameter Llama checkpoint in float16 (~2.2 GB) for memory
measurements (scripts/measure_compile_rss.sh). Never commit its output.

The shape is TinyLlama-1.1B's (hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632,
vocab 32000); weights come from transformers' own initializer with a fixed seed, created directly
in float16 so generating needs ~2.5 GB of RAM, and saved as one model.safetensors.

Usage: python3 scripts/gen_1b_checkpoint.py [OUT_DIR]   (default /tmp/llmc-1b)
Needs torch and transformers (tests/fixtures/requirements.txt); CPU only, about a minute.
"""

import os
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/llmc-1b"
    torch.manual_seed(0)
    torch.set_num_threads(1)  # leave the other core to whoever shares the machine
    cfg = LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    torch.set_default_dtype(torch.float16)
    with torch.no_grad():
        model = LlamaForCausalLM(cfg).eval()
    model.config.torch_dtype = torch.float16
    n = sum(p.numel() for p in model.parameters())
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="10GB")
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    print(f"{out}: {n / 1e9:.3f} B parameters, float16, {size / 2**30:.2f} GiB of safetensors")


if __name__ == "__main__":
    main()
