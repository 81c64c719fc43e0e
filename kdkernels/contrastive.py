"""Batch-coupled contrastive losses (losses.md §8): :func:`info_nce` and :func:`msd_contrastive_loss`.

They couple the samples of a batch, so they have their own kernel family (``dispatch.LAUNCHERS
["contrastive"]``) instead of the per-row logit engine.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from . import reference
from .dispatch import load_launcher, resolve
from .validation import check_logits


# ---------------------------------------------------------------------------------------------
def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float = 0.1, *, backend: str = "auto") -> torch.Tensor:
    """Symmetric InfoNCE of groups ``[G, M, D]`` (or ``[M, D]``): student ``a``, teacher ``b``."""
    check_logits(a, b, "a", "b")
    if a.dim() == 2:
        a, b = a[None], b[None]
    if a.dim() != 3:
        raise ValueError(f"info_nce expects [G, M, D] or [M, D] tensors, got shape {tuple(a.shape)}")
    if tau is None or isinstance(tau, bool) or not (isinstance(tau, (int, float)) and tau > 0 and math.isfinite(tau)):
        raise ValueError(f"tau must be a finite positive number, got {tau}")
    name = resolve(backend, a.device, family="contrastive")
    if name == "reference" or a.numel() == 0:
        return reference.info_nce(a, b, float(tau))
    launcher, _ = load_launcher("contrastive", name)
    return launcher.info_nce(a, b, float(tau))


def msd_contrastive_loss(f_s: torch.Tensor, f_t: torch.Tensor, scales: Sequence[int] = (1, 2, 4),
                         tau: float = 0.1, sample_weight: float = 1.0, feature_weight: float = 1.0, *,
                         backend: str = "auto") -> torch.Tensor:
    """Multi-scale sample-wise + feature-wise contrastive feature distillation [reconstructed]."""
    for name, f in (("f_s", f_s), ("f_t", f_t)):
        if not isinstance(f, torch.Tensor) or f.dim() != 4:
            raise ValueError(f"{name} must be a feature map [N, D, H, W], got {getattr(f, 'shape', type(f))}")
    if f_s.shape[1] != f_t.shape[1]:
        raise ValueError(f"channel mismatch: student has D={f_s.shape[1]}, teacher D={f_t.shape[1]}; "
                         "align the channels with a connector (e.g. a 1x1 conv) first")
    if f_s.shape[0] != f_t.shape[0]:
        raise ValueError(f"batch mismatch: student N={f_s.shape[0]}, teacher N={f_t.shape[0]}")
    check_logits(f_s[:, :, :1, :1], f_t[:, :, :1, :1], "f_s", "f_t")  # dtype and device
    scales = tuple(scales)
    if not scales or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in scales):
        raise ValueError(f"scales must be positive ints, got {scales}")
    s_sample, s_feature = reference.msd_groups(f_s, scales)
    t_sample, t_feature = reference.msd_groups(f_t.detach(), scales)
    sample = info_nce(s_sample, t_sample, tau, backend=backend)
    feature = sum(info_nce(a, b, tau, backend=backend) for a, b in zip(s_feature, t_feature)) / len(scales)
    return sample_weight * sample + feature_weight * feature
