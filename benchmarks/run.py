"""kdkernels benchmarks: every KD loss, provider by provider, verified against the float64 reference
before it is timed.

    python -m benchmarks.run --suite quick            # `make demo`: a small sanity suite (< 2 min on CPU)
    python -m benchmarks.run --suite imagenet|llm|contrastive|all [--methods kd,dkd] [--providers ...]
    python -m benchmarks.run --suite llm-linear        # kdk.fused_linear_distill from hidden states
        [--dtype bf16] [--mode fwd|fwd+bwd|both] [--out DIR] [--max-minutes 8]

Writes ``<suite>.csv`` (provenance in ``#`` lines), ``<suite>.md`` and PNG plots to ``--out`` (default
``benchmarks/results/<device-slug>/``) and prints the table. See benchmarks/README.md for the columns.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from . import env, plots, report
from .harness import MODES, Runner
from .linear import LinearRunner, linear_providers
from .providers import all_providers, select
from .shapes import DTYPES, METHODS, suite_cases
from .timing import copy_bandwidth, matmul_tflops

SUITES = ("quick", "imagenet", "llm", "contrastive", "headline", "all", "tiny", "llm-linear", "headline-linear")
#: the fused-linear suites (benchmarks/linear.py: their own providers, inputs and float64 reference)
LINEAR_SUITES = ("llm-linear", "headline-linear")
QUICK_COMPILE_REASON = ("quick suite on CPU: torch.compile timed for kd only (inductor needs ~10 s per method "
                        "and mode on 2 cores); pass --compile-all")


def _list(text, known, what):
    if not text:
        return None
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in known]
    if bad:
        raise SystemExit(f"unknown {what} {bad}; choose from {', '.join(known)}")
    return items


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="quick", choices=SUITES)
    ap.add_argument("--methods", help=f"comma list of {','.join(METHODS)} (default: the suite's)")
    ap.add_argument("--providers", help="comma list of kdk-triton,kdk-cuda,kdk-cpu,eager,compile,liger "
                                        "(aliases: triton,cuda,cpu,reference,kdkernels; default: all); llm-linear: "
                                        "kdk-fused-logits,kdk-fused-hidden,kdk-fused-sparse,kdk-unfused,eager,liger")
    ap.add_argument("--dtype", help=f"comma list of {','.join(DTYPES)} (default: the suite's)")
    ap.add_argument("--mode", default="both", choices=("fwd", "fwd+bwd", "both"))
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    ap.add_argument("--out", help="output folder (default: benchmarks/results/<device-slug>/)")
    ap.add_argument("--tag", default="", help="appended to the file names (<suite>-<tag>.csv)")
    ap.add_argument("--warmup-ms", type=float, default=None, help="warm-up per row (default 25 CUDA, 10 CPU)")
    ap.add_argument("--rep-ms", type=float, default=None,
                    help="timed repetitions per row (default 100; 50 for the quick suite on CPU)")
    ap.add_argument("--copy-mib", type=float, default=0,
                    help="buffer size of the copy-bandwidth measurement (default 128 MiB CPU, <= 2 GiB CUDA)")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop starting new rows after this long; the rest are skipped rows that say so")
    ap.add_argument("--max-elements", type=int, default=None,
                    help="skip cases whose largest tensor ([N, C], or [M, M] for contrastive) has more elements "
                         "(default 2**26 on CPU, no limit on CUDA)")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU intra-op threads (torch.set_num_threads); default 1 on CPU (steady on a shared "
                         "machine; always reported)")
    ap.add_argument("--compile-all", action="store_true", help="quick suite on CPU: compile every method")
    ap.add_argument("--compile-methods", help="comma list: time torch.compile for these methods only "
                                              "(inductor compiles take tens of seconds each)")
    ap.add_argument("--verify-only", action="store_true",
                    help="check every provider against the float64 reference, time nothing (spot checks)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a row failed")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    wall0 = time.monotonic()
    args = parse(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    threads = args.threads or (1 if device.type != "cuda" else 0)  # CPU: a fixed, reported thread count
    if threads:
        torch.set_num_threads(threads)
    methods = _list(args.methods, METHODS, "methods")
    dtypes = _list(args.dtype, tuple(DTYPES), "dtypes")
    modes = MODES if args.mode == "both" else (args.mode,)
    cases = suite_cases(args.suite, device.type, methods, dtypes)
    if not cases:
        raise SystemExit(f"suite {args.suite} has no case for methods={methods} dtypes={dtypes}")

    quick_cpu = args.suite == "quick" and device.type != "cuda" and not args.compile_all
    compile_only, compile_reason = (("kd",), QUICK_COMPILE_REASON) if quick_cpu else (None, "")
    if args.compile_methods:
        compile_only = tuple(_list(args.compile_methods, METHODS, "methods"))
        compile_reason = f"torch.compile timed for {args.compile_methods} only in this run (--compile-methods)"
    linear = args.suite in LINEAR_SUITES
    providers = linear_providers() if linear else all_providers(compile_only, compile_reason)
    try:
        providers = select(args.providers.split(",") if args.providers else None, providers)
    except ValueError as exc:
        raise SystemExit(str(exc))

    cpu = device.type != "cuda"
    warmup = args.warmup_ms if args.warmup_ms is not None else (10.0 if cpu else 25.0)
    rep = args.rep_ms if args.rep_ms is not None else (50.0 if cpu and args.suite == "quick" else 100.0)
    bw = copy_bandwidth(device, int(args.copy_mib * 2 ** 20), warmup_ms=warmup, rep_ms=rep)
    mm = {}
    for dt in sorted({c.dtype for c in cases if c.family in ("contrastive", "linear")}):
        mm[dt] = matmul_tflops(device, DTYPES[dt], warmup_ms=warmup, rep_ms=rep)

    prov = env.provenance(device)
    prov["command"] = "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv)
    extra = {"suite": args.suite, "modes": ", ".join(modes),
             **({"threads": f"{threads} (--threads; CPU providers are timed interleaved, call by call)"}
                if threads else {}),
             "copy bandwidth": f"{bw['copy_GBps']:.1f} GB/s (copy_ of {bw['copy_MiB']:.0f} MiB, bytes = 2 x size)"}
    extra.update({f"matmul {dt}": f"{v:.2f} TFLOP/s" for dt, v in mm.items()})
    extra.update({f"provider {p.name}": p.description for p in providers})
    out_dir = args.out or os.path.join(env.ROOT, "benchmarks", "results", env.slug(device))
    stem = args.suite + (f"-{args.tag}" if args.tag else "")
    title = f"kdkernels benchmark: {stem} on {prov['device']}"

    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else None
    runner = (LinearRunner if linear else Runner)(providers, device, modes, warmup, rep, bw["copy_GBps"], mm, deadline,
                    f" (--max-minutes {args.max_minutes})", progress=not args.quiet,
                    min_reps=3 if cpu and args.suite == "quick" else 5, max_elements=args.max_elements,
                    verify_only=args.verify_only)
    print(f"{title}\n  {len(cases)} cases x {len(providers)} providers x {len(modes)} modes; "
          f"copy bandwidth {bw['copy_GBps']:.1f} GB/s; writing to {out_dir}", file=sys.stderr)
    rows = runner.run(cases, on_case_done=lambda rows: report.write_all(out_dir, stem, rows, prov, extra, title))
    paths = report.write_all(out_dir, stem, rows, prov, extra, title)
    pngs, note = ([], "plots skipped (--no-plots)") if args.no_plots else plots.write_plots(out_dir, stem, rows, prov["device"])

    print(f"\n{title}")
    print(f"{prov['date']} · torch {prov['torch']} · triton {prov['triton']} · commit {prov['git_commit']} · "
          f"TRITON_INTERPRET={prov['TRITON_INTERPRET']}")
    print(f"copy bandwidth {bw['copy_GBps']:.1f} GB/s; {report.FORMULA}\n")
    print(report.table(rows, markdown=False, include_skipped=False))
    skipped = report.skipped_summary(rows)
    if skipped:
        print("\nskipped:\n" + skipped)
    for warning in report.spread_warnings(rows):
        print("WARNING: " + warning, file=sys.stderr)
    print(f"\nrows: {report.counts(rows)}")
    print("files: " + ", ".join(os.path.relpath(p) for p in list(paths.values()) + pngs) + (f"\n{note}" if note else ""))
    print(f"wall time {time.monotonic() - wall0:.1f} s")
    failed = sum(r["status"] == "failed" for r in rows)
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
