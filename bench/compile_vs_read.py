#!/usr/bin/env python3
"""Compile time vs cold checkpoint read (issue 4: "compiling the benchmark model takes <= 2x the
time to read its checkpoint from disk").

Each round, from the same cold state (the checkpoint's pages evicted from the page cache with
posix_fadvise(POSIX_FADV_DONTNEED), checked with `fincore`; the old artifact deleted):

  read:    read every checkpoint file sequentially in 16 MiB blocks (what any loader must do);
  compile: `llmc compile CKPT -o ART` (wall time: parse, optimize, codegen, weight conversion,
           writing the artifact; the artifact's write-back to disk is included through an fsync),
           and its CPU time (user + sys, which a loaded machine inflates less than wall time).

Only this script's own files are evicted (not `drop_caches`, which would slow every other process
on a shared machine). Rounds alternate read and compile; the ratio of medians is the claim.

    python3 bench/compile_vs_read.py [--checkpoint /tmp/bench125m] [--llmc target/release/llmc]
                                     [--rounds 3] [--out /tmp/llmc-compare/cvr.llmc] [--json FILE]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

BLOCK = 16 << 20


def files_of(ckpt):
    if os.path.isfile(ckpt):
        return [ckpt]
    return sorted(os.path.join(ckpt, f) for f in os.listdir(ckpt) if os.path.isfile(os.path.join(ckpt, f)))


def evict(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_fraction(path):
    """Fraction of `path`'s bytes in the page cache (util-linux `fincore`; NaN without it)."""
    size = os.path.getsize(path)
    try:
        r = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path], capture_output=True, text=True)
        return int(r.stdout.split()[0]) / max(size, 1)
    except (OSError, ValueError, IndexError):
        return float("nan")


def cold(paths):
    for p in paths:
        evict(p)
    return max(resident_fraction(p) for p in paths)


def read_all(paths):
    t = time.perf_counter()
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while True:
                b = f.read(BLOCK)
                if not b:
                    break
                total += len(b)
    return time.perf_counter() - t, total


def compile_once(llmc, ckpt, out):
    """Wall seconds of `llmc compile` (+ fsync of the artifact) and its CPU seconds (user + sys)."""
    if os.path.exists(out):
        os.remove(out)
    t = time.perf_counter()
    proc = subprocess.Popen([llmc, "compile", ckpt, "-o", out], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(proc.pid, 0)
    stdout, stderr = proc.stdout.read().decode(), proc.stderr.read().decode()
    proc.stdout.close()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"llmc compile failed:\n{stdout}\n{stderr}")
    fd = os.open(out, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t, ru.ru_utime + ru.ru_stime


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="/tmp/bench125m")
    ap.add_argument("--llmc", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "llmc"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="/tmp/llmc-compare/cvr.llmc")
    ap.add_argument("--json", default=None, help="also write the measurements here")
    args = ap.parse_args()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    paths = files_of(args.checkpoint)
    size = sum(os.path.getsize(p) for p in paths)
    reads, compiles, cpus, resid = [], [], [], []
    load = [os.getloadavg()]
    for i in range(args.rounds):
        resid.append(cold(paths))
        dt, n = read_all(paths)
        reads.append(dt)
        resid.append(cold(paths))
        wall, cpu = compile_once(args.llmc, args.checkpoint, args.out)
        compiles.append(wall)
        cpus.append(cpu)
        load.append(os.getloadavg())
        print(f"round {i + 1}: cold read {dt:.3f} s ({n / dt / 1e6:.0f} MB/s), compile {wall:.3f} s "
              f"({cpu:.2f} CPU s), load {load[-1][0]:.2f}", flush=True)
    r, c = statistics.median(reads), statistics.median(compiles)
    ok = c <= 2 * r
    print(f"checkpoint {size / 2**20:.0f} MiB; resident after eviction <= {max(resid):.1%}")
    print(f"median cold read {r:.3f} s, median compile {c:.3f} s ({statistics.median(cpus):.2f} CPU s): "
          f"compile / read = {c / r:.2f} ({'PASS' if ok else 'FAIL'}: criterion <= 2.0)")
    if max(l[0] for l in load) > (os.cpu_count() or 1) + 1:
        print(f"warning: load average above {(os.cpu_count() or 1) + 1}: other processes competed for the CPUs "
              "and the disk; the ratio is not valid evidence, rerun on a quiet machine")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint_bytes": size, "read_s": reads, "compile_s": compiles, "compile_cpu_s": cpus, "resident_after_evict": resid,
                       "load": load, "ratio": c / r, "pass": ok}, f, indent=1)


if __name__ == "__main__":
    main()
