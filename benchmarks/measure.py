"""The static measurements of one preset, through the public API (``kdkernels.logit_distill``) only.

* :func:`transfers` — HBM transfers per element per tensor of one fwd+bwd call (Triton interpreter,
  unmasked lanes only), ``grad_output`` 1 and ≠ 1. A sparse preset's teacher (ids + logprobs) is counted
  in units of the student's ``[N, V]`` (bytes ÷ N·V·itemsize of s), and also per stored slot.
* :func:`launches` — Triton launches, ATen ops that launch a device kernel, and every op dispatched, per
  fwd+bwd call, with and without labels, ``grad_output`` 1 and ≠ 1.
* :func:`host_overhead` — µs per fwd+bwd call on a tiny input (``cpu`` backend) for every preset, its
  published eager baseline and the kdkernels reference, interleaved with the eager mdistiller-style KD
  that every ratio is taken against.

Everything here needs ``TRITON_INTERPRET=1`` set before ``kdkernels`` is imported (the Triton parts) and
the C++ extension (the host part).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import numpy as np
import torch

import kdkernels as kdk

from . import baselines
from .instruments import OpCounter, classify_ops, count_transfers, fwd_bwd, host_times
from .presets import PRESETS, SHAPES, make_inputs

#: grad_output of the "≠ 1" variants (a loss weight or a warm-up factor applied outside the loss)
GRAD_OUTPUT_NOT_ONE = 0.5
#: the tiny input of the launch and host measurements (C ≥ 2k + 1 for the top-k presets; the LLM top-k
#: presets widen it to their ``min_C``)
TINY_N, TINY_C = 3, 64


def tiny_C(preset: str) -> int:
    return max(TINY_C, PRESETS[preset].min_C)


def error_text(exc: BaseException) -> str:
    """One line naming the exception (a table cell, not a traceback)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]


def _block(shape):
    if shape.interp_block is None:
        return contextlib.nullcontext()
    from kdkernels._triton.engine import forced_block_c
    return forced_block_c(shape.interp_block)


def _one_call(spec, x, t, y, go, backend="triton"):
    loss = kdk.logit_distill(x, t, y, spec, backend=backend)
    return torch.autograd.grad(loss, x, go)[0]


def transfers(preset: str, shape, dtype: torch.dtype, grad_output_not_one: bool = True) -> dict:
    """Bytes per element of every tensor for one fwd+bwd call: ``{'s': loads, 't': loads, 'grad': stores,
    'grad_loads': …, 'total': s + t + grad (+ grad loads), 'total_go': the same with grad_output ≠ 1,
    'other_bytes_per_row': labels, temperatures, losses…, 'launches': {kernel: n}}``; ``total_go`` is None
    when ``grad_output_not_one`` is False (half the interpreter time)."""
    p, sh = PRESETS[preset], (SHAPES[shape] if isinstance(shape, str) else shape)
    spec = p.build()
    s, t, y = make_inputs(sh.interp_N, sh.interp_C, dtype, p.needs_labels, ignored_row=False)
    t = p.teacher(t)
    out = {}
    variants = (("go1", 1.0), ("go", GRAD_OUTPUT_NOT_ONE)) if grad_output_not_one else (("go1", 1.0),)
    for key, go_value in variants:
        x = s.detach().clone().requires_grad_(True)
        go = torch.tensor(go_value)
        with _block(sh), count_transfers() as log, np.errstate(all="ignore"):
            g = _one_call(spec, x, t, y, go)
        el = sh.interp_N * sh.interp_C
        s_ld, s_st = log.bytes_of(x)
        g_ld, g_st = log.bytes_of(g)
        teacher = (t.ids, t.logprobs) if isinstance(t, kdk.SparseTeacher) else (t,)
        t_ld = sum(log.bytes_of(part)[0] for part in teacher)
        # a dense teacher in its own itemsize; a sparse one in units of the student's [N, V]
        t_unit = el * (t.element_size() if len(teacher) == 1 else x.element_size())
        per = {"s": s_ld / (el * x.element_size()), "t": t_ld / t_unit,
               "grad": g_st / (el * g.element_size()), "grad_loads": g_ld / (el * g.element_size()),
               "s_stores": s_st / (el * x.element_size())}
        per["total"] = sum(per.values())
        if len(teacher) == 2:  # the teacher's reads per stored (id, logprob) slot, and the [N, V] part
            slots = sum(part.numel() * part.element_size() for part in teacher)
            per["teacher_reads_per_slot"] = t_ld / slots
            per["student_side"] = per["total"] - per["t"]
        other = log.other({x.data_ptr(), g.data_ptr(), *(part.data_ptr() for part in teacher)})
        per["other_bytes_per_row"] = sum(other.values()) / sh.interp_N
        per["other"] = {k: v / sh.interp_N for k, v in other.items()}
        per["launches"] = dict(log.launches)
        out[key] = per
    res = dict(out["go1"], C_measured=sh.interp_C, streamed=sh.streamed)
    if isinstance(t, kdk.SparseTeacher):
        res["K"] = t.ids.shape[-1]
    res["total_go"] = out["go"]["total"] if "go" in out else None
    res["launches_go"] = out["go"]["launches"] if "go" in out else None
    return res


