"""The logit engine against a sparse (stored top-K) teacher in Triton: one program per row, one launch.

The teacher arrives as ``SparseTeacher(ids [N, K], logprobs [N, K])``: the teacher's log-probabilities at
temperature 1 over the full vocabulary, at K class ids per row (``id < 0``: a padding slot; an id ≥ C
makes its row NaN). Write ``S`` for the row's valid ids, ``x = softcap(s)`` for the (capped) student,
``q = softmax(x/T)`` over the vocabulary, and for every outcome ``o`` of the normalisation
``(d_o, qg_o) = divergence_terms(log p_o, log q_o)`` (``qg_o = q_o·∂D/∂q_o``, kdkernels._triton.divergence)::

    renorm   p̂ ∝ exp(logprob/T) over S,  q̂ = softmax_S(x/T)      ℓ_KD = kd_w·T²·D(p̂‖q̂)
             ∂/∂x_c = kd_w·T·(qg_c − q̂_c·Σ_S qg)  on S, 0 elsewhere
    teacher  p̂ as above, log q full-vocabulary                     ℓ_KD = kd_w·T²·Σ_S p̂·(log p̂ − log q)
             ∂/∂x_c = kd_w·T·(q_c − p̂_c)          (p̂ = 0 off S; forward KL only)
    tail     (T = 1) outcomes S ∪ {tail}: p_k = exp(logprob_k), p_tail = max(0, −expm1(LSE_k logprob_k)),
             log q_tail = LSE_{∉S}(x) − LSE(x) with the complement taken by MASKING S out, exactly
             ∂/∂x_c = kd_w·T·(qg_c − q_c·Σ_o qg_o)                          c ∈ S
             ∂/∂x_c = kd_w·T·(exp(lq_c − lq_tail)·qg_tail − q_c·Σ_o qg_o)    c ∉ S
    CE       ce_w·(LSE(x) − x_y),   ∂/∂x_c = ce_w·(softmax(x)_c − [c = y])
    softcap  ∂/∂s_c = ∂/∂x_c · (1 − (x_c/cap)²)

(forward KL: ``qg = −p`` and ``Σ qg = −1`` exactly, so the gradient is the familiar ``T·(q − p)``; the
gradient is formed from log-probabilities in the accumulation dtype, never as a difference of rounded
probabilities). The KD value is clamped at ≥ 0 (the gradient is not).

Passes over a row (``STREAM`` = CE, or a teacher/tail KD term; renorm without CE never streams):

    slots     the K ids and logprobs once (a ``K_PAD`` block), the student gathered at the valid ids
              (K scattered loads), their LSE state; the teacher's state over the slots
    stats     (STREAM) one pass over the student row in ``BLOCK_C`` blocks: the full LSE state at T
              (teacher), the complement state (tail: the columns that are ids are masked out; the ids are
              sorted once with ``tl.sort`` and every column finds itself by a branchless binary search
              over them, ``log2 K_PAD`` ``tl.gather`` steps — exact, no subtraction of sums; the full
              state is the exact merge of the complement and the support states), the state at T = 1
              (CE; the same as the full one for tail, where T = 1)
    gradient  renorm without CE: zeros (NaN for a NaN row) over the whole row; STREAM: the off-support
              formula for every column (teacher: kd_w·T·q_c; tail: kd_w·T·(exp(lq_c − lq_tail)·qg_tail
              − q_c·Σqg); plus CE's softmax term and −ce_w at the label); then ``tl.debug_barrier()``
              and the support columns are overwritten with their full values (K scattered stores)

Bytes moved per row (student element size ``b_s``, gradient ``b_g``, K slots of ids ``b_i`` and
logprobs ``b_l``): renorm without CE reads ``K·(b_i + b_l + b_s)`` and writes ``C·b_g`` (the dense
gradient) + ``K·b_g`` — one transfer of [N, V] plus O(K); without a gradient it reads O(K) only. With
CE / teacher / tail: ``2·C·b_s`` read (one, when the row fits one block: ≤ 4096 columns are kept in
registers; one as well without a gradient) + ``C·b_g`` written + O(K): two reads of the student and one
write. tail's mask costs ``log2 K_PAD`` register gathers per column (≤ 4 KB of shared memory for the
sorted ids at K = 1024), no memory traffic. No dense teacher, no
``[N, C]`` temporaries; the loss reduction (none/sum/batchmean) happens in the same launch
(``engine._reduce_batch``), the gradient is scaled by loss_weight (÷ count for batchmean) and
``grad_factor[n]``.

Row semantics: ignored rows read nothing, loss 0, gradient row exactly 0; an id ≥ C, a bad label, NaN or
+inf in a valid slot's logprob or in the student → NaN loss and NaN gradient row (renorm without CE reads
only the student's K support values, so there only those are checked: the loss does not depend on the
rest of the row); a student with no finite logit → 0; renorm/teacher rows whose teacher has no valid
finite slot → 0 (the whole row, CE included, as for a fully masked dense teacher); a tail row with no
finite slot is all tail mass (p_tail = 1; a row of padding only has q_tail = 1 too: KD 0, CE counted);
a renorm row whose student is −inf on every valid id → KD term 0.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from ..dispatch import interpreting
from ..spec import DIVERGENCE_CODES, MAX_SPARSE_K, NORMALIZATION_CODES, REDUCTION_CODES, TOPK_MODES
from .divergence import FORWARD_KL, divergence_terms
from .engine import (BATCH_BLOCK, P_CE_WEIGHT, P_DIV_PARAM, P_KD_WEIGHT, P_LOSS_WEIGHT, P_SOFTCAP_S,
                     REDUCTION_BATCHMEAN, _load_row, _next_pow2, _overrides, _reduce_batch, _wrap, acc_dtype,
                     block_config, param_tensor, row_label, row_scales, row_temperature, unpack, vector_width,
                     zero_row)
from .row_ops import BIG_IDX, log_prob, lse_init, lse_merge, lse_norm, lse_update, softcap

NORM_RENORM = tl.constexpr(NORMALIZATION_CODES["renorm"])
NORM_TAIL = tl.constexpr(NORMALIZATION_CODES["tail"])
NORM_TEACHER = tl.constexpr(NORMALIZATION_CODES["teacher"])
#: smallest slot block (tiny register vectors gain nothing and some lowerings want a few lanes)
MIN_K_PAD = 16


@triton.jit
def _expm1(x):
    """exp(x) − 1 without cancellation near 0 (Kahan's ``(u − 1)·x / log u``, u = e^x; the interpreter has
    no libdevice): −1 at −inf, x where e^x rounds to 1."""
    u = tl.exp(x)
    um1 = u - 1.0
    safe_u = tl.where((u == 1.0) | (um1 == -1.0), 0.5, u)
    return tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, um1 * x / tl.log(safe_u)))


@triton.jit
def _softcap_slope(x, cap):
    """∂softcap/∂s from the capped value ``x``: 1 − (x/cap)², 0 for a masked (−inf) class."""
    r = x / cap
    return tl.where(x == -float("inf"), 0.0, 1.0 - r * r)


@triton.jit
def _is_support(cols, sorted_ids, K_PAD: tl.constexpr, LOG_K_PAD: tl.constexpr):
    """Whether each column is one of the row's ids (``sorted_ids`` ascending, empty slots BIG_IDX): a
    branchless lower-bound search, ``LOG_K_PAD`` gathers per column, then one equality test."""
    pos = tl.zeros(cols.shape, tl.int32)
    for j in tl.static_range(LOG_K_PAD):
        cand = pos + (K_PAD >> (j + 1))
        below = tl.gather(sorted_ids, cand - 1, 0) < cols
        pos = tl.where(below, cand, pos)
    return tl.gather(sorted_ids, pos, 0) == cols


@triton.jit
def _block_stats(x, cols, sorted_ids, full, raw, inv_T, NEED_FULL: tl.constexpr, NEED_RAW: tl.constexpr,
                 NORM: tl.constexpr, K_PAD: tl.constexpr, LOG_K_PAD: tl.constexpr):
    """Fold one block into the student's states: ``full`` at T (tail: the complement of the ids), ``raw``
    at T = 1 (CE)."""
    if NEED_FULL:
        xf = x
        if NORM == NORM_TAIL:
            xf = tl.where(_is_support(cols, sorted_ids, K_PAD, LOG_K_PAD), -float("inf"), x)
        full = lse_update(full, xf, inv_T)
    if NEED_RAW:
        raw = lse_update(raw, x, 1.0)
    return full, raw


@triton.jit
def _pass_stats(s_row, C, idx, valid, cap, inv_T, offs, zero, NEED_FULL: tl.constexpr, NEED_RAW: tl.constexpr,
                NORM: tl.constexpr, SOFTCAP_S: tl.constexpr, K_PAD: tl.constexpr, LOG_K_PAD: tl.constexpr,
                BLOCK_C: tl.constexpr, SINGLE_BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr, ACC: tl.constexpr):
    """The streamed statistics pass: reads the student row once; returns (full/complement state at T,
    state at 1, the row block when it fits one block)."""
    sorted_ids = tl.zeros([K_PAD], tl.int32)
    if NEED_FULL and NORM == NORM_TAIL:
        sorted_ids = tl.sort(tl.where(valid, idx, BIG_IDX))
    full = lse_init(zero)
    raw = lse_init(zero)
    cache = tl.zeros([BLOCK_C], ACC)
    if SINGLE_BLOCK:
        cache = _load_row(s_row, offs, C, cap, cap, False, True, ACC, SOFTCAP_S)
        full, raw = _block_stats(cache, offs, sorted_ids, full, raw, inv_T, NEED_FULL, NEED_RAW, NORM, K_PAD,
                                 LOG_K_PAD)
    else:
        for start in range(0, C, BLOCK_C):
            cols = start + offs
            x = _load_row(s_row, cols, C, cap, cap, False, not WRITE_GRAD, ACC, SOFTCAP_S)
            full, raw = _block_stats(x, cols, sorted_ids, full, raw, inv_T, NEED_FULL, NEED_RAW, NORM, K_PAD,
                                     LOG_K_PAD)
    return full, raw, cache


@triton.jit
def _support_terms(lp, x_k, sup, full, comp, T, inv_T, kd_w, param, zero, NORM: tl.constexpr,
                   DIVERGENCE: tl.constexpr):
    """The KD term over the K slots: (D, the slots' KD gradient w.r.t. x, A, B, kd_ok), where the
    off-support gradient is ``A·q_c + B·exp(lq_c − lq_tail)`` (teacher: A = kd_w·T; tail: A = −kd_w·T·Σqg,
    B = kd_w·T·qg_tail; renorm: 0). Padding slots (lp = x_k = −inf) contribute 0."""
    A = zero
    B = zero
    kd_ok = True
    if NORM == NORM_TAIL:
        # the teacher's tail mass from its K log-probabilities at T = 1: −expm1(log Σ p_k), never 1 − Σ p_k
        m_p, log_d_p = lse_norm(lse_update(lse_init(zero), lp, 1.0))
        mass = tl.where(m_p == -float("inf"), -float("inf"), m_p + log_d_p)
        p_tail = tl.maximum(-_expm1(tl.minimum(mass, 0.0)), 0.0)
        lp_tail = tl.where(p_tail > 0, tl.log(tl.where(p_tail > 0, p_tail, 1.0)), -float("inf"))
        norm_full = lse_norm(full)
        m_c, log_d_c = lse_norm(comp)
        lq = log_prob(x_k, norm_full, inv_T)
        lq_tail = tl.where(m_c == -float("inf"), -float("inf"), (m_c - norm_full[0]) * inv_T + log_d_c - norm_full[1])
        d, qg = divergence_terms(lp, lq, param, DIVERGENCE)
        d_tail, qg_tail = divergence_terms(lp_tail, lq_tail, param, DIVERGENCE)
        D = tl.sum(d, 0) + d_tail
        sum_qg = tl.sum(qg, 0) + qg_tail
        if DIVERGENCE == FORWARD_KL:
            sum_qg = zero - 1.0
        A = -kd_w * T * sum_qg
        B = tl.where(lq_tail == -float("inf"), 0.0, kd_w * T * qg_tail)
    else:
        lp_hat = log_prob(lp, lse_norm(lse_update(lse_init(zero), lp, inv_T)), inv_T)
        if NORM == NORM_TEACHER:
            lq = log_prob(x_k, lse_norm(full), inv_T)
            A = kd_w * T
        else:
            lq = log_prob(x_k, lse_norm(sup), inv_T)
            kd_ok = sup[0] != -float("inf")
        d, qg = divergence_terms(lp_hat, lq, param, DIVERGENCE)
        D = tl.sum(d, 0)
        sum_qg = tl.sum(qg, 0)
        if DIVERGENCE == FORWARD_KL:
            sum_qg = zero - 1.0
    g_k = kd_w * T * (qg - tl.exp(lq) * sum_qg)
    return D, g_k, A, B, kd_ok


@triton.jit
def _pass_gradient(s_row, g_row, C, y, cache, cap, inv_T, norm_full, norm_comp, norm_raw, A, B, ce_w, out, offs,
                   USE_KD: tl.constexpr, USE_CE: tl.constexpr, NORM: tl.constexpr, SOFTCAP_S: tl.constexpr,
                   BLOCK_C: tl.constexpr, SINGLE_BLOCK: tl.constexpr, ACC: tl.constexpr):
    """The off-support gradient on every column (the support is overwritten afterwards), × g_scale;
    0 for an empty row, NaN for a NaN row. ``out`` = (g_scale, row_ok, row_nan)."""
    g_scale, row_ok, row_nan = out
    for start in range(0, C, BLOCK_C):
        cols = start + offs
        if SINGLE_BLOCK:
            x = cache
        else:
            x = _load_row(s_row, cols, C, cap, cap, False, True, ACC, SOFTCAP_S)
        g = tl.zeros([BLOCK_C], ACC)
        if USE_KD and NORM != NORM_RENORM:
            g += A * tl.exp(log_prob(x, norm_full, inv_T))
            if NORM == NORM_TAIL:
                # q_c/q_tail = exp((x_c − m_comp)/T − log d_comp), exact for any q_tail > 0
                lr = tl.where(x == -float("inf"), -float("inf"), (x - norm_comp[0]) * inv_T - norm_comp[1])
                g += B * tl.exp(lr)
        if USE_CE:
            g += ce_w * (tl.exp(log_prob(x, norm_raw, 1.0)) - tl.where(cols == y, 1.0, 0.0))
        if SOFTCAP_S:
            g = g * _softcap_slope(x, cap)
        g = tl.where(row_ok, g * g_scale, tl.where(row_nan, float("nan"), 0.0))
        tl.store(g_row + cols, g.to(g_row.dtype.element_ty), mask=cols < C)


@triton.jit
def load_slots(ids_row, lp_row, s_row, K, C, V, offset, cap, zero, SOFTCAP_S: tl.constexpr, K_PAD: tl.constexpr):
    """The row's K slots on the columns ``[offset, offset + C)`` of a V-class row (the whole row: offset 0,
    V = C): (idx, mine, lp, bad, x_k) — the local column of each slot held here (0 elsewhere), which slots
    are held here, the teacher's log-probabilities at every valid slot (−inf for padding), whether an id ≥ V
    or a NaN / +inf log-probability makes the row NaN, and the student at the slots held here (softcapped;
    −inf elsewhere)."""
    slot = tl.arange(0, K_PAD)
    ids = tl.load(ids_row + slot, mask=slot < K, other=-1)
    out_of_range = ids >= V
    valid = (ids >= 0) & (~out_of_range)
    loc = ids - offset
    mine = valid & (loc >= 0) & (loc < C)
    idx = tl.where(mine, loc, 0).to(tl.int32)
    lp = tl.load(lp_row + slot, mask=valid, other=-float("inf")).to(zero.dtype)
    bad = tl.max((out_of_range | (lp != lp) | (lp == float("inf"))).to(tl.int32), 0) > 0
    x_k = tl.load(s_row + idx, mask=mine, other=-float("inf")).to(zero.dtype)
    if SOFTCAP_S:
        x_k = softcap(x_k, cap)
    return idx, mine, lp, bad, x_k


@triton.jit
def _sparse_row(s_row, ids_row, lp_row, g_row, C, K, y, bad, T, inv_T, g_scale, params_ptr, offs, zero,
                WRITE_GRAD: tl.constexpr, USE_KD: tl.constexpr, USE_CE: tl.constexpr, NORM: tl.constexpr,
                DIVERGENCE: tl.constexpr, SOFTCAP_S: tl.constexpr, K_PAD: tl.constexpr, LOG_K_PAD: tl.constexpr,
                BLOCK_C: tl.constexpr, SINGLE_BLOCK: tl.constexpr, ACC: tl.constexpr):
    """A row that is not ignored: its slots, the stats pass when the row streams, then its terms
    (``sparse_row_terms``): writes its gradient (× ``g_scale``) and returns its loss × loss_weight."""
    cap = zero
    if SOFTCAP_S:
        cap = tl.load(params_ptr + P_SOFTCAP_S)
    idx, valid, lp, slots_bad, x_k = load_slots(ids_row, lp_row, s_row, K, C, C, 0, cap, zero, SOFTCAP_S, K_PAD)
    x_y = zero
    if USE_CE:
        x_y = tl.load(s_row + y).to(ACC)
        if SOFTCAP_S:
            x_y = softcap(x_y, cap)
    # the student's row statistics (one streamed pass), unless renorm without CE
    NEED_FULL: tl.constexpr = USE_KD and NORM != NORM_RENORM
    NEED_RAW: tl.constexpr = USE_CE and not (USE_KD and NORM == NORM_TAIL)
    state = lse_init(zero)
    raw = lse_init(zero)
    cache = tl.zeros([BLOCK_C], ACC)
    if NEED_FULL or USE_CE:
        state, raw, cache = _pass_stats(s_row, C, idx, valid, cap, inv_T, offs, zero, NEED_FULL, NEED_RAW, NORM,
                                        SOFTCAP_S, K_PAD, LOG_K_PAD, BLOCK_C, SINGLE_BLOCK, WRITE_GRAD, ACC)
    return sparse_row_terms(s_row, g_row, C, y, idx, valid, lp, x_k, x_y, state, raw, bad | slots_bad, T, inv_T,
                            g_scale, cap, cache, params_ptr, offs, zero, WRITE_GRAD, USE_KD, USE_CE, NORM, DIVERGENCE,
                            SOFTCAP_S, K_PAD, BLOCK_C, SINGLE_BLOCK, ACC)


@triton.jit
def sparse_row_terms(s_row, g_row, C, y, idx, mine, lp, x_k, x_y, state, raw, bad, T, inv_T, g_scale, cap, cache,
                     params_ptr, offs, zero, WRITE_GRAD: tl.constexpr, USE_KD: tl.constexpr, USE_CE: tl.constexpr,
                     NORM: tl.constexpr, DIVERGENCE: tl.constexpr, SOFTCAP_S: tl.constexpr, K_PAD: tl.constexpr,
                     BLOCK_C: tl.constexpr, SINGLE_BLOCK: tl.constexpr, ACC: tl.constexpr):
    """A sparse row from its statistics — the student at the slots ``x_k``, the stats pass's ``state`` (the
    full state at T, or for tail the complement of the ids) and ``raw`` (at 1), the logit at the label
    ``x_y``, the single-block row ``cache`` — : the row semantics, its loss × loss_weight (returned) and its
    gradient: the off-support formula on every column, then the slots in ``mine`` overwritten. (The
    tensor-parallel split calls it with statistics merged across ranks.)"""
    NEED_FULL: tl.constexpr = USE_KD and NORM != NORM_RENORM
    STREAM: tl.constexpr = NEED_FULL or USE_CE
    sup = lse_update(lse_init(zero), x_k, inv_T)
    full = state
    comp = lse_init(zero)
    if NEED_FULL and NORM == NORM_TAIL:
        comp = state
        full = lse_merge(comp, sup, inv_T)  # the exact union of the complement and the support
        if USE_CE:
            raw = full  # tail runs at T = 1
    s_nan = sup[1] != sup[1]
    s_empty = sup[0] == -float("inf")
    if STREAM:
        s_nan = s_nan | (full[1] != full[1]) | (raw[1] != raw[1])
        if NEED_FULL:
            s_empty = full[0] == -float("inf")
        else:
            s_empty = raw[0] == -float("inf")
    t_empty = False
    if NORM != NORM_TAIL:  # a tail teacher with no finite slot is all tail mass
        t_empty = tl.max(lp, 0) == -float("inf")
    row_nan = bad | s_nan
    row_ok = (~row_nan) & (~s_empty) & (~t_empty)

    # the row's loss: the KD term from the K slots (+ the tail outcome), CE from its LSE at 1
    kd_w = tl.load(params_ptr + P_KD_WEIGHT)
    ce_w = tl.load(params_ptr + P_CE_WEIGHT)
    param = zero
    if DIVERGENCE != FORWARD_KL:
        param = tl.load(params_ptr + P_DIV_PARAM)
    loss_row = zero
    g_k = tl.zeros([K_PAD], ACC)
    A = zero
    B = zero
    if USE_KD:
        D, g_k, A, B, kd_ok = _support_terms(lp, x_k, sup, full, comp, T, inv_T, kd_w, param, zero, NORM,
                                             DIVERGENCE)
        loss_row += tl.where(kd_ok, kd_w * T * T * tl.maximum(D, 0.0), 0.0)
        g_k = tl.where(kd_ok, g_k, 0.0)
    norm_raw = lse_norm(raw)
    if USE_CE:
        loss_row += ce_w * -log_prob(x_y, norm_raw, 1.0)
    loss = tl.where(row_ok, loss_row * tl.load(params_ptr + P_LOSS_WEIGHT), tl.where(row_nan, float("nan"), 0.0))

    if WRITE_GRAD:
        out = (g_scale, row_ok, row_nan)
        if STREAM:
            _pass_gradient(s_row, g_row, C, y, cache, cap, inv_T, lse_norm(full), lse_norm(comp), norm_raw, A, B,
                           ce_w, out, offs, USE_KD, USE_CE, NORM, SOFTCAP_S, BLOCK_C, SINGLE_BLOCK, ACC)
        else:
            fill = tl.where(row_nan, float("nan"), 0.0) + tl.zeros([BLOCK_C], ACC)
            for start in range(0, C, BLOCK_C):
                cols = start + offs
                tl.store(g_row + cols, fill.to(g_row.dtype.element_ty), mask=cols < C)
        # every thread's dense store lands before the support columns are overwritten
        tl.debug_barrier()
        g = slot_gradient(g_k, x_k, idx, y, norm_raw, ce_w, cap, out, USE_CE, SOFTCAP_S)
        tl.store(g_row + idx, g.to(g_row.dtype.element_ty), mask=mine)
    return loss


@triton.jit
def slot_gradient(g_k, x_k, idx, y, norm_raw, ce_w, cap, out, USE_CE: tl.constexpr, SOFTCAP_S: tl.constexpr):
    """The full gradient at the K slots (× g_scale; NaN / 0 rows): the KD part ``g_k`` — none at a slot
    whose student logit is masked (−inf), as everywhere a masked student class gets no KD gradient — plus
    CE's, through softcap. ``out`` = (g_scale, row_ok, row_nan)."""
    g_scale, row_ok, row_nan = out
    g = tl.where(x_k == -float("inf"), 0.0, g_k)
    if USE_CE:
        g += ce_w * (tl.exp(log_prob(x_k, norm_raw, 1.0)) - tl.where(idx == y, 1.0, 0.0))
    if SOFTCAP_S:
        g = g * _softcap_slope(x_k, cap)
    return tl.where(row_ok, g * g_scale, tl.where(row_nan, float("nan"), 0.0))


