"""The eager code users replace: each method's *published* arithmetic written plainly in PyTorch.

These are the honest baselines of the benchmarks (an eager provider that is the code a user has today),
not kdkernels' float64-exact reference (``backend="reference"``), which is slower than the published
codes and would inflate speedups; the reference stays a separate, clearly named provider.

* ``kd``: mdistiller ``kd_loss`` — ``kl_div(log_softmax(s/T), softmax(t/T), reduction="none").sum(1).mean()·T²``.
* ``kd+ce``: the same plus ``F.cross_entropy(s, y)`` (mdistiller's KD distiller adds CE on the raw logits).
* ``kd+standardize``: logit-standardization-KD's ``normalize`` (mean, unbiased std, +1e-7) then ``kd_loss``.
* ``dkd``: mdistiller ``dkd_loss`` (full softmaxes summed by masks, ``log`` of the summed student
  probabilities, the target excluded from NCKD by subtracting 1000 from its ``z/T``).
* ``aekt`` [reconstructed, no public code]: ``dkd``'s arithmetic with the TCKD weight ``min(p_y/q_y, w_max)``
  (detached) per row, as docs/dkd.md describes.
* ``dtkd``: JinYu1998/DTKD ``forward_train`` (dynamic temperatures from the row maxima, ``T_t·T_s`` scaled KL
  + ``τ²`` KL).
* ``ldrld``: yema-web/LDRLD ``selective_softmax_loss``: a full masked softmax (−1000) per top-k pair and one
  for the set, one for the rest — k(k−1)/2 + 2 softmaxes over the row.
* ``topkd``, ``tsm-only`` [reconstructed from the paper's description]: the Top-K Scaling of the teacher
  with ``topk``/``scatter``, KD on the scaled teacher, and (``topkd``) the three cosine groups of TDL.

The LLM family (temperature 1, the mean over the tokens whose label is not −100):

* ``jsd``: TRL ``GKDTrainer.generalized_jsd_loss`` (β = 0.5) — two ``log_softmax``, the mixture
  ``log m = logsumexp(stack([log q + log(1−β), log p + log β]))``, two ``kl_div(log_target=True)``,
  labels masked by boolean indexing, ``batchmean`` = sum / valid tokens; no T² factor.
* ``reverse_kl``: torchtune ``ReverseKLLoss`` — ``softmax``/``log_softmax`` in float32, ``−inf`` teacher
  classes masked to 0, ``−Σ q·(log p − log q)`` per token, averaged over the valid tokens.
* ``tvd`` [plain formula, no published fused code]: ``½·Σ|p − q|`` from two ``softmax``.
* ``sparse_tail``: the Megatron-style stored top-K KL with a tail bucket — the student's ``log_softmax``
  gathered at the ids, tails ``1 − Σp`` (teacher) and ``1 − Σq`` (student), forward KL over the K + 1
  outcomes; ``topk_tail`` is the same after ``topk`` of the dense teacher's ``log_softmax``.
* ``sparse_renorm``: the renormalised top-K KL of MaxText / NeMo-RL — ``log_softmax`` of the stored
  log-probabilities and of the student logits gathered at the ids, forward KL over the K classes
  (``sparse_renorm+ce``: plus ``F.cross_entropy``).
"""
from __future__ import annotations

from itertools import combinations
from math import exp

import torch
import torch.nn.functional as F

T_DEFAULT = 4.0


def kd(s, t, y=None, T=T_DEFAULT):
    log_pred_student = F.log_softmax(s / T, dim=1)
    pred_teacher = F.softmax(t / T, dim=1)
    return F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean() * T ** 2


def kd_ce(s, t, y, T=T_DEFAULT):
    return kd(s, t, None, T) + F.cross_entropy(s, y)


def _normalize(logit):
    mean = logit.mean(dim=-1, keepdim=True)
    stdv = logit.std(dim=-1, keepdim=True)
    return (logit - mean) / (1e-7 + stdv)