def sparse_fit(a: dict, b: dict) -> dict:
    """The student-side transfers of a sparse preset split as ``dense + per_slot·K/C`` from two
    :func:`transfers` results of the same preset and dtype at different row lengths C (same K):
    ``dense`` is the [N, V] part (the target: 1 for renorm without CE, ≤ 3 otherwise), ``per_slot`` the
    student elements moved per stored slot (the gather at the ids, the scattered gradient), so that the
    figure at a real vocabulary V is ``dense + per_slot·K/V``."""
    ra, rb = a["K"] / a["C_measured"], b["K"] / b["C_measured"]
    per_slot = (a["student_side"] - b["student_side"]) / (ra - rb)
    return {"dense": a["student_side"] - per_slot * ra, "per_slot": per_slot,
            "teacher_reads_per_slot": max(a["teacher_reads_per_slot"], b["teacher_reads_per_slot"])}


_warm: set = set()


def launches(preset: str, labels: bool, grad_output: float) -> Optional[dict]:
    """Per fwd+bwd call on a tiny input (one ignored row when labelled): Triton launches, ATen ops that
    launch a kernel, every op dispatched, and ``device_kernels`` = Triton launches + ATen kernels.
    None when the preset needs labels and ``labels`` is False."""
    p = PRESETS[preset]
    if p.needs_labels and not labels:
        return None
    spec = p.build()
    s, t, y = make_inputs(TINY_N, tiny_C(preset), torch.float32, labels)
    t = p.teacher(t)
    x = s.detach().clone().requires_grad_(True)
    go = torch.tensor(grad_output)
    if preset not in _warm:  # caches (packing, dispatch) warmed outside the count
        with np.errstate(all="ignore"):
            _one_call(spec, x, t, y, go)
        _warm.add(preset)
    with count_transfers() as log, OpCounter() as ops, np.errstate(all="ignore"):
        _one_call(spec, x, t, y, go)
    kinds = classify_ops(ops.ops)
    triton = sum(log.launches.values())
    return {"triton": triton, "aten_kernels": len(kinds["aten_kernels"]), "ops": len(ops.ops),
            "device_kernels": triton + len(kinds["aten_kernels"]),
            "aten_kernel_ops": kinds["aten_kernels"], "custom_ops": kinds["custom"],
            "triton_kernels": dict(log.launches)}


def eager_ops(preset: str) -> dict:
    """ATen ops of one fwd+bwd call of the preset's published eager baseline (for comparison)."""
    p = PRESETS[preset]
    fn = baselines.BASELINES[preset][0]
    s, t, y = make_inputs(TINY_N, tiny_C(preset), torch.float32, True, ignored_row=False)
    t = p.teacher(t)
    x = s.detach().clone().requires_grad_(True)
    go = torch.tensor(1.0)
    with OpCounter() as ops:
        torch.autograd.grad(fn(x, t, y if p.needs_labels or preset in ("topkd", "tsm-only") else None), x, go)
    kinds = classify_ops(ops.ops)
    return {"aten_kernels": len(kinds["aten_kernels"]), "ops": len(ops.ops)}


def launch_time(call: Callable[[], object], repeats: int = 15, calls: int = 20) -> float:
    """µs the kernels of one ``kdk-cpu`` fwd+bwd ``call`` take: its launches (``logit_distill_fwd`` writing
    the gradient, ``scale_rows_`` by ``grad_output``) recorded once and timed alone, minus the same
    launches on 0 rows (their host part: argument checks and dispatch, which belong to the host time)."""
    from kdkernels import _cpp
    recorded = []
    original = _cpp.CppLauncher.fused_loss

    def record(launcher, s, t, labels, temperature, spec):
        recorded.append((s.detach(), t, labels, temperature, spec))
        return original(launcher, s, t, labels, temperature, spec)
    _cpp.CppLauncher.fused_loss = record
    try:
        call()
    finally:
        _cpp.CppLauncher.fused_loss = original
    if len(recorded) != 1:
        raise RuntimeError(f"expected one fused launch per call, recorded {len(recorded)}")
    s, t, labels, temperature, spec = recorded[0]

    def launches(rows):
        sliced = [None if x is None else x[rows] for x in (s, labels, temperature)]
        teacher = (kdk.SparseTeacher(t.ids[rows], t.logprobs[rows], t.normalize)
                   if isinstance(t, kdk.SparseTeacher) else t[rows])
        grad = torch.empty_like(sliced[0])
        factor = torch.ones((), dtype=_cpp._acc_dtype(s.dtype)).expand(grad.shape[0])
        args = _cpp._op_args(sliced[0], teacher, sliced[1], sliced[2], spec, grad, None)

        def run():
            torch.ops.kdkernels.logit_distill_fwd(*args, _cpp._teacher_ids(teacher))
            torch.ops.kdkernels.scale_rows_(grad, factor)
        return run
    times = host_times({"full": launches(slice(None)), "empty": launches(slice(0, 0))}, repeats=repeats,
                       calls=calls)
    return max(times["full"]["us"] - times["empty"]["us"], 0.0)


