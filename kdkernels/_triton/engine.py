"""The fused logit-distillation engine in Triton: one program per row, any ``LogitDistill`` preset.

Math (docs/README.md; ``s̃``/``t̃`` are the logits after the optional standardisation ``Z`` and TopKScale,
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

The LLM family (docs/divergences.md, docs/topk_teachers.md), each behind its own ``tl.constexpr``:

    softcap   x ← c·tanh(x/c) on the raw s (softcap_s) and t (softcap_t) at load time, before everything
              else (CE sees the capped student); the gradient is multiplied by 1 − (x_capped/c)²
    D         the KD term is kd_w·T²·D(p‖q) for any divergence (divergence.py: per-outcome d_c and
              qg_c = q_c·∂D/∂q_c); gradient kd_w·T·(qg_c − q_c·Σ_j qg_j), Σqg from P5 (forward KL: −1)
    top-k     a dense teacher masked to its k largest logits S (ties to the lower column):
              renorm  D(softmax_S(t̃/T) ‖ softmax_S(s̃/T)), gradient on S only
              tail    D over S ∪ {tail}, log q_tail = LSE_∉S − LSE (masked LSEs, P3), gradient on c ∉ S
                      kd_w·T·(q_c/q_tail·qg_tail − q_c·Σqg)
              teacher Σ_S p̂·(log p̂ − log q), gradient kd_w·T·(q − p̂)
              membership of S is one compare against S's worst slot (the Bound), whatever k

Passes over a row (each only when its ``tl.constexpr`` flag needs it; a row of ≤ ``BLOCK_C`` columns is
read from memory once and kept in registers, longer rows stream in ``BLOCK_C`` blocks). The kernel is a
short driver (``_logit_distill_kernel`` → ``_distill_row``) over one ``@triton.jit`` helper per pass,
each documenting what it reads and which row records (tuples, see "row records" below) it produces:

    P1 _pass_moments       moments of s and t (standardize)
    P2 _pass_teacher_topk  teacher top-k + means (TopKScale)           → the Transform record
    P2' _pass_support      the dense top-k teacher's support S (tail; renorm/teacher merge S in P3)
    P3 _pass_row_stats     RowStats at T, merged block by block with merge_row_stats: LSE states (the
                           non-target ones for DKD/AEKT, the full ones by merging in the target; raw
                           logits for CE), the student's argmax (DTKD); top-k lists (LDRLD ranking, TDL)
       row scalars         _decoupled_row, _dtkd_temperatures, _relation_terms, _tdl_groups, _support_terms
    P4 _pass_restricted    LSE states of LDRLD's complement and at DTKD's T_s/T_t, TDL's Non sums
    P5 _pass_sums          loss and the row sums the gradient needs (standardize, DTKD's argmax column,
                           learnable T, a divergence's Σqg)
    P6 _pass_gradient      gradient write (loss too when P5 did not run); per column, P5 and P6 share
                           _column_terms

Exponentials. The hot loops take exp(y/T) as 2^(y·log2(e)/T) (row_ops.exp_scaled: the scalar
log2(e)/T hoists, leaving one multiply and one MUFU.EX2 per element; float64 keeps tl.exp).

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
import threading
import functools
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..dispatch import interpreting
from ..spec import FLOAT_FIELDS, INT_FIELDS, NORMALIZATION_CODES, REDUCTION_CODES, TOPK_MODES, SparseTeacher
from .divergence import FORWARD_KL, divergence_terms
from .row_ops import (BIG_IDX, LN2, LOG2E, bernoulli_kl, log_prob, lse_init, lse_merge, lse_norm, lse_update,
                      moments_update, pick, ranks, softcap, topk_init, topk_merge)

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
P_DIV_PARAM = tl.constexpr(_FLOAT_INDEX["div_param"])
P_SOFTCAP_S = tl.constexpr(_FLOAT_INDEX["softcap_s"])
P_SOFTCAP_T = tl.constexpr(_FLOAT_INDEX["softcap_t"])
#: ``topk_mode`` / ``topk_norm`` codes (kdkernels.spec TOPK_MODES, NORMALIZATIONS)
TOPK_DENSE = tl.constexpr(TOPK_MODES["dense"])
NORM_RENORM = tl.constexpr(NORMALIZATION_CODES["renorm"])
NORM_TAIL = tl.constexpr(NORMALIZATION_CODES["tail"])
NORM_TEACHER = tl.constexpr(NORMALIZATION_CODES["teacher"])


# ---- row records ----------------------------------------------------------------------------------
# Per-row state travels between the passes as small tuples (Triton passes and returns them like scalars):
#   RowRef     (s_row, t_row, C, s_cache, t_cache, cap_s, cap_t)   where the row is; the caches hold a
#              single-block row (already softcapped); cap_s/cap_t: the softcaps (used under SOFTCAP_S/_T)
#   Transform  (mean_s, inv_s, mean_t, inv_t, tsm_idx, tsm_mult, tsm_add, tsm_y, tsm_y_mult)
#              standardisation Z (identity when off) and TopKScale (no column hit when off)
#   LSE state  (m, d) of row_ops, in the logits' units; finished as (m, log d) by lse_norm
#   RowStats   (lse_s, lse_t, lse_snt, lse_tnt, lse_raw, v_max, v_arg)   P3's statistics at T: full and
#              non-target LSE states of s̃/t̃, the raw-logit state (CE, inv_t = 1), the student's
#              maximum and its first column (DTKD); merged by merge_row_stats — per column block here,
#              and the same merge serves row splits and vocabulary shards
#   Lists      (key, idx, s, t) top-k lists of row_ops (LDRLD ranking, TDL Pos and Neg candidates, the
#              dense top-k teacher's support S)
#   Bound      (w_key, w_idx) the worst member of a top-k set held by a List (_list_bound): column c is in
#              the set iff key_c > w_key or (key_c == w_key and c ≤ w_idx) (_within) — the set is the k best
#              in (key desc, column asc). S (key t̃), LDRLD's I (s̃ or t̃), TDL's Pos (t̃) and Neg (the low
#              key, among the columns outside Pos) are tested per column this way: one compare, whatever k
#   LLM        (div_param, Σqg, w_key, w_idx, norm_p, norm_q, norm_sc, kd_w·T·qg_tail, kd_w·T·Σqg, kd_ok)
#              the divergence / dense top-k teacher terms of the KD gradient: the Bound of S, the finished
#              states whose log_prob gives S's outcome log-probabilities (teacher, student: renormalised
#              over S, or full), the complement state of s̃ (tail)



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
    DIVERGENCE: tl.constexpr, SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr, TOPK_MODE: tl.constexpr,
    TOPK_K: tl.constexpr, TOPK_NORM: tl.constexpr,
):
    """One program per row: the driver over the passes P1–P6, then the batch reduction."""
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
    zero = tl.full([], 0.0, ACC)
    loss_w = tl.load(params_ptr + P_LOSS_WEIGHT)

    # every per-row load is issued up front (one dependent memory trip per row); an ignored row's
    # logits are masked out of the loads, so it reads nothing
    y, ignored, bad = row_label(labels_ptr, row, C, ignore_index, HAS_LABELS)
    row_live = (offs < C) & (~ignored)
    T = row_temperature(temp_ptr, params_ptr, row, stride_temp, TEMP_IS_TENSOR, ACC)
    inv_T = 1.0 / T
    ref = row_ref(s_row, t_row, C, offs, row_live, params_ptr, zero, BLOCK_C, SINGLE_BLOCK, ACC, SOFTCAP_S,
                  SOFTCAP_T)

    HAVE_COUNT: tl.constexpr = REDUCTION == REDUCTION_BATCHMEAN and (WRITE_GRAD or WANT_DTEMP)
    count, row_scale, g_scale = row_scales(labels_ptr, gfactor_ptr, row, stride_gfactor, N, ignore_index, loss_w,
                                           HAS_LABELS, HAVE_COUNT, HAS_GFACTOR, BATCH_BLOCK, ACC)
    loss = zero
    dtemp = zero
    if ignored:
        if WRITE_GRAD:
            zero_row(g_row, C, offs, BLOCK_C, ACC)
    else:
        loss, dtemp = _distill_row(ref, offs, y, bad, T, inv_T, g_row, g_scale, row_scale, params_ptr, zero,
                                   HAS_LABELS, WRITE_GRAD, WANT_DTEMP, USE_KD, USE_CE, STANDARDIZE, USE_TSM, TSM_K,
                                   USE_DEC, ADAPTIVE, USE_DTKD, USE_REL, REL_K, RANK_BY_TEACHER, USE_TDL, TDL_K,
                                   K_PAD, NEG_PAD, NEED_SUMS, BLOCK_C, SINGLE_BLOCK, ACC, DIVERGENCE, SOFTCAP_S,
                                   SOFTCAP_T, TOPK_MODE, TOPK_K, TOPK_NORM)

    if WANT_DTEMP:
        tl.store(dtemp_ptr + row, dtemp)
    _reduce_batch(row, loss, row_loss_ptr, loss_ptr, ticket_ptr, labels_ptr, N, ignore_index, count,
                  HAS_LABELS, HAVE_COUNT, REDUCTION, BATCH_BLOCK)


@triton.jit
def row_ref(s_row, t_row, C, offs, row_live, params_ptr, zero, BLOCK_C: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
            ACC: tl.constexpr, SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr):
    """The RowRef of one row (see "row records"): where it is, its softcaps, and for a single-block row
    the row itself in registers (softcapped; lanes outside ``row_live`` −inf) — its only read of s and t."""
    cap_s = zero
    cap_t = zero
    if SOFTCAP_S:
        cap_s = tl.load(params_ptr + P_SOFTCAP_S)
    if SOFTCAP_T:
        cap_t = tl.load(params_ptr + P_SOFTCAP_T)
    if SINGLE_BLOCK:
        s_cache = tl.load(s_row + offs, mask=row_live, other=-float("inf")).to(ACC)
        t_cache = tl.load(t_row + offs, mask=row_live, other=-float("inf")).to(ACC)
        if SOFTCAP_S:
            s_cache = softcap(s_cache, cap_s)
        if SOFTCAP_T:
            t_cache = softcap(t_cache, cap_t)
    else:
        s_cache = tl.zeros([BLOCK_C], ACC)
        t_cache = tl.zeros([BLOCK_C], ACC)
    return (s_row, t_row, C, s_cache, t_cache, cap_s, cap_t)


@triton.jit
def row_status(lse_s, lse_t, bad):
    """(row_nan, row_ok) from the row's full LSE states of s̃ and t̃: NaN or +inf anywhere makes d NaN, so
    the row's loss and gradient are NaN (as for a bad label); a row with no finite student or teacher logit
    (m = −inf) is empty: loss and gradient 0."""
    row_nan = bad | (lse_s[1] != lse_s[1]) | (lse_t[1] != lse_t[1])
    row_ok = (~row_nan) & (lse_s[0] != -float("inf")) & (lse_t[0] != -float("inf"))
    return row_nan, row_ok


@triton.jit
def row_label(labels_ptr, row, C, ignore_index, HAS_LABELS: tl.constexpr):
    """(y, ignored, bad) of one row: its label (0 where it is out of range, so it is never read out of
    bounds), whether it is ``ignore_index``, and whether it is a bad label (its row becomes NaN)."""
    if HAS_LABELS:
        y = tl.load(labels_ptr + row)
        ignored = y == ignore_index
        bad = (y < 0) | (y >= C)
        y = tl.where(bad, 0, y).to(tl.int32)
    else:
        y = 0
        ignored = False
        bad = False
    return y, ignored, bad


@triton.jit
def row_temperature(temp_ptr, params_ptr, row, stride_temp, TEMP_IS_TENSOR: tl.constexpr, ACC: tl.constexpr):
    """The row's temperature: the per-row tensor's entry, or the packed float."""
    if TEMP_IS_TENSOR:
        T = tl.load(temp_ptr + row * stride_temp).to(ACC)
    else:
        T = tl.load(params_ptr + P_TEMPERATURE)
    return T


@triton.jit
def row_scales(labels_ptr, gfactor_ptr, row, stride_gfactor, N, ignore_index, loss_w, HAS_LABELS: tl.constexpr,
               HAVE_COUNT: tl.constexpr, HAS_GFACTOR: tl.constexpr, BATCH_BLOCK: tl.constexpr, ACC: tl.constexpr):
    """(count, row_scale, g_scale): the batchmean divisor (N when not counted), the row's share of the
    returned loss (loss_weight, ÷ count for batchmean) and of the gradient (× grad_factor[row])."""
    count = N
    row_scale = loss_w
    if HAVE_COUNT:
        count = _count_valid_rows(labels_ptr, N, ignore_index, HAS_LABELS, BATCH_BLOCK)
        row_scale = loss_w / tl.maximum(count, 1).to(ACC)
    g_scale = row_scale
    if HAS_GFACTOR:
        g_scale = row_scale * tl.load(gfactor_ptr + row * stride_gfactor).to(ACC)
    return count, row_scale, g_scale


@triton.jit
def zero_row(g_row, C, offs, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """Write an ignored row's gradient: exactly 0 on every column."""
    for start in range(0, C, BLOCK_C):
        cols = start + offs
        tl.store(g_row + cols, tl.zeros([BLOCK_C], ACC).to(g_row.dtype.element_ty), mask=cols < C)


