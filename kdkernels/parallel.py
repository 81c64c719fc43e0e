"""Tensor (vocabulary) parallel distillation: every loss on vocabulary-sharded logits over ``torch.distributed``.

Layout (Megatron's vocab-parallel layout). Rank ``r`` of a process group of ``P`` ranks holds the columns
``[v_r, v_r + V_r)`` of the student and teacher logits, in rank order; shards may differ in size (each
holds at least one class). Labels and sparse-teacher ids are *global* class ids, the same tensor on
every rank. The loss returned on every rank equals the unsharded loss, and the gradient each rank
receives is its slice of the unsharded gradient.

Two engines (docs/tensor_parallel.md):

* **The Triton split** (:mod:`kdkernels._triton.shard`, chosen by :func:`_split_launcher`) for the KD
  family — the KD term with any divergence over the whole vocabulary, CE, softcap, a fixed or learnable
  temperature —, DKD/AEKT, sparse teachers and dense top-k teachers (renorm, teacher):
  one launch writes each row's record (LSE states, the target logit) over the local columns, one
  ``all_gather`` of the records, one launch writes the local gradient, one ``all_reduce`` of the per-row
  divergence parts; it goes through the engine's autograd Function like any launcher (one ``[N, V_r]``
  buffer held, backward scales it).
* **The sharded formulas** for every other preset: every formula of :mod:`kdkernels.reference` takes its
  row reductions from an ``over`` object; :class:`ShardedRow` takes each one over the local columns and
  merges the per-rank statistics of the row across the group:

=====================  ====================================================  =======================
reduction              local statistic, merged over the P ranks               payload per row, rank
=====================  ====================================================  =======================
sum (Σ, counts, ‖·‖²)  the local sum; summed in rank order                    1 value
LSE                    the local LSE; a log-sum-exp over the P values (stable) 1 value
max / min / argmax     the local extremum; the first extremal rank wins       1 value
any / all              the local flag                                        1 byte
top-k (ranked)         the local top-k (values, global ids); merged,          k values + k ids
                       ties to the lower global index
value at a class id    the owner's value (0 elsewhere); summed               k values (k ids)
=====================  ====================================================  =======================

Each merge is an ``all_gather`` of ``[N, ·]`` statistics (exact, and the same bits on every rank);
nothing of size ``[N, V]`` ever crosses ranks (:func:`record_exchanges` counts the bytes).

Gradients of the sharded formulas (the "partial" convention). A value that every rank computes from merged
statistics is replicated; on each rank its gradient is a partial whose sum over the ranks is the true
gradient (the loss seeds ``1/P`` on each rank, the backward of every merge sums the partials with one
``all_reduce`` and takes this rank's slice, and a replicated differentiable input — a learnable
temperature, the hidden states of :func:`kdkernels.fused_linear_distill` — is all-reduced once). So every
rank must call ``backward`` (as with any tensor-parallel model), and the gradients are exact. Cost, plainly:
this path is eager PyTorch on each rank's ``[N, V/P]`` shard (autograd keeps several intermediates), with
one collective per row reduction.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.distributed as dist

from .reference import WholeRow

# ---------------------------------------------------------------------------------------------
# the collectives (autograd: partial gradients, see the module docstring)
# ---------------------------------------------------------------------------------------------
_RECORDS: list = []


@contextlib.contextmanager
def record_exchanges():
    """Record every statistic this process sends to its group inside the block: yields a list of
    ``(what, shape, bytes)`` — ``bytes`` is this rank's payload (the shape's elements × element size)."""
    log: list = []
    _RECORDS.append(log)
    try:
        yield log
    finally:
        _RECORDS.remove(log)


def _note(what: str, x: torch.Tensor) -> None:
    for log in _RECORDS:
        log.append((what, tuple(x.shape), x.numel() * x.element_size()))


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """``[P, *x.shape]``: every rank's ``x``, in rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)


def all_gather_records(record: torch.Tensor, group) -> torch.Tensor:
    """``[P, N, R]``: every rank's row records ``[N, R]`` in rank order (the split's one statistics exchange)."""
    _note("row records", record)
    return _all_gather(record, group)


def all_reduce(x: torch.Tensor, group, what: str) -> torch.Tensor:
    """``x`` summed over the ranks, in place (per-row partial sums of the split: ``[N]`` or ``[N, 2]``)."""
    _note(what, x)
    dist.all_reduce(x, group=group)
    return x


