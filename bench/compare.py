#!/usr/bin/env python3
"""Side-by-side CPU speed comparison: llmc vs PyTorch eager vs llama.cpp on the same checkpoint
and thread count (issue 4). Not part of CI; see bench/README.md.

Usage:
    python3 bench/compare.py                                  # /tmp/bench125m, 2 threads, 3 rounds
    python3 bench/compare.py --checkpoint /tmp/bench125m --threads 2 --rounds 3 --reps 3
    python3 bench/compare.py --skip-llama-cpp --skip-torch    # llmc alone

What it does:
  1. Generates the benchmark checkpoint with scripts/gen_bench_model.py if the directory is missing,
     and compiles it with `llmc compile` into --work-dir.
  2. llama.cpp (unless --skip-llama-cpp): downloads the `llama-cpp-python` sdist with pip (it vendors
     llama.cpp, its converter and quantizer), builds llama-bench and llama-quantize with clang
     (GCC 12 miscompiles the AMX tile-config intrinsic), converts the checkpoint to GGUF F32 with the
     vendored convert_hf_to_gguf.py and quantizes it to Q8_0 and Q4_0. The benchmark checkpoint has
     no tokenizer, so the converter is run through a wrapper that substitutes llama.cpp's bundled
     Llama SentencePiece vocabulary (models/ggml-vocab-llama-spm.gguf, exactly 32000 tokens): the
     vocabulary is needed only for the GGUF to load; llama-bench uses random token ids.
     Everything is cached in --work-dir; if any step fails, llama.cpp is reported "unavailable"
     with the reason and the rest of the comparison still runs.
  3. Interleaved rounds: in each round, `llmc bench`, then a PyTorch eager run (transformers
     LlamaForCausalLM, fp32, torch.set_num_threads(N), in a subprocess), then `llama-bench` once per
     GGUF type. Each engine does --reps timed repetitions after a warm-up per invocation; the
     reported rate is the median over all repetitions of all rounds.
  4. Prints a table of tokens/s and the ratios llmc / other (prefill of a --prompt-len prompt and
     decode of --gen greedy tokens), with the load average before and after, and writes
     bench/results/<date>.md and .json.

Definitions (as close as the three tools allow):
  prefill tokens/s = prompt_len / time of one forward pass over the whole prompt (empty KV cache)
  decode tokens/s  = gen / time of gen single-token forward passes with the KV cache
  llmc: `llmc bench` (decode follows the prompt). torch: the same, by hand (decode follows the
  prompt, argmax of the logits fed back). llama.cpp: `llama-bench -p P -n G` (pp and tg are separate
  tests; its tg starts from an empty context, so its attention reads P fewer cached rows: a small
  advantage to llama.cpp on decode at this size).
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GGUF_TYPES = ("f32", "q8_0", "q4_0")


class Unavailable(Exception):
    """An engine could not be set up; the message says why."""


def log(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], cwd: Path | None = None, env: dict | None = None, what: str = "") -> str:
    """Runs cmd, returns stdout; raises Unavailable with the tail of stderr on failure."""
    log("$ " + " ".join(str(c) for c in cmd))
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-15:]
        raise Unavailable(f"{what or cmd[0]} failed (exit {p.returncode}): " + " | ".join(tail))
    return p.stdout


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ----------------------------------------------------------------------------------------- llmc

def ensure_checkpoint(ckpt: Path) -> None:
    if (ckpt / "config.json").is_file() and list(ckpt.glob("*.safetensors")):
        return
    log(f"{ckpt} missing: generating it with scripts/gen_bench_model.py")
    try:
        run([sys.executable, REPO / "scripts" / "gen_bench_model.py", ckpt], what="gen_bench_model.py")
    except Unavailable as e:
        sys.exit(f"error: cannot generate the benchmark checkpoint {ckpt}: {e}")


def compile_llmc(llmc: Path, ckpt: Path, artifact: Path, extra: list[str] | None = None) -> dict:
    if not llmc.is_file():
        sys.exit(f"error: llmc binary {llmc} not found (build it with `cargo build --release`)")
    try:
        out = run([llmc, "compile", ckpt, "-o", artifact, "--json", "-q", *(extra or [])], what="llmc compile")
    except Unavailable as e:
        sys.exit(f"error: {e}")
    return json.loads(out.strip().splitlines()[-1])


def bench_llmc(llmc: Path, artifact: Path, a) -> dict:
    out = run([llmc, "bench", artifact, "--prompt-len", a.prompt_len, "--gen", a.gen, "--reps", a.reps,
               "--threads", a.threads, "--json", "-q"], what="llmc bench")
    j = json.loads(out.strip().splitlines()[-1])
    return {"prefill": j["prefill_tokens_per_s_runs"], "decode": j["decode_tokens_per_s_runs"],
            "peak_rss_bytes": j.get("peak_rss_bytes")}


# ---------------------------------------------------------------------------------------- torch

def torch_worker(a) -> None:
    """Runs in a subprocess: prints one JSON line with per-repetition rates."""
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(a.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    model = LlamaForCausalLM.from_pretrained(a.checkpoint, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, vocab, (1, a.prompt_len), generator=g)
    prefill, decode = [], []
    with torch.inference_mode():
        for rep in range(a.reps + 1):  # the first is the warm-up
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            t1 = time.perf_counter()
            past = out.past_key_values
            tok = out.logits[:, -1, :].argmax(-1, keepdim=True)
            t2 = time.perf_counter()
            for _ in range(a.gen):
                out = model(input_ids=tok, past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = out.logits[:, -1, :].argmax(-1, keepdim=True)
            t3 = time.perf_counter()
            if rep > 0:
                prefill.append(a.prompt_len / (t1 - t0))
                decode.append(a.gen / (t3 - t2))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"prefill": prefill, "decode": decode, "peak_rss_bytes": rss,
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))


def bench_torch(a) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    out = run([sys.executable, __file__, "_torch", "--checkpoint", a.checkpoint, "--threads", a.threads,
               "--prompt-len", a.prompt_len, "--gen", a.gen, "--reps", a.reps], env=env, what="torch run")
    return json.loads(out.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ llama.cpp

CONVERT_WRAPPER = r'''
import sys
lcpp = sys.argv[1]
sys.path[0] = lcpp                      # _set_vocab_builtin looks in sys.path[0]/models
sys.path.insert(1, lcpp + "/gguf-py")
import conversion.llama as L
# The benchmark checkpoint has no tokenizer: use llama.cpp's bundled 32000-token Llama SPM vocab.
L.LlamaModel.set_vocab = lambda self: self._set_vocab_builtin("llama-spm", self.hparams["vocab_size"])
import convert_hf_to_gguf as C
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[2:]
C.main()
'''


def setup_llama_cpp(a, work: Path) -> tuple[Path, dict[str, Path], dict]:
    """Returns (llama-bench binary, {gguf type: path}, info). Raises Unavailable."""
    lc_work = work / "llama.cpp"
    lc_work.mkdir(parents=True, exist_ok=True)
    info: dict = {}
    if a.llama_cpp_src:
        src = Path(a.llama_cpp_src)
    else:
        sdists = sorted(lc_work.glob("llama_cpp_python-*.tar.gz"))
        if not sdists:
            # Its build backend (scikit-build-core) must be importable for pip to read the metadata.
            try:
                import scikit_build_core  # noqa: F401
            except ImportError:
                run([sys.executable, "-m", "pip", "install", "-q", "scikit-build-core"],
                    what="pip install scikit-build-core")
            run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 "--no-build-isolation", "llama-cpp-python", "-d", lc_work], what="pip download llama-cpp-python")
            sdists = sorted(lc_work.glob("llama_cpp_python-*.tar.gz"))
            if not sdists:
                raise Unavailable("pip download produced no llama_cpp_python-*.tar.gz sdist")
        sdist = sdists[-1]
        info["sdist"] = sdist.name
        root = lc_work / sdist.name[: -len(".tar.gz")]
        if not root.is_dir():
            log(f"extracting {sdist.name}")
            with tarfile.open(sdist) as t:
                t.extractall(lc_work)
        src = root / "vendor" / "llama.cpp"
    if not (src / "convert_hf_to_gguf.py").is_file():
        raise Unavailable(f"{src} has no convert_hf_to_gguf.py (not a llama.cpp source tree)")
    info["src"] = str(src)

    build = src / "build"
    bench_bin, quant_bin = build / "bin" / "llama-bench", build / "bin" / "llama-quantize"
    if not (bench_bin.is_file() and quant_bin.is_file()):
        for tool in ("clang", "clang++", "cmake"):
            if shutil.which(tool) is None:
                raise Unavailable(f"`{tool}` not found (apt-get install -y clang cmake)")
        run(["cmake", "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DCMAKE_C_COMPILER=clang",
             "-DCMAKE_CXX_COMPILER=clang++", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
             "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"], what="cmake configure")
        run(["cmake", "--build", build, "--target", "llama-bench", "llama-quantize",
             "-j", str(os.cpu_count() or 2)], what="cmake build")

    ggufs: dict[str, Path] = {}
    name = Path(a.checkpoint).resolve().name
    f32 = lc_work / f"{name}-f32.gguf"
    if not f32.is_file():
        wrapper = lc_work / "convert_no_tokenizer.py"
        wrapper.write_text(CONVERT_WRAPPER)
        tmp = f32.with_suffix(".gguf.part")
        run([sys.executable, wrapper, src, a.checkpoint, "--outtype", "f32", "--outfile", tmp],
            what="convert_hf_to_gguf.py")
        tmp.rename(f32)
    ggufs["f32"] = f32
    for q in GGUF_TYPES[1:]:
        if q not in a.gguf_types:
            continue
        qp = lc_work / f"{name}-{q}.gguf"
        if not qp.is_file():
            tmp = qp.with_suffix(".gguf.part")
            try:
                run([quant_bin, f32, tmp, q.upper(), str(a.threads)], what=f"llama-quantize {q}")
                tmp.rename(qp)
            except Unavailable as e:
                info[f"{q}_error"] = str(e)
                continue
        ggufs[q] = qp
    return bench_bin, {k: v for k, v in ggufs.items() if k in a.gguf_types}, info


def bench_llama_cpp(bench_bin: Path, gguf: Path, a) -> dict:
    out = run([bench_bin, "-m", gguf, "-p", a.prompt_len, "-n", a.gen, "-t", a.threads,
               "-r", a.reps, "-o", "json"], what=f"llama-bench {gguf.name}")
    rows = json.loads(out)
    res: dict = {"prefill": [], "decode": []}
    for r in rows:
        if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0:
            res["prefill"] = r["samples_ts"]
        elif r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0:
            res["decode"] = r["samples_ts"]
        res["build_commit"] = r.get("build_commit")
        res["cpu_info"] = r.get("cpu_info")
        res["type"] = r.get("model_type")
    return res


# ---------------------------------------------------------------------------------------- main

def fmt(x: float | None, nd: int = 1) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="/tmp/bench125m", help="HF checkpoint dir (generated if missing)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (llmc, torch, llama.cpp)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per engine per round")
    ap.add_argument("--llmc", default=str(REPO / "target" / "release" / "llmc"))
    ap.add_argument("--work-dir", default="/tmp/llmc-compare", help="artifact, llama.cpp build, GGUFs")
    ap.add_argument("--llama-cpp-src", default=None, help="existing llama.cpp source tree (skips the sdist download)")
    ap.add_argument("--gguf-types", default=",".join(GGUF_TYPES), help="comma list of f32,q8_0,q4_0")
    ap.add_argument("--llmc-quant", default="int8,int4,w8a8,w4a8,2:4+int8",
                    help="comma list of `llmc compile --quant` formats also benchmarked (round-to-nearest; "
                         "calibration changes quality, not speed), `2:4+int8` for `--sparsity 2:4 --quant int8`; "
                         "empty for none")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ap.add_argument("--max-load", type=float, default=None,
                    help="before each round, wait until the 1-minute load average is at most this")
    ap.add_argument("--max-load-wait", type=float, default=600, help="seconds to wait for --max-load per round")
    ap.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    a = ap.parse_args()
    a.gguf_types = [t.strip().lower() for t in a.gguf_types.split(",") if t.strip()]
    for t in a.gguf_types:
        if t not in GGUF_TYPES:
            ap.error(f"--gguf-types: unknown type {t!r} (expected some of {','.join(GGUF_TYPES)})")
    if a.threads < 1 or a.rounds < 1 or a.reps < 1 or a.prompt_len < 1 or a.gen < 1:
        ap.error("--threads, --rounds, --reps, --prompt-len and --gen must be at least 1")

    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = Path(a.checkpoint)
    ensure_checkpoint(ckpt)
    llmc = Path(a.llmc)
    artifact = work / f"{ckpt.resolve().name}.llmc"
    comp = compile_llmc(llmc, ckpt, artifact)
    log(f"compiled {artifact} in {comp.get('seconds', 0):.2f} s")

    engines: dict[str, dict] = {"llmc f32": {"prefill": [], "decode": []}}
    unavailable: dict[str, str] = {}
    quant_artifacts: dict[str, Path] = {}
    for q in [x.strip() for x in a.llmc_quant.split(",") if x.strip()]:
        qa = work / f"{ckpt.resolve().name}.{q.replace(':', '_').replace('+', '_')}.llmc"
        flags = ["--quant", q]
        if q.startswith("2:4+"):
            flags = ["--sparsity", "2:4", "--quant", q[len("2:4+"):]]
        try:
            run([llmc, "compile", ckpt, "-o", qa, *flags, "-q"], what=f"llmc compile {' '.join(flags)}")
            quant_artifacts[f"llmc {q}"] = qa
            engines[f"llmc {q}"] = {"prefill": [], "decode": []}
        except Unavailable as e:
            unavailable[f"llmc {q}"] = str(e)
    if a.skip_torch:
        unavailable["torch eager f32"] = "skipped (--skip-torch)"
    else:
        engines["torch eager f32"] = {"prefill": [], "decode": []}
    lc_bin, ggufs, lc_info = None, {}, {}
    if a.skip_llama_cpp:
        unavailable["llama.cpp"] = "skipped (--skip-llama-cpp)"
    else:
        try:
            lc_bin, ggufs, lc_info = setup_llama_cpp(a, work)
            for t in a.gguf_types:
                if t in ggufs:
                    engines[f"llama.cpp {t}"] = {"prefill": [], "decode": []}
                else:
                    unavailable[f"llama.cpp {t}"] = lc_info.get(f"{t}_error", "not produced")
        except Unavailable as e:
            unavailable["llama.cpp"] = str(e)
            log(f"llama.cpp unavailable: {e}")

    load_before = loadavg()
    started = dt.datetime.now(dt.timezone.utc)
    extra: dict[str, dict] = {}
    per_round_load = []
    for rnd in range(a.rounds):
        if a.max_load is not None:
            waited = 0.0
            while os.getloadavg()[0] > a.max_load and waited < a.max_load_wait:
                if waited == 0:
                    log(f"waiting for the 1-min load average {loadavg()[0]} to fall to {a.max_load}")
                time.sleep(10)
                waited += 10
        per_round_load.append(loadavg())
        log(f"round {rnd + 1}/{a.rounds} (load {per_round_load[-1]})")
        jobs = [("llmc f32", lambda: bench_llmc(llmc, artifact, a))]
        for name, qa in quant_artifacts.items():
            jobs.append((name, lambda qa=qa: bench_llmc(llmc, qa, a)))
        if "torch eager f32" in engines:
            jobs.append(("torch eager f32", lambda: bench_torch(a)))
        for t, p in ggufs.items():
            jobs.append((f"llama.cpp {t}", lambda p=p: bench_llama_cpp(lc_bin, p, a)))
        for name, job in jobs:
            if name not in engines:
                continue
            try:
                r = job()
            except (Unavailable, json.JSONDecodeError, KeyError) as e:
                unavailable[name] = f"failed in round {rnd + 1}: {e}"
                del engines[name]
                continue
            engines[name]["prefill"] += r["prefill"]
            engines[name]["decode"] += r["decode"]
            extra[name] = {k: v for k, v in r.items() if k not in ("prefill", "decode")}
            log(f"  {name}: prefill {fmt(median(r['prefill']))} tok/s, decode {fmt(median(r['decode']))} tok/s")
    load_after = loadavg()

    summary = {}
    for name, e in engines.items():
        summary[name] = {"prefill_tokens_per_s": median(e["prefill"]), "decode_tokens_per_s": median(e["decode"]),
                         "prefill_runs": e["prefill"], "decode_runs": e["decode"], **extra.get(name, {})}
    base = summary.get("llmc f32", {})
    for name, s in summary.items():
        s["llmc_over_this_prefill"] = ratio(base.get("prefill_tokens_per_s"), s["prefill_tokens_per_s"])
        s["llmc_over_this_decode"] = ratio(base.get("decode_tokens_per_s"), s["decode_tokens_per_s"])

    # Our own benchmark keeps about `threads` runnable while it runs, so a 1-minute load average
    # above threads + 1 means other processes competed for the cores during the run.
    peak_load = max([l[0] for l in per_round_load] + [load_after[0]])
    contended = peak_load > a.threads + 1
    acceptance = {}
    if "llama.cpp f32" in summary:
        lf = summary["llama.cpp f32"]
        acceptance["f32 decode >= 1.05x llama.cpp f32"] = (lf["llmc_over_this_decode"] or 0) >= 1.05
        acceptance["f32 prefill >= 1.0x llama.cpp f32"] = (lf["llmc_over_this_prefill"] or 0) >= 1.0
    # Quantized decode against llama.cpp's formats of the same weight width (8 and 4 bits).
    quant_vs = {}
    for mine, theirs in [("int8", "q8_0"), ("w8a8", "q8_0"), ("int4", "q4_0"), ("w4a8", "q4_0")]:
        m, t = summary.get(f"llmc {mine}"), summary.get(f"llama.cpp {theirs}")
        if m and t:
            r = ratio(m["decode_tokens_per_s"], t["decode_tokens_per_s"])
            quant_vs[f"llmc {mine} decode / llama.cpp {theirs} decode"] = r
            acceptance[f"{mine} decode >= 1.0x llama.cpp {theirs}"] = (r or 0) >= 1.0

    # Issue 9: quantized decode against llmc's own f32 artifact, and 2:4 + int8 against int8.
    vs_f32 = {}
    f32d = summary.get("llmc f32", {}).get("decode_tokens_per_s")
    for q, goal in [("int8", 1.8), ("w8a8", 1.8), ("int4", 3.0), ("w4a8", 3.0)]:
        m = summary.get(f"llmc {q}")
        if m and f32d:
            vs_f32[f"llmc {q} decode / llmc f32 decode (goal >= {goal}x)"] = ratio(m["decode_tokens_per_s"], f32d)
    s24, i8 = summary.get("llmc 2:4+int8"), summary.get("llmc int8")
    if s24 and i8:
        vs_f32["llmc 2:4+int8 decode / llmc int8 decode (goal > 1x)"] = ratio(s24["decode_tokens_per_s"], i8["decode_tokens_per_s"])

    # ---------------------------------------------------------------- table
    lines = []
    lines.append(f"# llmc vs PyTorch eager vs llama.cpp — {started.strftime('%Y-%m-%d %H:%M UTC')}")
    lines.append("")
    lines.append(f"- model: `{ckpt}` ({comp.get('weight_bytes', 0) / 2**20:.0f} MiB of f32 weights), "
                 f"prompt {a.prompt_len} tokens, decode {a.gen} greedy tokens, **{a.threads} threads** for every engine")
    lines.append(f"- {a.rounds} interleaved rounds × {a.reps} timed repetitions each; numbers are medians over all repetitions")
    lines.append(f"- CPU: {cpu_model()}, {os.cpu_count()} logical CPUs")
    lines.append(f"- load average (1/5/15 min): before {load_before}, after {load_after}; per round {per_round_load} "
                 f"— the machine is shared: ratios, not absolute rates, are the claim")
    lines.append(f"- llmc compile: {comp.get('seconds', 0):.2f} s; llmc peak RSS "
                 f"{(extra.get('llmc f32', {}).get('peak_rss_bytes') or 0) / 2**20:.0f} MiB")
    if lc_info:
        lines.append(f"- llama.cpp: {lc_info.get('sdist', lc_info.get('src'))} vendored source, clang, GGML_NATIVE=ON, "
                     f"build {next((x.get('build_commit') for k, x in extra.items() if k.startswith('llama.cpp')), '?')}")
    lines.append("")
    lines.append("| engine | prefill tok/s | decode tok/s | llmc ÷ this, prefill | llmc ÷ this, decode |")
    lines.append("|---|---:|---:|---:|---:|")
    for name, s in summary.items():
        lines.append(f"| {name} | {fmt(s['prefill_tokens_per_s'])} | {fmt(s['decode_tokens_per_s'])} | "
                     f"{fmt(s['llmc_over_this_prefill'], 2)}× | {fmt(s['llmc_over_this_decode'], 2)}× |")
    for name, why in unavailable.items():
        lines.append(f"| {name} | unavailable | unavailable | — | — |")
    lines.append("")
    if unavailable:
        lines.append("Unavailable:")
        for name, why in unavailable.items():
            lines.append(f"- {name}: {why}")
        lines.append("")
    if contended:
        lines.append(f"**Warning: contended run.** The 1-minute load average reached {peak_load} with {a.threads} "
                     "benchmark threads: other processes competed for the cores. Spin-waiting thread pools "
                     "(llama.cpp's) lose most under contention, so these ratios are not valid for acceptance; "
                     "rerun on a quiet machine (`--max-load`).")
        lines.append("")
    if acceptance:
        lines.append("Issue 4 acceptance (F32, this run)" + (" — NOT VALID, contended run:" if contended else ":"))
        for k, v in acceptance.items():
            lines.append(f"- {k}: {'PASS' if v else 'FAIL'}")
        lines.append("")
    if quant_vs:
        lines.append("Quantized decode, llmc ÷ llama.cpp at the same weight width:")
        for k, v in quant_vs.items():
            lines.append(f"- {k}: {fmt(v, 2)}×")
        lines.append("")
    if vs_f32:
        lines.append("Quantized decode against llmc's own artifacts (issue 9):")
        for k, v in vs_f32.items():
            lines.append(f"- {k}: {fmt(v, 2)}×")
        lines.append("")
    lines.append("The ratio columns compare every row with llmc's **f32** artifact. llmc's quantized artifacts are "
                 "round-to-nearest (`--quant`): int8/int4 are weight-only, w8a8/w4a8 also quantize activations per token.")
    table = "\n".join(lines)
    print(table)

    result = {"started_utc": started.isoformat(), "checkpoint": str(ckpt), "threads": a.threads,
              "prompt_len": a.prompt_len, "gen": a.gen, "rounds": a.rounds, "reps": a.reps,
              "cpu": cpu_model(), "logical_cpus": os.cpu_count(), "load_before": load_before,
              "load_after": load_after, "load_per_round": per_round_load, "llmc_compile": comp, "quant_vs_llama_cpp": quant_vs, "quant_vs_llmc": vs_f32,
              "llama_cpp": lc_info, "contended": contended, "peak_load_1min": peak_load, "engines": summary, "unavailable": unavailable, "acceptance": acceptance}
    if not a.no_write:
        out = Path(a.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = started.strftime("%Y-%m-%d-%H%M")
        (out / f"{stem}.md").write_text(table + "\n")
        (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {out / (stem + '.md')} and .json")


def torch_main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--prompt-len", type=int, required=True)
    ap.add_argument("--gen", type=int, required=True)
    ap.add_argument("--reps", type=int, required=True)
    torch_worker(ap.parse_args(sys.argv[2:]))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_torch":
        torch_main()
    else:
        main()
