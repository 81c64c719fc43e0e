"""The fused logit-distillation engine in Triton: one program per row, any ``LogitDistill`` preset.

Math (losses.md; ``s̃``/``t̃`` are the logits after the optional standardisation ``Z`` and TopKScale,
``z = x/T``, ``q = softmax(z_s)``, ``p = softmax(z_t)``, all in float32 — float64 for float64 inputs)::

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
    P3 online LSEs at T (the non-target ones for DKD/AEKT, the full LSE then following exactly as
       logaddexp(LSE_{≠y}, z_y); raw logits for CE), row maxima/argmax (DTKD), top-k lists (LDRLD
       ranking, TDL Pos and the 2k smallest for Neg)
    P4 LSEs restricted to the complement of the top-k (LDRLD), TDL's Non sums, LSEs at T_s/T_t (DTKD)
    P5 loss and the row sums the gradient needs (standardize, DTKD's argmax column, learnable T)
    P6 gradient write (loss too when P5 did not run)

Bytes per row: a row of ≤ ``BLOCK_C`` columns reads ``s`` and ``t`` once and writes the gradient once
(the 3-transfer floor) plus 4–8 bytes of loss; no ``[N, C]`` temporaries. A longer row is read once per
pass (two passes for KD/DKD): the later pass runs backwards with L2 eviction hints so that part of
it hits L2, but LLM rows (≥ 256 KB each, many rows in flight) mostly come from HBM twice.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..dispatch import interpreting
from ..spec import FLOAT_FIELDS, INT_FIELDS
from .row_ops import (BIG_IDX, bernoulli_kl, logaddexp, lse_final, lse_init, lse_update, moments_update, pick, ranks,
                      topk_init, topk_merge)

#: largest row kept in registers (a single pass over memory); longer rows stream in blocks of this size
MAX_BLOCK_C = 4096
#: added to the standard deviation (logit-standardization-KD)
STD_EPS = 1e-7
#: lower bound of ‖u‖·‖v‖ in TDL's cosine
COS_EPS = 1e-8


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
def _div_keep_masked(x, T):
    """x / T with masked (−inf) entries kept at −inf even for DTKD's negative temperatures."""
    return tl.where(x == -float("inf"), -float("inf"), x / T)


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
    norm = tl.sqrt(nu) * tl.sqrt(nv)
    den = tl.maximum(norm, 1e-8)
    cos = dot / den
    c2 = tl.where((norm >= 1e-8) & (nu > 0), weight * cos / tl.where(nu > 0, nu, 1.0), 0.0)
    return weight * (1.0 - cos), weight / den, c2


