"""The public loss functions. Each method only builds a :class:`LogitDistill` spec (a preset of the one
engine) and hands it to :func:`logit_distill`; validation happens here, at the API boundary.

Positional arguments of :func:`kd_loss` and :func:`dkd_loss` follow mdistiller's ``kd_loss`` /
``dkd_loss`` so they drop in.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from . import reference
from .contrastive import info_nce
from .dispatch import load_launcher, resolve
from .engine import LogitDistillFunction, reduce_loss, valid_rows
from .spec import Decoupled, LogitDistill, RankRelation, TopKDecoupled, TopKScale
from .validation import check_logits, check_mode, check_values, flatten_labels, flatten_temperature


# ---------------------------------------------------------------------------------------------
# the engine entry point
# ---------------------------------------------------------------------------------------------
def logit_distill(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  labels: Optional[torch.Tensor], spec: LogitDistill, *, backend: str = "auto") -> torch.Tensor:
    """Evaluate a :class:`LogitDistill` spec on logits ``[..., C]`` (leading dims are rows).

    Returns a 0-dim loss (``batchmean``/``sum``) or the per-row losses shaped like the leading dims
    (``none``). Only the student logits (and a learnable temperature) receive gradients.
    """
    if not isinstance(spec, LogitDistill):
        raise TypeError(f"spec must be a kdkernels.LogitDistill, got {type(spec).__name__}")
    s, t = student_logits, teacher_logits
    check_logits(s, t)
    C, lead = s.shape[-1], s.shape[:-1]
    N = math.prod(lead)
    spec.check_classes(C)
    labels = flatten_labels(labels, lead, s.device)
    if labels is None and spec.needs_labels:
        raise ValueError("this loss needs labels (ce_weight > 0 or a decoupled/dkd/aekt term)")
    if spec.contrastive_weight != 0 and spec.reduction == "none":
        raise ValueError("the batch-coupled contrastive term has no per-row value: use reduction='batchmean' or 'sum'")
    temperature = None
    if isinstance(spec.temperature, torch.Tensor):
        temperature = flatten_temperature(spec.temperature, lead, N, s.device)
    s2d, t2d = s.reshape(N, C), t.reshape(N, C)
    if check_mode(spec.check):
        check_values(s2d, t2d, labels, C, spec.ignore_index, temperature)
    name = resolve(backend, s.device)

    if name == "reference" or N == 0:
        rows = reference.logit_distill_rows(s2d, t2d, labels, spec, temperature)
        loss = reduce_loss(rows, valid_rows(labels, spec, N)[0], spec.reduction)
    else:
        if s2d.stride(-1) != 1:
            s2d = s2d.contiguous()
        if t2d.stride(-1) != 1:
            t2d = t2d.contiguous()
        launcher, _ = load_launcher("logit", name)
        loss = LogitDistillFunction.apply(s2d, t2d, labels, temperature, spec.packed(), launcher)
    if spec.reduction == "none":
        return loss.reshape(lead)
    if spec.contrastive_weight != 0:
        loss = loss + spec.contrastive_weight * _logit_contrastive(s2d, t2d, labels, spec, backend)
    return loss


def _logit_contrastive(s2d, t2d, labels, spec: LogitDistill, backend: str) -> torch.Tensor:
    """TopKD's batch-coupled InfoNCE over the logit rows (losses.md §6): one group of the valid rows.

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
    return info_nce(s_c[None], t_c[None], spec.contrastive_tau, backend=backend)


def _spec(temperature, reduction, ignore_index, standardize, ce_weight, teacher_topk_scale, check,
          inplace, **terms) -> LogitDistill:
    """The keyword arguments every method shares, folded into a spec with the method's terms."""
    return LogitDistill(temperature=temperature, reduction=reduction, ignore_index=ignore_index,
                        standardize=standardize, ce_weight=ce_weight,
                        teacher_topk_scale=teacher_topk_scale, check=check, inplace=inplace, **terms)


# ---------------------------------------------------------------------------------------------
# method presets (losses.md §1–§7)
# ---------------------------------------------------------------------------------------------
def kd_loss(logits_student, logits_teacher, temperature=4.0, *, labels=None, ignore_index=-100,
            reduction="batchmean", standardize=False, ce_weight=0.0, teacher_topk_scale=None,
            backend="auto", check=None, inplace=False):
    """Hinton KD ``T²·KL(p‖q)`` [code: mdistiller ``kd_loss``], optional fused CE and learnable T."""
    spec = _spec(temperature, reduction, ignore_index, standardize, ce_weight, teacher_topk_scale,
                 check, inplace, kd_weight=1.0)
    return logit_distill(logits_student, logits_teacher, labels, spec, backend=backend)


