"""The one engine spec: every logit loss of docs/README.md is a preset of :class:`LogitDistill`.

A spec is a frozen, validated description of *which* terms a row loss has and with which constants.
Per row ``n`` (after the optional standardisation ``Z`` and teacher transform ``TSM``)::

    ℓ_n =  kd_weight  · T²·KL(p‖q)                                   (§1, plain KD)
         + ce_weight  · CE(s_raw, y)                                 (§1, temperature 1, raw logits)
         + tckd_w(n)  · TCKD_n + nckd_weight · NCKD_n                (§2 DKD, §7 AEKT: tckd_w adaptive)
         + dtkd_weight· T_t·T_s·KL(softmax(t/T_t)‖softmax(s/T_s))    (§4 DTKD, dynamic temperatures)
         + local_weight · L_local + rest_weight · L_rest             (§5 LDRLD)
         + tdl_weight · TDL                                          (§6 TopKD)

The backends never see this class directly: :meth:`LogitDistill.pack` flattens it into two flat
lists (floats, ints) whose layout is defined once here (``FLOAT_FIELDS``/``INT_FIELDS``) and mirrored by
``csrc/kd_params.h``; Triton turns the same values into ``tl.constexpr`` flags.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch

REDUCTIONS = ("batchmean", "sum", "none")
#: what the KD term reports (``LogitDistill.value``): ``T²·KL(p‖q)``, or the soft cross-entropy
#: ``T²·(−Σ p·log q) = T²·(KL(p‖q) + H(p))`` — torchtune's ``ForwardKLLoss`` number; same gradient
VALUES = ("kl", "cross_entropy")
#: ``value`` as the kernels see it (the ``value`` int field, once the backends carry it)
VALUE_CODES = {"kl": 0, "cross_entropy": 1}
RANK_BY = ("student", "teacher")
#: largest k of the in-kernel top-k (docs/engine.md: k ≤ 64 for the logit methods)
MAX_TOPK = 64


def symbolic(value) -> bool:
    """True when ``value`` may be symbolic: a ``torch.SymFloat``/``SymInt`` (``torch.export``, ``make_fx``)
    or any number while ``torch.compile`` traces (dynamo shows a ``SymFloat`` as a ``float``; with
    ``dynamic=True``, or a value that changed between calls under ``dynamic=None``, it is one). Such
    values are checked with ``torch._check``, which dynamo folds for constants and turns into a run-time
    assertion of the compiled graph for symbols: no graph break. (Whether the graph then specialises on
    the value — a recompile when it changes — is up to the op that consumes it.)"""
    return isinstance(value, (torch.SymFloat, torch.SymInt)) or torch.compiler.is_compiling()


def _number(name: str, value, kind=(int, float), kind_name: str = "a float") -> None:
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {kind_name}, got {type(value).__name__}")


def positive(name: str, value) -> float:
    """A finite positive float. A symbolic value (see :func:`symbolic`) is returned as it is and checked
    by the compiled graph (``torch._check``: the same condition, raised as a RuntimeError)."""
    _number(name, value)
    if symbolic(value):
        torch._check(value > 0, lambda: f"{name} must be a finite positive number")
        torch._check(value < math.inf, lambda: f"{name} must be a finite positive number")
        return float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {value}")
    return float(value)


def _finite(name: str, value) -> float:
    """A finite float (symbolic values: checked at run time, see :func:`positive`)."""
    _number(name, value)
    if symbolic(value):
        torch._check(abs(value) < math.inf, lambda: f"{name} must be finite")
        return float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _int_in(name: str, value, lo: int, hi: int) -> int:
    """An int in ``[lo, hi]`` (symbolic values: checked at run time, see :func:`positive`)."""
    _number(name, value, int, "an int")
    if symbolic(value):
        torch._check(lo <= value, lambda: f"{name} must be in [{lo}, {hi}]")
        torch._check(value <= hi, lambda: f"{name} must be in [{lo}, {hi}]")
        return value
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _fix_k(largest: int, example: str, lowest: int = 1) -> str:
    """The end of a k-range error: the value to pass instead (``example`` formatted with ``k=largest``),
    or that no k fits this number of classes."""
    if largest < lowest:
        return ": no k fits this number of classes"
    return f": pass k <= {largest}, e.g. " + example.format(k=largest)


@dataclass(frozen=True)
class TopKScale:
    """TopKD's Top-K Scaling Module (docs/topkd.md): rescales the teacher's top-k logits (no gradient).

    ``t'_i = (1 + scale·(k − r + 1)/k)·t_i + shift·gap`` for the rank-``r`` class of the teacher's
    top-k, ``t'_y = (1 + gt_scale)·t_y + shift·gap`` when labels are given and ``y`` is not in the
    top-k, else ``t'_j = t_j``; ``gap = mean(top-k) − mean(rest)``. Needs ``1 ≤ k ≤ C − 1``.
    """

    k: int = 5
    scale: float = 0.5
    shift: float = 0.5
    gt_scale: float = 0.5

    def __post_init__(self):
        _int_in("TopKScale.k", self.k, 1, MAX_TOPK)
        for name in ("scale", "shift", "gt_scale"):
            object.__setattr__(self, name, _finite(f"TopKScale.{name}", getattr(self, name)))

    @classmethod
    def coerce(cls, value) -> Optional["TopKScale"]:
        if value is None or isinstance(value, TopKScale):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(f"teacher_topk_scale: unknown keys {sorted(unknown)}")
            return cls(**value)
        raise TypeError("teacher_topk_scale must be None, a kdkernels.TopKScale or a dict")


@dataclass(frozen=True)
class Decoupled:
    """DKD's target/non-target split (§2); ``adaptive=True`` is AEKT's per-row TCKD weight (§7)."""

    alpha: float = 1.0
    beta: float = 8.0
    adaptive: bool = False
    max_weight: float = 10.0

    def __post_init__(self):
        object.__setattr__(self, "alpha", _finite("alpha", self.alpha))
        object.__setattr__(self, "beta", _finite("beta", self.beta))
        object.__setattr__(self, "max_weight", positive("max_weight", self.max_weight))


@dataclass(frozen=True)
class RankRelation:
    """LDRLD's rank-weighted pair terms over the top-k plus the rest term (§5)."""

    k: int = 7
    alpha: float = 10.5
    beta: float = 7.0
    rank_by: str = "student"
    eps: float = 1.5
    delta: float = 2.0
    lam: float = 0.05

    def __post_init__(self):
        _int_in("k", self.k, 2, MAX_TOPK)
        if self.rank_by not in RANK_BY:
            raise ValueError(f"rank_by must be one of {RANK_BY}, got {self.rank_by!r}")
        for name in ("alpha", "beta", "delta", "lam"):
            object.__setattr__(self, name, _finite(name, getattr(self, name)))
        object.__setattr__(self, "eps", positive("eps", self.eps))

    def pair_weight(self, r: int, r2: int) -> float:
        """w(r, r') of §5 for 1-based ranks."""
        return self.delta * math.exp(-self.lam * (r + r2)) / (abs(r - r2) + self.eps)


