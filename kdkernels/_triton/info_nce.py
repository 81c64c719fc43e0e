"""Fused symmetric InfoNCE over groups ``[G, M, D]`` (docs/contrastive.md) — Triton kernels and launcher.

Math (per group; ``a`` = student rows with gradient, ``b`` = teacher rows, constant)::

    â_i = a_i / max(‖a_i‖, ε),  b̂_j = b_j / max(‖b_j‖, ε)            (ε = 1e-12, as F.normalize)
    S_ij = â_i·b̂_j / τ
    r_i = LSE_j S_ij   (row LSE),   c_j = LSE_i S_ij   (column LSE)
    L_g = 1/(2M) · Σ_i [(r_i − S_ii) + (c_i − S_ii)],     loss = mean_g L_g

Gradient w.r.t. the student side only (``γ`` = grad of the loss, ``κ = γ/(2GM)``)::

    ∂loss/∂S_ij = κ·W_ij,    W_ij = exp(S_ij − r_i) + exp(S_ij − c_j) − 2·δ_ij
    g_i = ∂loss/∂â_i = (κ/τ) · Σ_j W_ij b̂_j
    â_i·g_i = κ · Σ_j W_ij S_ij                      (a row sum of the tiles: no extra pass over D)
    ∂loss/∂a_i = (g_i − â_i (â_i·g_i)) / ‖a_i‖      if ‖a_i‖ > ε,   else g_i / ε

Kernels (the ``M × M`` matrix ``S`` is never materialised; ``S`` tiles come from ``tl.dot`` of the raw
rows, scaled afterwards by the inverse norms and 1/τ, so the normalisation costs no rounding and no
extra tensor):

* ``_info_nce_fwd_kernel`` — grid ``(⌈M/BM⌉, G, 2)``. Axis 2 picks the direction: 0 streams the rows
  of ``S = â b̂ᵀ/τ`` (x = a, y = b), 1 the rows of ``Sᵀ`` (x = b, y = a), i.e. the columns of ``S``.
  A program computes its x rows' inverse norms, then streams y tiles of ``BN`` rows: one ``tl.dot``
  per ``BD``-chunk of ``D``, the y norms accumulated from the same loads, an online (flash-style)
  max/sum for the LSE, and the diagonal picked out of the tile where ``i == j``. It writes, per row,
  ``lse``, ``lse − S_ii`` (the loss terms) and the inverse norm: ``[2, G, M]`` each, in the
  accumulation dtype. The loss is ``Σ terms / (2GM)`` (one torch reduction).
* ``_info_nce_bwd_kernel`` — grid ``(⌈M/BM⌉, G)``. For each ``BD``-chunk of the output row, it streams
  the b tiles, recomputes ``S`` from the saved norms, forms ``W`` (diagonal folded in) and accumulates
  ``W @ b̂`` (``tl.dot``, accumulation dtype) and ``Σ_j W_ij S_ij``; then applies the normalisation's
  Jacobian and writes ``∂loss/∂a`` in ``a``'s dtype. ``grad_output`` is read on the device (no sync).

Bytes moved (``e`` = element size, ``R = ⌈M/BM⌉`` row blocks, ``C = ⌈D/BD⌉`` chunks of D). The
minimum is reading a and b once (``2·G·M·D·e``) plus writing ∂loss/∂a once (``G·M·D·e``) and ``O(G·M)``
statistics. The forward's programs each read the whole other side, so the loads issued are
``≈ 2·G·M·D·e·(1 + 2R)`` — DRAM traffic stays near ``2·G·M·D·e·R`` worst case and near the minimum when
a group's ``M·D`` fits in L2 (``M·D·e`` = 2 MiB at M = 4096, D = 256, bf16) — and it writes
``3·2·G·M`` accumulation-dtype statistics (not ``M²``). The backward issues ``≈ G·M·D·e·2R·C`` loads
(S is recomputed once per output chunk; ``C = 1`` when ``D ≤ BD``) and writes ``G·M·D·e``. FLOPs:
``4·G·M²·D`` forward (both directions), ``2·G·M²·D·(C + 1)`` backward. Extra memory: the three
``[2, G, M]`` statistics — the reference materialises ``S`` and its softmaxes, ``O(G·M²)``.

Precision: 16-bit inputs go into ``tl.dot`` as they are (exact products, fp32 accumulation); fp32 uses
``input_precision="ieee"`` (set ``ALLOW_TF32 = True`` to trade ~1e-3 relative error for tensor cores);
float64 inputs are computed in float64 throughout (``tl.dot`` on fp64 runs as numpy's matmul in the
interpreter and compiles for sm_80/sm_90 — checked ahead of time), which is what ``gradcheck`` needs.
The accumulation dtype is taken from the statistics buffers' element type (fp32, or fp64 for fp64
inputs); τ enters as an fp32 hi/lo pair (Triton passes Python floats as fp32), recombined in the
accumulation dtype; ε is built in the accumulation dtype. The backward's ``W @ b̂`` runs in the
accumulation dtype: W is not rounded to 16 bits (near convergence ``W_ii = P_ii + P'_ii − 2`` cancels).

Interpreter notes (CPU, ``TRITON_INTERPRET=1`` at import): its ``tl.dot`` cannot multiply bf16 (stored
as uint16), so 16-bit operands are upcast to fp32 first (``UPCAST``, exact); its matmul is a slow loop,
so the row tiles shrink to ``M`` there; and the ops register as an opaque ``custom_op`` (``triton_op``
would trace the interpreted kernel with fake tensors under ``torch.compile``).

``tl.dot`` on the GPU needs every tile dimension ≥ 16 (K ≥ 16): ``BM, BN ≥ 16`` and ``BD ≥ 16``, ``D``
padded to a multiple of ``BD`` by masked loads. :func:`shipped_configs` lists every configuration the
launcher can pick, for the ahead-of-time compile check (tests/test_info_nce.py).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

#: fp32 inputs: use TF32 tensor cores in tl.dot (faster, ~1e-3 relative error) instead of IEEE fp32
ALLOW_TF32 = False
#: tile-size overrides (None = the heuristic): tests set these to force the multi-tile paths at small M
BLOCK_M: Optional[int] = None
BLOCK_N: Optional[int] = None
BLOCK_D: Optional[int] = None

#: kernels decorated under the interpreter (TRITON_INTERPRET=1 at import) run on CPU tensors only so
_INTERPRETED_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: the Triton launches made by this module (tests count them; reset by assigning 0)
launch_count = 0


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _info_nce_fwd_kernel(a_ptr, b_ptr, lse_ptr, terms_ptr, rn_ptr,
                         G, M, D, stride_g, stride_m, tau_hi, tau_lo,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    direction = tl.program_id(2)
    acc_ty = rn_ptr.dtype.element_ty                     # fp32, or fp64 for fp64 inputs
    base = g.to(tl.int64) * stride_g
    if direction == 0:                                   # rows of S = â b̂ᵀ / τ
        x_ptr = a_ptr + base
        y_ptr = b_ptr + base
    else:                                                # rows of Sᵀ, i.e. the columns of S
        x_ptr = b_ptr + base
        y_ptr = a_ptr + base
    inv_tau = 1.0 / (tl.cast(tau_hi, acc_ty) + tl.cast(tau_lo, acc_ty))

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_d = tl.arange(0, BLOCK_D)
    row_off = offs_m.to(tl.int64)[:, None] * stride_m

    # inverse norms of this program's x rows
    sq = tl.full([BLOCK_M], 0.0, dtype=acc_ty)
    for k in range(0, D, BLOCK_D):
        mask_d = (k + offs_d) < D
        x = tl.load(x_ptr + row_off + (k + offs_d)[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        x = x.to(acc_ty)
        sq += tl.sum(x * x, 1)
    rn_x = 1.0 / tl.maximum(tl.sqrt(sq), tl.full([BLOCK_M], 1e-12, dtype=acc_ty))  # ε exact in fp64
    row_scale = rn_x * inv_tau

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=acc_ty)
    l_i = tl.full([BLOCK_M], 0.0, dtype=acc_ty)
    diag = tl.full([BLOCK_M], 0.0, dtype=acc_ty)
    for n0 in range(0, M, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < M
        col_off = offs_n.to(tl.int64)[:, None] * stride_m
        dot = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=acc_ty)
        ysq = tl.full([BLOCK_N], 0.0, dtype=acc_ty)
        for k in range(0, D, BLOCK_D):
            mask_d = (k + offs_d) < D
            x = tl.load(x_ptr + row_off + (k + offs_d)[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            y = tl.load(y_ptr + col_off + (k + offs_d)[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            if UPCAST:
                x = x.to(acc_ty)
                y = y.to(acc_ty)
            dot = tl.dot(x, tl.trans(y), dot, input_precision=DOT_PRECISION, out_dtype=acc_ty)
            yf = y.to(acc_ty)
            ysq += tl.sum(yf * yf, 1)
        rn_y = 1.0 / tl.maximum(tl.sqrt(ysq), tl.full([BLOCK_N], 1e-12, dtype=acc_ty))
        s = dot * row_scale[:, None] * rn_y[None, :]
        s = tl.where(mask_n[None, :], s, float("-inf"))
        is_diag = offs_m[:, None] == offs_n[None, :]
        diag += tl.sum(tl.where(is_diag, s, 0.0), 1)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m_i = m_new
    lse = m_i + tl.log(l_i)

    out = (direction * G + g).to(tl.int64) * M + offs_m
    tl.store(lse_ptr + out, lse, mask=mask_m)
    tl.store(terms_ptr + out, lse - diag, mask=mask_m)
    tl.store(rn_ptr + out, rn_x, mask=mask_m)


@triton.jit
def _info_nce_bwd_kernel(a_ptr, b_ptr, lse_ptr, rn_ptr, gout_ptr, grad_ptr,
                         G, M, D, stride_g, stride_m, tau_hi, tau_lo,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    acc_ty = rn_ptr.dtype.element_ty
    base = g.to(tl.int64) * stride_g
    a_ptr += base
    b_ptr += base
    grad_ptr += base
    inv_tau = 1.0 / (tl.cast(tau_hi, acc_ty) + tl.cast(tau_lo, acc_ty))
    kappa = tl.load(gout_ptr).to(acc_ty) * 0.5 / G / M      # G, M may be constexpr 1

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_d = tl.arange(0, BLOCK_D)
    row_off = offs_m.to(tl.int64)[:, None] * stride_m
    stat_r = g.to(tl.int64) * M                          # direction 0 (rows) statistics
    stat_c = (G + g).to(tl.int64) * M                    # direction 1 (columns) statistics
    rn_a = tl.load(rn_ptr + stat_r + offs_m, mask=mask_m, other=1.0)
    lse_r = tl.load(lse_ptr + stat_r + offs_m, mask=mask_m, other=0.0)
    row_scale = rn_a * inv_tau
    # the normalisation's Jacobian projects out â unless the norm was clamped to ε
    keep_proj = tl.where(rn_a * tl.full([BLOCK_M], 1e-12, dtype=acc_ty) < 0.999999, 1.0, 0.0).to(acc_ty)

    for d0 in range(0, D, BLOCK_D):
        mask_o = (d0 + offs_d) < D
        acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=acc_ty)   # Σ_j W_ij b̂_j, this output chunk
        ws = tl.full([BLOCK_M], 0.0, dtype=acc_ty)              # Σ_j W_ij S_ij
        for n0 in range(0, M, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < M
            col_off = offs_n.to(tl.int64)[:, None] * stride_m
            dot = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=acc_ty)
            for k in range(0, D, BLOCK_D):
                mask_d = (k + offs_d) < D
                x = tl.load(a_ptr + row_off + (k + offs_d)[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
                y = tl.load(b_ptr + col_off + (k + offs_d)[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
                if UPCAST:
                    x = x.to(acc_ty)
                    y = y.to(acc_ty)
                dot = tl.dot(x, tl.trans(y), dot, input_precision=DOT_PRECISION, out_dtype=acc_ty)
            rn_b = tl.load(rn_ptr + stat_c + offs_n, mask=mask_n, other=0.0)
            lse_c = tl.load(lse_ptr + stat_c + offs_n, mask=mask_n, other=0.0)
            s = dot * row_scale[:, None] * rn_b[None, :]
            w = tl.exp(s - lse_r[:, None]) + tl.exp(s - lse_c[None, :])
            w = tl.where(offs_m[:, None] == offs_n[None, :], w - 2.0, w)
            w = tl.where(mask_n[None, :], w, 0.0)
            ws += tl.sum(w * s, 1)
            yb = tl.load(b_ptr + col_off + (d0 + offs_d)[None, :], mask=mask_n[:, None] & mask_o[None, :], other=0.0)
            yb = yb.to(acc_ty) * rn_b[:, None]
            acc = tl.dot(w, yb, acc, input_precision=DOT_PRECISION, out_dtype=acc_ty)
        xa = tl.load(a_ptr + row_off + (d0 + offs_d)[None, :], mask=mask_m[:, None] & mask_o[None, :], other=0.0)
        xa = xa.to(acc_ty) * rn_a[:, None]
        proj = kappa * ws * keep_proj                        # â_i·g_i
        grad = rn_a[:, None] * ((kappa * inv_tau) * acc - xa * proj[:, None])
        tl.store(grad_ptr + row_off + (d0 + offs_d)[None, :], grad.to(grad_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_o[None, :])


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pow2_at_least(n: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def default_tiles(D: int, dtype: torch.dtype):
    """The heuristic (BM, BN, BD, num_warps): every value it can return is in :func:`shipped_configs`."""
    wide = dtype == torch.float64
    bm = bn = 32 if wide else 64
    # fp32/fp64 stop at BD = 64: at 128 the fp32 forward needs 132 KB of shared memory, more than sm_86 /
    # sm_89 offer (99 KB); 16-bit operands go to 128 (48 KB). D > BD loops over D in BD chunks.
    bd = min(_pow2_at_least(D, 16), 128 if dtype in (torch.bfloat16, torch.float16) else 64)
    return bm, bn, bd, (8 if bd >= 128 else 4)


def tiles(M: int, D: int, dtype: torch.dtype, block_m: int = 0, block_n: int = 0, block_d: int = 0):
    """(BM, BN, BD, num_warps) for a launch: arguments > 0, else the module overrides, else the heuristic."""
    bm, bn, bd, warps = default_tiles(D, dtype)
    if _INTERPRETED_AT_IMPORT:
        # the interpreter's tl.dot is numpy's matmul with dtype= (a plain loop, ~36 ms for 64×128×64):
        # shrink the row tiles to the problem there; the GPU keeps the shipped (compile-checked) tiles
        bm = bn = min(bm, _pow2_at_least(M, 16))
    bm = block_m or BLOCK_M or bm
    bn = block_n or BLOCK_N or bn
    bd = block_d or BLOCK_D or bd
    for name, v in (("block_m", bm), ("block_n", bn), ("block_d", bd)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot tiles), got {v}")
    return bm, bn, bd, warps


def _precision(a: torch.Tensor) -> str:
    return "tf32" if ALLOW_TF32 and a.dtype == torch.float32 else "ieee"


def _upcast(a: torch.Tensor) -> bool:
    """16-bit tl.dot operands go in as fp32 under the interpreter (it cannot multiply bf16)."""
    return a.element_size() == 2 and _INTERPRETED_AT_IMPORT


def _tau_split(tau: float):
    hi = float(torch.tensor(tau, dtype=torch.float32))
    return hi, float(tau - hi)


def _fwd_impl(a: torch.Tensor, b: torch.Tensor, tau: float, block_m: int, block_n: int, block_d: int):
    global launch_count
    G, M, D = a.shape
    a, b = a.contiguous(), b.contiguous()
    acc = acc_dtype(a.dtype)
    lse = torch.empty((2, G, M), device=a.device, dtype=acc)
    terms = torch.empty_like(lse)
    rn = torch.empty_like(lse)
    bm, bn, bd, warps = tiles(M, D, a.dtype, block_m, block_n, block_d)
    hi, lo = _tau_split(tau)
    launch_count += 1
    _wrap(_info_nce_fwd_kernel)[(triton.cdiv(M, bm), G, 2)](
        a, b, lse, terms, rn, G, M, D, M * D, D, hi, lo,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT_PRECISION=_precision(a), UPCAST=_upcast(a),
        num_warps=warps)
    return terms, lse, rn


def _bwd_impl(grad_out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lse: torch.Tensor, rn: torch.Tensor,
              tau: float, block_m: int, block_n: int, block_d: int):
    global launch_count
    G, M, D = a.shape
    a, b = a.contiguous(), b.contiguous()
    grad = torch.empty_like(a)
    bm, bn, bd, warps = tiles(M, D, a.dtype, block_m, block_n, block_d)
    hi, lo = _tau_split(tau)
    launch_count += 1
    _wrap(_info_nce_bwd_kernel)[(triton.cdiv(M, bm), G)](
        a, b, lse, rn, grad_out.reshape(1), grad, G, M, D, M * D, D, hi, lo,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT_PRECISION=_precision(a), UPCAST=_upcast(a),
        num_warps=warps)
    return grad


# torch.library registration: triton_op + wrap_triton (torch >= 2.6) so torch.compile sees through the
# launches on the GPU; an opaque custom_op + a fake implementation otherwise, and under the interpreter,
# where triton_op's fake-tensor tracing would run the interpreted kernel on fake tensors.
USE_TRITON_OP = (hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
                 and not _INTERPRETED_AT_IMPORT)
_wrap = torch.library.wrap_triton if USE_TRITON_OP else (lambda kernel: kernel)
_register = torch.library.triton_op if USE_TRITON_OP else torch.library.custom_op


@_register("kdkernels::info_nce_fwd", mutates_args=())
def info_nce_fwd(a: torch.Tensor, b: torch.Tensor, tau: float, block_m: int, block_n: int,
                 block_d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(terms, lse, inverse norms), each ``[2, G, M]`` in the accumulation dtype."""
    return _fwd_impl(a, b, tau, block_m, block_n, block_d)


