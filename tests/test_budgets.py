"""Performance budgets, enforced on a CPU machine (docs/engine.md, issue 10).

The figures are the static ones of ``python -m benchmarks.static`` (see benchmarks/README.md), measured
here on a small subset so the file runs in about two minutes on two cores: transfers per element counted
in the Triton interpreter, launches per fwd+bwd call, host time per call as a ratio to an eager
mdistiller-style KD measured in the same run, and the sm_90 ahead-of-time compile of every shipped Triton
configuration. A regression fails with the figure in the message. The LLM family (issue 12: divergences,
dense top-k with a tail, the sparse stored top-K teacher) has its own rows: its sparse presets' transfers
are in units of the student's [N, V], split over two row lengths into the [N, V] part and the per-slot
(O(N·K)) part, and its presets' sm_90 configurations are compiled beside the shipped ones.

``PENDING`` lists budgets whose work is under way on another branch: they are measured and reported (as
xfail with the figure; XPASS once met) but not enforced. The lead removes an entry when its work lands.
"""
from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass

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
    "llm_spills": Budget(0, "max", "0 everywhere",
                         "spilled bytes of the LLM presets' sm_90 configurations (C=1000 fp32, V=128k bf16)"),
    "llm_registers": Budget(128, "max", "V=128k bf16: reverse_kl 59, jsd 80, tvd 48, topk_tail 128, sparse_renorm 32, "
                                        "sparse_tail 80, sparse_renorm+ce 48",
                            "registers of the LLM presets' sm_90 configurations (2 CTAs x 8 warps per SM)"),
    "registers_topk_v2": Budget(128, "max", "up to 244 (topkd bf16 128k)",
                                "registers of every fp32/bf16 shipped configuration (engine v2 goal)"),
    # tightened from 80/3/80 with issue 11 item 3 (the LLM loop: exponentials in base 2 with log2 e folded
    # into the 1/T scale, one MUFU.EX2 each; the batch epilogue's loops no longer counted as column loops):
    # KD bf16 streamed 78 -> 64 registers, 3 -> 4 CTAs, 72.7 -> 50.4 instructions per column
    "registers_kd": Budget(72, "max", "kd fp32 C=1000: 48; kd bf16 128k: 64",
                           "registers of the plain-KD configurations (fp32 single block, bf16/fp16 streamed)"),
    "ctas_kd_streamed": Budget(4, "min", "4", "resident CTAs per SM of KD bf16 streamed (8 warps)"),
    "insn_kd_streamed": Budget(56.0, "max", "50.4 (statistics pass 25.3, gradient pass 25.1)",
                               "thread-instructions per column, KD bf16 streamed, all column loops together"),
    "insn_kd_streamed_floor": Budget(47.0, "max", "50.4",
                                     "the same at the H200 bf16 bandwidth floor (benchmarks/README.md): the LLM-loop goal"),
    "insn_ratio_topk_v2": Budget(1.3, "max", "kd_tsm 2.75, ldrld 3.47, topkd 13.2 (÷ KD's 50.4)",
                                 "instructions per column of every streamed bf16 preset ÷ plain KD's"),
    # --- transfers per element of a fwd+bwd call (interpreter, unmasked lanes, grad_output 1)
    "single_block_transfers": Budget(3.0, "max", "3.0 (3.002 with the target-logit loads)",
                                     "C=1000 fp32, every dense-teacher preset, the LLM family's included "
                                     "(+ 2/C for the target-logit loads)"),
    "streamed_transfers": Budget({"kd": 5.0, "kd+ce": 5.0, "kd+standardize": 9.0, "dkd": 5.0, "aekt": 5.0,
                                  "dtkd": 9.0, "ldrld": 7.0, "topkd": 8.0, "tsm-only": 6.0,
                                  "reverse_kl": 7.0, "jsd": 7.0, "tvd": 7.0, "topk_tail": 7.0}, "max",
                                 "= the limits",
                                 "streamed bf16 stand-in, per dense-teacher preset (+ 2/C target loads)"),
    "llm_streamed_transfers_goal": Budget(5.0, "max", "7.0 (reverse_kl, jsd, tvd, topk_tail)",
                                          "streamed bf16 stand-in, the dense LLM presets ≤ plain KD's passes"),
    # --- the sparse (stored top-K) teacher, K = 64, in units of the student's [N, V]: the student-side
    # transfers (s loads + gradient stores) of two row lengths split as [N, V] part + per-slot part·K/C
    "sparse_renorm_transfers": Budget(1.0, "max", "1.0 single block and streamed",
                                      "sparse renorm without CE: the [N, V] part (the gradient write only)"),
    "sparse_transfers": Budget(3.0, "max", "2.0 single block, 3.0 streamed (tail and renorm+ce)",
                               "sparse tail, sparse renorm + CE: the [N, V] part (≤ 2 reads of s + the gradient)"),
    "sparse_slot_transfers": Budget(2.0, "max", "2.0 (+ 1/K: CE's target load)",
                                    "student elements per stored slot: the gather at the ids + the scattered "
                                    "gradient (+ 2/K for the target-logit loads)"),
    "sparse_teacher_reads": Budget(1.0, "max", "1.0", "reads of each stored (id, logprob) slot per fwd+bwd call"),
    "streamed_transfers_v2": Budget(6.0, "max", "up to 9.0 (kd+standardize, dtkd)",
                                    "streamed bf16 stand-in, every preset ≤ plain KD's + 1 (engine v2 goal)"),
    # --- launches per fwd+bwd call (tiny input, Triton backend)
    "triton_launches": Budget(2, "max", "2", "Triton launches, every preset, labels or not, grad_output 1 or not"),
    "device_kernels": Budget(2, "max", "2 with and without labels (was 7 / 11)",
                             "Triton launches + ATen kernels, every preset (count and reduction in the kernel)"),
    # --- host time per fwd+bwd call on a tiny input (cpu backend), ÷ eager mdistiller KD in the same run
    # host = the fwd+bwd call minus its kernels (measure.launch_time); tightened from 2.5 to 1.0 when
    # the C++ backends' backward became a C++ autograd node (csrc/autograd.cpp): was 0.95-1.3 with the kernels in
    "host_ratio_today": Budget(1.0, "max", "0.51-0.70 across runs", "every preset, kdk-cpu host part ÷ eager KD"),
    "host_ratio": Budget(0.6, "max", "0.51-0.70 across runs", "every preset, kdk-cpu host part ÷ eager KD (issue 10's goal)"),
}

