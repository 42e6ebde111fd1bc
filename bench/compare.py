#!/usr/bin/env python3
"""CPU speed comparison of llmc with llama.cpp (and, for one checkpoint, PyTorch eager) at the same
thread count (issues 4 and 15). Not part of CI; see bench/README.md.

Two modes.

MODEL MATRIX (the default; issue 15 item 8):

    python3 bench/compare.py --skip-torch                              # every model and format, 3 x 3
    python3 bench/compare.py --models 125m,smollm2-135m --formats float,int8 --rounds 1 --reps 1 --no-write

  Models, random-weight checkpoints of real shapes from scripts/gen_shape_checkpoint.py (generated
  into WORK/ckpt when missing, with a byte-level BPE tokenizer.json beside them, the bundled
  seedlm's unless --tokenizer says otherwise): `125m` f32, `smollm2-135m` f32, `smollm2-1.7b` bf16 in
  3 shards, `llama3.2-1b` bf16 (--models selects). Formats (--formats), each a pair of an llmc
  artifact and a llama.cpp GGUF of the same weight width:
      float  `llmc compile --weights-dtype keep` (bf16 stays bf16, f32 stays f32)  vs  GGUF BF16 / F32
      int8   `llmc compile --quant int8`                                         vs  Q8_0
      w4a8   `llmc compile --quant w4a8:g32` (int4 groups of 32, int8 activations) vs  Q4_0
  The float GGUF is written by scripts/hf_to_gguf.py (llama.cpp's converter minus torch: the same
  metadata, tensors and Q/K permutation, with llama.cpp's own gguf-py), Q8_0 and Q4_0 by
  llama.cpp's llama-quantize from it.
  Measurements per pair, in interleaved rounds (every round runs each engine of each pair once,
  alternating llmc and llama.cpp, llama.cpp first in even rounds):
      prefill   --prompt-len (512) tokens from an empty cache: llmc `bench --prompt-len 512 --gen 64`,
                llama.cpp `llama-bench -p 512 -n 64` (its pp512 test). llama.cpp runs every test with
                flash attention off and on (`-fa 0,1`) and the faster of the two counts (recorded per
                cell as llama_cpp_flash_attn)
      decode    --gen (64) greedy tokens: llmc's follow the 512-token prompt (same run), llama.cpp's
                tg64 starts from an empty context (llama.cpp reads 512 fewer KV rows per step)
      decode at depth --depth (2048): `llmc bench` has no depth option, so llmc runs
                `--prompt-len 2048 --gen 64` and its decode rate is the one measured: 64 steps at
                contexts 2048..2111 after a 2048-token prefill (untimed for this figure; recorded as
                prefill_depth). llama.cpp: `llama-bench -d 2048 -n 64 -p 0` (tg64 @ d2048, the same
                contexts; its depth prefill is done once per invocation and cached)
  Ratios llmc / llama.cpp of the medians over all repetitions of all rounds, the artifact bytes /
  GGUF bytes, once per run the machine's read bandwidth (target/release/bw_probe) and, once per
  llmc artifact after the rounds, `llmc bench --roofline`'s fraction of the decode roofline. Writes
  bench/results/<YYYY-MM-DD-HHMM>-matrix.md and .json (every repetition's rate) unless --no-write.

ONE CHECKPOINT (--checkpoint DIR, the issue 4 comparison):

    python3 bench/compare.py --checkpoint /tmp/bench125m --threads 2 --rounds 3 --reps 3

  Generates the checkpoint with scripts/gen_bench_model.py if missing, compiles it (f32 and every
  --llmc-quant format), converts it to GGUF F32 (scripts/hf_to_gguf.py) and Q8_0/Q4_0, and times
  llmc, PyTorch eager (transformers, fp32, in a subprocess; --skip-torch) and llama-bench per GGUF
  in interleaved rounds; prefill of --prompt-len (128) tokens and decode of --gen (64). Writes
  bench/results/<YYYY-MM-DD-HHMM>.md and .json.

llama.cpp (both modes, unless --skip-llama-cpp): `pip download llama-cpp-python==0.3.36` (the sdist
vendors llama.cpp, gguf-py and the quantizer), built with clang-19 (else clang; GCC 12 miscompiles
the AMX tile-config intrinsic) and -DGGML_NATIVE=ON: llama-bench, llama-quantize and
llama-perplexity, in WORK/llama.cpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin. Everything is
cached in --work-dir; if a step fails, llama.cpp is reported unavailable with the reason.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import platform
import re
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
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_TARGETS = ("llama-bench", "llama-quantize", "llama-perplexity")

# The matrix's models: scripts/gen_shape_checkpoint.py shapes, dtype and shard count.
MODELS = {
    "125m": dict(shape="125m", dtype="f32", shards=1),
    "smollm2-135m": dict(shape="smollm2-135m", dtype="f32", shards=1),
    "smollm2-1.7b": dict(shape="smollm2-1.7b", dtype="bf16", shards=3),
    "llama3.2-1b": dict(shape="llama3.2-1b", dtype="bf16", shards=1),
}
# The matrix's formats: llmc compile flags and the llama.cpp GGUF type of the same width
# ("float": the checkpoint's own dtype, f32 or bf16).
FORMATS = {
    "float": dict(llmc=["--weights-dtype", "keep"], gguf="float"),
    "int8": dict(llmc=["--quant", "int8"], gguf="q8_0"),
    "w4a8": dict(llmc=["--quant", "w4a8:g32"], gguf="q4_0"),
}
DEFAULT_TOKENIZERS = [REPO.parent / "shared" / "models" / "seedlm" / "tokenizer.json",
                      REPO / "shared" / "models" / "seedlm" / "tokenizer.json"]


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


def cpu_info() -> dict:
    """The CPU as /proc/cpuinfo names it. These VMs' model name is only "AMD EPYC" (or "Intel(R)
    Xeon(R) Processor"), so the family/model/stepping numbers and the SIMD flags are kept too."""
    info: dict = {"model_name": cpu_model(), "logical_cpus": os.cpu_count()}
    try:
        text = open("/proc/cpuinfo").read().split("\n\n")[0]
    except OSError:
        return info
    fields = {}
    for line in text.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            fields[k.strip()] = v.strip()
    for k in ("vendor_id", "cpu family", "model", "stepping", "microcode"):
        if k in fields:
            info[k.replace(" ", "_")] = fields[k]
    flags = fields.get("flags", "").split()
    info["simd_flags"] = sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx_vnni", "avx2", "fma", "f16c"))
    fam = info.get("cpu_family")
    if info.get("vendor_id") == "AuthenticAMD" and fam:
        info["family_name"] = {"25": "Zen 3/Zen 4 (family 19h)", "26": "Zen 5 (family 1Ah)"}.get(fam, f"family {fam}")
    return info


