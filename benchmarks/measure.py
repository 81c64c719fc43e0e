"""The static measurements of one preset, through the public API (``kdkernels.logit_distill``) only.

* :func:`transfers` — HBM transfers per element per tensor of one fwd+bwd call (Triton interpreter,
  unmasked lanes only), ``grad_output`` 1 and ≠ 1.
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
from typing import Optional

import numpy as np
import torch

import kdkernels as kdk

from . import baselines
from .instruments import OpCounter, classify_ops, count_transfers, fwd_bwd, host_times
from .presets import PRESETS, SHAPES, make_inputs

#: grad_output of the "≠ 1" variants (a loss weight or a warm-up factor applied outside the loss)
GRAD_OUTPUT_NOT_ONE = 0.5
#: the tiny input of the launch and host measurements (C ≥ 2k + 1 for the top-k presets)
TINY_N, TINY_C = 3, 64


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
    out = {}
    variants = (("go1", 1.0), ("go", GRAD_OUTPUT_NOT_ONE)) if grad_output_not_one else (("go1", 1.0),)
    for key, go_value in variants:
        x = s.detach().clone().requires_grad_(True)
        go = torch.tensor(go_value)
        with _block(sh), count_transfers() as log, np.errstate(all="ignore"):
            g = _one_call(spec, x, t, y, go)
        el = sh.interp_N * sh.interp_C
        s_ld, s_st = log.bytes_of(x)
        t_ld, _ = log.bytes_of(t)
        g_ld, g_st = log.bytes_of(g)
        per = {"s": s_ld / (el * x.element_size()), "t": t_ld / (el * t.element_size()),
               "grad": g_st / (el * g.element_size()), "grad_loads": g_ld / (el * g.element_size()),
               "s_stores": s_st / (el * x.element_size())}
        per["total"] = sum(per.values())
        other = log.other({x.data_ptr(), t.data_ptr(), g.data_ptr()})
        per["other_bytes_per_row"] = sum(other.values()) / sh.interp_N
        per["other"] = {k: v / sh.interp_N for k, v in other.items()}
        per["launches"] = dict(log.launches)
        out[key] = per
    res = dict(out["go1"])
    res["total_go"] = out["go"]["total"] if "go" in out else None
    res["launches_go"] = out["go"]["launches"] if "go" in out else None
    return res


_warm: set = set()


def launches(preset: str, labels: bool, grad_output: float) -> Optional[dict]:
    """Per fwd+bwd call on a tiny input (one ignored row when labelled): Triton launches, ATen ops that
    launch a kernel, every op dispatched, and ``device_kernels`` = Triton launches + ATen kernels.
    None when the preset needs labels and ``labels`` is False."""
    p = PRESETS[preset]
    if p.needs_labels and not labels:
        return None
    spec = p.build()
    s, t, y = make_inputs(TINY_N, TINY_C, torch.float32, labels)
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
    s, t, y = make_inputs(TINY_N, TINY_C, torch.float32, True, ignored_row=False)
    x = s.detach().clone().requires_grad_(True)
    go = torch.tensor(1.0)
    with OpCounter() as ops:
        torch.autograd.grad(fn(x, t, y if p.needs_labels or preset in ("topkd", "tsm-only") else None), x, go)
    kinds = classify_ops(ops.ops)
    return {"aten_kernels": len(kinds["aten_kernels"]), "ops": len(ops.ops)}


def host_overhead(presets=None, repeats: int = 21, calls: int = 30, threads: int = 1) -> dict:
    """µs per fwd+bwd call on a tiny input, every provider interleaved with the eager mdistiller-style KD.

    Providers per preset: ``kdk-cpu`` (the fused C++ backend through the public API), ``eager`` (the
    published arithmetic, :mod:`benchmarks.baselines`) and ``reference`` (kdkernels' reference backend).
    Returns ``{'threads', 'input', 'eager_kd': stats, 'rows': {preset: {provider: stats + ratio}}}``;
    ``ratio`` = median / median of the eager KD of the same run."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fns = {"eager_kd": None}
        s, t, y = make_inputs(TINY_N, TINY_C, torch.float32, True)
        fns["eager_kd"] = fwd_bwd(lambda x: baselines.kd(x, t), s)
        names = presets or list(PRESETS)
        for name in names:
            spec, p = PRESETS[name].build(), PRESETS[name]
            yy = y if p.needs_labels else None
            base = baselines.BASELINES[name][0]
            y_base = y.clamp(min=0) if yy is not None or name in ("topkd", "tsm-only") else None
            fns[f"{name}|kdk-cpu"] = fwd_bwd(lambda x, spec=spec, yy=yy: kdk.logit_distill(x, t, yy, spec, backend="cpu"), s)
            fns[f"{name}|eager"] = fwd_bwd(lambda x, base=base, yb=y_base: base(x, t, yb), s)
            fns[f"{name}|reference"] = fwd_bwd(
                lambda x, spec=spec, yy=yy: kdk.logit_distill(x, t, yy, spec, backend="reference"), s)
        stats = host_times(fns, repeats=repeats, calls=calls)
    finally:
        torch.set_num_threads(old_threads)
    ref = stats.pop("eager_kd")
    rows = {}
    for key, st in stats.items():
        name, provider = key.split("|")
        st = {k: v for k, v in st.items() if k != "samples"}
        st["ratio"] = st["us"] / ref["us"]
        rows.setdefault(name, {})[provider] = st
    ref = {k: v for k, v in ref.items() if k != "samples"}
    return {"threads": threads, "input": f"N={TINY_N} C={TINY_C} fp32 (one ignored row where labelled)",
            "repeats": repeats, "calls_per_repeat": calls, "eager_kd": ref, "rows": rows}
