"""Speedups between providers, and the CSV / Markdown / terminal tables of a run."""
from __future__ import annotations

import csv
import math
import os

from .harness import COLUMNS

FORMULA = ("bytes_min: fwd = 2·N·C·itemsize (read s and t once); fwd+bwd = 3·N·C·itemsize "
           "(read s and t once, write the gradient once); contrastive rows use M·D for N·C; sparse-teacher "
           "rows (K > 0): fwd = N·C·itemsize + N·K·12, fwd+bwd = 2·N·C·itemsize + N·K·12 (read s once, the "
           "int64 ids and float32 logprobs once, write the gradient once); fused-linear rows (H > 0, C = V): "
           "fwd = (N + V)·H·itemsize (read h and W) + N·K·12, fwd+bwd = twice the operands (+ write ∂h, ∂W), "
           "flops_min = 2·N·V·H (fwd) / 6·N·V·H (fwd+bwd), the student's dense lm_head matmuls")
COLUMN_NOTES = [
    ("time_ms", "median time of one call (CUDA: triton.testing.do_bench, warm-up excluded, L2 flushed; "
                "CPU: wall-clock median after warm-up); p20_ms/p80_ms: its 20th/80th percentiles"),
    ("first_call_ms", "the first (verified) call, which includes torch.compile / autotuning / first launch; "
                      "never part of time_ms"),
    ("±% (tables)", "(p80 − p20) / median: the run-to-run spread; differences smaller than it are noise"),
    ("GBps", "bytes_min / time_ms"),
    ("pct_copy", "GBps as % of the device-to-device copy bandwidth measured in the same run "
                 "(copy_ of a large buffer, bytes = 2 x size)"),
    ("flops_min / TFLOPs / pct_matmul", "contrastive and fused-linear rows (linear: 2·N·V·H fwd, "
                                        "6·N·V·H fwd+bwd, the student's lm_head matmuls); contrastive: 2·M²·D (fwd) or 4·M²·D (fwd+bwd) FLOPs, the "
                                        "rate, and % of an n×n×n matrix product measured in the same run"),
    ("peak_extra_MiB", "CUDA: peak memory allocated during one call above what was allocated before it "
                       "(inputs excluded); empty on CPU (not measured)"),
    ("loss_err / grad_err", "relative error vs the float64 reference, checked before timing "
                            "(verified says what was checked)"),
    ("x_vs_P", "speedup over provider P on the same case and mode (P's time / this row's time)"),
    ("status", "ok; skipped (provider unavailable, out of memory, time budget) or failed (an exception, "
               "or a result that differs from the reference), with the reason"),
]

KEY = ("suite", "method", "N", "C", "K", "H", "dtype", "mode")


def add_speedups(rows) -> list:
    """Adds ``x_vs_<provider>`` to every ok row; returns the provider names that got a column."""
    times = {}
    for r in rows:
        if r["status"] == "ok":
            times.setdefault(tuple(r.get(k) for k in KEY), {})[r["provider"]] = r["time_ms"]
    names = []
    for r in rows:
        if r["status"] == "ok" and r["provider"] not in names:
            names.append(r["provider"])
    for r in rows:
        group = times.get(tuple(r.get(k) for k in KEY), {})
        for n in names:
            other = group.get(n)
            r[f"x_vs_{n}"] = other / r["time_ms"] if r["status"] == "ok" and other and n != r["provider"] else None
    return names


def _fmt(v, digits=4):
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{digits}g}"
    return str(v)


def header_lines(title, prov, extra):
    lines = [title] + [f"{k}: {v}" for k, v in prov.items()] + [f"{k}: {v}" for k, v in extra.items()]
    return lines + [FORMULA] + [f"{k}: {v}" for k, v in COLUMN_NOTES]


def write_csv(path, rows, prov, extra, title) -> None:
    names = add_speedups(rows)
    cols = COLUMNS + [f"x_vs_{n}" for n in names]
    with open(path, "w", newline="") as f:
        for line in header_lines(title, prov, extra):
            f.write(f"# {line}\n")
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([_fmt(r.get(c), 6) for c in cols])


def _shape(r):
    if r["family"] == "contrastive":
        return f"M={r['N']} D={r['C']}"
    if r.get("H"):
        return f"N={r['N']} H={r['H']} V={r['C']}" + (f" K={r['K']}" if r.get("K") else "")
    return f"N={r['N']} C={r['C']}" + (f" K={r['K']}" if r.get("K") else "")


