"""The backend-agnostic autograd.Function of the logit engine.

Launcher contract — every fused backend (``_triton``, ``cuda``, ``cpu``) exposes one object with:

``unavailable_reason(device) -> str | None``
    why it cannot run on ``device`` (None when it can).
``forward(s, t, labels, temperature, spec, grad, grad_factor) -> (loss, dtemp)``
    **One launch** (one op), no host sync. ``spec``: a :class:`~kdkernels.spec.PackedSpec`;
    ``s``, ``t``: ``[N, C]`` with ``stride(1) == 1``, each of its own floating dtype (loaded as is,
    computed in the accumulation dtype: float64 for a float64 student, else float32); ``labels``:
    contiguous int64 ``[N]`` or None; ``temperature``: ``[N]`` (possibly stride 0) or None (then the
    packed float); ``t`` may instead be a :class:`~kdkernels.spec.SparseTeacher` whose ``ids`` (int32 or
    int64) and ``logprobs`` are 2-D ``[N, K]`` with unit column stride (the packed spec's ``topk_mode`` says
    so). ``loss``: the *reduced* loss — ``[N]`` row losses × ``loss_weight`` for reduction
    ``none``, else a 0-dim tensor (``sum``; ``batchmean`` divides by the number of rows whose label is not
    ``ignore_index``, counted inside the launch). ``grad``: None or ``[N, C]`` of ``s.dtype`` (may alias
    ``s`` for ``inplace``) that receives ``grad_factor · ∂loss/∂s``; ``grad_factor``: None (= 1) or an
    ``[N]`` tensor of the accumulation dtype (possibly stride 0) read on the device. ``dtemp``: None, or
    for a learnable temperature ``∂loss/∂T_n`` ``[N]`` (without ``grad_factor``).
``scale_(grad, factor)``
    ``grad[n, :] *= factor[n]`` in place, ``factor`` an ``[N]`` tensor (possibly stride 0) read on the
    device; rows whose factor is exactly 1.0 are skipped (the usual ``loss.backward()`` costs no pass).
``fused_loss(s, t, labels, temperature, spec) -> loss`` (optional; ``None`` where absent)
    the same forward launch writing the gradient, with its backward (``scale_`` by ``grad_output``)
    recorded by a native autograd node, so no Python runs in backward and the Function's Python costs
    are skipped (the C++ backends: ``csrc/autograd.cpp``). :func:`fused_logit_distill` takes it only for
    calls that need nothing beyond the contract below (see :func:`_native_autograd`); it follows the
    same contract (one buffer, second backward and double backward raise).

The autograd contract (what the Function holds and allows):

* forward writes the gradient when, and only when, grad mode is on and the student requires grad;
  between forward and backward it holds at most that one ``[N, C]`` buffer (saved with
  ``save_for_backward``, so saved-tensor hooks such as ``save_on_cpu`` see it), none with
  ``inplace=True``; backward scales it by ``grad_output`` (one launch, a no-op pass when it is 1);
* a second backward through the same graph needs the logits: opt in with
  :func:`repeatable_backward` (gradcheck, ``retain_graph=True``), else it raises;
* double backward (``create_graph=True``) is not supported by the fused path: differentiating the
  gradient raises (``once_differentiable``); ``backend="reference"`` gives higher derivatives;
* float16 logits: the gradient is written in backward instead (a second launch with ``grad_output``
  folded in, so a loss scaler's factor reaches it before the float16 rounding); this keeps ``s`` and
  ``t`` until backward (bf16 and fp32 do not need it).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .spec import PackedSpec

_repeatable = False


@contextlib.contextmanager
def repeatable_backward(enabled: bool = True):
    """Keep the logits of fused losses created inside this block, so that their graph can be
    differentiated more than once (``torch.autograd.gradcheck``, ``retain_graph=True``). Costs the
    memory of ``s`` and ``t`` until the graph is freed."""
    global _repeatable
    old, _repeatable = _repeatable, bool(enabled)
    try:
        yield
    finally:
        _repeatable = old


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_SECOND_BACKWARD = (
    "kdkernels: this fused loss was already differentiated once and did not keep its logits "
    "(at most one [N, C] buffer is held between forward and backward). For a repeated backward "
    "(gradcheck, retain_graph=True) build the loss inside `with kdkernels.repeatable_backward():`, "
    "or use backend='reference'.")


class LogitDistillFunction(torch.autograd.Function):
    """Fused forward (loss + gradient in one launch); backward only scales by ``grad_output``.

    ``apply(s, t, labels, temperature, spec, launcher, want_grad, keep_inputs)`` returns
    ``(loss, grad, dtemp)``; only ``loss`` is differentiable. ``want_grad``: whether to write the student
    gradient (grad mode on and ``s.requires_grad``; decided by the caller, since ``forward`` has no
    context in the ``setup_context`` style that ``torch.func`` needs); ``keep_inputs``: keep ``s`` and
    ``t`` for a repeated backward.
    """

    @staticmethod
    def forward(s, t, labels, temperature, spec: PackedSpec, launcher, want_grad: bool, keep_inputs: bool):
        deferred = want_grad and s.dtype == torch.float16
        grad = None
        if want_grad and not deferred:
            grad = s if spec.inplace else torch.empty_like(s)
        loss, dtemp = launcher.forward(s, t, labels, temperature, spec, grad, None)
        return loss, grad, dtemp

    @staticmethod
    def setup_context(ctx, inputs, output):
        s, t, labels, temperature, spec, launcher, want_grad, keep_inputs = inputs
        _, grad, dtemp = output
        deferred = want_grad and s.dtype == torch.float16
        ctx.spec, ctx.launcher, ctx.deferred, ctx.calls, ctx.n_rows = spec, launcher, deferred, 0, s.shape[0]
        ctx.want_grad, ctx.inplace = want_grad, want_grad and spec.inplace
        ctx.keep_inputs = deferred or (keep_inputs and not ctx.inplace)
        ctx.mark_non_differentiable(*(x for x in (grad, dtemp) if x is not None))
        ctx.set_materialize_grads(False)  # else autograd fills an [N, C] zero "gradient" of the grad output
        # the one [N, C] buffer goes through save_for_backward (saved-tensor hooks see it); it is scaled in
        # place by the first backward, so later backward calls (opt-in) never unpack it again
        ctx.save_for_backward(grad)
        ctx.dtemp, ctx.labels, ctx.temperature = dtemp, labels, temperature
        ctx.inputs = (s, t) if ctx.keep_inputs else None

    @staticmethod
    def backward(ctx, grad_output, _grad_grad=None, _grad_dtemp=None):
        if grad_output is None:  # the loss itself was not used (only its non-differentiable outputs)
            return (None,) * 8
        create_graph = torch.is_grad_enabled()
        with torch.no_grad():
            grads = LogitDistillFunction._backward(ctx, grad_output)
        if create_graph and not torch._C._are_functorch_transforms_active():
            # the gradient is not differentiable: differentiating it raises, never silently gives 0
            return _not_differentiable(grads)
        return grads

    @staticmethod
    def _backward(ctx, grad_output):
        ctx.calls += 1
        dtemp, labels, temperature = ctx.dtemp, ctx.labels, ctx.temperature
        n_rows = ctx.n_rows
        factor = grad_output.reshape(-1).expand(n_rows)
        want_grad = ctx.want_grad and ctx.needs_input_grad[0]
        grad = None
        if want_grad:
            if ctx.calls == 1 and not ctx.deferred:
                grad, = ctx.saved_tensors
                ctx.launcher.scale_(grad, factor)
            elif ctx.inputs is None or (ctx.inplace and ctx.calls > 1):
                raise RuntimeError(_SECOND_BACKWARD)
            else:  # recompute with grad_output folded into the scale: one launch, one rounding
                s, t = ctx.inputs
                grad = s if ctx.inplace else torch.empty_like(s)
                ctx.launcher.forward(s, t, labels, temperature, ctx.spec, grad, factor.to(_acc_dtype(s.dtype)))
        d_temperature = None
        if dtemp is not None and ctx.needs_input_grad[3]:
            d_temperature = (dtemp * factor.to(dtemp.dtype)).to(temperature.dtype)
        return grad, None, None, d_temperature, None, None, None, None


class _EagerFunction(LogitDistillFunction):
    """The same Function in the classic ``forward(ctx, ...)`` form. ``apply`` of a Function that defines
    ``setup_context`` binds its arguments through ``inspect.signature`` on every call (~20 % of a
    small call's host time); this form skips that and is used whenever no ``torch.func`` transform is
    active (the transforms need the ``setup_context`` form)."""

    @staticmethod
    def forward(ctx, *args):
        output = LogitDistillFunction.forward(*args)
        LogitDistillFunction.setup_context(ctx, args, output)
        return output

    setup_context = torch.autograd.Function.setup_context


_DOUBLE_BACKWARD = (
    b"kdkernels: the fused loss's gradient is not differentiable (double backward, e.g. a gradient "
    b"penalty). Use backend='reference' for higher derivatives.")


def _not_differentiable(grads):
    """Attach a node to each gradient that raises when the gradient itself is differentiated."""
    tensors = [g for g in grads if g is not None]
    err = torch._C._functions.DelayedError(_DOUBLE_BACKWARD, len(tensors))
    out = err(*[g.detach().requires_grad_() for g in tensors])
    wrapped = iter((out,) if isinstance(out, torch.Tensor) else out)
    return tuple(next(wrapped) if g is not None else None for g in grads)


def check_inplace(s: torch.Tensor, t: torch.Tensor) -> None:
    """``inplace=True`` writes the gradient into the student's storage: refuse where that is unsafe."""
    if not _dense(s):
        raise ValueError("inplace=True needs student logits whose storage does not overlap itself "
                         "(an expanded/stride-0 or otherwise overlapping view would race); pass a dense "
                         "tensor or use inplace=False")
    if isinstance(t, tuple):  # a SparseTeacher: its log-probabilities are what the gradient must not overwrite
        t = t.logprobs
    if _overlaps(s, t):
        raise ValueError("inplace=True: the student logits share memory with the teacher logits; writing "
                         "the gradient would destroy the teacher. Use inplace=False")


def _dense(x: torch.Tensor) -> bool:
    """Whether ``x`` covers a contiguous block of memory without overlap (a permutation of a contiguous
    layout): no stride-0 or otherwise overlapping views."""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(x.shape, x.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the byte ranges spanned by two tensors intersect (a conservative test)."""
    if a.numel() == 0 or b.numel() == 0:
        return False

    def span(x):
        lo = x.data_ptr()
        hi = lo + sum((n - 1) * st for n, st in zip(x.shape, x.stride())) * x.element_size() + x.element_size()
        return lo, hi

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def fused_logit_distill(s: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor],
                        temperature: Optional[torch.Tensor], spec: PackedSpec, launcher) -> torch.Tensor:
    """The reduced loss of ``spec`` through ``launcher`` (2-D ``s``, ``t`` with unit column stride)."""
    want_grad = torch.is_grad_enabled() and s.requires_grad
    if spec.inplace and want_grad and not torch.compiler.is_compiling():  # (traced: checked in eager runs)
        check_inplace(s, t)
    if not want_grad and (temperature is None or not temperature.requires_grad or not torch.is_grad_enabled()):
        # no autograd graph: one launch, nothing kept
        return launcher.forward(s, t, labels, temperature, spec, None, None)[0]
    if _native_autograd(s, temperature, spec, launcher):
        return launcher.fused_loss(s, t, labels, temperature, spec)
    function = LogitDistillFunction if torch._C._are_functorch_transforms_active() else _EagerFunction
    loss, _, _ = function.apply(s, t, labels, temperature, spec, launcher, want_grad, _repeatable)
    return loss



def _native_autograd(s: torch.Tensor, temperature: Optional[torch.Tensor], spec: PackedSpec, launcher) -> bool:
    """Whether a call that writes the gradient can take the launcher's ``fused_loss``: the launcher has one,
    and the call needs none of what only the Python Function does — a learnable temperature (dtemp),
    ``inplace``, float16's deferred gradient, a repeatable backward, ``torch.func`` transforms, tracing."""
    return (getattr(launcher, "fused_loss", None) is not None and not spec.inplace and s.dtype != torch.float16
            and not _repeatable and (temperature is None or not temperature.requires_grad)
            and not torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling())
