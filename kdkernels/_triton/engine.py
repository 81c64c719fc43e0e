"""The fused logit-distillation engine in Triton: one program per row, any ``LogitDistill`` preset.

Math (losses.md; ``s̃``/``t̃`` are the logits after the optional standardisation ``Z`` and TopKScale,
``z = x/T``, ``q = softmax(z_s)``, ``p = softmax(z_t)``, all in float32 — float64 for float64 inputs —
whatever dtype each operand is stored in)::

    ℓ = kd_w·T²·KL(p‖q) + ce_w·CE(s_raw, y) + T²·(α_n·TCKD + β·NCKD) + dtkd_w·T_t·T_s·KL_dyn
        + local_w·L_local + rest_w·L_rest + tdl_w·TDL

Gradient w.r.t. ``s̃`` (then through ``Z``; CE's goes to the raw logits directly)::

    KD    kd_w·T·(q − p)
    DKD   c = y: T·α_n·(q_y − p_y);  c ≠ y: T·[α_n·(p_y − q_y)·q̂_c + β·(q̂_c − p̂_c)]
    DTKD  dtkd_w·T_t·(q_dyn − p_dyn), plus ∂(T_t·T_s·KL_dyn)/∂v on the student's argmax column
    LDRLD c ∈ I (rank r): local_w/(P+1)·T·[Σ_pairs ±w·(σ(Δs/T) − σ(Δt/T)) + (q^I_r − p^I_r)];
          c ∉ I: rest_w·T·(q^R_c − p^R_c)
    TDL   c ∈ G: −tdl_w·w_G·(t̃_c/den_G − cos_G·s̃_c/‖s̃_G‖²)
    Z     ∂/∂z = (g − ḡ)/σ' − (Σ g·z̃)·z̃/((n − 1)·σ)          (0 for σ = 0)
    T     ∂ℓ/∂T = kd_w·[2T·KL − Σ(q − p)s̃ − Σ t̃·p·(log p − log q − KL)]    (learnable temperature)

Passes over a row (each only when its ``tl.constexpr`` flag needs it; a row of ≤ ``BLOCK_C`` columns is
read from memory once and kept in registers, longer rows stream in ``BLOCK_C`` blocks):

    P1 moments of s and t (standardize)      P2 teacher top-k + mean (TopKScale)
    P3 online LSE states at T (the non-target ones for DKD/AEKT, the full state then following by
       merging in the target; raw logits for CE), the student's argmax (DTKD), top-k lists (LDRLD
       ranking, TDL Pos and the 2k smallest for Neg)
    P4 LSE states restricted to the complement of the top-k (LDRLD), TDL's Non sums, states at T_s/T_t (DTKD)
    P5 loss and the row sums the gradient needs (standardize, DTKD's argmax column, learnable T)
    P6 gradient write (loss too when P5 did not run)

Numerics. An LSE state is kept in the logits' own units (``m`` = max x, ``d`` = Σ exp((x − m)/T)) and
log-probabilities are ``(x − m)/T − log d``: exact when x/T overflows and when |x|/T ≳ 1e7 (where
``m/T + log d`` would round ``log d`` away, doubling tied maxima). NaN or +inf anywhere in a row makes its
``d`` NaN: that row's loss, gradient and dtemp are NaN. A row whose student or teacher has no finite
logit gets 0. Ignored rows read nothing and get exactly 0. A row KL that rounding made negative is
clamped at 0 (the gradient is not). The float parameters arrive as a small tensor of the accumulation
dtype (:func:`param_tensor`), so float64 inputs see exact float64 scalars.

One launch per call (launcher contract 2): every program writes its row's gradient (× loss_weight,
× 1/count for batchmean, × grad_factor[n]) and loss; for sum/batchmean it stores the row loss into an
``[N]`` buffer and takes a ticket from an int32 counter; the last program sums the buffer in index order
(deterministic) into the 0-dim loss and resets the counter. batchmean's count of valid labels is taken
by every program that needs it (labels are 8 bytes a row and stay in L2).

Bytes per row: a row of ≤ ``BLOCK_C`` columns reads ``s`` and ``t`` once and writes the gradient once
(the 3-transfer floor) plus 4–8 bytes of loss; no ``[N, C]`` temporaries. A longer row is read once per
pass (two passes for KD/DKD): the later pass runs backwards with L2 eviction hints so that part of
it hits L2, but LLM rows (≥ 256 KB each, many rows in flight) mostly come from HBM twice. With labels and
batchmean each program also reads the N labels (from L2).
"""
from __future__ import annotations

import contextlib
import functools
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..dispatch import interpreting
from ..spec import FLOAT_FIELDS, INT_FIELDS, REDUCTION_CODES
from .row_ops import (BIG_IDX, bernoulli_kl, log_prob, lse_init, lse_merge, lse_update, moments_update, pick, ranks,
                      topk_init, topk_merge)

#: largest row kept in registers (a single pass over memory); longer rows stream in blocks of this size
MAX_BLOCK_C = 4096
#: added to the standard deviation (logit-standardization-KD); built in the accumulation dtype (exact)
STD_EPS = tl.constexpr(1e-7)
#: lower bound of ‖u‖·‖v‖ in TDL's cosine
COS_EPS = tl.constexpr(1e-8)
#: rows per step of the in-kernel batch loops (counting the labels, summing the row losses)
BATCH_BLOCK = 1024
REDUCTION_NONE = tl.constexpr(REDUCTION_CODES["none"])
REDUCTION_BATCHMEAN = tl.constexpr(REDUCTION_CODES["batchmean"])

# where each packed float parameter sits in the kernel's parameter tensor (FLOAT_FIELDS order)
_FLOAT_INDEX = {name: i for i, name in enumerate(FLOAT_FIELDS)}
P_TEMPERATURE = tl.constexpr(_FLOAT_INDEX["temperature"])
P_KD_WEIGHT = tl.constexpr(_FLOAT_INDEX["kd_weight"])
P_CE_WEIGHT = tl.constexpr(_FLOAT_INDEX["ce_weight"])
P_TCKD_WEIGHT = tl.constexpr(_FLOAT_INDEX["tckd_weight"])
P_NCKD_WEIGHT = tl.constexpr(_FLOAT_INDEX["nckd_weight"])
P_MAX_WEIGHT = tl.constexpr(_FLOAT_INDEX["max_weight"])
P_DTKD_WEIGHT = tl.constexpr(_FLOAT_INDEX["dtkd_weight"])
P_LOCAL_WEIGHT = tl.constexpr(_FLOAT_INDEX["local_weight"])
P_REST_WEIGHT = tl.constexpr(_FLOAT_INDEX["rest_weight"])
P_REL_EPS = tl.constexpr(_FLOAT_INDEX["rel_eps"])
P_REL_DELTA = tl.constexpr(_FLOAT_INDEX["rel_delta"])
P_REL_LAMBDA = tl.constexpr(_FLOAT_INDEX["rel_lambda"])
P_TDL_WEIGHT = tl.constexpr(_FLOAT_INDEX["tdl_weight"])
P_TDL_POS = tl.constexpr(_FLOAT_INDEX["tdl_pos"])
P_TDL_NEG = tl.constexpr(_FLOAT_INDEX["tdl_neg"])
P_TDL_NON = tl.constexpr(_FLOAT_INDEX["tdl_non"])
P_TSM_SCALE = tl.constexpr(_FLOAT_INDEX["tsm_scale"])
P_TSM_SHIFT = tl.constexpr(_FLOAT_INDEX["tsm_shift"])
P_TSM_GT_SCALE = tl.constexpr(_FLOAT_INDEX["tsm_gt_scale"])
P_LOSS_WEIGHT = tl.constexpr(_FLOAT_INDEX["loss_weight"])


