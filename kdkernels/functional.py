"""The public loss functions. Each method only builds a :class:`LogitDistill` spec (a preset of the one
engine) and hands it to :func:`logit_distill`; validation happens here, at the API boundary.

Positional arguments of :func:`kd_loss` and :func:`dkd_loss` follow mdistiller's ``kd_loss`` /
``dkd_loss`` so they drop in.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from . import parallel, reference
from .contrastive import info_nce
from .dispatch import load_launcher, resolve, unavailable_reason
from .engine import fused_logit_distill
from .spec import Decoupled, LogitDistill, RankRelation, SparseTeacher, TopKDecoupled, TopKScale
from .validation import (check_logits, check_mode, check_sparse_spec, check_sparse_values, check_values,
                         flatten_labels, flatten_sparse, flatten_temperature)


# ---------------------------------------------------------------------------------------------
# the engine entry point
# ---------------------------------------------------------------------------------------------
def logit_distill(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  labels: Optional[torch.Tensor], spec: LogitDistill, *, backend: str = "auto",
                  process_group=None, vocab_offset: Optional[int] = None,
                  vocab_size: Optional[int] = None) -> torch.Tensor:
    """Evaluate a :class:`LogitDistill` spec on logits ``[..., C]`` (leading dims are rows).

    Returns a 0-dim loss (``batchmean``/``sum``) or the per-row losses shaped like the leading dims
    (``none``), multiplied by ``spec.loss_weight``. The student logits (and a learnable temperature)
    receive the fused gradient; teacher logits that require grad receive theirs from the reference
    formulas (online/mutual distillation; an extra eager evaluation, see the docs).

    Tensor parallel (docs/tensor_parallel.md): with ``process_group`` (a ``torch.distributed`` group), or
    with DTensor logits sharded on the class dim, the logits are this rank's vocabulary shard ``[..., V_r]``
    (ranks in class order, shards of any width); labels and sparse-teacher ids stay global. The loss is
    the unsharded one on every rank, each rank's gradient its slice of the unsharded gradient; only
    per-row statistics cross ranks. ``vocab_offset``/``vocab_size``: this shard's first class and the
    whole vocabulary (otherwise the shard widths are all-gathered once per group and cached).
    """
    if not isinstance(spec, LogitDistill):
        raise TypeError(f"spec must be a kdkernels.LogitDistill, got {type(spec).__name__}")
    s, t = student_logits, teacher_logits
    if process_group is not None or vocab_offset is not None or parallel.is_dtensor(s) or parallel.is_dtensor(t):
        return parallel.sharded_logit_distill(s, t, labels, spec, process_group, vocab_offset, vocab_size, backend)
    if isinstance(t, SparseTeacher):
        return _sparse_distill(s, t, labels, spec, backend)
    check_logits(s, t, mixed_dtypes=True)
    C, lead = s.shape[-1], s.shape[:-1]
    N = math.prod(lead)
    spec.check_classes(C)
    labels = flatten_labels(labels, lead, s.device)
    if labels is None and spec.needs_labels:
        raise ValueError("this loss needs labels (ce_weight > 0 or a decoupled/dkd/aekt term)")
    if spec.contrastive_weight != 0 and spec.reduction == "none":
        raise ValueError("the batch-coupled contrastive term has no per-row value: use reduction='batchmean' or 'sum'")
    if spec.contrastive_weight != 0 and spec.inplace:
        raise ValueError("inplace=True cannot be combined with contrastive_weight != 0: the contrastive term "
                         "still needs the student logits after the fused kernel has overwritten them "
                         "with the gradient. Use inplace=False")
    temperature = None
    if isinstance(spec.temperature, torch.Tensor):
        temperature = flatten_temperature(spec.temperature, lead, N, s.device)
    s2d = s if s.dim() == 2 else s.reshape(N, C)
    t2d = t if t.dim() == 2 else t.reshape(N, C)
    if check_mode(spec.check):
        check_values(s2d, t2d, labels, C, spec.ignore_index, temperature)
    name = resolve(backend, s.device)

    if name == "reference" or N == 0:
        loss = reference.logit_distill(s2d, t2d, labels, spec, temperature,
                                       teacher_grad=t.requires_grad and torch.is_grad_enabled())
    else:
        if s2d.stride(-1) != 1:
            s2d = s2d.contiguous()
        if t2d.stride(-1) != 1:
            t2d = t2d.contiguous()
        launcher, _ = load_launcher("logit", name)
        loss = fused_logit_distill(s2d, t2d, labels, temperature, packed(spec), launcher)
        if spec.value == "cross_entropy":
            loss = loss + _teacher_entropy(t2d, labels, spec, temperature)
        if t.requires_grad and torch.is_grad_enabled():
            loss = loss + _teacher_gradient_term(s2d, t2d, labels, spec, temperature)
    if spec.reduction == "none":
        return loss if len(lead) == 1 else loss.reshape(lead)
    if spec.contrastive_weight != 0:
        con = _logit_contrastive(s2d, t2d, labels, spec, backend)
        loss = loss + (spec.contrastive_weight * spec.loss_weight) * con
    return loss


def packed(spec: LogitDistill, sparse: Optional[tuple] = None):
    """``spec.packed(sparse)``, computed once per spec object and sparse form (host cost per call matters
    at C = 1000)."""
    if torch.compiler.is_compiling():
        return spec.packed(sparse)
    key = "_packed" if sparse is None else ("_packed", sparse)
    cached = spec.__dict__.get(key)
    if cached is None:
        cached = spec.__dict__[key] = spec.packed(sparse)
    return cached


def _sparse_distill(s, teacher: SparseTeacher, labels, spec: LogitDistill, backend: str) -> torch.Tensor:
    """:func:`logit_distill` against a sparse (top-K) teacher: the student ``[..., C]`` and the teacher's
    ``ids``/``logprobs`` ``[..., K]`` (docs/topk_teachers.md). No dense teacher is ever built."""
    check_logits(s, s)
    C, lead = s.shape[-1], s.shape[:-1]
    N = math.prod(lead)
    ids, logprobs = flatten_sparse(teacher, lead, s.device)
    spec.check_classes(C)
    check_sparse_spec(spec, teacher, ids.shape[-1])
    if spec.contrastive_weight != 0:
        raise ValueError("the contrastive term needs dense teacher logits; a SparseTeacher cannot feed it")
    labels = flatten_labels(labels, lead, s.device)
    if labels is None and spec.needs_labels:
        raise ValueError("this loss needs labels (ce_weight > 0)")
    temperature = None
    if isinstance(spec.temperature, torch.Tensor):
        temperature = flatten_temperature(spec.temperature, lead, N, s.device)
    s2d = s if s.dim() == 2 else s.reshape(N, C)
    if s2d.stride(-1) != 1:
        s2d = s2d.contiguous()
    rows = SparseTeacher(ids, logprobs, teacher.normalize)
    if check_mode(spec.check):
        check_values(s2d, s2d.detach(), labels, C, spec.ignore_index, temperature)
        check_sparse_values(ids, logprobs, C)
    name = resolve(backend, s.device)
    if name == "reference" or N == 0:
        loss = reference.logit_distill(s2d, rows, labels, spec, temperature)
    else:
        launcher, _ = load_launcher("logit", name)
        loss = fused_logit_distill(s2d, rows, labels, temperature, packed(spec, (teacher.normalize, ids.shape[-1])),
                                   launcher)
    if spec.reduction == "none" and len(lead) != 1:
        return loss.reshape(lead)
    return loss


def _teacher_entropy(t2d, labels, spec: LogitDistill, temperature) -> torch.Tensor:
    """``value="cross_entropy"`` on a fused backend: the teacher's entropy term, reduced like the loss (an
    extra eager pass over the teacher; the student's gradient is unchanged). The teacher is detached: a
    teacher that requires grad gets the whole loss's gradient from ``_teacher_gradient_term``."""
    rows = reference.teacher_entropy_rows(t2d.detach(), labels, spec, temperature)
    return reference.reduce_rows(rows, labels, spec)


