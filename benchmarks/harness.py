"""The benchmark loop: for every case, provider and mode one row — verified, then timed — or a row that
says why it was skipped (provider unavailable, out of memory, time budget) or failed (an exception, a
result that differs from the float64 reference). A provider never crashes the run."""
from __future__ import annotations

import gc
import time
import traceback

import torch

from .progress import Progress
from .shapes import make_inputs, min_bytes, min_flops
from .timing import is_oom, measure, measure_interleaved, peak_extra_mib, sync
from .verify import Reference, VerificationError, verify

MODES = ("fwd", "fwd+bwd")
#: exceptions of a provider that make a skipped row (the backend lacks the option or its kernel module),
#: every other exception a failed one
NOT_AVAILABLE = (NotImplementedError, ModuleNotFoundError)

COLUMNS = ["suite", "method", "family", "N", "C", "K", "H", "dtype", "mode", "provider", "status", "reason",
           "time_ms", "p20_ms", "p80_ms", "first_call_ms", "bytes_min", "GBps", "pct_copy",
           "flops_min", "TFLOPs", "pct_matmul", "peak_extra_MiB", "loss_err", "grad_err", "verified"]


def _short(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:limit]


def _closure(f, s, t, y, mode):
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return f(s, t, y)
    else:
        x = s.detach().requires_grad_(True)

        def fn():
            return torch.autograd.grad(f(x, t, y), x)[0]
    return fn


