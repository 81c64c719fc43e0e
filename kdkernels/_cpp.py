"""The C++ backends: ``cpu_launcher`` (the CPU twin) and ``cuda_launcher`` (the CUDA fallback).

Both implement the launcher contract of :mod:`kdkernels.engine` (``contract = 2``) over two
``torch.library`` ops defined in ``csrc/ops.cpp`` (schemas + CPU kernels) and ``csrc/cuda/binding.cpp``
(CUDA kernels):

* ``kdkernels::logit_distill_fwd`` — one launch of the LogitDistill engine: the per-row work and the
  reduction (none → ``[N]`` rows × loss_weight; sum / batchmean → a 0-dim tensor, batchmean's valid-row
  count taken from the labels inside the op), ``∂loss/∂T_n`` for a learnable temperature, and
  ``grad_factor·∂loss/∂s`` written into ``grad`` (declared ``Tensor(a!)``, version counter bumped);
* ``kdkernels::scale_rows_`` — ``grad[n] *= factor[n]``, skipping rows whose factor is exactly 1.0;
* ``kdkernels::logit_distill_loss`` (``csrc/autograd.cpp``) — the same forward launch with its backward
  (``scale_rows_`` by ``grad_output``) recorded by a C++ autograd node: the launchers' ``fused_loss``, which
  :func:`kdkernels.engine.fused_logit_distill` takes for the common calls, so no Python runs in backward.

The student and the teacher may have different floating dtypes (each is loaded in its own dtype; the
CUDA engine pairs any of float32/float16/bfloat16, float64 only with float64). The teacher may be a
:class:`~kdkernels.spec.SparseTeacher` (its ``ids`` [N, K] int32/int64 go to the op's ``teacher_ids``, its
``logprobs`` [N, K] take the place of ``t``, in any float dtype): both engines compute it (the CUDA
fallback, and its simulator, sort each row's K slots in shared memory and find each class by binary search).

Their fake (meta) kernels are registered here, so the ops trace under ``torch.compile``; the C++ library
points torch at this module (``set_python_module``) for them.
"""
from __future__ import annotations

from typing import Optional

import torch

from .spec import INT_FIELDS, REDUCTION_CODES, PackedSpec, SparseTeacher

try:
    from . import _C  # noqa: F401  (loading it registers the torch.ops.kdkernels.* ops)
    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # a pure-Python install: the C++ backends report why they are missing
    _IMPORT_ERROR = (f"the C++ extension kdkernels._C is not built ({exc}); build it with "
                     "`pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`")

_OPS = ("logit_distill_fwd", "scale_rows_")
_REDUCTION_SLOT = INT_FIELDS.index("reduction")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if _IMPORT_ERROR is None:
    @torch.library.register_fake("kdkernels::logit_distill_fwd")
    def _logit_distill_fwd_fake(s, t, labels, temperature, fparams, iparams, grad, grad_factor, want_dtemp,
                                teacher_ids=None):
        N = s.shape[0]
        acc = _acc_dtype(s.dtype)
        per_row = iparams[_REDUCTION_SLOT] == REDUCTION_CODES["none"]
        return (s.new_empty((N,) if per_row else (), dtype=acc),
                s.new_empty((N if want_dtemp else 0,), dtype=acc))

    @torch.library.register_fake("kdkernels::logit_distill_loss")
    def _logit_distill_loss_fake(s, t, labels, temperature, fparams, iparams, teacher_ids=None):
        return _logit_distill_fwd_fake(s, t, labels, temperature, fparams, iparams, None, None, False)[0]

    @torch.library.register_fake("kdkernels::scale_rows_")
    def _scale_rows_fake(grad, factor):
        return None

    @torch.library.register_fake("kdkernels::_logit_distill_fwd_sim")
    def _logit_distill_fwd_sim_fake(s, t, labels, temperature, fparams, iparams, grad, grad_factor, want_dtemp,
                                    lanes, teacher_ids=None):
        return _logit_distill_fwd_fake(s, t, labels, temperature, fparams, iparams, grad, grad_factor, want_dtemp)


_kernels: dict = {}