def host_overhead(presets=None, repeats: int = 21, calls: int = 30, threads: int = 1) -> dict:
    """µs per fwd+bwd call on a tiny input, every provider interleaved with the eager mdistiller-style KD.

    Providers per preset: ``kdk-cpu`` (the fused C++ backend through the public API), ``eager`` (the
    published arithmetic, :mod:`benchmarks.baselines`) and ``reference`` (kdkernels' reference backend).
    Returns ``{'threads', 'input', 'eager_kd': stats, 'rows': {preset: {provider: stats + ratio}}}``;
    ``ratio`` = median / median of the eager KD of the same run — for ``kdk-cpu`` its host part: the
    median minus ``kernel_us``, the time its two launches (forward writing the gradient, the scale by
    ``grad_output``) take alone on the same input, less the same launches on 0 rows (the op's own host
    part, which stays in the host figure); see :func:`launch_time`. The LLM top-k presets run on their wider
    ``min_C`` rows (still against the eager KD at ``TINY_C``); a provider that raises on the first call
    (an option its backend lacks) gets ``{'error': …}`` instead of a time."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fns = {"eager_kd": None}
        s, t, y = make_inputs(TINY_N, TINY_C, torch.float32, True)
        fns["eager_kd"] = fwd_bwd(lambda x: baselines.kd(x, t), s)
        names = presets or list(PRESETS)
        errors = {}
        for name in names:
            spec, p = PRESETS[name].build(), PRESETS[name]
            wide = tiny_C(name) != TINY_C
            s_p, t_p, y_p = make_inputs(TINY_N, tiny_C(name), torch.float32, True) if wide else (s, t, y)
            t_p = p.teacher(t_p)
            yy = y_p if p.needs_labels else None
            base = baselines.BASELINES[name][0]
            y_base = y_p.clamp(min=0) if yy is not None or name in ("topkd", "tsm-only") else None
            candidates = {
                "kdk-cpu": lambda x, spec=spec, yy=yy, t_p=t_p: kdk.logit_distill(x, t_p, yy, spec, backend="cpu"),
                "eager": lambda x, base=base, yb=y_base, t_p=t_p: base(x, t_p, yb),
                "reference": lambda x, spec=spec, yy=yy, t_p=t_p: kdk.logit_distill(x, t_p, yy, spec,
                                                                                    backend="reference")}
            for provider, loss in candidates.items():
                call = fwd_bwd(loss, s_p)
                try:
                    call()
                except Exception as exc:  # noqa: BLE001 - an option the backend lacks is a row, not a crash
                    errors[f"{name}|{provider}"] = {"error": error_text(exc)}
                    continue
                fns[f"{name}|{provider}"] = call
        kernels = {key: launch_time(fn) for key, fn in fns.items() if key.endswith("|kdk-cpu")}
        stats = host_times(fns, repeats=repeats, calls=calls)
        stats.update(errors)
        for key, kernel_us in kernels.items():
            if key in stats and "error" not in stats[key]:
                stats[key]["kernel_us"] = kernel_us
    finally:
        torch.set_num_threads(old_threads)
    ref = stats.pop("eager_kd")
    rows = {}
    for key, st in stats.items():
        name, provider = key.split("|")
        st = {k: v for k, v in st.items() if k != "samples"}
        if "error" not in st:
            st["host_us"] = st["us"] - st.get("kernel_us", 0.0)
            st["ratio"] = st["host_us"] / ref["us"]
        rows.setdefault(name, {})[provider] = st
    ref = {k: v for k, v in ref.items() if k != "samples"}
    wide = sorted({tiny_C(n) for n in (presets or PRESETS)} - {TINY_C})
    return {"threads": threads, "input": f"N={TINY_N} C={TINY_C} fp32 (one ignored row where labelled"
                                         + (f"; the top-k presets C={'/'.join(map(str, wide))}" if wide else "") + ")",
            "repeats": repeats, "calls_per_repeat": calls, "eager_kd": ref, "rows": rows}