def dkd_loss(logits_student, logits_teacher, labels, alpha=1.0, beta=8.0, temperature=4.0, *,
             ignore_index=-100, reduction="batchmean", standardize=False, ce_weight=0.0,
             teacher_topk_scale=None, backend="auto", check=None, inplace=False):
    """Decoupled KD ``α·TCKD + β·NCKD`` [code: mdistiller ``dkd_loss``], exact target exclusion."""
    spec = _spec(temperature, reduction, ignore_index, standardize, ce_weight, teacher_topk_scale,
                 check, inplace, kd_weight=0.0, decoupled=Decoupled(alpha=alpha, beta=beta))
    return logit_distill(logits_student, logits_teacher, labels, spec, backend=backend)


def aekt_loss(logits_student, logits_teacher, labels, alpha=1.0, beta=8.0, temperature=4.0, *,
              max_weight=10.0, ignore_index=-100, reduction="batchmean", standardize=False,
              ce_weight=0.0, teacher_topk_scale=None, backend="auto", check=None, inplace=False):
    """AEKT ``α·min(p_y/q_y, w_max)·TCKD + β·NCKD`` [reconstructed]."""
    spec = _spec(temperature, reduction, ignore_index, standardize, ce_weight, teacher_topk_scale,
                 check, inplace, kd_weight=0.0,
                 decoupled=Decoupled(alpha=alpha, beta=beta, adaptive=True, max_weight=max_weight))
    return logit_distill(logits_student, logits_teacher, labels, spec, backend=backend)


def dtkd_loss(logits_student, logits_teacher, temperature=4.0, alpha=3.0, beta=1.0, *, labels=None,
              ignore_index=-100, reduction="batchmean", standardize=False, ce_weight=0.0,
              teacher_topk_scale=None, backend="auto", check=None, inplace=False):
    """Dynamic-temperature KD ``α·T_t·T_s·KL + β·τ²·KL`` [code: JinYu1998/DTKD]."""
    spec = _spec(temperature, reduction, ignore_index, standardize, ce_weight, teacher_topk_scale,
                 check, inplace, kd_weight=beta, dtkd_weight=alpha)
    return logit_distill(logits_student, logits_teacher, labels, spec, backend=backend)


def ldrld_loss(logits_student, logits_teacher, k=7, temperature=4.0, alpha=10.5, beta=7.0, *,
               rank_by="student", eps=1.5, delta=2.0, lam=0.05, labels=None, ignore_index=-100,
               reduction="batchmean", standardize=False, ce_weight=0.0, teacher_topk_scale=None,
               backend="auto", check=None, inplace=False):
    """LDRLD: rank-weighted top-k pair terms + set term + rest term [code: yema-web/LDRLD]."""
    relation = RankRelation(k=k, alpha=alpha, beta=beta, rank_by=rank_by, eps=eps, delta=delta, lam=lam)
    spec = _spec(temperature, reduction, ignore_index, standardize, ce_weight, teacher_topk_scale,
                 check, inplace, kd_weight=0.0, relation=relation)
    return logit_distill(logits_student, logits_teacher, labels, spec, backend=backend)


def topkd_loss(logits_student, logits_teacher, labels=None, k=5, temperature=4.0, *, scale=0.5,
               shift=0.5, gt_scale=0.5, kd_weight=1.0, tdl_weight=1.0, tdl_weights=(1.0, 1.0, 1.0),
               contrastive_weight=0.0, contrastive_tau=0.1, ignore_index=-100, reduction="batchmean",
               standardize=False, ce_weight=0.0, backend="auto", check=None, inplace=False):
    """TopKD: KD on the TSM-scaled teacher + TDL cosine groups (+ logit InfoNCE) [reconstructed]."""
    a, b, c = tdl_weights
    spec = _spec(temperature, reduction, ignore_index, standardize, ce_weight,
                 TopKScale(k=k, scale=scale, shift=shift, gt_scale=gt_scale), check, inplace,
                 kd_weight=kd_weight,
                 tdl=TopKDecoupled(k=k, weight=tdl_weight, pos=a, neg=b, non=c) if tdl_weight != 0 else None,
                 contrastive_weight=contrastive_weight, contrastive_tau=contrastive_tau)
    return logit_distill(logits_student, logits_teacher, labels, spec, backend=backend)