def _teacher_gradient_term(s2d, t2d, labels, spec: LogitDistill, temperature) -> torch.Tensor:
    """Zero in value; its gradient w.r.t. the teacher logits is the loss's (reference formulas, the student
    and temperature held constant). Used only when the teacher requires grad (mutual distillation)."""
    if isinstance(spec.temperature, torch.Tensor):
        spec = spec.replace(temperature=spec.temperature.detach())
        temperature = temperature.detach()
    ref = reference.logit_distill(s2d.detach(), t2d, labels, spec, temperature, teacher_grad=True)
    return ref - ref.detach()


def _logit_contrastive(s2d, t2d, labels, spec: LogitDistill, backend: str) -> torch.Tensor:
    """TopKD's batch-coupled InfoNCE over the logit rows (docs/topkd.md): one group of the valid rows.

    Ignored rows are left out of the group (selecting them costs one device sync, and only when labels
    are given); masked (−inf) classes are dropped from the vectors (set to 0) before normalisation.
    """
    if labels is not None:
        keep = labels != spec.ignore_index
        s2d, t2d = s2d[keep], t2d[keep]
        if s2d.shape[0] == 0:
            return s2d.sum() * 0.0
    s_c = torch.where(s2d == -math.inf, torch.zeros_like(s2d), s2d)
    t_c = torch.where(t2d == -math.inf, torch.zeros_like(t2d), t2d)
    # the logit engine's backend when it has a contrastive kernel (triton), else auto's pick (the C++
    # backends have none): an explicit backend="cpu" still runs the whole TopKD loss
    if backend in ("cpu", "cuda") or unavailable_reason(backend, s_c.device, "contrastive") is not None:
        backend = "auto"
    return info_nce(s_c[None], t_c[None], spec.contrastive_tau, backend=backend)