@triton.jit
def _distill_row(ref, offs, y, bad, T, inv_T, g_row, g_scale, row_scale, params_ptr, zero,
                 HAS_LABELS: tl.constexpr, WRITE_GRAD: tl.constexpr, WANT_DTEMP: tl.constexpr, USE_KD: tl.constexpr,
                 USE_CE: tl.constexpr, STANDARDIZE: tl.constexpr, USE_TSM: tl.constexpr, TSM_K: tl.constexpr,
                 USE_DEC: tl.constexpr, ADAPTIVE: tl.constexpr, USE_DTKD: tl.constexpr, USE_REL: tl.constexpr,
                 REL_K: tl.constexpr, RANK_BY_TEACHER: tl.constexpr, USE_TDL: tl.constexpr, TDL_K: tl.constexpr,
                 K_PAD: tl.constexpr, NEG_PAD: tl.constexpr, NEED_SUMS: tl.constexpr, BLOCK_C: tl.constexpr,
                 SINGLE_BLOCK: tl.constexpr, ACC: tl.constexpr, DIVERGENCE: tl.constexpr,
                 SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr, TOPK_MODE: tl.constexpr, TOPK_K: tl.constexpr,
                 TOPK_NORM: tl.constexpr):
    """A row that is not ignored: P1–P6 in order; writes the gradient (× ``g_scale``) and returns
    (row loss × loss_weight, ∂loss/∂T × ``row_scale``) — NaN for a NaN row, 0 for an empty one."""
    loss_w = tl.load(params_ptr + P_LOSS_WEIGHT)
    # P1, P2: the Transform (standardisation, TopKScale)
    xf, n_s, sigma_s = _row_transform(ref, offs, y, params_ptr, zero, HAS_LABELS, STANDARDIZE, USE_TSM, TSM_K,
                                      K_PAD, BLOCK_C, SINGLE_BLOCK, ACC, SOFTCAP_S, SOFTCAP_T)
    if SINGLE_BLOCK and (STANDARDIZE or USE_TSM):
        ref = _cache_transformed_teacher(ref, offs, xf, STANDARDIZE, USE_TSM, TSM_K)
    target = (zero, zero)
    s_raw_y = zero
    if USE_DEC or USE_CE:
        s_raw_y, target = _target_logits(ref, y, xf, STANDARDIZE, USE_TSM, TSM_K, ACC, SOFTCAP_S, SOFTCAP_T)
    # P2' (dense top-k teacher, tail): the support S first, so P3 can mask it out
    sup = topk_init(TOPK_K, K_PAD, ACC)
    if TOPK_MODE == TOPK_DENSE and TOPK_NORM == NORM_TAIL:
        sup = _pass_support(ref, offs, xf, TOPK_K, K_PAD, BLOCK_C, SINGLE_BLOCK, ACC, SOFTCAP_S, SOFTCAP_T)
    # P3: RowStats at T and the top-k lists
    stats, rel, pos, neg, sup, comp = _pass_row_stats(
        ref, offs, xf, y, target, inv_T, zero, sup, USE_DEC, USE_CE, USE_DTKD, USE_REL, REL_K, RANK_BY_TEACHER,
        USE_TDL, TDL_K, STANDARDIZE, USE_TSM, TSM_K, K_PAD, NEG_PAD, BLOCK_C, SINGLE_BLOCK, ACC, SOFTCAP_S,
        SOFTCAP_T, TOPK_MODE, TOPK_NORM)
    lse_s, lse_t, lse_snt, lse_tnt, lse_raw, v_max, v_arg = stats
    row_nan, row_ok = row_status(lse_s, lse_t, bad)
    norm_s = lse_norm(lse_s)
    norm_t = lse_norm(lse_t)
    norm_snt = lse_norm(lse_snt)
    norm_tnt = lse_norm(lse_tnt)

    # the row scalars: CE, DKD/AEKT, DTKD's temperatures, LDRLD's local term, TDL's Pos/Neg groups
    loss_row = zero
    if USE_CE:
        loss_row += tl.load(params_ptr + P_CE_WEIGHT) * -log_prob(s_raw_y, lse_norm(lse_raw), 1.0)
    dec = (zero, zero, zero)
    if USE_DEC:
        q_y, p_y, alpha_n, tckd = _decoupled_row(norm_s, norm_t, norm_snt, norm_tnt, target, inv_T,
                                                 tl.load(params_ptr + P_TCKD_WEIGHT), params_ptr, ADAPTIVE)
        dec = (q_y, p_y, alpha_n)
        loss_row += T * T * alpha_n * tckd
    x_max = lse_t[0]  # the teacher's maximum (transformed)
    T_s, T_t, dtkd_ok = _dtkd_temperatures(x_max, v_max, T)
    rel_g = tl.zeros([K_PAD], ACC)
    rel_idx = rel[1]
    if USE_REL:
        rel_loss, rel_g, rel_idx = _relation_terms(rel[0], rel[1], rel[2], rel[3], T, inv_T,
                                                   tl.load(params_ptr + P_LOCAL_WEIGHT), params_ptr, REL_K,
                                                   K_PAD, ACC)
        loss_row += T * T * rel_loss
        # pair differences Δ/T beyond the accumulation dtype (|logits| ~ 1e38 in float32) make the
        # pair terms inf/NaN: that row is NaN (never a wrong finite number or a spurious inf)
        rel_bad = row_ok & ((rel_loss != rel_loss) | (tl.abs(rel_loss) == float("inf")))
        row_nan = row_nan | rel_bad
        row_ok = row_ok & (~rel_bad)
    tdl_w = tl.load(params_ptr + P_TDL_WEIGHT)
    no_bound = (zero + float("inf"), tl.zeros([], tl.int32) - 1)  # no column within it
    pos_bound = no_bound
    neg_bound = no_bound
    c_groups = (zero, zero, zero, zero)
    if USE_TDL:
        pos_bound, neg_bound, tdl_loss, c_groups = _tdl_groups(pos, neg, tdl_w, params_ptr, TDL_K)
        loss_row += tdl_loss
    rel_bound = no_bound
    if USE_REL:
        rel_bound = _list_bound(rel[0], rel_idx, rel_idx != BIG_IDX)
    # I's gradient is written from its list when the list holds the raw student too (no Z, no softcap)
    REL_SCATTER: tl.constexpr = USE_REL and not STANDARDIZE and not SOFTCAP_S
    rel_list = (rel_idx, rel_g, rel_bound, rel[2], rel[3])

    # P4: complement states (LDRLD), states at T_s/T_t (DTKD), Non-group sums (TDL)
    inv_Ts = 1.0 / T_s
    inv_Tt = 1.0 / T_t
    lse_sR, lse_tR, lse_sd, lse_td, non = _pass_restricted(
        ref, offs, xf, inv_T, inv_Ts, inv_Tt, (rel_bound, pos_bound, neg_bound), zero, USE_REL,
        RANK_BY_TEACHER, USE_TDL, USE_DTKD, STANDARDIZE, USE_TSM, TSM_K, BLOCK_C, SINGLE_BLOCK, ACC, SOFTCAP_S,
        SOFTCAP_T)
    c1_non = zero
    c2_non = zero
    if USE_TDL:
        l_non, c1_non, c2_non = _cos_coeffs(non[0], non[1], non[2], tdl_w * tl.load(params_ptr + P_TDL_NON))
        loss_row += l_non

    # P5, P6: the row sums, the loss and the gradient
    norms = (norm_s, norm_t, norm_snt, norm_tnt, lse_norm(lse_sR), lse_norm(lse_tR), lse_norm(lse_sd),
             lse_norm(lse_td))
    temps = (T, inv_T, T_s, T_t, inv_Ts, inv_Tt)
    kd_w = tl.load(params_ptr + P_KD_WEIGHT)
    kd_sum, llm = _llm_terms(params_ptr, sup, comp, norm_s, norm_t, T, inv_T, kd_w, row_ok, v_arg, zero,
                             DIVERGENCE, TOPK_MODE, TOPK_NORM)
    kd_ok = llm[9]
    nckd_w = tl.load(params_ptr + P_NCKD_WEIGHT)
    dtkd_w = tl.load(params_ptr + P_DTKD_WEIGHT)
    rest_w = tl.load(params_ptr + P_REST_WEIGHT)
    weights = (kd_w, nckd_w, dtkd_w, rest_w)
    tdl = (pos_bound, neg_bound, c_groups[0], c_groups[1], c_groups[2], c_groups[3], c1_non, c2_non)
    # the temperature-derivative sums are shifted by the row maxima: Σ(q − p) = 0 and
    # Σ p·(log p − log q − KL) = 0 make any shift exact, and the maxima keep |x − shift| small
    shifts = (tl.where(lse_s[0] == -float("inf"), 0.0, lse_s[0]), tl.where(x_max == -float("inf"), 0.0, x_max))
    kl = (zero, zero, zero, zero)
    zg = (zero, zero)
    a = (zero, zero, zero)
    b = (zero, zero, zero)
    if NEED_SUMS:
        kl, zg, a, b, dsum = _pass_sums(ref, offs, xf, y, norms, temps, weights, dec, rel_list, tdl,
                                        shifts, llm, zero, USE_KD, WANT_DTEMP, USE_DEC, USE_DTKD, USE_REL, REL_K,
                                        USE_TDL, STANDARDIZE, USE_TSM, TSM_K, K_PAD, NEG_PAD, BLOCK_C,
                                        SINGLE_BLOCK, ACC, SOFTCAP_S, SOFTCAP_T, DIVERGENCE, TOPK_MODE, TOPK_NORM,
                                        REL_SCATTER, RANK_BY_TEACHER)
        if DIVERGENCE != FORWARD_KL and TOPK_MODE != TOPK_DENSE:
            # Σqg is now known: P5's g held only kd_w·T·qg, so Z's sums get the −kd_w·T·Σqg·q part here
            # (linear in q: Σ_live q and Σ_live q·s̃ came with P5)
            sum_qg, sum_q, sum_qs = dsum
            llm = (llm[0], sum_qg, llm[2], llm[3], llm[4], llm[5], llm[6], llm[7], llm[8], llm[9])
            if STANDARDIZE:
                zg = (zg[0] - kd_w * T * sum_qg * sum_q, zg[1] - kd_w * T * sum_qg * sum_qs)
    if WRITE_GRAD or not NEED_SUMS:
        extra = zero
        if USE_DTKD:
            extra = _dtkd_argmax_gradient(b, kl[2], x_max, v_max, T, T_s, T_t, dtkd_ok, dtkd_w)
        g_bar = zero
        gz_coef = zero
        if STANDARDIZE:
            g_bar = (zg[0] + extra) / tl.maximum(n_s, 1.0)
            sgz = zg[1]
            if USE_DTKD:
                sgz += extra * v_max  # the argmax column's extra gradient, z̃_m = v
            gz_coef = tl.where(sigma_s > 0, sgz / (tl.maximum(n_s - 1.0, 1.0) * tl.where(sigma_s > 0, sigma_s, 1.0)), 0.0)
        kl6 = _pass_gradient(ref, offs, xf, y, g_row, norms, temps, weights, dec, rel_list, tdl, shifts,
                             (g_bar, gz_coef, xf[1], v_arg, extra),
                             (tl.load(params_ptr + P_CE_WEIGHT), lse_norm(lse_raw)), (g_scale, row_ok, row_nan),
                             llm, zero, WRITE_GRAD, NEED_SUMS, USE_KD, WANT_DTEMP, USE_DEC, USE_CE, USE_DTKD,
                             USE_REL, REL_K, USE_TDL, STANDARDIZE, USE_TSM, TSM_K, K_PAD, NEG_PAD, BLOCK_C,
                             SINGLE_BLOCK, ACC, SOFTCAP_S, SOFTCAP_T, DIVERGENCE, TOPK_MODE, TOPK_NORM, REL_SCATTER,
                             RANK_BY_TEACHER)
        if not NEED_SUMS:
            kl = kl6
    if TOPK_MODE == TOPK_DENSE:
        # the KD term over the support came from registers (0 for a row empty on S)
        kl = (tl.where(kd_ok, kd_sum, 0.0), kl[1], kl[2], kl[3])

    # a KL that rounding made negative (fp32 at huge T) is clamped at 0; the gradient is unaffected
    dtemp = zero
    loss_el = T * T * (kd_w * _clamp_kl(kl[0]) + nckd_w * _clamp_kl(kl[1]) + rest_w * _clamp_kl(kl[3]))
    if USE_DTKD:
        loss_el += dtkd_w * T_t * T_s * _clamp_kl(kl[2])
    loss = tl.where(row_ok, (loss_el + loss_row) * loss_w, tl.where(row_nan, float("nan"), 0.0))
    if WANT_DTEMP:
        dtemp = kd_w * (2.0 * T * kl[0] - (a[0] + a[1] - kl[0] * a[2])) * row_scale
        dtemp = tl.where(row_ok, dtemp, tl.where(row_nan, float("nan"), 0.0))
    return loss, dtemp