@_register("kdkernels::info_nce_bwd", mutates_args=())
def info_nce_bwd(grad_out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lse: torch.Tensor,
                 rn: torch.Tensor, tau: float, block_m: int, block_n: int, block_d: int) -> torch.Tensor:
    """∂loss/∂a ``[G, M, D]`` in ``a``'s dtype, for the 0-dim ``grad_out`` of the loss."""
    return _bwd_impl(grad_out, a, b, lse, rn, tau, block_m, block_n, block_d)


if not USE_TRITON_OP:
    @info_nce_fwd.register_fake
    def _(a, b, tau, block_m, block_n, block_d):
        G, M, _ = a.shape
        stat = a.new_empty((2, G, M), dtype=acc_dtype(a.dtype))
        return stat, torch.empty_like(stat), torch.empty_like(stat)

    @info_nce_bwd.register_fake
    def _(grad_out, a, b, lse, rn, tau, block_m, block_n, block_d):
        return torch.empty_like(a, memory_format=torch.contiguous_format)


def _batched_first(x: torch.Tensor, dim, batch_size: int) -> torch.Tensor:
    """``x`` with its vmapped dimension first (``dim`` None: broadcast over the batch)."""
    return x.expand(batch_size, *x.shape) if dim is None else x.movedim(dim, 0)