@triton.jit
def _load_row(row_ptr, cols, C, cache, SINGLE_BLOCK: tl.constexpr, LAST_USE: tl.constexpr, ACC: tl.constexpr):
    """A block of one row in the accumulation dtype; columns ≥ C read as −inf (masked). Streamed rows
    are re-read by later passes: keep them in L2 (evict_last) until the last pass (evict_first)."""
    if SINGLE_BLOCK:
        x = cache
    elif LAST_USE:
        x = tl.load(row_ptr + cols, mask=cols < C, other=-float("inf"), eviction_policy="evict_first").to(ACC)
    else:
        x = tl.load(row_ptr + cols, mask=cols < C, other=-float("inf"), eviction_policy="evict_last").to(ACC)
    return x


@triton.jit
def _standardized(x, mean, inv_std):
    return tl.where(x == -float("inf"), -float("inf"), (x - mean) * inv_std)


@triton.jit
def _transform(s_raw, t_raw, cols, mean_s, inv_s, mean_t, inv_t, tsm_idx, tsm_mult, tsm_add,
               tsm_y, tsm_y_mult, STANDARDIZE: tl.constexpr, USE_TSM: tl.constexpr, TSM_K: tl.constexpr):
    """(s̃, t̃): standardisation, then TopKScale on the teacher."""
    s = s_raw
    t = t_raw
    if STANDARDIZE:
        s = _standardized(s_raw, mean_s, inv_s)
        t = _standardized(t_raw, mean_t, inv_t)
    if USE_TSM:
        hit = cols == tsm_y  # the label outside the top-k (tsm_y = -1 when there is none)
        mult = tl.where(hit, tsm_y_mult, 1.0)
        for j in tl.static_range(TSM_K):
            hit_j = cols == pick(tsm_idx, j)
            mult = tl.where(hit_j, pick(tsm_mult, j), mult)
            hit = hit | hit_j
        t = tl.where(hit, mult * t + tsm_add, t)
    return s, t


@triton.jit
def _load_block(s_row, t_row, cols, C, s_cache, t_cache, mean_s, inv_s, mean_t, inv_t, tsm_idx, tsm_mult,
                tsm_add, tsm_y, tsm_y_mult, STANDARDIZE: tl.constexpr, USE_TSM: tl.constexpr,
                TSM_K: tl.constexpr, SINGLE_BLOCK: tl.constexpr, LAST_USE: tl.constexpr, ACC: tl.constexpr):
    """(raw student, s̃, t̃) of one block of the row."""
    s_raw = _load_row(s_row, cols, C, s_cache, SINGLE_BLOCK, LAST_USE, ACC)
    t_raw = _load_row(t_row, cols, C, t_cache, SINGLE_BLOCK, LAST_USE, ACC)
    s, t = _transform(s_raw, t_raw, cols, mean_s, inv_s, mean_t, inv_t, tsm_idx, tsm_mult, tsm_add,
                      tsm_y, tsm_y_mult, STANDARDIZE, USE_TSM, TSM_K)
    return s_raw, s, t


@triton.jit
def _lookup(cols, idx_list, val_list, default, N_SLOTS: tl.constexpr):
    """Per column: the value of the list slot holding that column index, else ``default``."""
    out = default
    for j in tl.static_range(N_SLOTS):
        out = tl.where(cols == pick(idx_list, j), pick(val_list, j), out)
    return out


@triton.jit
def _cos_group(a, b, member):
    """(dot, ‖u‖², ‖v‖²) of the group's live entries (both logits finite)."""
    live = member & (tl.abs(a) < float("inf")) & (tl.abs(b) < float("inf"))
    a = tl.where(live, a, 0.0)
    b = tl.where(live, b, 0.0)
    return tl.sum(a * b, 0), tl.sum(a * a, 0), tl.sum(b * b, 0)


@triton.jit
def _cos_coeffs(dot, nu, nv, weight):
    """(loss, c1, c2) of weight·(1 − cos): gradient on the group's u_c is −c1·v_c + c2·u_c."""
    eps = tl.full([], COS_EPS, dot.dtype)
    norm = tl.sqrt(nu) * tl.sqrt(nv)
    den = tl.maximum(norm, eps)
    cos = dot / den
    c2 = tl.where((norm >= eps) & (nu > 0), weight * cos / tl.where(nu > 0, nu, 1.0), 0.0)
    return weight * (1.0 - cos), weight / den, c2


@triton.jit
def _clamp_kl(kl):
    """A row's KL sum, 0 where rounding made it negative (NaN stays NaN)."""
    return tl.where(kl < 0, 0.0, kl)


@triton.jit
def _relation_terms(rel_key, rel_idx, rel_s, rel_t, T, inv_T, local_w, params_ptr, REL_K: tl.constexpr,
                    K_PAD: tl.constexpr, ACC: tl.constexpr):
    """LDRLD's local term from its top-k list (registers only; reads rel_eps/rel_delta/rel_lambda).

    Returns (local_w·(Σ w·pair KL + set KL)/(P + 1) without the T² factor, the gradient of every list
    slot, the slots' columns with empty slots at BIG_IDX)."""
    rel_eps = tl.load(params_ptr + P_REL_EPS)
    rel_delta = tl.load(params_ptr + P_REL_DELTA)
    rel_lambda = tl.load(params_ptr + P_REL_LAMBDA)
    real = (rel_idx >= 0) & (rel_idx != BIG_IDX)
    r = ranks(rel_key, rel_idx) - (K_PAD - REL_K)
    pair = real[:, None] & real[None, :] & (r[:, None] < r[None, :])
    # pair differences formed before the 1/T scaling (exact for large logits)
    d_sp = (rel_s[:, None] - rel_s[None, :]) * inv_T
    d_tp = (rel_t[:, None] - rel_t[None, :]) * inv_T
    rf = r.to(ACC)
    w = rel_delta * tl.exp(-rel_lambda * (rf[:, None] + rf[None, :] + 2.0)) / (tl.abs(rf[:, None] - rf[None, :]) + rel_eps)
    w = tl.where(pair, w, 0.0)
    pair_loss = tl.sum(tl.sum(tl.where(pair, w * bernoulli_kl(d_tp, d_sp), 0.0), 1), 0)
    sig_s = 1.0 / (1.0 + tl.exp(-d_sp))
    sig_t = 1.0 / (1.0 + tl.exp(-d_tp))
    D = tl.where(pair, w * (sig_s - sig_t), 0.0)
    g_pair = tl.sum(D, 1) - tl.sum(D, 0)
    # the set term: softmax over the list, shifted by the list's maxima
    s_top = tl.max(tl.where(real, rel_s, -float("inf")), 0)
    t_top = tl.max(tl.where(real, rel_t, -float("inf")), 0)
    zs = tl.where(real, (rel_s - s_top) * inv_T, -float("inf"))
    zt = tl.where(real, (rel_t - t_top) * inv_T, -float("inf"))
    lq_i = zs - tl.log(tl.sum(tl.exp(zs), 0))
    lp_i = zt - tl.log(tl.sum(tl.exp(zt), 0))
    p_i = tl.where(real, tl.exp(lp_i), 0.0)
    q_i = tl.where(real, tl.exp(lq_i), 0.0)
    set_kl = tl.sum(tl.where(p_i > 0, p_i * (lp_i - lq_i), 0.0), 0)
    norm = REL_K * (REL_K - 1) / 2 + 1.0
    loss = local_w * (pair_loss + _clamp_kl(set_kl)) / norm
    rel_g = tl.where(real, local_w * T * (g_pair + q_i - p_i) / norm, 0.0)
    return loss, rel_g, tl.where(real, rel_idx, BIG_IDX)