@triton.jit
def _logit_distill_kernel(
    s_ptr, t_ptr, labels_ptr, temp_ptr, gscale_ptr, grad_ptr, loss_ptr, dtemp_ptr,
    C, stride_s_row, stride_t_row, stride_g_row, stride_temp, stride_gscale, ignore_index,
    # scalar parameters arrive as float64 (exact for the float64 path) and are cast to ACC below
    temperature: tl.float64, gscale: tl.float64, kd_w: tl.float64, ce_w: tl.float64,
    tckd_w: tl.float64, nckd_w: tl.float64, max_w: tl.float64, dtkd_w: tl.float64,
    local_w: tl.float64, rest_w: tl.float64, rel_eps: tl.float64, rel_delta: tl.float64,
    rel_lambda: tl.float64, tdl_w: tl.float64, tdl_pos: tl.float64, tdl_neg: tl.float64,
    tdl_non: tl.float64, tsm_scale: tl.float64, tsm_shift: tl.float64, tsm_gt: tl.float64,
    HAS_LABELS: tl.constexpr, TEMP_IS_TENSOR: tl.constexpr, GSCALE_IS_TENSOR: tl.constexpr,
    WRITE_GRAD: tl.constexpr, WANT_DTEMP: tl.constexpr,
    USE_KD: tl.constexpr, USE_CE: tl.constexpr, STANDARDIZE: tl.constexpr,
    USE_TSM: tl.constexpr, TSM_K: tl.constexpr, USE_DEC: tl.constexpr, ADAPTIVE: tl.constexpr,
    USE_DTKD: tl.constexpr, USE_REL: tl.constexpr, REL_K: tl.constexpr, RANK_BY_TEACHER: tl.constexpr,
    USE_TDL: tl.constexpr, TDL_K: tl.constexpr, K_PAD: tl.constexpr, NEG_PAD: tl.constexpr,
    NEED_SUMS: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE_BLOCK: tl.constexpr, ACC: tl.constexpr,
    VEC: tl.constexpr,
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
    temperature = tl.cast(temperature, ACC)
    gscale = tl.cast(gscale, ACC)
    kd_w = tl.cast(kd_w, ACC)
    ce_w = tl.cast(ce_w, ACC)
    tckd_w = tl.cast(tckd_w, ACC)
    nckd_w = tl.cast(nckd_w, ACC)
    max_w = tl.cast(max_w, ACC)
    dtkd_w = tl.cast(dtkd_w, ACC)
    local_w = tl.cast(local_w, ACC)
    rest_w = tl.cast(rest_w, ACC)
    rel_eps = tl.cast(rel_eps, ACC)
    rel_delta = tl.cast(rel_delta, ACC)
    rel_lambda = tl.cast(rel_lambda, ACC)
    tdl_w = tl.cast(tdl_w, ACC)
    tdl_pos = tl.cast(tdl_pos, ACC)
    tdl_neg = tl.cast(tdl_neg, ACC)
    tdl_non = tl.cast(tdl_non, ACC)
    tsm_scale = tl.cast(tsm_scale, ACC)
    tsm_shift = tl.cast(tsm_shift, ACC)
    tsm_gt = tl.cast(tsm_gt, ACC)

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
        T = temperature + zero
    if GSCALE_IS_TENSOR:
        row_scale = tl.load(gscale_ptr + row * stride_gscale).to(ACC)
    else:
        row_scale = gscale + zero
    if SINGLE_BLOCK:
        s_cache = tl.load(s_row + offs, mask=row_live, other=NEG_INF).to(ACC)
        t_cache = tl.load(t_row + offs, mask=row_live, other=NEG_INF).to(ACC)
    else:
        s_cache = tl.zeros([BLOCK_C], ACC)
        t_cache = tl.zeros([BLOCK_C], ACC)

    if ignored:
        tl.store(loss_ptr + row, zero)
        if WANT_DTEMP:
            tl.store(dtemp_ptr + row, zero)
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
            m2_s = zero
            n_t = zero
            m2_t = zero
            for start in range(0, C, BLOCK_C):
                cols = start + offs
                s_raw = _load_row(s_row, cols, C, s_cache, SINGLE_BLOCK, False, ACC)
                t_raw = _load_row(t_row, cols, C, t_cache, SINGLE_BLOCK, False, ACC)
                n_s, mean_s, m2_s = moments_update(n_s, mean_s, m2_s, s_raw, s_raw != NEG_INF)
                n_t, mean_t, m2_t = moments_update(n_t, mean_t, m2_t, t_raw, t_raw != NEG_INF)
            sigma_s = tl.sqrt(m2_s / tl.maximum(n_s - 1.0, 1.0))
            inv_s = 1.0 / (sigma_s + 1e-7)
            inv_t = 1.0 / (tl.sqrt(m2_t / tl.maximum(n_t - 1.0, 1.0)) + 1e-7)

        # ---- P2: TopKScale — the teacher's top-k and the gap of means -----------------------------
        tsm_idx = tl.zeros([K_PAD], tl.int32)
        tsm_mult = tl.zeros([K_PAD], ACC)
        tsm_add = zero
        tsm_y = y * 0 - 1
        tsm_y_mult = 1.0 + tsm_gt
        if USE_TSM:
            tk_key, tk_idx, tk_a, tk_b = topk_init(TSM_K, K_PAD, ACC)
            t_sum = zero
            t_cnt = zero
            for start in range(0, C, BLOCK_C):
                cols = start + offs
                t_raw = _load_row(t_row, cols, C, t_cache, SINGLE_BLOCK, False, ACC)
                if STANDARDIZE:
                    t_raw = _standardized(t_raw, mean_t, inv_t)
                live = t_raw != NEG_INF
                t_sum += tl.sum(tl.where(live, t_raw, 0.0), 0)
                t_cnt += tl.sum(live.to(ACC), 0)
                cand = tl.where(cols < C, cols, BIG_IDX)
                tk_key, tk_idx, tk_a, tk_b = topk_merge(tk_key, tk_idx, tk_a, tk_b, t_raw, cand, t_raw, t_raw, K_PAD)
            real = (tk_idx >= 0) & (tk_idx != BIG_IDX)
            top_live = real & (tk_key != NEG_INF)
            top_sum = tl.sum(tl.where(top_live, tk_key, 0.0), 0)
            top_cnt = tl.sum(top_live.to(ACC), 0)
            gap = top_sum / tl.maximum(top_cnt, 1.0) - (t_sum - top_sum) / tl.maximum(t_cnt - top_cnt, 1.0)
            tsm_add = tsm_shift * gap
            rank = ranks(tk_key, tk_idx) - (K_PAD - TSM_K)
            tsm_mult = tl.where(real, 1.0 + tsm_scale * (TSM_K - rank) / TSM_K, 1.0).to(ACC)
            tsm_idx = tl.where(real, tk_idx, BIG_IDX)
            if HAS_LABELS:
                y_in_top = tl.sum((tsm_idx == y).to(tl.int32), 0) > 0
                tsm_y = tl.where(y_in_top, -1, y)

        # ---- P3: LSEs, maxima, target logits, top-k lists -------------------------------------
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
        x_max = zero + NEG_INF
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
            zs = s / T
            zt = t / T
            if USE_DEC:
                # non-target LSEs only; the full ones follow exactly as logaddexp(LSE_{≠y}, z_y)
                is_y = cols == y
                m_snt, d_snt = lse_update(m_snt, d_snt, tl.where(is_y, NEG_INF, zs))
                m_tnt, d_tnt = lse_update(m_tnt, d_tnt, tl.where(is_y, NEG_INF, zt))
            else:
                m_s, d_s = lse_update(m_s, d_s, zs)
                m_t, d_t = lse_update(m_t, d_t, zt)
            if USE_CE:
                m_raw, d_raw = lse_update(m_raw, d_raw, s_raw)
            if USE_DTKD:
                b_max = tl.max(s, 0)
                b_arg = tl.min(tl.where(s == b_max, cols, BIG_IDX), 0)
                v_arg = tl.where(b_max > v_max, b_arg, v_arg)
                v_max = tl.maximum(v_max, b_max)
                x_max = tl.maximum(x_max, tl.max(t, 0))
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
            lse_snt = lse_final(m_snt, d_snt)
            lse_tnt = lse_final(m_tnt, d_tnt)
            lse_s = logaddexp(lse_snt, s_y / T)
            lse_t = logaddexp(lse_tnt, t_y / T)
        else:
            lse_s = lse_final(m_s, d_s)
            lse_t = lse_final(m_t, d_t)
        loss_row = zero  # the row-scalar parts of the loss (CE, TCKD, L_local, TDL)

        # DKD / AEKT row scalars
        q_y = zero
        p_y = zero
        alpha_n = zero
        if USE_DEC:
            log_qy = s_y / T - lse_s
            log_py = t_y / T - lse_t
            log_1mqy = lse_snt - lse_s
            log_1mpy = lse_tnt - lse_t
            q_y = tl.exp(log_qy)
            p_y = tl.exp(log_py)
            p_n = tl.exp(log_1mpy)
            tckd = tl.where(p_y > 0, p_y * (log_py - log_qy), 0.0) + tl.where(p_n > 0, p_n * (log_1mpy - log_1mqy), 0.0)
            alpha_n = tckd_w + zero
            if ADAPTIVE:
                alpha_n = tckd_w * tl.minimum(tl.exp(log_py - log_qy), max_w)
            loss_row += T * T * alpha_n * tckd
        lse_raw = zero
        if USE_CE:
            lse_raw = lse_final(m_raw, d_raw)
            loss_row += ce_w * (lse_raw - s_raw_y)

        # DTKD row temperatures
        T_s = T
        T_t = T
        dtkd_ok = False
        if USE_DTKD:
            dtkd_ok = (x_max + v_max) > 0
            den = tl.where(dtkd_ok, x_max + v_max, 1.0)
            T_s = tl.where(dtkd_ok, 2.0 * v_max * T / den, T)
            T_t = tl.where(dtkd_ok, 2.0 * x_max * T / den, T)

        # LDRLD: pair terms and set term from the top-k list (registers only)
        rel_g = tl.zeros([K_PAD], ACC)
        if USE_REL:
            rel_real = (rel_idx >= 0) & (rel_idx != BIG_IDX)
            r = ranks(rel_key, rel_idx) - (K_PAD - REL_K)
            vs = rel_s / T
            vt = rel_t / T
            pair = rel_real[:, None] & rel_real[None, :] & (r[:, None] < r[None, :])
            rf = r.to(ACC)
            w = rel_delta * tl.exp(-rel_lambda * (rf[:, None] + rf[None, :] + 2.0)) / (tl.abs(rf[:, None] - rf[None, :]) + rel_eps)
            w = tl.where(pair, w, 0.0)
            d_sp = vs[:, None] - vs[None, :]
            d_tp = vt[:, None] - vt[None, :]
            pair_loss = tl.sum(tl.sum(tl.where(pair, w * bernoulli_kl(d_tp, d_sp), 0.0), 1), 0)
            sig_s = 1.0 / (1.0 + tl.exp(-d_sp))
            sig_t = 1.0 / (1.0 + tl.exp(-d_tp))
            D = tl.where(pair, w * (sig_s - sig_t), 0.0)
            g_pair = tl.sum(D, 1) - tl.sum(D, 0)
            vs_m = tl.where(rel_real, vs, NEG_INF)
            vt_m = tl.where(rel_real, vt, NEG_INF)
            lq_i = vs_m - (tl.max(vs_m, 0) + tl.log(tl.sum(tl.exp(vs_m - tl.max(vs_m, 0)), 0)))
            lp_i = vt_m - (tl.max(vt_m, 0) + tl.log(tl.sum(tl.exp(vt_m - tl.max(vt_m, 0)), 0)))
            p_i = tl.where(rel_real, tl.exp(lp_i), 0.0)
            q_i = tl.where(rel_real, tl.exp(lq_i), 0.0)
            set_kl = tl.sum(tl.where(p_i > 0, p_i * (lp_i - lq_i), 0.0), 0)
            norm = REL_K * (REL_K - 1) / 2 + 1.0
            loss_row += local_w * T * T * (pair_loss + set_kl) / norm
            rel_g = tl.where(rel_real, local_w * T * (g_pair + q_i - p_i) / norm, 0.0)
            rel_idx = tl.where(rel_real, rel_idx, BIG_IDX)

        # TDL: Pos group from its list; Neg = the k smallest of the non-Pos among the 2k smallest
        c1_pos = zero
        c2_pos = zero
        c1_neg = zero
        c2_neg = zero
        if USE_TDL:
            pos_real = (pos_idx >= 0) & (pos_idx != BIG_IDX)
            pos_idx = tl.where(pos_real, pos_idx, BIG_IDX)
            dot, nu, nv = _cos_group(pos_s, pos_t, pos_real)
            l_pos, c1_pos, c2_pos = _cos_coeffs(dot, nu, nv, tdl_w * tdl_pos)
            neg_real = (neg_idx >= 0) & (neg_idx != BIG_IDX)
            neg_in_pos = tl.sum((neg_idx[:, None] == pos_idx[None, :]).to(tl.int32), 1) > 0
            cand_neg = neg_real & (~neg_in_pos)
            beats = (neg_key[None, :] > neg_key[:, None]) | ((neg_key[None, :] == neg_key[:, None]) & (neg_idx[None, :] < neg_idx[:, None]))
            n_rank = tl.sum((beats & cand_neg[None, :]).to(tl.int32), 1)
            neg_sel = cand_neg & (n_rank < TDL_K)
            neg_idx = tl.where(neg_sel, neg_idx, BIG_IDX)
            dot, nu, nv = _cos_group(neg_s, neg_t, neg_sel)
            l_neg, c1_neg, c2_neg = _cos_coeffs(dot, nu, nv, tdl_w * tdl_neg)
            loss_row += l_pos + l_neg

        # ---- P4: complement LSEs (LDRLD), Non-group sums (TDL), LSEs at T_s/T_t (DTKD) ----------
        lse_sR = zero
        lse_tR = zero
        lse_sd = zero
        lse_td = zero
        c1_non = zero
        c2_non = zero
        if USE_REL or USE_TDL or USE_DTKD:
            m_sR, d_sR = lse_init(zero)
            m_tR, d_tR = lse_init(zero)
            m_sd, d_sd = lse_init(zero)
            m_td, d_td = lse_init(zero)
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
                    m_sR, d_sR = lse_update(m_sR, d_sR, tl.where(in_I, NEG_INF, s / T))
                    m_tR, d_tR = lse_update(m_tR, d_tR, tl.where(in_I, NEG_INF, t / T))
                if USE_TDL:
                    grouped = (_lookup(cols, pos_idx, pos_idx, BIG_IDX, K_PAD) != BIG_IDX) | \
                              (_lookup(cols, neg_idx, neg_idx, BIG_IDX, NEG_PAD) != BIG_IDX)
                    dot_b, nu_b, nv_b = _cos_group(s, t, (cols < C) & (~grouped))
                    dot_n += dot_b
                    nu_n += nu_b
                    nv_n += nv_b
                if USE_DTKD:
                    m_sd, d_sd = lse_update(m_sd, d_sd, _div_keep_masked(s, T_s))
                    m_td, d_td = lse_update(m_td, d_td, _div_keep_masked(t, T_t))
            if USE_REL:
                lse_sR = lse_final(m_sR, d_sR)
                lse_tR = lse_final(m_tR, d_tR)
            if USE_TDL:
                l_non, c1_non, c2_non = _cos_coeffs(dot_n, nu_n, nv_n, tdl_w * tdl_non)
                loss_row += l_non
            if USE_DTKD:
                lse_sd = lse_final(m_sd, d_sd)
                lse_td = lse_final(m_td, d_td)

        # ---- P5: loss and the row sums the gradient needs ------------------------------------
        s_hi = lse_s * T  # shifts that keep the temperature-derivative sums well conditioned
        t_hi = lse_t * T
        loss_el = zero
        sum_g = zero
        sum_gz = zero
        kl_kd = zero
        a1 = zero
        a2 = zero
        a3 = zero
        kl_d = zero
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
                    zs = s / T
                    zt = t / T
                    g = tl.zeros([BLOCK_C], ACC)
                    l_vec = tl.zeros([BLOCK_C], ACC)
                    if USE_KD or WANT_DTEMP:
                        lq = zs - lse_s
                        lp = zt - lse_t
                        q = tl.exp(lq)
                        pr = tl.exp(lp)
                        kl = tl.where(pr > 0, pr * (lp - lq), 0.0)
                        l_vec += kd_w * T * T * kl
                        g += kd_w * T * (q - pr)
                        if WANT_DTEMP and p == 0:
                            kl_kd += tl.sum(kl, 0)
                            a1 += tl.sum(tl.where((q > 0) | (pr > 0), (q - pr) * (s - s_hi), 0.0), 0)
                            a2 += tl.sum(tl.where(pr > 0, (t - t_hi) * pr * (lp - lq), 0.0), 0)
                            a3 += tl.sum(tl.where(pr > 0, (t - t_hi) * pr, 0.0), 0)
                    if USE_DEC:
                        is_y = cols == y
                        lq_h = zs - lse_snt
                        lp_h = zt - lse_tnt
                        q_h = tl.where(is_y, 0.0, tl.exp(lq_h))
                        p_h = tl.where(is_y, 0.0, tl.exp(lp_h))
                        l_vec += nckd_w * T * T * tl.where(p_h > 0, p_h * (lp_h - lq_h), 0.0)
                        g += tl.where(is_y, T * alpha_n * (q_y - p_y),
                                      T * (alpha_n * (p_y - q_y) * q_h + nckd_w * (q_h - p_h)))
                    if USE_DTKD:
                        lq_d = _div_keep_masked(s, T_s) - lse_sd
                        lp_d = _div_keep_masked(t, T_t) - lse_td
                        q_d = tl.exp(lq_d)
                        p_d = tl.exp(lp_d)
                        kl_dv = tl.where(p_d > 0, p_d * (lp_d - lq_d), 0.0)
                        l_vec += dtkd_w * T_t * T_s * kl_dv
                        g += dtkd_w * T_t * (q_d - p_d)
                        if p == 0:
                            kl_d += tl.sum(kl_dv, 0)
                            b1 += tl.sum(tl.where((q_d > 0) | (p_d > 0), (p_d - q_d) * (s - s_hi), 0.0), 0)
                            b2 += tl.sum(tl.where(p_d > 0, (t - t_hi) * p_d * (lp_d - lq_d), 0.0), 0)
                            b3 += tl.sum(tl.where(p_d > 0, (t - t_hi) * p_d, 0.0), 0)
                        else:
                            g = tl.where(cols == v_arg, g + extra, g)
                    if USE_REL:
                        g_I = _lookup(cols, rel_idx, rel_g, NEG_INF, REL_K)
                        in_I = g_I != NEG_INF
                        lq_r = zs - lse_sR
                        lp_r = zt - lse_tR
                        q_r = tl.where(in_I, 0.0, tl.exp(lq_r))
                        p_r = tl.where(in_I, 0.0, tl.exp(lp_r))
                        l_vec += rest_w * T * T * tl.where(p_r > 0, p_r * (lp_r - lq_r), 0.0)
                        g += tl.where(in_I, g_I, rest_w * T * (q_r - p_r))
                    if USE_TDL:
                        live = (cols < C) & (tl.abs(s) < float("inf")) & (tl.abs(t) < float("inf"))
                        in_pos = _lookup(cols, pos_idx, pos_idx, BIG_IDX, K_PAD) != BIG_IDX
                        in_neg = _lookup(cols, neg_idx, neg_idx, BIG_IDX, NEG_PAD) != BIG_IDX
                        c1 = tl.where(in_pos, c1_pos, tl.where(in_neg, c1_neg, c1_non))
                        c2 = tl.where(in_pos, c2_pos, tl.where(in_neg, c2_neg, c2_non))
                        g += tl.where(live, c2 * s - c1 * t, 0.0)
                    if p == 0 or not NEED_SUMS:
                        loss_el += tl.sum(l_vec, 0)
                    live_s = s_raw != NEG_INF
                    if p == 0 and STANDARDIZE:
                        sum_g += tl.sum(tl.where(live_s, g, 0.0), 0)
                        sum_gz += tl.sum(tl.where(live_s, g * s, 0.0), 0)
                    if p == 1:
                        if STANDARDIZE:
                            g = tl.where(live_s, (g - g_bar) * inv_s - gz_coef * s, 0.0)
                        if USE_CE:
                            g += ce_w * (tl.exp(s_raw - lse_raw) - tl.where(cols == y, 1.0, 0.0))
                        g = g * row_scale
                        if HAS_LABELS:
                            g = tl.where(bad, float("nan"), g)
                        if WRITE_GRAD:
                            tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < C)

        loss = loss_el + loss_row
        if HAS_LABELS:
            loss = tl.where(bad, float("nan"), loss)
        tl.store(loss_ptr + row, loss)
        if WANT_DTEMP:
            dtemp = kd_w * (2.0 * T * kl_kd - (a1 + a2 - kl_kd * a3))
            if HAS_LABELS:
                dtemp = tl.where(bad, float("nan"), dtemp)
            tl.store(dtemp_ptr + row, dtemp)


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
                 gscale_is_tensor: bool, write_grad: bool, dtype: torch.dtype, C: int, vec: int = 1) -> dict:
    """The ``tl.constexpr`` switches of a packed spec (``p``: field → value of ``LogitDistill.pack``):
    a preset pays only for the features it uses."""
    tsm_k = p["tsm_k"] if p["use_tsm"] else 1
    rel_k = p["rel_k"] if p["use_relation"] else 1
    tdl_k = p["tdl_k"] if p["use_tdl"] else 1
    block, single, _ = block_config(C)
    standardize, use_dtkd = bool(p["standardize"]), p["dtkd_weight"] != 0
    return dict(
        HAS_LABELS=has_labels, TEMP_IS_TENSOR=temp_is_tensor, GSCALE_IS_TENSOR=gscale_is_tensor,
        WRITE_GRAD=write_grad, WANT_DTEMP=learnable,
        USE_KD=p["kd_weight"] != 0, USE_CE=p["ce_weight"] != 0, STANDARDIZE=standardize,
        USE_TSM=bool(p["use_tsm"]), TSM_K=tsm_k,
        USE_DEC=bool(p["use_decoupled"]), ADAPTIVE=bool(p["use_decoupled"] and p["adaptive_tckd"]),
        USE_DTKD=use_dtkd, USE_REL=bool(p["use_relation"]), REL_K=rel_k,
        RANK_BY_TEACHER=bool(p["use_relation"] and p["rank_by_teacher"]), USE_TDL=bool(p["use_tdl"]),
        TDL_K=tdl_k, K_PAD=_next_pow2(max(tsm_k, rel_k, tdl_k, 2)), NEG_PAD=_next_pow2(max(2 * tdl_k, 2)),
        NEED_SUMS=(write_grad and (standardize or use_dtkd)) or learnable,
        BLOCK_C=block, SINGLE_BLOCK=single,
        ACC=tl.float64 if dtype == torch.float64 else tl.float32, VEC=vec,
    )


