"""The divergence family of the KD term, per outcome, for every Triton kernel (docs/divergences.md).

For teacher ``p`` and student ``q`` over a support (the vocabulary, a top-k support or a sparse teacher's
K ids, plus a tail outcome), given as log-probabilities ``lp``, ``lq``::

    D(p‖q) = Σ_c d_c            (d_c: ``divergence_terms``' first result)
    ∂(T²·D)/∂s_c = T·(qg_c − q_c·Σ_j qg_j),   qg_c = q_c·∂D/∂q_c   (its second result)

One formula serves every divergence: the kernels accumulate ``Σ d`` and ``Σ qg`` in the row-statistics
pass and write ``T·(qg_c − q_c·Σqg)`` in the gradient pass (forward KL: ``qg = −p``, ``Σ qg = −1``, so
the gradient is the familiar ``T·(q − p)`` and needs no extra sum). Mixtures are taken in log space,
``log m = logaddexp(log β + log p, log(1 − β) + log q)``, never as a ``log`` of a sum of probabilities;
``0·log 0 = 0``. Codes follow ``kdkernels.spec.DIVERGENCES``.
"""
import triton
import triton.language as tl

FORWARD_KL = tl.constexpr(0)
REVERSE_KL = tl.constexpr(1)
JSD = tl.constexpr(2)
TVD = tl.constexpr(3)
SKEW_KL = tl.constexpr(4)
SKEW_RKL = tl.constexpr(5)


@triton.jit
def logaddexp(a, b):
    """log(e^a + e^b), −inf where both are −inf (no NaN)."""
    m = tl.maximum(a, b)
    safe = tl.where(m == -float("inf"), 0.0, m)
    return tl.where(m == -float("inf"), -float("inf"), safe + tl.log(tl.exp(a - safe) + tl.exp(b - safe)))


@triton.jit
def _plogdiff(w, la, lb):
    """w·(la − lb) where w > 0, else 0 (0·log 0 = 0)."""
    return tl.where(w > 0, w * (la - lb), 0.0)


@triton.jit
def divergence_terms(lp, lq, param, DIVERGENCE: tl.constexpr):
    """Per outcome: (d_c, qg_c) of the divergence ``DIVERGENCE`` (β of jsd or α of the skew divergences in
    ``param``, a scalar of the accumulation dtype, strictly inside (0, 1) for those codes)."""
    p = tl.exp(lp)
    q = tl.exp(lq)
    if DIVERGENCE == FORWARD_KL:
        d = _plogdiff(p, lp, lq)
        qg = -p
    elif DIVERGENCE == REVERSE_KL:
        d = _plogdiff(q, lq, lp)
        qg = tl.where(q > 0, q * (lq - lp + 1.0), 0.0)
    elif DIVERGENCE == JSD:
        lm = logaddexp(tl.log(param) + lp, tl.log(1.0 - param) + lq)
        qlog = _plogdiff(q, lq, lm)
        d = param * _plogdiff(p, lp, lm) + (1.0 - param) * qlog
        qg = (1.0 - param) * qlog
    elif DIVERGENCE == TVD:
        d = 0.5 * tl.abs(p - q)
        qg = tl.where(q > p, 0.5 * q, tl.where(q < p, -0.5 * q, 0.0))
    elif DIVERGENCE == SKEW_KL:
        lm = logaddexp(tl.log(param) + lp, tl.log(1.0 - param) + lq)
        d = _plogdiff(p, lp, lm)
        qg = tl.where(p > 0, -(1.0 - param) * tl.exp(lq + lp - lm), 0.0)
    else:  # SKEW_RKL
        lm = logaddexp(tl.log(param) + lq, tl.log(1.0 - param) + lp)
        qlog = _plogdiff(q, lq, lm)
        d = qlog
        qg = tl.where(q > 0, qlog + q - param * tl.exp(2.0 * lq - lm), 0.0)
    return d, qg