def _note(r):
    if r["status"] != "ok":
        return f"**{r['status']}**: {r['reason']}" if r["status"] == "failed" else f"skipped: {r['reason']}"
    errs = f"loss {_fmt(r['loss_err'], 2)}" + (f", grad {_fmt(r['grad_err'], 2)}" if r["grad_err"] is not None else "")
    return f"✓ {errs}"


def table(rows, markdown=True, include_skipped=True):
    """The result rows as a Markdown (or plain fixed-width) table."""
    names = add_speedups(rows)
    show = [r for r in rows if include_skipped or r["status"] != "skipped"]
    head = ["method", "shape", "dtype", "mode", "provider", "time ms", "±%", "GB/s", "% copy", "peak MiB"] + \
        [f"× vs {n}" for n in names] + ["verified / status"]
    body = []
    for r in show:
        x = [_fmt(r.get(f"x_vs_{n}"), 3) for n in names]
        if r.get("TFLOPs"):
            mm = f", {r['pct_matmul']:.0f}% of matmul" if r.get("pct_matmul") is not None else ""
            gbps = f"{_fmt(r['GBps'], 3)} ({_fmt(r['TFLOPs'], 3)} TF/s{mm})"
        else:
            gbps = _fmt(r.get("GBps"), 3)
        spread = (f"{100 * (r['p80_ms'] - r['p20_ms']) / r['time_ms']:.0f}"
                  if r["status"] == "ok" and r.get("p80_ms") is not None and r["time_ms"] else "")
        body.append([r["method"], _shape(r), r["dtype"], r["mode"], r["provider"], _fmt(r.get("time_ms"), 4), spread, gbps,
                     _fmt(r.get("pct_copy"), 3), _fmt(r.get("peak_extra_MiB"), 4)] + x + [_note(r)])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in body]
        return "\n".join(out)
    widths = [max(len(h), *(len(line[i]) for line in body)) if body else len(h) for i, h in enumerate(head)]
    widths[-1] = 0
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths[:-1]] + ["-" * 17])] + [fmt(line) for line in body])


def skipped_summary(rows) -> str:
    """One line per (provider, reason) of the skipped rows."""
    groups = {}
    for r in rows:
        if r["status"] == "skipped":
            groups.setdefault((r["provider"], r["reason"]), 0)
            groups[(r["provider"], r["reason"])] += 1
    return "\n".join(f"  {p} ({n} rows): {reason}" for (p, reason), n in groups.items())


#: a row whose (p80 − p20) / median exceeds this gets a warning: its differences are mostly noise
SPREAD_WARNING = 0.25


def spread_warnings(rows) -> list:
    out = []
    for r in rows:
        if r["status"] == "ok" and r.get("p80_ms") is not None and r["time_ms"]:
            spread = (r["p80_ms"] - r["p20_ms"]) / r["time_ms"]
            if spread > SPREAD_WARNING:
                out.append(f"{r['method']} {_shape(r)} {r['dtype']} {r['mode']} {r['provider']}: spread "
                           f"{100 * spread:.0f}% > {100 * SPREAD_WARNING:.0f}% — a busy machine; compare with care")
    return out


def counts(rows) -> str:
    c = {}
    for r in rows:
        c[r["status"]] = c.get(r["status"], 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(c.items()))


def write_markdown(path, rows, prov, extra, title) -> None:
    lines = [f"# {title}", ""] + [f"- {k}: {v}" for k, v in list(prov.items()) + list(extra.items())]
    lines += ["", f"Rows: {counts(rows)}.", "", f"- {FORMULA}"] + [f"- **{k}**: {v}" for k, v in COLUMN_NOTES]
    warn = spread_warnings(rows)
    if warn:
        lines += ["", "**Warnings** (large spread):"] + [f"- {w}" for w in warn]
    lines += ["", table(rows, markdown=True), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_all(out_dir, stem, rows, prov, extra, title) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"csv": os.path.join(out_dir, f"{stem}.csv"), "md": os.path.join(out_dir, f"{stem}.md")}
    write_csv(paths["csv"], rows, prov, extra, title)
    write_markdown(paths["md"], rows, prov, extra, title)
    return paths
