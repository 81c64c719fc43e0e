"""Drop-in entry points for LLM distillation code (docs/divergences.md): each reads like the function it
replaces and is only a :class:`~kdkernels.spec.LogitDistill` preset of the one engine (the divergence, the
temperature convention and the normalisation folded into ``kd_weight``/``loss_weight``: no extra pass).

* :func:`generalized_jsd_loss` — TRL's ``GKDTrainer.generalized_jsd_loss``;
* :func:`forward_kl_loss`, :func:`reverse_kl_loss` — torchtune's ``ForwardKLLoss`` / ``ReverseKLLoss``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import parallel
from .functional import logit_distill
from .spec import Divergence, LogitDistill, SparseTeacher

#: the reductions of TRL's generalized_jsd_loss (``"none"`` here is per token, TRL's is per vocabulary entry)
TRL_REDUCTIONS = ("batchmean", "sum", "mean", "none")


def generalized_jsd_loss(student_logits: torch.Tensor, teacher_logits, labels: Optional[torch.Tensor] = None,
                         beta: float = 0.5, temperature: float = 1.0, reduction: str = "batchmean", *,
                         ignore_index: int = -100, softcap=None, backend: str = "auto",
                         process_group=None) -> torch.Tensor:
    """TRL's generalised JSD (``GKDTrainer.generalized_jsd_loss``), fused [code: TRL].

    Per token ``JSD_β = β·KL(p‖m) + (1−β)·KL(q‖m)``, ``m = β·p + (1−β)·q``, ``p``/``q`` the teacher/student
    softmaxes of ``logits / temperature`` — **no** ``T²`` factor, as in TRL; ``beta = 0`` is the forward KL
    ``KL(p‖q)`` and ``beta = 1`` the reverse KL ``KL(q‖p)`` (TRL's special cases). Reductions as TRL's:
    ``"batchmean"`` sums and divides by the number of tokens whose label is not ``ignore_index`` when
    ``labels`` are given, else by ``student_logits.size(0)`` (the batch size for ``[B, L, V]`` input);
    ``"sum"``; ``"mean"`` divides the sum by the number of (valid) tokens × V; ``"none"`` returns the
    per-token values shaped like the leading dims (TRL returns the un-summed ``[..., V]`` terms).
    ``teacher_logits`` may be a :class:`~kdkernels.SparseTeacher` (docs/topk_teachers.md).
    ``process_group``: vocabulary-sharded logits (docs/tensor_parallel.md; ``V`` is then the whole vocabulary).
    """
    if reduction not in TRL_REDUCTIONS:
        raise ValueError(f"reduction must be one of {TRL_REDUCTIONS}, got {reduction!r}")
    if not isinstance(student_logits, torch.Tensor) or student_logits.dim() < 1:
        raise TypeError("student_logits must be a tensor of shape [..., V]")
    V = student_logits.shape[-1]
    if process_group is not None and reduction == "mean":  # TRL's mean divides by the whole vocabulary
        V = parallel.shard_layout(process_group, V, student_logits.device)[1]
    lead = student_logits.shape[:-1]
    kernel_reduction, loss_weight = "batchmean", 1.0
    if reduction == "sum":
        kernel_reduction = "sum"
    elif reduction == "none":
        kernel_reduction = "none"
    elif reduction == "batchmean" and labels is None:  # TRL divides by size(0), not by the token count
        kernel_reduction, loss_weight = "sum", 1.0 / max(student_logits.shape[0], 1)
    elif reduction == "mean" and labels is None:  # the sum / (tokens · V)
        kernel_reduction, loss_weight = "sum", 1.0 / max(math.prod(lead) * V, 1)
    elif reduction == "mean":  # per valid token, then / V
        loss_weight = 1.0 / V
    T = float(temperature)
    spec = LogitDistill(temperature=T, kd_weight=1.0 / (T * T), divergence=Divergence("jsd", beta),
                        reduction=kernel_reduction, ignore_index=ignore_index, loss_weight=loss_weight,
                        softcap=softcap)
    return logit_distill(student_logits, teacher_logits, labels, spec, backend=backend, process_group=process_group)


def _torchtune_kl(student_logits, teacher_logits, labels, divergence: str, ignore_index: int, normalize: bool,
                  backend: str, process_group) -> torch.Tensor:
    if labels is None:
        raise ValueError("torchtune's KD losses take labels (the ignore mask of prompt and padding tokens)")
    value = "cross_entropy" if divergence == "forward_kl" and not isinstance(teacher_logits, SparseTeacher) \
        else "kl"
    spec = LogitDistill(temperature=1.0, divergence=divergence, value=value, ignore_index=ignore_index,
                        reduction="batchmean" if normalize else "sum")
    return logit_distill(student_logits, teacher_logits, labels, spec, backend=backend, process_group=process_group)


def forward_kl_loss(student_logits: torch.Tensor, teacher_logits, labels: torch.Tensor, *,
                    ignore_index: int = -100, normalize: bool = True, backend: str = "auto",
                    process_group=None) -> torch.Tensor:
    """torchtune's ``ForwardKLLoss(ignore_index)(student_logits, teacher_logits, labels, normalize)``, fused
    [code: torchtune].

    Its number is the soft cross-entropy ``−Σ_c p_c·log q_c`` per token (``KL(p‖q) + H(p)``; the same
    gradient as the KL), at temperature 1, averaged over the tokens whose label is not ``ignore_index``
    (``normalize=True``; 0 when there are none) or summed. torchtune drops classes where the *student* is
    ``-inf`` from its sum; here such a class that the teacher gives mass makes the token's loss ``inf``
    (the exact value). With a :class:`~kdkernels.SparseTeacher` the number is the KL (``value="kl"``).
    """
    return _torchtune_kl(student_logits, teacher_logits, labels, "forward_kl", ignore_index, normalize, backend,
                        process_group)


def reverse_kl_loss(student_logits: torch.Tensor, teacher_logits, labels: torch.Tensor, *,
                    ignore_index: int = -100, normalize: bool = True, backend: str = "auto",
                    process_group=None) -> torch.Tensor:
    """torchtune's ``ReverseKLLoss(ignore_index)(student_logits, teacher_logits, labels, normalize)``, fused
    [code: torchtune]: ``KL(q‖p) = Σ_c q_c·(log q_c − log p_c)`` per token at temperature 1, averaged over
    the valid tokens (or summed). torchtune drops classes where the *teacher* is ``-inf``; here a class the
    teacher masks while the student gives it mass makes the token's loss ``inf`` (mathematically so)."""
    return _torchtune_kl(student_logits, teacher_logits, labels, "reverse_kl", ignore_index, normalize, backend,
                        process_group)
