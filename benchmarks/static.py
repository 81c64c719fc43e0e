"""Static performance figures of every preset, measured on a CPU machine (no GPU): the numbers a GPU
would be held to, and that CI budgets (tests/test_budgets.py).

    python -m benchmarks.static [--quick] [--out benchmarks/results/static] [--no-nvcc] [--no-compile]

Per preset × shape class × dtype: HBM transfers per element per tensor (Triton interpreter, unmasked
lanes; grad_output 1 and ≠ 1), sm_90 compile facts (registers, spills, shared memory, CTAs per SM, vector
width of the hot loads, instructions per column of the hot loops); per preset: launches per fwd+bwd call
(Triton launches and ATen kernels, with and without labels, grad_output 1 and ≠ 1) and host time per call
on a tiny input as a ratio to an eager mdistiller-style KD; every shipped Triton configuration's sm_90
facts; the CUDA fallback's ``nvcc -Xptxas -v`` registers and spills. Writes ``static.json`` and
``static.md``. These are static estimates, not GPU measurements (``benchmarks/gpu_check.sh`` measures).

Runtime measured on two cores shared with four other jobs: the full run 8 minutes with a warm Triton
compile cache, 15 with a cold one under load ~8 (the streamed top-k stand-ins under the interpreter,
~90 AOT compiles and nvcc dominate; the compiles run beside the interpreter work); ``--quick`` (C = 1000 fp32 and V = 32k bf16 only,
the shipped configurations, no nvcc) 4 minutes.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel import: the byte counts need the interpreter

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import torch  # noqa: E402

import kdkernels as kdk  # noqa: E402

from . import env, measure, static_report  # noqa: E402
from .compile_facts import compile_jobs, nvcc_facts  # noqa: E402
from .presets import CLASSIC_PRESETS, DTYPES, LLM_PRESETS, PRESETS, SHAPES, make_inputs  # noqa: E402

OUT = os.path.join(env.ROOT, "benchmarks", "results", "static")
QUICK_CELLS = [("C=1000", "fp32"), ("V=32k", "bf16")]


def _tests_path():
    tests = os.path.join(env.ROOT, "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)


_AOT_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
              torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.uint8: "u8"}


class _Captured(Exception):
    """Raised by the hooked launch: the arguments are recorded, nothing runs."""


def captured_job(preset: str, dtype: torch.dtype, C: int, label: str) -> dict:
    """The AOT job of the kernel that ``kdkernels.logit_distill(..., backend="triton")`` launches for
    ``preset`` on one ``[1, C]`` row of ``dtype``: the interpreter's launch is hooked, its arguments
    recorded and the launch abandoned before it runs — the signature (tensors → pointer types, integers →
    ``i32``) and the constexprs are exactly the launcher's, whatever flags the kernel grows (the sparse
    teacher's kernel has no hand-written job builder). Needs ``TRITON_INTERPRET=1``. Not thread-safe (the
    hook is the interpreter's class attribute): call it while no other interpreted launch runs."""
    import triton.language as tl
    from triton.runtime import interpreter as interp

    p = PRESETS[preset]
    s, t, y = make_inputs(1, C, dtype, p.needs_labels, ignored_row=False)
    seen = {}
    executor = interp.GridExecutor
    orig_call = executor.__call__

    def launch(self, *args, **kwargs):
        seen.update(kernel=self.fn, names=list(self.arg_names), args=dict(zip(self.arg_names, args)), kwargs=kwargs)
        raise _Captured()

    executor.__call__ = launch
    try:
        kdk.logit_distill(s.requires_grad_(True), p.teacher(t), y, p.build(), backend="triton")
    except _Captured:
        pass
    finally:
        executor.__call__ = orig_call
    if not seen:
        raise RuntimeError(f"{preset}: no Triton launch to capture (TRITON_INTERPRET unset?)")
    fn, kwargs = seen["kernel"], dict(seen["kwargs"])
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    tl_names = {getattr(tl, n): f"tl.{n}" for n in ("float32", "float64", "float16", "bfloat16")}
    values = dict(seen["args"], **kwargs)
    sig, cons = {}, {}
    for name in seen["names"]:
        v = values[name]
        if name in kwargs:
            cons[name] = tl_names.get(v, v) if not isinstance(v, (bool, int, float, str)) else v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _AOT_TYPES[v.dtype]
        else:
            sig[name] = "i32"
    return dict({"kernel": f"{fn.__module__}:{fn.__name__}", "signature": sig, "constexprs": cons, "label": label},
                **options)


