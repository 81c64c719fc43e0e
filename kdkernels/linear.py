"""Fused linear distillation: any :class:`~kdkernels.spec.LogitDistill` spec straight from hidden states,
without ``[N, V]`` logits in memory (docs/fused_linear.md).

    fused_linear_distill(h [N, H], W [V, H], teacher, labels, spec)
        = logit_distill(softcap(h @ Wᵀ + b), teacher_logits, labels, spec)

The chunk loop (``_chunk_pass``), per chunk of ``n_c`` token rows:

1. ``z_c = h_c @ Wᵀ (+ b)`` — one matmul (cuBLAS / CPU BLAS), the chunk's student logits ``[n_c, V]``;
   a ``TeacherHidden`` teacher's logits likewise, without gradient;
2. the engine's fused kernel on the chunk, **in place**: the logits buffer becomes its gradient
   ``g_c = ∂loss/∂z_c`` (the valid-token count and ``grad_output`` folded in through the launcher's
   ``grad_factor``, read on the device: no host sync);
3. ``∂h_c = g_c @ W`` and ``∂W += g_cᵀ @ h_c`` (float32 accumulation across chunks), ``∂b += Σ g_c``.

The logits keep the model's rounding (bf16 hidden states and weight give bf16 logits, as ``F.linear``
does), but the chunk buffer the kernel turns into the gradient is float32, so ``∂W`` sums unrounded
gradients (a bf16 gradient of the logits, as unfused autograd holds it, loses ~1 % of ``∂W`` to
cancellation across tokens).

So at most ``chunk × V`` logits (student, and a hidden teacher's) exist at a time. With ``sum``/``batchmean``
the gradients are computed in forward (as the logit engine does) and backward only scales them by
``grad_output`` (skipped when it is 1, on the device); with ``none`` the per-row ``grad_output`` must reach
every chunk before the weight-gradient sum, so backward runs the loop again with it folded in.

Sparse teacher, ``normalize="renorm"``, no CE: the student logits are needed only at the teacher's K ids,
``z[n, k] = h_n · W[ids[n, k]] (+ b)`` (a gather of K weight rows per token and a batched small matmul);
the engine runs on the ``[n_c, K]`` block with the slots as classes, ``∂h = Σ_k g[n, k]·W[ids[n, k]]``, and
``∂W`` is a scatter-add into those rows: time and memory do not grow with V.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .dispatch import load_launcher, resolve
from .spec import LogitDistill, SparseTeacher, coerce_softcap
from .validation import (check_label_values, check_mode, check_sparse_values, flatten_labels, flatten_sparse,
                         flatten_temperature)

#: default memory budget of one chunk's temporaries (student logits, a hidden teacher's logits, the
#: float32 copies of the weight-gradient matmul); ``chunk_size=None`` picks the largest power of two under it
CHUNK_BUDGET_BYTES = 1 << 30
#: bytes of the float32 operands of the weight-gradient matmul, per logit (``g_c`` upcast)
_FP32_BYTES = 4


class TeacherLogits(NamedTuple):
    """A dense teacher given as logits ``[..., V]`` (the student's leading dims)."""

    logits: torch.Tensor


class TeacherHidden(NamedTuple):
    """A teacher given as hidden states ``[..., H_t]`` and its lm_head ``weight [V, H_t]`` (+ ``bias [V]``,
    ``softcap``): its logits are computed chunk by chunk, without gradient."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    softcap: Optional[float] = None


def _linear(h, weight, bias):
    """The model's own op (``F.linear``: the bias added inside the matmul, one rounding for 16-bit logits)."""
    return torch.nn.functional.linear(h, weight, bias)


def _check_linear(name, hidden, weight, bias, lead=None):
    for what, x in ((f"{name} hidden states", hidden), (f"{name} weight", weight)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{what} must be a floating-point tensor")
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}: hidden states [..., H] and weight [V, H] must agree in H, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if lead is not None and tuple(hidden.shape[:-1]) != tuple(lead):
        raise ValueError(f"{name} hidden states must have the student's leading dims {tuple(lead)}, got "
                         f"{tuple(hidden.shape[:-1])}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"{name} bias must be a tensor of shape ({weight.shape[0]},)")
    for x in (weight, bias):
        if x is not None and x.device != hidden.device:
            raise ValueError(f"{name}: hidden states, weight and bias must be on one device")


def default_chunk_size(N: int, V: int, itemsize: int, hidden_teacher: bool, budget: int = CHUNK_BUDGET_BYTES) -> int:
    """The largest power-of-two chunk of token rows whose temporaries fit ``budget`` bytes: the student's
    chunk logits from the matmul, their float32 copy that the kernel turns into the gradient, and a hidden
    teacher's chunk logits."""
    per_row = V * (itemsize + _FP32_BYTES + (itemsize if hidden_teacher else 0))
    rows = max(1, budget // max(per_row, 1))
    return max(1, min(1 << (rows.bit_length() - 1), N))


class _Problem(NamedTuple):
    """Everything the chunk loop needs, flattened to rows (``[N, H]``, ``[N]``, …)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    teacher: object              # [N, V] logits, TeacherHidden with [N, H_t] hidden, or SparseTeacher [N, K]
    labels: Optional[torch.Tensor]
    temperature: Optional[torch.Tensor]
    spec: LogitDistill           # reduction "sum"/"none" as the chunks see it; softcap folded in
    chunk: int
    sparse_gather: bool          # sparse renorm without CE: student logits at the K ids only


def _teacher_chunk(teacher, rows: slice):
    if isinstance(teacher, SparseTeacher):
        return SparseTeacher(teacher.ids[rows], teacher.logprobs[rows], teacher.normalize)
    if isinstance(teacher, TeacherHidden):
        with torch.no_grad():
            return _linear(teacher.hidden[rows], teacher.weight, teacher.bias)
    return teacher[rows]


def _gathered_chunk(prob: _Problem, rows: slice):
    """Sparse renorm: the student logits at the K ids ``[n_c, K]`` (slots as classes) and the teacher with
    slot ids (``-1`` padding; ``K`` for an id outside the vocabulary, so the kernel makes that row NaN)."""
    teacher = prob.teacher
    ids = teacher.ids[rows].long()
    V, K = prob.weight.shape[0], ids.shape[-1]
    valid = (ids >= 0) & (ids < V)
    safe = torch.where(valid, ids, torch.zeros_like(ids))
    w_rows = prob.weight[safe]                                          # [n_c, K, H]
    h_c = prob.hidden[rows].unsqueeze(-1)
    if prob.bias is None:
        z = torch.bmm(w_rows, h_c).squeeze(-1)                                   # [n_c, K]
    else:  # the bias added inside the matmul (one rounding for 16-bit logits, as F.linear)
        z = torch.baddbmm(prob.bias[safe].unsqueeze(-1), w_rows, h_c).squeeze(-1)
    z = z.to(torch.float64 if z.dtype == torch.float64 else torch.float32)
    slot = torch.arange(K, device=ids.device).expand_as(ids)
    slot_ids = torch.where(valid, slot, torch.where(ids < 0, -1, K)).to(torch.int32)
    return z.contiguous(), SparseTeacher(slot_ids, teacher.logprobs[rows], teacher.normalize), safe, w_rows


def _slot_labels(labels, ignore_index: int, V: int, K: int) -> torch.Tensor:
    """Labels of a gathered ``[n_c, K]`` chunk, where they only mark ignored rows: an ignored row stays
    ignored, a label in ``[0, V)`` becomes slot 0, a bad label becomes ``K`` (so the row is NaN, as unfused)."""
    in_range = (labels >= 0) & (labels < V)
    return torch.where(labels == ignore_index, labels, torch.where(in_range, 0, K)).contiguous()


def _chunk_pass(prob: _Problem, launcher, packed, grad_factor, want_grad: bool):
    """One sweep of the chunk loop: ``(loss per chunk, ∂h, ∂W (float32), ∂b (float32), dtemp)``; ``loss`` is
    a list of the chunk results (``[n_c]`` rows or 0-dim sums)."""
    h, W, b = prob.hidden, prob.weight, prob.bias
    N = h.shape[0]
    acc = torch.float64 if h.dtype == torch.float64 or W.dtype == torch.float64 else torch.float32
    grad_h = torch.empty_like(h) if want_grad else None
    grad_w = torch.zeros(W.shape, dtype=acc, device=W.device) if want_grad else None
    grad_b = torch.zeros(W.shape[0], dtype=acc, device=W.device) if want_grad and b is not None else None
    losses, dtemps = [], []
    for start in range(0, N, prob.chunk):
        rows = slice(start, min(start + prob.chunk, N))
        h_c = h[rows]
        if prob.sparse_gather:
            z, teacher, safe, w_rows = _gathered_chunk(prob, rows)
        else:
            z, teacher = _linear(h_c, W, b), _teacher_chunk(prob.teacher, rows)
        # the logits keep the model's rounding (a bf16 matmul gives bf16 logits); the buffer that becomes
        # their gradient is float32 (float64), so the weight gradient sums unrounded chunk gradients
        z = z.to(acc).contiguous()
        temp = prob.temperature[rows] if prob.temperature is not None else None
        factor = grad_factor[rows] if grad_factor is not None and grad_factor.dim() else grad_factor
        if factor is not None and factor.dim() == 0:
            factor = factor.expand(z.shape[0])
        labels = prob.labels[rows] if prob.labels is not None else None
        if prob.sparse_gather and labels is not None:  # (only an ignore mask here: classes are the K slots)
            labels = _slot_labels(labels, prob.spec.ignore_index, W.shape[0], z.shape[1])
        loss, dtemp = launcher.forward(z, teacher, labels, temp, packed, z if want_grad else None, factor)
        losses.append(loss)
        if dtemp is not None:
            dtemps.append(dtemp)
        if not want_grad:
            continue
        g = z  # the kernel wrote the gradient into the logits buffer (accumulation dtype)
        if prob.sparse_gather:
            grad_h[rows] = torch.bmm(g.unsqueeze(1).to(w_rows.dtype), w_rows).squeeze(1).to(h.dtype)
            contrib = g.unsqueeze(-1) * h_c.to(acc).unsqueeze(1)          # [n_c, K, H]
            grad_w.index_add_(0, safe.reshape(-1), contrib.reshape(-1, W.shape[1]))
            if grad_b is not None:
                grad_b.index_add_(0, safe.reshape(-1), g.reshape(-1))
        else:
            grad_h[rows] = (g.to(W.dtype) @ W).to(h.dtype)
            grad_w.addmm_(g.t(), h_c.to(acc))
            if grad_b is not None:
                grad_b += g.sum(0)
    dtemp = torch.cat(dtemps) if dtemps else None
    return losses, grad_h, grad_w, grad_b, dtemp


class FusedLinearDistillFunction(torch.autograd.Function):
    """``apply(hidden, weight, bias, temperature, prob, launcher, packed, inv_count)`` → the reduced loss;
    gradients to the hidden states, the weight, the bias and a learnable temperature.

    ``sum``/``batchmean``: the gradients are computed in forward (``inv_count`` folded into the chunk
    gradients) and scaled by ``grad_output`` in backward. ``none`` and float16 logits are *deferred*: backward
    runs the chunk loop again with ``grad_output`` folded in (per row for ``none``; for float16 so that a loss
    scale reaches the gradient before its float16 rounding, as the logit engine does)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, temperature, prob: _Problem, launcher, packed, inv_count):
        per_row = prob.spec.reduction == "none"
        want = any(ctx.needs_input_grad[:4])
        ctx.deferred = want and (per_row or torch.float16 in (hidden.dtype, weight.dtype))
        # only a deferred backward needs the inputs (hidden states, weight, teacher) again: nothing else is
        # kept, so a graph that outlives its backward (a loss variable reassigned next step) holds no teacher
        ctx.prob = prob if ctx.deferred else None
        ctx.launcher, ctx.packed, ctx.inv_count = launcher, packed, inv_count
        ctx.dtypes = tuple(None if x is None else x.dtype for x in (hidden, weight, bias, temperature))
        losses, grad_h, grad_w, grad_b, dtemp = _chunk_pass(prob, launcher, packed, inv_count,
                                                            want and not ctx.deferred)
        loss = torch.cat(losses) if per_row else torch.stack(losses).sum()
        if inv_count is not None:
            loss = loss * inv_count
            dtemp = dtemp * inv_count if dtemp is not None else None
        ctx.save_for_backward(grad_h, grad_w, grad_b, dtemp)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        inv_count = ctx.inv_count
        go = grad_output.to(torch.float64 if ctx.dtypes[0] == torch.float64 else torch.float32)
        if ctx.deferred:  # grad_output (× 1/count) goes into the chunk gradients before any rounding
            if ctx.prob is None:
                raise RuntimeError(_SECOND_BACKWARD)
            factor = go if inv_count is None else go * inv_count
            _, grad_h, grad_w, grad_b, dtemp = _chunk_pass(ctx.prob, ctx.launcher, ctx.packed, factor, True)
            ctx.prob = None
            d_temp = dtemp * factor.expand_as(dtemp) if dtemp is not None else None
        else:
            grad_h, grad_w, grad_b, dtemp = ctx.saved_tensors
            go = go.reshape(())
            grad_h, grad_w, grad_b, d_temp = (None if x is None else x * go.to(x.dtype)
                                              for x in (grad_h, grad_w, grad_b, dtemp))
        need = ctx.needs_input_grad
        _, w_dtype, b_dtype, t_dtype = ctx.dtypes
        out_h = grad_h if need[0] else None
        out_w = grad_w.to(w_dtype) if grad_w is not None and need[1] else None
        out_b = grad_b.to(b_dtype) if grad_b is not None and need[2] else None
        out_t = d_temp.to(t_dtype) if d_temp is not None and need[3] else None
        return out_h, out_w, out_b, out_t, None, None, None, None


_SECOND_BACKWARD = ("kdkernels.fused_linear_distill: this loss was already differentiated once and does not keep "
                    "its inputs; a repeated backward (retain_graph=True) is not supported by the fused path "
                    "(use backend='reference')")


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def fused_linear_distill(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher,
                         labels: Optional[torch.Tensor] = None, spec: Optional[LogitDistill] = None, *,
                         student_bias: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                         chunk_size: Optional[int] = None, backend: str = "auto",
                         process_group=None) -> torch.Tensor:
    """``logit_distill(softcap(student_hidden @ student_weightᵀ + student_bias), teacher, labels, spec)``
    and its gradients w.r.t. the hidden states, the weight and the bias, without ``[N, V]`` logits
    (docs/fused_linear.md).

    ``student_hidden`` ``[..., H]`` (leading dims are token rows, labels ``[...]``), ``student_weight``
    ``[V, H]`` (may be tied to the embedding), ``student_bias`` ``[V]``. ``teacher``: a
    :class:`TeacherLogits` (or a plain ``[..., V]`` tensor), a :class:`TeacherHidden` (its logits computed
    chunk by chunk without gradient, with its own bias/softcap) or a :class:`~kdkernels.SparseTeacher`.
    ``spec``: any :class:`~kdkernels.LogitDistill` (default: forward KL at T = 1) except the batch-coupled
    contrastive term and ``value="cross_entropy"``. ``softcap``: the student's ``c·tanh(x/c)`` (overrides the
    spec's student cap). ``chunk_size``: token rows per chunk; ``None`` picks the largest power of two whose
    temporaries (chunk logits of the student and a hidden teacher, and the float32 copy of the chunk gradient
    for the weight-gradient matmul) fit :data:`CHUNK_BUDGET_BYTES` (1 GiB).

    The weight gradient is accumulated in float32 (float64 for float64) across chunks and returned in the
    weight's dtype. ``backend="reference"`` computes the unfused loss with plain autograd (the ground truth).
    The call is a graph-break boundary under ``torch.compile`` (its chunk loop runs eagerly).

    ``process_group``: vocabulary (tensor) parallel — ``student_weight`` (and ``student_bias``, a
    ``TeacherHidden``'s weight and bias, ``TeacherLogits``) hold this rank's rows ``[V_r, ...]`` of the
    vocabulary, ``student_hidden`` is the same on every rank; the loss is the unsharded one and the hidden
    states' gradient is summed over the ranks (do not all-reduce it again). This path materialises the
    shard's logits ``[N, V_r]`` and runs the sharded loss (the Triton split where the spec allows, with
    ``backend``; docs/tensor_parallel.md), not the chunk loop.
    """
    spec = LogitDistill(temperature=1.0) if spec is None else spec
    if not isinstance(spec, LogitDistill):
        raise TypeError(f"spec must be a kdkernels.LogitDistill, got {type(spec).__name__}")
    if isinstance(teacher, torch.Tensor):
        teacher = TeacherLogits(teacher)
    if not isinstance(teacher, (TeacherLogits, TeacherHidden, SparseTeacher)):
        raise TypeError("teacher must be kdk.TeacherLogits(t), kdk.TeacherHidden(hidden, weight, bias, softcap) "
                        f"or kdk.SparseTeacher(ids, logprobs), got {type(teacher).__name__}")
    _check_linear("student", student_hidden, student_weight, student_bias)
    lead, (V, H) = student_hidden.shape[:-1], student_weight.shape
    N = math.prod(lead)
    if spec.contrastive_weight != 0:
        raise ValueError("fused_linear_distill: the batch-coupled contrastive term needs the whole batch's logits")
    if spec.value != "kl":
        raise ValueError("fused_linear_distill: value='cross_entropy' is not supported (use value='kl')")
    cap_t = spec.softcap[1]
    if isinstance(teacher, TeacherHidden):
        _check_linear("teacher", teacher.hidden, teacher.weight, teacher.bias, lead)
        if teacher.weight.shape[0] != V:
            raise ValueError(f"teacher weight has {teacher.weight.shape[0]} rows, the student's vocabulary is {V}")
        if teacher.softcap is not None:  # the teacher's own cap, else the spec's teacher cap
            cap_t = coerce_softcap(teacher.softcap)[0]
    cap_s = spec.softcap[0] if softcap is None else coerce_softcap(softcap)[0]
    spec = spec.replace(softcap=(cap_s, cap_t))
    h2d = student_hidden.reshape(N, H)
    if process_group is not None:
        return _sharded(h2d, student_weight, student_bias, teacher, labels, spec, lead, process_group, backend)
    labels2d = flatten_labels(labels, lead, student_hidden.device)
    if labels2d is None and spec.needs_labels:
        raise ValueError("this loss needs labels (ce_weight > 0 or a decoupled/dkd/aekt term)")
    teacher2d = _flatten_teacher(teacher, lead, N, V, spec)
    temperature = None
    if isinstance(spec.temperature, torch.Tensor):
        temperature = flatten_temperature(spec.temperature, lead, N, student_hidden.device)
    name = resolve(backend, student_hidden.device)
    if name == "reference" or N == 0:
        return _unfused(h2d, student_weight, student_bias, teacher2d, labels2d, spec, lead, backend="reference")
    sparse_gather = (isinstance(teacher2d, SparseTeacher) and teacher2d.normalize == "renorm"
                     and spec.ce_weight == 0)
    if chunk_size is None:
        chunk_size = default_chunk_size(N, teacher2d.ids.shape[-1] * H if sparse_gather else V,
                                        student_hidden.element_size(), isinstance(teacher2d, TeacherHidden))
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    loss = _fused(h2d, student_weight, student_bias, teacher2d, labels2d, temperature, spec, chunk_size,
                  sparse_gather, name)
    return loss.reshape(lead) if spec.reduction == "none" and len(lead) != 1 else loss


def _flatten_teacher(teacher, lead, N: int, V: int, spec: LogitDistill):
    if isinstance(teacher, SparseTeacher):
        ids, logprobs = flatten_sparse(teacher, lead, teacher.ids.device)
        spec.check_classes(V)
        spec.check_sparse(teacher.normalize, ids.shape[-1])
        if check_mode(spec.check):
            check_sparse_values(ids, logprobs, V)
        return SparseTeacher(ids, logprobs, teacher.normalize)
    spec.check_classes(V)
    if isinstance(teacher, TeacherHidden):
        return TeacherHidden(teacher.hidden.reshape(N, -1), teacher.weight, teacher.bias, None)
    t = teacher.logits
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(lead) + (V,):
        raise ValueError(f"teacher logits must have shape {tuple(lead) + (V,)}, got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    t2d = t.detach().reshape(N, V)
    return t2d if t2d.stride(-1) == 1 else t2d.contiguous()


def _unfused(h2d, weight, bias, teacher, labels, spec, lead, backend):
    """The unfused loss through plain autograd: the reference of the fused path (materialises [N, V])."""
    from .functional import logit_distill
    if isinstance(teacher, TeacherHidden):
        with torch.no_grad():
            teacher = _linear(teacher.hidden, teacher.weight, teacher.bias)
    loss = logit_distill(_linear(h2d, weight, bias), teacher, labels, spec, backend=backend)
    return loss.reshape(lead) if spec.reduction == "none" and len(lead) != 1 else loss


def _sharded(h2d, weight, bias, teacher, labels, spec, lead, group, backend):
    """Vocabulary-parallel fused_linear_distill: this rank's logits ``[N, V_r]`` through the sharded engine;
    the hidden states enter as a replicated input (their gradient is summed over the ranks)."""
    from . import parallel
    from .functional import logit_distill
    N = h2d.shape[0]
    if isinstance(teacher, TeacherHidden):
        with torch.no_grad():
            teacher = _linear(teacher.hidden.reshape(N, -1), teacher.weight, teacher.bias)
    elif isinstance(teacher, TeacherLogits):
        teacher = teacher.logits.detach().reshape(N, -1)
    else:
        K = teacher.ids.shape[-1]
        teacher = SparseTeacher(teacher.ids.reshape(N, K), teacher.logprobs.reshape(N, K), teacher.normalize)
    labels = None if labels is None else labels.reshape(N)
    logits = _linear(parallel.replicated(h2d, group), weight, bias)
    loss = logit_distill(logits, teacher, labels, spec, process_group=group, backend=backend)
    return loss.reshape(lead) if spec.reduction == "none" and len(lead) != 1 else loss


@torch.compiler.disable  # the chunk loop runs eagerly: a graph-break boundary under torch.compile
def _fused(h2d, weight, bias, teacher, labels, temperature, spec, chunk, sparse_gather, name):
    from .functional import packed
    launcher, _ = load_launcher("logit", name)
    inv_count = None
    acc = _acc(h2d)
    if spec.reduction == "batchmean":  # the valid-token count stays on the device
        count = h2d.shape[0] if labels is None else (labels != spec.ignore_index).sum()
        inv_count = 1.0 / torch.as_tensor(count, device=h2d.device).clamp(min=1).to(acc)
    chunk_spec = spec.replace(reduction="none" if spec.reduction == "none" else "sum")
    sparse = None
    if isinstance(teacher, SparseTeacher):
        sparse = (teacher.normalize, teacher.ids.shape[-1])
    prob = _Problem(h2d, weight, bias, teacher, labels, temperature, chunk_spec, chunk, sparse_gather)
    if check_mode(spec.check) and labels is not None:
        check_label_values(labels, weight.shape[0], spec.ignore_index)
    return FusedLinearDistillFunction.apply(h2d, weight, bias, temperature, prob, launcher,
                                            packed(chunk_spec, sparse), inv_count)

