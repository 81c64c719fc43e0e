"""Instruments that measure GPU-relevant facts on a CPU machine (benchmarks/README.md, "Measuring GPU performance
without a GPU").

* :func:`count_transfers` — under ``TRITON_INTERPRET=1`` every global access of an interpreted kernel goes
  through the interpreter builder's ``create_masked_load`` / ``create_masked_store``; wrapping them and
  summing the bytes of the lanes whose mask is true, classified by the tensor whose address range the lane
  points into, gives the bytes each kernel moves (the DRAM-pessimistic count: no cache is modelled).
  It also counts the Triton launches (the interpreter's grid executor is the launch path).
* :class:`OpCounter` — a ``TorchDispatchMode`` that records every op dispatched (ATen and custom ops);
  :func:`classify_ops` splits them into ops that launch a device kernel and ops that do not (views,
  allocation, metadata).
* :func:`host_times` — per-call wall time of several callables on tiny inputs, interleaved repetition by
  repetition (a busy machine slows all alike), as medians with their spread.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from collections import Counter
from typing import Callable, Dict, Iterable, List, Optional

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .timing import quantile

# ------------------------------------------------------------------------------------------------
# interpreter transfers and Triton launches
# ------------------------------------------------------------------------------------------------


class TransferLog:
    """Bytes loaded/stored per tensor (keyed by the tensor's start address) and launches per kernel."""

    def __init__(self):
        self.ranges: Dict[int, tuple] = {}     # start address -> (end address, kernel argument name)
        self.loaded: Counter = Counter()       # start address (or "unclassified") -> bytes
        self.stored: Counter = Counter()
        self.launches: Counter = Counter()     # kernel name -> launches

    def register(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.numel() == 0:
            return
        span = sum((n - 1) * st for n, st in zip(tensor.shape, tensor.stride()) if n > 0) + 1
        start = tensor.data_ptr()
        self.ranges.setdefault(start, (start + span * tensor.element_size(), name))

    def add(self, into: Counter, ptrs, mask) -> None:
        addr = np.asarray(ptrs.data).astype(np.uint64)
        live = np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)
        nbytes = ptrs.get_element_ty().primitive_bitwidth // 8
        left = int(live.sum())
        for start, (end, _) in self.ranges.items():
            hit = int(np.count_nonzero(live & (addr >= start) & (addr < end)))
            if hit:
                into[start] += hit * nbytes
                left -= hit
        if left:
            into["unclassified"] += left * nbytes

    def bytes_of(self, tensor: torch.Tensor) -> tuple:
        """(bytes loaded, bytes stored) of the range starting at ``tensor``'s address."""
        key = tensor.data_ptr()
        return self.loaded.get(key, 0), self.stored.get(key, 0)

    def other(self, exclude: Iterable[int]) -> Dict[str, int]:
        """Bytes (loads + stores) of every range not in ``exclude``, by kernel argument name."""
        out: Counter = Counter()
        for key in set(self.loaded) | set(self.stored):
            if key in exclude:
                continue
            name = "unclassified" if key == "unclassified" else self.ranges[key][1]
            out[name] += self.loaded.get(key, 0) + self.stored.get(key, 0)
        return dict(out)


@contextlib.contextmanager
def count_transfers():
    """Yields a :class:`TransferLog` filled by every interpreted Triton launch inside the block.

    Needs ``TRITON_INTERPRET=1`` set before the kernels were imported (else nothing is interpreted and the
    log stays empty: check ``log.launches``)."""
    from triton.runtime import interpreter as interp

    log = TransferLog()
    builder, executor = interp.InterpreterBuilder, interp.GridExecutor
    orig_load, orig_store, orig_call = builder.create_masked_load, builder.create_masked_store, executor.__call__

    def masked_load(self, ptrs, mask, other, *rest):
        log.add(log.loaded, ptrs, mask)
        return orig_load(self, ptrs, mask, other, *rest)

    def masked_store(self, ptrs, value, mask, *rest):
        log.add(log.stored, ptrs, mask)
        return orig_store(self, ptrs, value, mask, *rest)

    def launch(self, *args, **kwargs):
        log.launches[getattr(self.fn, "__name__", "?")] += 1
        for name, arg in list(zip(self.arg_names, args)) + list(kwargs.items()):
            if isinstance(arg, torch.Tensor):
                log.register(name, arg)
        return orig_call(self, *args, **kwargs)

    builder.create_masked_load, builder.create_masked_store, executor.__call__ = masked_load, masked_store, launch
    try:
        yield log
    finally:
        builder.create_masked_load, builder.create_masked_store, executor.__call__ = orig_load, orig_store, orig_call


# ------------------------------------------------------------------------------------------------
# ops dispatched
# ------------------------------------------------------------------------------------------------

#: ATen ops that launch no device kernel: allocation, views, metadata
NO_KERNEL_OPS = frozenset({
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "expand", "view", "_unsafe_view",
    "reshape", "detach", "alias", "t", "transpose", "permute", "select", "slice", "unsqueeze", "squeeze",
    "as_strided", "lift_fresh", "lift_fresh_copy", "unbind", "split", "chunk", "narrow", "view_as",
    "expand_as", "_reshape_alias", "set_", "resize_", "is_same_size", "sym_size", "sym_stride",
    "sym_numel", "sym_storage_offset", "dim", "size", "stride", "numel", "_local_scalar_dense",
})


class OpCounter(TorchDispatchMode):
    """Records the name (``namespace::op``) of every op dispatched inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.name().split(".")[0])  # "aten::sum.dim_IntList" -> "aten::sum"
        return func(*args, **(kwargs or {}))


def classify_ops(ops: List[str]) -> dict:
    """{'aten_kernels': [...], 'aten_free': [...], 'custom': [...]} of a list of op names."""
    out = {"aten_kernels": [], "aten_free": [], "custom": []}
    for op in ops:
        ns, name = op.split("::", 1)
        if ns != "aten":
            out["custom"].append(op)
        elif name.rstrip("_") in NO_KERNEL_OPS or name in NO_KERNEL_OPS:
            out["aten_free"].append(op)
        else:
            out["aten_kernels"].append(op)
    return out


# ------------------------------------------------------------------------------------------------
# host time
# ------------------------------------------------------------------------------------------------


def host_times(fns: Dict[str, Callable[[], object]], repeats: int = 15, calls: int = 40,
               warmup: int = 20) -> Dict[str, dict]:
    """Per-call µs of each callable: ``repeats`` rounds, each timing ``calls`` back-to-back calls of every
    callable in turn (interleaved). Returns name → {'us': median, 'p20', 'p80', 'spread': (p80 − p20)/median,
    'samples': per-round µs}."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: Dict[str, list] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - t0) / calls * 1e6)
    out = {}
    for name, xs in samples.items():
        med = statistics.median(xs)
        p20, p80 = quantile(xs, 0.2), quantile(xs, 0.8)
        out[name] = {"us": med, "p20": p20, "p80": p80, "spread": (p80 - p20) / med if med else 0.0,
                     "samples": xs}
    return out


def fwd_bwd(loss_fn: Callable, s: torch.Tensor, grad_output: Optional[torch.Tensor] = None):
    """A callable running one forward + backward of ``loss_fn(x)`` on a fresh leaf copy of ``s`` (made
    once); ``grad_output`` is created by the caller, so its allocation is not part of the call."""
    x = s.detach().clone().requires_grad_(True)
    go = torch.ones((), dtype=torch.float64 if s.dtype == torch.float64 else torch.float32) \
        if grad_output is None else grad_output

    def call():
        return torch.autograd.grad(loss_fn(x), x, go)[0]
    return call