def _stats_batched(x: torch.Tensor, dim, batch_size: int) -> torch.Tensor:
    """Statistics ``[2, G, M]`` with the vmapped dimension second: ``[2, B, G, M]``."""
    return x.expand(batch_size, *x.shape).movedim(0, 1) if dim is None else x.movedim(dim, 1)


def _info_nce_fwd_vmap(info, in_dims, a, b, tau, block_m, block_n, block_d):
    """vmap rule of ``info_nce_fwd``: the vmapped groups ``[B, G, M, D]`` run as one launch of ``B·G``
    groups (groups are independent); the statistics ``[2, B·G, M]`` come back batched along dim 1."""
    B = info.batch_size
    a, b = _batched_first(a, in_dims[0], B), _batched_first(b, in_dims[1], B)
    G, M, D = a.shape[1:]
    outs = torch.ops.kdkernels.info_nce_fwd(a.reshape(B * G, M, D), b.reshape(B * G, M, D), tau,
                                            block_m, block_n, block_d)
    return tuple(o.reshape(2, B, G, M) for o in outs), (1, 1, 1)


def _info_nce_bwd_vmap(info, in_dims, grad_out, a, b, lse, rn, tau, block_m, block_n, block_d):
    """vmap rule of ``info_nce_bwd``: one launch over the ``B·G`` groups with a unit ``grad_out``, then
    each batch entry scaled by its own ``grad_out`` (the kernel reads one scalar) and by ``B`` (the
    kernel's κ divides by the number of groups it sees, ``B·G``, where each entry's loss has ``G``)."""
    B = info.batch_size
    a, b = _batched_first(a, in_dims[1], B), _batched_first(b, in_dims[2], B)
    G, M, D = a.shape[1:]
    lse, rn = _stats_batched(lse, in_dims[3], B), _stats_batched(rn, in_dims[4], B)
    unit = torch.ones((), dtype=lse.dtype, device=a.device)
    grad = torch.ops.kdkernels.info_nce_bwd(unit, a.reshape(B * G, M, D), b.reshape(B * G, M, D),
                                            lse.reshape(2, B * G, M), rn.reshape(2, B * G, M),
                                            tau, block_m, block_n, block_d).reshape(B, G, M, D)
    scale = _batched_first(grad_out, in_dims[0], B).to(grad.dtype) * B
    return grad * scale.reshape(B, 1, 1, 1), 0