def unpack(floats, ints) -> dict:
    return dict(zip(FLOAT_FIELDS, floats)) | dict(zip(INT_FIELDS, ints))


def _wrap(kernel):
    """``torch.library.wrap_triton`` where the installed torch has it (so torch.compile sees the
    launch), else the plain kernel."""
    wrap = getattr(torch.library, "wrap_triton", None)
    return wrap(kernel) if wrap is not None else kernel


def logit_distill_fwd(s: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor],
                      temperature: Optional[torch.Tensor], grad: Optional[torch.Tensor],
                      grad_scale: Optional[torch.Tensor], grad_scale_value: float, floats: List[float],
                      ints: List[int], learnable: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """One launch of the engine over all rows: per-row losses and ∂ℓ_n/∂T_n (empty unless
    ``learnable``); writes ``grad`` when given. ``grad_scale`` (tensor) or ``grad_scale_value``."""
    N, C = s.shape
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    loss_rows = torch.empty(N, dtype=acc, device=s.device)
    dtemp = torch.empty(N if learnable else 0, dtype=acc, device=s.device)
    p = unpack(floats, ints)
    flags = kernel_flags(p, learnable=learnable, has_labels=labels is not None,
                         temp_is_tensor=temperature is not None, gscale_is_tensor=grad_scale is not None,
                         write_grad=grad is not None, dtype=s.dtype, C=C,
                         vec=vector_width(C, s.stride(0), t.stride(0), grad.stride(0) if grad is not None else 0))
    if N == 0:
        return loss_rows, dtemp
    _wrap(_logit_distill_kernel)[(N,)](
        s, t, labels if labels is not None else loss_rows,
        temperature if temperature is not None else loss_rows,
        grad_scale if grad_scale is not None else loss_rows,
        grad if grad is not None else loss_rows, loss_rows, dtemp if learnable else loss_rows,
        C, s.stride(0), t.stride(0), grad.stride(0) if grad is not None else 0,
        temperature.stride(0) if temperature is not None else 0,
        grad_scale.stride(0) if grad_scale is not None else 0, int(p["ignore_index"]),
        p["temperature"], grad_scale_value, p["kd_weight"], p["ce_weight"], p["tckd_weight"],
        p["nckd_weight"], p["max_weight"], p["dtkd_weight"], p["local_weight"], p["rest_weight"],
        p["rel_eps"], p["rel_delta"], p["rel_lambda"], p["tdl_weight"], p["tdl_pos"], p["tdl_neg"],
        p["tdl_non"], p["tsm_scale"], p["tsm_shift"], p["tsm_gt_scale"],
        num_warps=block_config(C)[2], **flags,
    )
    return loss_rows, dtemp


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
if hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton") and not interpreting():
    logit_distill_fwd = torch.library.triton_op("kdkernels::triton_logit_distill", logit_distill_fwd,
                                                mutates_args={"grad"})
    scale_rows_ = torch.library.triton_op("kdkernels::triton_scale_rows_", scale_rows_, mutates_args={"grad"})
