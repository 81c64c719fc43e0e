"""Performance budgets, enforced on a CPU machine (docs/engine.md, issue 10).

The figures are the static ones of ``python -m benchmarks.static`` (see benchmarks/README.md), measured
here on a small subset so the file runs in about two minutes on two cores: transfers per element counted
in the Triton interpreter, launches per fwd+bwd call, host time per call as a ratio to an eager
mdistiller-style KD measured in the same run, and the sm_90 ahead-of-time compile of every shipped Triton
configuration. A regression fails with the figure in the message.

``PENDING`` lists budgets whose work is under way on another branch: they are measured and reported (as
xfail with the figure; XPASS once met) but not enforced. The lead removes an entry when its work lands.
"""
from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from typing import Optional

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@dataclass(frozen=True)
class Budget:
    limit: object        # a number, or {preset: number}
    kind: str            # "max" (figure ≤ limit) or "min" (figure ≥ limit)
    today: str           # the value measured when the budget was set
    what: str


#: slack on exact counts (transfers are deterministic; only float formatting moves them)
EXACT = 0.005
#: the scalar loads of the target logits (DKD/AEKT/CE): one element of s and t per row, read again from
#: the row just loaded (an L1 hit, but counted by the DRAM-pessimistic interpreter count)
TARGET_LOADS_PER_ROW = 2

# =====================================================================================================
# THE BUDGETS — name: Budget(limit, "max" | "min", today's value, what the figure is)
# =====================================================================================================
BUDGETS = {
    # --- sm_90 ahead-of-time compile of every shipped Triton configuration (tests/test_triton_aot.py)
    "spills": Budget(0, "max", "0 everywhere", "spilled bytes (local memory) of every shipped sm_90 configuration"),
    "registers_topk_v2": Budget(128, "max", "up to 253 (topkd bf16 128k)",
                                "registers of every fp32/bf16 shipped configuration (engine v2 goal)"),
    # raised from 72/4/76 on purpose with issue 9's numerics (NaN/+inf rows, LSE states in the logits' units,
    # grad_factor, in-launch reduction): KD bf16 streamed went 75 -> 78 registers (3 CTAs x 8 warps = 24
    # warps per SM, ample for a streaming loop); issue 11 item 3 (the LLM loop) is to win them back
    "registers_kd": Budget(80, "max", "kd fp32 C=1000: 46; kd bf16 128k: 78",
                           "registers of the plain-KD configurations (fp32 single block, bf16/fp16 streamed)"),
    "ctas_kd_streamed": Budget(3, "min", "3", "resident CTAs per SM of KD bf16 streamed (8 warps)"),
    "insn_kd_streamed": Budget(80.0, "max", "78.1",
                               "thread-instructions per column, KD bf16 streamed, all column loops together"),
    "insn_kd_streamed_floor": Budget(47.0, "max", "72.3",
                                     "the same at the H200 bf16 bandwidth floor (benchmarks/README.md): the LLM-loop goal"),
    "insn_ratio_topk_v2": Budget(1.3, "max", "kd_tsm 2.1, ldrld 6.2, topkd 11.0",
                                 "instructions per column of every streamed bf16 preset ÷ plain KD's"),
    # --- transfers per element of a fwd+bwd call (interpreter, unmasked lanes, grad_output 1)
    "single_block_transfers": Budget(3.0, "max", "3.0 (3.002 with the target-logit loads)",
                                     "C=1000 fp32, every preset (+ 2/C for the target-logit loads)"),
    "streamed_transfers": Budget({"kd": 5.0, "kd+ce": 5.0, "kd+standardize": 9.0, "dkd": 5.0, "aekt": 5.0,
                                  "dtkd": 9.0, "ldrld": 7.0, "topkd": 8.0, "tsm-only": 6.0}, "max",
                                 "= the limits", "streamed bf16 stand-in, per preset (+ 2/C target loads)"),
    "streamed_transfers_v2": Budget(6.0, "max", "up to 9.0 (kd+standardize, dtkd)",
                                    "streamed bf16 stand-in, every preset ≤ plain KD's + 1 (engine v2 goal)"),
    # --- launches per fwd+bwd call (tiny input, Triton backend)
    "triton_launches": Budget(2, "max", "2", "Triton launches, every preset, labels or not, grad_output 1 or not"),
    "device_kernels": Budget(2, "max", "2 with and without labels (was 7 / 11)",
                             "Triton launches + ATen kernels, every preset (count and reduction in the kernel)"),
    # --- host time per fwd+bwd call on a tiny input (cpu backend), ÷ eager mdistiller KD in the same run
    "host_ratio_today": Budget(2.5, "max", "1.0-1.5 (noisy)", "every preset, kdk-cpu ÷ eager KD"),
    "host_ratio": Budget(0.6, "max", "1.0-1.5", "every preset, kdk-cpu ÷ eager KD (one-launch Function goal)"),
}