@dataclass(frozen=True)
class TopKDecoupled:
    """TopKD's Top-K Decoupled Loss (§6): cosine terms over Pos / Neg / Non groups of ``t'``."""

    k: int = 5
    weight: float = 1.0
    pos: float = 1.0
    neg: float = 1.0
    non: float = 1.0

    def __post_init__(self):
        _int_in("k", self.k, 1, MAX_TOPK)
        for name in ("weight", "pos", "neg", "non"):
            object.__setattr__(self, name, _finite(name, getattr(self, name)))


#: the divergences of the KD term (docs/divergences.md), in the order of their kernel codes
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_rkl")
DIVERGENCE_CODES = {name: i for i, name in enumerate(DIVERGENCES)}
#: the divergences that take a parameter (β of jsd, α of the skew divergences) and its valid range
_DIVERGENCE_PARAM = {"jsd": ("beta", 0.0, 1.0, True), "skew_kl": ("alpha", 0.0, 1.0, False),
                     "skew_rkl": ("alpha", 0.0, 1.0, False)}
#: the normalisations of a top-k teacher (docs/topk_teachers.md), in the order of their kernel codes
NORMALIZATIONS = ("renorm", "tail", "teacher")
NORMALIZATION_CODES = {name: i for i, name in enumerate(NORMALIZATIONS)}
#: ``topk_mode`` as the kernels see it: no top-k teacher, dense masking of the teacher logits, sparse input
TOPK_MODES = {"none": 0, "dense": 1, "sparse": 2}
#: largest K of a sparse teacher (docs/topk_teachers.md)
MAX_SPARSE_K = 1024