def engine_jobs(cells) -> list:
    """AOT jobs of the static table's cells (``tests/test_triton_aot.engine_job``: the shipped job format)."""
    _tests_path()
    import test_triton_aot
    jobs = []
    for preset, shape, dtype in cells:
        p, sh = PRESETS[preset], SHAPES[shape]
        label = f"{preset} {shape} {dtype}"
        if p.sparse is not None:  # the sparse-teacher kernel: the launcher's own arguments
            build, args = (lambda *a, has_labels=None: captured_job(*a)), (preset, DTYPES[dtype], sh.C, label)
        else:
            build, args = test_triton_aot.engine_job, (p.build(), DTYPES[dtype], sh.C, label)
        try:
            try:
                jobs.append(build(*args, has_labels=p.needs_labels))
            except TypeError:  # a job builder without the has_labels keyword
                jobs.append(build(*args))
        except Exception as exc:  # noqa: BLE001 - an option the kernel lacks is a table cell, not a crash
            jobs.append({"label": label, "unsupported": f"AOT job: {type(exc).__name__}: {exc}"[:300]})
    return jobs


def shipped_jobs() -> list:
    _tests_path()
    from test_triton_aot import shipped_jobs as jobs
    return jobs()


def _key(job) -> str:
    return json.dumps({k: job[k] for k in ("kernel", "signature", "constexprs", "num_warps") if k in job},
                      sort_keys=True)


def compile_all(table_jobs) -> dict:
    """{'table': {label: facts}, 'shipped': [facts]} of :func:`engine_jobs`' jobs and the shipped ones:
    identical configurations compiled once (thread-safe: the jobs are built before, in the caller)."""
    unsupported = {job["label"]: {"ok": False, "error": job["unsupported"]}
                   for job in table_jobs if "unsupported" in job}
    table_jobs = [job for job in table_jobs if "unsupported" not in job]
    shipped = shipped_jobs()
    unique = {}
    for job in table_jobs + shipped:
        unique.setdefault(_key(job), job)
    results = dict(zip(unique, compile_jobs(list(unique.values()), arch=90)))
    return {"table": dict({job["label"]: results[_key(job)] for job in table_jobs}, **unsupported),
            "shipped": [dict(results[_key(job)], label=job["label"]) for job in shipped]}


#: shapes whose grad_output ≠ 1 variant is skipped (the interpreter's slowest cells; the extra scale pass
#: it adds is the same per element as at V = 32k)
SKIP_GO_NOT_ONE = ("V=128k",)


def run_transfers(cells, progress) -> dict:
    out = {}
    for preset, shape, dtype in cells:
        t0 = time.monotonic()
        label = f"{preset} {shape} {dtype}"
        try:
            out[label] = measure.transfers(preset, shape, DTYPES[dtype],
                                           grad_output_not_one=shape not in SKIP_GO_NOT_ONE)
        except Exception as exc:  # noqa: BLE001 - an option the Triton backend lacks: a cell that says so
            out[label] = {"error": measure.error_text(exc)}
            progress(f"transfers {label}: {out[label]['error']}")
            continue
        progress(f"transfers {label}: {out[label]['total']:.3f} ({time.monotonic() - t0:.1f} s)")
    return out


def run_launches(presets) -> dict:
    out = {}
    for preset in presets:
        row = {}
        for labels in (False, True):
            for go in (1.0, measure.GRAD_OUTPUT_NOT_ONE):
                key = f"{'labels' if labels else 'no_labels'} {'go=1' if go == 1.0 else 'go!=1'}"
                try:
                    row[key] = measure.launches(preset, labels, go)
                except Exception as exc:  # noqa: BLE001 - an option the Triton backend lacks
                    row[key] = {"error": measure.error_text(exc)}
        row["eager"] = measure.eager_ops(preset)
        out[preset] = row
    return out