class _Exchange(torch.autograd.Function):
    """Forward: the per-rank statistics ``[P, ...]`` (all_gather). Backward: the partial gradients summed
    over the ranks (all_reduce), at this rank's slice."""

    @staticmethod
    def forward(ctx, x, group, what):
        ctx.group = group
        _note(what, x)
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        grad = all_reduce(grad.clone(memory_format=torch.contiguous_format), ctx.group, "backward")
        return grad[dist.get_rank(ctx.group)], None, None


class _Replicated(torch.autograd.Function):
    """A replicated differentiable input: forward as is, backward the partial gradients summed over the
    ranks (all_reduce) — its true gradient on every rank."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.clone(memory_format=torch.contiguous_format), ctx.group, "backward"), None


class _LossSeed(torch.autograd.Function):
    """The loss (replicated) as is; its backward seeds ``grad / P`` so the partials sum to the gradient."""

    @staticmethod
    def forward(ctx, x, ranks):
        ctx.ranks = ranks
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.ranks, None


def replicated(x: torch.Tensor, group) -> torch.Tensor:
    """``x`` (the same value on every rank) entering the sharded formulas: its gradient becomes the sum
    of every rank's contribution (what each rank's autograd must see for a replicated input)."""
    return _Replicated.apply(x, group) if x.requires_grad and torch.is_grad_enabled() else x


def seed_loss(loss: torch.Tensor, group) -> torch.Tensor:
    """The replicated loss, seeding ``1/P`` of the gradient on each rank (the partial convention)."""
    return _LossSeed.apply(loss, dist.get_world_size(group)) if loss.requires_grad else loss


def _safe_lse(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp over ``dim`` that is −inf (with a zero, not NaN, gradient) where every entry is −inf."""
    empty = (x == -math.inf).all(dim)
    out = torch.logsumexp(torch.where((x == -math.inf).all(dim, keepdim=True), torch.zeros_like(x), x), dim)
    return torch.where(empty, torch.full_like(out, -math.inf), out)


