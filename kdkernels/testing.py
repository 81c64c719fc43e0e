"""Check a :class:`~kdkernels.LogitDistill` spec in your own CI: every fused backend against the reference.

Users compose their own specs (DKD + TSM + standardisation + CE, …). :func:`check_spec` runs one on every
fused backend that can run here — the C++ CPU twin, Triton (on CPU through the interpreter when
``TRITON_INTERPRET=1`` was set before ``kdkernels`` was imported), the CUDA backends on a GPU — over a few
shapes and dtypes, and compares the loss and the gradient with the float64 reference
(:mod:`kdkernels.reference`, plain PyTorch autograd) on the same rounded inputs. It also runs a float64
``torch.autograd.gradcheck`` through the fused autograd Function. Every mismatch is reported with the
case that produced it (backend, shape, dtype, seed), so it can be reproduced with one call::

    import kdkernels as kdk
    from kdkernels.testing import assert_spec_matches_reference

    def test_my_loss():
        spec = kdk.LogitDistill(temperature=2.0, standardize=True, ce_weight=1.0,
                                decoupled=kdk.Decoupled(alpha=1.0, beta=8.0))
        assert_spec_matches_reference(spec, shapes=[(4, 16), (2, 3, 100)])

The inputs are seeded random logits (scale 3) with the edge cases the loss definitions promise to
handle: an ignored row (label ``spec.ignore_index``) when a shape has ≥ 3 rows and a masked (``-inf``)
class in row 0 when ``C ≥ 10``. Only the student logits (and a learnable temperature) are differentiated.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch.autograd.gradcheck import GradcheckError

from . import functional
from .dispatch import BACKENDS, unavailable_reason
from .spec import Decoupled, LogitDistill

#: fused backends, in the order they are tried
FUSED_BACKENDS = tuple(b for b in BACKENDS if b not in ("auto", "reference"))

#: (loss tolerance relative to the largest reference loss, gradient tolerance relative to the largest
#: reference gradient entry) per input dtype: the 16/32-bit ones are those of the project's own parity
#: tests; float64 is tighter (the backends agree with the reference to ~1e-15 there; 1e-10 still
#: exposes any parameter or sum rounded through float32, which shows at ~1e-8)
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-3, 3e-3),
    torch.bfloat16: (1e-3, 1.6e-2),
}
#: floors of the relative scales: a loss (gradient) that is ~0 is compared on this absolute scale
LOSS_SCALE_FLOOR = 1e-2
GRAD_SCALE_FLOOR = 1e-3
#: standard deviation of the random logits
LOGIT_SCALE = 3.0
#: classes needed before a masked (−inf) class is placed in row 0
MASKED_CLASS_MIN_C = 10
#: rows needed before row 1 is made an ignored row
IGNORED_ROW_MIN_N = 3
#: gradcheck settings (float64, through the fused Function)
GRADCHECK_TOL = dict(eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)
#: AEKT's weight min(p_y/q_y, w_max) is a constant of the gradient by definition; gradcheck needs it
#: saturated at w_max for the numerical Jacobian to agree, so its max_weight is lowered to this value
AEKT_GRADCHECK_MAX_WEIGHT = 1e-4

DEFAULT_SHAPES = ((4, 16), (3, 100))
DEFAULT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

Shape = Sequence[int]


@dataclass(frozen=True)
class Case:
    """One check: reproduce it with ``check_spec(spec, shapes=[shape], dtypes=[dtype],
    backends=[backend], seed=seed)``."""

    backend: str
    shape: tuple
    dtype: torch.dtype
    seed: int
    check: str = "loss+grad"  # or "gradcheck"

    def __str__(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        return f"{self.check} backend={self.backend} shape={self.shape} dtype={dtype} seed={self.seed}"


@dataclass
class Mismatch:
    """A case whose result differs from the reference (or that raised)."""

    case: Case
    what: str     # "loss", "grad", "temperature grad", "dtype", "finiteness", "gradcheck" or "error"
    detail: str

    def __str__(self) -> str:
        return f"{self.case}: {self.what}: {self.detail}"


@dataclass
class SpecCheck:
    """The result of :func:`check_spec`: ``ok`` when at least one case ran and none mismatched."""

    spec: LogitDistill
    passed: list = field(default_factory=list)      # Case
    mismatches: list = field(default_factory=list)  # Mismatch
    skipped: dict = field(default_factory=dict)     # backend → reason it cannot run here

    @property
    def ok(self) -> bool:
        return bool(self.passed) and not self.mismatches

    def __str__(self) -> str:
        lines = [f"kdkernels.testing.check_spec: {len(self.passed)} cases passed, "
                 f"{len(self.mismatches)} mismatched, for {self.spec!r}"]
        lines += [f"  MISMATCH {m}" for m in self.mismatches]
        lines += [f"  skipped backend {b}: {why}" for b, why in self.skipped.items()]
        if not self.passed and not self.mismatches:
            lines.append("  no fused backend ran: build the C++ extension (pip install --no-build-isolation "
                         "-e .) or set TRITON_INTERPRET=1 before importing kdkernels; "
                         "`python -m kdkernels.info` says what can run here")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def case_seed(seed: int, shape: Shape) -> int:
    """The generator seed of a shape's inputs: the same logits for every backend and dtype of a shape."""
    mixed = seed
    for d in shape:
        mixed = (mixed * 1_000_003 + int(d)) % (2 ** 31)
    return mixed