@triton.jit
def _count_valid_rows(labels_ptr, N, ignore_index, HAS_LABELS: tl.constexpr, BATCH_BLOCK: tl.constexpr):
    """The batchmean divisor: #labels ≠ ignore_index over the whole batch (N without labels), as int32.
    Every program that needs it counts the labels itself (8 bytes a row, L2-resident), so the
    reduction needs no second launch and no host sync."""
    count = tl.zeros([], tl.int32) + N
    if HAS_LABELS:
        count = tl.zeros([], tl.int32)
        offs = tl.arange(0, BATCH_BLOCK)
        for start in range(0, N, BATCH_BLOCK):
            idx = start + offs
            lab = tl.load(labels_ptr + idx, mask=idx < N, other=ignore_index)
            count += tl.sum((lab != ignore_index).to(tl.int32), 0)
    return count


@triton.jit
def _reduce_batch(row, row_loss, row_loss_ptr, loss_ptr, ticket_ptr, labels_ptr, N, ignore_index, count,
                  HAS_LABELS: tl.constexpr, HAVE_COUNT: tl.constexpr, REDUCTION: tl.constexpr,
                  BATCH_BLOCK: tl.constexpr):
    """Store this row's loss; the last program to finish sums all rows in index order (deterministic)
    into the 0-dim ``loss`` (÷ max(count, 1) for batchmean) and re-arms the ticket counter.

    Reads ``row_loss_ptr[0:N]`` written by every program; ``ticket_ptr`` is an int32 counter that is
    0 at launch and 0 again at exit (the last program resets it), so a cached counter needs no memset."""
    if REDUCTION == REDUCTION_NONE:
        tl.store(loss_ptr + row, row_loss)
    else:
        tl.store(row_loss_ptr + row, row_loss)
        tl.debug_barrier()  # every thread's store precedes the release below
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
        if ticket == N - 1:
            offs = tl.arange(0, BATCH_BLOCK)
            total = row_loss * 0.0
            for start in range(0, N, BATCH_BLOCK):
                idx = start + offs
                # .cg: read from L2, where the other programs' release made the stores visible
                block = tl.load(row_loss_ptr + idx, mask=idx < N, other=0.0, cache_modifier=".cg")
                total += tl.sum(block, 0)
            if REDUCTION == REDUCTION_BATCHMEAN:
                if not HAVE_COUNT:
                    count = _count_valid_rows(labels_ptr, N, ignore_index, HAS_LABELS, BATCH_BLOCK)
                total = total / tl.maximum(count, 1).to(total.dtype)
            tl.store(loss_ptr, total)
            tl.store(ticket_ptr, 0)


@triton.jit
def _moments(s_row, t_row, C, offs, s_cache, t_cache, zero, BLOCK_C: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
             ACC: tl.constexpr):
    """P1 (standardize): reads s and t; returns (mean_s, 1/(σ_s + ε), σ_s, n_s, mean_t, 1/(σ_t + ε)) over
    the finite entries. A constant row (max == min) gets σ = 0 and mean = its value exactly, so Z = 0."""
    n_s, mean_s, m2_s = zero, zero, zero
    n_t, mean_t, m2_t = zero, zero, zero
    lo_s, hi_s = zero + float("inf"), zero - float("inf")
    lo_t, hi_t = zero + float("inf"), zero - float("inf")
    for start in range(0, C, BLOCK_C):
        cols = start + offs
        s_raw = _load_row(s_row, cols, C, s_cache, SINGLE_BLOCK, False, ACC)
        t_raw = _load_row(t_row, cols, C, t_cache, SINGLE_BLOCK, False, ACC)
        n_s, mean_s, m2_s, lo_s, hi_s = moments_update(n_s, mean_s, m2_s, lo_s, hi_s, s_raw,
                                                       s_raw != -float("inf"))
        n_t, mean_t, m2_t, lo_t, hi_t = moments_update(n_t, mean_t, m2_t, lo_t, hi_t, t_raw,
                                                       t_raw != -float("inf"))
    const_s = lo_s == hi_s
    const_t = lo_t == hi_t
    mean_s = tl.where(const_s, hi_s, mean_s)
    mean_t = tl.where(const_t, hi_t, mean_t)
    sigma_s = tl.where(const_s, 0.0, tl.sqrt(m2_s / tl.maximum(n_s - 1.0, 1.0)))
    sigma_t = tl.where(const_t, 0.0, tl.sqrt(m2_t / tl.maximum(n_t - 1.0, 1.0)))
    eps = tl.full([], STD_EPS, ACC)
    return mean_s, 1.0 / (sigma_s + eps), sigma_s, n_s, mean_t, 1.0 / (sigma_t + eps)


@triton.jit
def _teacher_topk_scale(t_row, C, offs, t_cache, y, mean_t, inv_t, tsm_scale, tsm_shift, zero,
                        HAS_LABELS: tl.constexpr, STANDARDIZE: tl.constexpr, TSM_K: tl.constexpr,
                        K_PAD: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE_BLOCK: tl.constexpr, ACC: tl.constexpr):
    """P2 (TopKScale): reads t (standardized when asked); returns the teacher's top-k columns with their
    multipliers, the additive shift·gap, and the label column when it is outside the top-k (else -1)."""
    tk_key, tk_idx, tk_a, tk_b = topk_init(TSM_K, K_PAD, ACC)
    t_sum = zero
    t_cnt = zero
    for start in range(0, C, BLOCK_C):
        cols = start + offs
        t_raw = _load_row(t_row, cols, C, t_cache, SINGLE_BLOCK, False, ACC)
        if STANDARDIZE:
            t_raw = _standardized(t_raw, mean_t, inv_t)
        live = t_raw != -float("inf")
        t_sum += tl.sum(tl.where(live, t_raw, 0.0), 0)
        t_cnt += tl.sum(live.to(ACC), 0)
        cand = tl.where(cols < C, cols, BIG_IDX)
        tk_key, tk_idx, tk_a, tk_b = topk_merge(tk_key, tk_idx, tk_a, tk_b, t_raw, cand, t_raw, t_raw, K_PAD)
    real = (tk_idx >= 0) & (tk_idx != BIG_IDX)
    top_live = real & (tk_key != -float("inf"))
    top_sum = tl.sum(tl.where(top_live, tk_key, 0.0), 0)
    top_cnt = tl.sum(top_live.to(ACC), 0)
    gap = top_sum / tl.maximum(top_cnt, 1.0) - (t_sum - top_sum) / tl.maximum(t_cnt - top_cnt, 1.0)
    rank = ranks(tk_key, tk_idx) - (K_PAD - TSM_K)
    tsm_mult = tl.where(real, 1.0 + tsm_scale * (TSM_K - rank) / TSM_K, 1.0).to(ACC)
    tsm_idx = tl.where(real, tk_idx, BIG_IDX)
    tsm_y = y * 0 - 1
    if HAS_LABELS:
        y_in_top = tl.sum((tsm_idx == y).to(tl.int32), 0) > 0
        tsm_y = tl.where(y_in_top, -1, y)
    return tsm_idx, tsm_mult, tsm_shift * gap, tsm_y