@triton.jit
def _target_logits(ref, y, xf, STANDARDIZE: tl.constexpr, USE_TSM: tl.constexpr, TSM_K: tl.constexpr,
                   ACC: tl.constexpr, SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr):
    """(raw s_y, (s̃_y, t̃_y)): the target logits, two scalar loads, softcapped and transformed like the
    rest of their row."""
    s_raw_y = tl.load(ref[0] + y).to(ACC)
    t_raw_y = tl.load(ref[1] + y).to(ACC)
    if SOFTCAP_S:
        s_raw_y = softcap(s_raw_y, ref[5])
    if SOFTCAP_T:
        t_raw_y = softcap(t_raw_y, ref[6])
    return s_raw_y, _transform(s_raw_y, t_raw_y, y, xf, STANDARDIZE, USE_TSM, TSM_K)


@triton.jit
def _llm_terms(params_ptr, sup, comp, norm_s, norm_t, T, inv_T, kd_w, row_ok, v_arg, zero,
               DIVERGENCE: tl.constexpr, TOPK_MODE: tl.constexpr, TOPK_NORM: tl.constexpr):
    """(the dense top-k teacher's D from registers — 0 without one —, the LLM record) after P3; without a
    top-k teacher the record carries only the divergence parameter (Σqg follows from P5), and forward
    KL without top-k never reads it."""
    div_param = zero
    if DIVERGENCE != FORWARD_KL:
        div_param = tl.load(params_ptr + P_DIV_PARAM)
    kd_sum = zero
    llm = (div_param, zero, zero, v_arg, norm_s, norm_s, norm_s, zero, zero, row_ok)
    if TOPK_MODE == TOPK_DENSE:
        kd_sum, llm = _support_terms(sup, norm_s, norm_t, lse_norm(comp[0]), lse_norm(comp[1]), T, inv_T, kd_w,
                                     div_param, zero, DIVERGENCE, TOPK_NORM)
    return kd_sum, llm


@triton.jit
def _load_row(row_ptr, cols, C, cache, cap, SINGLE_BLOCK: tl.constexpr, LAST_USE: tl.constexpr, ACC: tl.constexpr,
              CAP: tl.constexpr):
    """A block of one row in the accumulation dtype, softcapped by ``cap`` when ``CAP`` (the single-block
    cache already is); columns ≥ C read as −inf (masked). Streamed rows are re-read by later passes: keep
    them in L2 (evict_last) until the last pass (evict_first)."""
    if SINGLE_BLOCK:
        x = cache
    else:
        if LAST_USE:
            x = tl.load(row_ptr + cols, mask=cols < C, other=-float("inf"), eviction_policy="evict_first").to(ACC)
        else:
            x = tl.load(row_ptr + cols, mask=cols < C, other=-float("inf"), eviction_policy="evict_last").to(ACC)
        if CAP:
            x = softcap(x, cap)
    return x


@triton.jit
def _standardized(x, mean, inv_std):
    return tl.where(x == -float("inf"), -float("inf"), (x - mean) * inv_std)


