"""``torch.nn.Module`` forms of the losses: real modules over the functional forms.

* A loss module's constructor takes the functional form's settings with the same positional order
  (``DKDLoss(alpha, beta, temperature)`` as mdistiller's ``dkd_loss``) and everything else keyword-only;
  the signature is the functional form's, so a misspelt keyword is a ``TypeError`` at construction.
* A tensor setting (a temperature tensor) is a registered buffer, or a parameter when it requires grad:
  it is in ``state_dict`` and moves with ``.to()`` / ``.cuda()`` / ``.double()``.
* ``repr(module)`` shows every setting.
* The warm-up of the DKD and DTKD recipes (``warmup=``, ``forward(..., epoch=)``) scales the loss through
  ``loss_weight=``, folded into the fused kernel's gradient scale (no extra pass in backward).
"""
from __future__ import annotations

import difflib
import inspect
from typing import Optional, Sequence

import torch
from torch import nn

from . import contrastive as Fc
from . import functional as Fk
from .spec import LogitDistill, positive

#: arguments of the functional forms that a loss module takes in ``forward``, not in its constructor
FORWARD_ARGS = ("logits_student", "logits_teacher", "labels")

COMMON_ARGS = """
    Keyword-only settings shared by every logit loss (the functional form's keywords):
        ignore_index (int): label of ignored rows (loss 0, gradient 0, not counted). Default -100.
        reduction (str): ``"batchmean"`` (sum / number of non-ignored rows), ``"sum"`` or ``"none"``
            (per-row losses shaped like the leading dims).
        standardize (bool): logit standardisation ``(z − mean)/(std + 1e-7)`` of both rows first.
        ce_weight (float): adds ``ce_weight·CE(s, y)`` at temperature 1 in the same pass (needs labels).
        teacher_topk_scale: TopKD's TSM on the teacher (``kdk.TopKScale`` or a dict) — not TopKDLoss.
        loss_weight (float): multiplies the loss inside the fused launch (no extra pass in backward).
        backend (str): ``"auto"``, ``"reference"``, ``"triton"``, ``"cuda"`` or ``"cpu"``.
        check (bool | None): value checks (labels, non-finite logits); None reads ``KDKERNELS_CHECK``.
        inplace (bool): write the gradient into the student logits' storage (the logits are lost).
        process_group: tensor (vocabulary) parallel — the ``torch.distributed`` group over which the
            class dim is sharded (each rank passes its ``[..., V_r]`` columns, labels stay global), or
            None. docs/tensor_parallel.md.

    Shapes: ``forward(logits_student, logits_teacher, labels=None)`` with logits ``[..., C]`` (same shape,
    device; leading dims are rows) and integer labels ``[...]``; returns a 0-dim loss (``"none"``: the
    leading dims). Only the student logits (and a learnable temperature) receive gradients.
"""


def _describe(value) -> str:
    """A short form of a setting for ``repr``: tensors by value (one element) or by shape."""
    if isinstance(value, torch.Tensor):
        learnable = ", learnable" if value.requires_grad else ""
        if value.numel() == 1:
            return f"tensor({float(value.detach().reshape(())):.6g}{learnable})"
        return f"tensor(shape={tuple(value.shape)}, dtype={value.dtype}{learnable})"
    return repr(value)


def _register_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """A tensor setting: a parameter when it requires grad (learnable), else a buffer."""
    if isinstance(value, nn.Parameter):
        module.register_parameter(name, value)
    elif value.requires_grad:
        if value.grad_fn is not None:
            raise ValueError(
                f"{type(module).__name__}: {name} is the result of a computation (it has a grad_fn); a "
                f"module keeps its settings across steps, so pass an nn.Parameter (learnable) or a plain "
                f"tensor, or call the functional form with the tensor computed at each step")
        module.register_parameter(name, nn.Parameter(value))
    else:
        module.register_buffer(name, value)


def _settings_signature(fn, warmup: bool) -> inspect.Signature:
    """The functional form's signature without the forward arguments (+ ``warmup`` keyword-only)."""
    params = [p for name, p in inspect.signature(fn).parameters.items() if name not in FORWARD_ARGS]
    if warmup:
        first_kw = next((i for i, p in enumerate(params) if p.kind is p.KEYWORD_ONLY), len(params))
        params.insert(first_kw, inspect.Parameter("warmup", inspect.Parameter.KEYWORD_ONLY, default=None))
    return inspect.Signature(params)


