#!/usr/bin/env python3
"""Dense Llama HF checkpoint -> GGUF, with numpy and llama.cpp's own gguf-py only (no torch).

    python3 scripts/hf_to_gguf.py LLAMA_CPP_SRC CHECKPOINT_DIR --outtype bf16 --outfile MODEL.gguf

llama.cpp's `convert_hf_to_gguf.py` imports torch (and transformers, to hash the tokenizer's
pre-tokenizer); bench/compare.py must run where torch is not installed, so this script writes the
same GGUF that the converter's `LlamaModel` writes for a plain `LlamaForCausalLM` checkpoint:

- the same metadata keys (`llama.*` hyperparameters, `general.file_type`, quantization version);
- the same tensors, named through gguf-py's tensor-name map (`token_embd`, `blk.N.attn_q`, ...),
  with Q and K rows permuted back from HF's rotate-half layout to GGML's (`LlamaModel.permute`);
- 1-D tensors and norms as F32, 2-D weights in the output type (`f32`, `f16`, `bf16`, or `auto`:
  the checkpoint's own 16-bit type, F32 for an F32 checkpoint); bf16 -> bf16 is copied bit for bit
  and f32 -> bf16 rounds to nearest even, as the converter does;
- for `rope_scaling.rope_type == "llama3"`, the `rope_freqs.weight` factors of
  `LlamaModel.generate_extra_tensors`.

Vocabulary: from the checkpoint's `tokenizer.json` when it is a byte-level BPE (model `gpt2`,
merges, pre-tokenizer `--tokenizer-pre`, default `gpt-2` for a ByteLevel pre-tokenizer with the GPT-2
regex), padded to the config's vocab_size with `[PADi]` tokens of type UNUSED as the converter
pads; without a tokenizer.json, llama.cpp's bundled `models/ggml-vocab-llama-spm.gguf` (32000
tokens; the converter's `_set_vocab_builtin`) when vocab_size <= 32000. Tensor data are read with
np.memmap from the safetensors files (one file or shards with an index), so memory stays small.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def read_safetensors(ckpt: Path) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    """name -> (safetensors dtype, shape, memmapped array; BF16 as uint16 bits)."""
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in ckpt.glob("*.safetensors"))
    if not files:
        sys.exit(f"error: no .safetensors files in {ckpt}")
    out = {}
    for fname in files:
        path = ckpt / fname
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dt = info["dtype"]
            if dt not in ST_DTYPES:
                sys.exit(f"error: {name}: unsupported safetensors dtype {dt}")
            shape = tuple(info["shape"])
            lo, hi = info["data_offsets"]
            arr = np.memmap(path, dtype=ST_DTYPES[dt], mode="r", offset=base + lo,
                            shape=(hi - lo) // np.dtype(ST_DTYPES[dt]).itemsize)
            out[name] = (dt, shape, arr.reshape(shape) if shape else arr)
    return out


def to_f32(dt: str, a: np.ndarray) -> np.ndarray:
    if dt == "BF16":
        return (np.asarray(a, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(a, dtype=np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    n = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    n = np.where((n & 0x7FFFFFFF) > 0x7F800000, (n & np.uint32(0xFFFF0000)) | np.uint32(64 << 16), n)
    return ((n.astype(np.uint64) + (0x7FFF + ((n >> 16) & 1))) >> 16).astype(np.uint16)


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (undo HF's rotate-half row order)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return np.ascontiguousarray(
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def rope_params(cfg: dict) -> dict:
    p = dict(cfg.get("rope_parameters") or {})
    p.update(cfg.get("rope_scaling") or {})
    if "rope_theta" not in p and "rope_theta" in cfg:
        p["rope_theta"] = cfg["rope_theta"]
    if "rope_type" not in p and "type" in p:
        p["rope_type"] = p["type"]
    return p


def llama3_rope_factors(cfg: dict, rp: dict) -> np.ndarray:
    """LlamaModel.generate_extra_tensors for rope_type llama3."""
    base = rp.get("rope_theta", 10000.0)
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rp.get("factor", 8.0)
    lo_f, hi_f = rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old_ctx = rp.get("original_max_position_embeddings", 8192)
    lo_wl, hi_wl = old_ctx / lo_f, old_ctx / hi_f
    out = []
    for freq in freqs:
        wl = 2 * math.pi / freq
        if wl < hi_wl:
            out.append(1)
        elif wl > lo_wl:
            out.append(factor)
        else:
            smooth = (old_ctx / wl - lo_f) / (hi_f - lo_f)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def add_vocab(gguf, w, ckpt: Path, cfg: dict, lcpp: Path, pre_override: str | None) -> str:
    vocab_size = cfg["vocab_size"]
    tj = ckpt / "tokenizer.json"
    if tj.is_file():
        t = json.loads(tj.read_text())
        model = t.get("model", {})
        if model.get("type") != "BPE":
            sys.exit(f"error: {tj}: only a BPE tokenizer.json is handled (got {model.get('type')})")
        vocab = dict(model["vocab"])
        added = {a["id"]: a for a in t.get("added_tokens", [])}
        for i, a in added.items():
            vocab[a["content"]] = i
        if max(vocab.values()) >= vocab_size:
            sys.exit(f"error: {tj} has token ids >= the config's vocab_size {vocab_size}")
        rev = {i: s for s, i in vocab.items()}
        tokens, types = [], []
        for i in range(vocab_size):
            if i not in rev:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
            else:
                tokens.append(rev[i])
                if i in added:
                    types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
                else:
                    types.append(gguf.TokenType.NORMAL)
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        pre = pre_override
        if pre is None:
            pt = t.get("pre_tokenizer") or {}
            if pt.get("type") == "ByteLevel" and pt.get("use_regex", True):
                pre = "gpt-2"
            else:
                sys.exit(f"error: {tj}: pre-tokenizer {json.dumps(pt)[:200]} not recognised; "
                         "pass --tokenizer-pre NAME (a llama.cpp pre-tokenizer name, e.g. llama-bpe)")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        for key, fn in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id)):
            v = cfg.get(key)
            if isinstance(v, int) and 0 <= v < vocab_size and v in rev:
                fn(v)
        w.add_add_bos_token(False)
        return f"tokenizer.json ({len(model['vocab'])} BPE tokens + {len(added)} added, padded to {vocab_size}, pre {pre})"
    if vocab_size > 32000:
        sys.exit(f"error: {ckpt} has no tokenizer.json and vocab_size {vocab_size} > 32000 (the bundled "
                 "llama-spm vocabulary); write one beside the checkpoint "
                 "(scripts/gen_shape_checkpoint.py --tokenizer PATH)")
    path = lcpp / "models" / "ggml-vocab-llama-spm.gguf"
    r = gguf.GGUFReader(path, "r")
    K = gguf.Keys.Tokenizer
    w.add_tokenizer_model(bytes(r.get_field(K.MODEL).parts[-1]).decode())
    f = r.get_field(K.PRE)
    w.add_tokenizer_pre(bytes(f.parts[-1]).decode() if f else "default")
    f = r.get_field(K.LIST)
    w.add_token_list([bytes(f.parts[i]) for i in f.data][:vocab_size])
    f = r.get_field(K.SCORES)
    w.add_token_scores([f.parts[i].tolist()[0] for i in f.data][:vocab_size])
    f = r.get_field(K.TOKEN_TYPE)
    w.add_token_types([f.parts[i].tolist()[0] for i in f.data][:vocab_size])
    for key, fn in ((K.BOS_ID, w.add_bos_token_id), (K.EOS_ID, w.add_eos_token_id), (K.UNK_ID, w.add_unk_token_id)):
        f = r.get_field(key)
        if f:
            fn(int(f.parts[-1][0]))
    return f"llama.cpp's bundled llama-spm vocabulary (first {vocab_size} tokens)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("llama_cpp_src", help="llama.cpp source tree (for gguf-py and models/)")
    ap.add_argument("checkpoint")
    ap.add_argument("--outtype", choices=["auto", "f32", "f16", "bf16"], default="auto")
    ap.add_argument("--outfile", required=True)
    ap.add_argument("--tokenizer-pre", default=None, help="tokenizer.ggml.pre for a tokenizer.json vocabulary")
    a = ap.parse_args()
    lcpp = Path(a.llama_cpp_src)
    sys.path.insert(0, str(lcpp / "gguf-py"))
    import gguf

    ckpt = Path(a.checkpoint)
    cfg = json.loads((ckpt / "config.json").read_text())
    if cfg.get("architectures", ["LlamaForCausalLM"])[0] != "LlamaForCausalLM":
        sys.exit(f"error: only LlamaForCausalLM is handled (got {cfg.get('architectures')})")
    tensors = read_safetensors(ckpt)
    src_dtypes = {dt for dt, shape, _ in tensors.values() if len(shape) >= 2}
    outtype = a.outtype
    if outtype == "auto":
        outtype = "bf16" if "BF16" in src_dtypes else "f16" if "F16" in src_dtypes else "f32"
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16}[outtype]
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16}[outtype]

    n_layer = cfg["num_hidden_layers"]
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads", n_head)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    arch = gguf.MODEL_ARCH.LLAMA
    out = Path(a.outfile)
    w = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[arch])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(ckpt.resolve().name)
    w.add_block_count(n_layer)
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    rp = rope_params(cfg)
    rope_type = (rp.get("rope_type") or "default").lower()
    if rope_type == "linear" and rp.get("factor") is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rp["factor"])
    elif rope_type not in ("default", "llama3"):
        sys.exit(f"error: rope_type {rope_type!r} is not handled")
    if "rope_theta" in rp:
        w.add_rope_freq_base(rp["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-5))
    if cfg.get("head_dim") is not None:
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    w.add_file_type(ftype)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(head_dim)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab_note = add_vocab(gguf, w, ckpt, cfg, lcpp, a.tokenizer_pre)

    name_map = gguf.get_tensor_name_map(arch, n_layer)
    for name in tensors:  # the checkpoint's order (the converter sorts nothing either)
        dt, shape, arr = tensors[name]
        if name.endswith("rotary_emb.inv_freq"):
            continue
        new = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            sys.exit(f"error: cannot map tensor {name!r}")
        if name.endswith("q_proj.weight"):
            arr = permute(arr, n_head, n_head)
        elif name.endswith("k_proj.weight"):
            arr = permute(arr, n_head, n_kv)
        if len(shape) <= 1 or new.endswith("_norm.weight") or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(new, np.ascontiguousarray(to_f32(dt, arr)))
        elif qtype == gguf.GGMLQuantizationType.BF16:
            bits = arr if dt == "BF16" else f32_to_bf16_bits(to_f32(dt, arr))
            w.add_tensor(new, bits, raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            w.add_tensor(new, to_f32(dt, arr).astype(np.float16) if dt != "F16" else arr)
    if rope_type == "llama3":
        w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(cfg, rp))

    tmp = out.with_name(out.name + ".part")
    w.path = tmp
    w.write_header_to_file(path=tmp)
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    tmp.rename(out)
    print(json.dumps({"outfile": str(out), "outtype": outtype, "tensors": len(tensors),
                      "bytes": out.stat().st_size, "vocab": vocab_note}))


if __name__ == "__main__":
    main()