@triton.jit
def _sparse_distill_kernel(
    s_ptr, ids_ptr, lp_ptr, labels_ptr, temp_ptr, gfactor_ptr, params_ptr, grad_ptr, row_loss_ptr, loss_ptr,
    ticket_ptr, N, C, K, stride_s_row, stride_ids_row, stride_lp_row, stride_g_row, stride_temp, stride_gfactor,
    ignore_index,
    HAS_LABELS: tl.constexpr, TEMP_IS_TENSOR: tl.constexpr, HAS_GFACTOR: tl.constexpr, WRITE_GRAD: tl.constexpr,
    REDUCTION: tl.constexpr, USE_KD: tl.constexpr, USE_CE: tl.constexpr, NORM: tl.constexpr,
    DIVERGENCE: tl.constexpr, SOFTCAP_S: tl.constexpr, K_PAD: tl.constexpr, LOG_K_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr, SINGLE_BLOCK: tl.constexpr, ACC: tl.constexpr, VEC: tl.constexpr,
    BATCH_BLOCK: tl.constexpr,
):
    """One program per row: the row (``_sparse_row``), then the batch reduction."""
    if VEC > 1:
        # C and the row strides are multiples of VEC (engine.vector_width): vector loads/stores of the row
        C = C // VEC * VEC
        stride_s_row = stride_s_row // VEC * VEC
        stride_g_row = stride_g_row // VEC * VEC
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s_row
    g_row = grad_ptr + row * stride_g_row
    offs = tl.arange(0, BLOCK_C)
    zero = tl.full([], 0.0, ACC)
    loss_w = tl.load(params_ptr + P_LOSS_WEIGHT)
    y, ignored, bad = row_label(labels_ptr, row, C, ignore_index, HAS_LABELS)
    T = row_temperature(temp_ptr, params_ptr, row, stride_temp, TEMP_IS_TENSOR, ACC)
    inv_T = 1.0 / T
    HAVE_COUNT: tl.constexpr = REDUCTION == REDUCTION_BATCHMEAN and WRITE_GRAD
    count, row_scale, g_scale = row_scales(labels_ptr, gfactor_ptr, row, stride_gfactor, N, ignore_index, loss_w,
                                           HAS_LABELS, HAVE_COUNT, HAS_GFACTOR, BATCH_BLOCK, ACC)
    loss = zero
    if ignored:
        if WRITE_GRAD:
            zero_row(g_row, C, offs, BLOCK_C, ACC)
    else:
        loss = _sparse_row(s_row, ids_ptr + row * stride_ids_row, lp_ptr + row * stride_lp_row, g_row, C, K, y, bad,
                           T, inv_T, g_scale, params_ptr, offs, zero, WRITE_GRAD, USE_KD, USE_CE, NORM, DIVERGENCE,
                           SOFTCAP_S, K_PAD, LOG_K_PAD, BLOCK_C, SINGLE_BLOCK, ACC)
    _reduce_batch(row, loss, row_loss_ptr, loss_ptr, ticket_ptr, labels_ptr, N, ignore_index, count,
                  HAS_LABELS, HAVE_COUNT, REDUCTION, BATCH_BLOCK)