class Runner:
    """Runs cases × providers × modes; ``rows`` accumulates the result dictionaries (keys: COLUMNS)."""

    def __init__(self, providers, device, modes=MODES, warmup_ms=25.0, rep_ms=100.0, copy_GBps=None,
                 matmul_TFLOPs=None, deadline=None, budget_note="", progress=True, stream=None, min_reps=5,
                 max_elements=None, verify_only=False):
        self.providers, self.device, self.modes = providers, torch.device(device), tuple(modes)
        self.warmup_ms, self.rep_ms, self.min_reps = warmup_ms, rep_ms, min_reps
        self.copy_GBps, self.matmul_TFLOPs = copy_GBps, matmul_TFLOPs or {}
        self.deadline, self.budget_note = deadline, budget_note
        self.progress, self.stream = progress, stream
        #: cases with more elements per input are skipped (default: 2**26 on CPU, no limit on CUDA)
        self.max_elements = max_elements if max_elements is not None else (
            1 << 26 if self.device.type == "cpu" else 0)
        self.verify_only = verify_only  # spot checks: verify every row, time none
        self.rows = []

    # ------------------------------------------------------------------------------------------
    def _base(self, case, provider, mode):
        return {"suite": case.suite, "method": case.method, "family": case.family, "N": case.N, "C": case.C,
                "K": case.K or None, "H": case.H or None, "dtype": case.dtype, "mode": mode, "provider": provider.name,
                "bytes_min": min_bytes(case, mode), "flops_min": min_flops(case, mode) or None}

    def _emit(self, case, provider, mode, status, reason="", **fields):
        row = dict.fromkeys(COLUMNS)
        row.update(self._base(case, provider, mode), status=status, reason=reason, **fields)
        self.rows.append(row)
        return row

    def _units(self, cases):
        return sum(len(self.modes) for c in cases for p in self.providers if p.applies(c))

    def run(self, cases, on_case_done=None):
        bar = Progress(self._units(cases), stream=self.stream, enabled=self.progress)
        for case in cases:
            providers = [p for p in self.providers if p.applies(case)]
            self._run_case(case, providers, bar)
            self._free()
            if on_case_done is not None:
                on_case_done(self.rows)
        return self.rows

    def _free(self):
        """Give freed device memory back (after a case or a failure); nothing to do on CPU."""
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------------
    def _skip_all(self, case, providers, bar, status, reason):
        for p in providers:
            for mode in self.modes:
                self._emit(case, p, mode, status, reason)
                bar.step(f"{case.label} {mode} {p.name}: {status}")

    def _out_of_budget(self, case, providers, bar) -> bool:
        """Skip every row of ``case`` (and say so) when the time budget is spent or the case is too large."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            self._skip_all(case, providers, bar, "skipped", f"time budget spent{self.budget_note}")
            return True
        if self.max_elements and case.elements > self.max_elements:
            self._skip_all(case, providers, bar, "skipped",
                           f"{case.elements} elements exceed the limit of {self.max_elements} on "
                           f"{self.device.type} (--max-elements)")
            return True
        return False

    def _run_case(self, case, providers, bar):
        if self._out_of_budget(case, providers, bar):
            return None
        failure = None
        try:
            s, t, y = make_inputs(case, self.device)
            ref = Reference(case, s, t, y)
            ref.loss()
        except Exception as exc:  # noqa: BLE001
            what = "inputs and float64 reference"
            failure = ("skipped", f"{what}: out of memory") if is_oom(exc) else ("failed", f"{what}: {_short(exc)}")
        if failure is not None:
            s = t = y = ref = None
            self._free()
            return self._skip_all(case, providers, bar, *failure)
        pending = []  # verified (row, fn) pairs, timed together below
        for p in providers:
            pending += self._run_provider(case, p, s, t, y, ref, bar)
        self._time(case, pending, bar)

    def _run_provider(self, case, p, s, t, y, ref, bar):
        """Verify every mode of one provider: a row for each failure, a (row, fn) pair to time for each
        success."""
        try:
            reason = p.unavailable_reason(case, self.device)
        except Exception as exc:  # noqa: BLE001
            reason, status = "unavailable_reason raised " + _short(exc), "failed"
        else:
            status = "skipped"
        if reason is None and self.deadline is not None and time.monotonic() > self.deadline:
            reason, status = f"time budget spent{self.budget_note}", "skipped"
        f = None
        if reason is None:
            try:
                f = p.build(case, self.device)
            except NotImplementedError as exc:
                reason, status = "build: " + _short(exc), "skipped"
            except Exception as exc:  # noqa: BLE001
                reason, status = "build: " + _short(exc), "failed"
        pending = []
        for mode in self.modes:
            if f is None:
                self._emit(case, p, mode, status, reason)
                bar.step(f"{case.label} {mode} {p.name}: {status}")
                continue
            verified = self._verify_mode(case, p, f, mode, s, t, y, ref)
            if isinstance(verified, dict):  # a failed row, already emitted
                bar.step(f"{case.label} {mode} {p.name}: {verified['status']}")
            else:
                pending.append(verified)
        return pending

    def _verify_mode(self, case, p, f, mode, s, t, y, ref):
        fields, failure = {}, None
        try:
            checked = verify(case, f, s, t, y, mode, ref)
            fields.update(first_call_ms=checked.pop("call_ms", None), loss_err=checked["loss_err"],
                          grad_err=checked["grad_err"], verified=checked["checked"])
            return (case, p, mode, fields, _closure(f, s, t, y, mode))
        except VerificationError as exc:
            fields.update(getattr(exc, "errors", {}))
            failure = ("failed", str(exc))
        except Exception as exc:  # noqa: BLE001 - a failing provider is a row, not a crash
            failure = self._failure(exc)
        self._free()  # outside the except block: the traceback (and its tensors) is gone
        return self._emit(case, p, mode, *failure, **fields)

    @staticmethod
    def _failure(exc):
        if is_oom(exc):
            return ("skipped", "out of memory: " + _short(exc, 120))
        if isinstance(exc, NOT_AVAILABLE):  # a backend that does not (yet) implement the option: not a bug
            return ("skipped", "not available in this backend: " + _short(exc))
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return ("failed", f"{_short(exc)} [{where.filename.split('/')[-1]}:{where.lineno}]")

    def _time(self, case, pending, bar):
        """Time the verified closures: on CPU all together, interleaved call by call (a busy machine slows
        every provider alike); on CUDA one after the other with do_bench."""
        if self.verify_only:
            for case_, p, mode, fields, fn in pending:
                self._emit(case_, p, mode, "ok", reason="verified only (--verify-only)", **fields)
                bar.step(f"{case_.label} {mode} {p.name}: verified")
            return
        times = {}
        if self.device.type == "cpu" and len(pending) > 1:
            try:
                got = measure_interleaved([fn for *_, fn in pending], self.warmup_ms, self.rep_ms, self.min_reps)
                times = dict(enumerate(got))
            except Exception as exc:  # noqa: BLE001 - fall back to one at a time, which reports per row
                times = {}
        for i, (case_, p, mode, fields, fn) in enumerate(pending):
            try:
                tm = times.get(i) or measure(fn, self.device, self.warmup_ms, self.rep_ms, min_reps=self.min_reps)
                peak = peak_extra_mib(fn, self.device)
            except Exception as exc:  # noqa: BLE001
                self._free()
                self._emit(case_, p, mode, *self._failure(exc), **fields)
                bar.step(f"{case_.label} {mode} {p.name}: {self.rows[-1]['status']}")
                continue
            sync(self.device)
            self._emit_timed(case_, p, mode, fields, tm, peak)
            bar.step(f"{case_.label} {mode} {p.name}: ok")

    def _emit_timed(self, case, p, mode, fields, tm, peak):
        nbytes, flops = min_bytes(case, mode), min_flops(case, mode)
        gbps = nbytes / (tm["ms"] * 1e6)
        fields = dict(fields, time_ms=tm["ms"], p20_ms=tm["p20"], p80_ms=tm["p80"], GBps=gbps, peak_extra_MiB=peak,
                      pct_copy=100 * gbps / self.copy_GBps if self.copy_GBps else None)
        if flops:
            tflops = flops / (tm["ms"] * 1e9)
            peak_mm = self.matmul_TFLOPs.get(case.dtype)
            fields.update(TFLOPs=tflops, pct_matmul=100 * tflops / peak_mm if peak_mm else None)
        return self._emit(case, p, mode, "ok", **fields)
