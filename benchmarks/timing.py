"""Timing, the two measured ceilings (copy bandwidth, matrix-product rate) and peak memory.

CUDA: ``triton.testing.do_bench`` (its warm-up excluded, L2 flushed before each call, CUDA events),
median with the 20th/80th percentiles. CPU: a repeated ``time.perf_counter`` median after warm-up calls
(no cache flush: small CPU shapes can run from cache, and then beat the DRAM copy bandwidth).

``python -m benchmarks.timing [cpu|cuda]`` prints both ceilings.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


def quantile(xs, q):
    """The q-quantile of ``xs`` by linear interpolation."""
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def measure(fn, device: torch.device, warmup_ms: float = 25, rep_ms: float = 100,
            min_reps: int = 5, max_reps: int = 10000) -> dict:
    """{'ms': median, 'p20': …, 'p80': …} of ``fn()`` on ``device``; warm-up calls are not counted."""
    if device.type == "cuda":
        from triton.testing import do_bench
        med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return {"ms": med, "p20": p20, "p80": p80}
    start = time.perf_counter()
    fn()
    while (time.perf_counter() - start) * 1e3 < warmup_ms:
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or ((time.perf_counter() - start) * 1e3 < rep_ms and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "p20": quantile(times, 0.2), "p80": quantile(times, 0.8)}


def measure_interleaved(fns, warmup_ms: float = 10, rep_ms: float = 100, min_reps: int = 5,
                        max_reps: int = 10000) -> list:
    """CPU: like :func:`measure` for several callables at once, timed call by call in turn (round robin),
    so a machine that gets busier or quieter during the run affects every one alike. ``rep_ms`` is the
    budget per callable."""
    for fn in fns:
        fn()
    start = time.perf_counter()
    while (time.perf_counter() - start) * 1e3 < warmup_ms * len(fns):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < min_reps or ((time.perf_counter() - start) * 1e3 < rep_ms * len(fns)
                                       and len(times[0]) < max_reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append((time.perf_counter() - t0) * 1e3)
    return [{"ms": statistics.median(ts), "p20": quantile(ts, 0.2), "p80": quantile(ts, 0.8)} for ts in times]


def copy_bandwidth(device: torch.device, nbytes: int = 0, **kw) -> dict:
    """A device-to-device ``copy_`` of a large buffer; bytes moved = 2 × size (read + write)."""
    if not nbytes:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            nbytes = min(2 << 30, free // 4)
        else:
            nbytes = 128 << 20
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, **kw)
    return {"copy_GBps": 2 * n * 4 / (t["ms"] * 1e6), "copy_MiB": n * 4 / 2 ** 20, "copy_ms": t["ms"]}


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 0, **kw) -> float:
    """TFLOP/s of an n×n×n matrix product in ``dtype`` (random data, never zeros)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = measure(lambda: a @ b, device, **kw)
    return 2 * n ** 3 / (t["ms"] * 1e9)


def peak_extra_mib(fn, device: torch.device):
    """Peak CUDA memory allocated during one ``fn()`` above what was allocated before it (None on CPU)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    sync(device)
    del out
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    device = torch.device(argv[0] if argv else ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    bw = copy_bandwidth(device)
    print(f"device: {name}")
    print(f"copy bandwidth: {bw['copy_GBps']:.1f} GB/s (copy_ of {bw['copy_MiB']:.0f} MiB, "
          f"{bw['copy_ms']:.3f} ms, bytes = 2 x size)")
    for dtype in (torch.bfloat16, torch.float32):
        print(f"matmul {str(dtype).replace('torch.', '')}: {matmul_tflops(device, dtype):.1f} TFLOP/s")


if __name__ == "__main__":
    main()
