"""The Markdown report of ``python -m benchmarks.static`` (from its JSON result)."""
from __future__ import annotations

#: a host-time spread ((p80 − p20) / median) above this gets a warning: the ratio is then unreliable
SPREAD_WARNING = 0.25


def _order(preset: str) -> int:
    from .presets import PRESETS
    names = list(PRESETS)
    return names.index(preset) if preset in names else len(names)


def _f(v, digits=3):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _table(head, rows) -> list:
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"] + \
        ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def transfer_table(res) -> list:
    compile_table = res.get("compile", {}).get("table", {})
    head = ["preset", "shape", "dtype", "s", "t", "grad", "total", "total go≠1", "regs", "spills", "CTAs/SM",
            "ld bits", "insn/col"]
    rows = []
    for label, tr in sorted(res["transfers"].items(), key=lambda kv: _order(kv[0].split(" ")[0])):
        preset, shape, dtype = label.split(" ")
        cf = compile_table.get(label, {})
        if "error" in tr:
            rows.append([preset, shape, dtype, f"**not measured**: {tr['error'][:160]}"] + [""] * (len(head) - 4))
            continue
        if not cf.get("ok", True):
            cf = {"registers": "n/a"}  # no AOT compile of this configuration (the error: the sparse table)
        rows.append([preset, shape, dtype, _f(tr["s"]), _f(tr["t"]), _f(tr["grad"]), f"**{tr['total']:.3g}**",
                     _f(tr["total_go"]), _f(cf.get("registers")), _f(cf.get("spills")), _f(cf.get("ctas_per_sm")),
                     _f(cf.get("vector_bits")), _f(cf.get("insn_per_column"), 4)])
    return _table(head, rows)


def _sparse_fits(res) -> dict:
    """(preset, dtype, streamed) → the [N, V] / per-slot split of the two measured row lengths."""
    from .measure import sparse_fit
    groups = {}
    for label, tr in res["transfers"].items():
        if "student_side" in tr and "C_measured" in tr:
            preset, _, dtype = label.split(" ")
            groups.setdefault((preset, dtype, tr["streamed"]), []).append(tr)
    return {key: sparse_fit(*sorted(trs, key=lambda tr: tr["C_measured"])[:2])
            for key, trs in groups.items() if len({tr["C_measured"] for tr in trs}) >= 2}


def sparse_table(res) -> list:
    """The sparse-teacher presets: transfers in units of the student's [N, V] (bytes ÷ N·V·itemsize of s)."""
    head = ["preset", "shape", "dtype", "student side (s + grad)", "[N, V] part (fit)", "per slot (fit)",
            "at the real C", "teacher (ids + logprobs)", "teacher at the real C", "teacher reads per slot", "sm_90"]
    rows = []
    compile_table = res.get("compile", {}).get("table", {})
    fits = _sparse_fits(res)
    for label, tr in sorted(res["transfers"].items(), key=lambda kv: _order(kv[0].split(" ")[0])):
        if "student_side" not in tr:
            continue
        preset, shape, dtype = label.split(" ")
        cf = compile_table.get(label, {})
        facts = (f"{cf['registers']} regs / {cf['spills']} spills" if cf.get("ok") else
                 (cf.get("error", "not compiled")[:120] if cf else "–"))
        fit = fits.get((preset, dtype, tr.get("streamed")))
        real_C = _real_C(shape)
        at_real = fit["dense"] + fit["per_slot"] * tr["K"] / real_C if fit and real_C else None
        rows.append([preset, shape, dtype, _f(tr["student_side"]), f"**{fit['dense']:.3g}**" if fit else "–",
                     _f(fit["per_slot"]) if fit else "–", _f(at_real, 4), _f(tr["t"]),
                     _f(tr["t"] * tr["C_measured"] / real_C if real_C and "C_measured" in tr else None),
                     _f(tr["teacher_reads_per_slot"]), facts])
    return _table(head, rows) if rows else []


def _real_C(shape: str):
    from .presets import SHAPES
    return SHAPES[shape].C if shape in SHAPES else None


def _launch_cell(cell) -> str:
    if not cell:
        return "n/a (needs labels)"
    if "error" in cell:
        return f"not measured: {cell['error'][:80]}"
    return _f(cell["device_kernels"])


def launch_table(res) -> list:
    head = ["preset", "no labels go=1", "no labels go≠1", "labels go=1", "labels go≠1", "Triton launches (labels go=1)",
            "ops dispatched (labels go=1)", "eager baseline ATen kernels"]
    rows = []
    for preset, row in sorted(res["launches"].items(), key=lambda kv: _order(kv[0])):
        cells = [_launch_cell(row.get(k)) for k in ("no_labels go=1", "no_labels go!=1", "labels go=1", "labels go!=1")]
        lab = row["labels go=1"]
        rows.append([preset] + cells + [_f(lab.get("triton")), _f(lab.get("ops")), _f(row["eager"]["aten_kernels"])])
    return _table(head, rows)