#: budgets not enforced yet: the work that meets them is on another branch
PENDING = {
    "registers_topk_v2": "issue 11 (engine v2: top-k presets at the cost of KD)",
    "insn_kd_streamed_floor": "issue 11 item 3 (the LLM loop): exp2 and 1/T landed (72.7 -> 50.4); left: the "
                              "four block reductions of the statistics pass (~45 % of it) and the masked-load fills",
    "insn_ratio_topk_v2": "issue 11 (engine v2)",
    "streamed_transfers_v2": "issue 11 (engine v2)",
    "host_ratio": "issue 10: the native autograd node landed (0.95-1.3 -> 0.51-0.70 across runs); what is left is the public "
                  "function's Python (~10-20 µs of checks per call) and the op's argument conversion",
    "llm_streamed_transfers_goal": "issue 12 follow-up: Σ_j qg_j (and the tail's complement) needs the final "
                                   "LSEs, a third streamed pass over s and t today; an online, rescaled Σqg "
                                   "would fold it into the statistics pass",
}

# =====================================================================================================

interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
pytestmark = pytest.mark.skipif(not interpreting, reason="the byte and launch counts need TRITON_INTERPRET=1")

if interpreting:
    from benchmarks import measure, static
    from benchmarks.compile_facts import compile_jobs
    from benchmarks.presets import (CLASSIC_PRESETS, LLM_PRESETS, PRESETS, SHAPES, SPARSE_PRESETS, STREAMED_SMALL,
                                    STREAMED_TOPK)
    DENSE_PRESETS = tuple(p for p in PRESETS if p not in SPARSE_PRESETS)
    #: the sm_90 configurations of the LLM presets compiled here (the static table compiles every shape)
    LLM_AOT_CELLS = [(p, shape, dtype) for p in LLM_PRESETS
                     for shape, dtype in (("C=1000", "fp32"), ("V=128k", "bf16"))]


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
    """The sm_90 AOT compile of every shipped configuration and of the LLM presets' configurations
    (``LLM_AOT_CELLS``), started before the interpreter work."""

    def __init__(self):
        self.result, self.error = None, None
        # built here, in the calling thread: static.captured_job hooks the interpreter's launch path
        self.llm_jobs = static.engine_jobs(LLM_AOT_CELLS)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            jobs = static.shipped_jobs()
            llm = self.llm_jobs
            unsupported = {j["label"]: {"ok": False, "error": j["unsupported"]} for j in llm if "unsupported" in j}
            jobs += [dict(j, label="LLM " + j["label"]) for j in llm if "unsupported" not in j]
            self.result = dict(zip([j["label"] for j in jobs], compile_jobs(jobs, arch=90)))
            self.result.update({"LLM " + k: v for k, v in unsupported.items()})
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
    for preset in DENSE_PRESETS:
        out[(preset, "C=1000", torch.float32)] = measure.transfers(preset, "C=1000", torch.float32,
                                                                   grad_output_not_one=False)
        streamed = STREAMED_SMALL if preset in CLASSIC_PRESETS else STREAMED_TOPK  # top-k: room for k = 64
        out[(preset, "streamed", torch.bfloat16)] = measure.transfers(preset, streamed, torch.bfloat16,
                                                                      grad_output_not_one=False)
    return out