# -------------------------------------------------------------------------------------------------
# launcher
# -------------------------------------------------------------------------------------------------
def _k_pad(K: int) -> int:
    return max(_next_pow2(K), MIN_K_PAD)


def sparse_distill_fwd(s: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, labels: Optional[torch.Tensor],
                       temperature: Optional[torch.Tensor], grad: Optional[torch.Tensor],
                       grad_factor: Optional[torch.Tensor], params: torch.Tensor, ticket: Optional[torch.Tensor],
                       floats: List[float], ints: List[int], norm: int) -> torch.Tensor:
    """One launch over all rows, the reduction included: the loss (``[N]`` for reduction none, else 0-dim
    of the accumulation dtype); writes ``grad`` when given. ``norm``: the normalisation code."""
    N, C = s.shape
    K = ids.shape[1]
    acc = acc_dtype(s.dtype)
    p = unpack(floats, ints)
    reduce_rows = p["reduction"] != REDUCTION_CODES["none"]
    loss = torch.empty((), dtype=acc, device=s.device) if reduce_rows else torch.empty(N, dtype=acc, device=s.device)
    row_loss = torch.empty(N, dtype=acc, device=s.device) if reduce_rows else loss
    if N == 0:
        return loss.zero_()
    block, single, num_warps = block_config(C)
    k_pad = _k_pad(K)
    _wrap(_sparse_distill_kernel)[(N,)](
        s, ids, logprobs, labels if labels is not None else params, temperature if temperature is not None else params,
        grad_factor if grad_factor is not None else params, params, grad if grad is not None else params,
        row_loss, loss, ticket if ticket is not None else params,
        N, C, K, s.stride(0), ids.stride(0), logprobs.stride(0), grad.stride(0) if grad is not None else 0,
        temperature.stride(0) if temperature is not None else 0,
        grad_factor.stride(0) if grad_factor is not None else 0, int(p["ignore_index"]),
        HAS_LABELS=labels is not None, TEMP_IS_TENSOR=temperature is not None, HAS_GFACTOR=grad_factor is not None,
        WRITE_GRAD=grad is not None, REDUCTION=int(p["reduction"]), USE_KD=p["kd_weight"] != 0,
        USE_CE=p["ce_weight"] != 0, NORM=int(norm), DIVERGENCE=int(p["divergence"]), SOFTCAP_S=p["softcap_s"] != 0,
        K_PAD=k_pad, LOG_K_PAD=k_pad.bit_length() - 1, BLOCK_C=block, SINGLE_BLOCK=single,
        ACC=tl.float64 if s.dtype == torch.float64 else tl.float32,
        VEC=vector_width(C, s.stride(0), grad.stride(0) if grad is not None else 0),
        BATCH_BLOCK=_overrides["batch_block"] or BATCH_BLOCK, num_warps=num_warps,
    )
    return loss