@triton.jit
def _transform(s_raw, t_raw, cols, xf, STANDARDIZE: tl.constexpr, USE_TSM: tl.constexpr, TSM_K: tl.constexpr):
    """(s̃, t̃): standardisation, then TopKScale on the teacher (``xf``: a Transform)."""
    mean_s, inv_s, mean_t, inv_t, tsm_idx, tsm_mult, tsm_add, tsm_y, tsm_y_mult = xf
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
def _load_block(ref, cols, xf, STANDARDIZE: tl.constexpr, USE_TSM: tl.constexpr, TSM_K: tl.constexpr,
                SINGLE_BLOCK: tl.constexpr, LAST_USE: tl.constexpr, ACC: tl.constexpr, SOFTCAP_S: tl.constexpr,
                SOFTCAP_T: tl.constexpr):
    """(raw student — softcapped —, s̃, t̃) of one block of the row (``ref``: a RowRef, ``xf``: a Transform)."""
    s_row, t_row, C, s_cache, t_cache, cap_s, cap_t = ref
    s_raw = _load_row(s_row, cols, C, s_cache, cap_s, SINGLE_BLOCK, LAST_USE, ACC, SOFTCAP_S)
    t_raw = _load_row(t_row, cols, C, t_cache, cap_t, SINGLE_BLOCK, LAST_USE, ACC, SOFTCAP_T)
    T_CACHED: tl.constexpr = SINGLE_BLOCK and (STANDARDIZE or USE_TSM)
    if T_CACHED:  # the cache holds t̃ already (_cache_transformed_teacher)
        s, t_again = _transform(s_raw, t_raw, cols, xf, STANDARDIZE, False, TSM_K)
        t = t_raw
    else:
        s, t = _transform(s_raw, t_raw, cols, xf, STANDARDIZE, USE_TSM, TSM_K)
    return s_raw, s, t


@triton.jit
def _cache_transformed_teacher(ref, offs, xf, STANDARDIZE: tl.constexpr, USE_TSM: tl.constexpr,
                               TSM_K: tl.constexpr):
    """A single-block row's RowRef with its teacher cache transformed once (t̃: Z, then TopKScale), which
    :func:`_load_block` then reads as is: the passes after P2 do not re-apply the Transform (TopKScale's
    k compares and selects per column) each."""
    s_row, t_row, C, s_cache, t_cache, cap_s, cap_t = ref
    s_unused, t_tilde = _transform(s_cache, t_cache, offs, xf, STANDARDIZE, USE_TSM, TSM_K)
    return s_row, t_row, C, s_cache, t_tilde, cap_s, cap_t


@triton.jit
def _pass_moments(ref, offs, zero, BLOCK_C: tl.constexpr, SINGLE_BLOCK: tl.constexpr, ACC: tl.constexpr,
                  SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr):
    """P1 (standardize). Reads the raw s and t. Produces (mean_s, 1/(σ_s + ε), σ_s, n_s, mean_t,
    1/(σ_t + ε)) over the finite entries; a constant row (max == min) gets σ = 0 and mean = its value
    exactly, so Z = 0 there."""
    s_row, t_row, C, s_cache, t_cache, cap_s, cap_t = ref
    n_s, mean_s, m2_s = zero, zero, zero
    n_t, mean_t, m2_t = zero, zero, zero
    lo_s, hi_s = zero + float("inf"), zero - float("inf")
    lo_t, hi_t = zero + float("inf"), zero - float("inf")
    for start in range(0, C, BLOCK_C):
        cols = start + offs
        s_raw = _load_row(s_row, cols, C, s_cache, cap_s, SINGLE_BLOCK, False, ACC, SOFTCAP_S)
        t_raw = _load_row(t_row, cols, C, t_cache, cap_t, SINGLE_BLOCK, False, ACC, SOFTCAP_T)
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
def _pass_teacher_topk(ref, offs, y, mean_t, inv_t, tsm_scale, tsm_shift, zero, HAS_LABELS: tl.constexpr,
                       STANDARDIZE: tl.constexpr, TSM_K: tl.constexpr, K_PAD: tl.constexpr,
                       BLOCK_C: tl.constexpr, SINGLE_BLOCK: tl.constexpr, ACC: tl.constexpr,
                       SOFTCAP_T: tl.constexpr):
    """P2 (TopKScale). Reads t (standardized with P1's moments when asked). Produces the teacher's
    top-k columns with their multipliers, the additive shift·gap, and the label column when it is
    outside the top-k (else -1)."""
    s_row, t_row, C, s_cache, t_cache, cap_s, cap_t = ref
    tk_key, tk_idx, tk_a, tk_b = topk_init(TSM_K, K_PAD, ACC)
    t_sum = zero
    t_cnt = zero
    for start in range(0, C, BLOCK_C):
        cols = start + offs
        t_raw = _load_row(t_row, cols, C, t_cache, cap_t, SINGLE_BLOCK, False, ACC, SOFTCAP_T)
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
def _row_transform(ref, offs, y, params_ptr, zero, HAS_LABELS: tl.constexpr, STANDARDIZE: tl.constexpr,
                   USE_TSM: tl.constexpr, TSM_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
                   SINGLE_BLOCK: tl.constexpr, ACC: tl.constexpr, SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr):
    """P1 and P2: the row's Transform, plus (n_s, σ_s) for the gradient through Z."""
    mean_s = zero
    inv_s = zero + 1.0
    mean_t = zero
    inv_t = zero + 1.0
    n_s = zero
    sigma_s = zero
    if STANDARDIZE:
        mean_s, inv_s, sigma_s, n_s, mean_t, inv_t = _pass_moments(ref, offs, zero, BLOCK_C, SINGLE_BLOCK, ACC,
                                                                   SOFTCAP_S, SOFTCAP_T)
    tsm_idx = tl.zeros([K_PAD], tl.int32)
    tsm_mult = tl.zeros([K_PAD], ACC)
    tsm_add = zero
    tsm_y = y * 0 - 1
    tsm_y_mult = 1.0 + zero
    if USE_TSM:
        tsm_y_mult = 1.0 + tl.load(params_ptr + P_TSM_GT_SCALE)
        tsm_idx, tsm_mult, tsm_add, tsm_y = _pass_teacher_topk(
            ref, offs, y, mean_t, inv_t, tl.load(params_ptr + P_TSM_SCALE), tl.load(params_ptr + P_TSM_SHIFT),
            zero, HAS_LABELS, STANDARDIZE, TSM_K, K_PAD, BLOCK_C, SINGLE_BLOCK, ACC, SOFTCAP_T)
    return (mean_s, inv_s, mean_t, inv_t, tsm_idx, tsm_mult, tsm_add, tsm_y, tsm_y_mult), n_s, sigma_s


@triton.jit
def empty_row_stats(zero):
    """The RowStats of no columns."""
    return (lse_init(zero), lse_init(zero), lse_init(zero), lse_init(zero), lse_init(zero),
            zero - float("inf"), tl.zeros([], tl.int32) + BIG_IDX)


@triton.jit
def merge_row_stats(a, b, inv_t):
    """The RowStats of the union of two disjoint column sets (LSE states at ``inv_t``, the raw-logit
    state at 1; the maximum's column goes to the lower index on ties)."""
    take_b = (b[5] > a[5]) | ((b[5] == a[5]) & (b[6] < a[6]))
    return (lse_merge(a[0], b[0], inv_t), lse_merge(a[1], b[1], inv_t), lse_merge(a[2], b[2], inv_t),
            lse_merge(a[3], b[3], inv_t), lse_merge(a[4], b[4], 1.0),
            tl.where(take_b, b[5], a[5]), tl.where(take_b, b[6], a[6]))


@triton.jit
def _block_row_stats(s_raw, s, t, cols, y, inv_T, zero, USE_DEC: tl.constexpr, USE_CE: tl.constexpr,
                     USE_DTKD: tl.constexpr):
    """The RowStats of one block of columns (only the fields the preset reads are filled)."""
    lse_s, lse_t, lse_snt, lse_tnt, lse_raw, v_max, v_arg = empty_row_stats(zero)
    if USE_DEC:
        # non-target states only; the full ones follow by merging in the target (P3's end)
        is_y = cols == y
        lse_snt = lse_update(lse_snt, tl.where(is_y, -float("inf"), s), inv_T)
        lse_tnt = lse_update(lse_tnt, tl.where(is_y, -float("inf"), t), inv_T)
    else:
        lse_s = lse_update(lse_s, s, inv_T)
        lse_t = lse_update(lse_t, t, inv_T)
    if USE_CE:
        lse_raw = lse_update(lse_raw, s_raw, 1.0 + zero)
    if USE_DTKD:
        v_max = tl.max(s, 0)
        v_arg = tl.min(tl.where(s == v_max, cols, BIG_IDX), 0)
    return lse_s, lse_t, lse_snt, lse_tnt, lse_raw, v_max, v_arg