else:
    _wrap = lambda kernel: kernel  # noqa: E731 - plain launches inside an opaque op
    logit_distill_fwd = torch.library.custom_op("kdkernels::triton_logit_distill", logit_distill_fwd,
                                                mutates_args={"grad"})
    scale_rows_ = torch.library.custom_op("kdkernels::triton_scale_rows_", scale_rows_, mutates_args={"grad"})

    @logit_distill_fwd.register_fake
    def _(s, t, labels, temperature, grad, grad_scale, grad_scale_value, floats, ints, learnable):
        acc = torch.float64 if s.dtype == torch.float64 else torch.float32
        N = s.shape[0]
        return s.new_empty((N,), dtype=acc), s.new_empty((N if learnable else 0,), dtype=acc)

    @scale_rows_.register_fake
    def _(grad, factor):
        return None


class TritonLauncher:
    """The launcher contract of :mod:`kdkernels.engine` for Triton."""

    name = "triton"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            return None if interpreting() else "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
        return f"Triton does not run on {device.type} tensors"

    def forward(self, s, t, labels, temperature, spec, grad, grad_scale):
        floats, ints = spec.pack()
        tensor_scale = isinstance(grad_scale, torch.Tensor)
        loss_rows, dtemp = logit_distill_fwd(
            s, t, labels, temperature, grad, grad_scale if tensor_scale else None,
            1.0 if tensor_scale else float(grad_scale), floats, ints, spec.learnable_temperature)
        return loss_rows, (dtemp if spec.learnable_temperature else None)

    def scale_(self, grad, factor):
        scale_rows_(grad, factor)


launcher = TritonLauncher()
