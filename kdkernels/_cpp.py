"""The C++ backends: ``cpu_launcher`` (the CPU twin) and ``cuda_launcher`` (the CUDA fallback).

Both implement the launcher contract of :mod:`kdkernels.engine` over two ``torch.library`` ops defined
in ``csrc/ops.cpp`` (schemas + CPU kernels) and ``csrc/cuda/binding.cpp`` (CUDA kernels):

* ``kdkernels::logit_distill_fwd`` — one fused pass of the LogitDistill engine: per-row losses, the
  learnable-temperature gradient, and ``grad_scale·∂ℓ/∂s`` written into ``grad`` (mutated in place);
* ``kdkernels::scale_rows_`` — ``grad[n] *= factor[n]``, skipping rows whose factor is exactly 1.0.

Their fake (meta) kernels are registered here, so the ops trace under ``torch.compile``; the C++ library
points torch at this module (``set_python_module``) for them.
"""
from __future__ import annotations

from typing import Optional

import torch

from .spec import PackedSpec

try:
    from . import _C  # noqa: F401  (loading it registers the torch.ops.kdkernels.* ops)
    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # a pure-Python install: the C++ backends report why they are missing
    _IMPORT_ERROR = (f"the C++ extension kdkernels._C is not built ({exc}); build it with "
                     "`pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`")

_OPS = ("logit_distill_fwd", "scale_rows_")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if _IMPORT_ERROR is None:
    @torch.library.register_fake("kdkernels::logit_distill_fwd")
    def _logit_distill_fwd_fake(s, t, labels, temperature, fparams, iparams, grad, grad_scale,
                                grad_scale_value, want_dtemp):
        N = s.shape[0]
        acc = _acc_dtype(s.dtype)
        return s.new_empty((N,), dtype=acc), s.new_empty((N if want_dtemp else 0,), dtype=acc)

    @torch.library.register_fake("kdkernels::scale_rows_")
    def _scale_rows_fake(grad, factor):
        return None

    @torch.library.register_fake("kdkernels::_logit_distill_fwd_sim")
    def _logit_distill_fwd_sim_fake(s, t, labels, temperature, fparams, iparams, grad, grad_scale,
                                    grad_scale_value, want_dtemp, lanes):
        return _logit_distill_fwd_fake(s, t, labels, temperature, fparams, iparams, grad, grad_scale,
                                       grad_scale_value, want_dtemp)


_kernels: dict = {}


def _has_kernel(dispatch_key: str) -> bool:
    """Whether kdkernels._C registered kernels for ``dispatch_key`` (fixed once the module is loaded)."""
    if dispatch_key not in _kernels:
        _kernels[dispatch_key] = all(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"kdkernels::{op}", dispatch_key) for op in _OPS)
    return _kernels[dispatch_key]


class CppLauncher:
    """Launcher contract (see :mod:`kdkernels.engine`) over the ``torch.ops.kdkernels`` ops."""

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

    def forward(self, s, t, labels, temperature, spec: PackedSpec, grad, grad_scale):
        rows, dtemp = torch.ops.kdkernels.logit_distill_fwd(*_op_args(s, t, labels, temperature, spec, grad,
                                                                       grad_scale))
        return rows, (dtemp if spec.learnable_temperature else None)

    def scale_(self, grad, factor):
        torch.ops.kdkernels.scale_rows_(grad, factor)
        return grad


def _op_args(s, t, labels, temperature, spec, grad, grad_scale):
    """The op's arguments for the launcher contract's (``spec``: a PackedSpec or a LogitDistill)."""
    floats, ints = spec.pack()
    if isinstance(grad_scale, torch.Tensor):
        scale_t, scale_v = grad_scale, 1.0
    else:
        scale_t, scale_v = None, float(grad_scale)
    return s, t, labels, temperature, floats, ints, grad, scale_t, scale_v, spec.learnable_temperature


class SimulatedCudaLauncher(CppLauncher):
    """Test-only launcher: the CUDA engine's code path (re-read rows, recomputed gradient, multi-lane
    reductions and top-k merges) on CPU tensors, each row run by ``lanes`` host threads standing in for
    a CUDA block. Slow; it lets CI check the CUDA kernels' logic without a GPU."""

    def __init__(self, lanes: int = 4):
        super().__init__("cpu")
        self.lanes = lanes

    def forward(self, s, t, labels, temperature, spec: PackedSpec, grad, grad_scale):
        rows, dtemp = torch.ops.kdkernels._logit_distill_fwd_sim(
            *_op_args(s, t, labels, temperature, spec, grad, grad_scale), self.lanes)
        return rows, (dtemp if spec.learnable_temperature else None)


cpu_launcher = CppLauncher("cpu")
cuda_launcher = CppLauncher("cuda")