class _LogitLoss(nn.Module):
    """A logit loss's settings bound once against its functional form ``fn``; ``forward`` calls ``fn``."""

    fn = None
    #: the recipe multiplies the loss by ``min(epoch / warmup, 1)`` (DKD, DTKD)
    has_warmup = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.fn is not None:
            cls.__signature__ = _settings_signature(cls.fn, cls.has_warmup)

    def __init__(self, *args, **kwargs):
        super().__init__()
        signature = type(self).__signature__
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{type(self).__name__}{signature}: {exc}{_suggestion(kwargs, signature)}") from None
        bound.apply_defaults()
        self.settings = tuple(name for name in bound.arguments if name != "warmup")
        for name, value in bound.arguments.items():
            if isinstance(value, torch.Tensor):
                _register_tensor(self, name, value)
            else:
                setattr(self, name, value)
        if self.has_warmup and self.warmup is not None:
            positive("warmup", self.warmup)

    def forward(self, logits_student: torch.Tensor, logits_teacher: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._call(logits_student, logits_teacher, labels, None)

    def _call(self, logits_student, logits_teacher, labels, epoch) -> torch.Tensor:
        kwargs = {name: getattr(self, name) for name in self.settings}
        if epoch is not None and self.warmup is not None:  # folded into the launch: no extra pass
            kwargs["loss_weight"] = kwargs["loss_weight"] * min(epoch / self.warmup, 1.0)
        return type(self).fn(logits_student, logits_teacher, labels=labels, **kwargs)

    def extra_repr(self) -> str:
        names = tuple(type(self).__signature__.parameters)
        return ", ".join(f"{name}={_describe(getattr(self, name))}" for name in names)


class _WarmupLogitLoss(_LogitLoss):
    has_warmup = True

    def forward(self, logits_student: torch.Tensor, logits_teacher: torch.Tensor,
                labels: Optional[torch.Tensor] = None, *, epoch: Optional[float] = None) -> torch.Tensor:
        """``epoch``: with ``warmup`` set, the loss is scaled by ``min(epoch / warmup, 1)`` (the
        published training step's factor); None (or no ``warmup``): no scaling."""
        return self._call(logits_student, logits_teacher, labels, epoch)


def _suggestion(kwargs: dict, signature: inspect.Signature) -> str:
    unknown = [k for k in kwargs if k not in signature.parameters]
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, list(signature.parameters), n=1)
        if close:
            hints.append(f"{name!r} → did you mean {close[0]!r}?")
    return (" (" + "; ".join(hints) + ")") if hints else ""


def _document(cls):
    cls.__doc__ = (cls.__doc__ or "") + COMMON_ARGS
    return cls


@_document
class KDLoss(_LogitLoss):
    """Hinton KD: ``ℓ_n = T²·KL(softmax(t_n/T) ‖ softmax(s_n/T))``, reduced over rows.

    Equals mdistiller's ``kd_loss(logits_student, logits_teacher, temperature)`` (``batchmean``).

    Args:
        temperature (float | Tensor): T > 0; a 0-dim or per-row tensor is a buffer, a parameter when it
            requires grad (CTKD: learnable, receives ∂loss/∂T). Default 4.0.
        divergence (str | tuple | Divergence): the KD term's ``D(p‖q)``: ``"forward_kl"`` (default),
            ``"reverse_kl"``, ``("jsd", β)``, ``"tvd"``, ``("skew_kl", α)``, ``("skew_rkl", α)``
            (docs/divergences.md); the loss is ``T²·D``.
        teacher_topk (TopK | None): mask the teacher to its top-k, ``kdk.TopK(k, "renorm"|"tail"|"teacher")``
            (docs/topk_teachers.md). ``forward`` also accepts a ``kdk.SparseTeacher`` as the teacher.
        softcap (float | tuple | None): ``c·tanh(x/c)`` on the logits first (a ``(student, teacher)`` pair,
            ``None`` for no cap).

    Example::

        >>> crit = kdk.nn.KDLoss(4.0)
        >>> loss = crit(student(x), teacher(x).detach())
    """

    fn = staticmethod(Fk.kd_loss)