@triton.jit
def _logit_distill_kernel(
    s_ptr, t_ptr, labels_ptr, temp_ptr, gfactor_ptr, params_ptr, grad_ptr, row_loss_ptr, loss_ptr, dtemp_ptr,
    ticket_ptr, N, C, stride_s_row, stride_t_row, stride_g_row, stride_temp, stride_gfactor, ignore_index,
    HAS_LABELS: tl.constexpr, TEMP_IS_TENSOR: tl.constexpr, HAS_GFACTOR: tl.constexpr,
    WRITE_GRAD: tl.constexpr, WANT_DTEMP: tl.constexpr, REDUCTION: tl.constexpr,
    USE_KD: tl.constexpr, USE_CE: tl.constexpr, STANDARDIZE: tl.constexpr,
    USE_TSM: tl.constexpr, TSM_K: tl.constexpr, USE_DEC: tl.constexpr, ADAPTIVE: tl.constexpr,
    USE_DTKD: tl.constexpr, USE_REL: tl.constexpr, REL_K: tl.constexpr, RANK_BY_TEACHER: tl.constexpr,
    USE_TDL: tl.constexpr, TDL_K: tl.constexpr, K_PAD: tl.constexpr, NEG_PAD: tl.constexpr,
    NEED_SUMS: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE_BLOCK: tl.constexpr, ACC: tl.constexpr,
    VEC: tl.constexpr, BATCH_BLOCK: tl.constexpr,
):
    if VEC > 1:
        # C and the row strides are multiples of VEC (vector_width in the launcher): lets the compiler use vector
        # loads/stores (e.g. 4 x fp32) for row lengths such as ImageNet's 1000
        C = C // VEC * VEC  # the same value, now provably a multiple of VEC for the compiler
        stride_s_row = stride_s_row // VEC * VEC
        stride_t_row = stride_t_row // VEC * VEC
        stride_g_row = stride_g_row // VEC * VEC
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s_row
    t_row = t_ptr + row * stride_t_row
    g_row = grad_ptr + row * stride_g_row
    offs = tl.arange(0, BLOCK_C)
    NEG_INF = -float("inf")
    zero = tl.full([], 0.0, ACC)
    # the float parameters, in the accumulation dtype (exact for float64)
    kd_w = tl.load(params_ptr + P_KD_WEIGHT)
    ce_w = tl.load(params_ptr + P_CE_WEIGHT)
    tckd_w = tl.load(params_ptr + P_TCKD_WEIGHT)
    nckd_w = tl.load(params_ptr + P_NCKD_WEIGHT)
    max_w = tl.load(params_ptr + P_MAX_WEIGHT)
    dtkd_w = tl.load(params_ptr + P_DTKD_WEIGHT)
    local_w = tl.load(params_ptr + P_LOCAL_WEIGHT)
    rest_w = tl.load(params_ptr + P_REST_WEIGHT)
    tdl_w = tl.load(params_ptr + P_TDL_WEIGHT)
    loss_w = tl.load(params_ptr + P_LOSS_WEIGHT)

    # every per-row load is issued up front (one dependent memory trip per row); an ignored row's
    # logits are masked out of the loads, so it reads nothing
    row_live = offs < C
    if HAS_LABELS:
        y = tl.load(labels_ptr + row)
        ignored = y == ignore_index
        bad = (y < 0) | (y >= C)
        y = tl.where(bad, 0, y).to(tl.int32)
        row_live = row_live & (~ignored)
    else:
        y = 0
        ignored = False
        bad = False
    if TEMP_IS_TENSOR:
        T = tl.load(temp_ptr + row * stride_temp).to(ACC)
    else:
        T = tl.load(params_ptr + P_TEMPERATURE)
    inv_T = 1.0 / T
    if SINGLE_BLOCK:
        s_cache = tl.load(s_row + offs, mask=row_live, other=NEG_INF).to(ACC)
        t_cache = tl.load(t_row + offs, mask=row_live, other=NEG_INF).to(ACC)
    else:
        s_cache = tl.zeros([BLOCK_C], ACC)
        t_cache = tl.zeros([BLOCK_C], ACC)

    # the row's share of the returned loss: loss_weight, and 1/count for batchmean
    count = N
    HAVE_COUNT: tl.constexpr = REDUCTION == REDUCTION_BATCHMEAN and (WRITE_GRAD or WANT_DTEMP)
    row_scale = loss_w
    if HAVE_COUNT:
        count = _count_valid_rows(labels_ptr, N, ignore_index, HAS_LABELS, BATCH_BLOCK)
        row_scale = loss_w / tl.maximum(count, 1).to(ACC)
    g_scale = row_scale
    if HAS_GFACTOR:
        g_scale = row_scale * tl.load(gfactor_ptr + row * stride_gfactor).to(ACC)

    loss = zero
    dtemp = zero
    if ignored:
        if WRITE_GRAD:
            for start in range(0, C, BLOCK_C):
                cols = start + offs
                tl.store(g_row + cols, tl.zeros([BLOCK_C], ACC).to(grad_ptr.dtype.element_ty), mask=cols < C)
    else:
        # ---- P1: standardisation moments -------------------------------------------------------
        mean_s = zero
        inv_s = zero + 1.0
        mean_t = zero
        inv_t = zero + 1.0
        n_s = zero
        sigma_s = zero
        if STANDARDIZE:
            mean_s, inv_s, sigma_s, n_s, mean_t, inv_t = _moments(s_row, t_row, C, offs, s_cache, t_cache, zero,
                                                                  BLOCK_C, SINGLE_BLOCK, ACC)

        # ---- P2: TopKScale — the teacher's top-k and the gap of means -----------------------------
        tsm_idx = tl.zeros([K_PAD], tl.int32)
        tsm_mult = tl.zeros([K_PAD], ACC)
        tsm_add = zero
        tsm_y = y * 0 - 1
        tsm_y_mult = 1.0 + zero
        if USE_TSM:
            tsm_y_mult = 1.0 + tl.load(params_ptr + P_TSM_GT_SCALE)
            tsm_idx, tsm_mult, tsm_add, tsm_y = _teacher_topk_scale(
                t_row, C, offs, t_cache, y, mean_t, inv_t, tl.load(params_ptr + P_TSM_SCALE),
                tl.load(params_ptr + P_TSM_SHIFT), zero, HAS_LABELS, STANDARDIZE, TSM_K, K_PAD, BLOCK_C,
                SINGLE_BLOCK, ACC)

        # ---- P3: LSE states at T, maxima, target logits, top-k lists -----------------------------
        # LSE states (m, d) are in the logits' units (row_ops.lse_update): exact when x/T overflows
        m_s, d_s = lse_init(zero)
        m_t, d_t = lse_init(zero)
        m_snt, d_snt = lse_init(zero)
        m_tnt, d_tnt = lse_init(zero)
        m_raw, d_raw = lse_init(zero)
        s_y = zero
        t_y = zero
        s_raw_y = zero
        v_max = zero + NEG_INF
        v_arg = tl.zeros([], tl.int32) + BIG_IDX
        if USE_DEC or USE_CE:
            # the target logits: two scalar loads, transformed like the rest of their row
            s_raw_y = tl.load(s_row + y).to(ACC)
            s_y, t_y = _transform(s_raw_y, tl.load(t_row + y).to(ACC), y, mean_s, inv_s, mean_t, inv_t,
                                  tsm_idx, tsm_mult, tsm_add, tsm_y, tsm_y_mult, STANDARDIZE, USE_TSM, TSM_K)
        rel_key, rel_idx, rel_s, rel_t = topk_init(REL_K, K_PAD, ACC)
        pos_key, pos_idx, pos_s, pos_t = topk_init(TDL_K, K_PAD, ACC)
        neg_key, neg_idx, neg_s, neg_t = topk_init(2 * TDL_K, NEG_PAD, ACC)
        for start in range(0, C, BLOCK_C):
            cols = start + offs
            s_raw, s, t = _load_block(s_row, t_row, cols, C, s_cache, t_cache, mean_s, inv_s, mean_t, inv_t,
                                     tsm_idx, tsm_mult, tsm_add, tsm_y, tsm_y_mult, STANDARDIZE, USE_TSM,
                                     TSM_K, SINGLE_BLOCK, False, ACC)
            if USE_DEC:
                # non-target LSEs only; the full ones follow by merging in the target (below)
                is_y = cols == y
                m_snt, d_snt = lse_update(m_snt, d_snt, tl.where(is_y, NEG_INF, s), inv_T)
                m_tnt, d_tnt = lse_update(m_tnt, d_tnt, tl.where(is_y, NEG_INF, t), inv_T)
            else:
                m_s, d_s = lse_update(m_s, d_s, s, inv_T)
                m_t, d_t = lse_update(m_t, d_t, t, inv_T)
            if USE_CE:
                m_raw, d_raw = lse_update(m_raw, d_raw, s_raw, 1.0 + zero)
            if USE_DTKD:
                b_max = tl.max(s, 0)
                b_arg = tl.min(tl.where(s == b_max, cols, BIG_IDX), 0)
                v_arg = tl.where(b_max > v_max, b_arg, v_arg)
                v_max = tl.maximum(v_max, b_max)
            cand = tl.where(cols < C, cols, BIG_IDX)
            if USE_REL:
                if RANK_BY_TEACHER:
                    rel_key, rel_idx, rel_s, rel_t = topk_merge(rel_key, rel_idx, rel_s, rel_t, t, cand, s, t, K_PAD)
                else:
                    rel_key, rel_idx, rel_s, rel_t = topk_merge(rel_key, rel_idx, rel_s, rel_t, s, cand, s, t, K_PAD)
            if USE_TDL:
                pos_key, pos_idx, pos_s, pos_t = topk_merge(pos_key, pos_idx, pos_s, pos_t, t, cand, s, t, K_PAD)
                low = tl.where(t == NEG_INF, NEG_INF, -t)  # the smallest first; masked classes last
                neg_key, neg_idx, neg_s, neg_t = topk_merge(neg_key, neg_idx, neg_s, neg_t, low, cand, s, t, NEG_PAD)
        if USE_DEC:
            m_s, d_s = lse_merge(m_snt, d_snt, s_y, 1.0 + zero, inv_T)
            m_t, d_t = lse_merge(m_tnt, d_tnt, t_y, 1.0 + zero, inv_T)
        log_ds = tl.log(d_s)
        log_dt = tl.log(d_t)
        # NaN or +inf anywhere in s̃ or t̃ makes d NaN: the row's loss and gradient are NaN; a row
        # with no finite student or teacher logit (m = −inf) is empty: loss and gradient 0
        row_nan = bad | (d_s != d_s) | (d_t != d_t)
        row_ok = (~row_nan) & (m_s != NEG_INF) & (m_t != NEG_INF)
        loss_row = zero  # the row-scalar parts of the loss (CE, TCKD, L_local, TDL)

        # DKD / AEKT row scalars
        q_y = zero
        p_y = zero
        alpha_n = zero
        log_dsnt = zero
        log_dtnt = zero
        if USE_DEC:
            log_dsnt = tl.log(d_snt)
            log_dtnt = tl.log(d_tnt)
            log_qy = (s_y - m_s) * inv_T - log_ds
            log_py = (t_y - m_t) * inv_T - log_dt
            log_1mqy = (m_snt - m_s) * inv_T + log_dsnt - log_ds
            log_1mpy = (m_tnt - m_t) * inv_T + log_dtnt - log_dt
            q_y = tl.exp(log_qy)
            p_y = tl.exp(log_py)
            p_n = tl.exp(log_1mpy)
            tckd = tl.where(p_y > 0, p_y * (log_py - log_qy), 0.0) + tl.where(p_n > 0, p_n * (log_1mpy - log_1mqy), 0.0)
            alpha_n = tckd_w
            if ADAPTIVE:
                alpha_n = tckd_w * tl.minimum(tl.exp(log_py - log_qy), tl.load(params_ptr + P_MAX_WEIGHT))
            loss_row += T * T * alpha_n * _clamp_kl(tckd)
        log_draw = zero
        if USE_CE:
            log_draw = tl.log(d_raw)
            loss_row += ce_w * ((m_raw - s_raw_y) + log_draw)

        # DTKD row temperatures: T_s = 2vτ/(x + v), T_t = 2xτ/(x + v) where x > 0 and v > 0, else τ
        T_s = T
        T_t = T
        dtkd_ok = False
        if USE_DTKD:
            x_max = m_t  # the teacher's maximum (transformed)
            dtkd_ok = (x_max > 0) & (v_max > 0)
            den = tl.where(dtkd_ok, x_max + v_max, 1.0)
            T_s = tl.where(dtkd_ok, 2.0 * v_max * T / den, T)
            T_t = tl.where(dtkd_ok, 2.0 * x_max * T / den, T)

        # LDRLD: pair terms and set term from the top-k list (registers only)
        rel_g = tl.zeros([K_PAD], ACC)
        if USE_REL:
            rel_loss, rel_g, rel_idx = _relation_terms(rel_key, rel_idx, rel_s, rel_t, T, inv_T, local_w,
                                                       params_ptr, REL_K, K_PAD, ACC)
            loss_row += T * T * rel_loss

        # TDL: Pos group from its list; Neg = the k smallest of the non-Pos among the 2k smallest
        c1_pos = zero
        c2_pos = zero
        c1_neg = zero
        c2_neg = zero
        if USE_TDL:
            pos_real = (pos_idx >= 0) & (pos_idx != BIG_IDX)
            pos_idx = tl.where(pos_real, pos_idx, BIG_IDX)
            dot, nu, nv = _cos_group(pos_s, pos_t, pos_real)
            l_pos, c1_pos, c2_pos = _cos_coeffs(dot, nu, nv, tdl_w * tl.load(params_ptr + P_TDL_POS))
            neg_real = (neg_idx >= 0) & (neg_idx != BIG_IDX)
            neg_in_pos = tl.sum((neg_idx[:, None] == pos_idx[None, :]).to(tl.int32), 1) > 0
            cand_neg = neg_real & (~neg_in_pos)
            beats = (neg_key[None, :] > neg_key[:, None]) | ((neg_key[None, :] == neg_key[:, None]) & (neg_idx[None, :] < neg_idx[:, None]))
            n_rank = tl.sum((beats & cand_neg[None, :]).to(tl.int32), 1)
            neg_sel = cand_neg & (n_rank < TDL_K)
            neg_idx = tl.where(neg_sel, neg_idx, BIG_IDX)
            dot, nu, nv = _cos_group(neg_s, neg_t, neg_sel)
            l_neg, c1_neg, c2_neg = _cos_coeffs(dot, nu, nv, tdl_w * tl.load(params_ptr + P_TDL_NEG))
            loss_row += l_pos + l_neg

        # ---- P4: complement LSEs (LDRLD), Non-group sums (TDL), LSEs at T_s/T_t (DTKD) ----------
        m_sR, d_sR = lse_init(zero)
        m_tR, d_tR = lse_init(zero)
        m_sd, d_sd = lse_init(zero)
        m_td, d_td = lse_init(zero)
        inv_Ts = 1.0 / T_s
        inv_Tt = 1.0 / T_t
        c1_non = zero
        c2_non = zero
        if USE_REL or USE_TDL or USE_DTKD:
            dot_n = zero
            nu_n = zero
            nv_n = zero
            for start in range(0, C, BLOCK_C):
                cols = start + offs
                s_raw, s, t = _load_block(s_row, t_row, cols, C, s_cache, t_cache, mean_s, inv_s, mean_t, inv_t,
                                         tsm_idx, tsm_mult, tsm_add, tsm_y, tsm_y_mult, STANDARDIZE, USE_TSM,
                                         TSM_K, SINGLE_BLOCK, False, ACC)
                if USE_REL:
                    in_I = _lookup(cols, rel_idx, rel_idx, BIG_IDX, REL_K) != BIG_IDX
                    m_sR, d_sR = lse_update(m_sR, d_sR, tl.where(in_I, NEG_INF, s), inv_T)
                    m_tR, d_tR = lse_update(m_tR, d_tR, tl.where(in_I, NEG_INF, t), inv_T)
                if USE_TDL:
                    grouped = (_lookup(cols, pos_idx, pos_idx, BIG_IDX, K_PAD) != BIG_IDX) | \
                              (_lookup(cols, neg_idx, neg_idx, BIG_IDX, NEG_PAD) != BIG_IDX)
                    dot_b, nu_b, nv_b = _cos_group(s, t, (cols < C) & (~grouped))
                    dot_n += dot_b
                    nu_n += nu_b
                    nv_n += nv_b
                if USE_DTKD:
                    m_sd, d_sd = lse_update(m_sd, d_sd, s, inv_Ts)
                    m_td, d_td = lse_update(m_td, d_td, t, inv_Tt)
            if USE_TDL:
                l_non, c1_non, c2_non = _cos_coeffs(dot_n, nu_n, nv_n, tdl_w * tl.load(params_ptr + P_TDL_NON))
                loss_row += l_non
        log_dsR = tl.log(d_sR)
        log_dtR = tl.log(d_tR)
        log_dsd = tl.log(d_sd)
        log_dtd = tl.log(d_td)

        # ---- P5: loss and the row sums the gradient needs; P6: gradient ------------------------
        # the temperature-derivative sums are shifted by the row maxima: Σ(q − p) = 0 and
        # Σ p·(log p − log q − KL) = 0 make any shift exact, and the maxima keep |x − shift| small
        s_hi = tl.where(m_s == NEG_INF, 0.0, m_s)
        t_hi = tl.where(m_t == NEG_INF, 0.0, m_t)
        kl_kd = zero
        kl_nc = zero
        kl_d = zero
        kl_rest = zero
        sum_g = zero
        sum_gz = zero
        a1 = zero
        a2 = zero
        a3 = zero
        b1 = zero
        b2 = zero
        b3 = zero
        for p in tl.static_range(2):
            if (p == 0 and NEED_SUMS) or (p == 1 and WRITE_GRAD) or (p == 1 and not NEED_SUMS):
                # P5 (p == 0) accumulates the loss and the sums; P6 (p == 1) writes the gradient
                # (and accumulates the loss itself when P5 did not run)
                extra = zero
                if p == 1 and USE_DTKD:
                    # ∂(T_t·T_s·KL_dyn)/∂v through the temperatures, on the argmax column
                    xv = x_max + v_max
                    A = T_t * T_s
                    dA = 4.0 * T * T * x_max * (x_max - v_max) / (xv * xv * xv)
                    dTs = 2.0 * T * x_max / (xv * xv)
                    dkl = b1 / (T_s * T_s) * dTs + (b2 - kl_d * b3) / (T_t * T_t) * dTs
                    extra = tl.where(dtkd_ok, dtkd_w * (dA * kl_d + A * dkl), 0.0)
                g_bar = zero
                gz_coef = zero
                if p == 1 and STANDARDIZE:
                    g_bar = (sum_g + extra) / tl.maximum(n_s, 1.0)
                    sgz = sum_gz
                    if USE_DTKD:
                        sgz += extra * v_max  # the argmax column's extra gradient, z̃_m = v
                    gz_coef = tl.where(sigma_s > 0, sgz / (tl.maximum(n_s - 1.0, 1.0) * tl.where(sigma_s > 0, sigma_s, 1.0)), 0.0)
                for i in range(0, C, BLOCK_C):
                    # P5 and a P6 that follows P3/P4 directly run backwards: the blocks read last
                    # are the ones most likely still in L2
                    if p == 0 or not NEED_SUMS:
                        start = (C - 1) // BLOCK_C * BLOCK_C - i
                    else:
                        start = i
                    cols = start + offs
                    s_raw, s, t = _load_block(s_row, t_row, cols, C, s_cache, t_cache, mean_s, inv_s, mean_t, inv_t,
                                             tsm_idx, tsm_mult, tsm_add, tsm_y, tsm_y_mult, STANDARDIZE, USE_TSM,
                                             TSM_K, SINGLE_BLOCK, p == 1, ACC)
                    g = tl.zeros([BLOCK_C], ACC)
                    if USE_KD or WANT_DTEMP:
                        lq = log_prob(s, m_s, log_ds, inv_T)
                        lp = log_prob(t, m_t, log_dt, inv_T)
                        q = tl.exp(lq)
                        pr = tl.exp(lp)
                        kl = tl.where(pr > 0, pr * (lp - lq), 0.0)
                        g += kd_w * T * (q - pr)
                        if p == 0 or not NEED_SUMS:  # the pass that accumulates the loss
                            kl_kd += tl.sum(kl, 0)
                        if WANT_DTEMP and p == 0:
                            a1 += tl.sum(tl.where((q > 0) | (pr > 0), (q - pr) * (s - s_hi), 0.0), 0)
                            a2 += tl.sum(tl.where(pr > 0, (t - t_hi) * pr * (lp - lq), 0.0), 0)
                            a3 += tl.sum(tl.where(pr > 0, (t - t_hi) * pr, 0.0), 0)
                    if USE_DEC:
                        is_y = cols == y
                        lq_h = log_prob(s, m_snt, log_dsnt, inv_T)
                        lp_h = log_prob(t, m_tnt, log_dtnt, inv_T)
                        q_h = tl.where(is_y, 0.0, tl.exp(lq_h))
                        p_h = tl.where(is_y, 0.0, tl.exp(lp_h))
                        if p == 0 or not NEED_SUMS:  # the pass that accumulates the loss
                            kl_nc += tl.sum(tl.where(p_h > 0, p_h * (lp_h - lq_h), 0.0), 0)
                        g += tl.where(is_y, T * alpha_n * (q_y - p_y),
                                      T * (alpha_n * (p_y - q_y) * q_h + nckd_w * (q_h - p_h)))
                    if USE_DTKD:
                        lq_d = log_prob(s, m_sd, log_dsd, inv_Ts)
                        lp_d = log_prob(t, m_td, log_dtd, inv_Tt)
                        q_d = tl.exp(lq_d)
                        p_d = tl.exp(lp_d)
                        kl_dv = tl.where(p_d > 0, p_d * (lp_d - lq_d), 0.0)
                        g += dtkd_w * T_t * (q_d - p_d)
                        if p == 0 or not NEED_SUMS:  # the pass that accumulates the loss
                            kl_d += tl.sum(kl_dv, 0)
                        if p == 0:
                            b1 += tl.sum(tl.where((q_d > 0) | (p_d > 0), (p_d - q_d) * (s - s_hi), 0.0), 0)
                            b2 += tl.sum(tl.where(p_d > 0, (t - t_hi) * p_d * (lp_d - lq_d), 0.0), 0)
                            b3 += tl.sum(tl.where(p_d > 0, (t - t_hi) * p_d, 0.0), 0)
                        else:
                            g = tl.where(cols == v_arg, g + extra, g)
                    if USE_REL:
                        g_I = _lookup(cols, rel_idx, rel_g, NEG_INF, REL_K)
                        in_I = g_I != NEG_INF
                        lq_r = log_prob(s, m_sR, log_dsR, inv_T)
                        lp_r = log_prob(t, m_tR, log_dtR, inv_T)
                        q_r = tl.where(in_I, 0.0, tl.exp(lq_r))
                        p_r = tl.where(in_I, 0.0, tl.exp(lp_r))
                        if p == 0 or not NEED_SUMS:  # the pass that accumulates the loss
                            kl_rest += tl.sum(tl.where(p_r > 0, p_r * (lp_r - lq_r), 0.0), 0)
                        g += tl.where(in_I, g_I, rest_w * T * (q_r - p_r))
                    if USE_TDL:
                        live = (cols < C) & (tl.abs(s) < float("inf")) & (tl.abs(t) < float("inf"))
                        in_pos = _lookup(cols, pos_idx, pos_idx, BIG_IDX, K_PAD) != BIG_IDX
                        in_neg = _lookup(cols, neg_idx, neg_idx, BIG_IDX, NEG_PAD) != BIG_IDX
                        c1 = tl.where(in_pos, c1_pos, tl.where(in_neg, c1_neg, c1_non))
                        c2 = tl.where(in_pos, c2_pos, tl.where(in_neg, c2_neg, c2_non))
                        g += tl.where(live, c2 * s - c1 * t, 0.0)
                    live_s = s_raw != NEG_INF
                    if p == 0 and STANDARDIZE:
                        sum_g += tl.sum(tl.where(live_s, g, 0.0), 0)
                        sum_gz += tl.sum(tl.where(live_s, g * s, 0.0), 0)
                    if p == 1:
                        if STANDARDIZE:
                            g = tl.where(live_s, (g - g_bar) * inv_s - gz_coef * s, 0.0)
                        if USE_CE:
                            g += ce_w * (tl.exp((s_raw - m_raw) - log_draw) - tl.where(cols == y, 1.0, 0.0))
                        # NaN rows: NaN; empty rows: 0 (their g may hold −inf − (−inf))
                        g = tl.where(row_ok, g * g_scale, tl.where(row_nan, float("nan"), 0.0))
                        if WRITE_GRAD:
                            tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < C)

        # a KL that rounding made negative (fp32 at huge T) is clamped at 0; the gradient is unaffected
        loss_el = T * T * (kd_w * _clamp_kl(kl_kd) + nckd_w * _clamp_kl(kl_nc) + rest_w * _clamp_kl(kl_rest))
        if USE_DTKD:
            loss_el += dtkd_w * T_t * T_s * _clamp_kl(kl_d)
        loss = tl.where(row_ok, (loss_el + loss_row) * loss_w, tl.where(row_nan, float("nan"), 0.0))
        if WANT_DTEMP:
            dtemp = kd_w * (2.0 * T * kl_kd - (a1 + a2 - kl_kd * a3)) * row_scale
            dtemp = tl.where(row_ok, dtemp, tl.where(row_nan, float("nan"), 0.0))

    if WANT_DTEMP:
        tl.store(dtemp_ptr + row, dtemp)
    _reduce_batch(row, loss, row_loss_ptr, loss_ptr, ticket_ptr, labels_ptr, N, ignore_index, count,
                  HAS_LABELS, HAVE_COUNT, REDUCTION, BATCH_BLOCK)


