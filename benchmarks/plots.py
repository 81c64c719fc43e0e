"""PNG plots: per method and dtype, time and % of the copy bandwidth against N (or C) for every provider
and mode. matplotlib is optional: without it ``write_plots`` returns a note and writes nothing."""
from __future__ import annotations

import os


def write_plots(out_dir, stem, rows):
    """Returns (list of PNG paths, note or None)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        return [], f"plots skipped: matplotlib not importable ({type(exc).__name__})"
    ok = [r for r in rows if r["status"] == "ok"]
    paths = []
    for method, dtype in sorted({(r["method"], r["dtype"]) for r in ok}):
        sel = [r for r in ok if r["method"] == method and r["dtype"] == dtype]
        contrastive = sel[0]["family"] == "contrastive"
        n_vals, c_vals = {r["N"] for r in sel}, {r["C"] for r in sel}
        x_key, line_key = ("N", "C") if len(n_vals) >= len(c_vals) else ("C", "N")
        names = {"N": "M" if contrastive else "N", "C": "D" if contrastive else "C"}
        modes = [m for m in ("fwd", "fwd+bwd") if any(r["mode"] == m for r in sel)]
        fig, axes = plt.subplots(len(modes), 2, figsize=(11, 3.6 * len(modes)), squeeze=False)
        for i, mode in enumerate(modes):
            lines = {}
            for r in sel:
                if r["mode"] == mode:
                    label = r["provider"] + (f" {names[line_key]}={r[line_key]}" if len({q[line_key] for q in sel}) > 1 else "")
                    lines.setdefault(label, []).append((r[x_key], r["time_ms"], r["pct_copy"]))
            for label, pts in sorted(lines.items()):
                pts.sort()
                xs = [p[0] for p in pts]
                style = "o-" if len(pts) > 1 else "o"
                axes[i][0].plot(xs, [p[1] for p in pts], style, label=label)
                if all(p[2] is not None for p in pts):
                    axes[i][1].plot(xs, [p[2] for p in pts], style, label=label)
            axes[i][0].set(title=f"{method} {dtype} {mode}: time", xlabel=names[x_key], ylabel="median ms")
            axes[i][0].set_yscale("log")
            axes[i][1].set(title=f"{method} {dtype} {mode}: % of copy bandwidth", xlabel=names[x_key],
                           ylabel="% of measured copy GB/s")
            for ax in axes[i]:
                if len({r[x_key] for r in sel}) > 1:
                    ax.set_xscale("log", base=2)
                ax.grid(True, alpha=0.3)
            axes[i][0].legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stem}-{method}-{dtype}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths, None