@triton.jit
def _pass_row_stats(ref, offs, xf, y, target, inv_T, zero, sup, USE_DEC: tl.constexpr, USE_CE: tl.constexpr,
                    USE_DTKD: tl.constexpr, USE_REL: tl.constexpr, REL_K: tl.constexpr,
                    RANK_BY_TEACHER: tl.constexpr, USE_TDL: tl.constexpr, TDL_K: tl.constexpr,
                    STANDARDIZE: tl.constexpr, USE_TSM: tl.constexpr, TSM_K: tl.constexpr, K_PAD: tl.constexpr,
                    NEG_PAD: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE_BLOCK: tl.constexpr, ACC: tl.constexpr,
                    SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr, TOPK_MODE: tl.constexpr,
                    TOPK_NORM: tl.constexpr):
    """P3. Reads s and t through the Transform ``xf`` (and the target logits ``target`` = (s̃_y, t̃_y)).
    Produces the row's RowStats at T (for DKD the full states are the non-target ones merged with the
    target), the top-k Lists: LDRLD's ranking, TDL's Pos and its 2k smallest (Neg candidates), and for a
    dense top-k teacher its support S (``sup``: merged here for renorm/teacher; for tail P2' found it and
    P3 masks it out) with the complement states (LSE_∉S of s̃, of t̃ at T; tail only)."""
    stats = empty_row_stats(zero)
    rel = topk_init(REL_K, K_PAD, ACC)
    pos = topk_init(TDL_K, K_PAD, ACC)
    neg = topk_init(2 * TDL_K, NEG_PAD, ACC)
    comp_s = lse_init(zero)
    comp_t = lse_init(zero)
    bound = _support_bound(sup)
    for start in range(0, ref[2], BLOCK_C):
        cols = start + offs
        s_raw, s, t = _load_block(ref, cols, xf, STANDARDIZE, USE_TSM, TSM_K, SINGLE_BLOCK, False, ACC, SOFTCAP_S,
                                  SOFTCAP_T)
        stats = merge_row_stats(stats, _block_row_stats(s_raw, s, t, cols, y, inv_T, zero, USE_DEC, USE_CE,
                                                        USE_DTKD), inv_T)
        cand = tl.where(cols < ref[2], cols, BIG_IDX)
        if TOPK_MODE == TOPK_DENSE:
            if TOPK_NORM == NORM_TAIL:
                in_S = _within(t, cols, bound)
                comp_s = lse_update(comp_s, tl.where(in_S, -float("inf"), s), inv_T)
                comp_t = lse_update(comp_t, tl.where(in_S, -float("inf"), t), inv_T)
            else:
                sup = topk_merge(sup[0], sup[1], sup[2], sup[3], t, cand, s, t, K_PAD)
        if USE_REL:
            rel_key, rel_idx, rel_s, rel_t = rel
            if RANK_BY_TEACHER:
                rel = topk_merge(rel_key, rel_idx, rel_s, rel_t, t, cand, s, t, K_PAD)
            else:
                rel = topk_merge(rel_key, rel_idx, rel_s, rel_t, s, cand, s, t, K_PAD)
        if USE_TDL:
            pos_key, pos_idx, pos_s, pos_t = pos
            pos = topk_merge(pos_key, pos_idx, pos_s, pos_t, t, cand, s, t, K_PAD)
            neg_key, neg_idx, neg_s, neg_t = neg
            neg = topk_merge(neg_key, neg_idx, neg_s, neg_t, _low_key(t), cand, s, t, NEG_PAD)
    if USE_DEC:
        s_y, t_y = target
        lse_s = lse_merge(stats[2], (s_y, 1.0 + zero), inv_T)
        lse_t = lse_merge(stats[3], (t_y, 1.0 + zero), inv_T)
        stats = (lse_s, lse_t, stats[2], stats[3], stats[4], stats[5], stats[6])
    return stats, rel, pos, neg, sup, (comp_s, comp_t)


@triton.jit
def _pass_support(ref, offs, xf, TOPK_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
                  SINGLE_BLOCK: tl.constexpr, ACC: tl.constexpr, SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr):
    """P2' (dense top-k teacher, tail). Reads s and t (softcapped). Produces the support S: the List of
    the teacher's TOPK_K largest logits (ties to the lower column) with their s̃ and t̃."""
    sup = topk_init(TOPK_K, K_PAD, ACC)
    for start in range(0, ref[2], BLOCK_C):
        cols = start + offs
        s_raw, s, t = _load_block(ref, cols, xf, False, False, 1, SINGLE_BLOCK, False, ACC, SOFTCAP_S, SOFTCAP_T)
        cand = tl.where(cols < ref[2], cols, BIG_IDX)
        sup = topk_merge(sup[0], sup[1], sup[2], sup[3], t, cand, s, t, K_PAD)
    return sup


@triton.jit
def _log_mass(norm_part, norm_full, inv_t):
    """log of the probability mass of a subset: LSE_part − LSE_full from finished states (−inf for an
    empty subset)."""
    return tl.where(norm_part[0] == -float("inf"), -float("inf"),
                    (norm_part[0] - norm_full[0]) * inv_t + norm_part[1] - norm_full[1])


@triton.jit
def _list_bound(key, idx, member):
    """The Bound (w_key, w_idx) of a List's ``member`` slots: the worst of them in (key desc, column asc)
    order; (+inf, −1) when there is none (then no column is within it)."""
    w_key = tl.min(tl.where(member, key, float("inf")), 0)
    w_idx = tl.max(tl.where(member & (key == w_key), idx, -1), 0)
    return w_key, w_idx


@triton.jit
def _support_bound(sup):
    """The Bound of a support List: its worst real slot."""
    key, idx, s_k, t_k = sup
    return _list_bound(key, idx, (idx >= 0) & (idx != BIG_IDX))


@triton.jit
def _within(key, cols, bound):
    """Per column: is it at or before the Bound in (key desc, column asc) order — for a List holding the k
    best columns by that key (S, LDRLD's I, TDL's Pos), membership in it, with one compare whatever k."""
    w_key, w_idx = bound
    return (key > w_key) | ((key == w_key) & (cols <= w_idx))


@triton.jit
def _support_terms(sup, norm_s, norm_t, norm_sc, norm_tc, T, inv_T, kd_w, div_param, zero,
                   DIVERGENCE: tl.constexpr, TOPK_NORM: tl.constexpr):
    """The dense top-k teacher's KD term from registers: the support List ``sup`` (P2'/P3), the full
    states of s̃, t̃ and (tail) their complement states ``norm_sc``, ``norm_tc``.

    renorm   p̂, q̂ = softmax_S(t̃/T), softmax_S(s̃/T):  D(p̂‖q̂); gradient on S kd_w·T·(qg − q̂·Σ_S qg)
    teacher  p̂ = softmax_S(t̃/T), q full:  Σ_S p̂·(log p̂ − log q); gradient kd_w·T·(q − p̂)
    tail     outcomes S ∪ {tail}, full-vocabulary p, q; log q_tail = LSE_∉S − LSE (masked, not 1 − Σq):
             D over the k + 1 outcomes; gradient on S kd_w·T·(qg − q·Σ_o qg_o)

    Returns (D, the LLM record): kd_ok is false for a row with no finite teacher or student logit on S
    (renorm; teacher: no finite teacher logit): its KD term is 0; a column c ∉ S gets (tail)
    kd_w·T·(q_c/q_tail·qg_tail − q_c·Σ_o qg_o) from the record's last coefficients."""
    key, idx, s_k, t_k = sup
    real = (idx >= 0) & (idx != BIG_IDX)
    s_k = tl.where(real, s_k, -float("inf"))
    t_k = tl.where(real, t_k, -float("inf"))
    d_tail = zero
    qg_tail = zero
    if TOPK_NORM == NORM_TAIL:
        norm_p = norm_t
        norm_q = norm_s
        d_tail, qg_tail = divergence_terms(_log_mass(norm_tc, norm_t, inv_T), _log_mass(norm_sc, norm_s, inv_T),
                                           div_param, DIVERGENCE)
        kd_ok = zero == zero
    else:
        norm_p = lse_norm(lse_update(lse_init(zero), t_k, inv_T))
        if TOPK_NORM == NORM_TEACHER:
            norm_q = norm_s
            kd_ok = norm_p[0] != -float("inf")
        else:
            norm_q = lse_norm(lse_update(lse_init(zero), s_k, inv_T))
            kd_ok = (norm_p[0] != -float("inf")) & (norm_q[0] != -float("inf"))
    lp = log_prob(t_k, norm_p, inv_T)
    lq = log_prob(s_k, norm_q, inv_T)
    sum_qg = zero - 1.0  # forward KL: Σ qg = −Σ p = −1 exactly
    if TOPK_NORM == NORM_TEACHER:
        d, qg = divergence_terms(lp, lq, div_param, FORWARD_KL)
    else:
        d, qg = divergence_terms(lp, lq, div_param, DIVERGENCE)
        if DIVERGENCE != FORWARD_KL:
            sum_qg = tl.sum(tl.where(real, qg, 0.0), 0) + qg_tail
    d_sum = tl.sum(tl.where(real, d, 0.0), 0) + d_tail
    w_key, w_idx = _support_bound(sup)
    return d_sum, (div_param, sum_qg, w_key, w_idx, norm_p, norm_q, norm_sc, kd_w * T * qg_tail,
                   kd_w * T * sum_qg, kd_ok)


@triton.jit
def _decoupled_row(norm_s, norm_t, norm_snt, norm_tnt, target, inv_T, tckd_w, params_ptr, ADAPTIVE: tl.constexpr):
    """DKD/AEKT's row scalars from P3's finished states: (q_y, p_y, α_n, TCKD)."""
    s_y, t_y = target
    log_qy = log_prob(s_y, norm_s, inv_T)
    log_py = log_prob(t_y, norm_t, inv_T)
    log_1mqy = (norm_snt[0] - norm_s[0]) * inv_T + norm_snt[1] - norm_s[1]
    log_1mpy = (norm_tnt[0] - norm_t[0]) * inv_T + norm_tnt[1] - norm_t[1]
    q_y = tl.exp(log_qy)
    p_y = tl.exp(log_py)
    p_n = tl.exp(log_1mpy)
    tckd = tl.where(p_y > 0, p_y * (log_py - log_qy), 0.0) + tl.where(p_n > 0, p_n * (log_1mpy - log_1mqy), 0.0)
    alpha_n = tckd_w
    if ADAPTIVE:
        alpha_n = tckd_w * tl.minimum(tl.exp(log_py - log_qy), tl.load(params_ptr + P_MAX_WEIGHT))
    return q_y, p_y, alpha_n, _clamp_kl(tckd)


