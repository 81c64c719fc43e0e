"""The fused-linear suite (``--suite llm-linear``): the LLM distillation loss from hidden states.

A case is ``Case(suite, method, N, V, dtype, K, H)`` (benchmarks/shapes.py): student hidden states
``h [N, H]`` and lm_head ``W [V, H]`` (no bias, as LLM heads have none), and a teacher given as hidden states
``h_t [N, H]`` with its own head ``W_t [V, H]`` — for the dense methods also materialised once as logits
``t = F.linear(h_t, W_t)`` in the case's dtype, for the sparse ones as the top-K (K = 64) of
``log_softmax(t)`` (int64 ids, float32 log-probabilities). Methods (temperature 1, ce_weight 0, batchmean):

* ``linear_kl``: forward KL(p_t ‖ q_s); ``linear_jsd``: generalised JSD, β = 0.5;
* ``linear_renorm`` / ``linear_tail``: the stored top-K teacher, renormalised / with a tail bucket.

Every provider returns the loss as a function of ``(h, W, b)``; it is verified (loss and the gradients
w.r.t. every student operand: ∂h, ∂W, and ∂b when a case has a bias) against the unfused float64
reference — ``kdk.logit_distill`` with ``backend="reference"`` in float64 on the logits ``F.linear`` gives
in the case's dtype (the model's rounding, which every provider shares: without it bf16 ∂W of every
provider, eager included, differs from an all-float64 chain by ~1e-2 — input rounding, not arithmetic),
the chain rule to ∂h, ∂W, ∂b in float64, row chunk by row chunk with ``reduction="sum"`` — and then timed by the ordinary
harness (:class:`LinearRunner` reuses :class:`benchmarks.harness.Runner`'s timing, rows and reports).
"""
from __future__ import annotations

import math
import time
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

import kdkernels as kdk
from kdkernels import dispatch

from . import baselines
from .harness import Runner, _short
from .providers import INTERPRET_REASON, Provider, liger_class, liger_unavailable_reason
from .shapes import LINEAR_SPARSE_METHODS, SPARSE_IDS_DTYPE, SPARSE_LOGPROBS_DTYPE, SPARSE_TEACHER_ROWS
from .verify import TOLERANCE, VerificationError, rel

#: β of the JSD row (TRL's default), and the logits' scale: W ~ N(0, 1)·SCALE/√H gives logits ~ SCALE·N(0, 1)
JSD_BETA = 0.5
LOGIT_SCALE = 3.0
#: float64 reference: student logits per row chunk (bounds the [rows, V] float64 temporaries)
REF_CHUNK_ELEMENTS = 1 << 24


def linear_spec(method: str, reduction: str = "batchmean") -> kdk.LogitDistill:
    """The spec of a fused-linear method: temperature 1, ce_weight 0 (no labels needed)."""
    divergence = kdk.JSD(JSD_BETA) if method == "linear_jsd" else "forward_kl"
    return kdk.LogitDistill(temperature=1.0, divergence=divergence, ce_weight=0.0, reduction=reduction)


def normalize(method: str) -> Optional[str]:
    return method.split("_", 1)[1] if method in LINEAR_SPARSE_METHODS else None


