"""The tensor-parallel cases of tests/test_parallel.py and the worker that runs them on a spawned gloo group.

Every rank builds the same seeded full inputs ``[N, V]``, evaluates the loss unsharded (``process_group=None``)
and on its own vocabulary shard (``process_group=group``), and reports per case the relative error of the
loss and of its gradient slice (and of a replicated input's gradient: a learnable temperature, the hidden
states of fused linear distillation). One spawned group runs every case (process start-up dominates).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import traceback
import zlib

import torch
import torch.distributed as dist

import kdkernels as kdk
from kdkernels.dispatch import unavailable_reason
from kdkernels.parallel import record_exchanges

N, V = 7, 13
#: whether the Triton split runs here (on CPU tensors: under TRITON_INTERPRET=1, as in CI)
SPLIT = unavailable_reason("triton", torch.device("cpu")) is None
#: the unequal shard widths of each group size (their sum is V)
WIDTHS = {2: (8, 5), 3: (5, 3, 5)}
LABELS = (3, -100, 12, 0, 7, 5, -100)          # labels on every shard, two ignored rows
LABELS_ONE_SHARD = (1, 0, 2, -100, 4, 3, 1)    # every label in [0, 5): the other ranks hold none
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def _teacher_near_boundary(t: torch.Tensor) -> torch.Tensor:
    """Ties across the shard boundaries (columns 4|5, 7|8) and a top-k all on the first shard (row 0)."""
    t = t.clone()
    t[:, 4] = t[:, 5] = 3.0
    t[:, 7] = t[:, 8] = 2.5
    t[0, :5] = torch.tensor([9.0, 8.5, 8.0, 7.5, 7.0], dtype=t.dtype)
    return t


def _masked(x: torch.Tensor) -> torch.Tensor:
    """−inf columns confined to one shard (columns 5..7 of rows 1 and 3: all of rank 1's shard at P = 3)."""
    x = x.clone()
    x[1, 5:8] = -math.inf
    x[3, 5:8] = -math.inf
    x[2, 10] = -math.inf
    return x


def _sparse(gen, dtype, padding=True):
    """A sparse teacher of K = 5 global ids per row (distinct, spread over shards; padding slots)."""
    ids = torch.stack([torch.randperm(V, generator=gen)[:5] for _ in range(N)])
    ids[0] = torch.tensor([0, 1, 2, 3, 4])            # all on the first shard
    if padding:
        ids[2, 3:] = -1
    logits = torch.randn(N, 5, generator=gen, dtype=torch.float64) * 2
    logprobs = torch.log_softmax(logits, -1) - 0.3     # not normalised over the support (a truncated top-K)
    return kdk.SparseTeacher(ids, logprobs.to(dtype), "renorm")


def _inputs(gen, dtype, name):
    s = torch.randn(N, V, generator=gen, dtype=torch.float64) * 2
    t = _teacher_near_boundary(torch.randn(N, V, generator=gen, dtype=torch.float64) * 2)
    if "masked" in name:
        s, t = _masked(s), _masked(t)
    return s.to(dtype), t.to(dtype)


def _labels(one_shard=False):
    return torch.tensor(LABELS_ONE_SHARD if one_shard else LABELS)


# name → fn(s, t, group) (labels and other options bound inside)
CASES = {
    "kd": lambda s, t, g: kdk.kd_loss(s, t, 4.0, labels=_labels(), process_group=g),
    "kd_masked": lambda s, t, g: kdk.kd_loss(s, t, 2.0, process_group=g),
    "kd_ce_labels_one_shard": lambda s, t, g: kdk.kd_loss(s, t, 2.0, labels=_labels(True), ce_weight=0.7,
                                                          process_group=g),
    "kd_none_softcap": lambda s, t, g: kdk.kd_loss(s, t, 1.5, reduction="none", softcap=3.0, process_group=g),
    "kd_sum_standardize": lambda s, t, g: kdk.kd_loss(s, t, 2.0, reduction="sum", standardize=True,
                                                      process_group=g),
    "reverse_kl": lambda s, t, g: kdk.kd_loss(s, t, 1.0, divergence="reverse_kl", process_group=g),
    "jsd_masked": lambda s, t, g: kdk.kd_loss(s, t, 1.0, divergence=("jsd", 0.3), process_group=g),
    "tvd": lambda s, t, g: kdk.kd_loss(s, t, 2.0, divergence="tvd", process_group=g),
    "skew_kl": lambda s, t, g: kdk.kd_loss(s, t, 1.0, divergence=("skew_kl", 0.2), process_group=g),
    "topk_tail": lambda s, t, g: kdk.kd_loss(s, t, 1.0, teacher_topk=kdk.TopK(4, "tail"), process_group=g),
    "topk_renorm_rkl": lambda s, t, g: kdk.kd_loss(s, t, 2.0, teacher_topk=kdk.TopK(3, "renorm"),
                                                   divergence="reverse_kl", process_group=g),
    "topk_teacher": lambda s, t, g: kdk.kd_loss(s, t, 1.0, teacher_topk=kdk.TopK(5, "teacher"), process_group=g),
    "dkd": lambda s, t, g: kdk.dkd_loss(s, t, _labels(), 1.0, 8.0, 4.0, process_group=g),
    "aekt_masked": lambda s, t, g: kdk.aekt_loss(s, t, _labels(), process_group=g),
    "dtkd": lambda s, t, g: kdk.dtkd_loss(s, t, 4.0, process_group=g),
    "ldrld": lambda s, t, g: kdk.ldrld_loss(s, t, k=5, process_group=g),
    "ldrld_teacher_masked": lambda s, t, g: kdk.ldrld_loss(s, t, k=4, rank_by="teacher", process_group=g),
    "topkd": lambda s, t, g: kdk.topkd_loss(s, t, _labels(), k=3, process_group=g),
    "tsm_standardize": lambda s, t, g: kdk.kd_loss(s, t, 2.0, labels=_labels(), standardize=True,
                                                   teacher_topk_scale=kdk.TopKScale(k=4), process_group=g),
    "torchtune_forward_kl": lambda s, t, g: kdk.forward_kl_loss(s, t, _labels(), process_group=g),
    "trl_jsd_mean": lambda s, t, g: kdk.generalized_jsd_loss(s, t, None, beta=0.4, temperature=2.0,
                                                             reduction="mean", process_group=g),
}
#: the same losses through the Triton split (kdkernels._triton.shard: row records cross ranks, one fused
#: gradient pass) — the unsharded side runs the default backend; run where Triton runs (the interpreter in CI)
SPLIT_CASES = {
    "split_kd": lambda s, t, g, **kw: kdk.kd_loss(s, t, 4.0, labels=_labels(), process_group=g, **kw),
    "split_kd_masked_ce": lambda s, t, g, **kw: kdk.kd_loss(s, t, 2.0, labels=_labels(), ce_weight=0.7,
                                                            process_group=g, **kw),
    "split_ce_labels_one_shard": lambda s, t, g, **kw: kdk.kd_loss(s, t, 2.0, labels=_labels(True), ce_weight=0.5,
                                                                   reduction="sum", process_group=g, **kw),
    "split_reverse_kl_softcap_none": lambda s, t, g, **kw: kdk.kd_loss(s, t, 1.5, divergence="reverse_kl",
                                                                       softcap=(3.0, 4.0), reduction="none",
                                                                       process_group=g, **kw),
    "split_jsd_masked": lambda s, t, g, **kw: kdk.kd_loss(s, t, 1.0, labels=_labels(), divergence=("jsd", 0.3),
                                                          ce_weight=0.2, process_group=g, **kw),
    "split_tvd": lambda s, t, g, **kw: kdk.kd_loss(s, t, 2.0, divergence="tvd", process_group=g, **kw),
    "split_skew_rkl": lambda s, t, g, **kw: kdk.kd_loss(s, t, 1.0, divergence=("skew_rkl", 0.2), process_group=g,
                                                        **kw),
    "split_dkd": lambda s, t, g, **kw: kdk.dkd_loss(s, t, _labels(), 1.0, 8.0, 4.0, process_group=g, **kw),
    "split_aekt_masked_labels_one_shard": lambda s, t, g, **kw: kdk.aekt_loss(s, t, _labels(True), ce_weight=0.3,
                                                                              reduction="none", process_group=g,
                                                                              **kw),
    "split_topk_renorm_rkl_ce_softcap": lambda s, t, g, **kw: kdk.kd_loss(s, t, 2.0, labels=_labels(), ce_weight=0.5,
                                                                          teacher_topk=kdk.TopK(3, "renorm"),
                                                                          divergence="reverse_kl", softcap=(3.0, 2.5),
                                                                          reduction="none", process_group=g, **kw),
    "split_topk_teacher_masked": lambda s, t, g, **kw: kdk.kd_loss(s, t, 2.0, teacher_topk=kdk.TopK(5, "teacher"),
                                                                   process_group=g, **kw),
    "split_trl_jsd": lambda s, t, g, **kw: kdk.generalized_jsd_loss(s, t, _labels(), beta=0.4, temperature=2.0,
                                                                    process_group=g, **kw),
}
SPARSE_CASES = {
    f"sparse_{norm}": norm for norm in ("renorm", "tail", "teacher")
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
        return math.inf
    fa, fb = a[torch.isfinite(a)], b[torch.isfinite(b)]
    if not torch.equal(a[~torch.isfinite(a)], b[~torch.isfinite(b)]) and not (
            torch.isnan(a[~torch.isfinite(a)]).all() and torch.isnan(b[~torch.isfinite(b)]).all()):
        return math.inf
    if fa.numel() == 0:
        return 0.0
    return float((fa - fb).abs().max() / fb.abs().max().clamp(min=1e-30))


def _backward(out: torch.Tensor) -> None:
    weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * weights).sum().backward()


def _compare(full_fn, shard_fn, leaves_full, leaves_shard, slices):
    """(loss error, [gradient errors]) of shard_fn against full_fn; slices[i]: how leaf i's full gradient maps
    to this rank's (a slice of columns or rows, or None: replicated)."""
    ref = full_fn()
    _backward(ref)
    out = shard_fn()
    _backward(out)
    errs = [_rel(out, ref)]
    for a, b, sl in zip(leaves_shard, leaves_full, slices):
        errs.append(_rel(a.grad, b.grad if sl is None else sl(b.grad)))
    return errs


def run_logit_case(name, dtype, group, offset, width):
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))  # the same on every rank
    s, t = _inputs(gen, dtype, name)
    fn = CASES[name]
    cols = lambda x: x[:, offset:offset + width]  # noqa: E731
    s_full, s_shard = s.clone().requires_grad_(), cols(s).clone().requires_grad_()
    return _compare(lambda: fn(s_full, t, None), lambda: fn(s_shard, cols(t), group),
                    [s_full], [s_shard], [cols])