#: the two row lengths of each sparse split: single-block fp32 rows, streamed bf16 stand-ins (8 and 16 blocks)
SPARSE_SPLITS = {"single block fp32": ("C=1000", "C=4096", "fp32"), "streamed bf16": ("V=32k", None, "bf16")}


@pytest.fixture(scope="module")
def sparse_transfers(compiled):
    """{(preset, split): measure.sparse_fit of the two row lengths} of every sparse preset."""
    import torch
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    out = {}
    for preset in SPARSE_PRESETS:
        for split, (a, b, dtype) in SPARSE_SPLITS.items():
            shapes = (SHAPES[a], SHAPES[b] if b else STREAMED_TOPK)
            out[(preset, split)] = measure.sparse_fit(*(measure.transfers(preset, sh, dtypes[dtype],
                                                                          grad_output_not_one=False)
                                                        for sh in shapes))
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
    check("streamed_transfers", figs, lambda p: BUDGETS["streamed_transfers"].limit[p]
          + _target_allowance(figs_C(transfers, p)) + EXACT)


def test_streamed_transfers_engine_v2(transfers):
    figs = {p: tr["total"] for (p, s, d), tr in transfers.items() if s == "streamed"}
    check("streamed_transfers_v2", figs, lambda p: BUDGETS["streamed_transfers_v2"].limit
          + _target_allowance(figs_C(transfers, p)) + EXACT)


def test_streamed_llm_transfers_goal(transfers):
    figs = {p: tr["total"] for (p, s, d), tr in transfers.items() if s == "streamed" and p in LLM_PRESETS}
    check("llm_streamed_transfers_goal", figs, lambda p: BUDGETS["llm_streamed_transfers_goal"].limit
          + _target_allowance(figs_C(transfers, p)) + EXACT)


