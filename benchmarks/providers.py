"""The implementations a benchmark puts side by side ("providers").

A provider has a ``name``, a one-line ``description``, ``applies(case)`` (False: no row at all, e.g.
Liger for a method other than plain KD), ``unavailable_reason(case, device)`` (a string: a skipped row
that says why) and ``build(case, device) -> f(s, t, y) -> loss``.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from kdkernels import dispatch
from kdkernels.spec import SparseTeacher

from . import baselines
from .methods import TEMPERATURE, loss_fn

INTERPRET_REASON = "TRITON_INTERPRET=1: interpreter timings mean nothing (unset it to time Triton on a GPU)"


class Provider:
    name = "?"
    description = ""

    def applies(self, case) -> bool:
        return True

    def unavailable_reason(self, case, device: torch.device) -> Optional[str]:
        return None

    def build(self, case, device: torch.device):
        raise NotImplementedError


class Kdkernels(Provider):
    """One kdkernels fused backend (triton, cuda, cpu), found through kdkernels.dispatch."""

    def __init__(self, backend: str):
        self.backend = backend
        self.name = f"kdk-{backend}"
        self.description = f"kdkernels backend={backend!r}"

    def unavailable_reason(self, case, device):
        if self.backend == "triton" and dispatch.interpreting():
            return INTERPRET_REASON
        return dispatch.unavailable_reason(self.backend, device, case.family)

    def build(self, case, device):
        return loss_fn(case.method, self.backend)


def published_fn(method: str):
    """``f(s, t, y)``: the method's published arithmetic in eager PyTorch (:mod:`benchmarks.baselines`).

    float16/bfloat16 inputs are computed in float32, as under autocast (softmax and log_softmax are
    autocast-to-float32 ops): that is how the published codes run in mixed precision."""
    fn = baselines.BASELINES[method][0]

    def f(s, t, y):
        if s.dtype in (torch.float16, torch.bfloat16):
            s = s.float()
            t = t.float() if isinstance(t, torch.Tensor) else t  # a stored top-K teacher is float32 already
        return fn(s, t, y)
    return f


class Eager(Provider):
    """The code users replace: the published arithmetic (mdistiller ``kd_loss``/``dkd_loss``, official
    DTKD, LDRLD, TopKD as described; TRL's generalised JSD, torchtune's reverse KL, the Megatron-style
    tail and the MaxText/NeMo-RL renormalised top-K KL), written plainly in :mod:`benchmarks.baselines`."""
    name = "eager"
    description = "the published arithmetic in eager PyTorch (benchmarks/baselines.py; fp32 math for 16-bit inputs)"

    def applies(self, case):
        return case.method in baselines.BASELINES

    def build(self, case, device):
        return published_fn(case.method)


class Reference(Provider):
    """kdkernels' own reference backend (exact, float64-capable; slower than the published codes)."""
    name = "reference"
    description = "kdkernels backend='reference' (the exact PyTorch reference, not a published code)"

    def build(self, case, device):
        return loss_fn(case.method, "reference")