def run_split_case(name, dtype, group, offset, width):
    """A SPLIT_CASES loss on its shard through the Triton split against the unsharded loss."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    s, t = _inputs(gen, dtype, name)
    fn = SPLIT_CASES[name]
    cols = lambda x: x[:, offset:offset + width]  # noqa: E731
    s_full, s_shard = s.clone().requires_grad_(), cols(s).clone().requires_grad_()
    return _compare(lambda: fn(s_full, t, None), lambda: fn(s_shard, cols(t), group, backend="triton"),
                    [s_full], [s_shard], [cols])


def run_split_special(group, offset, width):
    """The Triton split beyond the case table: rows streamed in blocks of 4 columns, a per-row temperature
    tensor, a bf16 student with an fp32 teacher, fp16 logits (gradient written in backward with grad_output
    folded in), no_grad (no gradient work), an all-−inf student row on one shard only, a NaN on one shard
    (its row NaN on every rank), a learnable temperature. Returns name → [loss error, gradient errors]."""
    from kdkernels._triton.engine import forced_block_c

    gen = torch.Generator().manual_seed(99)
    s, t = _inputs(gen, torch.float64, "masked")
    cols = lambda x: x[:, offset:offset + width]  # noqa: E731
    T = torch.rand(N, generator=gen, dtype=torch.float64) * 2 + 1
    out = {}

    def case(label, s_, t_, fn, grad_scale=1.0):
        s_full, s_shard = s_.clone().requires_grad_(), cols(s_).clone().requires_grad_()
        ref = fn(s_full, t_, None)
        (ref * grad_scale).backward()
        got = fn(s_shard, t_ if isinstance(t_, kdk.SparseTeacher) else cols(t_), group, backend="triton")
        (got * grad_scale).backward()
        out[label] = [_rel(got, ref), _rel(s_shard.grad, cols(s_full.grad))]

    kd = lambda s_, t_, g, **kw: kdk.kd_loss(s_, t_, 2.0, labels=_labels(), ce_weight=0.3, process_group=g, **kw)  # noqa
    with forced_block_c(4):
        case("streamed", s, t, kd)
        case("streamed_jsd", s, t, lambda s_, t_, g, **kw: kdk.kd_loss(s_, t_, 1.0, divergence=("jsd", 0.5),
                                                                      process_group=g, **kw))
    case("row_temperature", s, t, lambda s_, t_, g, **kw: kdk.kd_loss(s_, t_, T, labels=_labels(), ce_weight=0.3,
                                                                      process_group=g, **kw), grad_scale=0.7)
    case("bf16_student_fp32_teacher", s.bfloat16(), t.float(), kd)
    case("fp16", s.half(), t.half(), kd, grad_scale=3.0)
    lonely = s.clone()
    lonely[4, :] = torch.where(torch.arange(V) < 5, -math.inf, lonely[4, :])  # −inf on the first shard only
    lonely[5, 9] = math.nan
    case("masked_one_shard_nan_row", lonely, t, kd)
    case("topk_renorm_nan_outside_support", lonely, t,  # the dense engine reads the whole row: a NaN row
         lambda s_, t_, g, **kw: kdk.kd_loss(s_, t_, 2.0, teacher_topk=kdk.TopK(3, "renorm"), process_group=g, **kw))
    sp = _sparse(gen, torch.float64)
    ids = sp.ids.clone()
    ids[6, 1] = V + 2  # an id outside the vocabulary: that row is NaN on every rank
    for norm in ("tail", "renorm"):
        teacher = kdk.SparseTeacher(ids, sp.logprobs, norm)
        with forced_block_c(4):
            case(f"sparse_{norm}_streamed_bad_id", s, teacher,
                 lambda s_, t_, g, **kw: kdk.kd_loss(s_, teacher, 1.0, labels=_labels(), ce_weight=0.5,
                                                     process_group=g, **kw))
    with torch.no_grad():
        got = kd(cols(s), cols(t), group, backend="triton")
    out["no_grad"] = [_rel(got, kd(s, t, None)), 0.0]
    for reduction in ("batchmean", "none"):  # a learnable per-row temperature (CTKD): exact on every rank
        def ctkd(s_, t_, T_, g, **kw):
            return kdk.kd_loss(s_, t_, T_, labels=_labels(), ce_weight=0.3, reduction=reduction, loss_weight=0.7,
                               process_group=g, **kw)
        s_full, s_shard = s.clone().requires_grad_(), cols(s).clone().requires_grad_()
        T_full, T_shard = T.clone().requires_grad_(), T.clone().requires_grad_()
        out[f"learnable_temperature_{reduction}"] = _compare(
            lambda: ctkd(s_full, t, T_full, None), lambda: ctkd(s_shard, cols(t), T_shard, group, backend="triton"),
            [s_full, T_full], [s_shard, T_shard], [cols, None])
    return out


def run_boundary_checks(group, offset, width) -> dict:
    """What the sharded path refuses (name → the error was raised with its message) and torch.compile's
    graph-break boundary (name → error of the compiled loss and gradient against eager)."""
    from kdkernels.dispatch import BackendUnavailableError

    gen = torch.Generator().manual_seed(7)
    s, t = _inputs(gen, torch.float64, "boundary")
    s, t = s[:, offset:offset + width], t[:, offset:offset + width]
    out = {}

    def refused(name, fn, match):
        try:
            fn()
        except (BackendUnavailableError, ValueError) as exc:
            out[name] = match in str(exc)
        else:
            out[name] = False

    refused("cpu_backend", lambda: kdk.kd_loss(s, t, backend="cpu", process_group=group), "no vocabulary-sharded split")
    if SPLIT:
        refused("triton_ldrld", lambda: kdk.ldrld_loss(s, t, k=3, backend="triton", process_group=group),
                "sharded formulas")
        huge = kdk.LogitDistill(temperature=2.0, teacher_topk=kdk.TopK(3, "renorm"))
        refused("triton_topk_ids_beyond_float32", lambda: kdk.logit_distill(
            s, t, None, huge, backend="triton", process_group=group, vocab_offset=offset, vocab_size=1 << 24),
            "2^24 classes")
    refused("inplace", lambda: kdk.kd_loss(s.clone(), t, inplace=True, process_group=group), "inplace")
    refused("contrastive", lambda: kdk.topkd_loss(s, t, _labels(), k=2, contrastive_weight=0.5,
                                                  process_group=group), "contrastive")

    def loss(x):
        return 2.0 * kdk.kd_loss(x, t, 2.0, labels=_labels(), ce_weight=0.5, process_group=group) + x.sum() * 0.1

    eager_s, comp_s = s.clone().requires_grad_(), s.clone().requires_grad_()
    want = loss(eager_s)
    want.backward()
    got = torch.compile(loss, backend="eager")(comp_s)
    got.backward()
    out["compiled"] = [_rel(got, want), _rel(comp_s.grad, eager_s.grad)]
    return out


def run_sparse_case(norm, dtype, group, offset, width, backend="auto"):
    """A sparse teacher (K = 5 global ids, padding, a row whose ids all sit on the first shard) on the shard
    against the unsharded loss; ``backend="triton"``: through the split (renorm and teacher at T = 2 with a
    divergence / CE, tail at T = 1 with CE and a softcapped student)."""
    gen = torch.Generator().manual_seed(17)
    s, _ = _inputs(gen, dtype, "sparse")
    sp = _sparse(gen, dtype)
    sp = kdk.SparseTeacher(sp.ids, sp.logprobs, norm)
    cols = lambda x: x[:, offset:offset + width]  # noqa: E731
    if backend == "triton":
        kw = {"renorm": dict(temperature=2.0, divergence=("jsd", 0.3)),
              "teacher": dict(temperature=2.0, ce_weight=0.4, reduction="sum"),
              "tail": dict(temperature=1.0, ce_weight=0.5, softcap=(3.0, None), reduction="none")}[norm]
    else:
        kw = dict(temperature=1.0, ce_weight=0.5 if norm == "tail" else 0.0)

    def fn(s_, g):
        return kdk.kd_loss(s_, sp, labels=_labels(), process_group=g, **kw, **({} if g is None else {"backend": backend}))
    s_full, s_shard = s.clone().requires_grad_(), cols(s).clone().requires_grad_()
    return _compare(lambda: fn(s_full, None), lambda: fn(s_shard, group), [s_full], [s_shard], [cols])


def run_temperature_case(dtype, group, offset, width):
    """A learnable per-row temperature (replicated): its gradient, and the logits', on every rank."""
    gen = torch.Generator().manual_seed(5)
    s, t = _inputs(gen, dtype, "temperature")
    T0 = (torch.rand(N, generator=gen, dtype=torch.float64) * 3 + 1).to(dtype)
    cols = lambda x: x[:, offset:offset + width]  # noqa: E731
    s_full, s_shard = s.clone().requires_grad_(), cols(s).clone().requires_grad_()
    T_full, T_shard = T0.clone().requires_grad_(), T0.clone().requires_grad_()
    fn = lambda s_, t_, T_, g: kdk.kd_loss(s_, t_, T_, labels=_labels(), ce_weight=0.3, process_group=g)  # noqa
    return _compare(lambda: fn(s_full, t, T_full, None), lambda: fn(s_shard, cols(t), T_shard, group),
                    [s_full, T_full], [s_shard, T_shard], [cols, None])