def figs_C(transfers, preset) -> int:
    """The row length the streamed figure of ``preset`` was measured on."""
    import torch
    return transfers[(preset, "streamed", torch.bfloat16)]["C_measured"]


# ---------------------------------------------------------------------------------------------------
# the sparse (stored top-K) teacher: transfers in units of the student's [N, V]
# ---------------------------------------------------------------------------------------------------
def _sparse_figs(sparse_transfers, field, presets):
    return {f"{p} ({split})": fit[field] for (p, split), fit in sparse_transfers.items() if p in presets}


def test_sparse_renorm_moves_one_transfer_of_the_student(sparse_transfers):
    check("sparse_renorm_transfers", _sparse_figs(sparse_transfers, "dense", ("sparse_renorm",)),
          lambda label: BUDGETS["sparse_renorm_transfers"].limit + EXACT)


def test_sparse_tail_and_ce_move_at_most_three(sparse_transfers):
    check("sparse_transfers", _sparse_figs(sparse_transfers, "dense", ("sparse_tail", "sparse_renorm+ce")),
          lambda label: BUDGETS["sparse_transfers"].limit + EXACT)


def test_sparse_per_slot_transfers(sparse_transfers):
    from benchmarks.presets import SPARSE_K
    check("sparse_slot_transfers", _sparse_figs(sparse_transfers, "per_slot", SPARSE_PRESETS),
          lambda label: BUDGETS["sparse_slot_transfers"].limit + TARGET_LOADS_PER_ROW / SPARSE_K + EXACT)


def test_sparse_teacher_is_read_once(sparse_transfers):
    check("sparse_teacher_reads", _sparse_figs(sparse_transfers, "teacher_reads_per_slot", SPARSE_PRESETS),
          lambda label: BUDGETS["sparse_teacher_reads"].limit + EXACT)


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
    return {f"{p} (host {row['kdk-cpu']['host_us']:.0f} µs = {row['kdk-cpu']['us']:.0f} − kernels "
            f"{row['kdk-cpu']['kernel_us']:.0f}, vs eager KD {host['eager_kd']['us']:.0f} µs)": row["kdk-cpu"]["ratio"]
            for p, row in host["rows"].items()}


def test_host_time_today(host):
    check("host_ratio_today", _host_figs(host))


def test_host_time_one_launch_contract(host):
    check("host_ratio", _host_figs(host))


# ---------------------------------------------------------------------------------------------------
# sm_90 compile facts (last: the background compile has had the longest time)
# ---------------------------------------------------------------------------------------------------
def _ok(compiled) -> dict:
    """The shipped configurations (the LLM presets' ones: ``_llm_ok``)."""
    res = {k: r for k, r in compiled.get().items() if not k.startswith("LLM ")}
    failed = [f"{k}: {r.get('error', '')[:300]}" for k, r in res.items() if not r["ok"]]
    assert not failed, "sm_90 AOT compile failed: " + "; ".join(failed)
    return res


def test_no_spills_sm90(compiled):
    check("spills", {k: r["spills"] for k, r in _ok(compiled).items()})


def _llm_ok(compiled) -> dict:
    res = compiled.get()
    return {k[len("LLM "):]: r for k, r in res.items() if k.startswith("LLM ")}


def test_llm_presets_compile_without_spills_sm90(compiled):
    res = _llm_ok(compiled)
    failed = [f"{k}: {r.get('error', '')[:300]}" for k, r in res.items() if not r["ok"]]
    assert not failed, "sm_90 AOT compile of the LLM presets failed: " + "; ".join(failed)
    check("llm_spills", {k: r["spills"] for k, r in res.items()})
    check("llm_registers", {k: r["registers"] for k, r in res.items()})


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
        assert set(BUDGETS["streamed_transfers"].limit) == set(DENSE_PRESETS)
        assert set(LLM_PRESETS) <= set(PRESETS) and set(SPARSE_PRESETS) < set(LLM_PRESETS)