# torch.library registration, as the engine's: triton_op + wrap_triton on the GPU (torch.compile traces
# through the launch), an opaque custom_op with a fake implementation under the interpreter
_MUTATES = {"grad", "ticket"}
if hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton") and not interpreting():
    sparse_distill_fwd = torch.library.triton_op("kdkernels::triton_sparse_distill", sparse_distill_fwd,
                                                 mutates_args=_MUTATES)
else:
    sparse_distill_fwd = torch.library.custom_op("kdkernels::triton_sparse_distill", sparse_distill_fwd,
                                                 mutates_args=_MUTATES)

    @sparse_distill_fwd.register_fake
    def _(s, ids, logprobs, labels, temperature, grad, grad_factor, params, ticket, floats, ints, norm):
        reduce_rows = unpack(floats, ints)["reduction"] != REDUCTION_CODES["none"]
        return s.new_empty(() if reduce_rows else (s.shape[0],), dtype=acc_dtype(s.dtype))


#: packed options that a sparse teacher does not combine with (the spec rejects them at the API)
_UNSUPPORTED = (("standardize", "standardize=True"), ("use_tsm", "teacher_topk_scale"),
                ("use_decoupled", "a decoupled (dkd/aekt) term"), ("dtkd_weight", "dtkd_weight != 0"),
                ("use_relation", "a rank relation (ldrld) term"), ("use_tdl", "a TDL (topkd) term"),
                ("softcap_t", "a teacher softcap (a sparse teacher holds log-probabilities)"))