def run_linear_case(dtype, group, offset, width, backend="auto"):
    """fused_linear_distill with a vocabulary-sharded student weight and a TeacherHidden sharded likewise
    (``backend="triton"``: the shard's logits through the split, with a JSD)."""
    gen = torch.Generator().manual_seed(11)
    H = 6
    h = (torch.randn(N, H, generator=gen, dtype=torch.float64)).to(dtype)
    W = (torch.randn(V, H, generator=gen, dtype=torch.float64)).to(dtype)
    b = (torch.randn(V, generator=gen, dtype=torch.float64) * 0.1).to(dtype)
    ht = torch.randn(N, H + 2, generator=gen, dtype=torch.float64).to(dtype)
    Wt = torch.randn(V, H + 2, generator=gen, dtype=torch.float64).to(dtype)
    rows = lambda x: x[offset:offset + width]  # noqa: E731
    spec = kdk.LogitDistill(temperature=2.0, ce_weight=0.5,
                            divergence=("jsd", 0.4) if backend == "triton" else "forward_kl")
    leaves_full = [x.clone().requires_grad_() for x in (h, W, b)]
    leaves_shard = [h.clone().requires_grad_(), rows(W).clone().requires_grad_(), rows(b).clone().requires_grad_()]

    def full():
        return kdk.fused_linear_distill(leaves_full[0], leaves_full[1], kdk.TeacherHidden(ht, Wt), _labels(), spec,
                                        student_bias=leaves_full[2], backend="reference")

    def shard():
        return kdk.fused_linear_distill(leaves_shard[0], leaves_shard[1], kdk.TeacherHidden(ht, rows(Wt)),
                                        _labels(), spec, student_bias=leaves_shard[2], process_group=group,
                                        backend=backend)
    return _compare(full, shard, leaves_full, leaves_shard, [None, rows, rows])


