"""The backend-agnostic autograd.Function of the logit engine.

Launcher contract — every fused backend (``_triton``, ``cuda``, ``cpu``) exposes one object with:

``unavailable_reason(device) -> str | None``
    why it cannot run on ``device`` (None when it can).
``forward(s, t, labels, temperature, spec, grad, grad_scale) -> (loss_rows, dtemp_rows)``
    ``spec``: a :class:`~kdkernels.spec.PackedSpec` (``spec.pack()`` → the flat float/int lists,
    ``spec.learnable_temperature``);
    ``s``, ``t``: ``[N, C]``, same dtype, ``stride(1) == 1``; ``labels``: int64 ``[N]`` or None;
    ``temperature``: float ``[N]`` (possibly stride 0) or None (then ``spec.temperature``, a float);
    ``grad``: ``[N, C]`` buffer of ``s.dtype`` (may alias ``s`` for ``inplace``) that receives
    ``grad_scale·∂ℓ_n/∂s_n``, or None when no gradient is needed; ``grad_scale``: a float or a tensor
    ``[N]`` of the loss dtype (possibly stride 0) read on the device. Returns per-row losses ``[N]`` (float32, or
    float64 for float64 inputs; ignored rows 0, bad-label rows NaN) and, when the spec has a learnable
    temperature, ``∂ℓ_n/∂T_n`` ``[N]`` (else None). One launch per pass, no host sync.
``scale_(grad, factor)``
    ``grad[n, :] *= factor[n]`` in place, ``factor`` a ``[N]`` tensor of the loss dtype (possibly
    stride 0) read on the device; rows whose factor is exactly 1.0 are skipped (the usual ``loss.backward()`` costs nothing).
"""
from __future__ import annotations

from typing import Optional

import torch

from .spec import PackedSpec


def valid_rows(labels: Optional[torch.Tensor], spec, N: int, dtype=torch.float32):
    """(#valid rows as a device tensor or int, per-row gradient scale of the reduction in ``dtype``)."""
    if labels is None:
        count = N
    else:
        count = (labels != spec.ignore_index).sum()
    if spec.reduction != "batchmean":
        return count, 1.0
    if isinstance(count, int):
        return count, 1.0 / max(count, 1)
    return count, (1.0 / count.clamp(min=1).to(dtype)).expand(N)


def reduce_loss(rows: torch.Tensor, count, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if isinstance(count, int):
        return total / max(count, 1)
    return total / count.clamp(min=1).to(total.dtype)


class LogitDistillFunction(torch.autograd.Function):
    """Fused forward (loss + gradient in the same passes); backward only scales by ``grad_output``.

    The gradient buffer is scaled in place on the first backward. A second backward through the same
    graph (``retain_graph=True``, gradcheck) recomputes the gradient from the saved logits, so repeated
    backward calls stay exact; with ``inplace=True`` the logits are gone and a second backward raises.
    """

    @staticmethod
    def forward(ctx, s, t, labels, temperature, spec: PackedSpec, launcher):
        N = s.shape[0]
        acc = torch.float64 if s.dtype == torch.float64 else torch.float32
        count, grad_scale = valid_rows(labels, spec, N, acc)
        want_grad = ctx.needs_input_grad[0]
        grad = (s if spec.inplace else torch.empty_like(s)) if want_grad else None
        rows, dtemp = launcher.forward(s, t, labels, temperature, spec, grad, grad_scale)
        ctx.spec, ctx.launcher, ctx.calls = spec, launcher, 0
        ctx.grad, ctx.dtemp, ctx.grad_scale = grad, dtemp, grad_scale
        ctx.save_for_backward(*((None, None) if spec.inplace else (s, t)), labels, temperature)
        return reduce_loss(rows, count, spec.reduction)

    @staticmethod
    def backward(ctx, grad_output):
        spec, launcher = ctx.spec, ctx.launcher
        s, t, labels, temperature = ctx.saved_tensors
        ctx.calls += 1
        grad, dtemp = ctx.grad, ctx.dtemp
        if ctx.calls > 1:
            if spec.inplace:
                raise RuntimeError("kdkernels: inplace=True overwrote the student logits with the gradient; "
                                   "this loss supports a single backward")
            grad = torch.empty_like(s) if grad is not None else None
            _, dtemp = launcher.forward(s, t, labels, temperature, spec, grad, ctx.grad_scale)
        N = grad.shape[0] if grad is not None else dtemp.shape[0]
        factor = grad_output.reshape(-1).expand(N)
        if grad is not None and ctx.needs_input_grad[0]:
            launcher.scale_(grad, factor)
        else:
            grad = None
        d_temperature = None
        if dtemp is not None and ctx.needs_input_grad[3]:
            d_temperature = dtemp * ctx.grad_scale * factor.to(dtemp.dtype)
            d_temperature = d_temperature.to(temperature.dtype)
        return grad, None, None, d_temperature, None, None
