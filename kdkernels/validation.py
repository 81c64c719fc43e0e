"""Argument checks at the API boundary.

Shape, dtype, device and parameter checks are always on and never touch tensor *values* (no device
sync). Check mode (``KDKERNELS_CHECK=1`` or ``check=True``) adds the checks that need the values: label
range and non-finite logits (``+inf``/NaN; ``-inf`` marks a masked class and is valid).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_mode(check: Optional[bool]) -> bool:
    if check is not None:
        return bool(check)
    return os.environ.get("KDKERNELS_CHECK", "0").strip().lower() not in ("", "0", "false", "no", "off")


def check_logits(s, t, s_name="student_logits", t_name="teacher_logits", *, mixed_dtypes: bool = False) -> None:
    """Types, dtypes, shapes and devices of a (student, teacher) pair; ``mixed_dtypes``: the two may
    differ in floating dtype (the logit engine reads each in its own dtype)."""
    for name, x in ((s_name, s), (t_name, t)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
        if x.dim() < 1:
            raise ValueError(f"{name} must have shape [..., C], got a 0-dim tensor")
    if s.shape != t.shape:
        raise ValueError(f"{s_name} and {t_name} must have the same shape, got {tuple(s.shape)} and {tuple(t.shape)}")
    if s.device != t.device:
        raise ValueError(f"{s_name} and {t_name} must be on the same device, got {s.device} and {t.device}")
    if s.dtype != t.dtype and not mixed_dtypes:
        raise TypeError(f"{s_name} and {t_name} must have the same dtype, got {s.dtype} and {t.dtype} "
                        f"(cast with .to({s.dtype}))")


def flatten_labels(labels, lead_shape, device) -> Optional[torch.Tensor]:
    """Labels of shape ``lead_shape`` → int64 ``[N]`` (no value check here)."""
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != lead_shape:
        raise ValueError(f"labels must have shape {tuple(lead_shape)} (the logits' leading dims), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels must be on the logits' device {device}, got {labels.device}")
    if labels.dim() == 1 and labels.dtype == torch.int64 and labels.stride(0) == 1:
        return labels  # already what the kernels read (no op dispatched: host time per call)
    return labels.reshape(-1).to(torch.int64).contiguous()  # kernels read labels[row] densely


def flatten_temperature(T: torch.Tensor, lead_shape, N: int, device) -> torch.Tensor:
    """A temperature tensor (0-dim or leading-dims shaped) → ``[N]`` view (stride 0 for a scalar)."""
    if T.device != device:
        raise ValueError(f"temperature must be on the logits' device {device}, got {T.device}")
    if T.dim() == 0 or T.numel() == 1 and T.dim() <= 1:
        return T.reshape(()).expand(N)
    if tuple(T.shape) not in (tuple(lead_shape), (N,)):
        raise ValueError(f"a per-row temperature must have shape {tuple(lead_shape)} or ({N},), got {tuple(T.shape)}")
    return T.reshape(N)


def check_label_values(labels, C: int, ignore_index: int) -> None:
    """Check mode: every label is in ``[0, C)`` or ``ignore_index`` (device sync)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= C))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels[{row}] = {int(labels[row])} is outside [0, {C}) and is not "
                         f"ignore_index={ignore_index}")


def check_values(s2d, t2d, labels, C: int, ignore_index: int, temperature=None) -> None:
    """Check mode: label range, non-finite logits, non-positive temperature tensors (device sync)."""
    if labels is not None:
        check_label_values(labels, C, ignore_index)
    for name, x in (("student_logits", s2d), ("teacher_logits", t2d)):
        bad = torch.isnan(x) | (x == float("inf"))
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name} row {row} contains +inf or NaN (only -inf, a masked class, is allowed)")
    if temperature is not None:
        T = temperature.detach()
        if bool((~torch.isfinite(T) | (T <= 0)).any()):
            raise ValueError("temperature tensor has non-positive entries (or NaN/inf)")


#: integer dtypes accepted for sparse-teacher ids (uint16 is the common storage for vocabularies < 65536)
ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint16)