class LinearInputs(NamedTuple):
    """One case's inputs; ``teacher_logits`` None and ``sparse`` set for the stored top-K methods."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    teacher_hidden: torch.Tensor
    teacher_weight: torch.Tensor
    teacher_logits: Optional[torch.Tensor]
    sparse: Optional[kdk.SparseTeacher]

    def operands(self):
        """The student operands that get a gradient (``h``, ``W`` and ``b`` when present)."""
        return tuple(x for x in (self.hidden, self.weight, self.bias) if x is not None)


def make_linear_inputs(case, device, seed: int = 0, bias: bool = False) -> LinearInputs:
    """Random operands (never zeros) whose logits are ~ 3·N(0, 1), like the other LLM suites."""
    g = torch.Generator(device=device).manual_seed(seed + 7919 * case.N + case.C + 31 * case.H)
    dt = case.torch_dtype

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dt)

    w_scale = LOGIT_SCALE / math.sqrt(case.H)
    h, w, h_t, w_t = (randn(case.N, case.H), randn(case.C, case.H, scale=w_scale),
                      randn(case.N, case.H), randn(case.C, case.H, scale=w_scale))
    b = randn(case.C) if bias else None
    if not case.sparse:
        return LinearInputs(h, w, b, h_t, w_t, F.linear(h_t, w_t), None)
    ids = torch.empty(case.N, case.K, dtype=SPARSE_IDS_DTYPE, device=device)
    logprobs = torch.empty(case.N, case.K, dtype=SPARSE_LOGPROBS_DTYPE, device=device)
    for a in range(0, case.N, SPARSE_TEACHER_ROWS):  # no [N, V] teacher kept
        rows = slice(a, min(case.N, a + SPARSE_TEACHER_ROWS))
        top = torch.log_softmax(F.linear(h_t[rows], w_t).float(), dim=-1).topk(case.K, dim=-1)
        logprobs[rows], ids[rows] = top.values, top.indices
    return LinearInputs(h, w, b, h_t, w_t, None, kdk.SparseTeacher(ids, logprobs, normalize(case.method)))


def _teacher_values(x: LinearInputs, rows: slice, dtype=None):
    """The teacher of rows ``rows`` as logit_distill takes it (dense logits or a SparseTeacher)."""
    if x.sparse is not None:
        lp = x.sparse.logprobs[rows]
        return kdk.SparseTeacher(x.sparse.ids[rows], lp if dtype is None else lp.to(dtype), x.sparse.normalize)
    t = x.teacher_logits[rows]
    return t if dtype is None else t.to(dtype)


class LinearReference:
    """The unfused float64 reference of one case: loss and the gradients of h, W (and b), computed once."""

    def __init__(self, case, x: LinearInputs):
        self.case, self.x = case, x
        self.rows = max(1, REF_CHUNK_ELEMENTS // case.C)
        self._loss, self._grads = None, None

    def _compute(self, want_grad: bool):
        """Per row chunk: the logits as the model computes them (``F.linear`` in the case's dtype: bf16
        operands give bf16 logits, the rounding every provider shares), upcast to float64; the loss and
        ``g = ∂loss/∂z`` in float64 (``backend="reference"``), and ``∂h = g·W``, ``∂W = Σ gᵀ·h``, ``∂b = Σ g``
        in float64 from the exact operands."""
        x, spec = self.x, linear_spec(self.case.method, "sum")
        f64 = torch.float64
        w64 = x.weight.detach().to(f64)
        grad_h = torch.empty(x.hidden.shape, dtype=f64, device=x.hidden.device) if want_grad else None
        grad_w = torch.zeros_like(w64) if want_grad else None
        grad_b = torch.zeros(w64.shape[0], dtype=f64, device=w64.device) if want_grad and x.bias is not None else None
        total = 0.0
        with torch.enable_grad():
            for a in range(0, self.case.N, self.rows):
                rows = slice(a, min(self.case.N, a + self.rows))
                with torch.no_grad():
                    z = F.linear(x.hidden[rows], x.weight, x.bias).to(f64)
                z.requires_grad_(want_grad)
                loss = kdk.logit_distill(z, _teacher_values(x, rows, f64), None, spec, backend="reference")
                if want_grad:
                    g = torch.autograd.grad(loss, z)[0]
                    grad_h[rows] = g @ w64
                    grad_w.addmm_(g.t(), x.hidden[rows].to(f64))
                    if grad_b is not None:
                        grad_b += g.sum(0)
                total += float(loss.detach())
        scale = 1.0 / self.case.N  # batchmean without labels: every token counts
        self._loss = total * scale
        if want_grad:
            self._grads = tuple(g * scale for g in (grad_h, grad_w, grad_b) if g is not None)

    def loss(self) -> float:
        if self._loss is None:
            self._compute(False)
        return self._loss

    def grads(self):
        if self._grads is None:
            self._compute(True)
        return self._grads


def verify_linear(case, f, x: LinearInputs, mode: str, ref: LinearReference) -> dict:
    """Run ``f(h, W, b)`` once and compare with ``ref``: the loss, and in fwd+bwd each operand's gradient
    (``grad_err`` is the largest of the relative errors ‖g − ref‖/‖ref‖ of ∂h, ∂W (, ∂b))."""
    tol = TOLERANCE[case.dtype]
    t0 = time.perf_counter()
    errors = {}
    if mode == "fwd":
        with torch.no_grad():
            loss = float(f(x.hidden, x.weight, x.bias))
        call_ms = (time.perf_counter() - t0) * 1e3
        checked = "loss"
    else:
        ops = [o.detach().requires_grad_(True) for o in x.operands()]
        out = f(*ops, *([None] * (3 - len(ops))))
        grads = torch.autograd.grad(out, ops)
        loss = float(out.detach())
        call_ms = (time.perf_counter() - t0) * 1e3
        names = ("h", "W", "b")
        for name, g, r in zip(names, grads, ref.grads()):
            diff = float((g.to(torch.float64) - r).norm())
            errors[name] = diff / max(float(r.norm()), 1e-300)
        del grads, ops, out
        checked = "loss+grad(" + ",".join(f"{n} {e:.1e}" for n, e in errors.items()) + ")"
    loss_err = rel(loss, ref.loss())
    grad_err = max(errors.values()) if errors else None
    bad = [f"loss_err {loss_err:.2e}"] if not loss_err <= tol else []
    bad += [f"grad_err({n}) {e:.2e}" for n, e in errors.items() if not e <= tol]
    if bad:
        exc = VerificationError(f"differs from the float64 reference: {', '.join(bad)} > tol {tol:.0e}")
        exc.errors = {"loss_err": loss_err, "grad_err": grad_err, "verified": "FAILED"}
        raise exc
    return {"loss_err": loss_err, "grad_err": grad_err, "checked": checked, "call_ms": call_ms}


def _closure(f, x: LinearInputs, mode: str):
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return f(x.hidden, x.weight, x.bias)
        return fn
    ops = [o.detach().requires_grad_(True) for o in x.operands()]
    pad = [None] * (3 - len(ops))

    def fn():
        return torch.autograd.grad(f(*ops, *pad), ops)
    return fn


class LinearRunner(Runner):
    """:class:`~benchmarks.harness.Runner` with fused-linear inputs, reference and verification; the
    timing, the rows, the budget/OOM/skip handling and the reports are the harness's own. ``with_bias``:
    give the student a bias ``[V]`` (its gradient is verified too; LLM heads have none, so off by default)."""

    with_bias = False

    def _run_case(self, case, providers, bar):
        if self._out_of_budget(case, providers, bar):
            return None
        try:
            x = make_linear_inputs(case, self.device, bias=self.with_bias)
            ref = LinearReference(case, x)
            ref.loss()
        except Exception as exc:  # noqa: BLE001
            what = "inputs and float64 reference"
            oom = "out of memory" in str(exc).lower()
            x = ref = None
            self._free()
            return self._skip_all(case, providers, bar, *(("skipped", f"{what}: out of memory") if oom else
                                                           ("failed", f"{what}: {_short(exc)}")))
        pending = []
        for p in providers:
            if isinstance(p, _LinearProvider):  # a provider's teacher is part of the case's inputs
                p.bind(x)
            pending += self._run_provider(case, p, x, None, None, ref, bar)
            if isinstance(p, _LinearProvider):
                p.bind(None)
        self._time(case, pending, bar)

    def _verify_mode(self, case, p, f, mode, x, t, y, ref):
        fields, failure = {}, None
        try:
            checked = verify_linear(case, f, x, mode, ref)
            fields.update(first_call_ms=checked.pop("call_ms", None), loss_err=checked["loss_err"],
                          grad_err=checked["grad_err"], verified=checked["checked"])
            return (case, p, mode, fields, _closure(f, x, mode))
        except VerificationError as exc:
            fields.update(getattr(exc, "errors", {}))
            failure = ("failed", str(exc))
        except Exception as exc:  # noqa: BLE001 - a failing provider is a row, not a crash
            failure = self._failure(exc)
        self._free()
        return self._emit(case, p, mode, *failure, **fields)


# ---------------------------------------------------------------------------------------------
# providers: each build(case, device) returns f(h, W, b) -> loss (the teacher bound from the inputs)
# ---------------------------------------------------------------------------------------------
def _kdk_backend(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "cpu"


class _LinearProvider(Provider):
    inputs: Optional[LinearInputs] = None  # set by bind() before build()

    def bind(self, x: LinearInputs):
        self.inputs = x


class FusedLinear(_LinearProvider):
    """``kdk.fused_linear_distill`` with one teacher form: ``logits`` (TeacherLogits of the materialised
    teacher logits), ``hidden`` (TeacherHidden: the teacher's logits chunk by chunk too) or ``sparse``
    (the stored top-K SparseTeacher)."""

    def __init__(self, form: str):
        self.form = form
        self.name = f"kdk-fused-{form}"
        self.description = {
            "logits": "kdk.fused_linear_distill(h, W, kdk.TeacherLogits(t)) (triton on CUDA, cpu on CPU)",
            "hidden": "kdk.fused_linear_distill(h, W, kdk.TeacherHidden(h_t, W_t)): no [N, V] logits at all",
            "sparse": "kdk.fused_linear_distill(h, W, kdk.SparseTeacher(ids, logprobs, normalize)), K = 64",
        }[form]

    def applies(self, case):
        return case.family == "linear" and (case.sparse == (self.form == "sparse"))

    def unavailable_reason(self, case, device):
        backend = _kdk_backend(device)
        if backend == "triton" and dispatch.interpreting():
            return INTERPRET_REASON
        return dispatch.unavailable_reason(backend, device, "logit")

    def build(self, case, device):
        backend, spec = _kdk_backend(device), linear_spec(case.method)
        x = self.inputs
        teacher = {"logits": lambda: kdk.TeacherLogits(x.teacher_logits),
                   "hidden": lambda: kdk.TeacherHidden(x.teacher_hidden, x.teacher_weight),
                   "sparse": lambda: x.sparse}[self.form]()

        def f(h, w, b):
            return kdk.fused_linear_distill(h, w, teacher, None, spec, student_bias=b, backend=backend)
        return f


class UnfusedKdk(_LinearProvider):
    """``F.linear`` (the [N, V] logits materialised) then ``kdk.logit_distill`` (the fused logit engine)."""
    name = "kdk-unfused"
    description = "F.linear(h, W) then kdk.logit_distill (materialised [N, V] logits; triton on CUDA, cpu on CPU)"

    def applies(self, case):
        return case.family == "linear"

    unavailable_reason = FusedLinear.unavailable_reason

    def build(self, case, device):
        backend, spec, x = _kdk_backend(device), linear_spec(case.method), self.inputs
        teacher = _teacher_values(x, slice(None))
        return lambda h, w, b: kdk.logit_distill(F.linear(h, w, b), teacher, None, spec, backend=backend)


class EagerLinear(_LinearProvider):
    """The published arithmetic on materialised logits, float32 math for 16-bit logits (as autocast):
    ``F.kl_div(log_softmax(z), log_softmax(t), log_target=True, reduction="batchmean")`` for forward KL,
    TRL's generalised JSD, the MaxText renormalised / Megatron-style tail top-K KL (benchmarks/baselines.py)."""
    name = "eager"
    description = ("F.linear + log_softmax + F.kl_div(log_target=True, batchmean) / TRL JSD / top-K KL "
                   "(benchmarks/baselines.py), float32 math")

    def applies(self, case):
        return case.family == "linear"

    def build(self, case, device):
        x = self.inputs
        if case.method == "linear_kl":
            t_logp = torch.log_softmax(x.teacher_logits.float(), -1)

            def loss(z):
                return F.kl_div(torch.log_softmax(z, -1), t_logp, log_target=True, reduction="batchmean")
        elif case.method == "linear_jsd":
            t = x.teacher_logits.float()

            def loss(z):
                return baselines.generalized_jsd(z, t, None, beta=JSD_BETA)
        else:
            fn = baselines.BASELINES["sparse_" + normalize(case.method)][0]

            def loss(z):
                return fn(z, x.sparse, None)
        return lambda h, w, b: loss(F.linear(h, w, b).float())


class LigerLinear(_LinearProvider):
    """Liger-Kernel's fused linear JSD (``LigerFusedLinearJSD``, chunked lm_head + JSD; β = 0 is its
    forward KL), on the teacher's hidden states and head."""
    name = "liger"
    description = "liger_kernel LigerFusedLinearJSD(jsd_beta, temperature=1)(h, W, h_t, W_t) (beta 0: forward KL)"

    def applies(self, case):
        return case.method in ("linear_kl", "linear_jsd")

    def _cls(self):
        return liger_class("LigerFusedLinearJSD", ("liger_kernel.transformers.fused_linear_jsd",
                                                   "liger_kernel.transformers"))

    def unavailable_reason(self, case, device):
        return liger_unavailable_reason(self._cls(), device)

    def build(self, case, device):
        cls, _ = self._cls()
        loss = cls(jsd_beta=JSD_BETA if case.method == "linear_jsd" else 0.0, temperature=1.0)
        x = self.inputs

        def f(h, w, b):
            if b is not None:
                raise NotImplementedError("LigerFusedLinearJSD takes no student bias")
            return loss(h, w, x.teacher_hidden, x.teacher_weight)
        return f


def linear_providers() -> list:
    return [FusedLinear("logits"), FusedLinear("hidden"), FusedLinear("sparse"), UnfusedKdk(), EagerLinear(),
            LigerLinear()]