def host_table(res) -> list:
    host = res["host"]
    head = ["preset", "kdk-cpu µs", "its kernels µs", "host µs", "host × eager KD", "± spread",
            "eager (published) µs", "× eager KD", "reference µs", "× eager KD"]
    rows = []
    for preset, prov in sorted(host["rows"].items(), key=lambda kv: _order(kv[0])):
        k, e, r = prov["kdk-cpu"], prov["eager"], prov["reference"]
        if "error" in k:
            rows.append([preset, f"not measured: {k['error'][:100]}", "", "", "", "", _f(e.get("us")),
                         _f(e.get("ratio"), 2), _f(r.get("us")), _f(r.get("ratio"), 2)])
            continue
        rows.append([preset, _f(k["us"]), _f(k.get("kernel_us")), _f(k.get("host_us")), f"**{k['ratio']:.2f}**",
                     f"{100 * k['spread']:.0f}%", _f(e["us"]), f"{e['ratio']:.2f}", _f(r["us"]), f"{r['ratio']:.2f}"])
    return _table(head, rows)


def shipped_table(res) -> list:
    head = ["shipped configuration", "regs", "spills", "shared B", "warps", "CTAs/SM", "ld bits", "insn/col", "scope"]
    rows = []
    for r in res.get("compile", {}).get("shipped", []):
        if not r.get("ok"):
            rows.append([r["label"], "**compile failed**", r.get("error", "")[:120], "", "", "", "", "", ""])
            continue
        rows.append([r["label"], r["registers"], r["spills"], r["shared"], r["num_warps"], r["ctas_per_sm"],
                     _f(r.get("vector_bits")), _f(r.get("insn_per_column"), 4), r.get("scope", "")])
    return _table(head, rows)


def cuda_table(res) -> list:
    cuda = res.get("cuda", {})
    if "kernels" not in cuda:
        return [f"CUDA fallback: {cuda.get('skipped') or cuda.get('error', 'not measured')}"]
    head = ["CUDA fallback kernel (sm_90)", "registers", "stack B", "spill stores B", "spill loads B"]
    rows = [[k["kernel"][:90], k.get("registers"), k.get("stack"), k.get("spill_stores"), k.get("spill_loads")]
            for k in cuda["kernels"]]
    return [f"`{cuda['command']}` ({cuda['nvcc']})", ""] + _table(head, rows)


def summary_table(res, single=("C=1000", "fp32"), streamed=("V=128k", "bf16")) -> list:
    """One row per preset: the headline static figures (the README's Benchmarks section quotes it)."""
    head = [f"preset", f"transfers {single[0]} {single[1]}", f"transfers {streamed[0]} {streamed[1]}",
            "launches no labels / labels", "host × eager KD",
            f"sm_90 {streamed[0]} {streamed[1]}: regs / spills / CTAs", "insn/col"]
    rows = []
    cf = res.get("compile", {}).get("table", {})
    for preset in sorted(res["presets"], key=_order):
        a = res["transfers"].get(f"{preset} {single[0]} {single[1]}", {})
        b = res["transfers"].get(f"{preset} {streamed[0]} {streamed[1]}", {})
        la = res["launches"].get(preset, {})
        nl, lab = la.get("no_labels go=1"), la.get("labels go=1")
        host = res["host"]["rows"].get(preset, {}).get("kdk-cpu", {})
        c = cf.get(f"{preset} {streamed[0]} {streamed[1]}", {})
        kernels = [(x or {}).get("device_kernels", "–") if x else "n/a" for x in (nl, lab)]
        rows.append([preset, _f(a.get("total")), _f(b.get("total")), f"{kernels[0]} / {kernels[1]}",
                     _f(host.get("ratio"), 2),
                     f"{_f(c.get('registers'))} / {_f(c.get('spills'))} / {_f(c.get('ctas_per_sm'))}",
                     _f(c.get("insn_per_column"), 3)])
    return _table(head, rows)


def warnings(res) -> list:
    out = []
    for preset, prov in res["host"]["rows"].items():
        for name, st in prov.items():
            if st.get("spread", 0.0) > SPREAD_WARNING:
                out.append(f"host time {preset}/{name}: spread {100 * st['spread']:.0f}% > "
                           f"{100 * SPREAD_WARNING:.0f}% (busy machine): the ratio is unreliable")
    return out