def flatten_sparse(teacher, lead_shape, device):
    """A ``SparseTeacher``'s ``(ids, logprobs)`` ``[..., K]`` → ``[N, K]`` (ids int32 or int64, both with unit
    column stride; uint16/int16 ids are widened to int32, an ``N·K`` copy). No value check here."""
    ids, logprobs = teacher.ids, teacher.logprobs
    for name, x in (("SparseTeacher.ids", ids), ("SparseTeacher.logprobs", logprobs)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.device != device:
            raise ValueError(f"{name} must be on the student's device {device}, got {x.device}")
        if x.dim() < 1 or x.shape[:-1] != lead_shape:
            raise ValueError(f"{name} must have shape {tuple(lead_shape)} + (K,) (the student's leading dims), "
                             f"got {tuple(x.shape)}")
    if ids.dtype not in ID_DTYPES:
        raise TypeError(f"SparseTeacher.ids must be int64, int32, int16 or uint16, got {ids.dtype}")
    if logprobs.dtype not in FLOAT_DTYPES:
        raise TypeError(f"SparseTeacher.logprobs must be float32, bfloat16, float16 or float64, got {logprobs.dtype}")
    if ids.shape != logprobs.shape:
        raise ValueError(f"SparseTeacher.ids and .logprobs must have the same shape, got {tuple(ids.shape)} "
                         f"and {tuple(logprobs.shape)}")
    K = ids.shape[-1]
    if ids.dtype not in (torch.int64, torch.int32):
        ids = ids.to(torch.int32)
    if ids.dim() != 2:
        ids = ids.reshape(-1, K)
        logprobs = logprobs.reshape(-1, K)
    return (ids if ids.stride(-1) == 1 else ids.contiguous(),
            logprobs if logprobs.stride(-1) == 1 else logprobs.contiguous())


#: stored log-probabilities may exceed 0 by rounding (a bf16 or fp32 log_softmax of a dominant token)
LOGPROB_SLACK = 1e-3


def check_sparse_spec(spec, teacher, K: int) -> None:
    """What a spec may combine with a sparse teacher of K slots (the spec's own rules), and no teacher
    softcap: the teacher holds log-probabilities. Checked once per spec object and (normalize, K)."""
    key = ("_sparse_checked", teacher.normalize, K)
    compiling = torch.compiler.is_compiling()  # (dynamo traces no tuple keys in __dict__: no cache there)
    if not compiling and key in spec.__dict__:
        return
    spec.check_sparse(teacher.normalize, K)
    if spec.softcap[1] != 0:
        raise ValueError("softcap: a sparse teacher holds log-probabilities, not logits; cap the student only, "
                         "e.g. softcap=(30.0, None)")
    if not compiling:
        spec.__dict__[key] = True


def check_sparse_values(ids, logprobs, C: int) -> None:
    """Check mode for a sparse teacher (device sync): ids in ``[0, C)`` or padding, distinct within a row;
    log-probabilities finite or −inf and ≤ 0 (up to ``LOGPROB_SLACK``) at the valid slots."""
    valid = ids >= 0
    bad = valid & (ids >= C)
    if bool(bad.any()):
        row, slot = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"SparseTeacher.ids[{row}, {slot}] = {int(ids[row, slot])} is outside [0, {C}) "
                         "(padding slots use a negative id)")
    lp = logprobs.detach()
    bad = valid & (torch.isnan(lp) | (lp > LOGPROB_SLACK))
    if bool(bad.any()):
        row, slot = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"SparseTeacher.logprobs[{row}, {slot}] = {float(lp[row, slot])}: log-probabilities "
                         "must be finite or -inf and <= 0")
    key = torch.where(valid, ids.long(), -1 - torch.arange(ids.shape[-1], device=ids.device))
    ordered = key.sort(-1).values
    dup = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if bool(dup.any()):
        row = int(dup.nonzero()[0, 0])
        raise ValueError(f"SparseTeacher.ids row {row} holds the id {int(ordered[row, 1:][dup[row]][0])} twice "
                         "(ids of a row must be distinct)")
