"""sm_90 compile facts without a GPU: registers, spills, shared memory, CTAs per SM, load vector width and
instructions per column of the hot loops, from the ahead-of-time compile of Triton kernels
(:mod:`benchmarks.aot_worker`) and from ``nvcc -Xptxas -v`` for the CUDA fallback.

* registers / spills: ``cuobjdump --dump-resource-usage`` of the cubin (``REG``, ``LOCAL`` > 0 means
  spilled registers in local memory; ``STACK``).
* CTAs per SM (sm_90): min over registers (65536 per SM, allocated per warp in units of 256), warps (64
  per SM), CTAs (32 per SM) and shared memory (228 KiB per SM, 1 KiB reserved per CTA).
* hot loops: the natural loops of the SASS (a backward branch closes a loop from its target to itself);
  the outermost loops that contain a global load (``LDG``) of the kernel's widest width are the column
  loops (the vectorized row loads; the batch epilogue's loops — the last program summing the row losses,
  counting labels — read 32/64-bit scalars once per launch, not per column, and are left out when the row
  loads are wider; with scalar row loads every loop counts). Instructions per column
  of a loop = its SASS instructions × 32 threads × warps / BLOCK_C columns (one iteration covers a block),
  inner loops counted once (their trip counts are not static). A single-block row has no column loop: its
  figure is the whole kernel's instructions × threads / BLOCK_C.
* vector width: the widest ``LDG`` in the hot code (bits), and the histogram of ``LDG`` widths there.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SM90 = {"regs_per_sm": 65536, "reg_alloc_unit": 256, "max_warps": 64, "max_ctas": 32,
        "shared_per_sm": 233472, "reserved_shared_per_cta": 1024}
WARP = 32
_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRA = re.compile(r"\bBRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))")


def tool(name: str) -> Optional[str]:
    """``cuobjdump``/``nvdisasm``: the one shipped with Triton, else on PATH or in CUDA_HOME."""
    try:
        import triton.backends.nvidia as nv
        path = os.path.join(os.path.dirname(nv.__file__), "bin", name)
        if os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001
        pass
    found = shutil.which(name)
    if found:
        return found
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = os.path.join(home, "bin", name)
    return path if os.path.exists(path) else None


def compile_jobs(jobs: Sequence[dict], arch: int = 90, timeout: float = 900.0) -> List[dict]:
    """Compile every job for ``sm_<arch>`` in one interpreter-free subprocess; per job the worker's result
    plus :func:`cubin_facts` (when it compiled)."""
    with tempfile.TemporaryDirectory() as tmp:
        job_file = os.path.join(tmp, "jobs.json")
        with open(job_file, "w") as f:
            json.dump(list(jobs), f)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
        proc = subprocess.run([sys.executable, "-m", "benchmarks.aot_worker", str(arch), job_file, tmp],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("AOT-FACTS ")), None)
        if line is None:
            raise RuntimeError(f"AOT worker failed (rc={proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        results = json.loads(line[len("AOT-FACTS "):])
        for job, r in zip(jobs, results):
            if r["ok"]:
                cons = job.get("constexprs", {})
                block = int(cons.get("BLOCK_C", 0)) or None
                r.update(cubin_facts(r.pop("cubin"), r["num_warps"], r["shared"], block,
                                     single_block=bool(cons.get("SINGLE_BLOCK", False))))
    return results


def resource_usage(cubin: str) -> dict:
    out = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    if not m:
        raise RuntimeError(f"no resource usage in cuobjdump output:\n{out[-1000:]}")
    reg, stack, shared, local = map(int, m.groups())
    return {"registers": reg, "stack": stack, "static_shared": shared, "local": local}


def ctas_per_sm(registers: int, num_warps: int, shared: int) -> int:
    """Resident CTAs per SM on sm_90 (the occupancy calculator's rules, rounded per warp)."""
    hw = SM90
    regs_per_warp = math.ceil(registers * WARP / hw["reg_alloc_unit"]) * hw["reg_alloc_unit"]
    by_regs = (hw["regs_per_sm"] // max(regs_per_warp, 1)) // num_warps
    by_warps = hw["max_warps"] // num_warps
    by_shared = hw["shared_per_sm"] // (shared + hw["reserved_shared_per_cta"])
    return max(0, min(by_regs, by_warps, hw["max_ctas"], by_shared))


def parse_sass(text: str) -> List[tuple]:
    """[(address, instruction text)] of a ``cuobjdump -sass`` listing (control words skipped)."""
    return [(int(a, 16), insn) for a, insn in _INSN.findall(text)]


def _ldg_bits(insn: str) -> int:
    op = insn.split()[1] if insn.startswith("@") else insn.split()[0]
    for bits in (128, 64):
        if f".{bits}" in op:
            return bits
    if ".U16" in op or ".S16" in op:
        return 16
    if ".U8" in op or ".S8" in op:
        return 8
    return 32


def hot_loops(insns: List[tuple]) -> List[dict]:
    """The outermost natural loops holding a global load: [{'start', 'end', 'instructions', 'ldg_bits'}]."""
    loops = []
    for addr, insn in insns:
        m = _BRA.search(insn)
        if m and m.group(1) is not None:
            target = int(m.group(1), 16)
            if target < addr:
                loops.append((target, addr))
    outer = [lp for lp in loops if not any(o != lp and o[0] <= lp[0] and lp[1] <= o[1] for o in loops)]
    out = []
    for lo, hi in sorted(set(outer)):
        body = [insn for a, insn in insns if lo <= a <= hi and not insn.startswith("NOP")]
        ldg = [_ldg_bits(i) for i in body if "LDG" in i]
        if ldg:
            out.append({"start": lo, "end": hi, "instructions": len(body), "ldg_bits": ldg})
    return out


def cubin_facts(cubin: str, num_warps: int, shared: int, block_c: Optional[int], single_block: bool = False) -> dict:
    usage = resource_usage(cubin)
    sass = subprocess.run([tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
    insns = [(a, i) for a, i in parse_sass(sass) if not i.startswith("NOP")]
    # the trailing "BRA ." (a branch to itself after EXIT) is padding, not code
    insns = [(a, i) for a, i in insns if not (_BRA.search(i) and _BRA.search(i).group(1) is not None
                                              and int(_BRA.search(i).group(1), 16) == a)]
    loops = hot_loops(insns)
    widest = max((max(lp["ldg_bits"]) for lp in loops), default=0)
    loops = [lp for lp in loops if max(lp["ldg_bits"]) == widest]  # the column loops (module docstring)
    threads = num_warps * WARP
    facts = dict(usage, shared=shared, num_warps=num_warps, sass_instructions=len(insns),
                 spills=usage["local"], ctas_per_sm=ctas_per_sm(usage["registers"], num_warps, shared))
    if block_c:
        if loops and not single_block:
            per_loop = [lp["instructions"] * threads / block_c for lp in loops]
            bits = [b for lp in loops for b in lp["ldg_bits"]]
            facts.update(hot_loops=len(loops), loop_instructions=[lp["instructions"] for lp in loops],
                         insn_per_column=sum(per_loop), insn_per_column_loops=per_loop, scope="column loops")
        else:
            bits = [_ldg_bits(i) for _, i in insns if "LDG" in i]
            facts.update(hot_loops=0, loop_instructions=[], insn_per_column=len(insns) * threads / block_c,
                         insn_per_column_loops=[], scope="whole kernel (single block)")
        facts["vector_bits"] = max(bits) if bits else None
        facts["ldg_bits"] = {str(b): bits.count(b) for b in sorted(set(bits))}
    return facts


# ------------------------------------------------------------------------------------------------
# the CUDA fallback
# ------------------------------------------------------------------------------------------------
_PTXAS_FN = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_PTXAS_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def _demangle(names: List[str]) -> Dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def parse_ptxas(log: str) -> List[dict]:
    """Per kernel: name, arch, registers, stack, spill stores/loads (bytes), from a ``-Xptxas -v`` log."""
    rows, cur = [], None
    for line in log.splitlines():
        m = _PTXAS_FN.search(line)
        if m:
            cur = {"mangled": m.group(1), "arch": m.group(2)}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _PTXAS_PROPS.search(line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _PTXAS_REGS.search(line)
        if m:
            cur["registers"] = int(m.group(1))
    names = _demangle([r["mangled"] for r in rows])
    for r in rows:
        r["kernel"] = names[r["mangled"]]
    return rows


def nvcc_facts(arch: str = "sm_90", source: str = "csrc/cuda/kd_kernels.cu", timeout: float = 600.0) -> dict:
    """``nvcc -c -Xptxas -v`` of the torch-free CUDA fallback: per kernel registers and spills."""
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    if not os.path.exists(nvcc):
        return {"skipped": "nvcc not found (set CUDA_HOME)"}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-c", "-std=c++17", "-O3", f"-arch={arch}", "-Xptxas", "-v", f"-I{os.path.join(ROOT, 'csrc')}",
               os.path.join(ROOT, source), "-o", os.path.join(tmp, "k.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:], "command": " ".join(cmd)}
    nvcc_version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return {"command": f"nvcc -c -std=c++17 -O3 -arch={arch} -Xptxas -v -Icsrc {source}",
            "nvcc": nvcc_version[-1] if nvcc_version else "?", "kernels": parse_ptxas(proc.stdout + proc.stderr)}
