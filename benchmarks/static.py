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

from . import env, measure, static_report  # noqa: E402
from .compile_facts import compile_jobs, nvcc_facts  # noqa: E402
from .presets import DTYPES, PRESETS, SHAPES  # noqa: E402

OUT = os.path.join(env.ROOT, "benchmarks", "results", "static")
QUICK_CELLS = [("C=1000", "fp32"), ("V=32k", "bf16")]


def _tests_path():
    tests = os.path.join(env.ROOT, "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)


def engine_jobs(cells) -> list:
    """AOT jobs of the static table's cells (``tests/test_triton_aot.engine_job``: the shipped job format)."""
    _tests_path()
    from test_triton_aot import engine_job
    jobs = []
    for preset, shape, dtype in cells:
        p, sh = PRESETS[preset], SHAPES[shape]
        label = f"{preset} {shape} {dtype}"
        try:
            jobs.append(engine_job(p.build(), DTYPES[dtype], sh.C, label, has_labels=p.needs_labels))
        except TypeError:  # a job builder without the has_labels keyword
            jobs.append(engine_job(p.build(), DTYPES[dtype], sh.C, label))
    return jobs


def shipped_jobs() -> list:
    _tests_path()
    from test_triton_aot import shipped_jobs as jobs
    return jobs()


def _key(job) -> str:
    return json.dumps({k: job[k] for k in ("kernel", "signature", "constexprs", "num_warps") if k in job},
                      sort_keys=True)


def compile_all(cells, with_table: bool = True) -> dict:
    """{'table': {label: facts}, 'shipped': [facts]}: identical configurations compiled once."""
    table_jobs = engine_jobs(cells) if with_table else []
    shipped = shipped_jobs()
    unique = {}
    for job in table_jobs + shipped:
        unique.setdefault(_key(job), job)
    results = dict(zip(unique, compile_jobs(list(unique.values()), arch=90)))
    return {"table": {job["label"]: results[_key(job)] for job in table_jobs},
            "shipped": [dict(results[_key(job)], label=job["label"]) for job in shipped]}


#: shapes whose grad_output ≠ 1 variant is skipped (the interpreter's slowest cells; the extra scale pass
#: it adds is the same per element as at V = 32k)
SKIP_GO_NOT_ONE = ("V=128k",)


def run_transfers(cells, progress) -> dict:
    out = {}
    for preset, shape, dtype in cells:
        t0 = time.monotonic()
        out[f"{preset} {shape} {dtype}"] = measure.transfers(preset, shape, DTYPES[dtype],
                                                             grad_output_not_one=shape not in SKIP_GO_NOT_ONE)
        progress(f"transfers {preset} {shape} {dtype}: {out[f'{preset} {shape} {dtype}']['total']:.3f} "
                 f"({time.monotonic() - t0:.1f} s)")
    return out


def run_launches(presets) -> dict:
    out = {}
    for preset in presets:
        row = {}
        for labels in (False, True):
            for go in (1.0, measure.GRAD_OUTPUT_NOT_ONE):
                row[f"{'labels' if labels else 'no_labels'} {'go=1' if go == 1.0 else 'go!=1'}"] = \
                    measure.launches(preset, labels, go)
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
    result["provenance"]["command"] = "python -m benchmarks.static" + (" --quick" if quick else "")
    t0 = time.monotonic()
    # host time first, while nothing else of this run competes for the cores
    result["host"] = measure.host_overhead(presets)
    progress(f"host overhead done ({time.monotonic() - t0:.0f} s)")
    with ThreadPoolExecutor(max_workers=2) as pool:
        aot = pool.submit(compile_all, cells) if compile_ else None
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
    ap.add_argument("--presets", help=f"comma list of {','.join(PRESETS)} (default: all)")
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
    presets = args.presets.split(",") if args.presets else None
    bad = [p for p in presets or [] if p not in PRESETS]
    if bad:
        raise SystemExit(f"unknown presets {bad}; choose from {', '.join(PRESETS)}")
    result = collect(args.quick, presets, nvcc=not (args.no_nvcc or args.quick), compile_=not args.no_compile,
                     progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    os.makedirs(args.out, exist_ok=True)
    stem = "static-quick" if args.quick else "static"
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