@_document
class DKDLoss(_WarmupLogitLoss):
    """Decoupled KD: ``ℓ_n = α·TCKD_n + β·NCKD_n`` (target/non-target split, both × T²); labels required.

    Equals mdistiller's ``dkd_loss(logits_student, logits_teacher, target, alpha, beta, temperature)``,
    and with ``warmup`` its ``DKD.forward_train`` factor ``min(epoch / warmup, 1)`` (the recipe: 20).

    Args:
        alpha (float): TCKD weight. Default 1.0.
        beta (float): NCKD weight. Default 8.0.
        temperature (float | Tensor): T > 0. Default 4.0.
        warmup (float | None, keyword-only): epochs of linear warm-up; ``forward(..., epoch=e)`` scales
            the loss by ``min(e / warmup, 1)``. None: no warm-up.

    Example::

        >>> crit = kdk.nn.DKDLoss(1.0, 8.0, 4.0, warmup=20)
        >>> loss = crit(student(x), teacher(x).detach(), y, epoch=epoch)
    """

    fn = staticmethod(Fk.dkd_loss)


@_document
class AEKTLoss(_LogitLoss):
    """AEKT: ``ℓ_n = α·min(p_y/q_y, max_weight)·TCKD_n + β·NCKD_n`` (the weight a constant of the
    gradient); labels required. **[reconstructed]** from the paper (no public code).

    Args:
        alpha (float): TCKD weight. Default 1.0.
        beta (float): NCKD weight. Default 8.0.
        temperature (float | Tensor): T > 0. Default 4.0.
        max_weight (float, keyword-only): cap of the adaptive TCKD weight. Default 10.0.

    Example::

        >>> crit = kdk.nn.AEKTLoss(1.0, 8.0, 4.0)
        >>> loss = crit(student(x), teacher(x).detach(), y)
    """

    fn = staticmethod(Fk.aekt_loss)


@_document
class DTKDLoss(_WarmupLogitLoss):
    """Dynamic-temperature KD: ``ℓ_n = α·T_t·T_s·KL(softmax(t/T_t) ‖ softmax(s/T_s)) + β·τ²·KL_τ`` with
    ``T_s = 2v/(x+v)·τ``, ``T_t = 2x/(x+v)·τ`` from the row maxima ``v = max s``, ``x = max t``.

    Equals JinYu1998/DTKD's ``DTKD.forward_train`` loss (rows with ``x + v ≤ 0``, ``x ≤ 0`` or ``v ≤ 0``
    use ``T_s = T_t = τ``: documented deviation), and with ``warmup`` its ``min(epoch / warmup, 1)``.

    Args:
        temperature (float | Tensor): the reference temperature τ > 0. Default 4.0.
        alpha (float): weight of the dynamic-temperature term. Default 3.0.
        beta (float): weight of the plain KD term. Default 1.0.
        warmup (float | None, keyword-only): epochs of linear warm-up (the official config's
            ``DTKD.WARMUP``); ``forward(..., epoch=e)`` scales by ``min(e / warmup, 1)``.

    Example::

        >>> crit = kdk.nn.DTKDLoss(4.0, 3.0, 1.0, warmup=20)
        >>> loss = crit(student(x), teacher(x).detach(), epoch=epoch)
    """

    fn = staticmethod(Fk.dtkd_loss)


@_document
class LDRLDLoss(_LogitLoss):
    """LDRLD: ``ℓ_n = α·Σ_{r<r'≤k} w(r, r')·KL_pair + α·KL_set + β·KL_rest`` over the top-k classes
    (rank-weighted pair terms, set term, rest term; docs/ldrld.md).

    Equals yema-web/LDRLD's ``LDRLD.forward`` loss (set term weighted 1 at k = 2: documented).

    Args:
        k (int): top-k classes, ``2 ≤ k ≤ C − 1``. Default 7.
        temperature (float | Tensor): T > 0. Default 4.0.
        alpha (float): weight of the local (pair + set) terms. Default 10.5.
        beta (float): weight of the rest term. Default 7.0.
        rank_by (str, keyword-only): ``"student"`` or ``"teacher"`` ranks the top-k. Default "student".
        eps, delta, lam (float, keyword-only): ``w(r, r') = delta·exp(−lam·(r + r'))/(|r − r'| + eps)``.

    Example::

        >>> crit = kdk.nn.LDRLDLoss(7, 4.0)
        >>> loss = crit(student(x), teacher(x).detach())
    """

    fn = staticmethod(Fk.ldrld_loss)


