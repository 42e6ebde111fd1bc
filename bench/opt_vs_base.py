#!/usr/bin/env python3
"""Optimized vs unoptimized artifact, side by side: `llmc bench` at prefill 512 and decode.

Compiles one checkpoint twice -- the default pipeline (with the e-graph `optimize` pass) and the
cleanups alone (`dce,cse,constant-fold,dce`) -- then runs `llmc bench` on the two artifacts in
interleaved rounds (base, opt, base, opt, ...) and prints each round's ratio opt/base, so slow
drift in machine load cancels within a round. Ratios are the claim, not absolute rates.

    python3 bench/opt_vs_base.py [--model /tmp/bench125m] [--rounds 4] [--threads 1]
"""
import argparse, json, os, statistics, subprocess, sys

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="/tmp/bench125m", help="checkpoint (scripts/gen_bench_model.py makes it)")
ap.add_argument("--llmc", default="target/release/llmc")
ap.add_argument("--rounds", type=int, default=4)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--prompt-len", type=int, default=512)
ap.add_argument("--gen", type=int, default=32)
ap.add_argument("--work", default="/tmp/llmc-opt-vs-base")
a = ap.parse_args()

if not os.path.exists(os.path.join(a.model, "config.json")):
    sys.exit(f"{a.model}: no checkpoint; run: python3 scripts/gen_bench_model.py --out {a.model}")
os.makedirs(a.work, exist_ok=True)
arts = {"base": os.path.join(a.work, "base.llmc"), "opt": os.path.join(a.work, "opt.llmc")}
pipelines = {"base": ["--passes", "dce,cse,constant-fold,dce"], "opt": []}
for k in ("base", "opt"):
    out = subprocess.run([a.llmc, "-q", "compile", a.model, "-o", arts[k], "--json", *pipelines[k]],
                         check=True, capture_output=True, text=True).stdout
    j = json.loads(out.strip().splitlines()[-1])
    print(f"{k:4}: {j['steps']} steps, {j['kernels']} kernels, peak activations {j['arena_bytes']/2**20:.1f} MiB")

def bench(k):
    out = subprocess.run([a.llmc, "-q", "bench", arts[k], "--prompt-len", str(a.prompt_len), "--gen", str(a.gen),
                          "--reps", "3", "--threads", str(a.threads), "--json"], check=True, capture_output=True, text=True).stdout
    j = json.loads(out.strip().splitlines()[-1])
    return j["prefill_tokens_per_s"], j["decode_tokens_per_s"]

rows = []
for r in range(a.rounds):
    load = os.getloadavg()[0]
    b = bench("base"); o = bench("opt")
    rows.append((b, o, load))
    print(f"round {r+1}: base prefill {b[0]:7.1f} decode {b[1]:6.1f} | opt prefill {o[0]:7.1f} decode {o[1]:6.1f} "
          f"| ratio prefill {o[0]/b[0]:.2f}x decode {o[1]/b[1]:.2f}x | load {load:.2f}")
pr = statistics.median(o[0] / b[0] for b, o, _ in rows)
dr = statistics.median(o[1] / b[1] for b, o, _ in rows)
print(f"median ratio optimized/unoptimized ({a.threads} thread(s), prefill {a.prompt_len}, decode {a.gen}): "
      f"prefill {pr:.2f}x, decode {dr:.2f}x; load average {min(l for *_, l in rows):.2f}..{max(l for *_, l in rows):.2f} on {os.cpu_count()} CPUs")
