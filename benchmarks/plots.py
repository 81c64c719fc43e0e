"""PNG plots: per method (and sparse-teacher K) and dtype, time and % of the copy bandwidth against N (or C)
for every provider and mode. One colour per provider in every figure (``PROVIDER_COLOURS``), the shape,
dtype and device in every title, error bars from the 20th–80th percentiles of the repeats. A method whose rows have a single
point (one shape) gets no plot: the table already says everything. matplotlib is optional: without it
``write_plots`` returns a note and writes nothing."""
from __future__ import annotations

import os

#: one colour per provider, the same in every figure
PROVIDER_COLOURS = {"kdk-triton": "#1f77b4", "kdk-cuda": "#9467bd", "kdk-cpu": "#17becf", "eager": "#d62728",
                    "reference": "#7f7f7f", "compile": "#ff7f0e", "liger": "#2ca02c"}
MODE_STYLES = {"fwd": "--", "fwd+bwd": "-"}


def _colour(provider: str) -> str:
    return PROVIDER_COLOURS.get(provider, "#8c564b")


def _series(sel, mode, x_key, line_key, names):
    """{(provider, label): [(x, ms, p20, p80, pct_copy)]} of one mode."""
    vary = len({q[line_key] for q in sel}) > 1
    lines = {}
    for r in sel:
        if r["mode"] == mode:
            label = r["provider"] + (f" {names[line_key]}={r[line_key]}" if vary else "")
            lines.setdefault((r["provider"], label), []).append(
                (r[x_key], r["time_ms"], r["p20_ms"], r["p80_ms"], r["pct_copy"]))
    return lines


def _draw(axes, lines, mode):
    for (provider, label), pts in sorted(lines.items()):
        pts.sort()
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        yerr = [[max(0.0, p[1] - (p[2] if p[2] is not None else p[1])) for p in pts],
                [max(0.0, (p[3] if p[3] is not None else p[1]) - p[1]) for p in pts]]
        style = dict(color=_colour(provider), linestyle=MODE_STYLES.get(mode, "-"), marker="o", capsize=3)
        axes[0].errorbar(xs, ys, yerr=yerr, label=f"{label} ({mode})", **style)
        if all(p[4] is not None for p in pts):
            axes[1].errorbar(xs, [p[4] for p in pts],
                             yerr=[[e * p[4] / p[1] for e, p in zip(yerr[0], pts)],
                                   [e * p[4] / p[1] for e, p in zip(yerr[1], pts)]], **style)


def write_plots(out_dir, stem, rows, device: str = ""):
    """Returns (list of PNG paths, note or None)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        return [], f"plots skipped: matplotlib not importable ({type(exc).__name__})"
    ok = [r for r in rows if r["status"] == "ok"]
    paths, single = [], []
    for method, K, H, dtype in sorted({(r["method"], r.get("K") or 0, r.get("H") or 0, r["dtype"]) for r in ok}):
        sel = [r for r in ok if r["method"] == method and (r.get("K") or 0) == K and (r.get("H") or 0) == H
               and r["dtype"] == dtype]
        method = f"{method}-K{K}" if K else method  # one figure per sparse teacher size (and hidden size)
        method = f"{method}-H{H}" if H else method
        contrastive = sel[0]["family"] == "contrastive"
        n_vals, c_vals = {r["N"] for r in sel}, {r["C"] for r in sel}
        if len(n_vals) == 1 and len(c_vals) == 1:
            single.append(f"{method} {dtype}")
            continue
        x_key, line_key = ("N", "C") if len(n_vals) >= len(c_vals) else ("C", "N")
        names = {"N": "M" if contrastive else "N", "C": "D" if contrastive else "C"}
        fixed = ", ".join(f"{names[k]}={sorted({r[k] for r in sel})[0]}" for k in (line_key,)
                          if len({r[k] for r in sel}) == 1)
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), squeeze=False)
        for mode in ("fwd", "fwd+bwd"):
            _draw(axes[0], _series(sel, mode, x_key, line_key, names), mode)
        where = f"{method} {fixed} {dtype} on {device or 'unknown device'}".replace("  ", " ")
        axes[0][0].set(title=f"{where}: time (p20–p80 bars)", xlabel=names[x_key], ylabel="median ms")
        axes[0][0].set_yscale("log")
        axes[0][1].set(title=f"{where}: % of copy bandwidth", xlabel=names[x_key], ylabel="% of measured copy GB/s")
        for ax in axes[0]:
            ax.set_xscale("log", base=2)
            ax.grid(True, alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stem}-{method}-{dtype}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    note = f"no plot for single-shape rows (see the table): {', '.join(single)}" if single else None
    return paths, note