class Compiled(Provider):
    """``torch.compile`` of the eager published arithmetic (of the reference where a method has none);
    the first call (compilation) is excluded from the time.

    The row dimension is marked dynamic (``maybe_mark_dynamic``), so the cases of a sweep over N at one
    C reuse one compilation per mode; the column dimension stays static (a sparse teacher's K is dynamic
    too: one compilation per mode for K = 64, 128, 256).
    """
    name = "compile"
    description = "torch.compile of the eager published arithmetic (compile time excluded; dynamic rows, static columns)"

    def __init__(self, only_methods=None, only_reason: str = ""):
        self.only_methods, self.only_reason = only_methods, only_reason
        self._key, self._fn = None, None

    def unavailable_reason(self, case, device):
        if self.only_methods is not None and case.method not in self.only_methods:
            return self.only_reason or f"torch.compile limited to {','.join(self.only_methods)} in this run"
        if device.type == "cuda" and dispatch.interpreting():
            return INTERPRET_REASON + " (inductor emits Triton kernels)"
        return None

    def build(self, case, device):
        import torch._dynamo as dynamo
        key = (case.method, case.C, case.dtype, device.type)
        if key != self._key:
            dynamo.reset()
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(dynamo.config, name):
                    setattr(dynamo.config, name, max(64, getattr(dynamo.config, name)))
            eager = published_fn(case.method) if case.method in baselines.BASELINES else loss_fn(case.method, "reference")
            self._fn, self._key = torch.compile(eager), key
        fn = self._fn

        def call(s, t, y):
            teacher = (t.ids, t.logprobs) if isinstance(t, SparseTeacher) else (t,)
            for x in (s, *teacher, y):
                if x is not None and x.dim() > 0 and x.shape[0] > 1:
                    dynamo.maybe_mark_dynamic(x, 0)
            if isinstance(t, SparseTeacher):  # one compilation for every K of a sweep
                for x in teacher:
                    dynamo.maybe_mark_dynamic(x, 1)
            return fn(s, t, y)
        return call



def liger_class(name: str, modules):
    """``(Liger-Kernel's class called name, None)`` from the first module that has it, else ``(None, why)``."""
    err = None
    for module in modules:
        try:
            return getattr(importlib.import_module(module), name), None
        except Exception as exc:  # noqa: BLE001 - a reason, not a crash
            err = f"liger_kernel not importable ({type(exc).__name__}: {exc})"
    return None, err


def liger_unavailable_reason(found, device) -> Optional[str]:
    """Why a Liger-Kernel provider cannot run (``found``: what :func:`liger_class` returned), or None."""
    cls, err = found
    if cls is None:
        return err
    if device.type != "cuda":
        return "Liger-Kernel runs Triton kernels on CUDA devices only"
    if dispatch.interpreting():
        return INTERPRET_REASON
    return None

class Liger(Provider):
    """Plain KD as ``log_softmax`` (float32, as autocast does) + Liger-Kernel's fused KL divergence."""
    name = "liger"
    description = "T²·LigerKLDIVLoss(log_target=True)(log_softmax(s/T), log_softmax(t/T)), float32 log_softmax"

    def applies(self, case):
        return case.method == "kd"

    def _kl_class(self):
        return liger_class("LigerKLDIVLoss", ("liger_kernel.transformers.kl_div", "liger_kernel.transformers"))

    def unavailable_reason(self, case, device):
        return liger_unavailable_reason(self._kl_class(), device)

    def build(self, case, device):
        cls, _ = self._kl_class()
        kl = cls(reduction="batchmean", log_target=True)
        T = TEMPERATURE

        def f(s, t, y):
            return (T * T) * kl(torch.log_softmax(s.float() / T, -1), torch.log_softmax(t.float() / T, -1))
        return f


ALIASES = {"triton": "kdk-triton", "cuda": "kdk-cuda", "cpu": "kdk-cpu", "published": "eager",
           "torch.compile": "compile", "kdkernels": "kdk-*"}


def all_providers(compile_only=None, compile_reason: str = "") -> list:
    return [Kdkernels(b) for b in dispatch.BACKENDS if b not in ("auto", "reference")] + \
        [Eager(), Reference(), Compiled(compile_only, compile_reason), Liger()]


def select(names, providers) -> list:
    """The providers named in ``names`` (aliases allowed; ``kdk-*`` = every kdkernels backend)."""
    if not names:
        return providers
    wanted = [ALIASES.get(n.strip(), n.strip()) for n in names if n.strip()]
    known = {p.name for p in providers}
    unknown = [n for n in wanted if n != "kdk-*" and n not in known]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; choose from {sorted(known) + sorted(ALIASES)}")
    return [p for p in providers if p.name in wanted or ("kdk-*" in wanted and p.name.startswith("kdk-"))]
