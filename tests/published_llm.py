"""Independent transcriptions of the LLM distillation losses kdkernels' entry points reproduce (plain
PyTorch re-writings of the arithmetic of the public code, not copies; test-only).

* TRL — ``GKDTrainer.generalized_jsd_loss`` (trl/trainer/gkd_trainer.py): temperature divides the logits,
  no T² factor; β = 0 forward KL, β = 1 reverse KL, else the log-space mixture; batchmean divides by the
  number of non-ignored tokens (labels) or by ``size(0)``.
* torchtune — ``ForwardKLLoss`` / ``ReverseKLLoss`` (torchtune/modules/loss/kd_losses.py): per-token sums
  with ``-inf`` classes masked to 0, averaged over the non-ignored tokens.
* Megatron-style offline top-k KL with a tail bucket, and the renormalised top-k KL of MaxText/NeMo-RL, as
  the stored ``(ids, logprobs)`` users run them in plain PyTorch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def trl_generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                             reduction="batchmean"):
    student_logits = student_logits / temperature
    teacher_logits = teacher_logits / temperature
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta_t = torch.tensor(beta, dtype=student_log_probs.dtype)
        mixture = torch.logsumexp(torch.stack([student_log_probs + torch.log(1 - beta_t),
                                               teacher_log_probs + torch.log(beta_t)]), dim=0)
        kl_teacher = F.kl_div(mixture, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture, student_log_probs, reduction="none", log_target=True)
        jsd = beta_t * kl_teacher + (1 - beta_t) * kl_student
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    if reduction == "batchmean":
        return jsd.sum() / mask.sum() if labels is not None else jsd.sum() / jsd.size(0)
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    return jsd


def torchtune_forward_kl(student_logits, teacher_logits, labels, ignore_index=-100, normalize=True):
    teacher_prob = F.softmax(teacher_logits, dim=-1, dtype=torch.float32 if teacher_logits.dtype != torch.float64
                             else torch.float64)
    inf_mask = torch.isinf(student_logits)
    student_logprob = F.log_softmax(student_logits, dim=-1, dtype=teacher_prob.dtype)
    prod_probs = torch.masked_fill(teacher_prob * student_logprob, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    mask = (labels != ignore_index).int()
    if not normalize:
        return -torch.sum(x * mask.view(-1), dim=0)
    if torch.sum(mask.view(-1), dim=0) == 0:
        return torch.tensor(0.0, device=x.device)
    return -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)


def torchtune_reverse_kl(student_logits, teacher_logits, labels, ignore_index=-100, normalize=True):
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    student_prob = F.softmax(student_logits, dim=-1, dtype=dtype)
    teacher_logprob = F.log_softmax(teacher_logits, dim=-1, dtype=dtype)
    inf_mask = torch.isinf(teacher_logits)
    prod_probs = torch.masked_fill(student_prob * teacher_logprob, inf_mask, 0)
    student_logprob = F.log_softmax(student_logits, dim=-1, dtype=dtype)
    prod_probs = prod_probs - torch.masked_fill(student_prob * student_logprob, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    mask = (labels != ignore_index).int()
    if not normalize:
        return -torch.sum(x * mask.view(-1), dim=0)
    if torch.sum(mask.view(-1), dim=0) == 0:
        return torch.tensor(0.0, device=x.device)
    return -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)


def megatron_topk_tail_kl(student_logits, ids, logprobs, labels=None, ignore_index=-100):
    """Forward KL over the K stored classes plus one tail bucket (teacher tail 1 − Σp, student tail from
    its full softmax), temperature 1, mean over valid tokens."""
    lq = F.log_softmax(student_logits, dim=-1)
    lq_k = lq.gather(-1, ids)
    p_k = logprobs.exp()
    p_tail = (1 - p_k.sum(-1)).clamp(min=0)
    q_tail = (1 - lq_k.exp().sum(-1)).clamp(min=1e-30)
    kl = (p_k * (logprobs - lq_k)).sum(-1) + torch.where(p_tail > 0, p_tail * (p_tail.clamp(min=1e-30).log()
                                                                            - q_tail.log()), 0.0)
    mask = torch.ones_like(kl, dtype=torch.bool) if labels is None else labels != ignore_index
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def renorm_topk_kl(student_logits, ids, logprobs, temperature=1.0, labels=None, ignore_index=-100):
    """Forward KL between the teacher and student renormalised over the K stored ids (T² scaled)."""
    lp = F.log_softmax(logprobs / temperature, dim=-1)
    lq = F.log_softmax(student_logits.gather(-1, ids) / temperature, dim=-1)
    kl = (lp.exp() * (lp - lq)).sum(-1) * temperature ** 2
    mask = torch.ones_like(kl, dtype=torch.bool) if labels is None else labels != ignore_index
    return (kl * mask).sum() / mask.sum().clamp(min=1)