@triton.jit
def _scale_rows_kernel(grad_ptr, factor_ptr, C, stride_g_row, stride_factor, BLOCK_C: tl.constexpr):
    """grad[row, :] *= factor[row]; a row whose factor is exactly 1.0 is not touched."""
    row = tl.program_id(0).to(tl.int64)
    f = tl.load(factor_ptr + row * stride_factor)
    if f != 1.0:
        g_row = grad_ptr + row * stride_g_row
        offs = tl.arange(0, BLOCK_C)
        for start in range(0, C, BLOCK_C):
            cols = start + offs
            g = tl.load(g_row + cols, mask=cols < C)
            tl.store(g_row + cols, (g * f).to(g.dtype), mask=cols < C)


# -------------------------------------------------------------------------------------------------
# launchers
# -------------------------------------------------------------------------------------------------
_block_c_override: Optional[int] = None
_batch_block_override: Optional[int] = None


@contextlib.contextmanager
def forced_block_c(block_c: int):
    """Force ``BLOCK_C`` (a power of two) so tests reach the streaming multi-block path at small C."""
    global _block_c_override
    if block_c & (block_c - 1):
        raise ValueError("BLOCK_C must be a power of two")
    old, _block_c_override = _block_c_override, block_c
    try:
        yield
    finally:
        _block_c_override = old


