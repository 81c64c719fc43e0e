"""Ahead-of-time GPU compile check for Triton kernels, on a machine without a GPU (benchmarks/README.md).

The interpreter accepts programs the GPU compiler rejects (``tl.dot`` tiles with K < 16, unsupported
dtype combinations, too much shared memory...). :func:`aot_compile` compiles each kernel configuration
for real CUDA targets with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` in a
subprocess whose environment has no ``TRITON_INTERPRET`` (with it set at import, ``@triton.jit`` makes
interpreter functions that cannot be compiled).

A job is a dict::

    {"kernel": "package.module:attr",            # a @triton.jit function, importable by path
     "signature": {"x_ptr": "*fp32", "n": "i32"}, # every runtime argument's Triton type
     "constexprs": {"BLOCK": 64},                 # constexpr arguments (JSON values; "tl.float32" -> tl.float32)
     "num_warps": 4, "num_stages": 3,             # optional compile options
     "label": "what to call it in messages"}      # optional

Usage in a test::

    errors = aot_compile(jobs, archs=(80, 90))
    assert not errors, "\\n".join(errors)

Every job is compiled for every arch (one subprocess per arch, run in parallel, so the triton import is
paid once per arch);
each failure is reported as ``"sm_90 <label>: <error>"`` with the compiler's message.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]

#: the largest dynamic shared memory per block (bytes) on each arch (opt-in maximum)
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

_WORKER = r"""
import importlib, json, sys, time, traceback
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def constexpr_value(v):
    if isinstance(v, str) and v.startswith("tl."):
        return getattr(tl, v[3:])
    return v

arch, shared_limit = int(sys.argv[1]), int(sys.argv[2])
with open(sys.argv[3]) as f:
    jobs = json.load(f)
target = GPUTarget("cuda", arch, 32)
results = []
for job in jobs:
    label = job.get("label") or job["kernel"]
    t0 = time.time()
    try:
        module, attr = job["kernel"].split(":")
        fn = getattr(importlib.import_module(module), attr)
        if not hasattr(fn, "arg_names"):
            raise TypeError(f"{job['kernel']} is not a @triton.jit function (got {type(fn).__name__}; "
                            "is TRITON_INTERPRET set?)")
        constexprs = {k: constexpr_value(v) for k, v in job.get("constexprs", {}).items()}
        signature = dict(job["signature"])
        for name in constexprs:
            signature.setdefault(name, "constexpr")
        missing = [a for a in fn.arg_names if a not in signature]
        extra = [a for a in signature if a not in fn.arg_names]
        if missing or extra:
            raise ValueError(f"signature does not match {fn.__name__}{tuple(fn.arg_names)}: "
                             f"missing {missing}, unknown {extra}")
        signature = {a: signature[a] for a in fn.arg_names}
        options = {k: job[k] for k in ("num_warps", "num_stages", "num_ctas") if k in job}
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                target=target, options=options)
        if "cubin" not in kernel.asm:
            raise RuntimeError("no cubin produced")
        shared = int(getattr(kernel.metadata, "shared", 0))
        if shared > shared_limit:
            raise RuntimeError(f"needs {shared} bytes of shared memory, sm_{arch} allows {shared_limit}")
        results.append(dict(label=label, ok=True, seconds=time.time() - t0, shared=shared))
    except Exception as exc:
        msg = f"{type(exc).__name__}: {exc}".strip()
        results.append(dict(label=label, ok=False, seconds=time.time() - t0, error=msg[-4000:]))
print("AOT-RESULTS " + json.dumps(results))
"""


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("CUDA_VISIBLE_DEVICES", "")  # never touch a GPU, even if there is one
    return env


def _start(job_file: str, arch: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _WORKER, str(arch), str(SHARED_LIMIT.get(arch, 1 << 30)),
                             job_file], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), cwd=str(REPO))


def _finish(proc: subprocess.Popen, arch: int, timeout: float) -> list[dict]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise RuntimeError(f"AOT compile for sm_{arch} timed out after {timeout} s:\n{err[-3000:]}")
    for line in out.splitlines():
        if line.startswith("AOT-RESULTS "):
            return json.loads(line[len("AOT-RESULTS "):])
    raise RuntimeError(f"AOT compile worker for sm_{arch} failed (rc={proc.returncode}):\n"
                       f"{out[-3000:]}\n{err[-5000:]}")


def aot_compile_results(jobs: Sequence[dict], archs: Iterable[int] = (80, 90),
                        timeout: float = 600.0) -> dict[int, list[dict]]:
    """Compile every job for every ``sm_<arch>``, one interpreter-free subprocess per arch, all running
    at once. Returns ``{arch: [result per job]}``; a result has ``label``, ``ok``, ``seconds`` and
    ``shared`` (bytes of shared memory) or ``error``."""
    with tempfile.TemporaryDirectory() as tmp:
        job_file = os.path.join(tmp, "jobs.json")
        with open(job_file, "w") as f:
            json.dump(list(jobs), f)
        procs = {arch: _start(job_file, arch) for arch in archs}
        return {arch: _finish(proc, arch, timeout) for arch, proc in procs.items()}


def aot_compile(jobs: Sequence[dict], archs: Iterable[int] = (80, 90), timeout: float = 600.0) -> list[str]:
    """Compile every job for every arch; the list of failures (empty when everything compiled)."""
    errors = []
    for arch, results in aot_compile_results(jobs, archs, timeout).items():
        for r in results:
            if not r["ok"]:
                errors.append(f"sm_{arch} {r['label']}: {r['error']}")
    return errors