def run_dtensor_case(dtype, group, world):
    """DTensor logits sharded on the class dim (torch's even split: unequal when P does not divide V)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(23)
    s, t = _inputs(gen, dtype, "dtensor")
    s_full = s.clone().requires_grad_()
    s_dt = distribute_tensor(s.clone(), mesh, [Shard(1)]).requires_grad_()
    t_dt = distribute_tensor(t.clone(), mesh, [Shard(1)])
    ref = kdk.dkd_loss(s_full, t, _labels(), process_group=None)
    ref.backward()
    out = kdk.dkd_loss(s_dt, t_dt, _labels())
    out.backward()
    local_grad = s_dt.grad.to_local()
    chunk = math.ceil(V / world)
    offset = min(dist.get_rank() * chunk, V)
    return [_rel(out, ref), _rel(local_grad, s_full.grad[:, offset:offset + local_grad.shape[1]])]


def communication(dtype, group, offset, width):
    """Bytes this rank sends per step (forward and backward) for KD and LDRLD, at two vocabulary sizes."""
    out = {}
    for label, fn in (("kd", lambda s, t, g: kdk.kd_loss(s, t, 2.0, process_group=g)),
                      ("ldrld", lambda s, t, g: kdk.ldrld_loss(s, t, k=5, process_group=g))):
        for scale in (1, 4):
            s = torch.randn(N, width * scale, dtype=dtype, requires_grad=True)
            t = torch.randn(N, width * scale, dtype=dtype)
            with record_exchanges() as log:
                fn(s, t, group).backward()
            out[f"{label}-x{scale}"] = [sum(b for _, _, b in log), len(log)]
    return out


#: the presets of docs/tensor_parallel.md's communication table (float32 logits, N rows; the payload does not
#: depend on the vocabulary)
COMM_PRESETS = {
    "kd_loss (forward KL)": lambda s, t, g: kdk.kd_loss(s, t, 2.0, process_group=g),
    "kd_loss + ce_weight": lambda s, t, g: kdk.kd_loss(s, t, 2.0, labels=_labels(), ce_weight=0.5, process_group=g),
    "reverse_kl / jsd / tvd / skew": lambda s, t, g: kdk.kd_loss(s, t, 1.0, divergence=("jsd", 0.5), process_group=g),
    "teacher_topk=TopK(4, \"tail\")": lambda s, t, g: kdk.kd_loss(s, t, 1.0, teacher_topk=kdk.TopK(4, "tail"),
                                                               process_group=g),
    "SparseTeacher K = 5, renorm": lambda s, t, g: kdk.kd_loss(s, _sparse(torch.Generator().manual_seed(3), s.dtype),
                                                                1.0, process_group=g),
    "dkd_loss / aekt_loss": lambda s, t, g: kdk.dkd_loss(s, t, _labels(), process_group=g),
    "dtkd_loss": lambda s, t, g: kdk.dtkd_loss(s, t, process_group=g),
    "ldrld_loss k = 5": lambda s, t, g: kdk.ldrld_loss(s, t, k=5, process_group=g),
    "topkd_loss k = 3": lambda s, t, g: kdk.topkd_loss(s, t, _labels(), k=3, process_group=g),
    "kd_loss, standardize=True": lambda s, t, g: kdk.kd_loss(s, t, 2.0, standardize=True, process_group=g),
}
#: the same through the Triton split (backend="triton")
COMM_SPLIT = {
    "kd_loss (forward KL) + ce_weight, split": lambda s, t, g: kdk.kd_loss(s, t, 2.0, labels=_labels(), ce_weight=0.5,
                                                                         process_group=g, backend="triton"),
    "reverse_kl / jsd / tvd / skew, split": lambda s, t, g: kdk.kd_loss(s, t, 1.0, divergence=("jsd", 0.5),
                                                                      process_group=g, backend="triton"),
    "dkd_loss / aekt_loss, split": lambda s, t, g: kdk.dkd_loss(s, t, _labels(), process_group=g, backend="triton"),
    "teacher_topk=TopK(4, \"renorm\"), split": lambda s, t, g: kdk.kd_loss(s, t, 1.0, teacher_topk=kdk.TopK(4, "renorm"),
                                                                          process_group=g, backend="triton"),
    "SparseTeacher K = 5, renorm, split": lambda s, t, g: kdk.kd_loss(s, _sparse(torch.Generator().manual_seed(3),
                                                                               s.dtype), 1.0, process_group=g,
                                                                       backend="triton"),
}


def communication_table(group, width):
    """Per preset of COMM_PRESETS: [collectives in forward, bytes per row sent in forward, collectives in
    backward, bytes per row sent in backward] by this rank (float32 logits of ``width`` local columns)."""
    table = {}
    for name, fn in (COMM_PRESETS | (COMM_SPLIT if SPLIT else {})).items():
        s = torch.randn(N, width, requires_grad=True)
        t = torch.randn(N, width)
        with record_exchanges() as log:
            loss = fn(s, t, group)
            fwd = list(log)
            loss.backward()
        bwd = log[len(fwd):]
        table[name] = [len(fwd), sum(b for _, _, b in fwd) / N, len(bwd), sum(b for _, _, b in bwd) / N]
    return table


def worker(rank, world, rendezvous, result_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    group = dist.group.WORLD
    widths = WIDTHS[world]
    offset, width = sum(widths[:rank]), widths[rank]
    results = {}
    try:
        for dtype in (torch.float64, torch.float32):
            tag = str(dtype).replace("torch.", "")
            for name in CASES:
                results[f"{name}-{tag}"] = run_logit_case(name, dtype, group, offset, width)
            if SPLIT:
                for name in SPLIT_CASES:
                    results[f"{name}-{tag}"] = run_split_case(name, dtype, group, offset, width)
            for name, norm in SPARSE_CASES.items():
                results[f"{name}-{tag}"] = run_sparse_case(norm, dtype, group, offset, width)
                if SPLIT:
                    results[f"split_{name}-{tag}"] = run_sparse_case(norm, dtype, group, offset, width, "triton")
            results[f"temperature-{tag}"] = run_temperature_case(dtype, group, offset, width)
            results[f"fused_linear-{tag}"] = run_linear_case(dtype, group, offset, width)
            if SPLIT:
                results[f"split_fused_linear-{tag}"] = run_linear_case(dtype, group, offset, width, "triton")
            results[f"dtensor-{tag}"] = run_dtensor_case(dtype, group, world)
        if SPLIT:
            results["split_special"] = run_split_special(group, offset, width)
        results["boundary"] = run_boundary_checks(group, offset, width)
        results["communication"] = communication(torch.float32, group, offset, width)
        results["communication_table"] = communication_table(group, width)
    except Exception:  # noqa: BLE001 - reported to the test, which fails with the traceback
        results["error"] = traceback.format_exc()
        with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        os._exit(1)  # the other ranks' collectives time out rather than hang the suite
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()