#: budgets not enforced yet: the work that meets them is on another branch
PENDING = {
    "registers_topk_v2": "issue 11 (engine v2: top-k presets at the cost of KD)",
    "insn_kd_streamed_floor": "issue 11 item 3 (the LLM loop: 1/T multiply, exp2, fewer reductions)",
    "insn_ratio_topk_v2": "issue 11 (engine v2)",
    "streamed_transfers_v2": "issue 11 (engine v2)",
    "host_ratio": "issue 9 (one-launch Function contract, cached packed specs)",
}

# =====================================================================================================

interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
pytestmark = pytest.mark.skipif(not interpreting, reason="the byte and launch counts need TRITON_INTERPRET=1")

if interpreting:
    from benchmarks import measure, static
    from benchmarks.compile_facts import compile_jobs
    from benchmarks.presets import PRESETS, SHAPES, STREAMED_SMALL


def check(key: str, figures: dict, limit_of=None) -> None:
    """Compare every figure (label → value) with budget ``key``; fail (or xfail when pending) listing
    every figure past it."""
    budget = BUDGETS[key]
    bad = []
    for label, value in figures.items():
        limit = limit_of(label) if limit_of else budget.limit
        if value is None or limit is None:
            continue
        past = value > limit + 1e-9 if budget.kind == "max" else value < limit - 1e-9
        if past:
            bad.append(f"{label}: {value:.4g} {'>' if budget.kind == 'max' else '<'} {limit:.4g}")
    summary = f"{key} ({budget.what}; today {budget.today})"
    print(f"\n{summary}:\n  " + "\n  ".join(f"{k}: {v if v is None else round(v, 4)}" for k, v in figures.items()))
    if bad and key in PENDING:
        pytest.xfail(f"PENDING {PENDING[key]}: {summary}: " + "; ".join(bad))
    assert not bad, f"budget {summary} exceeded: " + "; ".join(bad)


# ---------------------------------------------------------------------------------------------------
# measurements (each once per module)
# ---------------------------------------------------------------------------------------------------
class Background:
    """The sm_90 AOT compile of every shipped configuration, started before the interpreter work."""

    def __init__(self):
        self.result, self.error = None, None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            jobs = static.shipped_jobs()
            self.result = dict(zip([j["label"] for j in jobs], compile_jobs(jobs, arch=90)))
        except Exception as exc:  # noqa: BLE001 - reported by the test that needs it
            self.error = exc

    def get(self) -> dict:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture(scope="module")
def compiled():
    return Background()


@pytest.fixture(scope="module")
def transfers(compiled):
    import torch
    out = {}
    for preset in PRESETS:
        out[(preset, "C=1000", torch.float32)] = measure.transfers(preset, "C=1000", torch.float32,
                                                                   grad_output_not_one=False)
        out[(preset, "streamed", torch.bfloat16)] = measure.transfers(preset, STREAMED_SMALL, torch.bfloat16,
                                                                      grad_output_not_one=False)
    return out


#: (labels, grad_output) variants of the launch counts here (benchmarks.static runs all four)
LAUNCH_VARIANTS = ((False, 1.0), (True, 0.5))


@pytest.fixture(scope="module")
def launches(compiled):
    return {(p, labels, go): measure.launches(p, labels, go) for p in PRESETS for labels, go in LAUNCH_VARIANTS}


@pytest.fixture(scope="module")
def host(compiled):
    return measure.host_overhead(repeats=15, calls=20)


# ---------------------------------------------------------------------------------------------------
# transfers
# ---------------------------------------------------------------------------------------------------
def _target_allowance(label_C: int) -> float:
    return TARGET_LOADS_PER_ROW / label_C


def test_single_block_rows_move_three_transfers(transfers):
    figs = {f"{p} {s} {str(d).split('.')[-1]}": tr["total"] for (p, s, d), tr in transfers.items() if s == "C=1000"}
    check("single_block_transfers", figs, lambda label: 3.0 + _target_allowance(SHAPES["C=1000"].C))