def _normalization(p: dict, teacher) -> int:
    """The normalisation code: the packed one (``spec.packed((normalize, K))``), which must agree with the
    teacher's; a spec packed without the sparse form takes the teacher's."""
    if teacher.normalize not in NORMALIZATION_CODES:
        raise ValueError(f"SparseTeacher.normalize must be one of {tuple(NORMALIZATION_CODES)}, "
                         f"got {teacher.normalize!r}")
    code = NORMALIZATION_CODES[teacher.normalize]
    mode = int(p["topk_mode"])
    if mode == TOPK_MODES["dense"]:
        raise ValueError("teacher_topk selects classes of dense teacher logits; a SparseTeacher already is a "
                         "top-K teacher (leave teacher_topk=None)")
    if mode == TOPK_MODES["sparse"] and int(p["topk_norm"]) != code:
        raise ValueError(f"the packed spec's normalisation ({int(p['topk_norm'])}) differs from the "
                         f"SparseTeacher's {teacher.normalize!r}")
    return code


def _check_sparse(s, ids, logprobs, spec, p: dict) -> None:
    """What the launch needs, with an error naming the option for everything it does not compute."""
    if spec.learnable_temperature:
        raise NotImplementedError("kdkernels triton: a learnable temperature is not supported with a sparse teacher")
    for field, what in _UNSUPPORTED:
        if p[field]:
            raise NotImplementedError(f"kdkernels triton: {what} is not supported with a sparse teacher")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"kdkernels triton: SparseTeacher.ids must be int32 or int64 here, got {ids.dtype}")
    if not logprobs.is_floating_point():
        raise TypeError(f"kdkernels triton: SparseTeacher.logprobs must be floating point, got {logprobs.dtype}")
    if ids.dim() != 2 or ids.shape != logprobs.shape or ids.shape[0] != s.shape[0]:
        raise ValueError(f"kdkernels triton: SparseTeacher ids/logprobs must be [N, K] with N = {s.shape[0]}, got "
                         f"{tuple(ids.shape)} and {tuple(logprobs.shape)}")
    if not 1 <= ids.shape[1] <= MAX_SPARSE_K:
        raise ValueError(f"kdkernels triton: SparseTeacher K must be in [1, {MAX_SPARSE_K}], got {ids.shape[1]}")