@contextlib.contextmanager
def forced_batch_block(rows: int):
    """Force the rows per step of the in-kernel batch loops (a power of two) so tests reach several
    steps with a few rows (the interpreter pays per program)."""
    global _batch_block_override
    if rows & (rows - 1):
        raise ValueError("the batch block must be a power of two")
    old, _batch_block_override = _batch_block_override, rows
    try:
        yield
    finally:
        _batch_block_override = old


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def block_config(C: int):
    """(BLOCK_C, SINGLE_BLOCK, num_warps) for a row of C columns."""
    block = _block_c_override or min(_next_pow2(C), MAX_BLOCK_C)
    block = max(block, 16)
    num_warps = 8 if block >= 2048 else 4 if block >= 512 else 2
    return block, block >= C, num_warps


def vector_width(*counts: int) -> int:
    """The largest power of two ≤ 16 dividing every element count (C and the row strides)."""
    vec = 16
    while vec > 1 and any(n % vec for n in counts):
        vec //= 2
    return vec


def kernel_flags(p: dict, *, learnable: bool, has_labels: bool, temp_is_tensor: bool,
                 has_gfactor: bool, write_grad: bool, dtype: torch.dtype, C: int, vec: int = 1) -> dict:
    """The ``tl.constexpr`` switches of a packed spec (``p``: field → value of ``LogitDistill.pack``):
    a preset pays only for the features it uses."""
    tsm_k = p["tsm_k"] if p["use_tsm"] else 1
    rel_k = p["rel_k"] if p["use_relation"] else 1
    tdl_k = p["tdl_k"] if p["use_tdl"] else 1
    block, single, _ = block_config(C)
    standardize, use_dtkd = bool(p["standardize"]), p["dtkd_weight"] != 0
    return dict(
        HAS_LABELS=has_labels, TEMP_IS_TENSOR=temp_is_tensor, HAS_GFACTOR=has_gfactor,
        WRITE_GRAD=write_grad, WANT_DTEMP=learnable, REDUCTION=int(p["reduction"]),
        USE_KD=p["kd_weight"] != 0, USE_CE=p["ce_weight"] != 0, STANDARDIZE=standardize,
        USE_TSM=bool(p["use_tsm"]), TSM_K=tsm_k,
        USE_DEC=bool(p["use_decoupled"]), ADAPTIVE=bool(p["use_decoupled"] and p["adaptive_tckd"]),
        USE_DTKD=use_dtkd, USE_REL=bool(p["use_relation"]), REL_K=rel_k,
        RANK_BY_TEACHER=bool(p["use_relation"] and p["rank_by_teacher"]), USE_TDL=bool(p["use_tdl"]),
        TDL_K=tdl_k, K_PAD=_next_pow2(max(tsm_k, rel_k, tdl_k, 2)), NEG_PAD=_next_pow2(max(2 * tdl_k, 2)),
        NEED_SUMS=(write_grad and (standardize or use_dtkd)) or learnable,
        BLOCK_C=block, SINGLE_BLOCK=single,
        ACC=tl.float64 if dtype == torch.float64 else tl.float32, VEC=vec,
        BATCH_BLOCK=_batch_block_override or BATCH_BLOCK,
    )