if hasattr(torch.library, "register_vmap"):
    torch.library.register_vmap("kdkernels::info_nce_fwd", _info_nce_fwd_vmap)
    torch.library.register_vmap("kdkernels::info_nce_bwd", _info_nce_bwd_vmap)


class InfoNCEFunction(torch.autograd.Function):
    """Fused InfoNCE: forward = one launch (row and column LSEs), backward = one launch (∂/∂a).

    ``forward`` takes no ``ctx`` (``setup_context`` saves what backward needs), so ``torch.func.grad``,
    ``vjp`` and ``vmap`` work; the per-row statistics are extra (non-differentiable) outputs because
    ``setup_context`` may only save inputs and outputs. vmap runs through the ops' own vmap rules
    (``generate_vmap_rule``): a vmapped call is still one forward and one backward launch.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(a, b, tau, block_m=0, block_n=0, block_d=0):
        G, M, _ = a.shape
        terms, lse, rn = torch.ops.kdkernels.info_nce_fwd(a, b, tau, block_m, block_n, block_d)
        return terms.sum() * (0.5 / (G * M)), lse, rn

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, b, tau, block_m, block_n, block_d = inputs
        _, lse, rn = output
        ctx.mark_non_differentiable(lse, rn)
        ctx.save_for_backward(a, b, lse, rn)
        ctx.args = (tau, block_m, block_n, block_d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_lse, _grad_rn):
        if not ctx.needs_input_grad[0]:
            return (None,) * 6
        a, b, lse, rn = ctx.saved_tensors
        grad = torch.ops.kdkernels.info_nce_bwd(grad_out, a, b, lse, rn, *ctx.args)
        return grad, None, None, None, None, None

    @classmethod
    def loss(cls, a, b, tau, block_m=0, block_n=0, block_d=0) -> torch.Tensor:
        """The 0-dim loss (the statistics outputs dropped)."""
        return cls.apply(a, b, tau, block_m, block_n, block_d)[0]


class _Launcher:
    """The contrastive family's Triton launcher (``dispatch.LAUNCHERS["contrastive"]["triton"]``)."""

    @staticmethod
    def unavailable_reason(device: torch.device) -> Optional[str]:
        device = torch.device(device)
        interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "CUDA is not available"
        if device.type == "cpu":
            if not interpreting:
                return "Triton runs on CPU tensors only in the interpreter (set TRITON_INTERPRET=1 before import)"
            if not _INTERPRETED_AT_IMPORT:
                return "TRITON_INTERPRET=1 was set after kdkernels._triton.info_nce was imported"
            return None
        return f"no Triton backend for {device.type} tensors"

    @staticmethod
    def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float, *, block_m: int = 0, block_n: int = 0,
                 block_d: int = 0) -> torch.Tensor:
        """0-dim loss (fp32, or fp64 for fp64 inputs) of groups ``[G, M, D]``; gradient to ``a`` only."""
        if a.dim() != 3 or a.shape != b.shape:
            raise ValueError(f"info_nce expects a and b of the same shape [G, M, D], got "
                             f"{tuple(a.shape)} and {tuple(b.shape)}")
        return InfoNCEFunction.loss(a, b.detach(), float(tau), int(block_m), int(block_n), int(block_d))