def _spec(temperature, reduction, ignore_index, standardize, ce_weight, teacher_topk_scale, check,
          inplace, loss_weight=1.0, **terms) -> LogitDistill:
    """The keyword arguments every method shares, folded into a spec with the method's terms (cached
    for hashable arguments: building and packing a spec is most of the host cost of a call)."""
    args = (temperature, reduction, ignore_index, standardize, ce_weight, teacher_topk_scale, check, inplace,
            loss_weight, tuple(terms.items()))
    if torch.compiler.is_compiling():  # traced once per graph: nothing to save
        return _build_spec(args)
    try:  # the key carries the types: -100 and -100.0 hash alike but only one of them is valid
        return _cached_spec(tuple(type(a) for a in args), args)
    except TypeError:  # a tensor temperature, a dict TopKScale: build it anew
        return _build_spec(args)


def _build_spec(args) -> LogitDistill:
    temperature, reduction, ignore_index, standardize, ce_weight, tsm, check, inplace, loss_weight, terms = args
    return LogitDistill(temperature=temperature, reduction=reduction, ignore_index=ignore_index,
                        standardize=standardize, ce_weight=ce_weight, teacher_topk_scale=tsm, check=check,
                        inplace=inplace, loss_weight=loss_weight, **dict(terms))


@functools.lru_cache(maxsize=256)
def _cached_spec(types, args) -> LogitDistill:
    if any(isinstance(a, torch.Tensor) for a in args):
        raise TypeError("tensors are not cached")
    return _build_spec(args)


