"""Subprocess of :mod:`benchmarks.compile_facts`: compile Triton jobs for one CUDA arch ahead of time
(no GPU, no ``TRITON_INTERPRET``) and write each cubin to a folder.

    python -m benchmarks.aot_worker ARCH JOBS.json OUT_DIR

A job is the dict of ``tests/aot_util.py`` (``kernel`` "module:attr", ``signature``, ``constexprs``,
``num_warps``, ``label``). Pointers get ``tt.divisibility=16``, as Triton specialises 16-byte aligned
tensors at run time (integer arguments are left unspecialised: the job does not carry their values).
Prints one line ``AOT-FACTS <json list>`` with, per job, ``label``, ``ok``, ``seconds``, ``shared``,
``num_warps``, ``cubin`` (path) or ``error``.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time


def _constexpr_value(v):
    import triton.language as tl
    if isinstance(v, str) and v.startswith("tl."):
        return getattr(tl, v[3:])
    return v


def compile_job(job: dict, arch: int, out_dir: str, index: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, attr = job["kernel"].split(":")
    fn = getattr(importlib.import_module(module), attr)
    cons = {k: _constexpr_value(v) for k, v in job.get("constexprs", {}).items()}
    sig = dict(job["signature"], **{k: "constexpr" for k in cons})
    sig = {a: sig[a] for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if sig[a].startswith("*")}
    options = {k: job[k] for k in ("num_warps", "num_stages") if k in job}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cons, attrs=attrs),
                            target=GPUTarget("cuda", arch, 32), options=options)
    path = os.path.join(out_dir, f"job{index}.cubin")
    with open(path, "wb") as f:
        f.write(kernel.asm["cubin"])
    return {"shared": int(getattr(kernel.metadata, "shared", 0)),
            "num_warps": int(getattr(kernel.metadata, "num_warps", job.get("num_warps", 4))), "cubin": path}


def main(argv=None) -> int:
    arch, job_file, out_dir = (argv or sys.argv[1:])[:3]
    with open(job_file) as f:
        jobs = json.load(f)
    results = []
    for i, job in enumerate(jobs):
        t0 = time.time()
        try:
            facts = compile_job(job, int(arch), out_dir, i)
            results.append(dict(label=job.get("label", job["kernel"]), ok=True, seconds=time.time() - t0, **facts))
        except Exception as exc:  # noqa: BLE001 - a failed compile is a result
            results.append(dict(label=job.get("label", job["kernel"]), ok=False, seconds=time.time() - t0,
                                error=f"{type(exc).__name__}: {exc}"[-3000:]))
    print("AOT-FACTS " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