launcher = _Launcher()


def shipped_configs():
    """Every kernel configuration the launcher can pick (each dtype × each BD the heuristic can return ×
    TF32 on/off for fp32), as jobs for ``tests/aot_util.aot_compile`` (ahead-of-time GPU compile)."""
    ptr = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float64: "*fp64"}
    scalars = dict(G="i32", M="i32", D="i32", stride_g="i32", stride_m="i32", tau_hi="fp32", tau_lo="fp32")
    jobs = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        x, acc = ptr[dtype], ptr[acc_dtype(dtype)]
        signatures = {
            "_info_nce_fwd_kernel": dict(a_ptr=x, b_ptr=x, lse_ptr=acc, terms_ptr=acc, rn_ptr=acc, **scalars),
            "_info_nce_bwd_kernel": dict(a_ptr=x, b_ptr=x, lse_ptr=acc, rn_ptr=acc, gout_ptr=acc, grad_ptr=x,
                                         **scalars),
        }
        for d in sorted({default_tiles(d, dtype)[2] for d in (1, 16, 32, 64, 128, 1 << 20)}):
            bm, bn, bd, warps = default_tiles(d, dtype)
            for precision in (("ieee", "tf32") if dtype == torch.float32 else ("ieee",)):
                for name, sig in signatures.items():
                    jobs.append(dict(kernel=f"{__name__}:{name}", signature=sig, num_warps=warps,
                                     constexprs=dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT_PRECISION=precision,
                                                     UPCAST=False),
                                     label=f"{name} {str(dtype)[6:]} BM={bm} BN={bn} BD={bd}"
                                           f" {precision} warps={warps}"))
    return jobs