def sparse_checks(norm: int, p: dict, temperature: Optional[torch.Tensor]) -> None:
    """The normalisations' own limits: teacher takes forward KL only, tail a temperature of 1."""
    if norm == NORMALIZATION_CODES["teacher"] and int(p["divergence"]) != DIVERGENCE_CODES["forward_kl"]:
        raise ValueError("normalize='teacher' keeps the student's full-vocabulary log-probabilities, so only "
                         "divergence='forward_kl' is defined")
    if norm == NORMALIZATION_CODES["tail"] and (temperature is not None or p["temperature"] != 1.0):
        raise ValueError("a sparse teacher's tail mass is only defined at the temperature its log-probabilities "
                         "were stored at: normalize='tail' needs temperature=1.0")


def sparse_forward(launcher, s: torch.Tensor, teacher, labels: Optional[torch.Tensor],
                   temperature: Optional[torch.Tensor], spec, grad: Optional[torch.Tensor], grad_factor):
    """The launcher contract's ``forward`` for a :class:`~kdkernels.spec.SparseTeacher`: ``(loss, None)``
    (no learnable temperature with a sparse teacher)."""
    floats, ints = spec.pack()
    p = unpack(floats, ints)
    ids, logprobs = teacher.ids, teacher.logprobs
    _check_sparse(s, ids, logprobs, spec, p)
    norm = _normalization(p, teacher)
    sparse_checks(norm, p, temperature)
    if ids.stride(-1) != 1:
        ids = ids.contiguous()
    if logprobs.stride(-1) != 1:
        logprobs = logprobs.contiguous()
    acc = acc_dtype(s.dtype)
    if grad_factor is not None and not isinstance(grad_factor, torch.Tensor):
        # a plain number (1 = no factor), as the dense launcher accepts
        grad_factor = None if float(grad_factor) == 1.0 else torch.full((s.shape[0],), float(grad_factor),
                                                                         dtype=acc, device=s.device)
    reduce_rows = p["reduction"] != REDUCTION_CODES["none"]
    loss = sparse_distill_fwd(s, ids, logprobs, labels, temperature, grad, grad_factor,
                              param_tensor(floats, s.device, acc), launcher.ticket(s.device) if reduce_rows else None,
                              floats, ints, norm)
    return loss, None