_COMMON_ARGS = """
    Common keyword arguments (every method):
        labels: integer tensor shaped like the leading dims, or None. Rows whose label is
            ``ignore_index`` are ignored (loss 0, gradient 0, not counted by ``batchmean``); label-free
            losses use it purely as an ignore mask (LLM token rows).
        ignore_index: label value of ignored rows (default -100).
        reduction: ``"batchmean"`` (sum of row losses / number of valid rows, 0 when there is none),
            ``"sum"`` or ``"none"`` (per-row losses shaped like the leading dims).
        standardize: logit standardisation ``Z(z) = (z − mean)/(std + 1e-7)`` of both logits first.
        ce_weight: adds ``ce_weight·CE(s, y)`` at temperature 1 on the raw student logits, same pass.
        teacher_topk_scale: TopKD's TSM on the teacher (``TopKScale`` or a dict), or None.
        loss_weight: multiplies the loss inside the launch (no extra pass; use it for loss weights,
            warm-up factors and gradient accumulation).
        inplace: write the gradient into the student logits' storage (no extra ``[N, C]`` memory; the
            logits are overwritten). Refused for overlapping/shared storage.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``.
        check: validate label range and non-finite values (a device sync); default from
            ``KDKERNELS_CHECK``.
        process_group: a ``torch.distributed`` group over which the logits' class dim is sharded
            (tensor parallel: this rank's ``[..., V_r]`` columns; labels stay global), or None. DTensor
            logits sharded on the class dim need none. docs/tensor_parallel.md.

    Shapes: logits ``[..., C]`` (same shape, same device, float32/bfloat16/float16/float64); the loss
    is float32 (float64 for float64 logits). Gradients flow to the student logits and a learnable
    temperature; see the README for the autograd contract.
"""


def _with_common_args(fn):
    fn.__doc__ = (fn.__doc__ or "").rstrip() + "\n" + _COMMON_ARGS
    return fn


# ---------------------------------------------------------------------------------------------
# method presets (docs/README.md)
# ---------------------------------------------------------------------------------------------
@_with_common_args
def kd_loss(logits_student, logits_teacher, temperature=4.0, *, labels=None, ignore_index=-100,
            reduction="batchmean", standardize=False, ce_weight=0.0, teacher_topk_scale=None,
            divergence="forward_kl", teacher_topk=None, softcap=None,
            backend="auto", check=None, inplace=False, loss_weight=1.0, process_group=None):
    """Hinton KD: ``ℓ_n = T²·KL(softmax(t/T) ‖ softmax(s/T))`` [code: mdistiller ``kd_loss``].

    Equals mdistiller's ``kd_loss(logits_student, logits_teacher, temperature)`` (``batchmean``) and
    its gradient ``T·(q − p)/N``. ``temperature``: a positive float, a 0-dim tensor or a per-row tensor;
    a tensor with ``requires_grad=True`` is learnable (CTKD) and receives its exact gradient.

    LLM options (docs/divergences.md, docs/topk_teachers.md): ``divergence`` — ``"forward_kl"``,
    ``"reverse_kl"``, ``("jsd", β)``/``kdk.JSD(β)``, ``"tvd"``, ``("skew_kl", α)``, ``("skew_rkl", α)``
    (the term is ``T²·D(p‖q)``); ``teacher_topk`` — ``kdk.TopK(k, normalize)`` masks the teacher to its
    top-k; ``logits_teacher`` may be a ``kdk.SparseTeacher(ids, logprobs, normalize)`` (a stored top-K
    teacher); ``softcap`` — ``c·tanh(x/c)`` on both logits first (a float, or a ``(student, teacher)``
    pair with ``None`` for no cap).

    Example::

        s, t = torch.randn(8, 100, requires_grad=True), torch.randn(8, 100)
        loss = kdk.kd_loss(s, t, 4.0)
        loss.backward()
    """
    spec = _spec(temperature, reduction, ignore_index, standardize, ce_weight, teacher_topk_scale,
                 check, inplace, loss_weight, kd_weight=1.0, divergence=divergence, teacher_topk=teacher_topk,
                 softcap=softcap)
    return logit_distill(logits_student, logits_teacher, labels, spec, backend=backend,
                         process_group=process_group)