@dataclass(frozen=True)
class Divergence:
    """The divergence ``D(p‖q)`` of the KD term between teacher ``p`` and student ``q`` (docs/divergences.md).

    ``name``: one of ``DIVERGENCES``; ``param``: β of ``"jsd"`` (``0 ≤ β ≤ 1``), α of ``"skew_kl"`` /
    ``"skew_rkl"`` (``0 ≤ α < 1``), unused otherwise. As in TRL's ``generalized_jsd_loss``, ``jsd`` with
    β = 0 *is* ``forward_kl`` and with β = 1 *is* ``reverse_kl`` (normalised at construction), and
    ``skew_kl``/``skew_rkl`` with α = 0 are ``forward_kl``/``reverse_kl``.
    Accepted wherever ``divergence=`` is: a ``Divergence``, a name, or a ``(name, param)`` tuple.
    """

    name: str = "forward_kl"
    param: float = 0.0

    def __post_init__(self):
        if self.name not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES} (or (name, param)), got {self.name!r}")
        param = _finite("divergence parameter", self.param)
        if self.name in _DIVERGENCE_PARAM:
            what, lo, hi, hi_ok = _DIVERGENCE_PARAM[self.name]
            if not (lo <= param <= hi if hi_ok else lo <= param < hi):
                raise ValueError(f"{self.name}: {what} must be in [{lo}, {hi}{']' if hi_ok else ')'}, got {param}")
        else:
            param = 0.0
        name = self.name
        if (name == "jsd" and param == 0.0) or (name == "skew_kl" and param == 0.0):
            name, param = "forward_kl", 0.0
        elif (name == "jsd" and param == 1.0) or (name == "skew_rkl" and param == 0.0):
            name, param = "reverse_kl", 0.0
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "param", param)

    @property
    def code(self) -> int:
        return DIVERGENCE_CODES[self.name]

    @classmethod
    def coerce(cls, value) -> "Divergence":
        if value is None:
            return cls()
        if isinstance(value, Divergence):
            return value
        if isinstance(value, str):
            if value in _DIVERGENCE_PARAM:
                what = _DIVERGENCE_PARAM[value][0]
                raise ValueError(f"divergence {value!r} needs its {what}: pass ({value!r}, {what}) or "
                                 f"kdkernels.{'JSD' if value == 'jsd' else 'Divergence'}(...)")
            return cls(value)
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
            return cls(value[0], value[1])
        raise TypeError("divergence must be a name, a (name, param) tuple or a kdkernels.Divergence, got "
                        f"{type(value).__name__}")


def JSD(beta: float = 0.5) -> Divergence:
    """TRL's generalised Jensen–Shannon divergence ``β·KL(p‖m) + (1−β)·KL(q‖m)``, ``m = β·p + (1−β)·q``."""
    return Divergence("jsd", beta)


def SkewKL(alpha: float = 0.1) -> Divergence:
    """DistiLLM's skew KL ``KL(p ‖ α·p + (1−α)·q)``."""
    return Divergence("skew_kl", alpha)


def SkewRKL(alpha: float = 0.1) -> Divergence:
    """DistiLLM's skew reverse KL ``KL(q ‖ α·q + (1−α)·p)``."""
    return Divergence("skew_rkl", alpha)