def test_streamed_transfers_today(transfers):
    figs = {p: tr["total"] for (p, s, d), tr in transfers.items() if s == "streamed"}
    allowance = _target_allowance(STREAMED_SMALL.interp_C)
    check("streamed_transfers", figs, lambda p: BUDGETS["streamed_transfers"].limit[p] + allowance + EXACT)


def test_streamed_transfers_engine_v2(transfers):
    figs = {p: tr["total"] for (p, s, d), tr in transfers.items() if s == "streamed"}
    check("streamed_transfers_v2", figs, lambda p: BUDGETS["streamed_transfers_v2"].limit
          + _target_allowance(STREAMED_SMALL.interp_C) + EXACT)


# ---------------------------------------------------------------------------------------------------
# launches
# ---------------------------------------------------------------------------------------------------
def _launch_figs(launches, field):
    return {f"{p} {'labels' if lab else 'no labels'} go={go:g}": row[field]
            for (p, lab, go), row in launches.items() if row is not None}


def test_triton_launches(launches):
    check("triton_launches", _launch_figs(launches, "triton"))


def test_device_kernels_one_launch_contract(launches):
    check("device_kernels", _launch_figs(launches, "device_kernels"))


# ---------------------------------------------------------------------------------------------------
# host time
# ---------------------------------------------------------------------------------------------------
def _host_figs(host):
    return {f"{p} ({row['kdk-cpu']['us']:.0f} µs vs eager KD {host['eager_kd']['us']:.0f} µs)": row["kdk-cpu"]["ratio"]
            for p, row in host["rows"].items()}


def test_host_time_today(host):
    check("host_ratio_today", _host_figs(host))


def test_host_time_one_launch_contract(host):
    check("host_ratio", _host_figs(host))


# ---------------------------------------------------------------------------------------------------
# sm_90 compile facts (last: the background compile has had the longest time)
# ---------------------------------------------------------------------------------------------------
def _ok(compiled) -> dict:
    res = compiled.get()
    failed = [f"{k}: {r.get('error', '')[:300]}" for k, r in res.items() if not r["ok"]]
    assert not failed, "sm_90 AOT compile failed: " + "; ".join(failed)
    return res


def test_no_spills_sm90(compiled):
    check("spills", {k: r["spills"] for k, r in _ok(compiled).items()})


def test_registers_kd(compiled):
    res = _ok(compiled)
    check("registers_kd", {k: r["registers"] for k, r in res.items() if k.startswith("kd ") and "fp64" not in k})


def test_registers_engine_v2(compiled):
    res = _ok(compiled)
    check("registers_topk_v2", {k: r["registers"] for k, r in res.items()
                                if "fp64" not in k and not k.startswith("scale_rows")})


def _streamed_bf16(label: str) -> bool:
    return "bf16" in label and "stream" in label


def _kd_streamed(res):
    """The plain-KD bf16 streamed configuration of the shipped list (found by its label's words)."""
    found = [r for k, r in res.items() if k.split(" ")[0] == "kd" and _streamed_bf16(k)]
    assert found, f"no plain-KD bf16 streamed configuration among the shipped ones: {sorted(res)}"
    return found[0]


def test_kd_streamed_loop(compiled):
    kd = _kd_streamed(_ok(compiled))
    check("ctas_kd_streamed", {"kd bf16 streamed": kd["ctas_per_sm"]})
    check("insn_kd_streamed", {"kd bf16 streamed": kd["insn_per_column"]})


def test_kd_streamed_loop_at_the_bandwidth_floor(compiled):
    check("insn_kd_streamed_floor", {"kd bf16 streamed": _kd_streamed(_ok(compiled))["insn_per_column"]})


def test_topk_instructions_engine_v2(compiled):
    res = _ok(compiled)
    kd = _kd_streamed(res)["insn_per_column"]
    check("insn_ratio_topk_v2", {k: r["insn_per_column"] / kd for k, r in res.items() if _streamed_bf16(k)})


def test_budget_table_is_consistent():
    assert set(PENDING) <= set(BUDGETS), set(PENDING) - set(BUDGETS)
    assert all(b.kind in ("max", "min") for b in BUDGETS.values())
    if interpreting:
        assert set(BUDGETS["streamed_transfers"].limit) == set(PRESETS)
