"""kdkernels — fused GPU kernels for knowledge-distillation losses.

Every logit loss is a preset of one engine spec, :class:`LogitDistill`; the method functions only fill
it in. Backends: ``reference`` (plain PyTorch autograd), ``triton``, ``cuda`` and ``cpu`` (C++); see
``python -m kdkernels.info``.
"""
from . import nn, reference
from .dispatch import BACKENDS, BackendUnavailableError
from .engine import repeatable_backward
from .contrastive import info_nce, msd_contrastive_loss
from .functional import (aekt_loss, dkd_loss, dtkd_loss, kd_loss, ldrld_loss, logit_distill,
                         topkd_loss)
from .linear import TeacherHidden, TeacherLogits, fused_linear_distill
from .llm import forward_kl_loss, generalized_jsd_loss, reverse_kl_loss
from .spec import (JSD, Decoupled, Divergence, LogitDistill, RankRelation, SkewKL, SkewRKL, SparseTeacher, TopK,
                   TopKDecoupled, TopKScale)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "BackendUnavailableError", "Decoupled", "Divergence", "JSD", "LogitDistill", "RankRelation",
    "SkewKL", "SkewRKL", "SparseTeacher", "TopK",
    "TopKDecoupled", "TopKScale", "aekt_loss", "dkd_loss", "dtkd_loss", "info_nce", "kd_loss",
    "ldrld_loss", "logit_distill", "msd_contrastive_loss", "nn", "reference", "repeatable_backward",
    "topkd_loss", "fused_linear_distill", "TeacherHidden", "TeacherLogits", "generalized_jsd_loss", "forward_kl_loss", "reverse_kl_loss",
]


def __getattr__(name):
    """``kdkernels.testing`` (check a spec against the reference) is imported on first use."""
    if name == "testing":
        import importlib
        return importlib.import_module(".testing", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