def _has_kernel(dispatch_key: str) -> bool:
    """Whether kdkernels._C registered kernels for ``dispatch_key`` (fixed once the module is loaded)."""
    if dispatch_key not in _kernels:
        _kernels[dispatch_key] = all(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"kdkernels::{op}", dispatch_key) for op in _OPS)
    return _kernels[dispatch_key]


class CppLauncher:
    """Launcher contract 2 (see :mod:`kdkernels.engine`) over the ``torch.ops.kdkernels`` ops."""

    #: the launcher contract this object implements (BRIEF / issue 9: reduction inside the launch)
    contract = 2

    def __init__(self, device_type: str):
        self.device_type = device_type

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        device = torch.device(device)
        if _IMPORT_ERROR is not None:
            return _IMPORT_ERROR
        if device.type != self.device_type:
            return f"the {self.device_type} C++ backend runs on {self.device_type} tensors only, got {device.type}"
        if self.device_type == "cuda":
            if not _has_kernel("CUDA"):
                return ("kdkernels._C was built without the CUDA fallback (needs a CUDA build of torch and "
                        "nvcc at build time; KDKERNELS_BUILD_CUDA=1 makes that an error)")
            if not torch.cuda.is_available():
                return "no CUDA device is available"
        elif not _has_kernel("CPU"):
            return "kdkernels._C has no CPU kernels registered"
        return None

    def forward(self, s, t, labels, temperature, spec: PackedSpec, grad=None, grad_factor=None):
        """``(loss, dtemp)``: loss ``[N]`` (reduction none) or 0-dim; dtemp ``[N]`` or None."""
        loss, dtemp = torch.ops.kdkernels.logit_distill_fwd(*_op_args(s, t, labels, temperature, spec, grad,
                                                                       grad_factor), _teacher_ids(t))
        return loss, (dtemp if spec.learnable_temperature else None)

    def scale_(self, grad, factor):
        torch.ops.kdkernels.scale_rows_(grad, factor)
        return grad

    def fused_loss(self, s, t, labels, temperature, spec: PackedSpec):
        """The loss of one forward launch that writes the gradient, with a C++ autograd node whose backward
        scales it by ``grad_output`` (the optional fast path of the launcher contract; the caller checks
        that the call needs nothing else: see :func:`kdkernels.engine.fused_logit_distill`)."""
        ids = _teacher_ids(t)
        s, t, labels, temperature, floats, ints, _, _, _ = _op_args(s, t, labels, temperature, spec, None, None)
        return torch.ops.kdkernels.logit_distill_loss(s, t, labels, temperature, floats, ints, ids)


def _op_args(s, t, labels, temperature, spec, grad, grad_factor):
    """The op's arguments for the launcher contract's (``spec``: a PackedSpec or a LogitDistill; ``t``: dense
    teacher logits or a SparseTeacher, whose ids become ``teacher_ids`` and its log-probabilities ``t``),
    without the trailing ``teacher_ids`` (see :func:`_teacher_ids`)."""
    floats, ints = spec.pack()
    if isinstance(t, SparseTeacher):
        t = t.logprobs
    return s, t, labels, temperature, floats, ints, grad, grad_factor, spec.learnable_temperature


def _teacher_ids(t):
    """The op's ``teacher_ids``: a SparseTeacher's ids, else None."""
    return t.ids if isinstance(t, SparseTeacher) else None


class SimulatedCudaLauncher(CppLauncher):
    """Test-only launcher: the CUDA launch's code path (count, re-read rows, recomputed gradient, multi-lane
    reductions and top-k merges, the last block's reduction) on CPU tensors, each block run by ``lanes``
    host threads. Slow; it lets CI check the CUDA kernels' logic without a GPU."""

    #: no C++ autograd fast path: every call goes through the simulated launch
    fused_loss = None

    def __init__(self, lanes: int = 4):
        super().__init__("cpu")
        self.lanes = lanes

    def forward(self, s, t, labels, temperature, spec: PackedSpec, grad=None, grad_factor=None):
        loss, dtemp = torch.ops.kdkernels._logit_distill_fwd_sim(
            *_op_args(s, t, labels, temperature, spec, grad, grad_factor), self.lanes, _teacher_ids(t))
        return loss, (dtemp if spec.learnable_temperature else None)


cpu_launcher = CppLauncher("cpu")
cuda_launcher = CppLauncher("cuda")
