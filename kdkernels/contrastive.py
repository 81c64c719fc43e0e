"""Batch-coupled contrastive losses (docs/contrastive.md): :func:`info_nce` and :func:`msd_contrastive_loss`.

They couple the samples of a batch, so they have their own kernel family (``dispatch.LAUNCHERS
["contrastive"]``) instead of the per-row logit engine.
"""
from __future__ import annotations

import sys
from typing import Sequence

import torch
import torch.nn.functional as F

from . import reference
from .dispatch import LAUNCHERS, resolve
from .spec import positive
from .validation import check_logits


# ---------------------------------------------------------------------------------------------
def _launcher(name: str):
    """The contrastive launcher of a backend that :func:`resolve` accepted (resolve imported it).

    Read from ``sys.modules``, not through ``dispatch.load_launcher``'s cache: under ``torch.compile``
    dynamo snapshots that dict at its first read in a frame (e.g. by a logit loss before this one) and
    does not see the entry ``resolve`` (run eagerly) added since, so it would trace ``importlib`` and
    fail the fullgraph compile.
    """
    module, attr = LAUNCHERS["contrastive"][name].split(":")
    return getattr(sys.modules[module], attr)


def _check_tau(tau) -> float:
    """A finite positive τ (a symbolic τ under ``torch.compile`` is checked by the compiled graph)."""
    if tau is None or isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise ValueError(f"tau must be a finite positive number, got {tau}")
    return positive("tau", tau)


def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float = 0.1, *, backend: str = "auto") -> torch.Tensor:
    """Symmetric InfoNCE of groups ``[G, M, D]`` (or ``[M, D]``): student ``a``, teacher ``b``.

    Rows are L2-normalised inside; per group ``L = ½·[CE(S, diag) + CE(Sᵀ, diag)]`` with
    ``S = â·b̂ᵀ/τ``; the result is the mean over groups (float32, float64 for float64 inputs). Only ``a``
    receives a gradient (``b`` is the teacher).
    """
    check_logits(a, b, "a", "b")
    if a.dim() == 2:
        a, b = a[None], b[None]
    if a.dim() != 3:
        raise ValueError(f"info_nce expects [G, M, D] or [M, D] tensors, got shape {tuple(a.shape)}")
    tau = _check_tau(tau)
    name = resolve(backend, a.device, family="contrastive")
    if name == "reference" or a.numel() == 0:
        return reference.info_nce(a, b, tau)
    return _launcher(name).info_nce(a, b, tau)


def _pool_scales(f: torch.Tensor, scales: Sequence[int]) -> list:
    """``adaptive_avg_pool2d(f, g)`` for every scale, reading the feature map once when it can.

    When ``H`` and ``W`` are multiples of the finest scale ``g_max`` and every scale divides ``g_max``,
    all cells are equal-sized: pool once to ``g_max × g_max`` and average blocks of that small map for the
    coarser scales (exactly adaptive pooling's cells). Otherwise adaptive pooling per scale.
    """
    N, D, H, W = f.shape
    top = max(scales)
    if H % top or W % top or any(top % g for g in scales):
        return [F.adaptive_avg_pool2d(f, g) for g in scales]
    fine = f if (H, W) == (top, top) else F.avg_pool2d(f, (H // top, W // top))
    out = []
    for g in scales:
        r = top // g
        out.append(fine if g == top else fine.reshape(N, D, g, r, g, r).mean(dim=(3, 5)))
    return out


def msd_groups_packed(f: torch.Tensor, scales: Sequence[int]):
    """The groups of :func:`reference.msd_groups` packed for two launches.

    Sample-wise ``[Σg², N, D]`` (one group per scale and cell, rows = samples) and feature-wise
    ``[S, D, max N·g²]`` (one group per scale, rows = channels), zero-padded along the vector dimension:
    zeros change neither dot products nor norms, so each padded group's InfoNCE equals the unpadded one.
    """
    N, D = f.shape[:2]
    pooled = _pool_scales(f, scales)
    sample = torch.cat([p.permute(2, 3, 0, 1).reshape(g * g, N, D) for g, p in zip(scales, pooled)], 0)
    width = N * max(scales) ** 2
    feature = torch.stack([F.pad(p.transpose(0, 1).reshape(D, N * g * g), (0, width - N * g * g))
                           for g, p in zip(scales, pooled)])
    return sample, feature


def msd_contrastive_loss(f_s: torch.Tensor, f_t: torch.Tensor, scales: Sequence[int] = (1, 2, 4),
                         tau: float = 0.1, sample_weight: float = 1.0, feature_weight: float = 1.0, *,
                         backend: str = "auto") -> torch.Tensor:
    """Multi-scale sample-wise + feature-wise contrastive feature distillation [reconstructed].

    ``f_s``, ``f_t``: ``[N, D, H, W]`` with the same ``D`` (align channels with a connector first). For
    each scale ``g``: adaptive-average-pool to ``g × g``; sample-wise InfoNCE groups, one per (scale,
    cell), rows = samples; feature-wise groups, one per scale, rows = channels with vectors of length
    ``N·g²``. Loss = ``sample_weight · mean(sample groups) + feature_weight · mean(feature groups)``.
    The fused backend runs all sample-wise groups as one launch and all feature-wise groups as another
    (forward and backward: four Triton launches whatever the sizes).
    """
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
    tau = _check_tau(tau)
    name = resolve(backend, f_s.device, family="contrastive")
    if name == "reference" or f_s.numel() == 0 or f_t.numel() == 0:
        return reference.msd_contrastive_loss(f_s, f_t, scales, tau, sample_weight, feature_weight)
    launcher = _launcher(name)
    s_sample, s_feature = msd_groups_packed(f_s, scales)
    t_sample, t_feature = msd_groups_packed(f_t.detach(), scales)
    sample = launcher.info_nce(s_sample, t_sample, tau)
    feature = launcher.info_nce(s_feature, t_feature, tau)
    return sample_weight * sample + feature_weight * feature