@dataclass(frozen=True)
class TopK:
    """A dense teacher masked to its ``k`` largest logits per row (ties to the lower index), with one of
    the three normalisations of docs/topk_teachers.md: ``"renorm"`` (teacher and student renormalised
    over the k classes), ``"tail"`` (the k classes plus one tail outcome holding the rest of the mass),
    ``"teacher"`` (teacher renormalised, student keeps its full-vocabulary log-probabilities; forward KL
    only). Needs ``1 ≤ k ≤ min(64, C − 1)``."""

    k: int
    normalize: str = "renorm"

    def __post_init__(self):
        _int_in("TopK.k", self.k, 1, MAX_TOPK)
        _normalization(self.normalize)


def _normalization(value) -> str:
    if value not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {value!r}")
    return value


class SparseTeacher(NamedTuple):
    """A stored top-K teacher given instead of teacher logits (docs/topk_teachers.md).

    ``ids``: integer ``[..., K]`` class ids (int64, int32, int16 or uint16; slots with ``id < 0`` are
    padding; ids of a row must be distinct); ``logprobs``: float ``[..., K]`` the teacher's
    log-probabilities at temperature 1 over the full vocabulary at those ids (``-inf`` allowed);
    leading dims as the student's; ``K ≤ 1024``. ``normalize``: ``"renorm"`` (default), ``"tail"``
    (needs temperature 1) or ``"teacher"`` (forward KL only). The fused kernels read the student row
    and the K teacher values, never a dense ``[N, V]`` teacher.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    normalize: str = "renorm"


def coerce_softcap(value) -> tuple:
    """``softcap=`` → ``(student cap, teacher cap)`` floats, 0.0 meaning none: ``None``, a positive
    float (both), or a pair whose entries are a positive float or ``None``."""
    if value is None:
        return (0.0, 0.0)
    if isinstance(value, tuple):
        if len(value) != 2:
            raise ValueError("softcap must be None, a positive float, or a (student, teacher) pair")
        return tuple(0.0 if v is None or v == 0.0 else positive("softcap", v) for v in value)  # (0.0: none)
    cap = positive("softcap", value)
    return (cap, cap)


Temperature = Union[float, torch.Tensor]


@dataclass(frozen=True, eq=False)
class LogitDistill:
    """Composable spec of a fused logit-distillation loss (docs/engine.md).

    ``temperature``: a positive float, a 0-dim tensor or a per-row tensor (leading dims of the
    logits); a tensor with ``requires_grad`` is learnable (CTKD) and receives its exact gradient —
    supported for the temperature-dependent terms ``kd_weight`` (and the T-free ``ce``/``tdl`` terms).

    ``value``: ``"kl"`` (default) reports the KD term as ``kd_weight·T²·KL(p‖q)``; ``"cross_entropy"``
    as ``kd_weight·T²·(−Σ_c p_c·log q_c)`` = the KL plus the teacher's entropy ``T²·H(p)`` per row
    (torchtune's ``ForwardKLLoss`` number, to compare logged curves); the gradient is the same. Only
    for specs whose temperature terms are the plain KD term.
    """

    temperature: Temperature = 4.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    standardize: bool = False
    teacher_topk_scale: Optional[TopKScale] = None
    decoupled: Optional[Decoupled] = None
    dtkd_weight: float = 0.0
    relation: Optional[RankRelation] = None
    tdl: Optional[TopKDecoupled] = None
    contrastive_weight: float = 0.0
    contrastive_tau: float = 0.1
    reduction: str = "batchmean"
    ignore_index: int = -100
    check: Optional[bool] = None
    inplace: bool = False
    loss_weight: float = 1.0
    value: str = "kl"
    divergence: Union[str, tuple, Divergence] = "forward_kl"  # a Divergence after construction
    teacher_topk: Optional[TopK] = None
    softcap: Union[None, float, tuple] = None

    def __post_init__(self):
        T = self.temperature
        if isinstance(T, torch.Tensor):
            if not T.is_floating_point():
                raise TypeError(f"temperature tensor must be floating point, got {T.dtype}")
        else:
            object.__setattr__(self, "temperature", positive("temperature", T))
        for name in ("kd_weight", "ce_weight", "dtkd_weight", "contrastive_weight", "loss_weight"):
            object.__setattr__(self, name, _finite(name, getattr(self, name)))
        object.__setattr__(self, "contrastive_tau", positive("contrastive_tau", self.contrastive_tau))
        object.__setattr__(self, "teacher_topk_scale", TopKScale.coerce(self.teacher_topk_scale))
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError("ignore_index must be an int")
        object.__setattr__(self, "divergence", Divergence.coerce(self.divergence))
        if self.teacher_topk is not None and not isinstance(self.teacher_topk, TopK):
            raise TypeError("teacher_topk must be None or a kdkernels.TopK(k, normalize)")
        object.__setattr__(self, "softcap", coerce_softcap(self.softcap))
        self._check_value()
        self._check_llm_terms()
        if self.learnable_temperature and self.temperature_terms - {"kd"}:
            raise ValueError(
                "a learnable temperature (tensor with requires_grad) is supported with the KD term "
                f"only; this spec also has {sorted(self.temperature_terms - {'kd'})}")

    def _check_value(self) -> None:
        if self.value not in VALUES:
            raise ValueError(f"value must be one of {VALUES}, got {self.value!r}")
        if self.value == "kl":
            return
        others = sorted(self.temperature_terms - {"kd"})
        if others:
            raise ValueError(f"value='cross_entropy' reports the plain KD term as a soft cross-entropy; this "
                             f"spec also has {others}, which have no such form (use value='kl')")
        if self.learnable_temperature:  # T²·H(p_T) depends on T: its gradient would differ from the KL's
            raise ValueError("value='cross_entropy' is a logging convention and is not supported with a "
                             "learnable temperature (use value='kl')")

    def _check_llm_terms(self, support: Optional[str] = None) -> None:
        """§10–§11 combinations: a non-default divergence or a top-k teacher applies to the KD term only.
        ``support``: the normalisation of a sparse teacher when one is given (checked by the API)."""
        div = self.divergence.name
        topk = support is not None or self.teacher_topk is not None
        published = sorted(self.temperature_terms - {"kd"} | ({"tdl"} if self.tdl is not None else set()))
        if div != "forward_kl" and published:
            raise ValueError(f"divergence={div!r} applies to the KD term; {published} keep their published KL "
                             "(use divergence='forward_kl' with them)")
        if topk:
            others = published + [name for name, on in (("standardize", self.standardize),
                                                         ("teacher_topk_scale", self.teacher_topk_scale))
                                  if on]
            what = "a sparse teacher" if support is not None else "teacher_topk"
            if others:
                raise ValueError(f"{what} combines with ce_weight and divergence only, not with {others}")
            if self.value != "kl":
                raise ValueError(f"value='cross_entropy' is not defined with {what} (use value='kl')")
            norm = support if support is not None else self.teacher_topk.normalize
            if norm == "teacher" and div != "forward_kl":
                raise ValueError("normalize='teacher' keeps the student's full-vocabulary log-probabilities, so "
                                 f"only divergence='forward_kl' is defined; got {div!r}")
        if self.learnable_temperature and (div != "forward_kl" or topk):
            raise ValueError("a learnable temperature is supported with the plain forward-KL KD term only "
                             f"(divergence={div!r}{', a top-k teacher' if topk else ''})")
        if self.value != "kl" and div != "forward_kl":
            raise ValueError("value='cross_entropy' is the forward KL's soft cross-entropy; use value='kl' with "
                             f"divergence={div!r}")

    def check_sparse(self, normalize: str, K: int) -> None:
        """The spec's combinations with a sparse teacher of ``K`` slots (raised at the API boundary)."""
        _normalization(normalize)
        _int_in("SparseTeacher K (the ids' last dim)", K, 1, MAX_SPARSE_K)
        if self.teacher_topk is not None:
            raise ValueError("teacher_topk selects classes of dense teacher logits; a SparseTeacher already is "
                             "a top-K teacher (leave teacher_topk=None)")
        self._check_llm_terms(support=normalize)
        if normalize == "tail":
            T = self.temperature
            if isinstance(T, torch.Tensor) or T != 1.0:
                raise ValueError("a sparse teacher's tail mass is only defined at the temperature its "
                                 "log-probabilities were stored at: normalize='tail' needs temperature=1.0")

    # ---- derived facts (what the backends specialise on) -------------------------------------
    @property
    def learnable_temperature(self) -> bool:
        return isinstance(self.temperature, torch.Tensor) and self.temperature.requires_grad

    @property
    def temperature_terms(self) -> set:
        terms = set()
        if self.kd_weight != 0:
            terms.add("kd")
        if self.decoupled is not None:
            terms.add("dkd")
        if self.dtkd_weight != 0:
            terms.add("dtkd")
        if self.relation is not None:
            terms.add("ldrld")
        return terms

    @property
    def needs_labels(self) -> bool:
        return self.ce_weight != 0 or self.decoupled is not None

    def check_classes(self, C: int) -> None:
        """Per-method ranges of k against the number of classes (raised at the API boundary)."""
        if C < 1:
            raise ValueError("logits need at least one class")
        if self.standardize and C < 2:
            raise ValueError("standardize=True needs at least 2 classes (std divides by C - 1)")
        if self.decoupled is not None and C < 2:
            raise ValueError("dkd/aekt need at least 2 classes (target vs. non-target)")
        if self.teacher_topk_scale is not None and not self.teacher_topk_scale.k <= C - 1:
            raise ValueError(f"TopKScale.k must be in [1, C - 1] = [1, {C - 1}], got {self.teacher_topk_scale.k}"
                             + _fix_k(C - 1, "kdk.TopKScale(k={k})"))
        if self.relation is not None and not 2 <= self.relation.k <= C - 1:
            raise ValueError(f"ldrld k must be in [2, C - 1] = [2, {C - 1}], got {self.relation.k}"
                             + _fix_k(C - 1, "ldrld_loss(s, t, {k}) or kdk.nn.LDRLDLoss({k})", lowest=2))
        if self.teacher_topk is not None and not self.teacher_topk.k <= C - 1:
            raise ValueError(f"TopK.k must be in [1, C - 1] = [1, {C - 1}], got {self.teacher_topk.k}"
                             + _fix_k(min(C - 1, MAX_TOPK), "kdk.TopK(k={k})"))
        if self.tdl is not None and not 2 * self.tdl.k < C:
            raise ValueError(f"TDL needs 2k < C (Pos, Neg and Non groups), got k={self.tdl.k}, C={C}"
                             + _fix_k((C - 1) // 2, "topkd_loss(s, t, y, {k}) or kdk.nn.TopKDLoss({k})")
                             + "; or tdl_weight=0 to drop TDL")

    # ---- flat parameter layout shared with the C++ backends ------------------------------------
    def pack(self, sparse: Optional[tuple] = None) -> tuple[list[float], list[int]]:
        """Flatten into ``(floats, ints)`` in the order of ``FLOAT_FIELDS`` / ``INT_FIELDS``. ``sparse``:
        ``(normalize, K)`` of a sparse teacher, when the teacher is one."""
        tsm = self.teacher_topk_scale or TopKScale()
        dec = self.decoupled or Decoupled(alpha=0.0, beta=0.0)
        rel = self.relation or RankRelation(alpha=0.0, beta=0.0)
        tdl = self.tdl or TopKDecoupled(weight=0.0)
        T = self.temperature if isinstance(self.temperature, float) else 1.0
        values = dict(
            temperature=T, kd_weight=self.kd_weight, ce_weight=self.ce_weight,
            tckd_weight=dec.alpha, nckd_weight=dec.beta, max_weight=dec.max_weight,
            dtkd_weight=self.dtkd_weight, local_weight=rel.alpha, rest_weight=rel.beta,
            rel_eps=rel.eps, rel_delta=rel.delta, rel_lambda=rel.lam,
            tdl_weight=tdl.weight, tdl_pos=tdl.pos, tdl_neg=tdl.neg, tdl_non=tdl.non,
            tsm_scale=tsm.scale, tsm_shift=tsm.shift, tsm_gt_scale=tsm.gt_scale,
            ignore_index=self.ignore_index, standardize=int(self.standardize),
            use_tsm=int(self.teacher_topk_scale is not None), tsm_k=tsm.k,
            use_decoupled=int(self.decoupled is not None), adaptive_tckd=int(dec.adaptive),
            use_relation=int(self.relation is not None), rel_k=rel.k,
            rank_by_teacher=int(rel.rank_by == "teacher"),
            use_tdl=int(self.tdl is not None), tdl_k=tdl.k,
            loss_weight=self.loss_weight, reduction=REDUCTION_CODES[self.reduction],
            value=VALUE_CODES[self.value],
            divergence=self.divergence.code, div_param=self.divergence.param,
            softcap_s=self.softcap[0], softcap_t=self.softcap[1],
            topk_mode=TOPK_MODES["none"], topk_k=1, topk_norm=0,
        )
        if self.teacher_topk is not None:
            values.update(topk_mode=TOPK_MODES["dense"], topk_k=self.teacher_topk.k,
                          topk_norm=NORMALIZATION_CODES[self.teacher_topk.normalize])
        if sparse is not None:
            values.update(topk_mode=TOPK_MODES["sparse"], topk_k=sparse[1], topk_norm=NORMALIZATION_CODES[sparse[0]])
        return [float(values[f]) for f in FLOAT_FIELDS], [int(values[f]) for f in INT_FIELDS]

    def packed(self, sparse: Optional[tuple] = None) -> "PackedSpec":
        """The flat form the autograd Function and the launchers see (primitives only, so
        torch.compile can carry it through the graph); ``sparse`` as in :meth:`pack`."""
        floats, ints = self.pack(sparse)
        return PackedSpec(tuple(floats), tuple(ints), self.learnable_temperature, self.reduction, self.inplace)

    def replace(self, **changes) -> "LogitDistill":
        return dataclasses.replace(self, **changes)


#: flat float parameters, in order (mirrored by csrc/kd_params.h)
FLOAT_FIELDS = (
    "temperature", "kd_weight", "ce_weight", "tckd_weight", "nckd_weight", "max_weight",
    "dtkd_weight", "local_weight", "rest_weight", "rel_eps", "rel_delta", "rel_lambda",
    "tdl_weight", "tdl_pos", "tdl_neg", "tdl_non", "tsm_scale", "tsm_shift", "tsm_gt_scale",
    "loss_weight", "div_param", "softcap_s", "softcap_t",
)
#: flat int parameters, in order (mirrored by csrc/kd_params.h)
INT_FIELDS = (
    "ignore_index", "standardize", "use_tsm", "tsm_k", "use_decoupled", "adaptive_tckd",
    "use_relation", "rel_k", "rank_by_teacher", "use_tdl", "tdl_k", "reduction",
    "divergence", "topk_mode", "topk_k", "topk_norm",
)
#: ``reduction`` as the kernels see it (the ``reduction`` int field)
REDUCTION_CODES = {"none": 0, "sum": 1, "batchmean": 2}


class PackedSpec(NamedTuple):
    """A spec flattened for the kernels: ``floats``/``ints`` in ``FLOAT_FIELDS``/``INT_FIELDS`` order."""

    floats: tuple
    ints: tuple
    learnable_temperature: bool
    reduction: str
    inplace: bool

    def pack(self) -> tuple[list[float], list[int]]:
        return list(self.floats), list(self.ints)

    @property
    def ignore_index(self) -> int:
        return self.ints[INT_FIELDS.index("ignore_index")]