def unpack(floats, ints) -> dict:
    return dict(zip(FLOAT_FIELDS, floats)) | dict(zip(INT_FIELDS, ints))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and loss) dtype of a student dtype: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _wrap(kernel):
    """``torch.library.wrap_triton`` where the installed torch has it (so torch.compile sees the
    launch), else the plain kernel."""
    wrap = getattr(torch.library, "wrap_triton", None)
    return wrap(kernel) if wrap is not None else kernel


def logit_distill_fwd(s: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor],
                      temperature: Optional[torch.Tensor], grad: Optional[torch.Tensor],
                      grad_factor: Optional[torch.Tensor], params: torch.Tensor, ticket: Optional[torch.Tensor],
                      floats: List[float], ints: List[int], learnable: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """One launch of the engine over all rows, the reduction included (launcher contract 2).

    Returns ``(loss, dtemp)``: ``loss`` is ``[N]`` for reduction none, else 0-dim; ``dtemp`` is ``[N]``
    when ``learnable`` (else empty). Writes ``grad`` when given. ``params``: the float parameters in the
    accumulation dtype (:func:`param_tensor`); ``floats`` only choose the kernel's specialisation.
    ``ticket``: an int32 counter that is 0 (None for reduction none); the kernel leaves it 0."""
    N, C = s.shape
    acc = acc_dtype(s.dtype)
    p = unpack(floats, ints)
    reduce_rows = p["reduction"] != REDUCTION_CODES["none"]
    loss = torch.empty((), dtype=acc, device=s.device) if reduce_rows else torch.empty(N, dtype=acc, device=s.device)
    row_loss = torch.empty(N, dtype=acc, device=s.device) if reduce_rows else loss
    dtemp = torch.empty(N if learnable else 0, dtype=acc, device=s.device)
    if N == 0:
        return loss.zero_(), dtemp
    flags = kernel_flags(p, learnable=learnable, has_labels=labels is not None,
                         temp_is_tensor=temperature is not None, has_gfactor=grad_factor is not None,
                         write_grad=grad is not None, dtype=s.dtype, C=C,
                         vec=vector_width(C, s.stride(0), t.stride(0), grad.stride(0) if grad is not None else 0))
    _wrap(_logit_distill_kernel)[(N,)](
        s, t, labels if labels is not None else params, temperature if temperature is not None else params,
        grad_factor if grad_factor is not None else params, params, grad if grad is not None else params,
        row_loss, loss, dtemp if learnable else params, ticket if ticket is not None else params,
        N, C, s.stride(0), t.stride(0), grad.stride(0) if grad is not None else 0,
        temperature.stride(0) if temperature is not None else 0,
        grad_factor.stride(0) if grad_factor is not None else 0, int(p["ignore_index"]),
        num_warps=block_config(C)[2], **flags,
    )
    return loss, dtemp