def kd_standardize(s, t, y=None, T=2.0):
    return kd(_normalize(s), _normalize(t), None, T)


def _gt_other_masks(logits, target):
    gt = torch.zeros_like(logits).scatter_(1, target.unsqueeze(1), 1).bool()
    other = torch.ones_like(logits).scatter_(1, target.unsqueeze(1), 0).bool()
    return gt, other


def _cat_mask(p, gt, other):
    return torch.cat([(p * gt).sum(dim=1, keepdim=True), (p * other).sum(dim=1, keepdim=True)], dim=1)


def dkd(s, t, y, alpha=1.0, beta=8.0, T=T_DEFAULT, adaptive_max=None):
    gt, other = _gt_other_masks(s, y)
    pred_student = F.softmax(s / T, dim=1)
    pred_teacher = F.softmax(t / T, dim=1)
    bin_student = _cat_mask(pred_student, gt, other)
    bin_teacher = _cat_mask(pred_teacher, gt, other)
    tckd_rows = F.kl_div(torch.log(bin_student), bin_teacher, reduction="none").sum(1)
    if adaptive_max is not None:  # AEKT: per-row weight min(p_y / q_y, w_max), no gradient
        tckd_rows = tckd_rows * (bin_teacher[:, 0] / bin_student[:, 0]).clamp(max=adaptive_max).detach()
    tckd = tckd_rows.sum() * T ** 2 / y.shape[0]
    pred_teacher_part2 = F.softmax(t / T - 1000.0 * gt, dim=1)
    log_pred_student_part2 = F.log_softmax(s / T - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum") * T ** 2 / y.shape[0]
    return alpha * tckd + beta * nckd


def aekt(s, t, y, alpha=1.0, beta=8.0, T=T_DEFAULT, max_weight=10.0):
    return dkd(s, t, y, alpha, beta, T, adaptive_max=max_weight)


def dtkd(s, t, y=None, T=T_DEFAULT, alpha=3.0, beta=1.0):
    s_max, _ = s.max(dim=1, keepdim=True)
    t_max, _ = t.max(dim=1, keepdim=True)
    s_temp = 2 * s_max / (t_max + s_max) * T
    t_temp = 2 * t_max / (t_max + s_max) * T
    ours = F.kl_div(F.log_softmax(s / s_temp, dim=1), F.softmax(t / t_temp, dim=1), reduction="none")
    loss_ours = (ours.sum(1, keepdim=True) * t_temp * s_temp).mean()
    vanilla = F.kl_div(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1), reduction="none")
    return alpha * loss_ours + beta * (vanilla.sum(1, keepdim=True) * T ** 2).mean()


def _masked_kl(s, t, T, keep):
    drop = (~keep).to(t.dtype)
    teacher = F.softmax(t / T - 1000.0 * drop, dim=1)
    student = F.log_softmax(s / T - 1000.0 * drop, dim=1)
    return F.kl_div(student, teacher, reduction="sum") * T ** 2 / t.shape[0]


def ldrld(s, t, y=None, k=7, T=T_DEFAULT, alpha=10.5, beta=7.0, gamma=0.05):
    _, top = s.topk(k, 1, True, True)
    groups = list(combinations(range(k), 2)) + [tuple(range(k))]
    total = 0
    for comb in groups:
        weight = 1.0 / (1.5 + abs(comb[0] - comb[1])) * 2.0 * exp(-gamma * (comb[0] + comb[1] + 2)) \
            if len(comb) == 2 else 1.0
        keep = torch.zeros_like(t).scatter_(1, top[:, list(comb)], 1).bool()
        total = total + weight * _masked_kl(s, t, T, keep)
    in_top = torch.zeros_like(t).scatter_(1, top, 1).bool()
    return alpha * total / len(groups) + beta * _masked_kl(s, t, T, ~in_top)