@_with_common_args
def dkd_loss(logits_student, logits_teacher, labels, alpha=1.0, beta=8.0, temperature=4.0, *,
             ignore_index=-100, reduction="batchmean", standardize=False, ce_weight=0.0,
             teacher_topk_scale=None, backend="auto", check=None, inplace=False, loss_weight=1.0, process_group=None):
    """Decoupled KD: ``ℓ_n = α·TCKD_n + β·NCKD_n`` [code: mdistiller ``dkd_loss``].

    ``TCKD = T²·KL([p_y, 1 − p_y] ‖ [q_y, 1 − q_y])`` (target vs. non-targets), ``NCKD = T²·KL`` of the
    distributions over the non-target classes; computed in log space (finite where the published
    code's ``log`` of summed probabilities overflows) with the target excluded exactly (the published
    code adds −1000). ``labels`` ``[...]`` are required. Equals mdistiller's
    ``dkd_loss(logits_student, logits_teacher, target, alpha, beta, temperature)``.

    Example::

        s, t = torch.randn(8, 100, requires_grad=True), torch.randn(8, 100)
        y = torch.randint(0, 100, (8,))
        kdk.dkd_loss(s, t, y, 1.0, 8.0, 4.0).backward()
    """
    spec = _spec(temperature, reduction, ignore_index, standardize, ce_weight, teacher_topk_scale,
                 check, inplace, loss_weight, kd_weight=0.0, decoupled=Decoupled(alpha=alpha, beta=beta))
    return logit_distill(logits_student, logits_teacher, labels, spec, backend=backend,
                         process_group=process_group)


@_with_common_args
def aekt_loss(logits_student, logits_teacher, labels, alpha=1.0, beta=8.0, temperature=4.0, *,
              max_weight=10.0, ignore_index=-100, reduction="batchmean", standardize=False,
              ce_weight=0.0, teacher_topk_scale=None, backend="auto", check=None, inplace=False, loss_weight=1.0, process_group=None):
    """AEKT: ``ℓ_n = α·min(p_y/q_y, max_weight)·TCKD_n + β·NCKD_n`` [reconstructed].

    Only the paper's description is public: the adaptive weight of the explicit (target) knowledge is
    the teacher/student confidence ratio, clamped at ``max_weight`` and treated as a constant of the
    gradient; the implicit knowledge is DKD's NCKD. ``labels`` are required.

    Example::

        s, t = torch.randn(8, 100, requires_grad=True), torch.randn(8, 100)
        y = torch.randint(0, 100, (8,))
        kdk.aekt_loss(s, t, y, max_weight=10.0).backward()
    """
    spec = _spec(temperature, reduction, ignore_index, standardize, ce_weight, teacher_topk_scale,
                 check, inplace, loss_weight, kd_weight=0.0,
                 decoupled=Decoupled(alpha=alpha, beta=beta, adaptive=True, max_weight=max_weight))
    return logit_distill(logits_student, logits_teacher, labels, spec, backend=backend,
                         process_group=process_group)


@_with_common_args
def dtkd_loss(logits_student, logits_teacher, temperature=4.0, alpha=3.0, beta=1.0, *, labels=None,
              ignore_index=-100, reduction="batchmean", standardize=False, ce_weight=0.0,
              teacher_topk_scale=None, backend="auto", check=None, inplace=False, loss_weight=1.0, process_group=None):
    """Dynamic-temperature KD: ``ℓ_n = α·T_t·T_s·KL(softmax(t/T_t) ‖ softmax(s/T_s)) + β·τ²·KL(τ)``
    [code: JinYu1998/DTKD].

    ``T_s = 2vτ/(x + v)``, ``T_t = 2xτ/(x + v)`` from the row maxima ``x = max t``, ``v = max s`` (the
    gradient flows through ``v``); rows where ``x + v ≤ 0``, ``x ≤ 0`` or ``v ≤ 0`` use ``T_s = T_t = τ``
    (the published code covers only ``x + v ≤ 0``; documented deviation). ``temperature`` is ``τ``.

    Example::

        s, t = torch.randn(8, 100, requires_grad=True), torch.randn(8, 100)
        kdk.dtkd_loss(s, t, 4.0, alpha=3.0, beta=1.0).backward()
    """
    spec = _spec(temperature, reduction, ignore_index, standardize, ce_weight, teacher_topk_scale,
                 check, inplace, loss_weight, kd_weight=beta, dtkd_weight=alpha)
    return logit_distill(logits_student, logits_teacher, labels, spec, backend=backend,
                         process_group=process_group)