@_document
class TopKDLoss(_LogitLoss):
    """TopKD: ``ℓ_n = kd_weight·T²·KL(softmax(TSM(t)/T) ‖ softmax(s/T)) + tdl_weight·TDL_n``
    (+ ``contrastive_weight·InfoNCE`` over the batch). **[reconstructed]** (no public code).

    Args:
        k (int): top-k of the teacher scaling and of TDL; TDL needs ``2k < C`` (C = 10: k ≤ 4).
            Default 5.
        temperature (float | Tensor): T > 0. Default 4.0.
        scale, shift, gt_scale (float, keyword-only): the Top-K Scaling Module's constants (0.5 each).
        kd_weight, tdl_weight (float, keyword-only): term weights (1.0 each; ``tdl_weight=0`` drops TDL).
        tdl_weights (tuple, keyword-only): TDL's (Pos, Neg, Non) weights. Default (1, 1, 1).
        contrastive_weight, contrastive_tau (float, keyword-only): logit InfoNCE weight (0) and τ (0.1).

    Example::

        >>> crit = kdk.nn.TopKDLoss(5, 4.0)          # C ≥ 11; on CIFAR-10 use TopKDLoss(4)
        >>> loss = crit(student(x), teacher(x).detach(), y)
    """

    fn = staticmethod(Fk.topkd_loss)


class LogitDistillLoss(nn.Module):
    """Any :class:`~kdkernels.LogitDistill` spec as a module: ``ℓ = logit_distill(s, t, labels, spec)``.

    Args:
        spec (LogitDistill): the engine spec. A tensor temperature in it is registered (buffer, or
            parameter when it requires grad), so it moves with the module and is in ``state_dict``.
        backend (str, keyword-only): as the functional forms. Default "auto".
        process_group (keyword-only): the group of a vocabulary-sharded class dim (tensor parallel), or None.

    Shapes: ``forward(logits_student, logits_teacher, labels=None)``, logits ``[..., C]``, labels ``[...]``.

    Example::

        >>> spec = kdk.LogitDistill(temperature=2.0, ce_weight=1.0, decoupled=kdk.Decoupled(1.0, 8.0))
        >>> loss = kdk.nn.LogitDistillLoss(spec)(s, t, y)
    """

    def __init__(self, spec: LogitDistill, *, backend: str = "auto", process_group=None):
        super().__init__()
        if not isinstance(spec, LogitDistill):
            raise TypeError(f"spec must be a kdkernels.LogitDistill, got {type(spec).__name__}")
        self.spec, self.backend, self.process_group = spec, backend, process_group
        if isinstance(spec.temperature, torch.Tensor):
            _register_tensor(self, "temperature", spec.temperature)

    def forward(self, logits_student, logits_teacher, labels=None):
        spec = self.spec
        if isinstance(spec.temperature, torch.Tensor):  # the registered (moved, loaded) tensor
            spec = spec.replace(temperature=self.temperature)
        return Fk.logit_distill(logits_student, logits_teacher, labels, spec, backend=self.backend,
                                process_group=self.process_group)

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, backend={self.backend!r}"


