"""``torch.nn.Module`` wrappers: each holds a method's keyword arguments and calls the functional form."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import contrastive as Fc
from . import functional as Fk
from .spec import LogitDistill


class _LogitLoss(nn.Module):
    """``forward(student_logits, teacher_logits, labels=None)`` → ``fn(..., **kwargs)``."""

    fn = None
    labels_positional = False

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, student_logits, teacher_logits, labels: Optional[torch.Tensor] = None):
        fn = type(self).fn
        if self.labels_positional:
            return fn(student_logits, teacher_logits, labels, **self.kwargs)
        return fn(student_logits, teacher_logits, labels=labels, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class KDLoss(_LogitLoss):
    fn = staticmethod(Fk.kd_loss)


class DKDLoss(_LogitLoss):
    """DKD with the published recipe's optional warm-up: ``forward(s, t, y, epoch=None)`` scales the loss
    by ``min(epoch / warmup, 1)`` when ``warmup`` is set (the function itself has no hidden state)."""

    fn = staticmethod(Fk.dkd_loss)
    labels_positional = True

    def __init__(self, warmup: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        self.warmup = warmup

    def forward(self, student_logits, teacher_logits, labels, epoch: Optional[int] = None):
        loss = super().forward(student_logits, teacher_logits, labels)
        if self.warmup and epoch is not None:
            loss = loss * min(epoch / self.warmup, 1.0)
        return loss


class AEKTLoss(_LogitLoss):
    fn = staticmethod(Fk.aekt_loss)
    labels_positional = True


class DTKDLoss(_LogitLoss):
    fn = staticmethod(Fk.dtkd_loss)


class LDRLDLoss(_LogitLoss):
    fn = staticmethod(Fk.ldrld_loss)


class TopKDLoss(_LogitLoss):
    fn = staticmethod(Fk.topkd_loss)
    labels_positional = True


class LogitDistillLoss(nn.Module):
    """Any :class:`~kdkernels.LogitDistill` spec as a module."""

    def __init__(self, spec: LogitDistill, backend: str = "auto"):
        super().__init__()
        self.spec, self.backend = spec, backend

    def forward(self, student_logits, teacher_logits, labels=None):
        return Fk.logit_distill(student_logits, teacher_logits, labels, self.spec, backend=self.backend)


class InfoNCELoss(nn.Module):
    def __init__(self, tau: float = 0.1, backend: str = "auto"):
        super().__init__()
        self.tau, self.backend = tau, backend

    def forward(self, a, b):
        return Fc.info_nce(a, b, self.tau, backend=self.backend)


class MSDContrastiveLoss(nn.Module):
    def __init__(self, scales=(1, 2, 4), tau=0.1, sample_weight=1.0, feature_weight=1.0, backend="auto"):
        super().__init__()
        self.scales, self.tau, self.backend = tuple(scales), tau, backend
        self.sample_weight, self.feature_weight = sample_weight, feature_weight

    def forward(self, f_s, f_t):
        return Fc.msd_contrastive_loss(f_s, f_t, self.scales, self.tau, self.sample_weight,
                                       self.feature_weight, backend=self.backend)


class TaskSerialization(nn.Module):
    """AEKT's task serialisation (losses.md §7): a ``Linear(C, C)`` initialised to the identity.

    CE goes on ``module(student_logits)``; AEKT goes on the student logits before it; inference uses the
    module's output.
    """

    def __init__(self, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(num_classes, num_classes)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(num_classes))
            self.fc.bias.zero_()

    def forward(self, logits):
        return self.fc(logits)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lam):
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -ctx.lam * g, None


class LearnableTemperature(nn.Module):
    """CTKD-style temperature: ``T = t_min + (t_max − t_min)·sigmoid(θ)`` behind a gradient-reversal
    layer of strength ``lam`` (the kernels only see a tensor temperature that requires grad)."""

    def __init__(self, init: float = 4.0, t_min: float = 1.0, t_max: float = 21.0):
        super().__init__()
        if not t_min < init < t_max:
            raise ValueError(f"init must lie in (t_min, t_max) = ({t_min}, {t_max}), got {init}")
        self.t_min, self.t_max = t_min, t_max
        frac = (init - t_min) / (t_max - t_min)
        self.theta = nn.Parameter(torch.logit(torch.tensor(frac, dtype=torch.float32)))

    def forward(self, lam: float = 1.0) -> torch.Tensor:
        theta = _GradReverse.apply(self.theta, lam)
        return self.t_min + (self.t_max - self.t_min) * torch.sigmoid(theta)