@triton.jit
def _dtkd_temperatures(x_max, v_max, T):
    """DTKD's (T_s, T_t, ok): 2vT/(x + v), 2xT/(x + v) where x > 0 and v > 0, else (T, T) — the published
    guard covers x + v ≤ 0 only; this also keeps rows with a non-positive maximum finite."""
    ok = (x_max > 0) & (v_max > 0)
    den = tl.where(ok, x_max + v_max, 1.0)
    return tl.where(ok, 2.0 * v_max * T / den, T), tl.where(ok, 2.0 * x_max * T / den, T), ok


@triton.jit
def _tdl_groups(pos, neg, tdl_w, params_ptr, TDL_K: tl.constexpr):
    """TDL's Pos and Neg groups from P3's lists (Neg = the k smallest non-Pos of the 2k smallest): (the
    Bound of Pos by t̃, the Bound of Neg by the low key among non-Pos columns — see :func:`_tdl_member` —,
    their loss, (c1_pos, c2_pos, c1_neg, c2_neg))."""
    pos_key, pos_idx, pos_s, pos_t = pos
    neg_key, neg_idx, neg_s, neg_t = neg
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
    dot, nu, nv = _cos_group(neg_s, neg_t, neg_sel)
    l_neg, c1_neg, c2_neg = _cos_coeffs(dot, nu, nv, tdl_w * tl.load(params_ptr + P_TDL_NEG))
    return (_list_bound(pos_key, pos_idx, pos_real), _list_bound(neg_key, neg_idx, neg_sel), l_pos + l_neg,
            (c1_pos, c2_pos, c1_neg, c2_neg))


@triton.jit
def _in_rel(s, t, cols, rel_bound, RANK_BY_TEACHER: tl.constexpr):
    """Per column: is it in LDRLD's set I (the k best by s̃, or by t̃ when ranked by the teacher)?"""
    if RANK_BY_TEACHER:
        return _within(t, cols, rel_bound)
    else:
        return _within(s, cols, rel_bound)


@triton.jit
def _low_key(t):
    """TDL's Neg order key: the smallest teacher logits first, masked (−inf) classes last."""
    return tl.where(t == -float("inf"), -float("inf"), -t)


@triton.jit
def _tdl_member(t, cols, pos_bound, neg_bound):
    """Per column: (in Pos, in Neg) — Pos the k best by t̃, Neg the k best by the low key among the rest
    (the Bounds of :func:`_tdl_groups`): two compares each, whatever k."""
    in_pos = _within(t, cols, pos_bound)
    return in_pos, (~in_pos) & _within(_low_key(t), cols, neg_bound)


@triton.jit
def _pass_restricted(ref, offs, xf, inv_T, inv_Ts, inv_Tt, bounds, zero, USE_REL: tl.constexpr,
                     RANK_BY_TEACHER: tl.constexpr, USE_TDL: tl.constexpr, USE_DTKD: tl.constexpr,
                     STANDARDIZE: tl.constexpr, USE_TSM: tl.constexpr, TSM_K: tl.constexpr, BLOCK_C: tl.constexpr,
                     SINGLE_BLOCK: tl.constexpr, ACC: tl.constexpr, SOFTCAP_S: tl.constexpr,
                     SOFTCAP_T: tl.constexpr):
    """P4 (LDRLD, TDL, DTKD). Reads s̃ and t̃ and the Bounds of the top-k sets P3 chose (``bounds`` =
    (LDRLD's I, TDL's Pos, TDL's Neg)). Produces the LSE states of the complement of LDRLD's set (at T),
    the states at DTKD's T_s/T_t, and TDL's Non-group sums (dot, ‖u‖², ‖v‖²)."""
    rel_bound, pos_bound, neg_bound = bounds
    lse_sR = lse_init(zero)
    lse_tR = lse_init(zero)
    lse_sd = lse_init(zero)
    lse_td = lse_init(zero)
    dot_n = zero
    nu_n = zero
    nv_n = zero
    if USE_REL or USE_TDL or USE_DTKD:  # else P4 does not run (no reads)
        for start in range(0, ref[2], BLOCK_C):
            cols = start + offs
            s_raw, s, t = _load_block(ref, cols, xf, STANDARDIZE, USE_TSM, TSM_K, SINGLE_BLOCK, False, ACC,
                                      SOFTCAP_S, SOFTCAP_T)
            if USE_REL:
                in_I = _in_rel(s, t, cols, rel_bound, RANK_BY_TEACHER)
                lse_sR = lse_update(lse_sR, tl.where(in_I, -float("inf"), s), inv_T)
                lse_tR = lse_update(lse_tR, tl.where(in_I, -float("inf"), t), inv_T)
            if USE_TDL:
                in_pos, in_neg = _tdl_member(t, cols, pos_bound, neg_bound)
                grouped = in_pos | in_neg
                dot_b, nu_b, nv_b = _cos_group(s, t, (cols < ref[2]) & (~grouped))
                dot_n += dot_b
                nu_n += nu_b
                nv_n += nv_b
            if USE_DTKD:
                lse_sd = lse_update(lse_sd, s, inv_Ts)
                lse_td = lse_update(lse_td, t, inv_Tt)
    return lse_sR, lse_tR, lse_sd, lse_td, (dot_n, nu_n, nv_n)


@triton.jit
def _finite_or_0(m, v):
    """``v``, or 0 where the state's maximum ``m`` is −inf (an empty set)."""
    return tl.where(m == -float("inf"), 0.0, v)


@triton.jit
def _kl_terms(s, t, norm_s, norm_t, inv_ts, inv_tt):
    """Per column of one softmax pair, q = softmax(s/T_s), p = softmax(t/T_t):
    (q, p, log q, log p, p·(log p − log q)). In base 2 (log2 q = (s − m)·log2(e)/T_s − log2 d): one
    FADD, FFMA and MUFU per exponential; a masked entry (−inf) gets q = 0 and log q = −inf without a
    per-column select (an empty set's state is made (0, 0) first, as :func:`log_prob` does per column).
    Float64 in natural units (a Python constant such as log2 e is a float32 in a kernel)."""
    if s.dtype == tl.float64:
        lq = log_prob(s, norm_s, inv_ts)
        lp = log_prob(t, norm_t, inv_tt)
        q = tl.exp(lq)
        p = tl.exp(lp)
        kl = tl.where(p > 0, p * (lp - lq), 0.0)
    else:
        l2q = (s - _finite_or_0(norm_s[0], norm_s[0])) * (inv_ts * LOG2E) - _finite_or_0(norm_s[0], norm_s[1] * LOG2E)
        l2p = (t - _finite_or_0(norm_t[0], norm_t[0])) * (inv_tt * LOG2E) - _finite_or_0(norm_t[0], norm_t[1] * LOG2E)
        q = tl.exp2(l2q)
        p = tl.exp2(l2p)
        lq = l2q * LN2
        lp = l2p * LN2
        kl = tl.where(p > 0, (p * LN2) * (l2p - l2q), 0.0)
    return q, p, lq, lp, kl


