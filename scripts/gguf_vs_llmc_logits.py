#!/usr/bin/env python3
"""Check a GGUF against an llmc artifact of the same checkpoint: the same tokens, the same log-probs.

    python3 scripts/gguf_vs_llmc_logits.py --gguf MODEL.gguf --artifact MODEL.llmc \
        --llama-perplexity BUILD/bin/llama-perplexity [--text FILE] [--ctx 128] [--llmc target/release/llmc]

llama.cpp's `llama-perplexity --kl-divergence-base FILE` evaluates the first --ctx tokens of the
text (tokenized by the GGUF's vocabulary) and saves the token ids and, for the second half of the
window, every position's log-probabilities (16-bit, scaled per row). This script reads that file,
runs `llmc run --input-ids <the same ids> --logits-out` on the artifact and compares: top-1
agreement and the largest and mean absolute log-probability difference over the entries
llama.cpp kept (within 16 nats of the row's maximum). For bench/compare.py's float GGUFs
(scripts/hf_to_gguf.py) and float artifacts both should be ~1e-3 nats and 100 %; a GGUF whose
Q/K rows were not permuted gives ~0.6 nats and ~60 %. With quantized formats the numbers measure
the two quantizations against each other. Prints one JSON line. Needs numpy.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--llama-perplexity", required=True, help="the llama-perplexity binary")
    ap.add_argument("--llmc", default=os.path.join(here, "..", "target", "release", "llmc"))
    ap.add_argument("--text", default=os.path.join(here, "..", "..", "shared", "models", "seedlm", "heldout.txt"))
    ap.add_argument("--ctx", type=int, default=128, help="tokens evaluated (one llama-perplexity chunk)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        kl, npy = os.path.join(tmp, "base.kld"), os.path.join(tmp, "logits.npy")
        p = subprocess.run([a.llama_perplexity, "-m", a.gguf, "-f", a.text, "-c", str(a.ctx), "-b", str(a.ctx),
                            "--chunks", "1", "--kl-divergence-base", kl, "-t", str(a.threads)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit("llama-perplexity failed: " + " | ".join(p.stderr.strip().splitlines()[-10:]))
        raw = open(kl, "rb").read()
        if raw[:8] != b"_logits_":
            sys.exit(f"{kl}: not a llama-perplexity logits file")
        n_ctx, n_vocab, n_chunk = (int(x) for x in np.frombuffer(raw[8:20], dtype=np.int32))
        off = 20
        toks = np.frombuffer(raw[off:off + 4 * n_chunk * n_ctx], dtype=np.int32).reshape(n_chunk, n_ctx)
        off += 4 * n_chunk * n_ctx
        nv = 2 * ((n_vocab + 1) // 2) + 4
        first = n_ctx // 2
        rows = n_ctx - 1 - first
        lp = np.frombuffer(raw[off:off + 2 * rows * nv], dtype=np.uint16).reshape(rows, nv)
        scale_min = lp[:, :4].copy().view(np.float32)  # per row: scale, min log-prob
        q = lp[:, 4:4 + n_vocab].astype(np.float64)
        ref = scale_min[:, 1:2] + scale_min[:, 0:1] * q  # valid where q > 0
        ids = ",".join(str(t) for t in toks[0])
        p = subprocess.run([a.llmc, "run", a.artifact, "--input-ids", ids, "--max-new-tokens", "1", "--logits-out", npy,
                            "-q", "--threads", str(a.threads)], capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit("llmc run failed: " + " | ".join(p.stderr.strip().splitlines()[-10:]))
        logits = np.load(npy).astype(np.float64)[first:first + rows]
    if logits.shape[1] != n_vocab:
        sys.exit(f"vocabulary sizes differ: GGUF {n_vocab}, artifact {logits.shape[1]}")
    logits -= logits.max(1, keepdims=True)
    logits -= np.log(np.exp(logits).sum(1, keepdims=True))
    d = np.abs(logits - ref)[q > 0]
    print(json.dumps({
        "gguf": a.gguf, "artifact": a.artifact, "tokens": n_ctx, "positions_compared": rows, "vocab": n_vocab,
        "first_ids": toks[0][:8].tolist(), "top1_agreement": float((logits.argmax(1) == q.argmax(1)).mean()),
        "max_abs_logprob_diff": float(d.max()), "mean_abs_logprob_diff": float(d.mean()),
        "llama_cpp_logprob_step": float(scale_min[:, 0].max()),
    }))


if __name__ == "__main__":
    main()
