"""The CPU twin (``backend="cpu"``, csrc/) against the eager PyTorch reference, on CPU.

Issue 4, item 5: N = 1024 rows, C = 1000 classes, float32, forward + backward, 2 threads. For every
preset both providers run in the same process, interleaved repetition by repetition (so a busy machine
slows both alike), after warm-up calls; the reported time is the median, the ratio is reference / cpu.
Each provider's gradient is checked against the other's before timing.

    python -m benchmarks.cpu_twin [--threads 2] [--reps 25] [--out benchmarks/results/cpu]

writes ``cpu_twin.csv`` and ``cpu_twin.md`` to ``--out`` and exits non-zero if plain KD is not at least
``--min-ratio`` (3) times faster than the reference.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import sys
import time

import torch

import kdkernels as kdk
from kdkernels.dispatch import unavailable_reason

N, C = 1024, 1000


def cases(t, y):
    """name → loss(x, backend): every method at its published defaults, plus the common options."""
    return {
        "kd": lambda x, b: kdk.kd_loss(x, t, 4.0, backend=b),
        "kd+ce": lambda x, b: kdk.kd_loss(x, t, 4.0, labels=y, ce_weight=1.0, backend=b),
        "kd+standardize": lambda x, b: kdk.kd_loss(x, t, 2.0, standardize=True, backend=b),
        "dkd": lambda x, b: kdk.dkd_loss(x, t, y, backend=b),
        "aekt": lambda x, b: kdk.aekt_loss(x, t, y, backend=b),
        "dtkd": lambda x, b: kdk.dtkd_loss(x, t, backend=b),
        "ldrld": lambda x, b: kdk.ldrld_loss(x, t, backend=b),
        "topkd": lambda x, b: kdk.topkd_loss(x, t, y, backend=b),
    }


def fwd_bwd(fn, s, backend):
    x = s.clone().requires_grad_()
    t0 = time.perf_counter()
    loss = fn(x, backend)
    grad, = torch.autograd.grad(loss, x)
    return time.perf_counter() - t0, grad


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return platform.processor()
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    simd = "avx2" if "avx2" in flags else "sse2 (no avx2)"
    return f"{name}, {os.cpu_count()} logical CPUs, twin compiled path: {simd}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=25, help="timed repetitions per provider and preset")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu"))
    ap.add_argument("--min-ratio", type=float, default=3.0, help="required reference/cpu ratio for plain KD")
    args = ap.parse_args(argv)

    reason = unavailable_reason("cpu", torch.device("cpu"))
    if reason is not None:
        print(f"backend 'cpu' unavailable: {reason}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(N, C, generator=g) * 3
    t = torch.randn(N, C, generator=g) * 3
    y = torch.randint(0, C, (N,), generator=g)

    rows = []
    for name, fn in cases(t, y).items():
        _, g_ref = fwd_bwd(fn, s, "reference")
        _, g_cpu = fwd_bwd(fn, s, "cpu")
        err = ((g_cpu - g_ref).abs().max() / g_ref.abs().max()).item()
        assert err < 1e-4, f"{name}: cpu gradient differs from the reference by {err:.2e}"
        for _ in range(args.warmup):
            fwd_bwd(fn, s, "reference")
            fwd_bwd(fn, s, "cpu")
        times = {"reference": [], "cpu": []}
        for _ in range(args.reps):  # interleaved: both providers see the same machine state
            for backend in times:
                times[backend].append(fwd_bwd(fn, s, backend)[0])
        ref_ms = statistics.median(times["reference"]) * 1e3
        cpu_ms = statistics.median(times["cpu"]) * 1e3
        ratio = ref_ms / cpu_ms
        rows.append(dict(preset=name, reference_ms=round(ref_ms, 3), cpu_ms=round(cpu_ms, 3),
                         ratio=round(ratio, 2), max_rel_grad_diff=f"{err:.1e}"))
        print(f"{name:<16} reference {ref_ms:8.2f} ms   cpu twin {cpu_ms:7.2f} ms   ratio {ratio:5.2f}x")

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cpu_twin.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# CPU twin vs. eager reference",
        "",
        f"N = {N}, C = {C}, float32, forward + backward (`torch.autograd.grad`), {args.threads} threads, median of "
        f"{args.reps} interleaved repetitions after {args.warmup} warm-up calls. torch {torch.__version__}; "
        f"{cpu_flags()}; {stamp}. Produced by `python -m benchmarks.cpu_twin`.",
        "",
        "| preset | reference (ms) | cpu twin (ms) | speed-up | max rel. grad diff |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['preset']} | {r['reference_ms']:.2f} | {r['cpu_ms']:.2f} | {r['ratio']:.2f}x | "
              f"{r['max_rel_grad_diff']} |" for r in rows]
    with open(os.path.join(args.out, "cpu_twin.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    kd = next(r for r in rows if r["preset"] == "kd")
    if kd["ratio"] < args.min_ratio:
        print(f"plain KD speed-up {kd['ratio']}x is below the required {args.min_ratio}x", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
