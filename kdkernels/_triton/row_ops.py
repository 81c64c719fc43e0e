"""Small ``@triton.jit`` building blocks of the row engine (all operate on one row's block of columns).

* online log-sum-exp: a state ``(m, d)`` in the logits' units (``LSE(x/T) = m/T + log d``), folded
  by :func:`lse_update`, merged by :func:`lse_merge`, read back by :func:`log_prob`; safe for
  all-``-inf`` blocks;
* streaming moments (Chan's merge of per-block mean/M2, plus min/max) for standardisation;
* a running top-k list: ``K_PAD`` slots (key, index, two payloads) merged block by block by repeated
  extraction of the best candidate while it beats the list's worst; order is (key desc, index asc), so
  ties go to the lower index. Slots beyond ``K`` are *locked* (key ``+inf``, index ``-1``) and never
  replaced; ``ranks`` gives each slot its rank in that order (locked slots first);
* scalar extraction from a small register vector, and the log-space Bernoulli KL of LDRLD's pairs;
* Gemma's logit softcap ``c·tanh(x/c)``;
* ``exp_scaled``: the exponentials of the hot loops in base 2, with log2(e) folded into the scale a
  caller already multiplies by (tl.exp2: one FMUL and one MUFU.EX2 per element on the GPU, where tl.exp
  adds a multiply and a range fix-up for denormal results).
"""
import triton
import triton.language as tl

#: index of an empty top-k slot / of a column outside [0, C): larger than any real column
BIG_IDX = tl.constexpr(2147483647)
#: log2(e) and ln(2): exp(x) = exp2(x·LOG2E), log(x) = log2(x)·LN2
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def exp_scaled(y, scale):
    """exp(y·scale): in float32 2^(y·(scale·log2 e)) — the scalar product hoists, leaving one multiply and
    one MUFU.EX2 per element (tl.exp adds a multiply and a range fix-up); float64 exactly, as tl.exp (a
    Python constant is a float32 in a kernel, so log2 e would cost float64 its last 29 bits)."""
    if y.dtype == tl.float64:
        return tl.exp(y * scale)
    else:
        return tl.exp2(y * (scale * LOG2E))


@triton.jit
def lse_init(zero):
    """An empty log-sum-exp state ``(m, d)``: ``m`` = −inf, ``d`` = 0, of ``zero``'s dtype."""
    return zero - float("inf"), zero


@triton.jit
def lse_update(state, x, inv_t):
    """Fold block ``x`` (logits, −inf = masked) into the state ``(m, d)`` of LSE(x·inv_t).

    The state is kept in the logits' own units: ``m`` = max x, ``d`` = Σ exp((x − m)·inv_t), so
    LSE = m·inv_t + log d is never formed (it would overflow when x/T does, and round away log d
    when |x|/T ≳ 1e7). Log-probabilities come from :func:`log_prob`. ``inv_t`` must be positive.
    A NaN or +inf entry makes ``d`` NaN (the caller turns that into a NaN row)."""
    m, d = state
    m_new = tl.maximum(m, tl.max(x, 0))
    base = tl.where(m_new == -float("inf"), 0.0, m_new)
    d = d * exp_scaled(m - base, inv_t) + tl.sum(exp_scaled(x - base, inv_t), 0)
    return m_new, d


@triton.jit
def lse_merge(a, b, inv_t):
    """The state of the union of two disjoint sets from their states ``a``, ``b`` (same ``inv_t``)."""
    m1, d1 = a
    m2, d2 = b
    m = tl.maximum(m1, m2)
    base = tl.where(m == -float("inf"), 0.0, m)
    return m, d1 * tl.exp((m1 - base) * inv_t) + d2 * tl.exp((m2 - base) * inv_t)


@triton.jit
def lse_norm(state):
    """A finished state as ``(m, log d)``, the form :func:`log_prob` reads."""
    m, d = state
    return m, tl.log(d)


@triton.jit
def log_prob(x, norm, inv_t):
    """log softmax of ``x·inv_t`` over the set whose finished state is ``norm = (m, log d)``:
    (x − m)·inv_t − log d, with masked entries (−inf) at −inf even when the set is empty."""
    m, log_d = norm
    return tl.where(x == -float("inf"), -float("inf"), (x - m) * inv_t - log_d)


