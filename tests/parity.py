"""Shared pieces of the parity tests: the fused backends to test here, the presets, input builders and
per-dtype tolerances. Every fused backend is compared with the float64 reference on the same inputs."""
import contextlib
import math
import os

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import kdkernels as kdk
from kdkernels.dispatch import unavailable_reason

#: KDKERNELS_TEST_DEVICE=cuda runs the suite on the GPU (benchmarks/gpu_check.sh sets it)
DEVICE = torch.device(os.environ.get("KDKERNELS_TEST_DEVICE", "cpu"))
FUSED = [b for b in ("triton", "cuda", "cpu") if unavailable_reason(b, DEVICE) is None]

#: (relative loss tolerance, gradient tolerance relative to max|grad_ref|) per input dtype; float64 is
#: exact to 1e-12 on every backend (scalar parameters reach the kernels in float64).
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-3, 3e-3),
    torch.bfloat16: (1e-3, 1.6e-2),
}


def presets(C: int, labels: bool = True) -> dict:
    """name → LogitDistill for every method of docs/README.md (k adapted to C, invalid ones left out)."""
    k_rel = min(4, C - 1)
    k_top = min(3, (C - 1) // 2)
    out = {
        "kd": kdk.LogitDistill(temperature=2.0),
        "kd_std": kdk.LogitDistill(temperature=2.0, standardize=True),
        "dtkd": kdk.LogitDistill(temperature=4.0, kd_weight=1.0, dtkd_weight=3.0),
    }
    if labels:
        out.update({
            "kd_ce": kdk.LogitDistill(temperature=3.0, ce_weight=0.5),
            "dkd": kdk.LogitDistill(kd_weight=0.0, decoupled=kdk.Decoupled(1.0, 8.0)),
            "dkd_std": kdk.LogitDistill(temperature=2.0, kd_weight=0.0, standardize=True,
                                        decoupled=kdk.Decoupled(1.0, 2.0)),
            "aekt": kdk.LogitDistill(kd_weight=0.0, decoupled=kdk.Decoupled(1.0, 8.0, adaptive=True, max_weight=2.0)),
        })
    if labels:
        out["kd_tsm"] = kdk.LogitDistill(teacher_topk_scale=kdk.TopKScale(k=min(2, C - 1)))
        out["dkd_tsm"] = kdk.LogitDistill(kd_weight=0.0, decoupled=kdk.Decoupled(1.0, 8.0),
                                          teacher_topk_scale=kdk.TopKScale(k=min(2, C - 1), scale=0.7))
    if k_rel >= 2:
        out["ldrld"] = kdk.LogitDistill(kd_weight=0.0, relation=kdk.RankRelation(k=k_rel))
        out["ldrld_teacher"] = kdk.LogitDistill(kd_weight=0.0, relation=kdk.RankRelation(k=k_rel, rank_by="teacher"))
    if k_top >= 1 and 2 * k_top < C:
        out["topkd"] = kdk.LogitDistill(teacher_topk_scale=kdk.TopKScale(k=k_top),
                                        tdl=kdk.TopKDecoupled(k=k_top, weight=1.5, neg=0.5))
    return out


def make_inputs(gen, N, C, dtype, *, ignore=True, masked=True, scale=3.0):
    """Logits [N, C] (s, t) and labels; row 1 ignored, one masked (-inf) class in row 0 when asked."""
    s = (torch.randn(N, C, generator=gen, dtype=torch.float64) * scale)
    t = (torch.randn(N, C, generator=gen, dtype=torch.float64) * scale)
    y = torch.randint(0, C, (N,), generator=gen)
    if masked and C >= 10:
        col = (int(y[0]) + 1 + int(torch.randint(0, C - 2, (1,), generator=gen))) % C
        # a masked class must be the lowest of its row in both s and t (never in a top-k)
        s[0, col] = t[0, col] = float("-inf")
    if ignore and N >= 3:
        y[1] = -100
    return s.to(dtype).to(DEVICE), t.to(dtype).to(DEVICE), y.to(DEVICE)


def run(s, t, y, spec, backend, *, block_c=None):
    """(loss, grad) of the public engine entry point on a fresh leaf copy of s."""
    x = s.detach().clone().requires_grad_(True)
    ctx = contextlib.nullcontext()
    if block_c is not None and backend == "triton":
        from kdkernels._triton.engine import forced_block_c
        ctx = forced_block_c(block_c)
    with ctx:
        loss = kdk.logit_distill(x, t, y, spec, backend=backend)
        grad, = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def reference64(s, t, y, spec):
    """The float64 reference on the same (already rounded) inputs."""
    return run(s.double(), t.double(), y, spec, "reference")


def assert_close(got, want, dtype, what=""):
    (loss, grad), (loss_ref, grad_ref) = got, want
    tol_loss, tol_grad = TOL[dtype]
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), loss.dtype
    assert grad.dtype == dtype
    finite = torch.isfinite(loss_ref)
    assert torch.equal(finite, torch.isfinite(loss)), f"{what}: finiteness differs {loss} vs {loss_ref}"
    # relative to the largest loss, with a floor: a loss that is ~0 (e.g. identical standardized rows)
    # is compared on an absolute scale of 1e-2
    scale = loss_ref[finite].abs().max().clamp(min=1e-2) if finite.any() else 1.0
    err = ((loss.double() - loss_ref)[finite].abs().max() / scale) if finite.any() else 0.0
    assert err <= tol_loss, f"{what}: loss rel err {float(err):.3e} > {tol_loss} ({loss} vs {loss_ref})"
    g_scale = grad_ref.abs().max().clamp(min=1e-3)  # a floor for rows whose true gradient is ~0
    g_err = (grad.double() - grad_ref).abs().max() / g_scale
    assert g_err <= tol_grad, f"{what}: grad rel err {float(g_err):.3e} > {tol_grad}"


def sparse_teacher(gen, N, C, K, normalize, *, dtype=torch.float32, pad=1, random_ids=False,
                   ids_dtype=torch.int64):
    """A stored top-K teacher: log-probabilities of random logits at the top-K (or random distinct) ids,
    stored in ``dtype``; the last ``pad`` slots of row 0 are padding (id −1)."""
    t = torch.randn(N, C, generator=gen, dtype=torch.float64) * 3
    lp = F.log_softmax(t, -1)
    if random_ids:
        ids = torch.stack([torch.randperm(C, generator=gen)[:K] for _ in range(N)])
    else:
        ids = lp.topk(K, -1).indices
    logprobs = lp.gather(-1, ids)
    if pad:
        ids[0, K - pad:] = -1
        logprobs[0, K - pad:] = 0.0
    return kdk.SparseTeacher(ids.to(ids_dtype).to(DEVICE), logprobs.to(dtype).to(DEVICE), normalize)


class Allocations(TorchDispatchMode):
    """The shapes of the tensors the ops inside the block allocate: an output that is a view, or that shares
    an input's storage (an in-place op), allocates nothing and is not recorded."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {x.untyped_storage().data_ptr() for x in pytree.tree_leaves((args, kwargs))
                  if isinstance(x, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.shapes += [tuple(x.shape) for x in pytree.tree_leaves(out)
                            if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() not in inputs]
        return out

    @property
    def largest(self) -> int:
        """Elements of the largest allocation (0 when there was none)."""
        return max((math.prod(shape) for shape in self.shapes), default=0)
