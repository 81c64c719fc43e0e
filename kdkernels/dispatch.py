"""Backend selection: ``backend=`` argument > ``KDKERNELS_BACKEND`` > ``"auto"``.

Every fused backend is a *launcher* object (see :mod:`kdkernels.engine` for the contract) found at
``module:attribute`` below, imported lazily. A launcher says why it cannot run on a device through
``unavailable_reason(device) -> str | None``. An explicitly requested backend that cannot run raises
:class:`BackendUnavailableError` with the reasons; only ``"auto"`` falls back.
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

import torch

BACKENDS = ("auto", "reference", "triton", "cuda", "cpu")

#: kernel family → backend → "module:attribute" of its launcher
LAUNCHERS = {
    "logit": {
        "triton": "kdkernels._triton.engine:launcher",
        "cuda": "kdkernels._cpp:cuda_launcher",
        "cpu": "kdkernels._cpp:cpu_launcher",
    },
    "contrastive": {
        "triton": "kdkernels._triton.info_nce:launcher",
    },
}

#: preference of "auto" per device type ("reference" always closes the list)
AUTO_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpu", "triton")}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message lists why."""


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_cache: dict = {}


def load_launcher(family: str, name: str):
    """(launcher, None) or (None, reason) for a fused backend of a kernel family."""
    key = (family, name)
    if key not in _cache:
        target = LAUNCHERS.get(family, {}).get(name)
        if target is None:
            _cache[key] = (None, f"kdkernels has no {name} backend for the {family} kernels")
        else:
            module, attr = target.split(":")
            try:
                _cache[key] = (getattr(importlib.import_module(module), attr), None)
            except Exception as exc:  # import errors are reasons, not crashes
                _cache[key] = (None, f"{module} failed to import: {type(exc).__name__}: {exc}")
    return _cache[key]


def unavailable_reason(name: str, device: torch.device, family: str = "logit") -> Optional[str]:
    """None when backend ``name`` can run the ``family`` kernels on ``device``, else why not."""
    if name == "reference":
        return None
    launcher, reason = load_launcher(family, name)
    return reason if launcher is None else launcher.unavailable_reason(torch.device(device))


@torch.compiler.assume_constant_result  # host-side choice: torch.compile calls it once per graph
def resolve(backend: Optional[str], device: torch.device, family: str = "logit") -> str:
    """The backend name to run on ``device``: the explicit choice (or an error), or auto's pick (cached
    per argument and ``KDKERNELS_BACKEND``/``TRITON_INTERPRET`` values: availability does not change while
    a process runs, and this is called on every loss)."""
    # the environment only steers auto's pick and the Triton backend's availability (an explicit C++ or
    # reference backend skips reading it: host time per call)
    env = (os.environ.get("KDKERNELS_BACKEND"), os.environ.get("TRITON_INTERPRET")) \
        if backend in (None, "auto", "triton") else None
    key = (backend, device, family, env)
    hit = _resolved.get(key)
    if hit is not None and _cache.get((family, hit[0])) is hit[1]:  # the same launcher object: still valid
        return hit[0]
    name = _resolve(backend, device, family)
    if name != "reference":
        _resolved[key] = (name, _cache.get((family, name)))
    return name


_resolved: dict = {}


def _resolve(backend: Optional[str], device: torch.device, family: str) -> str:
    if backend is None:
        backend = "auto"
    if backend == "auto":
        backend = os.environ.get("KDKERNELS_BACKEND", "auto").strip() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    device = torch.device(device)
    if backend != "auto":
        reason = unavailable_reason(backend, device, family)
        if reason is not None:
            raise BackendUnavailableError(f"backend {backend!r} cannot run on {device}: {reason}; "
                                          "`python -m kdkernels.info` lists the backends that can run here")
        return backend
    for name in AUTO_ORDER.get(device.type, ()):
        if unavailable_reason(name, device, family) is None:
            return name
    return "reference"


def report() -> str:
    """A table of every backend's availability per device type, with the reason when unavailable."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    lines = [f"kdkernels backends (torch {torch.__version__}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})"]
    for family in LAUNCHERS:
        for device in devices:
            for name in BACKENDS[1:]:
                reason = unavailable_reason(name, device, family)
                state = "available" if reason is None else f"unavailable: {reason}"
                lines.append(f"  {family:<12} {device.type:<5} {name:<10} {state}")
            lines.append(f"  {family:<12} {device.type:<5} {'auto':<10} -> {resolve('auto', device, family)}")
    if not torch.cuda.is_available():
        lines.append("  (no CUDA device visible: the triton/cuda GPU paths cannot run here)")
    return "\n".join(lines)