def cpu_line(c: dict) -> str:
    amx = [f for f in c.get("simd_flags", []) if f.startswith("amx")]
    return (f"{c.get('model_name')} ({c.get('vendor_id', '?')} family {c.get('cpu_family', '?')} model "
            f"{c.get('model', '?')} stepping {c.get('stepping', '?')}"
            + (f", {c['family_name']}" if c.get("family_name") else "") + f"), {c.get('logical_cpus')} logical CPUs; "
            f"AVX-512: {' '.join(f for f in c.get('simd_flags', []) if f.startswith('avx512')) or 'none'}; "
            f"AMX: {' '.join(amx) or 'none'}")


def repo_state() -> dict:
    """The commit llmc was built from (as far as the work tree says; read-only git calls)."""
    out = {}
    try:
        out["commit"] = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        out["dirty"] = bool(dirty)
    except OSError:
        pass
    return out


# ----------------------------------------------------------------------------------------- llmc

def ensure_checkpoint(ckpt: Path) -> None:
    if (ckpt / "config.json").is_file() and list(ckpt.glob("*.safetensors")):
        return
    # gen_bench_model.py needs torch; without it, gen_shape_checkpoint.py writes the same shape (125m,
    # f32, no tokenizer) with numpy (other random values: speed is what is measured).
    try:
        import torch  # noqa: F401
        cmd, what = [sys.executable, REPO / "scripts" / "gen_bench_model.py", ckpt], "gen_bench_model.py"
    except ImportError:
        cmd = [sys.executable, REPO / "scripts" / "gen_shape_checkpoint.py", "--shape", "125m", "--dtype", "f32", "-o", ckpt]
        what = "gen_shape_checkpoint.py --shape 125m (no torch for gen_bench_model.py)"
    log(f"{ckpt} missing: generating it with {what}")
    try:
        run(cmd, what=what)
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