def make_inputs(spec: LogitDistill, shape: Shape, dtype: torch.dtype, seed: int, device, *,
                labels: bool = True, edge_cases: bool = True, masked: Optional[bool] = None):
    """``(s, t, y)`` for one case: float64 random logits rounded to ``dtype``, labels or None.

    Edge cases (``edge_cases=True``): row 1 ignored when there are ≥ 3 rows (and labels), and one masked
    (``-inf``) class in row 0 (not its label) when ``C ≥ 10``.
    """
    shape = tuple(int(d) for d in shape)
    C, N = shape[-1], math.prod(shape[:-1])
    gen = torch.Generator().manual_seed(case_seed(seed, shape))
    s = torch.randn(N, C, generator=gen, dtype=torch.float64) * LOGIT_SCALE
    t = torch.randn(N, C, generator=gen, dtype=torch.float64) * LOGIT_SCALE
    y = torch.randint(0, C, (N,), generator=gen)
    masked = edge_cases if masked is None else masked
    if masked and C >= MASKED_CLASS_MIN_C and N >= 1:
        col = (int(y[0]) + 1 + int(torch.randint(0, C - 2, (1,), generator=gen))) % C
        s[0, col] = t[0, col] = -math.inf
    if edge_cases and labels and N >= IGNORED_ROW_MIN_N:
        y[1] = spec.ignore_index
    s = s.to(dtype).reshape(shape).to(device)
    t = t.to(dtype).reshape(shape).to(device)
    return s, t, (y.reshape(shape[:-1]).to(device) if labels else None)