@triton.jit
def moments_update(n, mean, m2, lo, hi, x, live):
    """Merge the live entries of block ``x`` into the running (count, mean, M2, min, max); the
    extremes let the caller give a constant row σ = 0 exactly (M2 carries rounding noise)."""
    nb = tl.sum(live.to(x.dtype), 0)
    mean_b = tl.sum(tl.where(live, x, 0.0), 0) / tl.maximum(nb, 1.0)
    dev = tl.where(live, x - mean_b, 0.0)
    m2_b = tl.sum(dev * dev, 0)
    n_new = n + nb
    delta = mean_b - mean
    mean = mean + delta * nb / tl.maximum(n_new, 1.0)
    m2 = m2 + m2_b + delta * delta * n * nb / tl.maximum(n_new, 1.0)
    lo = tl.minimum(lo, tl.min(tl.where(live, x, float("inf")), 0))
    hi = tl.maximum(hi, tl.max(tl.where(live, x, -float("inf")), 0))
    return n_new, mean, m2, lo, hi


@triton.jit
def topk_init(K: tl.constexpr, K_PAD: tl.constexpr, ACC: tl.constexpr):
    """An empty list: K free slots (key -inf, index BIG_IDX) and K_PAD - K locked ones."""
    slot = tl.arange(0, K_PAD)
    locked = slot >= K
    key = tl.where(locked, float("inf"), -float("inf")).to(ACC)
    idx = tl.where(locked, -1, BIG_IDX)
    zero = tl.zeros([K_PAD], ACC)
    return key, idx, zero, zero


@triton.jit
def topk_merge(top_key, top_idx, top_a, top_b, key, idx, a, b, K_PAD: tl.constexpr):
    """Merge candidates (``key``, ``idx``, payloads ``a``, ``b``; idx BIG_IDX = not a candidate)."""
    slot = tl.arange(0, K_PAD)
    w_key = tl.min(top_key, 0)
    w_idx = tl.max(tl.where(top_key == w_key, top_idx, -1), 0)
    c_key = tl.max(key, 0)
    c_idx = tl.min(tl.where(key == c_key, idx, BIG_IDX), 0)
    better = (c_key > w_key) | ((c_key == w_key) & (c_idx < w_idx))
    while better:
        hit = idx == c_idx
        c_a = tl.sum(tl.where(hit, a, 0.0), 0)
        c_b = tl.sum(tl.where(hit, b, 0.0), 0)
        target = tl.min(tl.where((top_key == w_key) & (top_idx == w_idx), slot, K_PAD), 0)
        put = slot == target
        top_key = tl.where(put, c_key, top_key)
        top_idx = tl.where(put, c_idx, top_idx)
        top_a = tl.where(put, c_a, top_a)
        top_b = tl.where(put, c_b, top_b)
        key = tl.where(hit, -float("inf"), key)
        idx = tl.where(hit, BIG_IDX, idx)
        w_key = tl.min(top_key, 0)
        w_idx = tl.max(tl.where(top_key == w_key, top_idx, -1), 0)
        c_key = tl.max(key, 0)
        c_idx = tl.min(tl.where(key == c_key, idx, BIG_IDX), 0)
        better = (c_key > w_key) | ((c_key == w_key) & (c_idx < w_idx))
    return top_key, top_idx, top_a, top_b


@triton.jit
def ranks(key, idx):
    """Rank of every slot in (key desc, index asc) order; 0 is the best."""
    beats = (key[None, :] > key[:, None]) | ((key[None, :] == key[:, None]) & (idx[None, :] < idx[:, None]))
    return tl.sum(beats.to(tl.int32), 1)


@triton.jit
def pick(vec, j):
    """Element ``j`` of a small register vector, as a scalar."""
    slot = tl.arange(0, vec.shape[0])
    return tl.sum(tl.where(slot == j, vec, 0), 0)


@triton.jit
def log_sigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def bernoulli_kl(d_t, d_s):
    """KL(Bern(σ(d_t)) ‖ Bern(σ(d_s))) in log space."""
    lp1, lp0 = log_sigmoid(d_t), log_sigmoid(-d_t)
    p1, p0 = tl.exp(lp1), tl.exp(lp0)
    a = tl.where(p1 > 0, p1 * (lp1 - log_sigmoid(d_s)), 0.0)
    b = tl.where(p0 > 0, p0 * (lp0 - log_sigmoid(-d_s)), 0.0)
    return a + b


@triton.jit
def softcap(x, cap):
    """``cap·tanh(x/cap)`` (``cap`` > 0, a scalar of x's dtype); ±inf stay ±inf (a masked class stays
    masked, +inf keeps making its row NaN) and NaN stays NaN. tanh from one exp of −2|x|/cap (the
    interpreter has no libdevice): exact to a few ulps of ``cap`` in absolute terms, which is what the
    softmaxes see; the derivative is ``1 − (softcap(x)/cap)²``, as autograd's tanh backward."""
    e = tl.exp(-2.0 * tl.abs(x) / cap)
    th = cap * ((1.0 - e) / (1.0 + e))
    return tl.where(tl.abs(x) == float("inf"), x, tl.where(x < 0, -th, th))