# ---------------------------------------------------------------------------------------------
# the row reductions over a vocabulary shard
# ---------------------------------------------------------------------------------------------
class ShardedRow(WholeRow):
    """The row reductions of :class:`kdkernels.reference.WholeRow` over this rank's columns
    ``[offset, offset + width)`` of a ``vocab``-class row, merged across ``group``."""

    def __init__(self, group, offset: int, vocab: int):
        self.group, self.offset, self.vocab = group, offset, vocab

    def _merge(self, what: str, x: torch.Tensor) -> torch.Tensor:
        return _Exchange.apply(x, self.group, what)

    def _owned(self, x, idx):
        """(owned, local index): which class ids fall in this shard, and their column (0 elsewhere)."""
        width = x.shape[-1]
        owned = (idx >= self.offset) & (idx < self.offset + width)
        return owned, torch.where(owned, idx - self.offset, torch.zeros_like(idx))

    def classes(self, x):
        return self.vocab

    def columns(self, x):
        return torch.arange(self.offset, self.offset + x.shape[-1], device=x.device)

    def sum(self, x, keepdim=False):
        total = self._merge("sum", x.sum(-1)).sum(0)
        return total.unsqueeze(-1) if keepdim else total

    def any(self, m):
        return self._merge("any", m.any(-1).to(torch.uint8)).any(0).bool()

    def all(self, m):
        return self._merge("all", m.all(-1).to(torch.uint8)).all(0).bool()

    def amax(self, x, keepdim=False):
        out = self._merge("max", x.amax(-1)).amax(0)
        return out.unsqueeze(-1) if keepdim else out

    def amin(self, x, keepdim=False):
        out = self._merge("min", x.amin(-1)).amin(0)
        return out.unsqueeze(-1) if keepdim else out

    def max_values(self, x):
        per_rank = self._merge("max", x.max(-1).values)              # [P, N]
        first = (per_rank == per_rank.amax(0)).to(torch.uint8).argmax(0)  # the first maximal rank
        return per_rank.gather(0, first.unsqueeze(0)).reshape(-1, 1)

    def lse(self, x):
        return _safe_lse(self._merge("lse", _safe_lse(x, -1)), 0)

    def log_softmax(self, x):
        return x - self.lse(x).unsqueeze(-1)

    def norm(self, x):
        sq = self.sum(x * x)
        pos = sq > 0
        return torch.where(pos, torch.sqrt(torch.where(pos, sq, torch.ones_like(sq))), torch.zeros_like(sq))

    def ranked(self, x, k: int, descending: bool = True):
        x = x.detach()
        rows, width = x.shape[0], x.shape[-1]
        order = torch.sort(x, dim=-1, descending=descending, stable=True)
        values, ids = order.values[:, :k], order.indices[:, :k] + self.offset
        if width < k:  # a shard narrower than k: pad its list to k slots (every rank sends [N, k]) with
            # the worst value and ids past the vocabulary, which lose every tie (and k ≤ vocab: never chosen)
            pad = k - width
            worst = -math.inf if descending else math.inf
            values = torch.cat([values, values.new_full((rows, pad), worst)], 1)
            ids = torch.cat([ids, self.vocab + torch.arange(pad, device=x.device).expand(rows, pad)], 1)
        values = self._merge("topk values", values).permute(1, 0, 2).reshape(rows, -1)
        ids = self._merge("topk ids", ids).permute(1, 0, 2).reshape(rows, -1)
        # the merged lists in rank order hold ascending global ids within ties except for the padding;
        # sort by id first, then stably by value: ties go to the lower global index
        by_id = torch.sort(ids, dim=-1, stable=True)
        values, ids = values.gather(1, by_id.indices), by_id.values
        best = torch.sort(values, dim=-1, descending=descending, stable=True).indices[:, :k]
        return ids.gather(1, best)

    def take(self, x, idx):
        owned, local = self._owned(x, idx)
        mine = torch.where(owned, x.gather(1, local), torch.zeros((), dtype=x.dtype, device=x.device))
        return self._merge("values at ids", mine).sum(0)

    def mark(self, x, idx):
        owned, local = self._owned(x, idx)
        width = x.shape[-1]
        spare = torch.zeros(x.shape[0], width + 1, dtype=torch.bool, device=x.device)
        return spare.scatter(1, torch.where(owned, local, width), True)[:, :width]

    def put(self, x, idx, values):
        owned, local = self._owned(x, idx)
        width = x.shape[-1]
        wide = torch.cat([x, torch.zeros_like(x[:, :1])], 1)
        return wide.scatter(1, torch.where(owned, local, width), values)[:, :width]


# ---------------------------------------------------------------------------------------------
# shard layout: offsets from the group, a DTensor, or the caller
# ---------------------------------------------------------------------------------------------
_LAYOUTS: dict = {}


def shard_layout(group, width: int, device, vocab_offset: Optional[int] = None,
                 vocab_size: Optional[int] = None) -> tuple:
    """``(offset, vocab)`` of this rank's ``width`` columns.

    Without ``vocab_offset``/``vocab_size`` the ranks all-gather their widths once per (group, width) —
    a device-to-host copy, cached: later calls cost nothing. Pass both to skip it (no communication)."""
    if vocab_offset is not None and vocab_size is not None:
        if not 0 <= vocab_offset and vocab_offset + width <= vocab_size:
            raise ValueError(f"vocab_offset={vocab_offset} with a shard of {width} classes does not fit in "
                             f"vocab_size={vocab_size}")
        return int(vocab_offset), int(vocab_size)
    if (vocab_offset is None) != (vocab_size is None):
        raise ValueError("pass both vocab_offset and vocab_size, or neither (then the shard widths are "
                         "all-gathered once and cached)")
    key = (id(group), dist.get_rank(group), width, str(device))
    if key not in _LAYOUTS:
        backend_device = device if dist.get_backend(group) == "nccl" else "cpu"
        mine = torch.tensor([width], dtype=torch.int64, device=backend_device)
        widths = _all_gather(mine, group).reshape(-1).tolist()
        if min(widths) < 1:
            raise ValueError(f"process_group: every rank needs at least one class, got shard widths {widths}")
        rank = dist.get_rank(group)
        _LAYOUTS[key] = (sum(widths[:rank]), sum(widths))
    return _LAYOUTS[key]


