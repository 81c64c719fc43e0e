"""Check a provider against the float64 reference before it is timed.

The truth is kdkernels' reference evaluated on the inputs upcast to float64. Logit methods are
row-independent, so the reference runs in row chunks (``reduction="sum"``, divided by N), which keeps
its memory bounded at LLM shapes. The loss is always checked over all rows; the gradient over all rows
up to ``FULL_GRAD_ELEMENTS`` elements, beyond that over ``SAMPLED_CHUNKS`` evenly spaced row chunks
that include the first and the last (where indexing bugs show). Errors are relative:
``|loss − ref| / |ref|`` and ``‖grad − ref‖ / ‖ref‖``; NaN never passes.
"""
from __future__ import annotations

import math
import time

import torch

from .methods import loss_fn
from .shapes import teacher_as, teacher_rows

#: relative tolerance per input dtype, for the loss and the gradient
TOLERANCE = {"fp64": 1e-9, "fp32": 1e-4, "fp16": 5e-3, "bf16": 1e-2}
FULL_GRAD_ELEMENTS = 1 << 26
CHUNK_ELEMENTS = 1 << 24
SAMPLED_CHUNKS = 8


class VerificationError(AssertionError):
    """The provider's loss or gradient differs from the float64 reference by more than the tolerance."""


class Reference:
    """The float64 reference of one case's inputs: the loss (cached) and the gradient, chunk by chunk."""

    def __init__(self, case, s, t, y):
        self.case, self.s, self.t, self.y = case, s, t, y
        self.f = loss_fn(case.method, "reference")
        self.rows = case.N if case.family == "contrastive" else max(1, CHUNK_ELEMENTS // case.C)
        self._loss = None

    def chunks(self, sampled: bool):
        n = math.ceil(self.case.N / self.rows)
        idx = range(n)
        if sampled and n > SAMPLED_CHUNKS:
            idx = sorted({round(i * (n - 1) / (SAMPLED_CHUNKS - 1)) for i in range(SAMPLED_CHUNKS)})
        return [(i * self.rows, min(self.case.N, (i + 1) * self.rows)) for i in idx]

    def _eval(self, a, b, want_grad):
        x = self.s[a:b].detach().to(torch.float64).requires_grad_(want_grad)
        t = teacher_as(teacher_rows(self.t, a, b), torch.float64)
        y = None if self.y is None else self.y[a:b]
        if self.case.family == "contrastive":
            loss = self.f(x, t, y)
            scale = 1.0
        else:
            loss = self.f(x, t, y, reduction="sum")
            scale = 1.0 / self.case.N
        grad = torch.autograd.grad(loss, x)[0] * scale if want_grad else None
        return loss.detach() * scale, grad

    def loss(self) -> float:
        if self._loss is None:
            with torch.enable_grad():
                self._loss = sum(float(self._eval(a, b, False)[0]) for a, b in self.chunks(False))
        return self._loss

    def grad_error(self, grad: torch.Tensor):
        """(‖grad − ref‖/‖ref‖ over the checked rows, how many rows were checked)."""
        sampled = self.case.N * self.case.C > FULL_GRAD_ELEMENTS
        diff2 = ref2 = 0.0
        rows = 0
        for a, b in self.chunks(sampled):
            _, g = self._eval(a, b, True)
            diff2 += float((grad[a:b].to(torch.float64) - g).square().sum())
            ref2 += float(g.square().sum())
            rows += b - a
        return math.sqrt(diff2) / max(math.sqrt(ref2), 1e-300), rows


def rel(x: float, ref: float) -> float:
    return abs(x - ref) / max(abs(ref), 1e-300)


def verify(case, f, s, t, y, mode: str, ref: Reference) -> dict:
    """Run ``f`` once in ``mode`` and compare with ``ref``; returns the errors, raises VerificationError."""
    tol = TOLERANCE[case.dtype]
    t0 = time.perf_counter()
    if mode == "fwd":
        with torch.no_grad():
            loss = float(f(s, t, y))
        call_ms = (time.perf_counter() - t0) * 1e3
        out = {"loss_err": rel(loss, ref.loss()), "grad_err": None, "checked": "loss"}
    else:
        x = s.detach().requires_grad_(True)
        loss = f(x, t, y)
        grad = torch.autograd.grad(loss, x)[0]
        loss = float(loss.detach())
        call_ms = (time.perf_counter() - t0) * 1e3
        del x
        grad_err, rows = ref.grad_error(grad)
        del grad
        out = {"loss_err": rel(loss, ref.loss()), "grad_err": grad_err,
               "checked": f"loss+grad({rows}/{case.N} rows)"}
    bad = [f"{k} {out[k]:.2e}" for k in ("loss_err", "grad_err")
           if out[k] is not None and not out[k] <= tol]
    if bad:
        exc = VerificationError(f"differs from the float64 reference: {', '.join(bad)} > tol {tol:.0e}")
        exc.errors = {"loss_err": out["loss_err"], "grad_err": out["grad_err"], "verified": "FAILED"}
        raise exc
    out["call_ms"] = call_ms
    return out
