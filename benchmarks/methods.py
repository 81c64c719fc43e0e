"""The loss each method name stands for, with the presets' default hyper-parameters.

``loss_fn(method, backend)`` returns ``f(s, t, y, reduction="batchmean") -> loss``; every logit method is
row-independent (so the float64 reference can be evaluated in row chunks with ``reduction="sum"``).
The LLM family (``reverse_kl``, ``jsd``, ``tvd``, ``topk_tail``, ``sparse_renorm``, ``sparse_tail``) is the
static preset of the same name (:mod:`benchmarks.presets`, temperature 1) with the labels as the ignore
mask; a sparse method's ``t`` is a ``kdk.SparseTeacher`` (its normalisation rides on it).
"""
from __future__ import annotations

import kdkernels as kdk

from .presets import PRESETS
from .shapes import LLM_METHODS, SPARSE_METHODS

TEMPERATURE = 4.0
INFONCE_TAU = 0.1

_LOGIT = {
    "kd": lambda s, t, y, b, r: kdk.kd_loss(s, t, TEMPERATURE, reduction=r, backend=b),
    "dkd": lambda s, t, y, b, r: kdk.dkd_loss(s, t, y, temperature=TEMPERATURE, reduction=r, backend=b),
    "dtkd": lambda s, t, y, b, r: kdk.dtkd_loss(s, t, TEMPERATURE, reduction=r, backend=b),
    "ldrld": lambda s, t, y, b, r: kdk.ldrld_loss(s, t, temperature=TEMPERATURE, reduction=r, backend=b),
    "topkd": lambda s, t, y, b, r: kdk.topkd_loss(s, t, y, temperature=TEMPERATURE, reduction=r, backend=b),
    "aekt": lambda s, t, y, b, r: kdk.aekt_loss(s, t, y, temperature=TEMPERATURE, reduction=r, backend=b),
}


_llm_specs: dict = {}


def llm_spec(method: str, reduction: str) -> kdk.LogitDistill:
    """The preset's spec with ``reduction`` (one object per pair: its packed form is cached on it)."""
    key = (method, reduction)
    if key not in _llm_specs:
        _llm_specs[key] = PRESETS[method].build().replace(reduction=reduction)
    return _llm_specs[key]


def _llm(method):
    return lambda s, t, y, b, r: kdk.logit_distill(s, t, y, llm_spec(method, r), backend=b)


_LOGIT.update({m: _llm(m) for m in LLM_METHODS + SPARSE_METHODS})


def loss_fn(method: str, backend: str):
    """``f(s, t, y, reduction="batchmean")`` evaluating ``method`` with kdkernels backend ``backend``."""
    if method == "infonce":
        def f(a, b, y=None, reduction="batchmean"):
            return kdk.info_nce(a, b, INFONCE_TAU, backend=backend)
        return f
    if method not in _LOGIT:
        raise ValueError(f"unknown method {method!r}")
    impl = _LOGIT[method]

    def f(s, t, y, reduction="batchmean"):
        return impl(s, t, y, backend, reduction)
    return f