def llama_cpp_tools(a, work: Path) -> tuple[Path, dict[str, Path], dict]:
    """Returns (llama.cpp source tree, {tool name: binary}, info), building what is missing.
    Raises Unavailable."""
    lc_work = work / "llama.cpp"
    lc_work.mkdir(parents=True, exist_ok=True)
    info: dict = {}
    if a.llama_cpp_src:
        src = Path(a.llama_cpp_src)
    else:
        want = f"llama_cpp_python-{a.llama_cpp_python_version}.tar.gz"
        sdist = lc_work / want
        if not sdist.is_file():
            # Its build backend (scikit-build-core) must be importable for pip to read the metadata.
            try:
                import scikit_build_core  # noqa: F401
            except ImportError:
                run([sys.executable, "-m", "pip", "install", "-q", "scikit-build-core"],
                    what="pip install scikit-build-core")
            run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 "--no-build-isolation", f"llama-cpp-python=={a.llama_cpp_python_version}", "-d", lc_work],
                what="pip download llama-cpp-python")
            if not sdist.is_file():
                raise Unavailable(f"pip download produced no {want}")
        info["sdist"] = sdist.name
        root = lc_work / sdist.name[: -len(".tar.gz")]
        if not root.is_dir():
            log(f"extracting {sdist.name}")
            with tarfile.open(sdist) as t:
                t.extractall(lc_work)
        src = root / "vendor" / "llama.cpp"
    if not (src / "gguf-py" / "gguf").is_dir():
        raise Unavailable(f"{src} has no gguf-py (not a llama.cpp source tree)")
    info["src"] = str(src)

    build = src / "build"
    bins = {t: build / "bin" / t for t in LLAMA_CPP_TARGETS}
    cc = next((c for c in ("clang-19", "clang") if shutil.which(c)), None)
    if not all(p.is_file() for p in bins.values()):
        if cc is None or shutil.which(cc.replace("clang", "clang++")) is None or shutil.which("cmake") is None:
            raise Unavailable("clang-19 (or clang) and cmake are needed: apt-get install -y clang-19 cmake libomp-19-dev")
        run(["cmake", "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_C_COMPILER={cc}",
             f"-DCMAKE_CXX_COMPILER={cc.replace('clang', 'clang++')}", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
             "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"], what="cmake configure")
        run(["nice", "-n", "10", "cmake", "--build", build, "--target", *LLAMA_CPP_TARGETS,
             "-j", str(a.build_jobs)], what="cmake build")
    cache = build / "CMakeCache.txt"
    if cache.is_file():
        text = cache.read_text(errors="replace")
        for key in ("CMAKE_C_COMPILER", "GGML_NATIVE", "GGML_OPENMP"):
            m = re.search(rf"^{key}:\w+=(.*)$", text, re.M)
            if m:
                info[key] = m.group(1)
    return src, bins, info


def make_float_gguf(src: Path, ckpt: Path, out: Path, outtype: str) -> Path:
    """GGUF of the checkpoint in `outtype` (f32/bf16/f16), cached by file name."""
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        run([sys.executable, REPO / "scripts" / "hf_to_gguf.py", src, ckpt, "--outtype", outtype, "--outfile", out],
            what="scripts/hf_to_gguf.py")
    return out


def make_quant_gguf(quant_bin: Path, float_gguf: Path, out: Path, qtype: str, threads: int) -> Path:
    if not out.is_file():
        tmp = out.with_suffix(".gguf.part")
        run([quant_bin, float_gguf, tmp, qtype.upper(), str(threads)], what=f"llama-quantize {qtype}")
        tmp.rename(out)
    return out


def setup_llama_cpp(a, work: Path) -> tuple[Path, dict[str, Path], dict]:
    """One-checkpoint mode: returns (llama-bench binary, {gguf type: path}, info). Raises Unavailable."""
    src, bins, info = llama_cpp_tools(a, work)
    lc_work = work / "llama.cpp"
    ggufs: dict[str, Path] = {}
    name = Path(a.checkpoint).resolve().name
    f32 = make_float_gguf(src, Path(a.checkpoint), lc_work / f"{name}-f32.gguf", "f32")
    ggufs["f32"] = f32
    for q in GGUF_TYPES[1:]:
        if q not in a.gguf_types:
            continue
        try:
            ggufs[q] = make_quant_gguf(bins["llama-quantize"], f32, lc_work / f"{name}-{q}.gguf", q, a.threads)
        except Unavailable as e:
            info[f"{q}_error"] = str(e)
    return bins["llama-bench"], {k: v for k, v in ggufs.items() if k in a.gguf_types}, info


def llama_bench_rows(bench_bin: Path, gguf: Path, args: list, threads: int, reps: int) -> list[dict]:
    out = run([bench_bin, "-m", gguf, *args, "-t", threads, "-r", reps, "-o", "json"],
              what=f"llama-bench {gguf.name}")
    return json.loads(out)


def fastest(rows: list[dict], pred) -> list[dict]:
    """The row matching `pred` with the highest median rate, as a one-element list (llama-bench
    prints one row per setting of a swept option, here flash attention off and on: llama.cpp is
    timed in its faster configuration for each test; at depth 2048 on a Sapphire Rapids VM its
    default picked the flash-attention path, 2.7x slower than without)."""
    cand = [r for r in rows if pred(r)]
    return [max(cand, key=lambda r: median(r["samples_ts"]))] if cand else []


def bench_llama_cpp(bench_bin: Path, gguf: Path, a) -> dict:
    rows = llama_bench_rows(bench_bin, gguf, ["-p", a.prompt_len, "-n", a.gen], a.threads, a.reps)
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