def _tsm(t, y, k=5, scale=0.5, shift=0.5, gt_scale=0.5):
    """TopKD's Top-K Scaling of the teacher (docs/topkd.md), as a paper reader would write it."""
    t = t.detach()
    vals, idx = t.topk(k, dim=1)
    C = t.shape[1]
    gap = vals.mean(1, keepdim=True) - (t.sum(1, keepdim=True) - vals.sum(1, keepdim=True)) / (C - k)
    w = 1 + scale * (k - torch.arange(k, device=t.device, dtype=t.dtype)) / k
    out = t.scatter(1, idx, vals * w + shift * gap)
    if y is not None:
        in_top = (idx == y[:, None]).any(1, keepdim=True)
        t_y = t.gather(1, y[:, None])
        out = out.scatter(1, y[:, None], torch.where(in_top, out.gather(1, y[:, None]),
                                                     (1 + gt_scale) * t_y + shift * gap))
    return out


def _cos_loss(u, v):
    return 1 - (u * v).sum(1) / (u.norm(dim=1) * v.norm(dim=1)).clamp(min=1e-8)


def tsm_only(s, t, y=None, k=5, T=T_DEFAULT):
    return kd(s, _tsm(t, y, k), None, T)


def topkd(s, t, y=None, k=5, T=T_DEFAULT):
    ts = _tsm(t, y, k)
    order = ts.argsort(dim=1, descending=True)
    pos, neg, non = order[:, :k], order[:, -k:], order[:, k:-k]
    tdl = sum(_cos_loss(s.gather(1, g), ts.gather(1, g)) for g in (pos, neg, non))
    return kd(s, ts, None, T) + tdl.mean()


# ---------------------------------------------------------------------------------------------
# the LLM family
# ---------------------------------------------------------------------------------------------
IGNORE_INDEX = -100


def _token_mean(per_token, labels):
    """Mean over the tokens whose label is not IGNORE_INDEX (all tokens without labels)."""
    if labels is None:
        return per_token.sum() / per_token.shape[0]
    mask = (labels != IGNORE_INDEX).to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum()


