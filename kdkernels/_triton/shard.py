"""The logit engine on a vocabulary shard (tensor parallel) in Triton: the passes split where statistics cross ranks.

Rank ``r`` of a process group of ``P`` ranks holds the columns ``[offset, offset + C)`` of a ``V``-class row
(labels are global class ids). For the KD family — the KD term with any divergence over the whole
vocabulary, CE, softcap, a temperature (scalar, per-row, or learnable) — and for DKD/AEKT, the unsharded
row needs from the other ranks only its RowRecord: the LSE states (in the logits' units, engine.py "Numerics") of
``s/T``, ``t/T`` and of the raw student (CE), and the student's target logit (CE; the label lives on one
rank); DKD/AEKT add the teacher's target logit and the non-target states of ``s/T`` and ``t/T``::

    launch 1  _shard_stats_kernel   P3 over the local columns → the local RowRecord [N, R]
                                    (m_s, d_s, m_t, d_t, m_raw, d_raw, x_y       x_y = −inf off the owner
                                    [, t_y, m_snt, d_snt, m_tnt, d_tnt])         DKD/AEKT
    all_gather                      [P, N, R] (R values a row from each rank)
    launch 2  _shard_apply_kernel   merges the P records in rank order (lse_merge: the same bits on every
                                    rank), then
              PHASE_SUMS            (a divergence other than forward KL) P5 over the local columns →
                                    (Σ_local qg, Σ_local d) [N, 2];  all_reduce;  then launch 3:
              PHASE_GRADIENT        P6: the gradient of the local columns (× loss_weight, ÷ count for
                                    batchmean, × grad_factor[n]) with the merged statistics and the
                                    global Σqg; forward KL: Σ_local d (the row's KL over the local columns;
                                    DKD: and its NCKD) [2, N], and the row's terms (ok, kd_w·T², nckd_w·T²,
                                    CE + α_n·T²·TCKD) [N, 4] — DKD's row scalars from the merged record
    all_reduce                      Σ_local d [N] (forward KL; [2, N] DKD/AEKT)
    finish (torch, [N])             ℓ_n = kd_w·T²·max(ΣKL, 0) + nckd_w·T²·max(ΣNCKD, 0) + the row's constant
                                    (NaN / 0 rows as the engine), × loss_weight, then the reduction — the
                                    same on every rank

The gradient is the engine's, column for column (``_pass_gradient``/``_column_terms`` with the merged
states): ``kd_w·T·(qg_c − q_c·Σqg) + ce_w·(softmax(s)_c − [c = y])``, × softcap's slope.

A sparse teacher (``_shard_sparse_*``) needs no per-row sum from other ranks: its record holds the stats
pass's state (the full one, or the complement of the ids for tail), the state at 1 (CE), the logit at the
label and the student at the K ids the rank owns; after one all_gather every rank evaluates the K (+ tail)
outcomes with sparse.py's ``sparse_row_terms`` and writes its columns. A dense top-k teacher (renorm,
teacher) first exchanges each shard's support List (``_shard_topk_kernel``, P2'), merges it with ties to
the lower global id (``dense_topk_teacher``) and then is that sparse teacher.

Bytes moved per rank and row of ``C`` local columns: launch 1 reads ``s`` and ``t`` once, launch 3 reads them
once more and writes the gradient: 5 transfers of ``[N, C]`` (an unsharded streamed KD row moves 5 too, a
single-block one 3: a launch cannot keep the row in registers for the next), 7 with launch 2 (another
divergence). Across ranks: ``R`` values a row (all_gather) plus one (forward KL) or two (other divergences)
values a row (all_reduce) — never ``[N, V]``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..spec import REDUCTION_CODES, SparseTeacher
from .divergence import FORWARD_KL
from .engine import (BATCH_BLOCK, P_CE_WEIGHT, P_KD_WEIGHT, P_LOSS_WEIGHT, P_NCKD_WEIGHT, P_SOFTCAP_S, P_TCKD_WEIGHT,
                     REDUCTION_BATCHMEAN, _decoupled_row, _llm_terms, _overrides,
                     _pass_gradient, _pass_row_stats, _pass_sums, _row_transform,
                     _next_pow2, _pass_support, acc_dtype, block_config, kernel_flags, param_tensor, row_ref,
                     row_scales, row_status,
                     row_temperature, scale_rows_, unpack, zero_row, _load_row)
from .row_ops import log_prob, lse_init, lse_merge, lse_norm, softcap, topk_init
from .sparse import NORM_RENORM, NORM_TAIL, load_slots, sparse_row_terms
from .sparse import _pass_stats as _sparse_pass_stats

#: the RowRecord's fields, in their order in memory; a decoupled (DKD/AEKT) spec adds DEC_FIELDS
RECORD_FIELDS = ("m_s", "d_s", "m_t", "d_t", "m_raw", "d_raw", "x_y")
DEC_FIELDS = ("t_y", "m_snt", "d_snt", "m_tnt", "d_tnt")
PHASE_SUMS = tl.constexpr(0)
PHASE_GRADIENT = tl.constexpr(1)
#: the row terms launch 3 writes for the finish: (ok, kd_w·T², nckd_w·T², the row's constant term)
ROW_TERMS = tl.constexpr(4)
#: the per-row parts all-reduced after launch 3: (Σ_local KD terms, Σ_local NCKD terms)
ROW_PARTS = tl.constexpr(2)


def record_width(use_dec: bool) -> int:
    """R, the values of a RowRecord."""
    return len(RECORD_FIELDS) + (len(DEC_FIELDS) if use_dec else 0)


@triton.jit
def shard_label(labels_ptr, row, offset, C, V, ignore_index, HAS_LABELS: tl.constexpr):
    """(y_local, owned, ignored, bad) of one row on this shard: the label as a local column (−1 when
    another rank owns it), whether this rank owns it, whether it is ``ignore_index``, whether it is a bad
    label — outside ``[0, V)`` — (its row is NaN on every rank)."""
    if HAS_LABELS:
        y = tl.load(labels_ptr + row)
        ignored = y == ignore_index
        bad = (y < 0) | (y >= V)
        y_loc = y - offset
        owned = (~bad) & (y_loc >= 0) & (y_loc < C)
        y_loc = tl.where(owned, y_loc, -1).to(tl.int32)
    else:
        y_loc = -1
        owned = False
        ignored = False
        bad = False
    return y_loc, owned, ignored, bad


@triton.jit
def _shard_row(s_ptr, t_ptr, params_ptr, row, C, stride_s_row, stride_t_row, ignored, BLOCK_C: tl.constexpr,
               SINGLE_BLOCK: tl.constexpr, ACC: tl.constexpr, SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr):
    """(RowRef, column offsets, identity Transform) of one local row (an ignored row reads nothing)."""
    offs = tl.arange(0, BLOCK_C)
    zero = tl.full([], 0.0, ACC)
    ref = row_ref(s_ptr + row * stride_s_row, t_ptr + row * stride_t_row, C, offs, (offs < C) & (~ignored),
                  params_ptr, zero, BLOCK_C, SINGLE_BLOCK, ACC, SOFTCAP_S, SOFTCAP_T)
    xf, _, _ = _row_transform(ref, offs, 0, params_ptr, zero, False, False, False, 1, 2, BLOCK_C, SINGLE_BLOCK,
                              ACC, SOFTCAP_S, SOFTCAP_T)
    return ref, offs, xf, zero


@triton.jit
def _owner_logits(ref, y_loc, owned, zero, SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr):
    """(x_y, t_y): the (softcapped) student and teacher logits at the label on the rank that owns it, −inf
    elsewhere (two scalar loads, masked off the owner)."""
    col = tl.maximum(y_loc, 0)
    x_y = tl.load(ref[0] + col, mask=owned, other=-float("inf")).to(zero.dtype)
    t_y = tl.load(ref[1] + col, mask=owned, other=-float("inf")).to(zero.dtype)
    if SOFTCAP_S:
        x_y = softcap(x_y, ref[5])
    if SOFTCAP_T:
        t_y = softcap(t_y, ref[6])
    return x_y, t_y


@triton.jit
def _shard_stats_kernel(s_ptr, t_ptr, labels_ptr, temp_ptr, params_ptr, record_ptr, C, V, offset, stride_s_row,
                        stride_t_row, stride_temp, ignore_index, HAS_LABELS: tl.constexpr,
                        TEMP_IS_TENSOR: tl.constexpr, USE_CE: tl.constexpr, USE_DEC: tl.constexpr,
                        REC: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE_BLOCK: tl.constexpr, ACC: tl.constexpr,
                        SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr):
    """Launch 1, one program per row: P3 over the local columns → the local RowRecord (an ignored row's is
    empty: it reads nothing). Decoupled: the non-target states, and the full ones with the target merged
    in on its owner (P3's own merge)."""
    row = tl.program_id(0).to(tl.int64)
    y_loc, owned, ignored, bad = shard_label(labels_ptr, row, offset, C, V, ignore_index, HAS_LABELS)
    T = row_temperature(temp_ptr, params_ptr, row, stride_temp, TEMP_IS_TENSOR, ACC)
    ref, offs, xf, zero = _shard_row(s_ptr, t_ptr, params_ptr, row, C, stride_s_row, stride_t_row, ignored,
                                     BLOCK_C, SINGLE_BLOCK, ACC, SOFTCAP_S, SOFTCAP_T)
    stats = (lse_init(zero), lse_init(zero), lse_init(zero), lse_init(zero), lse_init(zero))
    x_y = zero - float("inf")
    t_y = zero - float("inf")
    if not ignored:
        if USE_CE or USE_DEC:
            x_y, t_y = _owner_logits(ref, y_loc, owned, zero, SOFTCAP_S, SOFTCAP_T)
        row_stats, _, _, _, _, _ = _pass_row_stats(
            ref, offs, xf, y_loc, (x_y, t_y), 1.0 / T, zero, topk_init(1, 2, ACC), USE_DEC, USE_CE, False, False,
            1, False, False, 1, False, False, 1, 2, 2, BLOCK_C, SINGLE_BLOCK, ACC, SOFTCAP_S, SOFTCAP_T, 0, 0)
        stats = (row_stats[0], row_stats[1], row_stats[4], row_stats[2], row_stats[3])
    out = record_ptr + row * REC
    lse_s, lse_t, lse_raw, lse_snt, lse_tnt = stats
    tl.store(out + 0, lse_s[0])
    tl.store(out + 1, lse_s[1])
    tl.store(out + 2, lse_t[0])
    tl.store(out + 3, lse_t[1])
    tl.store(out + 4, lse_raw[0])
    tl.store(out + 5, lse_raw[1])
    tl.store(out + 6, x_y)
    if USE_DEC:
        tl.store(out + 7, t_y)
        tl.store(out + 8, lse_snt[0])
        tl.store(out + 9, lse_snt[1])
        tl.store(out + 10, lse_tnt[0])
        tl.store(out + 11, lse_tnt[1])


@triton.jit
def _merge_state(state, rec, inv_t):
    return lse_merge(state, (tl.load(rec), tl.load(rec + 1)), inv_t)


@triton.jit
def merged_record(record_ptr, row, N, P, inv_T, zero, USE_DEC: tl.constexpr, REC: tl.constexpr):
    """The row's RowRecord over the whole vocabulary: the P ranks' records ``[P, N, R]`` merged in rank order
    (``lse_merge``, the merge of column blocks; the target logits from their owner) — the same bits on
    every rank. Returns ((lse_s, lse_t, lse_raw, lse_snt, lse_tnt), (x_y, t_y))."""
    lse_s = lse_init(zero)
    lse_t = lse_init(zero)
    lse_raw = lse_init(zero)
    lse_snt = lse_init(zero)
    lse_tnt = lse_init(zero)
    x_y = zero - float("inf")
    t_y = zero - float("inf")
    for r in range(0, P):
        rec = record_ptr + (r * N + row) * REC
        lse_s = _merge_state(lse_s, rec + 0, inv_T)
        lse_t = _merge_state(lse_t, rec + 2, inv_T)
        lse_raw = _merge_state(lse_raw, rec + 4, 1.0)
        x_y = tl.maximum(x_y, tl.load(rec + 6))
        if USE_DEC:
            t_y = tl.maximum(t_y, tl.load(rec + 7))
            lse_snt = _merge_state(lse_snt, rec + 8, inv_T)
            lse_tnt = _merge_state(lse_tnt, rec + 10, inv_T)
    return (lse_s, lse_t, lse_raw, lse_snt, lse_tnt), (x_y, t_y)


@triton.jit
def _shard_apply_kernel(s_ptr, t_ptr, labels_ptr, temp_ptr, gfactor_ptr, params_ptr, record_ptr, sums_ptr, grad_ptr,
                        part_ptr, terms_ptr, N, C, V, offset, P, stride_s_row, stride_t_row, stride_g_row,
                        stride_temp, stride_gfactor, ignore_index, HAS_LABELS: tl.constexpr,
                        TEMP_IS_TENSOR: tl.constexpr, HAS_GFACTOR: tl.constexpr, WRITE_GRAD: tl.constexpr,
                        PHASE: tl.constexpr, REDUCTION: tl.constexpr, USE_KD: tl.constexpr, USE_CE: tl.constexpr,
                        USE_DEC: tl.constexpr, ADAPTIVE: tl.constexpr, WANT_DTEMP: tl.constexpr,
                        REC: tl.constexpr, BLOCK_C: tl.constexpr,
                        SINGLE_BLOCK: tl.constexpr, ACC: tl.constexpr, BATCH_BLOCK: tl.constexpr,
                        DIVERGENCE: tl.constexpr, SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr):
    """Launches 2 and 3, one program per row: the merged RowRecord, then P5 (PHASE_SUMS: this shard's
    (Σqg, Σd[, a1, a2, a3]) → ``sums_ptr`` [N, 2 or 5] — the a's: a learnable temperature's sums) or P6
    (PHASE_GRADIENT: the local gradient; this shard's KD and NCKD
    sums → ``part_ptr`` [ROW_PARTS, N]; the row terms (ok, kd_w·T², nckd_w·T², constant: CE and α·T²·TCKD)
    → ``terms_ptr`` [N, ROW_TERMS])."""
    row = tl.program_id(0).to(tl.int64)
    y_loc, owned, ignored, bad = shard_label(labels_ptr, row, offset, C, V, ignore_index, HAS_LABELS)
    T = row_temperature(temp_ptr, params_ptr, row, stride_temp, TEMP_IS_TENSOR, ACC)
    inv_T = 1.0 / T
    ref, offs, xf, zero = _shard_row(s_ptr, t_ptr, params_ptr, row, C, stride_s_row, stride_t_row, ignored,
                                     BLOCK_C, SINGLE_BLOCK, ACC, SOFTCAP_S, SOFTCAP_T)
    HAVE_COUNT: tl.constexpr = REDUCTION == REDUCTION_BATCHMEAN and WRITE_GRAD and PHASE == PHASE_GRADIENT
    count, row_scale, g_scale = row_scales(labels_ptr, gfactor_ptr, row, stride_gfactor, N, ignore_index,
                                           tl.load(params_ptr + P_LOSS_WEIGHT), HAS_LABELS, HAVE_COUNT, HAS_GFACTOR,
                                           BATCH_BLOCK, ACC)
    g_row = grad_ptr + row * stride_g_row
    kd_w = tl.load(params_ptr + P_KD_WEIGHT)
    nckd_w = tl.load(params_ptr + P_NCKD_WEIGHT)
    kl = (zero, zero, zero, zero)
    a = (zero, zero, zero)
    sum_qg = zero
    ok = zero
    const = zero
    if ignored:
        if WRITE_GRAD and PHASE == PHASE_GRADIENT:
            zero_row(g_row, C, offs, BLOCK_C, ACC)
    else:
        states, target = merged_record(record_ptr, row, N, P, inv_T, zero, USE_DEC, REC)
        lse_s, lse_t, lse_raw, lse_snt, lse_tnt = states
        row_nan, row_ok = row_status(lse_s, lse_t, bad)
        norm_s = lse_norm(lse_s)
        norm_t = lse_norm(lse_t)
        norm_raw = lse_norm(lse_raw)
        norm_snt = lse_norm(lse_snt)
        norm_tnt = lse_norm(lse_tnt)
        # the engine's row scalars: CE and DKD/AEKT's (q_y, p_y, α_n, TCKD), from the merged record
        if USE_CE:
            const += tl.load(params_ptr + P_CE_WEIGHT) * -log_prob(target[0], norm_raw, 1.0)
        dec = (zero, zero, zero)
        if USE_DEC:
            q_y, p_y, alpha_n, tckd = _decoupled_row(norm_s, norm_t, norm_snt, norm_tnt, target, inv_T,
                                                     tl.load(params_ptr + P_TCKD_WEIGHT), params_ptr, ADAPTIVE)
            dec = (q_y, p_y, alpha_n)
            const += T * T * alpha_n * tckd
        # the engine's records, with only the fields of this family live (engine._column_terms documents them)
        norms = (norm_s, norm_t, norm_snt, norm_tnt, norm_s, norm_t, norm_s, norm_t)
        temps = (T, inv_T, T, T, inv_T, inv_T)
        weights = (kd_w, nckd_w, zero, zero)
        unused_list = (tl.zeros([2], tl.int32), tl.zeros([2], ACC))
        tdl = (unused_list[0], unused_list[0], zero, zero, zero, zero, zero, zero)
        _, llm = _llm_terms(params_ptr, topk_init(1, 2, ACC), (lse_init(zero), lse_init(zero)), norm_s, norm_t, T,
                            inv_T, kd_w, row_ok, 0, zero, DIVERGENCE, 0, 0)
        if PHASE == PHASE_SUMS:
            # the learnable-T sums are shifted by the row maxima, as in the engine (exact for any shift)
            shifts = (tl.where(lse_s[0] == -float("inf"), 0.0, lse_s[0]),
                      tl.where(lse_t[0] == -float("inf"), 0.0, lse_t[0]))
            kl, _, a, _, dsum = _pass_sums(ref, offs, xf, y_loc, norms, temps, weights, dec, unused_list, tdl,
                                           shifts, llm, zero, USE_KD, WANT_DTEMP, USE_DEC, False, False, 1, False,
                                           False, False, 1, 2, 2, BLOCK_C, SINGLE_BLOCK, ACC, SOFTCAP_S, SOFTCAP_T,
                                           DIVERGENCE, 0, 0)
            sum_qg = dsum[0]
        else:
            if DIVERGENCE != FORWARD_KL:  # the global Σqg (launch 2, all-reduced; no learnable T here)
                llm = (llm[0], tl.load(sums_ptr + row * 2), llm[2], llm[3], llm[4], llm[5], llm[6], llm[7], llm[8],
                       llm[9])
            kl = _pass_gradient(ref, offs, xf, y_loc, g_row, norms, temps, weights, dec, unused_list, tdl,
                                (zero, zero), (zero, zero, zero, 0, zero),
                                (tl.load(params_ptr + P_CE_WEIGHT), norm_raw), (g_scale, row_ok, row_nan), llm, zero,
                                WRITE_GRAD, DIVERGENCE != FORWARD_KL, USE_KD, False, USE_DEC, USE_CE, False, False,
                                1, False, False, False, 1, 2, 2, BLOCK_C, SINGLE_BLOCK, ACC, SOFTCAP_S, SOFTCAP_T,
                                DIVERGENCE, 0, 0)
        ok = tl.where(row_ok, 1.0, 0.0)
        const = tl.where(row_ok, const, tl.where(row_nan, float("nan"), 0.0))
    if PHASE == PHASE_SUMS:
        SUMS_WIDTH: tl.constexpr = 5 if WANT_DTEMP else 2
        tl.store(sums_ptr + row * SUMS_WIDTH, sum_qg)
        tl.store(sums_ptr + row * SUMS_WIDTH + 1, kl[0])
        if WANT_DTEMP:
            tl.store(sums_ptr + row * SUMS_WIDTH + 2, a[0])
            tl.store(sums_ptr + row * SUMS_WIDTH + 3, a[1])
            tl.store(sums_ptr + row * SUMS_WIDTH + 4, a[2])
    else:
        tl.store(part_ptr + row, kl[0])  # part is [ROW_PARTS, N]: each part contiguous for its all_reduce
        tl.store(part_ptr + N + row, kl[1])
        tl.store(terms_ptr + row * ROW_TERMS, ok)
        tl.store(terms_ptr + row * ROW_TERMS + 1, ok * kd_w * T * T)
        tl.store(terms_ptr + row * ROW_TERMS + 2, ok * nckd_w * T * T)
        tl.store(terms_ptr + row * ROW_TERMS + 3, const)


# -------------------------------------------------------------------------------------------------
# a sparse teacher (sparse.py's row on a shard): its record is complete, no per-row sum crosses ranks
# -------------------------------------------------------------------------------------------------
#: the sparse RowRecord's leading fields; then the student's (softcapped) logit at each of the K_PAD slots
#: (−inf where another rank owns the id, or for padding)
SPARSE_FIELDS = ("m_a", "d_a", "m_raw", "d_raw", "x_y")
SPARSE_HEAD = tl.constexpr(len(SPARSE_FIELDS))


@triton.jit
def _shard_sparse_stats_kernel(s_ptr, ids_ptr, lp_ptr, labels_ptr, temp_ptr, params_ptr, record_ptr, C, K, V,
                               offset, stride_s_row, stride_ids_row, stride_lp_row, stride_temp, ignore_index,
                               HAS_LABELS: tl.constexpr, TEMP_IS_TENSOR: tl.constexpr, USE_KD: tl.constexpr,
                               USE_CE: tl.constexpr, NORM: tl.constexpr, SOFTCAP_S: tl.constexpr,
                               K_PAD: tl.constexpr, LOG_K_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
                               SINGLE_BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Launch 1 against a sparse teacher, one program per row: the student at the slots this rank owns and,
    when the row streams (CE, teacher, tail), the stats pass over the local columns — the full state at T
    (teacher) or the complement of the ids (tail), the state at 1 (CE) — and the logit at the label."""
    row = tl.program_id(0).to(tl.int64)
    y_loc, owned, ignored, bad = shard_label(labels_ptr, row, offset, C, V, ignore_index, HAS_LABELS)
    T = row_temperature(temp_ptr, params_ptr, row, stride_temp, TEMP_IS_TENSOR, ACC)
    zero = tl.full([], 0.0, ACC)
    s_row = s_ptr + row * stride_s_row
    cap = zero
    if SOFTCAP_S:
        cap = tl.load(params_ptr + P_SOFTCAP_S)
    offs = tl.arange(0, BLOCK_C)
    NEED_FULL: tl.constexpr = USE_KD and NORM != NORM_RENORM
    NEED_RAW: tl.constexpr = USE_CE and not (USE_KD and NORM == NORM_TAIL)
    state = lse_init(zero)
    raw = lse_init(zero)
    x_y = zero - float("inf")
    x_k = tl.full([K_PAD], -float("inf"), ACC)
    if not ignored:
        idx, mine, _, _, x_k = load_slots(ids_ptr + row * stride_ids_row, lp_ptr + row * stride_lp_row, s_row,
                                          K, C, V, offset, cap, zero, SOFTCAP_S, K_PAD)
        if NEED_FULL or USE_CE:
            state, raw, _ = _sparse_pass_stats(s_row, C, idx, mine, cap, 1.0 / T, offs, zero, NEED_FULL, NEED_RAW,
                                               NORM, SOFTCAP_S, K_PAD, LOG_K_PAD, BLOCK_C, SINGLE_BLOCK, False, ACC)
        if USE_CE:
            x_y = tl.load(s_row + tl.maximum(y_loc, 0), mask=owned, other=-float("inf")).to(ACC)
            if SOFTCAP_S:
                x_y = softcap(x_y, cap)
    out = record_ptr + row * (SPARSE_HEAD + K_PAD)
    tl.store(out + 0, state[0])
    tl.store(out + 1, state[1])
    tl.store(out + 2, raw[0])
    tl.store(out + 3, raw[1])
    tl.store(out + 4, x_y)
    tl.store(out + SPARSE_HEAD + tl.arange(0, K_PAD), x_k)


@triton.jit
def _shard_sparse_apply_kernel(s_ptr, ids_ptr, lp_ptr, labels_ptr, temp_ptr, gfactor_ptr, params_ptr, record_ptr,
                               grad_ptr, rows_ptr, N, C, K, V, offset, P, stride_s_row, stride_ids_row,
                               stride_lp_row, stride_g_row, stride_temp, stride_gfactor, ignore_index,
                               HAS_LABELS: tl.constexpr, TEMP_IS_TENSOR: tl.constexpr, HAS_GFACTOR: tl.constexpr,
                               WRITE_GRAD: tl.constexpr, REDUCTION: tl.constexpr, USE_KD: tl.constexpr,
                               USE_CE: tl.constexpr, NORM: tl.constexpr, DIVERGENCE: tl.constexpr,
                               SOFTCAP_S: tl.constexpr, K_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
                               SINGLE_BLOCK: tl.constexpr, ACC: tl.constexpr, BATCH_BLOCK: tl.constexpr):
    """Launch 2 against a sparse teacher, one program per row: the P records merged (the slots' student
    logits from their owners), the row's loss × loss_weight → ``rows_ptr`` (the whole row's, the same on
    every rank), and the local gradient: the off-support formula on every local column, then the slots
    this rank owns overwritten (sparse.py's ``_sparse_row``, with merged statistics)."""
    row = tl.program_id(0).to(tl.int64)
    y_loc, owned, ignored, bad = shard_label(labels_ptr, row, offset, C, V, ignore_index, HAS_LABELS)
    T = row_temperature(temp_ptr, params_ptr, row, stride_temp, TEMP_IS_TENSOR, ACC)
    inv_T = 1.0 / T
    zero = tl.full([], 0.0, ACC)
    offs = tl.arange(0, BLOCK_C)
    s_row = s_ptr + row * stride_s_row
    g_row = grad_ptr + row * stride_g_row
    loss_w = tl.load(params_ptr + P_LOSS_WEIGHT)
    HAVE_COUNT: tl.constexpr = REDUCTION == REDUCTION_BATCHMEAN and WRITE_GRAD
    count, row_scale, g_scale = row_scales(labels_ptr, gfactor_ptr, row, stride_gfactor, N, ignore_index, loss_w,
                                           HAS_LABELS, HAVE_COUNT, HAS_GFACTOR, BATCH_BLOCK, ACC)
    loss = zero
    if ignored:
        if WRITE_GRAD:
            zero_row(g_row, C, offs, BLOCK_C, ACC)
    else:
        cap = zero
        if SOFTCAP_S:
            cap = tl.load(params_ptr + P_SOFTCAP_S)
        idx, mine, lp, slots_bad, x_k = load_slots(ids_ptr + row * stride_ids_row, lp_ptr + row * stride_lp_row,
                                                   s_row, K, C, V, offset, cap, zero, SOFTCAP_S, K_PAD)
        state = lse_init(zero)
        raw = lse_init(zero)
        x_y = zero - float("inf")
        for r in range(0, P):
            rec = record_ptr + (r * N + row) * (SPARSE_HEAD + K_PAD)
            state = _merge_state(state, rec, inv_T)
            raw = _merge_state(raw, rec + 2, 1.0)
            x_y = tl.maximum(x_y, tl.load(rec + 4))
            x_k = tl.maximum(x_k, tl.load(rec + SPARSE_HEAD + tl.arange(0, K_PAD)))
        cache = tl.zeros([BLOCK_C], ACC)
        if SINGLE_BLOCK and WRITE_GRAD and (USE_CE or (USE_KD and NORM != NORM_RENORM)):
            cache = _load_row(s_row, offs, C, cap, cap, False, True, ACC, SOFTCAP_S)
        loss = sparse_row_terms(s_row, g_row, C, y_loc, idx, mine, lp, x_k, x_y, state, raw, bad | slots_bad, T,
                                inv_T, g_scale, cap, cache, params_ptr, offs, zero, WRITE_GRAD, USE_KD, USE_CE, NORM,
                                DIVERGENCE, SOFTCAP_S, K_PAD, BLOCK_C, SINGLE_BLOCK, ACC)
    tl.store(rows_ptr + row, loss)


# -------------------------------------------------------------------------------------------------
# a dense top-k teacher (renorm, teacher): the global support first, then the sparse teacher's split
# -------------------------------------------------------------------------------------------------
@triton.jit
def _shard_topk_kernel(s_ptr, t_ptr, labels_ptr, params_ptr, record_ptr, C, V, offset, stride_s_row, stride_t_row,
                       ignore_index, HAS_LABELS: tl.constexpr, TOPK_K: tl.constexpr, K_PAD: tl.constexpr,
                       BLOCK_C: tl.constexpr, SINGLE_BLOCK: tl.constexpr, ACC: tl.constexpr,
                       SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr):
    """Launch 0 of a dense top-k teacher, one program per row: the local support List (P2', the teacher's
    TOPK_K largest softcapped logits, ties to the lower column) as (key, global id) — ids as exact
    accumulation-dtype values (< 2^24), −1 for a slot without a column — and the local LSE sums of s and t
    (NaN when the shard holds a NaN or +inf: its row is NaN on every rank)."""
    row = tl.program_id(0).to(tl.int64)
    ignored = shard_label(labels_ptr, row, offset, C, V, ignore_index, HAS_LABELS)[2]
    ref, offs, xf, zero = _shard_row(s_ptr, t_ptr, params_ptr, row, C, stride_s_row, stride_t_row, ignored,
                                     BLOCK_C, SINGLE_BLOCK, ACC, SOFTCAP_S, SOFTCAP_T)
    sup = topk_init(TOPK_K, K_PAD, ACC)
    d_s = zero
    d_t = zero
    if not ignored:
        sup = _pass_support(ref, offs, xf, TOPK_K, K_PAD, BLOCK_C, SINGLE_BLOCK, ACC, SOFTCAP_S, SOFTCAP_T)
        row_stats = _pass_row_stats(
            ref, offs, xf, -1, (zero, zero), 1.0 + zero, zero, topk_init(1, 2, ACC), False, False, False, False, 1,
            False, False, 1, False, False, 1, 2, 2, BLOCK_C, SINGLE_BLOCK, ACC, SOFTCAP_S, SOFTCAP_T, 0, 0)
        d_s = row_stats[0][0][1]
        d_t = row_stats[0][1][1]
    key = sup[0]
    idx = sup[1]
    real = (idx >= 0) & (idx < C)
    out = record_ptr + row * (2 + 2 * K_PAD)
    tl.store(out + 0, d_s)
    tl.store(out + 1, d_t)
    slot = tl.arange(0, K_PAD)
    tl.store(out + 2 + slot, tl.where(real, key, -float("inf")))
    tl.store(out + 2 + K_PAD + slot, tl.where(real, idx + offset, -1).to(ACC))


# -------------------------------------------------------------------------------------------------
# launchers
# -------------------------------------------------------------------------------------------------
def shard_unsupported(spec, temperature: Optional[torch.Tensor]) -> Optional[str]:
    """Why the split does not take a :class:`~kdkernels.LogitDistill` spec (None when it does): it takes the
    KD family — the KD term with any divergence over the whole vocabulary, CE, softcap, a fixed or learnable
    temperature — DKD/AEKT, sparse teachers and dense top-k teachers (renorm, teacher: dense_topk_teacher
    turns them into sparse ones); the other presets run the sharded formulas (kdkernels.parallel)."""
    for what, used in (("standardize", spec.standardize), ("teacher_topk_scale", spec.teacher_topk_scale),
                       ("LDRLD's relation term", spec.relation),
                       ("TopKD's TDL", spec.tdl),
                       ("a dense top-k teacher with normalize='tail'",
                        spec.teacher_topk is not None and spec.teacher_topk.normalize == "tail"),
                       ("DTKD", spec.dtkd_weight != 0), ("value='cross_entropy'", spec.value != "kl")):
        if used:
            return what
    return None


class ShardLauncher:
    """The launcher contract of :mod:`kdkernels.engine` on a vocabulary shard: ``forward`` runs the split
    (launches 1–3 and the collectives of the module docstring) and returns the unsharded loss; the
    gradient it writes is this shard's slice. One object per (group, offset, vocabulary)."""

    name = "triton"
    contract = 2

    def __init__(self, group, offset: int, vocab: int):
        self.group, self.offset, self.vocab = group, offset, vocab

    def forward(self, s, t, labels, temperature, spec, grad, grad_factor):
        if isinstance(t, SparseTeacher):
            return sparse_shard_forward(s, t, labels, temperature, spec, grad, grad_factor, self)
        return shard_forward(s, t, labels, temperature, spec, grad, grad_factor, self)

    def scale_(self, grad, factor):
        scale_rows_(grad, factor)


def shard_forward(s, t, labels, temperature, spec, grad, grad_factor, shard: ShardLauncher):
    """``(loss, None)`` of ``spec`` on this rank's shard ``s``, ``t`` ``[N, C]``; writes ``grad`` when given."""
    from ..parallel import all_gather_records, all_reduce
    N, C = s.shape
    acc = acc_dtype(s.dtype)
    floats, ints = spec.pack()
    p = unpack(floats, ints)
    learnable = spec.learnable_temperature
    params = param_tensor(floats, s.device, acc)
    flags = kernel_flags(p, learnable=learnable, has_labels=labels is not None, temp_is_tensor=temperature is not None,
                         has_gfactor=grad_factor is not None, write_grad=grad is not None, dtype=s.dtype, C=C)
    block, single, num_warps = block_config(C)
    use_dec = flags["USE_DEC"]
    rec = record_width(use_dec)
    row_flags = dict(HAS_LABELS=flags["HAS_LABELS"], TEMP_IS_TENSOR=flags["TEMP_IS_TENSOR"], USE_CE=flags["USE_CE"],
                     USE_DEC=use_dec, REC=rec, BLOCK_C=block, SINGLE_BLOCK=single, ACC=flags["ACC"],
                     SOFTCAP_S=flags["SOFTCAP_S"], SOFTCAP_T=flags["SOFTCAP_T"])
    dummy = params
    lab = labels if labels is not None else dummy
    temp = temperature if temperature is not None else dummy
    stride_temp = temperature.stride(0) if temperature is not None else 0
    ignore_index = int(p["ignore_index"])
    record = torch.empty(N, rec, dtype=acc, device=s.device)
    if N > 0:
        _shard_stats_kernel[(N,)](s, t, lab, temp, params, record, C, shard.vocab, shard.offset, s.stride(0),
                                  t.stride(0), stride_temp, ignore_index, num_warps=num_warps, **row_flags)
    records = all_gather_records(record, shard.group)                  # [P, N, R]
    divergence = flags["DIVERGENCE"]

    def apply(phase, sums, part, terms, g):
        if N == 0:
            return
        _shard_apply_kernel[(N,)](
            s, t, lab, temp, grad_factor if grad_factor is not None else dummy, params, records, sums,
            g if g is not None else dummy, part, terms, N, C, shard.vocab, shard.offset, records.shape[0],
            s.stride(0), t.stride(0), g.stride(0) if g is not None else 0, stride_temp,
            grad_factor.stride(0) if grad_factor is not None else 0, ignore_index, HAS_GFACTOR=grad_factor is not None,
            WRITE_GRAD=g is not None, PHASE=phase, REDUCTION=flags["REDUCTION"], USE_KD=flags["USE_KD"],
            ADAPTIVE=flags["ADAPTIVE"], WANT_DTEMP=learnable, BATCH_BLOCK=flags["BATCH_BLOCK"],
            DIVERGENCE=divergence, num_warps=num_warps, **row_flags)

    # every entry of these is written by the launches (an ignored row's too)
    part = torch.empty(ROW_PARTS.value, N, dtype=acc, device=s.device)
    terms = torch.empty(N, ROW_TERMS.value, dtype=acc, device=s.device)
    sums = dummy
    if divergence != FORWARD_KL or learnable:  # launch 2: this shard's sums; all-reduced before the gradient
        sums = torch.empty(N, 5 if learnable else 2, dtype=acc, device=s.device)
        apply(PHASE_SUMS.value, sums, part, terms, None)
        all_reduce(sums, shard.group, "row sums")
    apply(PHASE_GRADIENT.value, sums, part, terms, grad)
    if sums is dummy:  # the KD (and NCKD) parts of the local columns, summed over the ranks
        all_reduce(part[:2] if use_dec else part[:1], shard.group, "row losses")
    else:
        part[0] = sums[:, 1]
    row_scale = p["loss_weight"] / _count(labels, p, N, acc, s.device)
    dtemp = _dtemp(sums, terms, temperature, p, acc) * row_scale if learnable else None
    return _finish(part, terms, row_scale, p), dtemp


def sparse_shard_forward(s, teacher, labels, temperature, spec, grad, grad_factor, shard: ShardLauncher):
    """``(loss, None)`` against a sparse teacher of global ids on this rank's shard ``s`` ``[N, C]``: launch 1
    writes the record (the stats pass's states and the student at the owned slots), one ``all_gather``,
    launch 2 the local gradient and the row losses — no per-row sum crosses ranks."""
    from ..parallel import all_gather_records
    from .sparse import _check_sparse, _k_pad, _normalization, sparse_checks
    N, C = s.shape
    floats, ints = spec.pack()
    p = unpack(floats, ints)
    ids, logprobs = teacher.ids, teacher.logprobs
    _check_sparse(s, ids, logprobs, spec, p)
    norm = _normalization(p, teacher)
    sparse_checks(norm, p, temperature)
    ids = ids if ids.stride(-1) == 1 else ids.contiguous()
    logprobs = logprobs if logprobs.stride(-1) == 1 else logprobs.contiguous()
    acc = acc_dtype(s.dtype)
    params = param_tensor(floats, s.device, acc)
    K = ids.shape[1]
    k_pad = _k_pad(K)
    block, single, num_warps = block_config(C)
    lab = labels if labels is not None else params
    temp = temperature if temperature is not None else params
    stride_temp = temperature.stride(0) if temperature is not None else 0
    row_flags = dict(HAS_LABELS=labels is not None, TEMP_IS_TENSOR=temperature is not None,
                     USE_KD=p["kd_weight"] != 0, USE_CE=p["ce_weight"] != 0, NORM=norm, SOFTCAP_S=p["softcap_s"] != 0,
                     K_PAD=k_pad, BLOCK_C=block, SINGLE_BLOCK=single,
                     ACC=tl.float64 if acc == torch.float64 else tl.float32)
    record = torch.empty(N, SPARSE_HEAD.value + k_pad, dtype=acc, device=s.device)
    rows = torch.empty(N, dtype=acc, device=s.device)
    ignore_index = int(p["ignore_index"])
    if N > 0:
        _shard_sparse_stats_kernel[(N,)](s, ids, logprobs, lab, temp, params, record, C, K, shard.vocab, shard.offset,
                                         s.stride(0), ids.stride(0), logprobs.stride(0), stride_temp, ignore_index,
                                         LOG_K_PAD=k_pad.bit_length() - 1, num_warps=num_warps, **row_flags)
    records = all_gather_records(record, shard.group)                  # [P, N, 5 + K_PAD]
    if N > 0:
        _shard_sparse_apply_kernel[(N,)](
            s, ids, logprobs, lab, temp, grad_factor if grad_factor is not None else params, params, records,
            grad if grad is not None else params, rows, N, C, K, shard.vocab, shard.offset, records.shape[0],
            s.stride(0), ids.stride(0), logprobs.stride(0), grad.stride(0) if grad is not None else 0, stride_temp,
            grad_factor.stride(0) if grad_factor is not None else 0, ignore_index,
            HAS_GFACTOR=grad_factor is not None, WRITE_GRAD=grad is not None, REDUCTION=int(p["reduction"]),
            DIVERGENCE=int(p["divergence"]), BATCH_BLOCK=_overrides["batch_block"] or BATCH_BLOCK,
            num_warps=num_warps, **row_flags)
    if int(p["reduction"]) == REDUCTION_CODES["none"]:
        return rows, None
    return rows.sum() / _count(labels, p, N, acc, s.device), None


def dense_topk_teacher(s, t, labels, spec, shard: ShardLauncher) -> SparseTeacher:
    """The global support of a dense top-k teacher (renorm / teacher) on this rank's shard, as the sparse
    teacher the split then runs: ids [N, k] (global; the teacher's k largest softcapped logits, ties to the
    lower id) and, as "log-probabilities", the softcapped teacher logits there (renorm and teacher
    normalise them over the support at T, so an additive constant does not matter). One launch, one
    ``all_gather`` of [N, 2 + 2·K_PAD]; a row with a NaN / +inf anywhere gets NaN values (a NaN row)."""
    from ..parallel import all_gather_records
    N, C = s.shape
    k = spec.teacher_topk.k
    acc = acc_dtype(s.dtype)
    floats, ints = spec.packed().pack()
    p = unpack(floats, ints)
    params = param_tensor(floats, s.device, acc)
    k_pad = max(_next_pow2(max(k, 2)), 2)
    block, single, num_warps = block_config(C)
    record = torch.empty(N, 2 + 2 * k_pad, dtype=acc, device=s.device)
    if N > 0:
        _shard_topk_kernel[(N,)](s, t, labels if labels is not None else params, params, record, C, shard.vocab,
                                 shard.offset, s.stride(0), t.stride(0), int(p["ignore_index"]),
                                 HAS_LABELS=labels is not None, TOPK_K=k, K_PAD=k_pad, BLOCK_C=block,
                                 SINGLE_BLOCK=single, ACC=tl.float64 if acc == torch.float64 else tl.float32,
                                 SOFTCAP_S=p["softcap_s"] != 0, SOFTCAP_T=p["softcap_t"] != 0, num_warps=num_warps)
    records = all_gather_records(record, shard.group)                  # [P, N, 2 + 2·K_PAD]
    poisoned = torch.isnan(records[:, :, :2]).any(-1).any(0)           # [N]
    keys = records[:, :, 2:2 + k_pad].permute(1, 0, 2).reshape(N, -1)
    ids = records[:, :, 2 + k_pad:].permute(1, 0, 2).reshape(N, -1)
    real = ids >= 0
    # the k best of the P lists by (key desc, id asc): sort by id, then stably by key
    order_ids = torch.where(real, ids, torch.full_like(ids, float(shard.vocab))).sort(dim=-1, stable=True)
    keys = torch.where(real, keys, torch.full_like(keys, -float("inf"))).gather(1, order_ids.indices)
    best = keys.sort(dim=-1, descending=True, stable=True).indices[:, :k]
    top_ids = order_ids.values.gather(1, best)
    top_keys = keys.gather(1, best)
    top_ids = torch.where(top_ids < shard.vocab, top_ids, torch.full_like(top_ids, -1.0)).to(torch.int64)
    top_keys = torch.where(poisoned[:, None], torch.full_like(top_keys, float("nan")), top_keys)
    return SparseTeacher(top_ids, top_keys, spec.teacher_topk.normalize)


def _count(labels, p: dict, N: int, acc, device) -> torch.Tensor:
    """batchmean's divisor (the valid rows, at least 1; on the device), else 1."""
    if int(p["reduction"]) != REDUCTION_CODES["batchmean"]:
        return torch.ones((), dtype=acc, device=device)
    count = torch.full((), N, device=device) if labels is None else (labels != int(p["ignore_index"])).sum()
    return count.clamp(min=1).to(acc)


def _dtemp(sums, terms, temperature, p: dict, acc) -> torch.Tensor:
    """∂ℓ_n/∂T_n of the KD term from the all-reduced sums (engine: kd_w·[2T·KL − (a1 + a2 − KL·a3)]); NaN
    rows NaN, empty and ignored rows 0."""
    kl, a1, a2, a3 = sums[:, 1], sums[:, 2], sums[:, 3], sums[:, 4]
    T = temperature.to(acc)
    d = p["kd_weight"] * (2.0 * T * kl - (a1 + a2 - kl * a3))
    ok, const = terms[:, 0], terms[:, 3]
    return torch.where(ok > 0, d, torch.where(torch.isnan(const), const, torch.zeros_like(d)))


def _finish(part, terms, row_scale, p: dict) -> torch.Tensor:
    """The loss from the all-reduced parts [ROW_PARTS, N] and the row terms [N, ROW_TERMS]: a few ops on
    [N], the same on every rank (each KL clamped at 0 as in the engine; NaN and empty rows as it)."""
    ok, kd_coef, nckd_coef, const = terms.unbind(1)
    kl = kd_coef * part[0].clamp(min=0.0) + nckd_coef * part[1].clamp(min=0.0)
    rows = torch.where(ok > 0, kl + const, const)
    if int(p["reduction"]) == REDUCTION_CODES["none"]:
        return rows * p["loss_weight"]
    return rows.sum() * row_scale