def sparse_section(res) -> list:
    table = sparse_table(res)
    if not table:
        return []
    return ["", "### Sparse (stored top-K) teacher, K = 64", "",
            "In units of the student's [N, V]: *student side* = loads of s + stores (and loads) of the gradient, "
            "÷ N·V·itemsize at the measured row (the stand-in's K/C is far larger than a real vocabulary's, so "
            "the O(N·K) part weighs more there); the two measured row lengths of each dtype (C = 1000/4096 single "
            "block, the V = 32k/128k stand-ins streamed) split it as *[N, V] part* + *per slot*·K/C, and *at the "
            "real C* evaluates that at the real row; *teacher* = loads of the int64 ids and float32 logprobs "
            "÷ N·V·itemsize (O(N·K); at the real C: the same bytes ÷ the real row); *teacher reads per slot* = "
            "those loads ÷ the stored slots' bytes (1 = read once). Target: the [N, V] part of renorm without "
            "CE ≈ 1 (the gradient write); tail or with CE ≤ 3.",
            ""] + table


def markdown(res) -> str:
    prov, host = res["provenance"], res["host"]
    lines = [
        "# kdkernels static performance figures (sm_90 compile + interpreter counts; not GPU measurements)", "",
        f"{prov['date']} · commit {prov['git_commit']} · torch {prov['torch']} · triton {prov['triton']} · "
        f"`{prov['command']}` · {res['runtime_s']} s on {prov['device']}", "",
        "## Summary", "",
        "Transfers per element of a fwd+bwd call (floor 3.0), device kernels per fwd+bwd call (Triton launches "
        "+ ATen kernels), host time per call ÷ eager mdistiller KD (cpu backend, tiny input), sm_90 facts and "
        "thread-instructions per column of the streamed LLM row. Details below.", ""] + (
        summary_table(res) if not res.get("quick") else summary_table(res, streamed=("V=32k", "bf16"))) + [
        "",
        "## Transfers and sm_90 facts per preset × shape × dtype", "",
        "**Transfers**: bytes a fwd+bwd call moves per tensor (loads of s and t, stores of the gradient) divided "
        "by N·C·itemsize, counted in the Triton interpreter over the unmasked lanes (DRAM-pessimistic: no cache). "
        "The floor is 3.0 (read s, read t, write the gradient once). *total go≠1* is the same call with "
        "`grad_output` ≠ 1 (sparse-teacher presets: every column in units of the student's [N, V], their own "
        "table below). Streamed shapes run a stand-in with the same number of blocks per row:",
        ""] + [f"- {name}: {how}" for name, how in res["shapes"].items()] + [
        "",
        "**sm_90** (AOT compile of the real shape, pointers 16-byte aligned): registers, spills (local memory "
        "bytes), CTAs per SM, widest global load in the hot code (bits), and thread-instructions per column "
        "of the column loops (SASS instructions × threads / BLOCK_C; single-block rows: the whole kernel).",
        ""] + transfer_table(res) + sparse_section(res) + [
        "", "## Launches per fwd+bwd call (tiny input, Triton backend under the interpreter)", "",
        "Device kernels = Triton launches + ATen ops that launch a kernel (views and allocations excluded); "
        "`go` = grad_output; labelled inputs have one ignored row. The eager column is the preset's published "
        "arithmetic (benchmarks/baselines.py).", ""] + launch_table(res) + [
        "", f"## Host time per fwd+bwd call ({host['input']}, {host['threads']} thread, "
        f"median of {host['repeats']} interleaved rounds of {host['calls_per_repeat']} calls)", "",
        f"Eager mdistiller-style KD (log_softmax + kl_div): **{host['eager_kd']['us']:.1f} µs** "
        f"(spread {100 * host['eager_kd']['spread']:.0f}%). Every ratio is against it, measured in the same run. "
        "kdk-cpu = the fused C++ backend through `kdkernels.logit_distill` (its backward a C++ autograd node); "
        "its kernels = its two launches timed alone on the same input minus the same launches on 0 rows; "
        "host = kdk-cpu − its kernels, the figure the budget reads; eager = the published arithmetic; "
        "reference = kdkernels' reference backend. ± spread = (p80 − p20)/median.", ""] + host_table(res)
    warn = warnings(res)
    if warn:
        lines += ["", "**Warnings**: " + "; ".join(warn)]
    lines += ["", "## Every shipped Triton configuration on sm_90 (tests/test_triton_aot.py)", ""] + \
        shipped_table(res) + ["", "## CUDA fallback", ""] + cuda_table(res) + [""]
    return "\n".join(lines)