@triton.jit
def _column_terms(s, t, cols, y, norms, temps, weights, dec, sparse, tdl, shifts, llm,
                  USE_KD: tl.constexpr, WANT_DTEMP: tl.constexpr, USE_DEC: tl.constexpr, USE_DTKD: tl.constexpr,
                  USE_REL: tl.constexpr, REL_K: tl.constexpr, USE_TDL: tl.constexpr, K_PAD: tl.constexpr,
                  NEG_PAD: tl.constexpr, ACC: tl.constexpr, DIVERGENCE: tl.constexpr, TOPK_MODE: tl.constexpr,
                  TOPK_NORM: tl.constexpr, REL_SCATTER: tl.constexpr = False, RANK_BY_TEACHER: tl.constexpr = False):
    """The bulk gradient w.r.t. s̃ of one block (before Z and CE) and its per-column loss parts.

    Consumes the finished states ``norms`` = (s, t, s≠y, t≠y, s_R, t_R, s@T_s, t@T_t), ``temps`` =
    (T, 1/T, T_s, T_t, 1/T_s, 1/T_t), ``weights`` = (kd, nckd, dtkd, rest), ``dec`` = (q_y, p_y, α_n),
    ``sparse`` = (LDRLD columns, their gradient, the Bound of I, s̃ and t̃ of I), ``tdl`` = (Pos Bound, Neg
    Bound, c1/c2 per group),
    ``shifts`` = (s̃ max, t̃ max), ``llm`` = the LLM record (divergence, dense top-k teacher). Returns (g,
    KL parts of KD (the divergence's d for another divergence; 0 for a top-k teacher, whose D comes
    from registers), NCKD, DTKD, LDRLD rest — per column —, the learnable-T parts a1, a2, a3 and DTKD's
    b1, b2, b3 — per column, unreduced —, and (qg, q) of another divergence, for P5's sums).

    KD with another divergence: kd_w·T·(qg − q·Σqg) (Σqg = ``llm[1]``, known from P5 in P6); with a
    dense top-k teacher: the slot gradient on S, elsewhere 0 (renorm), kd_w·T·q (teacher) or the tail
    formula kd_w·T·(q_c/q_tail·qg_tail − q_c·Σqg), q_c/q_tail = softmax over the complement."""
    T, inv_T, T_s, T_t, inv_Ts, inv_Tt = temps
    kd_w, nckd_w, dtkd_w, rest_w = weights
    s_hi, t_hi = shifts
    zeros = tl.zeros(s.shape, ACC)
    g = tl.full(s.shape, -0.0, ACC)  # −0 + x is x exactly: the first term's add compiles away
    kl_kd = zeros
    kl_nc = zeros
    kl_d = zeros
    kl_r = zeros
    a1 = zeros
    a2 = zeros
    a3 = zeros
    b1 = zeros
    b2 = zeros
    b3 = zeros
    dv = (zeros, zeros)
    if TOPK_MODE == TOPK_DENSE:
        div_param, sum_qg, w_key, w_idx, norm_p, norm_q, norm_sc, c_tail, c_sum, kd_ok = llm
        lp = log_prob(t, norm_p, inv_T)
        lq = log_prob(s, norm_q, inv_T)
        q = tl.exp(lq)
        if TOPK_NORM == NORM_TEACHER:
            g_S = kd_w * T * (q - tl.exp(lp))  # norm_q is the full student state: q is the full softmax
            off = kd_w * T * q
        else:
            if DIVERGENCE == FORWARD_KL:
                g_S = kd_w * T * (q - tl.exp(lp))  # Σqg = −1
            else:
                d_c, qg = divergence_terms(lp, lq, div_param, DIVERGENCE)
                g_S = kd_w * T * qg - c_sum * q
            off = g
            if TOPK_NORM == NORM_TAIL:
                off = c_tail * tl.exp(log_prob(s, norm_sc, inv_T)) - c_sum * q
        g += tl.where(kd_ok, tl.where(_within(t, cols, (w_key, w_idx)), g_S, off), 0.0)
    elif USE_KD or WANT_DTEMP:
        q, pr, lq, lp, kl_kd = _kl_terms(s, t, norms[0], norms[1], inv_T, inv_T)
        if DIVERGENCE == FORWARD_KL:
            g += kd_w * T * (q - pr)
        else:
            kl_kd, qg = divergence_terms(lp, lq, llm[0], DIVERGENCE)
            g += kd_w * T * (qg - q * llm[1])
            dv = (qg, q)
        if WANT_DTEMP:
            a1 = tl.where((q > 0) | (pr > 0), (q - pr) * (s - s_hi), 0.0)
            a2 = tl.where(pr > 0, (t - t_hi) * pr * (lp - lq), 0.0)
            a3 = tl.where(pr > 0, (t - t_hi) * pr, 0.0)
    if USE_DEC:
        q_y, p_y, alpha_n = dec
        is_y = cols == y
        q_h, p_h, lq_h, lp_h, kl_h = _kl_terms(s, t, norms[2], norms[3], inv_T, inv_T)
        q_h = tl.where(is_y, 0.0, q_h)
        kl_nc = tl.where(is_y, 0.0, kl_h)
        p_h = tl.where(is_y, 0.0, p_h)
        g += tl.where(is_y, T * alpha_n * (q_y - p_y), T * (alpha_n * (p_y - q_y) * q_h + nckd_w * (q_h - p_h)))
    if USE_DTKD:
        q_d, p_d, lq_d, lp_d, kl_d = _kl_terms(s, t, norms[6], norms[7], inv_Ts, inv_Tt)
        g += dtkd_w * T_t * (q_d - p_d)
        b1 = tl.where((q_d > 0) | (p_d > 0), (p_d - q_d) * (s - s_hi), 0.0)
        b2 = tl.where(p_d > 0, (t - t_hi) * p_d * (lp_d - lq_d), 0.0)
        b3 = tl.where(p_d > 0, (t - t_hi) * p_d, 0.0)
    if USE_REL:
        if REL_SCATTER:  # I's own gradient is written from its list (_pass_gradient): 0 here
            in_I = _in_rel(s, t, cols, sparse[2], RANK_BY_TEACHER)
            g_I = zeros
        else:
            g_I = _lookup(cols, sparse[0], sparse[1], -float("inf"), REL_K)
            in_I = g_I != -float("inf")
        q_r, p_r, lq_r, lp_r, kl_r = _kl_terms(s, t, norms[4], norms[5], inv_T, inv_T)
        kl_r = tl.where(in_I, 0.0, kl_r)
        g += tl.where(in_I, g_I, rest_w * T * (q_r - p_r))
    if USE_TDL:
        pos_bound, neg_bound, c1_pos, c2_pos, c1_neg, c2_neg, c1_non, c2_non = tdl
        live = (tl.abs(s) < float("inf")) & (tl.abs(t) < float("inf"))
        in_pos, in_neg = _tdl_member(t, cols, pos_bound, neg_bound)
        c1 = tl.where(in_pos, c1_pos, tl.where(in_neg, c1_neg, c1_non))
        c2 = tl.where(in_pos, c2_pos, tl.where(in_neg, c2_neg, c2_non))
        g += tl.where(live, c2 * s - c1 * t, 0.0)
    return g, (kl_kd, kl_nc, kl_d, kl_r), (a1, a2, a3), (b1, b2, b3), dv


@triton.jit
def _dtkd_argmax_gradient(b, kl_d, x_max, v_max, T, T_s, T_t, ok, dtkd_w):
    """∂(T_t·T_s·KL_dyn)/∂v through the dynamic temperatures: the extra gradient of the student's argmax
    column, from P5's sums ``b`` = (b1, b2, b3) (0 where the row uses τ)."""
    b1, b2, b3 = b
    xv = x_max + v_max
    dA = 4.0 * T * T * x_max * (x_max - v_max) / (xv * xv * xv)
    dTs = 2.0 * T * x_max / (xv * xv)
    dkl = b1 / (T_s * T_s) * dTs + (b2 - kl_d * b3) / (T_t * T_t) * dTs
    return tl.where(ok, dtkd_w * (dA * kl_d + T_t * T_s * dkl), 0.0)


@triton.jit
def _pass_sums(ref, offs, xf, y, norms, temps, weights, dec, sparse, tdl, shifts, llm, zero,
               USE_KD: tl.constexpr, WANT_DTEMP: tl.constexpr, USE_DEC: tl.constexpr, USE_DTKD: tl.constexpr,
               USE_REL: tl.constexpr, REL_K: tl.constexpr, USE_TDL: tl.constexpr, STANDARDIZE: tl.constexpr,
               USE_TSM: tl.constexpr, TSM_K: tl.constexpr, K_PAD: tl.constexpr, NEG_PAD: tl.constexpr,
               BLOCK_C: tl.constexpr, SINGLE_BLOCK: tl.constexpr, ACC: tl.constexpr, SOFTCAP_S: tl.constexpr,
               SOFTCAP_T: tl.constexpr, DIVERGENCE: tl.constexpr, TOPK_MODE: tl.constexpr,
               TOPK_NORM: tl.constexpr, REL_SCATTER: tl.constexpr = False, RANK_BY_TEACHER: tl.constexpr = False):
    """P5 (only when the gradient or dtemp needs row sums: standardize, DTKD, learnable T, a divergence
    other than forward KL). Reads s̃, t̃ (backwards: the blocks P4 read last are the likeliest in L2; a
    single-block row from registers). Produces the row's KL sums (KD — the divergence's Σd —, NCKD, DTKD,
    LDRLD rest), the Z-backward sums (Σg, Σg·s̃), the temperature-derivative sums (a1..a3 learnable T,
    b1..b3 DTKD) and a divergence's (Σqg, Σ_live q, Σ_live q·s̃) (its P5 g holds kd_w·T·qg only)."""
    kl = (zero, zero, zero, zero)
    zg = (zero, zero)
    a = (zero, zero, zero)
    b = (zero, zero, zero)
    dsum = (zero, zero, zero)
    C = ref[2]
    for i in range(0, C, BLOCK_C):
        cols = (C - 1) // BLOCK_C * BLOCK_C - i + offs
        s_raw, s, t = _load_block(ref, cols, xf, STANDARDIZE, USE_TSM, TSM_K, SINGLE_BLOCK, False, ACC, SOFTCAP_S,
                                  SOFTCAP_T)
        g, kl_c, a_c, b_c, dv = _column_terms(s, t, cols, y, norms, temps, weights, dec, sparse, tdl, shifts, llm,
                                              USE_KD, WANT_DTEMP, USE_DEC, USE_DTKD, USE_REL, REL_K, USE_TDL,
                                              K_PAD, NEG_PAD, ACC, DIVERGENCE, TOPK_MODE, TOPK_NORM, REL_SCATTER,
                                              RANK_BY_TEACHER)
        kl = (kl[0] + tl.sum(kl_c[0], 0), kl[1] + tl.sum(kl_c[1], 0), kl[2] + tl.sum(kl_c[2], 0),
              kl[3] + tl.sum(kl_c[3], 0))
        if STANDARDIZE:
            live_s = s_raw != -float("inf")
            zg = (zg[0] + tl.sum(tl.where(live_s, g, 0.0), 0), zg[1] + tl.sum(tl.where(live_s, g * s, 0.0), 0))
        if WANT_DTEMP:
            a = (a[0] + tl.sum(a_c[0], 0), a[1] + tl.sum(a_c[1], 0), a[2] + tl.sum(a_c[2], 0))
        if USE_DTKD:
            b = (b[0] + tl.sum(b_c[0], 0), b[1] + tl.sum(b_c[1], 0), b[2] + tl.sum(b_c[2], 0))
        if DIVERGENCE != FORWARD_KL and TOPK_MODE != TOPK_DENSE:
            qg_c, q_c = dv
            sum_qg = dsum[0] + tl.sum(qg_c, 0)
            if STANDARDIZE:
                live_s = s_raw != -float("inf")
                dsum = (sum_qg, dsum[1] + tl.sum(tl.where(live_s, q_c, 0.0), 0),
                        dsum[2] + tl.sum(tl.where(live_s, q_c * s, 0.0), 0))
            else:
                dsum = (sum_qg, dsum[1], dsum[2])
    return kl, zg, a, b, dsum


