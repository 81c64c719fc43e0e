"""Independent transcriptions of the *published* codes of the logit losses kdkernels implements.

These are plain-PyTorch re-writings (not copies) of the loss arithmetic exactly as the authors' public
repositories compute it, including their numerical quirks (``log`` of summed probabilities, ``-1000``
masks, signed dynamic temperatures). They exist only so that ``tests/test_published.py`` can compare the
kdkernels reference against the published behaviour on float64 inputs; they are not part of the package.

Differences from the published files that do not change the arithmetic:

* ``F.kl_div(..., size_average=False)`` (deprecated) is written as ``reduction="sum"`` (identical).
* LDRLD's ``.cuda()`` on the gathered index tensors is dropped (the indices stay on the input's device).
* Training-loop state (epoch warm-up factor, the cross-entropy term of the distiller classes) is left to
  the caller; where a test needs the CE term it adds ``F.cross_entropy`` itself, as the distillers do.

Sources (read from the public repositories):

* mdistiller  — github.com/megvii-research/mdistiller, ``mdistiller/distillers/KD.py`` and ``DKD.py``.
* logit standardisation — github.com/sunshangquan/logit-standardization-KD,
  ``mdistiller/distillers/KD.py`` / ``DKD.py`` (``normalize`` and the ``logit_stand`` switch).
* DTKD        — github.com/JinYu1998/DTKD, ``mdistiller/distillers/DTKD.py`` (``DTKD.forward_train``);
  defaults ``ALPHA = 3.0, BETA = 1.0, T = 4`` from ``mdistiller/engine/cfg.py``.
* LDRLD       — github.com/yema-web/LDRLD, ``distiller_zoo/LDRLD.py`` (``ADW``,
  ``calculate_recursion_combinations``, ``selective_softmax_loss``, ``LDRLD.forward``).
"""

from __future__ import annotations

import math
from itertools import combinations

import torch
import torch.nn.functional as F

__all__ = [
    "mdistiller_normalize",
    "mdistiller_kd_loss",
    "mdistiller_dkd_loss",
    "get_gt_mask",
    "get_other_mask",
    "cat_mask",
    "dtkd_official_loss",
    "ldrld_adw",
    "ldrld_selective_softmax_loss",
    "ldrld_official_loss",
]


# --------------------------------------------------------------------------------------------------
# mdistiller KD (+ logit standardisation switch)
# --------------------------------------------------------------------------------------------------


def mdistiller_normalize(logit: torch.Tensor) -> torch.Tensor:
    """Logit standardisation as in sunshangquan/logit-standardization-KD,
    ``mdistiller/distillers/KD.py::normalize``: ``(z - mean) / (1e-7 + std)``, with ``torch.std``'s
    default (unbiased, divides by C - 1), over the last dimension."""
    mean = logit.mean(dim=-1, keepdim=True)
    stdv = logit.std(dim=-1, keepdim=True)
    return (logit - mean) / (1e-7 + stdv)


def mdistiller_kd_loss(logits_student, logits_teacher, temperature, logit_stand: bool = False):
    """Hinton KD as in megvii-research/mdistiller, ``mdistiller/distillers/KD.py::kd_loss``.

    ``log_softmax(s/T)`` vs ``softmax(t/T)``, ``F.kl_div(reduction="none").sum(1).mean()`` then ``* T**2``.
    ``logit_stand=True`` applies ``mdistiller_normalize`` to both inputs first, as the
    logit-standardization-KD fork of the same file does (its ``kd_loss(..., logit_stand)``).
    """
    if logit_stand:
        logits_student = mdistiller_normalize(logits_student)
        logits_teacher = mdistiller_normalize(logits_teacher)
    log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    loss_kd = loss_kd * temperature**2
    return loss_kd


# --------------------------------------------------------------------------------------------------
# mdistiller DKD
# --------------------------------------------------------------------------------------------------


def get_gt_mask(logits, target):
    """mdistiller ``DKD.py::_get_gt_mask``: boolean one-hot of ``target`` (scatter 1 into zeros)."""
    target = target.reshape(-1)
    return torch.zeros_like(logits).scatter_(1, target.unsqueeze(1), 1).bool()


def get_other_mask(logits, target):
    """mdistiller ``DKD.py::_get_other_mask``: boolean complement of the one-hot (scatter 0 into ones)."""
    target = target.reshape(-1)
    return torch.ones_like(logits).scatter_(1, target.unsqueeze(1), 0).bool()