def single_main(a, ap) -> None:
    """The one-checkpoint comparison (--checkpoint): llmc f32 and its quantized artifacts, torch
    eager, llama.cpp F32/Q8_0/Q4_0."""
    a.prompt_len = a.prompt_len or 128
    a.gguf_types = [t.strip().lower() for t in a.gguf_types.split(",") if t.strip()]
    for t in a.gguf_types:
        if t not in GGUF_TYPES:
            ap.error(f"--gguf-types: unknown type {t!r} (expected some of {','.join(GGUF_TYPES)})")
    if a.prompt_len < 1:
        ap.error("--prompt-len must be at least 1")

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
    lines.append(f"- CPU: {cpu_line(cpu_info())}")
    lines.append(f"- load average (1/5/15 min): before {load_before}, after {load_after}; per round {per_round_load} "
                 f"— the machine is shared: ratios, not absolute rates, are the claim")
    lines.append(f"- llmc compile: {comp.get('seconds', 0):.2f} s; llmc peak RSS "
                 f"{(extra.get('llmc f32', {}).get('peak_rss_bytes') or 0) / 2**20:.0f} MiB")
    if lc_info:
        lines.append(f"- llama.cpp: {lc_info.get('sdist', lc_info.get('src'))} vendored source, "
                     f"{lc_info.get('CMAKE_C_COMPILER', 'clang')}, GGML_NATIVE={lc_info.get('GGML_NATIVE', 'ON')}, "
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
              "cpu": cpu_model(), "cpu_info": cpu_info(), "logical_cpus": os.cpu_count(), "load_before": load_before,
              "load_after": load_after, "load_per_round": per_round_load, "llmc_compile": comp, "quant_vs_llama_cpp": quant_vs, "quant_vs_llmc": vs_f32,
              "llama_cpp": lc_info, "contended": contended, "peak_load_1min": peak_load, "engines": summary, "unavailable": unavailable, "acceptance": acceptance}
    if not a.no_write:
        out = Path(a.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = started.strftime("%Y-%m-%d-%H%M")
        (out / f"{stem}.md").write_text(table + "\n")
        (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {out / (stem + '.md')} and .json")


# ------------------------------------------------------------------------------------ the matrix

def llmc_help(llmc: Path, sub: str) -> str:
    p = subprocess.run([llmc, sub, "--help"], capture_output=True, text=True)
    return p.stdout + p.stderr


def ensure_shape_checkpoint(model: str, ckpt: Path, tokenizer: Path | None) -> None:
    spec = MODELS[model]
    if (ckpt / "config.json").is_file() and list(ckpt.glob("*.safetensors")):
        return
    cmd = [sys.executable, REPO / "scripts" / "gen_shape_checkpoint.py", "--shape", spec["shape"],
           "--dtype", spec["dtype"], "--shards", spec["shards"], "-o", ckpt]
    if tokenizer is not None:
        cmd += ["--tokenizer", tokenizer]
    log(f"{ckpt} missing: generating it")
    try:
        run(cmd, what="gen_shape_checkpoint.py")
    except Unavailable as e:
        sys.exit(f"error: cannot generate the {model} checkpoint {ckpt}: {e}")


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def bench_llmc_matrix(llmc: Path, artifact: Path, prompt_len: int, gen: int, reps: int, threads: int,
                      roofline: bool = False) -> dict:
    cmd = [llmc, "bench", artifact, "--prompt-len", prompt_len, "--gen", gen, "--reps", reps,
           "--threads", threads, "--json", "-q"]
    if roofline:
        cmd.append("--roofline")
    out = run(cmd, what="llmc bench")
    return json.loads(out.strip().splitlines()[-1])


def bw_probe(a) -> dict:
    """The machine's read bandwidth, once per run (bench/bw_probe, the loop `--roofline` runs)."""
    exe = Path(a.bw_probe)
    if not exe.is_file():
        raise Unavailable(f"{exe} not found (cargo build --release -p llmc-bw-probe)")
    out = run([exe, str(a.threads)], what="bw_probe")
    return json.loads(out.strip().splitlines()[-1])


def matrix_main(a, ap) -> None:
    a.prompt_len = a.prompt_len or 512
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    for m in models:
        if m not in MODELS:
            ap.error(f"--models: unknown model {m!r} (expected some of {','.join(MODELS)})")
    for f in formats:
        if f not in FORMATS:
            ap.error(f"--formats: unknown format {f!r} (expected some of {','.join(FORMATS)})")
    if not models or not formats:
        ap.error("--models and --formats must name at least one each")
    if a.prompt_len < 1 or a.depth < 1:
        ap.error("--prompt-len and --depth must be at least 1")
    llmc = Path(a.llmc)
    if not llmc.is_file():
        sys.exit(f"error: llmc binary {llmc} not found (cargo build --release -p llmc)")
    tokenizer = Path(a.tokenizer) if a.tokenizer else next((p for p in DEFAULT_TOKENIZERS if p.is_file()), None)
    if tokenizer is not None and not tokenizer.is_file():
        sys.exit(f"error: --tokenizer {tokenizer} not found")
    work = Path(a.work_dir)
    for d in ("ckpt", "artifacts", "gguf"):
        (work / d).mkdir(parents=True, exist_ok=True)
    cpu = cpu_info()
    started = dt.datetime.now(dt.timezone.utc)
    t_start = time.monotonic()
    # What llmc's bench can do: a decode-at-depth option would be used if it had one.
    bench_help = llmc_help(llmc, "bench")
    depth_how = (f"`llmc bench --prompt-len {a.depth} --gen {a.gen}` (llmc bench has no depth option): the decode rate "
                 f"of {a.gen} steps at contexts {a.depth}..{a.depth + a.gen - 1}, after a {a.depth}-token prefill")
    if "--depth" in bench_help:
        log("note: `llmc bench` now has a --depth option; this script still measures depth with --prompt-len")

    # ---- llama.cpp tools
    lc_src, lc_bins, lc_info = None, {}, {}
    unavailable: dict[str, str] = {}
    if a.skip_llama_cpp:
        unavailable["llama.cpp"] = "skipped (--skip-llama-cpp)"
    else:
        try:
            lc_src, lc_bins, lc_info = llama_cpp_tools(a, work)
        except Unavailable as e:
            unavailable["llama.cpp"] = str(e)
            log(f"llama.cpp unavailable: {e}")

    # ---- checkpoints, artifacts, GGUFs
    cells: dict[str, dict] = {}  # "model/format" -> everything about that pair
    for m in models:
        spec = MODELS[m]
        ckpt = work / "ckpt" / (f"{m}-{spec['dtype']}" + (f"-{spec['shards']}shards" if spec["shards"] > 1 else ""))
        ensure_shape_checkpoint(m, ckpt, tokenizer)
        float_gguf = None
        if lc_src is not None:
            gtype = "bf16" if spec["dtype"] == "bf16" else "f16" if spec["dtype"] == "f16" else "f32"
            try:
                float_gguf = make_float_gguf(lc_src, ckpt, work / "gguf" / f"{ckpt.name}-{gtype}.gguf", gtype)
            except Unavailable as e:
                unavailable[f"{m} GGUF"] = str(e)
        for f in formats:
            key = f"{m}/{f}"
            fm = FORMATS[f]
            c: dict = {"model": m, "format": f, "checkpoint": str(ckpt), "checkpoint_dtype": spec["dtype"],
                       "checkpoint_bytes": dir_bytes(ckpt), "llmc_flags": fm["llmc"],
                       "llmc": {"prefill": [], "decode": [], "decode_depth": [], "prefill_depth": []},
                       "llama.cpp": {"prefill": [], "decode": [], "decode_depth": []}, "errors": {}}
            art = work / "artifacts" / f"{ckpt.name}.{f}.llmc"
            try:
                out = run([llmc, "compile", ckpt, "-o", art, *fm["llmc"], "--json", "-q"],
                          what=f"llmc compile {' '.join(fm['llmc'])}")
                c["llmc_compile"] = json.loads(out.strip().splitlines()[-1])
                c["artifact"], c["artifact_bytes"] = str(art), art.stat().st_size
                log(f"compiled {art.name} in {c['llmc_compile'].get('seconds', 0):.1f} s, {c['artifact_bytes'] / 2**20:.0f} MiB")
            except (Unavailable, json.JSONDecodeError) as e:
                c["errors"]["llmc"] = f"compile: {e}"
            if float_gguf is not None:
                gt = fm["gguf"]
                try:
                    g = float_gguf if gt == "float" else make_quant_gguf(
                        lc_bins["llama-quantize"], float_gguf, work / "gguf" / f"{ckpt.name}-{gt}.gguf", gt, a.threads)
                    c["gguf"], c["gguf_bytes"] = str(g), g.stat().st_size
                    c["gguf_type"] = g.stem.rsplit("-", 1)[-1]
                except Unavailable as e:
                    c["errors"]["llama.cpp"] = f"quantize: {e}"
            elif "llama.cpp" not in c["errors"]:
                c["errors"]["llama.cpp"] = unavailable.get("llama.cpp") or unavailable.get(f"{m} GGUF", "no GGUF")
            cells[key] = c

    # ---- bandwidth, once per run
    try:
        bw = bw_probe(a)
        log(f"bw_probe: {bw.get('read_bytes_per_s', 0) / 1e9:.1f} GB/s")
    except (Unavailable, json.JSONDecodeError) as e:
        bw = {"error": str(e)}
        log(f"bw_probe unavailable: {e}")

    # ---- interleaved rounds
    load_before = loadavg()
    per_round_load, round_seconds = [], []
    for rnd in range(a.rounds):
        if a.max_load is not None:
            waited = 0.0
            while os.getloadavg()[0] > a.max_load and waited < a.max_load_wait:
                if waited == 0:
                    log(f"waiting for the 1-minute load average {loadavg()[0]} to fall to {a.max_load}")
                time.sleep(10)
                waited += 10
        per_round_load.append(loadavg())
        t0 = time.monotonic()
        log(f"round {rnd + 1}/{a.rounds} (load {per_round_load[-1]})")
        for key, c in cells.items():
            def llmc_main(c=c):
                j = bench_llmc_matrix(llmc, Path(c["artifact"]), a.prompt_len, a.gen, a.reps, a.threads)
                c["llmc"]["prefill"] += j["prefill_tokens_per_s_runs"]
                c["llmc"]["decode"] += j["decode_tokens_per_s_runs"]
                c["llmc_peak_rss_bytes"] = max(c.get("llmc_peak_rss_bytes") or 0, j.get("peak_rss_bytes") or 0)
                return f"prefill {fmt(median(j['prefill_tokens_per_s_runs']))}, decode {fmt(median(j['decode_tokens_per_s_runs']))}"

            def llmc_depth(c=c):
                j = bench_llmc_matrix(llmc, Path(c["artifact"]), a.depth, a.gen, a.reps, a.threads)
                c["llmc"]["decode_depth"] += j["decode_tokens_per_s_runs"]
                c["llmc"]["prefill_depth"] += j["prefill_tokens_per_s_runs"]
                return f"decode@{a.depth} {fmt(median(j['decode_tokens_per_s_runs']))}"

            def lc_main(c=c):
                rows = llama_bench_rows(lc_bins["llama-bench"], Path(c["gguf"]),
                                        ["-p", a.prompt_len, "-n", a.gen, "-fa", "0,1"], a.threads, a.reps)
                pre = fastest(rows, lambda r: r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0)
                dec = fastest(rows, lambda r: r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0)
                if not pre or not dec:
                    raise Unavailable(f"llama-bench printed no pp/tg rows: {rows}")
                c["llama.cpp"]["prefill"] += pre[0]["samples_ts"]
                c["llama.cpp"]["decode"] += dec[0]["samples_ts"]
                c.setdefault("llama_cpp_flash_attn", {}).update(prefill=pre[0].get("flash_attn"), decode=dec[0].get("flash_attn"))
                c["llama_cpp_build"] = {k: rows[0].get(k) for k in ("build_commit", "build_number", "cpu_info", "model_type",
                                                                    "n_batch", "n_ubatch", "type_k", "type_v", "backends")}
                return f"prefill {fmt(median(pre[0]['samples_ts']))}, decode {fmt(median(dec[0]['samples_ts']))}"

            def lc_depth(c=c):
                rows = llama_bench_rows(lc_bins["llama-bench"], Path(c["gguf"]),
                                        ["-d", a.depth, "-n", a.gen, "-p", 0, "-fa", "0,1"], a.threads, a.reps)
                dec = fastest(rows, lambda r: r.get("n_gen", 0) > 0 and r.get("n_depth", 0) == a.depth)
                if not dec:
                    raise Unavailable(f"llama-bench printed no tg@d{a.depth} row: {rows}")
                c["llama.cpp"]["decode_depth"] += dec[0]["samples_ts"]
                c.setdefault("llama_cpp_flash_attn", {}).update(decode_depth=dec[0].get("flash_attn"))
                return f"decode@{a.depth} {fmt(median(dec[0]['samples_ts']))}"

            pairs = [(("llmc", llmc_main), ("llama.cpp", lc_main)), (("llmc", llmc_depth), ("llama.cpp", lc_depth))]
            for pair in pairs:
                for engine, job in (pair if rnd % 2 == 0 else pair[::-1]):
                    if engine in c["errors"]:
                        continue
                    try:
                        msg = job()
                        log(f"  {key} {engine}: {msg}")
                    except (Unavailable, json.JSONDecodeError, KeyError, IndexError) as e:
                        c["errors"][engine] = f"round {rnd + 1}, {job.__name__}: {e}"
                        log(f"  {key} {engine} FAILED: {e}")
        round_seconds.append(round(time.monotonic() - t0, 1))
        log(f"round {rnd + 1} took {round_seconds[-1]:.0f} s")
    load_after = loadavg()

    # ---- roofline, once per llmc artifact
    for key, c in cells.items():
        if "llmc" in c["errors"] or "artifact" not in c:
            continue
        try:
            j = bench_llmc_matrix(llmc, Path(c["artifact"]), a.prompt_len, a.gen, 1, a.threads, roofline=True)
            c["llmc_roofline"] = dict(j.get("roofline") or {}, decode_tokens_per_s=j.get("decode_tokens_per_s"),
                                      prompt_tokens=j.get("prompt_tokens"), gen_tokens=j.get("gen_tokens"))
            log(f"  {key} roofline: {100 * (c['llmc_roofline'].get('fraction_of_roofline') or 0):.1f}%")
        except (Unavailable, json.JSONDecodeError) as e:
            c["llmc_roofline"] = {"error": str(e)}

    # ---- summary
    for c in cells.values():
        for eng in ("llmc", "llama.cpp"):
            c[eng + "_median"] = {k: median(v) for k, v in c[eng].items()}
        lm, cm = c["llmc_median"], c["llama.cpp_median"]
        c["ratio_llmc_over_llama_cpp"] = {k: ratio(lm.get(k), cm.get(k)) for k in ("prefill", "decode", "decode_depth")}
        c["bytes_ratio_artifact_over_gguf"] = ratio(c.get("artifact_bytes"), c.get("gguf_bytes"))
    peak_load = max([l[0] for l in per_round_load] + [load_after[0]])
    contended = peak_load > a.threads + 1
    total_s = round(time.monotonic() - t_start, 1)

    # ---- table
    L = []
    L.append(f"# llmc vs llama.cpp, model matrix — {started.strftime('%Y-%m-%d %H:%M UTC')}")
    L.append("")
    L.append(f"- CPU: {cpu_line(cpu)}")
    L.append(f"- **{a.threads} threads** for every engine; {a.rounds} interleaved rounds × {a.reps} timed repetitions "
             f"(llmc and llama.cpp alternating, llama.cpp first in even rounds); medians over all repetitions")
    L.append(f"- prefill: {a.prompt_len} tokens from an empty cache (llmc `bench --prompt-len {a.prompt_len} --gen {a.gen}`, "
             f"llama.cpp `llama-bench -p {a.prompt_len} -n {a.gen} -fa 0,1` pp{a.prompt_len}, the faster flash-attention setting)")
    L.append(f"- decode: {a.gen} tokens; llmc's follow its {a.prompt_len}-token prompt (same run), llama.cpp's tg{a.gen} "
             f"starts from an empty context")
    L.append(f"- decode@{a.depth}: llmc {depth_how}; llama.cpp `llama-bench -d {a.depth} -n {a.gen} -p 0 -fa 0,1` "
             f"(tg{a.gen} @ d{a.depth}, the same contexts)")
    rs = repo_state()
    L.append(f"- llmc: {llmc} (repo {rs.get('commit', '?')}{', work tree modified' if rs.get('dirty') else ''}); "
             f"float = `--weights-dtype keep`, int8 = `--quant int8`, w4a8 = `--quant w4a8:g32` (round to nearest)")
    if lc_info:
        b = next((c.get("llama_cpp_build") for c in cells.values() if c.get("llama_cpp_build")), {}) or {}
        L.append(f"- llama.cpp: {lc_info.get('sdist', lc_info.get('src'))}, build {b.get('build_commit', '?')}, "
                 f"{Path(lc_info.get('CMAKE_C_COMPILER', 'clang')).name}, GGML_NATIVE={lc_info.get('GGML_NATIVE', '?')}, "
                 f"OpenMP={lc_info.get('GGML_OPENMP', '?')}; float GGUF by scripts/hf_to_gguf.py, Q8_0/Q4_0 by llama-quantize")
    if "error" in bw:
        L.append(f"- read bandwidth (bw_probe): unavailable: {bw['error']}")
    else:
        L.append(f"- read bandwidth (bw_probe, {bw.get('threads')} threads, once before the rounds): "
                 f"{bw.get('read_bytes_per_s', 0) / 1e9:.1f} GB/s (the best of 1-16 streams per thread: {bw.get('best_streams')})")
    L.append(f"- load average (1/5/15 min): before {load_before}, after {load_after}; per round {per_round_load}; "
             f"one round took {round_seconds} s, the whole run {total_s:.0f} s")
    L.append("")
    L.append(f"| model | format | llmc / llama.cpp | prefill tok/s | decode tok/s | decode@{a.depth} tok/s | "
             f"ratio prefill | ratio decode | ratio decode@{a.depth} | bytes (MiB) | bytes ratio | llmc roofline |")
    L.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, c in cells.items():
        lm, cm, r = c["llmc_median"], c["llama.cpp_median"], c["ratio_llmc_over_llama_cpp"]
        roof = (c.get("llmc_roofline") or {}).get("fraction_of_roofline")
        ab, gb = c.get("artifact_bytes"), c.get("gguf_bytes")
        mib = f"{ab / 2**20:.0f} / {gb / 2**20:.0f}" if ab and gb else "—"
        L.append(f"| {c['model']} ({c['checkpoint_dtype']}) | {c['format']} | llmc {c['format']} / "
                 f"{c.get('gguf_type', '—')} | {fmt(lm['prefill'])} / {fmt(cm['prefill'])} | "
                 f"{fmt(lm['decode'])} / {fmt(cm['decode'])} | {fmt(lm['decode_depth'])} / {fmt(cm['decode_depth'])} | "
                 f"{fmt(r['prefill'], 2)}× | {fmt(r['decode'], 2)}× | {fmt(r['decode_depth'], 2)}× | {mib} | "
                 f"{fmt(c['bytes_ratio_artifact_over_gguf'], 2)} | {'—' if roof is None else f'{100 * roof:.0f}%'} |")
    L.append("")
    L.append("Rates are llmc / llama.cpp; ratios are llmc ÷ llama.cpp (above 1: llmc faster; bytes: above 1, llmc's "
             "artifact larger). llmc roofline: its decode rate (one extra `llmc bench --roofline` run after the rounds, "
             f"prompt {a.prompt_len}) as a fraction of read bandwidth ÷ bytes read per decode token.")
    errs = {k: c["errors"] for k, c in cells.items() if c["errors"]}
    if errs or unavailable:
        L.append("")
        L.append("Failures and unavailable engines:")
        for k, v in unavailable.items():
            L.append(f"- {k}: {v}")
        for k, e in errs.items():
            for eng, msg in e.items():
                L.append(f"- {k} {eng}: {msg}")
    if contended:
        L.append("")
        L.append(f"**Warning: contended run.** The 1-minute load average reached {peak_load} with {a.threads} benchmark "
                 "threads: other processes competed for the cores (llama.cpp's spin-waiting pool loses most). "
                 "Rerun on a quiet machine (`--max-load`).")
    table = "\n".join(L)
    print(table)

    result = {"kind": "matrix", "started_utc": started.isoformat(), "threads": a.threads, "prompt_len": a.prompt_len,
              "gen": a.gen, "depth": a.depth, "depth_how_llmc": depth_how,
              "depth_how_llama_cpp": f"llama-bench -d {a.depth} -n {a.gen} -p 0 -fa 0,1", "rounds": a.rounds, "reps": a.reps,
              "cpu": cpu, "llmc": {"binary": str(llmc), **rs}, "llama_cpp": lc_info, "bw_probe": bw,
              "tokenizer": str(tokenizer) if tokenizer else None, "load_before": load_before,
              "load_after": load_after, "load_per_round": per_round_load, "round_seconds": round_seconds,
              "total_seconds": total_s, "contended": contended, "peak_load_1min": peak_load,
              "unavailable": unavailable, "cells": cells}
    if not a.no_write:
        out = Path(a.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = started.strftime("%Y-%m-%d-%H%M") + "-matrix"
        (out / f"{stem}.md").write_text(table + "\n")
        (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {out / (stem + '.md')} and .json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("model matrix (the default)")
    g.add_argument("--models", default=",".join(MODELS), help=f"comma list of {','.join(MODELS)}")
    g.add_argument("--formats", default=",".join(FORMATS), help=f"comma list of {','.join(FORMATS)}")
    g.add_argument("--depth", type=int, default=2048, help="context depth of the third measurement, decode@depth")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer.json written beside generated checkpoints (default: shared/models/seedlm's)")
    g.add_argument("--bw-probe", default=str(REPO / "target" / "release" / "bw_probe"))
    g = ap.add_argument_group("one checkpoint (issue 4)")
    g.add_argument("--checkpoint", default=None,
                   help="HF checkpoint dir: run the one-checkpoint comparison instead of the matrix "
                        "(generated with gen_bench_model.py if missing; /tmp/bench125m was the old default)")
    g.add_argument("--gguf-types", default=",".join(GGUF_TYPES), help="comma list of f32,q8_0,q4_0")
    g.add_argument("--llmc-quant", default="int8,int4,w8a8,w4a8,2:4+int8",
                   help="comma list of `llmc compile --quant` formats also benchmarked (round-to-nearest; "
                        "calibration changes quality, not speed), `2:4+int8` for `--sparsity 2:4 --quant int8`; "
                        "empty for none")
    g.add_argument("--skip-torch", action="store_true", help="(one checkpoint) no PyTorch eager run")
    g = ap.add_argument_group("both")
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--prompt-len", type=int, default=None, help="prefill length (default: 512 matrix, 128 one checkpoint)")
    g.add_argument("--gen", type=int, default=64)
    g.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    g.add_argument("--reps", type=int, default=3, help="timed repetitions per engine per round")
    g.add_argument("--llmc", default=str(REPO / "target" / "release" / "llmc"))
    g.add_argument("--work-dir", default="/tmp/llmc-compare", help="checkpoints, artifacts, llama.cpp build, GGUFs")
    g.add_argument("--llama-cpp-src", default=None, help="existing llama.cpp source tree (skips the sdist download)")
    g.add_argument("--llama-cpp-python-version", default=LLAMA_CPP_PYTHON_VERSION,
                   help="llama-cpp-python sdist whose vendored llama.cpp is built")
    g.add_argument("--build-jobs", type=int, default=2, help="parallel jobs for the llama.cpp build (niced)")
    g.add_argument("--skip-llama-cpp", action="store_true")
    g.add_argument("--max-load", type=float, default=None,
                   help="before each round, wait until the 1-minute load average is at most this")
    g.add_argument("--max-load-wait", type=float, default=600, help="seconds to wait for --max-load per round")
    g.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    g.add_argument("--no-write", action="store_true", help="print the table only")
    a = ap.parse_args()
    if a.threads < 1 or a.rounds < 1 or a.reps < 1 or a.gen < 1:
        ap.error("--threads, --rounds, --reps and --gen must be at least 1")
    if a.checkpoint:
        single_main(a, ap)
    else:
        matrix_main(a, ap)


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