@triton.jit
def _pass_gradient(ref, offs, xf, y, g_row, norms, temps, weights, dec, sparse, tdl, shifts, zback, ce, row_out,
                   llm, zero, WRITE_GRAD: tl.constexpr, SUMS_DONE: tl.constexpr, USE_KD: tl.constexpr,
                   WANT_DTEMP: tl.constexpr, USE_DEC: tl.constexpr, USE_CE: tl.constexpr, USE_DTKD: tl.constexpr,
                   USE_REL: tl.constexpr, REL_K: tl.constexpr, USE_TDL: tl.constexpr, STANDARDIZE: tl.constexpr,
                   USE_TSM: tl.constexpr, TSM_K: tl.constexpr, K_PAD: tl.constexpr, NEG_PAD: tl.constexpr,
                   BLOCK_C: tl.constexpr, SINGLE_BLOCK: tl.constexpr, ACC: tl.constexpr, SOFTCAP_S: tl.constexpr,
                   SOFTCAP_T: tl.constexpr, DIVERGENCE: tl.constexpr, TOPK_MODE: tl.constexpr,
                   TOPK_NORM: tl.constexpr, REL_SCATTER: tl.constexpr = False,
                   RANK_BY_TEACHER: tl.constexpr = False):
    """P6. Reads s̃, t̃ (last use). Consumes everything P3–P5 produced plus ``zback`` = (ḡ, Z's second-term
    coefficient, 1/σ', DTKD's argmax column and its extra gradient), ``ce`` = (CE weight, raw-logit
    state finished) and ``row_out`` = (row scale, ok, NaN): writes the gradient; returns the row's KL
    sums when P5 did not run (``SUMS_DONE`` false). Softcap: the gradient w.r.t. the capped logit times
    1 − tanh² = 1 − (s_capped/cap)² (0 on masked columns). ``REL_SCATTER`` (LDRLD without standardize or
    a student softcap): the columns of I are skipped here and written from I's list after the loop, the
    same terms evaluated on its k lanes plus their pair/set gradient — no per-column lookup of k slots."""
    g_bar, gz_coef, inv_s, v_arg, extra = zback
    ce_w, norm_raw = ce
    g_scale, row_ok, row_nan = row_out
    kl = (zero, zero, zero, zero)
    C = ref[2]
    for i in range(0, C, BLOCK_C):
        if SUMS_DONE:
            start = i
        else:
            start = (C - 1) // BLOCK_C * BLOCK_C - i
        cols = start + offs
        s_raw, s, t = _load_block(ref, cols, xf, STANDARDIZE, USE_TSM, TSM_K, SINGLE_BLOCK, True, ACC, SOFTCAP_S,
                                  SOFTCAP_T)
        g, kl_c, a_c, b_c, dv = _column_terms(s, t, cols, y, norms, temps, weights, dec, sparse, tdl, shifts, llm,
                                              USE_KD, False, USE_DEC, USE_DTKD, USE_REL, REL_K, USE_TDL,
                                              K_PAD, NEG_PAD, ACC, DIVERGENCE, TOPK_MODE, TOPK_NORM, REL_SCATTER,
                                              RANK_BY_TEACHER)
        if not SUMS_DONE:
            kl = (kl[0] + tl.sum(kl_c[0], 0), kl[1] + tl.sum(kl_c[1], 0), kl[2] + tl.sum(kl_c[2], 0),
                  kl[3] + tl.sum(kl_c[3], 0))
        if USE_DTKD:
            g = tl.where(cols == v_arg, g + extra, g)
        if STANDARDIZE:
            g = tl.where(s_raw != -float("inf"), (g - g_bar) * inv_s - gz_coef * s, 0.0)
        if USE_CE:
            g += ce_w * (tl.exp(log_prob(s_raw, norm_raw, 1.0)) - tl.where(cols == y, 1.0, 0.0))
        if SOFTCAP_S:
            th = s_raw / ref[5]
            g = tl.where(s_raw == -float("inf"), 0.0, g * (1.0 - th * th))
        # NaN rows: NaN; empty rows: 0 (their g may hold −inf − (−inf))
        g = tl.where(row_ok, g * g_scale, tl.where(row_nan, float("nan"), 0.0))
        if WRITE_GRAD:
            keep = cols < C
            if REL_SCATTER:
                keep = keep & (~_in_rel(s, t, cols, sparse[2], RANK_BY_TEACHER))
            tl.store(g_row + cols, g.to(g_row.dtype.element_ty), mask=keep)
    if REL_SCATTER and WRITE_GRAD:
        rel_idx, rel_g, rel_bound, rel_s, rel_t = sparse
        g, kl_c, a_c, b_c, dv = _column_terms(rel_s, rel_t, rel_idx, y, norms, temps, weights, dec, sparse, tdl,
                                              shifts, llm, USE_KD, False, USE_DEC, USE_DTKD, USE_REL, REL_K,
                                              USE_TDL, K_PAD, NEG_PAD, ACC, DIVERGENCE, TOPK_MODE, TOPK_NORM,
                                              REL_SCATTER, RANK_BY_TEACHER)
        g += rel_g
        if USE_DTKD:
            g = tl.where(rel_idx == v_arg, g + extra, g)
        if USE_CE:  # no standardize, no student softcap: the raw student is s̃
            g += ce_w * (tl.exp(log_prob(rel_s, norm_raw, 1.0)) - tl.where(rel_idx == y, 1.0, 0.0))
        g = tl.where(row_ok, g * g_scale, tl.where(row_nan, float("nan"), 0.0))
        tl.store(g_row + rel_idx, g.to(g_row.dtype.element_ty), mask=rel_idx != BIG_IDX)
    return kl


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
            total = tl.zeros([], row_loss.dtype)  # (not row_loss·0: an infinite row would give NaN)
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
#: test-only overrides of the launch configuration (``None``: the engine's own choice)
_overrides: dict = {"block_c": None, "batch_block": None}


@contextlib.contextmanager
def _override(name: str, value: int, what: str):
    if value & (value - 1):
        raise ValueError(f"{what} must be a power of two")
    old, _overrides[name] = _overrides[name], value
    try:
        yield
    finally:
        _overrides[name] = old


def forced_block_c(block_c: int):
    """Force ``BLOCK_C`` (a power of two) so tests reach the streaming multi-block path at small C."""
    return _override("block_c", block_c, "BLOCK_C")


def forced_batch_block(rows: int):
    """Force the rows per step of the in-kernel batch loops (a power of two) so tests reach several
    steps with a few rows (the interpreter pays per program)."""
    return _override("batch_block", rows, "the batch block")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def block_config(C: int):
    """(BLOCK_C, SINGLE_BLOCK, num_warps) for a row of C columns."""
    block = _overrides["block_c"] or min(_next_pow2(C), MAX_BLOCK_C)
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
    use_kd = p["kd_weight"] != 0
    # the LLM family: all off (code 0 / False) unless used, so other presets compile exactly as before
    divergence = int(p["divergence"]) if use_kd else 0
    topk_mode = int(p["topk_mode"]) if use_kd else 0
    if topk_mode not in (0, TOPK_MODES["dense"]):
        raise NotImplementedError("kdkernels triton: the dense engine kernel takes dense teacher logits; a sparse "
                                  "teacher goes through kdkernels._triton.sparse")
    topk_k = int(p["topk_k"]) if topk_mode else 1
    dense_div = divergence != 0 and not topk_mode  # needs Σqg over the row before the gradient (P5)
    return dict(
        HAS_LABELS=has_labels, TEMP_IS_TENSOR=temp_is_tensor, HAS_GFACTOR=has_gfactor,
        WRITE_GRAD=write_grad, WANT_DTEMP=learnable, REDUCTION=int(p["reduction"]),
        USE_KD=p["kd_weight"] != 0, USE_CE=p["ce_weight"] != 0, STANDARDIZE=standardize,
        USE_TSM=bool(p["use_tsm"]), TSM_K=tsm_k,
        USE_DEC=bool(p["use_decoupled"]), ADAPTIVE=bool(p["use_decoupled"] and p["adaptive_tckd"]),
        USE_DTKD=use_dtkd, USE_REL=bool(p["use_relation"]), REL_K=rel_k,
        RANK_BY_TEACHER=bool(p["use_relation"] and p["rank_by_teacher"]), USE_TDL=bool(p["use_tdl"]),
        TDL_K=tdl_k, K_PAD=_next_pow2(max(tsm_k, rel_k, tdl_k, topk_k, 2)), NEG_PAD=_next_pow2(max(2 * tdl_k, 2)),
        NEED_SUMS=(write_grad and (standardize or use_dtkd or dense_div)) or learnable,
        BLOCK_C=block, SINGLE_BLOCK=single,
        ACC=tl.float64 if dtype == torch.float64 else tl.float32, VEC=vec,
        BATCH_BLOCK=_overrides["batch_block"] or BATCH_BLOCK,
        DIVERGENCE=divergence, SOFTCAP_S=p["softcap_s"] != 0, SOFTCAP_T=p["softcap_t"] != 0,
        TOPK_MODE=topk_mode, TOPK_K=topk_k, TOPK_NORM=int(p["topk_norm"]) if topk_mode else 0,
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
        it concurrently; another stream gets its own (in the interpreter: another thread). Under
        torch.compile (a graph must not capture a global buffer) a fresh one is made."""
        if torch.compiler.is_compiling():
            return torch.zeros(1, dtype=torch.int32, device=device)
        if device.type == "cuda":
            key = (device.type, device.index, torch.cuda.current_stream(device).cuda_stream)
        else:  # the interpreter runs a launch's programs one after another, on the calling thread
            key = (device.type, device.index, threading.get_ident())
        counter = self._tickets.get(key)
        if counter is None:
            counter = self._tickets[key] = torch.zeros(1, dtype=torch.int32, device=device)
        return counter

    def forward(self, s, t, labels, temperature, spec, grad, grad_factor):
        if isinstance(t, SparseTeacher):
            from .sparse import sparse_forward
            return sparse_forward(self, s, t, labels, temperature, spec, grad, grad_factor)
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