def from_dtensor(x) -> tuple:
    """``(local tensor, group, offset, vocab)`` of a DTensor sharded on its last dim (``Shard(-1)`` on one
    mesh dimension, ``Replicate()`` on the others)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    last = x.dim() - 1
    mesh, placements = x.device_mesh, x.placements
    sharded = [i for i, p in enumerate(placements) if isinstance(p, Shard) and p.dim in (-1, last)]
    others = [p for i, p in enumerate(placements) if i not in sharded]
    if len(sharded) != 1 or not all(isinstance(p, Replicate) for p in others):
        raise ValueError(f"a DTensor loss input must be sharded on its last (class) dim over one mesh dim and "
                         f"replicated on the others, got placements {placements}")
    _, offsets = compute_local_shape_and_global_offset(x.shape, mesh, placements)
    return x.to_local(), mesh.get_group(sharded[0]), int(offsets[-1]), int(x.shape[-1])


def is_dtensor(x) -> bool:
    if type(x) is torch.Tensor or not isinstance(x, torch.Tensor):  # without the import (host time per call)
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(x, DTensor)


def local_input(x, name: str):
    """A replicated input (labels, sparse-teacher ids) given as a DTensor: its full value."""
    if is_dtensor(x):
        from torch.distributed.tensor import Replicate
        if not all(isinstance(p, Replicate) for p in x.placements):
            raise ValueError(f"{name}: a DTensor must be replicated (global ids on every rank), got {x.placements}")
        return x.to_local()
    return x


# ---------------------------------------------------------------------------------------------
# the entry point (kdkernels.logit_distill with process_group= or DTensor logits)
# ---------------------------------------------------------------------------------------------
def _local_operands(s, t, group, vocab_offset, vocab_size):
    """(s, t, group, offset, vocab) with DTensor logits unwrapped to their local shards."""
    from .spec import SparseTeacher

    if is_dtensor(s):
        s, dt_group, vocab_offset, vocab_size = from_dtensor(s)
        if group is not None and group is not dt_group:
            raise ValueError("process_group: a DTensor carries its own group; pass process_group=None")
        group = dt_group
        if isinstance(t, SparseTeacher):
            t = SparseTeacher(local_input(t.ids, "SparseTeacher.ids"),
                              local_input(t.logprobs, "SparseTeacher.logprobs"), t.normalize)
        elif is_dtensor(t):
            t, t_group, t_offset, t_vocab = from_dtensor(t)
            if (t_group, t_offset, t_vocab) != (group, vocab_offset, vocab_size):
                raise ValueError("teacher_logits: a DTensor teacher must be sharded like the student")
        else:
            raise TypeError("teacher_logits: with DTensor student logits the teacher must be a DTensor sharded "
                            "the same way (or a SparseTeacher of global ids)")
    elif is_dtensor(t):
        raise TypeError("teacher_logits is a DTensor but student_logits is not: shard both the same way")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group: torch.distributed is not initialized (dist.init_process_group)")
    return s, t, group, vocab_offset, vocab_size


#: the split exchanges a dense top-k teacher's global ids in its float record: exact below 2^24 classes
TOPK_ID_LIMIT = 1 << 24


def _split_launcher(backend, device, spec, temperature, reason: Optional[str], group, offset: int, vocab: int):
    """The Triton split's launcher (kdkernels._triton.shard) when ``backend`` resolves to triton and the
    spec is in its family (``reason`` None: no sparse teacher, no teacher gradient), else None: the sharded
    formulas. An explicit ``backend`` that cannot run the loss on shards raises."""
    from .dispatch import BackendUnavailableError, resolve
    explicit = backend not in (None, "auto")
    name = resolve(backend, device)
    if name in ("cpu", "cuda") and explicit:
        raise BackendUnavailableError(
            f"backend={backend!r}: the C++ engines have no vocabulary-sharded split; on sharded logits use "
            "backend='triton' (the KD family: any divergence, CE, softcap) or 'auto'/'reference' (every preset, "
            "the sharded formulas); docs/tensor_parallel.md")
    if name != "triton":
        return None
    from ._triton.shard import ShardLauncher, shard_unsupported
    if spec.teacher_topk is not None and vocab >= TOPK_ID_LIMIT:
        reason = reason or (f"a dense top-k teacher over {vocab} ≥ 2^24 classes (the exchanged ids are exact "
                            "floats only below)")
    reason = reason or shard_unsupported(spec, temperature)
    if reason is None:
        return ShardLauncher(group, offset, vocab)
    if explicit:
        raise BackendUnavailableError(
            "backend='triton' on sharded logits runs the KD family (any divergence over the whole vocabulary, "
            "CE, softcap, a fixed or learnable temperature), DKD/AEKT, sparse teachers and dense top-k teachers "
            f"(renorm, teacher); {reason} is evaluated by the sharded formulas: use backend='auto' or 'reference' "
            "(docs/tensor_parallel.md)")
    return None


@torch.compiler.disable  # collectives and a host-side shard layout: a graph-break boundary under torch.compile
def sharded_logit_distill(s, t, labels, spec, group=None, vocab_offset: Optional[int] = None,
                          vocab_size: Optional[int] = None, backend: Optional[str] = "auto") -> torch.Tensor:
    """:func:`kdkernels.logit_distill` on this rank's vocabulary shard ``[..., V_r]`` of a ``group``
    (``None``: the default group) — see the module docstring. Returns the unsharded loss on every rank."""
    from . import reference
    from .spec import SparseTeacher
    from .validation import (check_label_values, check_logits, check_mode, check_sparse_spec, check_sparse_values,
                             flatten_labels, flatten_sparse, flatten_temperature)

    s, t, group, vocab_offset, vocab_size = _local_operands(s, t, group, vocab_offset, vocab_size)
    labels = local_input(labels, "labels")
    if spec.contrastive_weight != 0:
        raise ValueError("process_group: the batch-coupled contrastive term compares whole logit rows across the "
                         "batch and is not sharded; compute it on gathered logits or set contrastive_weight=0")
    if spec.inplace:
        raise ValueError("process_group: inplace=True is not supported on sharded logits (the sharded path runs "
                         "autograd over the shard); use inplace=False")
    sparse = isinstance(t, SparseTeacher)
    check_logits(s, s if sparse else t, mixed_dtypes=True)
    width, lead = s.shape[-1], s.shape[:-1]
    N = math.prod(lead)
    offset, vocab = shard_layout(group, width, s.device, vocab_offset, vocab_size)
    spec.check_classes(vocab)
    labels = flatten_labels(labels, lead, s.device)
    if labels is None and spec.needs_labels:
        raise ValueError("this loss needs labels (ce_weight > 0 or a decoupled/dkd/aekt term)")
    s2d = s.reshape(N, width)
    if sparse:
        ids, logprobs = flatten_sparse(t, lead, s.device)
        check_sparse_spec(spec, t, ids.shape[-1])
        t2d = SparseTeacher(ids, logprobs, t.normalize)
    else:
        t2d = t.reshape(N, width)
    temperature = None
    if isinstance(spec.temperature, torch.Tensor):
        temperature = flatten_temperature(spec.temperature, lead, N, s.device)
    if check_mode(spec.check):  # the replicated inputs only (the same error on every rank, no collective)
        if labels is not None:
            check_label_values(labels, vocab, spec.ignore_index)
        if sparse:
            check_sparse_values(ids, logprobs, vocab)
    teacher_grad = not sparse and t.requires_grad and torch.is_grad_enabled()
    split = _split_launcher(backend, s.device, spec, temperature,
                            "a teacher that requires grad" if teacher_grad else None,
                            group, offset, vocab)
    if split is not None:  # the fused split: row records cross ranks, the gradient written in forward
        from .engine import fused_logit_distill
        from .functional import packed
        s2d = s2d if s2d.stride(-1) == 1 else s2d.contiguous()
        if not sparse:
            t2d = t2d if t2d.stride(-1) == 1 else t2d.contiguous()
        if spec.teacher_topk is not None:  # the global support first; then it is the sparse teacher's split
            from ._triton.shard import dense_topk_teacher
            t2d = dense_topk_teacher(s2d, t2d, labels, spec, split)
            spec = spec.replace(teacher_topk=None, softcap=(spec.softcap[0] or None, None))
            sparse = True
        form = (t2d.normalize, t2d.ids.shape[-1]) if sparse else None
        loss = fused_logit_distill(s2d, t2d, labels, temperature, packed(spec, form), split)
    else:
        if temperature is not None:
            temperature = replicated(temperature, group)
        loss = reference.logit_distill(s2d, t2d, labels, spec, temperature, teacher_grad=teacher_grad,
                                       over=ShardedRow(group, offset, vocab))
        loss = seed_loss(loss, group)
    if spec.reduction == "none" and len(lead) != 1:
        return loss.reshape(lead)
    return loss