def cells_of(quick: bool, presets) -> list:
    if quick:
        return [(p, s, d) for p in presets for s, d in QUICK_CELLS]
    return [(p, s, d) for p in presets for s in SHAPES for d in DTYPES]


def collect(quick: bool = False, presets=None, nvcc: bool = True, compile_: bool = True,
            progress=lambda msg: None) -> dict:
    """Every static measurement as one JSON-able dict (the AOT compile and nvcc run in the background)."""
    presets = list(presets or PRESETS)
    cells = cells_of(quick, presets)
    result = {"provenance": env.provenance(torch.device("cpu")), "quick": quick,
              "shapes": {name: sh.standin for name, sh in SHAPES.items()},
              "presets": {name: PRESETS[name].public for name in presets}}
    result["provenance"]["command"] = "python -m benchmarks.static" + (" --quick" if quick else "") + (
        f" --presets {','.join(presets)}" if set(presets) != set(PRESETS) else "")
    t0 = time.monotonic()
    # the AOT jobs here, in this thread: captured_job hooks the interpreter's launch path for a moment
    table_jobs = engine_jobs(cells) if compile_ else []
    # host time first, while nothing else of this run competes for the cores
    result["host"] = measure.host_overhead(presets)
    progress(f"host overhead done ({time.monotonic() - t0:.0f} s)")
    with ThreadPoolExecutor(max_workers=2) as pool:
        aot = pool.submit(compile_all, table_jobs) if compile_ else None
        cuda = pool.submit(nvcc_facts) if nvcc else None
        result["transfers"] = run_transfers(cells, progress)
        result["launches"] = run_launches(presets)
        progress(f"launches done ({time.monotonic() - t0:.0f} s)")
        result["compile"] = aot.result() if aot else {"skipped": "--no-compile"}
        progress(f"AOT compile done ({time.monotonic() - t0:.0f} s)")
        result["cuda"] = cuda.result() if cuda else {"skipped": "--no-nvcc"}
    result["runtime_s"] = round(time.monotonic() - t0, 1)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.static", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="C=1000 fp32 and V=32k bf16 only, no nvcc")
    ap.add_argument("--presets", help=f"comma list of {','.join(PRESETS)}, or 'llm' (the LLM family) / 'classic' "
                                      "(default: all; a subset writes static[-quick]-subset.json/.md)")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--no-nvcc", action="store_true", help="skip the CUDA fallback's nvcc -Xptxas -v")
    ap.add_argument("--no-compile", action="store_true", help="skip the sm_90 AOT compile facts")
    ap.add_argument("--render", metavar="JSON", help="only rewrite the Markdown of an earlier run's JSON")
    args = ap.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            result = json.load(f)
        path = os.path.splitext(args.render)[0] + ".md"
        with open(path, "w") as f:
            f.write(static_report.markdown(result))
        print(f"wrote {path}", file=sys.stderr)
        return 0
    presets = None
    if args.presets:
        presets = [name for item in args.presets.split(",") for name in
                   (LLM_PRESETS if item == "llm" else CLASSIC_PRESETS if item == "classic" else (item,))]
    bad = [p for p in presets or [] if p not in PRESETS]
    if bad:
        raise SystemExit(f"unknown presets {bad}; choose from {', '.join(PRESETS)}")
    result = collect(args.quick, presets, nvcc=not (args.no_nvcc or args.quick), compile_=not args.no_compile,
                     progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    os.makedirs(args.out, exist_ok=True)
    # a subset of the presets never overwrites the committed full table
    stem = "static" + ("-quick" if args.quick else "") + ("-subset" if presets and set(presets) != set(PRESETS) else "")
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
        json.dump(result, f, indent=1, sort_keys=True, default=str)
    text = static_report.markdown(result)
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write(text)
    print(text)
    for warning in static_report.warnings(result):
        print("WARNING: " + warning, file=sys.stderr)
    print(f"wrote {args.out}/{stem}.json and {stem}.md in {result['runtime_s']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