@_with_common_args
def ldrld_loss(logits_student, logits_teacher, k=7, temperature=4.0, alpha=10.5, beta=7.0, *,
               rank_by="student", eps=1.5, delta=2.0, lam=0.05, labels=None, ignore_index=-100,
               reduction="batchmean", standardize=False, ce_weight=0.0, teacher_topk_scale=None,
               backend="auto", check=None, inplace=False, loss_weight=1.0, process_group=None):
    """LDRLD: ``ℓ_n = α·L_local + β·L_rest`` [code: yema-web/LDRLD].

    ``L_local``: over the ``k`` classes ranked by the student (``rank_by="teacher"`` optional),
    rank-weighted Bernoulli KLs of every pair ``w(r, r') = δ·exp(−λ(r + r'))/(|r − r'| + ε)`` plus the
    KL of the softmax restricted to the set, divided by ``k(k−1)/2 + 1``; ``L_rest``: KL of the softmax
    over the other classes; every KL at temperature ``T`` with ``T²``. Needs ``2 ≤ k ≤ C − 1``.

    Example::

        s, t = torch.randn(8, 100, requires_grad=True), torch.randn(8, 100)
        kdk.ldrld_loss(s, t, k=7).backward()
    """
    relation = RankRelation(k=k, alpha=alpha, beta=beta, rank_by=rank_by, eps=eps, delta=delta, lam=lam)
    spec = _spec(temperature, reduction, ignore_index, standardize, ce_weight, teacher_topk_scale,
                 check, inplace, loss_weight, kd_weight=0.0, relation=relation)
    return logit_distill(logits_student, logits_teacher, labels, spec, backend=backend,
                         process_group=process_group)


@_with_common_args
def topkd_loss(logits_student, logits_teacher, labels=None, k=5, temperature=4.0, *, scale=0.5,
               shift=0.5, gt_scale=0.5, kd_weight=1.0, tdl_weight=1.0, tdl_weights=(1.0, 1.0, 1.0),
               contrastive_weight=0.0, contrastive_tau=0.1, ignore_index=-100, reduction="batchmean",
               standardize=False, ce_weight=0.0, backend="auto", check=None, inplace=False, loss_weight=1.0, process_group=None):
    """TopKD: ``ℓ_n = kd_weight·T²·KL(softmax(t'/T) ‖ softmax(s/T)) + tdl_weight·TDL_n
    (+ contrastive_weight·InfoNCE)`` [reconstructed].

    ``t'``: the teacher after the Top-K Scaling Module (its top-``k`` logits scaled by
    ``1 + scale·(k − r + 1)/k`` and shifted by ``shift·gap``; the label's logit by ``1 + gt_scale``
    when labels are given and it is not in the top-k). TDL: ``Σ_g w_g·(1 − cos(s_g, t'_g))`` over the
    groups Pos (top-k of ``t'``), Neg (bottom-k) and Non (the rest), weights ``tdl_weights``; needs
    ``2k < C`` (for CIFAR-10, C = 10, use ``k ≤ 4``). ``contrastive_weight``: InfoNCE over the batch's
    logit rows (``reduction`` must then be ``batchmean``/``sum``; not with ``inplace=True``).

    Example::

        s, t = torch.randn(8, 100, requires_grad=True), torch.randn(8, 100)
        kdk.topkd_loss(s, t, k=5).backward()
    """
    a, b, c = tdl_weights
    spec = _spec(temperature, reduction, ignore_index, standardize, ce_weight,
                 TopKScale(k=k, scale=scale, shift=shift, gt_scale=gt_scale), check, inplace, loss_weight,
                 kd_weight=kd_weight,
                 tdl=TopKDecoupled(k=k, weight=tdl_weight, pos=a, neg=b, non=c) if tdl_weight != 0 else None,
                 contrastive_weight=contrastive_weight, contrastive_tau=contrastive_tau)
    return logit_distill(logits_student, logits_teacher, labels, spec, backend=backend,
                         process_group=process_group)
