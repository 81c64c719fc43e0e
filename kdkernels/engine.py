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

    * The gradient buffer is scaled in place on the first backward (rows whose factor is 1.0 are skipped).
    * float16 logits: the gradient is written in backward instead, by a second launch with
      ``grad_output`` folded into its scale, so a loss scaler's factor is applied before the float16
      rounding (small entries would underflow otherwise; bf16 has float32's range and needs no care).
    * A second backward through the same graph (``retain_graph=True``, gradcheck) recomputes the
      gradient from the saved logits the same way, so repeated backward calls stay exact; with
      ``inplace=True`` the logits are overwritten and a second backward raises.
    """

    @staticmethod
    def forward(ctx, s, t, labels, temperature, spec: PackedSpec, launcher):
        N = s.shape[0]
        acc = torch.float64 if s.dtype == torch.float64 else torch.float32
        count, grad_scale = valid_rows(labels, spec, N, acc)
        want_grad = ctx.needs_input_grad[0]
        deferred = want_grad and s.dtype == torch.float16
        grad = (s if spec.inplace else torch.empty_like(s)) if want_grad and not deferred else None
        rows, dtemp = launcher.forward(s, t, labels, temperature, spec, grad, grad_scale)
        ctx.spec, ctx.launcher, ctx.calls, ctx.deferred = spec, launcher, 0, deferred
        ctx.grad, ctx.dtemp, ctx.grad_scale = grad, dtemp, grad_scale
        keep_logits = deferred or not spec.inplace
        ctx.save_for_backward(*((s, t) if keep_logits else (None, None)), labels, temperature)
        return reduce_loss(rows, count, spec.reduction)

    @staticmethod
    def backward(ctx, grad_output):
        spec, launcher = ctx.spec, ctx.launcher
        s, t, labels, temperature = ctx.saved_tensors
        ctx.calls += 1
        grad, dtemp = ctx.grad, ctx.dtemp
        N = dtemp.shape[0] if dtemp is not None else (grad if grad is not None else s).shape[0]
        factor = grad_output.reshape(-1).expand(N)
        want_grad = ctx.needs_input_grad[0] and (grad is not None or ctx.deferred)
        if ctx.calls == 1 and not ctx.deferred:
            if want_grad:
                launcher.scale_(grad, factor)
        elif want_grad:
            if spec.inplace and ctx.calls > 1:
                raise RuntimeError("kdkernels: inplace=True overwrote the student logits with the gradient; "
                                   "this loss supports a single backward")
            # recompute with grad_output folded into the scale: one launch, one rounding
            grad = (s if spec.inplace else torch.empty_like(s)) if want_grad else None
            _, dtemp = launcher.forward(s, t, labels, temperature, spec, grad, factor * ctx.grad_scale)
        d_temperature = None
        if dtemp is not None and ctx.needs_input_grad[3]:
            d_temperature = (dtemp * ctx.grad_scale * factor.to(dtemp.dtype)).to(temperature.dtype)
        return grad if want_grad else None, None, None, d_temperature, None, None