def generalized_jsd(s, t, y=None, beta=0.5, temperature=1.0):
    """TRL ``GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta, temperature, "batchmean")``."""
    student_log_probs = F.log_softmax(s / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(t / temperature, dim=-1)
    beta_t = torch.tensor(beta, dtype=student_log_probs.dtype, device=s.device)
    mixture_log_probs = torch.logsumexp(torch.stack([student_log_probs + torch.log(1 - beta_t),
                                                     teacher_log_probs + torch.log(beta_t)]), dim=0)
    kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
    jsd = beta_t * kl_teacher + (1 - beta_t) * kl_student
    if y is not None:
        mask = y != IGNORE_INDEX
        return jsd[mask].sum() / mask.sum()
    return jsd.sum() / jsd.size(0)


def reverse_kl(s, t, y=None):
    """torchtune ``ReverseKLLoss()(student_logits, teacher_logits, labels)`` (normalize=True)."""
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    student_prob = F.softmax(s, dim=-1, dtype=acc)
    teacher_logprob = F.log_softmax(t, dim=-1, dtype=acc)
    inf_mask = torch.isinf(t)
    prod_probs = torch.masked_fill(student_prob * teacher_logprob, inf_mask, 0)
    student_logprob = F.log_softmax(s, dim=-1, dtype=acc)
    prod_probs = prod_probs - torch.masked_fill(student_prob * student_logprob, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    return _token_mean(-x, y)


def tvd(s, t, y=None):
    """Total variation ``½·Σ_c |p_c − q_c|`` per token from two softmaxes [plain formula]."""
    per_token = 0.5 * (F.softmax(t, dim=-1) - F.softmax(s, dim=-1)).abs().sum(-1)
    return _token_mean(per_token, y)


def _tail_log(mass):
    """``log(1 − mass)`` of the summed top-K probability ``mass`` (clamped at the smallest normal number, as
    the published codes guard ``log 0``)."""
    return torch.log((1 - mass).clamp(min=torch.finfo(mass.dtype).tiny))


def sparse_tail_kl(s, teacher, y=None):
    """Megatron-style forward KL over the K stored classes + one tail bucket (temperature 1):
    ``Σ_k p_k·(log p_k − log q_k) + p_tail·(log p_tail − log q_tail)``, ``p_tail = 1 − Σp_k``,
    ``q_tail = 1 − Σq_k``; ``teacher`` = ``(ids, logprobs, normalize)``."""
    ids, logprobs = teacher[0], teacher[1]
    student_logprobs = F.log_softmax(s, dim=-1).gather(-1, ids)
    p_k = logprobs.exp()
    p_top, q_top = p_k.sum(-1), student_logprobs.exp().sum(-1)
    kl = (p_k * (logprobs - student_logprobs)).sum(-1) + (1 - p_top) * (_tail_log(p_top) - _tail_log(q_top))
    return _token_mean(kl, y)


def topk_tail(s, t, y=None, k=64):
    """``sparse_tail_kl`` against the top-k of the dense teacher's ``log_softmax``."""
    logprobs, ids = F.log_softmax(t, dim=-1).topk(k, dim=-1)
    return sparse_tail_kl(s, (ids, logprobs), y)


def sparse_renorm_kl(s, teacher, y=None, temperature=1.0):
    """MaxText / NeMo-RL renormalised top-K KL: teacher and student ``log_softmax`` over the K stored ids,
    ``T²·KL(p̂‖q̂)`` per token."""
    ids, logprobs = teacher[0], teacher[1]
    lp = F.log_softmax(logprobs / temperature, dim=-1)
    lq = F.log_softmax(s.gather(-1, ids) / temperature, dim=-1)
    kl = (lp.exp() * (lp - lq)).sum(-1) * temperature ** 2
    return _token_mean(kl, y)


def sparse_renorm_ce(s, teacher, y):
    """``sparse_renorm_kl`` + ``F.cross_entropy(s, y)`` (the usual LM loss added to the KD term)."""
    return sparse_renorm_kl(s, teacher, y) + F.cross_entropy(s, y, ignore_index=IGNORE_INDEX)


#: preset name (benchmarks/presets.py) -> (eager published-arithmetic loss f(s, t, y), where it comes from)
BASELINES = {
    "kd": (kd, "mdistiller kd_loss"),
    "kd+ce": (kd_ce, "mdistiller kd_loss + F.cross_entropy"),
    "kd+standardize": (kd_standardize, "logit-standardization-KD normalize + kd_loss"),
    "dkd": (dkd, "mdistiller dkd_loss (-1000 mask)"),
    "aekt": (aekt, "dkd_loss arithmetic + adaptive TCKD weight [reconstructed]"),
    "dtkd": (dtkd, "JinYu1998/DTKD forward_train"),
    "ldrld": (ldrld, "yema-web/LDRLD selective_softmax_loss"),
    "topkd": (topkd, "TopKD paper description: TSM + KD + TDL [reconstructed]"),
    "tsm-only": (tsm_only, "TopKD paper description: TSM + KD [reconstructed]"),
    "reverse_kl": (reverse_kl, "torchtune ReverseKLLoss"),
    "jsd": (generalized_jsd, "TRL GKDTrainer.generalized_jsd_loss (beta 0.5)"),
    "tvd": (tvd, "1/2 sum |p - q| from two softmaxes [plain formula]"),
    "topk_tail": (topk_tail, "topk of the teacher log_softmax + Megatron-style tail KL (1 - sum p, 1 - sum q)"),
    "sparse_renorm": (sparse_renorm_kl, "MaxText / NeMo-RL renormalised top-K KL (gather + 2 log_softmax)"),
    "sparse_tail": (sparse_tail_kl, "Megatron-style top-K KL with a tail bucket (1 - sum p, 1 - sum q)"),
    "sparse_renorm+ce": (sparse_renorm_ce, "renormalised top-K KL + F.cross_entropy"),
}

#: baselines whose teacher is a stored top-K (``ids``, ``logprobs``) rather than dense logits
SPARSE_BASELINES = ("sparse_renorm", "sparse_tail", "sparse_renorm+ce")