class FusedLinearDistillLoss(nn.Module):
    """``forward(student_hidden, student_weight, teacher, labels=None, student_bias=None)`` →
    :func:`kdkernels.fused_linear_distill` with this module's ``spec`` (default: forward KL at T = 1),
    ``softcap``, ``chunk_size`` and ``backend``: the loss straight from hidden states, no ``[N, V]`` logits.

    Example::

        loss_fn = kdk.nn.FusedLinearDistillLoss(kdk.LogitDistill(temperature=1.0, ce_weight=1.0))
        loss = loss_fn(hidden, lm_head.weight, kdk.TeacherHidden(t_hidden, t_lm_head.weight), labels)
    """

    def __init__(self, spec: Optional[LogitDistill] = None, *, softcap: Optional[float] = None,
                 chunk_size: Optional[int] = None, backend: str = "auto", process_group=None):
        super().__init__()
        if spec is not None and not isinstance(spec, LogitDistill):
            raise TypeError(f"spec must be a kdkernels.LogitDistill, got {type(spec).__name__}")
        self.spec = LogitDistill(temperature=1.0) if spec is None else spec
        self.softcap, self.chunk_size, self.backend = softcap, chunk_size, backend
        self.process_group = process_group

    def forward(self, student_hidden, student_weight, teacher, labels=None, student_bias=None):
        from .linear import fused_linear_distill
        return fused_linear_distill(student_hidden, student_weight, teacher, labels, self.spec,
                                    student_bias=student_bias, softcap=self.softcap, chunk_size=self.chunk_size,
                                    backend=self.backend, process_group=self.process_group)

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, softcap={self.softcap}, chunk_size={self.chunk_size}, backend={self.backend!r}"


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE: ``ℓ = mean_g ½·[CE(S_g, diag) + CE(S_gᵀ, diag)]``, ``S = â·b̂ᵀ/τ`` (rows
    L2-normalised). **[reconstructed]**.

    Args:
        tau (float): τ > 0. Default 0.1.
        backend (str, keyword-only): ``"auto"``, ``"reference"`` or ``"triton"``. Default "auto".

    Shapes: ``forward(a, b)`` with student ``a`` and teacher ``b`` of shape ``[G, M, D]`` or ``[M, D]``;
    returns a 0-dim loss; only ``a`` receives a gradient.

    Example::

        >>> loss = kdk.nn.InfoNCELoss(0.1)(proj_s(f_s), proj_t(f_t).detach())
    """

    def __init__(self, tau: float = 0.1, *, backend: str = "auto"):
        super().__init__()
        self.tau, self.backend = positive("tau", tau), backend

    def forward(self, a, b):
        return Fc.info_nce(a, b, self.tau, backend=self.backend)

    def extra_repr(self) -> str:
        return f"tau={self.tau!r}, backend={self.backend!r}"


class MSDContrastiveLoss(nn.Module):
    """Multi-scale sample-wise + feature-wise contrastive distillation on feature maps:
    ``ℓ = sample_weight·mean(sample groups) + feature_weight·mean(feature groups)`` of InfoNCE.
    **[reconstructed]**.

    Args:
        scales (sequence of int): pooling grids g (g × g cells). Default (1, 2, 4).
        tau (float): InfoNCE τ > 0. Default 0.1.
        sample_weight, feature_weight (float): weights of the two terms. Default 1.0 each.
        backend (str, keyword-only): as :class:`InfoNCELoss`.

    Shapes: ``forward(f_s, f_t)`` with feature maps ``[N, D, H, W]`` of the same D (align channels with a
    1×1 conv first); returns a 0-dim loss; only ``f_s`` receives a gradient.

    Example::

        >>> loss = kdk.nn.MSDContrastiveLoss((1, 2, 4), 0.1)(feat_s, feat_t.detach())
    """

    def __init__(self, scales: Sequence[int] = (1, 2, 4), tau: float = 0.1, sample_weight: float = 1.0,
                 feature_weight: float = 1.0, *, backend: str = "auto"):
        super().__init__()
        self.scales, self.tau, self.backend = tuple(scales), positive("tau", tau), backend
        self.sample_weight, self.feature_weight = sample_weight, feature_weight

    def forward(self, f_s, f_t):
        return Fc.msd_contrastive_loss(f_s, f_t, self.scales, self.tau, self.sample_weight,
                                       self.feature_weight, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"scales={self.scales!r}, tau={self.tau!r}, sample_weight={self.sample_weight!r}, "
                f"feature_weight={self.feature_weight!r}, backend={self.backend!r}")


class TaskSerialization(nn.Module):
    """AEKT's task serialisation (docs/dkd.md): a ``Linear(C, C)`` initialised to the identity.

    CE goes on ``module(student_logits)``; AEKT goes on the student logits before it; inference uses the
    module's output.

    Args:
        num_classes (int): C.

    Shapes: ``forward(logits)`` ``[..., C]`` → ``[..., C]``.

    Example::

        >>> head = kdk.nn.TaskSerialization(100)
        >>> loss = F.cross_entropy(head(s), y) + kdk.aekt_loss(s, t, y)
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
    layer of strength ``lam`` (the kernels only see a tensor temperature that requires grad).

    Args:
        init (float): initial T, in ``(t_min, t_max)``. Default 4.0.
        t_min, t_max (float): bounds of T. Defaults 1.0 and 21.0.

    Shapes: ``forward(lam=1.0)`` → a 0-dim T; pass it as ``temperature=`` of a functional form each step.

    Example::

        >>> temp = kdk.nn.LearnableTemperature(4.0)
        >>> loss = kdk.kd_loss(s, t, temp(lam=cos_schedule(epoch)))
    """

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

    def extra_repr(self) -> str:
        return f"t_min={self.t_min!r}, t_max={self.t_max!r}"