def _grad_output(loss: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded non-unit ``grad_output`` in [0.5, 1.5) (exercises the backward's scaling)."""
    gen = torch.Generator().manual_seed(seed + 1)
    return (torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5).to(loss.dtype).to(loss.device)


# ---------------------------------------------------------------------------------------------
# one case
# ---------------------------------------------------------------------------------------------
def _loss_and_grads(s, t, y, spec: LogitDistill, backend: str, seed: int):
    """(loss, ∂/∂s, ∂/∂T or None) of ``logit_distill`` with a seeded non-unit grad_output."""
    x = s.detach().clone().requires_grad_(True)
    loss = functional.logit_distill(x, t, y, spec, backend=backend)
    inputs = (x, spec.temperature) if spec.learnable_temperature else (x,)
    grads = torch.autograd.grad(loss, inputs, _grad_output(loss, seed))
    return loss.detach(), grads[0], (grads[1] if len(grads) > 1 else None)


def _as_float64_spec(spec: LogitDistill) -> LogitDistill:
    """The spec for the float64 reference: a learnable temperature becomes a float64 leaf copy."""
    if not spec.learnable_temperature:
        return spec
    return spec.replace(temperature=spec.temperature.detach().double().clone().requires_grad_(True))


def _relative_error(got: torch.Tensor, want: torch.Tensor, floor: float) -> float:
    scale = max(float(want.abs().max()), floor) if want.numel() else floor
    return float((got.double() - want).abs().max()) / scale if want.numel() else 0.0


def compare(got, want, dtype: torch.dtype, tolerances=None) -> list:
    """``[(what, detail)]`` for every way ``got = (loss, grad, dT)`` differs from the float64 ``want``."""
    (loss, grad, d_t), (loss_ref, grad_ref, d_t_ref) = got, want
    tol_loss, tol_grad = (tolerances or TOLERANCES)[dtype]
    problems = []
    want_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if loss.dtype != want_dtype or grad.dtype != dtype:
        problems.append(("dtype", f"loss {loss.dtype} (want {want_dtype}), grad {grad.dtype} (want {dtype})"))
    finite = torch.isfinite(loss_ref)
    if not torch.equal(finite, torch.isfinite(loss)):
        problems.append(("finiteness", f"loss {loss.tolist()} vs reference {loss_ref.tolist()}"))
        return problems
    err = _relative_error(loss[finite], loss_ref[finite], LOSS_SCALE_FLOOR)
    if not err <= tol_loss:
        problems.append(("loss", f"relative error {err:.3e} > {tol_loss:g} "
                                 f"(got {loss.tolist()}, reference {loss_ref.tolist()})"))
    g_finite = torch.isfinite(grad_ref)
    if not torch.equal(g_finite, torch.isfinite(grad)):
        bad = (g_finite != torch.isfinite(grad)).nonzero()[0].tolist()
        problems.append(("finiteness", f"gradient finiteness differs first at index {bad}"))
    else:
        g_err = _relative_error(grad[g_finite], grad_ref[g_finite], GRAD_SCALE_FLOOR)
        if not g_err <= tol_grad:
            where = ((grad.double() - grad_ref).abs().nan_to_num(0).flatten().argmax())
            index = list(torch.unravel_index(where, grad.shape)) if grad.dim() else []
            problems.append(("grad", f"relative error {g_err:.3e} > {tol_grad:g} (largest at index "
                                     f"{[int(i) for i in index]})"))
    if d_t_ref is not None:
        t_err = _relative_error(d_t, d_t_ref, GRAD_SCALE_FLOOR)
        if not t_err <= tol_grad:
            problems.append(("temperature grad", f"relative error {t_err:.3e} > {tol_grad:g}"))
    return problems


def _gradcheck_spec(spec: LogitDistill) -> LogitDistill:
    dec = spec.decoupled
    if dec is not None and dec.adaptive:
        spec = spec.replace(decoupled=Decoupled(dec.alpha, dec.beta, adaptive=True,
                                                max_weight=AEKT_GRADCHECK_MAX_WEIGHT))
    return _as_float64_spec(spec)


def repeatable_backward():
    """``kdkernels.repeatable_backward()`` when this version has it (repeated backward through the fused
    Function is opt-in there), else a no-op context."""
    import kdkernels
    ctx = getattr(kdkernels, "repeatable_backward", None)
    return ctx() if ctx is not None else contextlib.nullcontext()


def gradcheck_case(spec: LogitDistill, shape: Shape, backend: str, seed: int, device, *, labels=True):
    """float64 gradcheck of ``logit_distill`` through the fused backend (student logits and a learnable
    temperature); raises ``torch.autograd.gradcheck.GradcheckError`` on a mismatch."""
    spec = _gradcheck_spec(spec)
    s, t, y = make_inputs(spec, shape, torch.float64, seed, device, labels=labels, masked=False)
    inputs = [s.clone().requires_grad_(True)]
    if spec.learnable_temperature:
        inputs.append(spec.temperature)

    def fn(x, *temperature):
        run_spec = spec.replace(temperature=temperature[0]) if temperature else spec
        return functional.logit_distill(x, t, y, run_spec, backend=backend)

    with repeatable_backward():
        return torch.autograd.gradcheck(fn, tuple(inputs), **GRADCHECK_TOL)


def _check_case(spec, case: Case, device, labels: bool, tolerances) -> list:
    s, t, y = make_inputs(spec, case.shape, case.dtype, case.seed, device, labels=labels)
    got = _loss_and_grads(s, t, y, spec, case.backend, case.seed)
    want = _loss_and_grads(s.double(), t.double(), y, _as_float64_spec(spec), "reference", case.seed)
    return [Mismatch(case, what, detail) for what, detail in compare(got, want, case.dtype, tolerances)]


def _run_case(spec, case: Case, device, labels: bool, tolerances) -> list:
    try:
        if case.check == "gradcheck":
            gradcheck_case(spec, case.shape, case.backend, case.seed, device, labels=labels)
            return []
        return _check_case(spec, case, device, labels, tolerances)
    except Exception as exc:  # noqa: BLE001 - a case that raises is reported with the case, not fatal
        what = "gradcheck" if isinstance(exc, GradcheckError) else "error"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return [Mismatch(case, what, f"{type(exc).__name__}: {first_line}")]


# ---------------------------------------------------------------------------------------------
# the public checks
# ---------------------------------------------------------------------------------------------
def available_backends(device="cpu") -> dict:
    """``{backend: None or the reason it cannot run on device}`` for every fused backend."""
    return {b: unavailable_reason(b, torch.device(device)) for b in FUSED_BACKENDS}


def check_spec(spec: LogitDistill, shapes: Sequence[Shape] = DEFAULT_SHAPES,
               dtypes: Sequence[torch.dtype] = DEFAULT_DTYPES, backends: Optional[Sequence[str]] = None,
               seed: int = 0, *, device: Union[str, torch.device] = "cpu", labels: bool = True,
               gradcheck: bool = True, gradcheck_shape: Optional[Shape] = None,
               tolerances: Optional[dict] = None) -> SpecCheck:
    """Run ``spec`` on every fused backend and compare it with the float64 reference.

    * ``shapes``: logit shapes ``[..., C]`` (leading dims are rows); each must suit the spec (e.g. TDL needs
      ``2k < C``). A per-row temperature tensor in the spec fixes the rows: give matching shapes.
    * ``dtypes``: input dtypes; tolerances per dtype from ``tolerances`` (default :data:`TOLERANCES`).
    * ``backends``: backend names (default: every fused backend; those that cannot run on ``device``
      are listed in ``result.skipped`` with the reason). Naming a backend that cannot run is an error.
    * ``gradcheck``: also run a float64 ``torch.autograd.gradcheck`` through each fused backend on
      ``gradcheck_shape`` (default: the smallest of ``shapes``).
    * ``labels``: pass labels (needed by CE and decoupled terms); ``False`` checks the label-free path.

    Returns a :class:`SpecCheck`; ``print(result)`` lists every mismatch with its case. Nothing raises
    for a mismatch (see :func:`assert_spec_matches_reference` for that).
    """
    if not isinstance(spec, LogitDistill):
        raise TypeError(f"spec must be a kdkernels.LogitDistill, got {type(spec).__name__}")
    device = torch.device(device)
    shapes = [tuple(int(d) for d in shape) for shape in shapes]
    if not shapes:
        raise ValueError("check_spec needs at least one shape")
    for shape in shapes:
        if len(shape) < 1:
            raise ValueError(f"shapes are logit shapes [..., C], got {shape}")
        spec.check_classes(shape[-1])
    unknown = [d for d in dtypes if d not in TOLERANCES and d not in (tolerances or {})]
    if unknown:
        raise ValueError(f"no tolerance for dtypes {unknown}; pass tolerances={{dtype: (loss, grad)}}")
    result = SpecCheck(spec)
    reasons = available_backends(device)
    if backends is None:
        result.skipped = {b: why for b, why in reasons.items() if why is not None}
        backends = [b for b, why in reasons.items() if why is None]
    else:
        for b in backends:
            if b not in reasons:
                raise ValueError(f"unknown fused backend {b!r}; choose from {FUSED_BACKENDS}")
            if reasons[b] is not None:
                raise ValueError(f"backend {b!r} cannot run on {device}: {reasons[b]}")
    cases = [Case(b, shape, dtype, seed) for b in backends for shape in shapes for dtype in dtypes]
    if gradcheck:
        small = tuple(gradcheck_shape) if gradcheck_shape is not None else min(shapes, key=math.prod)
        cases += [Case(b, small, torch.float64, seed, "gradcheck") for b in backends]
    for case in cases:
        found = _run_case(spec, case, device, labels, tolerances)
        if found:
            result.mismatches.extend(found)
        else:
            result.passed.append(case)
    return result


def assert_spec_matches_reference(spec: LogitDistill, **kwargs) -> SpecCheck:
    """:func:`check_spec` for pytest: raises ``AssertionError`` listing every mismatch with its case, or
    when no fused backend could run here (a check that checked nothing is not a pass)."""
    result = check_spec(spec, **kwargs)
    if not result.ok:
        raise AssertionError(str(result))
    return result


__all__ = ["Case", "Mismatch", "SpecCheck", "TOLERANCES", "assert_spec_matches_reference",
           "available_backends", "check_spec", "compare", "gradcheck_case", "make_inputs"]