def cat_mask(t, mask1, mask2):
    """mdistiller ``DKD.py::cat_mask``: ``[sum(t*mask1), sum(t*mask2)]`` per row, shape ``[N, 2]``."""
    t1 = (t * mask1).sum(dim=1, keepdim=True)
    t2 = (t * mask2).sum(dim=1, keepdim=True)
    return torch.cat([t1, t2], dim=1)


def mdistiller_dkd_loss(logits_student, logits_teacher, target, alpha, beta, temperature,
                        logit_stand: bool = False):
    """Decoupled KD as in megvii-research/mdistiller, ``mdistiller/distillers/DKD.py::dkd_loss``.

    * TCKD: the full-softmax probabilities (at T) are summed into ``[p_y, sum_{c!=y} p_c]`` by
      ``cat_mask``; the student side takes a plain ``torch.log`` of that sum (inf/NaN when the student is
      so confident that the non-target mass underflows); ``kl_div(sum) * T**2 / N``.
    * NCKD: the target class is excluded by subtracting ``1000.0`` from its ``z/T`` before a full softmax /
      log_softmax; ``kl_div(sum) * T**2 / N``.
    * returns ``alpha * tckd + beta * nckd``.
    ``logit_stand=True``: the logit-standardization-KD fork (``DKD.py::dkd_loss(..., logit_stand)``).
    """
    if logit_stand:
        logits_student = mdistiller_normalize(logits_student)
        logits_teacher = mdistiller_normalize(logits_teacher)
    gt_mask = get_gt_mask(logits_student, target)
    other_mask = get_other_mask(logits_student, target)
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    pred_student = cat_mask(pred_student, gt_mask, other_mask)
    pred_teacher = cat_mask(pred_teacher, gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd_loss = (
        F.kl_div(log_pred_student, pred_teacher, reduction="sum") * (temperature**2) / target.shape[0]
    )
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd_loss = (
        F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum")
        * (temperature**2)
        / target.shape[0]
    )
    return alpha * tckd_loss + beta * nckd_loss


# --------------------------------------------------------------------------------------------------
# DTKD (official code)
# --------------------------------------------------------------------------------------------------


def dtkd_official_loss(logits_student, logits_teacher, temperature=4.0, alpha=3.0, beta=1.0):
    """DTKD as in JinYu1998/DTKD, ``mdistiller/distillers/DTKD.py::DTKD.forward_train`` (loss part only).

    Per row, with ``v = max(s)`` (``Tensor.max(dim=1)``: gradient flows to the arg-max column) and
    ``x = max(t)``::

        T_s = 2 * v / (x + v) * tau          (logits_student_temp)
        T_t = 2 * x / (x + v) * tau          (logits_teacher_temp; depends on v, so it carries gradient)
        ourskd  = (KL(softmax(t/T_t) || softmax(s/T_s)) * T_t * T_s).mean()
        loss_kd = (KL(softmax(t/tau) || softmax(s/tau)) * tau**2).mean()
        return alpha * ourskd + beta * loss_kd

    The published training step then multiplies by ``min(epoch / warmup, 1)`` and adds
    ``CE_WEIGHT * CE(s, y)``; both are left to the caller here. No guard on ``x + v``: the temperatures
    are used with whatever sign / magnitude they get.
    """
    reference_temp = temperature
    logits_student_max, _ = logits_student.max(dim=1, keepdim=True)
    logits_teacher_max, _ = logits_teacher.max(dim=1, keepdim=True)
    logits_student_temp = 2 * logits_student_max / (logits_teacher_max + logits_student_max) * reference_temp
    logits_teacher_temp = 2 * logits_teacher_max / (logits_teacher_max + logits_student_max) * reference_temp

    ourskd = F.kl_div(
        F.log_softmax(logits_student / logits_student_temp, dim=1),
        F.softmax(logits_teacher / logits_teacher_temp, dim=1),
        reduction="none",
    )
    loss_ourskd = (ourskd.sum(1, keepdim=True) * logits_teacher_temp * logits_student_temp).mean()

    vanilla_temp = temperature
    kd = F.kl_div(
        F.log_softmax(logits_student / vanilla_temp, dim=1),
        F.softmax(logits_teacher / vanilla_temp, dim=1),
        reduction="none",
    )
    loss_kd = (kd.sum(1, keepdim=True) * vanilla_temp**2).mean()

    return alpha * loss_ourskd + beta * loss_kd


# --------------------------------------------------------------------------------------------------
# LDRLD (official code)
# --------------------------------------------------------------------------------------------------


def ldrld_adw(index1: int, index2: int, gamma: float = 0.05) -> float:
    """yema-web/LDRLD ``distiller_zoo/LDRLD.py::ADW``: with 1-based ranks ``r = index1 + 1``,
    ``r' = index2 + 1``: ``1 / (1.5 + |r - r'|) * 2.0 * exp(-gamma * (r + r'))``."""
    t = index1 + 1
    t_prime = index2 + 1
    a = 2.0
    return 1.0 / (1.50 + abs(t - t_prime)) * a * math.exp(-gamma * (t + t_prime))


def _ldrld_masked_kl(teacher_logits, student_logits, T, keep_mask):
    """One term of the published recursion: classes outside ``keep_mask`` get ``-1000`` added to ``z/T``,
    then ``kl_div(log_softmax(student), softmax(teacher), sum) * T**2 / N``."""
    drop = (~keep_mask).to(teacher_logits.dtype)
    teacher_probs = F.softmax(teacher_logits / T - 1000.0 * drop, dim=1)
    student_log_probs = F.log_softmax(student_logits / T - 1000.0 * drop, dim=1)
    return F.kl_div(student_log_probs, teacher_probs, reduction="sum") * (T**2) / teacher_logits.size()[0]


def ldrld_selective_softmax_loss(student_logits, teacher_logits, T, k):
    """yema-web/LDRLD ``distiller_zoo/LDRLD.py::selective_softmax_loss`` (with the recursion
    ``calculate_recursion_combinations`` unrolled into a loop; the sum is the same).

    * ``top_indices = student_logits.topk(k, 1, largest=True, sorted=True)`` — ranked by the *student*.
    * combinations = all position pairs ``(i, j), i < j`` of ``range(k)`` (itertools order), then the full
      tuple ``range(k)`` as the last entry (the "set" term).
    * each combination: KL over its classes (others masked with ``-1000``) ``* T**2 / N``, times
      ``ADW(i, j, 0.05)`` **if the combination has length 2**, else 1.0. (For ``k == 2`` the set tuple
      ``(0, 1)`` has length 2 too, so the published code weights the set term by ``ADW(0, 1)`` as well.)
    * ``ldrld = sum / len(combinations)`` = ``sum / (k(k-1)/2 + 1)``.
    * ``rntk``: KL over the classes not in the top-k (top-k masked with ``-1000``) ``* T**2 / N``.
    Returns ``(ldrld, rntk)``.
    """
    _, top_indices = student_logits.topk(k, 1, True, True)
    all_index_combinations = list(combinations(range(k), 2)) + [tuple(range(k))]
    gamma = 0.05

    total_loss = 0
    for comb in all_index_combinations:
        idx = top_indices[:, list(comb)]
        if len(comb) == 2:
            weight = ldrld_adw(comb[0], comb[1], gamma)
        else:
            weight = 1.0
        keep = torch.zeros_like(teacher_logits).scatter_(1, idx, 1).bool()
        total_loss = total_loss + weight * _ldrld_masked_kl(teacher_logits, student_logits, T, keep)
    ldrld = total_loss / len(all_index_combinations)

    index_finally = top_indices[:, list(all_index_combinations[-1])]
    in_topk = torch.zeros_like(teacher_logits).scatter_(1, index_finally, 1).bool()
    rntk = _ldrld_masked_kl(teacher_logits, student_logits, T, ~in_topk)
    return ldrld, rntk


def ldrld_official_loss(logits_student, logits_teacher, k=7, temperature=4.0, alpha=10.5, beta=7.0):
    """yema-web/LDRLD ``distiller_zoo/LDRLD.py::LDRLD.forward`` without its CE term:
    ``alpha * ldrld + beta * rntk`` (README recipe: ``-a 10.5 -b 7.0 --kd_T 4``, ``--k 7`` default in
    ``train_student.py``). The published loop (``helper/loops.py``) multiplies the whole criterion output,
    CE included, by ``opt.gamma`` (``-r``, 1 in the recipe); that factor is left to the caller."""
    loss_kd, not_loss_kd = ldrld_selective_softmax_loss(logits_student, logits_teacher, temperature, k)
    return alpha * loss_kd + beta * not_loss_kd