def scale_rows_(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """grad[n, :] *= factor[n] in place; rows with factor exactly 1.0 are skipped on the device."""
    N, C = grad.shape
    if N == 0:
        return
    block, _, num_warps = block_config(C)
    _wrap(_scale_rows_kernel)[(N,)](grad, factor, C, grad.stride(0), factor.stride(0), BLOCK_C=block,
                                   num_warps=num_warps)


# torch.library registration: triton_op + wrap_triton (torch >= 2.6) on the GPU, so torch.compile traces
# through the launches (fullgraph); an opaque custom_op with a fake implementation under the interpreter
# (triton_op's fake-tensor tracing would run the interpreted kernel on fake tensors) or on an older torch.
# The engine op writes ``grad`` and uses ``ticket`` as a counter (0 before and after): both are declared.
_ENGINE_MUTATES = {"grad", "ticket"}
if hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton") and not interpreting():
    logit_distill_fwd = torch.library.triton_op("kdkernels::triton_logit_distill", logit_distill_fwd,
                                                mutates_args=_ENGINE_MUTATES)
    scale_rows_ = torch.library.triton_op("kdkernels::triton_scale_rows_", scale_rows_, mutates_args={"grad"})
else:
    _wrap = lambda kernel: kernel  # noqa: E731 - plain launches inside an opaque op
    logit_distill_fwd = torch.library.custom_op("kdkernels::triton_logit_distill", logit_distill_fwd,
                                                mutates_args=_ENGINE_MUTATES)
    scale_rows_ = torch.library.custom_op("kdkernels::triton_scale_rows_", scale_rows_, mutates_args={"grad"})

    @logit_distill_fwd.register_fake
    def _(s, t, labels, temperature, grad, grad_factor, params, ticket, floats, ints, learnable):
        acc = acc_dtype(s.dtype)
        N = s.shape[0]
        reduce_rows = unpack(floats, ints)["reduction"] != REDUCTION_CODES["none"]
        return s.new_empty(() if reduce_rows else (N,), dtype=acc), s.new_empty((N if learnable else 0,), dtype=acc)

    @scale_rows_.register_fake
    def _(grad, factor):
        return None


@functools.lru_cache(maxsize=256)
def _cached_params(floats: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(floats, dtype=dtype, device=device)


def param_tensor(floats, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The packed float parameters as a small tensor of the accumulation dtype, so the kernel reads them
    exactly (a float64 input gets float64 scalars, in the interpreter too, where Python floats would
    arrive as float32) and a launch passes one pointer instead of twenty scalars. Cached per
    (values, device, dtype): a host-to-device copy only the first time a spec is seen."""
    if torch.compiler.is_compiling():
        return torch.tensor(list(floats), dtype=dtype, device=device)
    return _cached_params(tuple(floats), torch.device(device), dtype)


class TritonLauncher:
    """The launcher contract of :mod:`kdkernels.engine` for Triton (``contract = 2``: one launch computes
    the row losses, the gradient and the reduction)."""

    name = "triton"
    contract = 2

    def __init__(self):
        self._tickets: dict = {}

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            return None if interpreting() else "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
        return f"Triton does not run on {device.type} tensors"

    def ticket(self, device: torch.device) -> torch.Tensor:
        """The int32 counter of the in-kernel reduction (the last program to take a ticket sums the rows).

        Cached per (device, CUDA stream) and zeroed once at creation: every launch leaves it at 0 again,
        so no memset launch per call. Launches on one stream run one after another, so they never share
        it concurrently; another stream gets its own. Under torch.compile (a graph must not capture a
        global buffer) and in the interpreter (Python threads could interleave) a fresh one is made."""
        if torch.compiler.is_compiling() or device.type != "cuda":
            return torch.zeros(1, dtype=torch.int32, device=device)
        key = (device.index, torch.cuda.current_stream(device).cuda_stream)
        counter = self._tickets.get(key)
        if counter is None:
            counter = self._tickets[key] = torch.zeros(1, dtype=torch.int32, device=device)
        return counter

    def forward(self, s, t, labels, temperature, spec, grad, grad_factor):
        floats, ints = spec.pack()
        acc = acc_dtype(s.dtype)
        if grad_factor is not None and not isinstance(grad_factor, torch.Tensor):
            # a plain number (1 = no factor): kept for callers of the first contract
            grad_factor = None if float(grad_factor) == 1.0 else torch.full((s.shape[0],), float(grad_factor),
                                                                             dtype=acc, device=s.device)
        reduce_rows = ints[INT_FIELDS.index("reduction")] != REDUCTION_CODES["none"]
        loss, dtemp = logit_distill_fwd(
            s, t, labels, temperature, grad, grad_factor, param_tensor(floats, s.device, acc),
            self.ticket(s.device) if reduce_rows else None, floats, ints, spec.learnable_temperature)
        return loss, (dtemp if spec.learnable_temperature else None)

    def scale_(self, grad, factor):
        scale_rows_(grad, factor)


launcher = TritonLauncher()
