"""The Triton engine's LLM family on dense teacher logits against the float64 reference: the divergences,
the logit softcap and the dense top-k teacher (renorm / tail / teacher), with CE, on rows held in registers
and on streamed rows (``forced_block_c(16)``), plus the sm_90 compile of the new configurations.

Inputs come from ``parity.make_inputs``: row 0 has a masked (−inf) class, row 1 is ignored. Runs under
``TRITON_INTERPRET=1`` on CPU with N = 4 rows (every program instance and loop step costs the interpreter
milliseconds).
"""
import contextlib

import pytest
import torch

import kdkernels as kdk
from kdkernels.dispatch import unavailable_reason
from parity import DEVICE, assert_close, make_inputs, presets, reference64, run

pytestmark = pytest.mark.skipif(unavailable_reason("triton", DEVICE) is not None,
                                reason=f"Triton cannot run on {DEVICE} here")

E = pytest.importorskip("kdkernels._triton.engine")

#: every divergence, with the parameters of the brief (β of jsd, α of the skew divergences)
DIVERGENCES = {"forward_kl": "forward_kl", "reverse_kl": "reverse_kl", "jsd": ("jsd", 0.3), "tvd": "tvd",
               "skew_kl": ("skew_kl", 0.2), "skew_rkl": ("skew_rkl", 0.2)}
#: (C, forced BLOCK_C): two rows held in registers, one streamed in blocks of 16
LAYOUTS = {"C10": (10, None), "C100": (100, None), "C100-streamed": (100, 16)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
NORMALIZATIONS = ("renorm", "tail", "teacher")
#: the streamed block size (C = 100 → 7 blocks)
STREAM_BLOCK = 16
N_ROWS = 4


def check(spec, C, dtype, gen, *, block_c=None, what="", **inputs):
    s, t, y = make_inputs(gen, N_ROWS, C, dtype, **inputs)
    assert_close(run(s, t, y, spec, "triton", block_c=block_c), reference64(s, t, y, spec), dtype, what)


def _divergence_cases():
    """Every divergence × dtype on C = 10 in registers and C = 100 streamed; C = 100 in registers in fp32."""
    for div in DIVERGENCES:
        for dtype in DTYPES:
            for layout in LAYOUTS:
                if layout != "C100" or dtype == "fp32":
                    yield div, layout, dtype


@pytest.mark.parametrize("div,layout,dtype", list(_divergence_cases()))
def test_divergence(div, layout, dtype, gen):
    C, block = LAYOUTS[layout]
    spec = kdk.LogitDistill(temperature=2.0, divergence=DIVERGENCES[div])
    check(spec, C, DTYPES[dtype], gen, block_c=block, what=f"{div} {layout} {dtype}")


def _topk_cases():
    for norm in NORMALIZATIONS:
        for div in ("forward_kl", "jsd", "reverse_kl"):
            if norm == "teacher" and div != "forward_kl":
                continue  # the spec rejects it (the student keeps its full-vocabulary probabilities)
            yield norm, div


@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
@pytest.mark.parametrize("layout", ["C100", "C100-streamed"])
@pytest.mark.parametrize("norm,div", list(_topk_cases()))
def test_dense_topk(norm, div, layout, dtype, gen):
    C, block = LAYOUTS[layout]
    spec = kdk.LogitDistill(temperature=2.0, divergence=DIVERGENCES[div], teacher_topk=kdk.TopK(3, norm))
    check(spec, C, DTYPES[dtype], gen, block_c=block, what=f"top-3 {norm} {div} {layout} {dtype}")


@pytest.mark.parametrize("norm", NORMALIZATIONS)
def test_dense_topk_bf16_and_k_beyond_one_block(norm, gen):
    """bf16 inputs, and k = 20 > BLOCK_C = 16: the support spans several blocks of the streamed row."""
    for k, block in ((3, None), (20, STREAM_BLOCK)):
        spec = kdk.LogitDistill(temperature=1.5, teacher_topk=kdk.TopK(k, norm), ce_weight=0.5)
        check(spec, 100, torch.bfloat16, gen, block_c=block, what=f"top-{k} {norm} bf16")


SOFTCAP_SPECS = {
    "kd_ce": dict(ce_weight=0.5),
    "jsd_ce": dict(divergence=("jsd", 0.3), ce_weight=0.5),
    "tail_reverse": dict(divergence="reverse_kl", teacher_topk=kdk.TopK(3, "tail")),
    "renorm_ce": dict(teacher_topk=kdk.TopK(3, "renorm"), ce_weight=0.5),
    "teacher_ce": dict(teacher_topk=kdk.TopK(3, "teacher"), ce_weight=0.5),
}
#: presets checked with a softcap on streamed rows too (the cap feeds P1, P2, P4 and the target loads)
SOFTCAP_STREAMED_PRESETS = ("kd_std", "dkd_tsm", "dtkd", "ldrld", "topkd")


@pytest.mark.parametrize("layout", ["C100", "C100-streamed"])
@pytest.mark.parametrize("case", list(SOFTCAP_SPECS))
def test_softcap(case, layout, gen):
    """softcap=(5, 3) on logits of scale 3: many saturate; the gradient carries 1 − tanh²."""
    C, block = LAYOUTS[layout]
    spec = kdk.LogitDistill(temperature=2.0, softcap=(5.0, 3.0), **SOFTCAP_SPECS[case])
    check(spec, C, torch.float32, gen, block_c=block, what=f"softcap {case} {layout}", scale=6.0)


@pytest.mark.parametrize("streamed", [False, True])
def test_softcap_with_every_preset_float64(streamed, gen):
    """The softcap is applied at load time, so every term of every preset sees the capped logits."""
    for name, spec in presets(40).items():
        if streamed and name not in SOFTCAP_STREAMED_PRESETS:
            continue
        check(spec.replace(softcap=(5.0, 3.0)), 40, torch.float64, gen, block_c=STREAM_BLOCK if streamed else None,
              what=f"softcap {name} streamed={streamed}", scale=5.0)


def test_softcap_with_a_learnable_temperature(gen):
    s, t, y = make_inputs(gen, N_ROWS, 40, torch.float64, scale=5.0)
    out = []
    for backend in ("triton", "reference"):
        x = s.clone().requires_grad_(True)
        T = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        loss = kdk.logit_distill(x, t, y, kdk.LogitDistill(temperature=T, softcap=4.0, ce_weight=0.3),
                                 backend=backend)
        out.append((loss.detach(),) + torch.autograd.grad(loss, (x, T)))
    for got, want in zip(*out):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("layout", ["C10", "C100-streamed"])
def test_softcap_float64_is_exact(layout, gen):
    C, block = LAYOUTS[layout]
    for kw in (dict(divergence=("skew_rkl", 0.2), ce_weight=0.5), dict(teacher_topk=kdk.TopK(3, "tail"))):
        spec = kdk.LogitDistill(temperature=2.0, softcap=(5.0, 3.0), **kw)
        check(spec, C, torch.float64, gen, block_c=block, what=f"softcap fp64 {kw}", scale=6.0)


@pytest.mark.parametrize("layout", ["C100", "C100-streamed"])
def test_divergence_with_standardize_and_topk_scale(layout, gen):
    """A divergence keeps standardisation (Z's backward sums get the −q·Σqg part) and TopKScale."""
    C, block = LAYOUTS[layout]
    for kw in (dict(divergence=("jsd", 0.3), standardize=True, ce_weight=0.5),
               dict(divergence="reverse_kl", teacher_topk_scale=kdk.TopKScale(k=2))):
        for dtype in (torch.float32, torch.float64):
            check(kdk.LogitDistill(temperature=2.0, **kw), C, dtype, gen, block_c=block, what=f"{kw} {dtype}")


@pytest.mark.parametrize("layout", ["C10", "C100-streamed"])
def test_float16(layout, gen):
    C, block = LAYOUTS[layout]
    for kw in (dict(divergence=("jsd", 0.3), ce_weight=0.5), dict(teacher_topk=kdk.TopK(3, "tail"), softcap=4.0)):
        check(kdk.LogitDistill(temperature=2.0, **kw), C, torch.float16, gen, block_c=block, what=f"fp16 {kw}")


CLOSE_SPECS = {
    "jsd": dict(divergence=("jsd", 0.3)),
    "reverse_kl": dict(divergence="reverse_kl"),
    "skew_kl": dict(divergence=("skew_kl", 0.2)),
    "tail_jsd": dict(teacher_topk=kdk.TopK(3, "tail"), divergence=("jsd", 0.3)),
    "renorm_reverse": dict(teacher_topk=kdk.TopK(3, "renorm"), divergence="reverse_kl"),
}


@pytest.mark.parametrize("layout", ["C100", "C100-streamed"])
@pytest.mark.parametrize("case", list(CLOSE_SPECS))
def test_bf16_gradient_when_student_close_to_teacher(case, layout, gen):
    """s = t + 1e-3·noise in bf16: the gradient T·(qg − q·Σqg) is formed in fp32 from log-probabilities
    and stays within 1e-2 of the float64 one relative to its own (small) maximum. Logits of scale 0.1,
    where bf16's spacing (≤ 5e-4) resolves the noise (at scale 3 most s and t would round to one value)."""
    C, block = LAYOUTS[layout]
    t = (torch.randn(N_ROWS, C, generator=gen, dtype=torch.float64) * 0.1)
    s = (t + 1e-3 * torch.randn(N_ROWS, C, generator=gen, dtype=torch.float64)).to(torch.bfloat16).to(DEVICE)
    t = t.to(torch.bfloat16).to(DEVICE)
    spec = kdk.LogitDistill(temperature=1.0, **CLOSE_SPECS[case])
    (loss, grad), (loss_ref, grad_ref) = run(s, t, None, spec, "triton", block_c=block), reference64(s, t, None, spec)
    g_err = float((grad.double() - grad_ref).abs().max() / grad_ref.abs().max())
    assert grad_ref.abs().max() > 1e-6 and g_err <= 1e-2, f"{case}: grad rel err {g_err:.3e}"
    # the loss itself is ~1e-7 here: fp32 log-probability differences bound it absolutely (parity's floor)
    assert abs(float(loss) - float(loss_ref)) <= 1e-3 * max(abs(float(loss_ref)), 1e-2), (loss, loss_ref)


LLM_SPECS = {
    "skew_kl_ce": dict(divergence=("skew_kl", 0.2), ce_weight=0.5),
    "tail_jsd_cap": dict(teacher_topk=kdk.TopK(3, "tail"), divergence=("jsd", 0.3), softcap=4.0),
    "renorm_ce": dict(teacher_topk=kdk.TopK(3, "renorm"), ce_weight=0.5),
}


@pytest.mark.parametrize("layout", ["C10", "C100-streamed"])
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
def test_reductions_grad_output_and_inplace(reduction, layout, gen):
    """Every reduction with a non-unit grad_output (grad_factor); with reduction sum also inplace=True (the
    gradient lands in the logits' storage)."""
    C, block = LAYOUTS[layout]
    s, t, y = make_inputs(gen, N_ROWS, C, torch.float32)
    for name, kw in LLM_SPECS.items():
        spec = kdk.LogitDistill(temperature=2.0, reduction=reduction, loss_weight=0.7, **kw)
        xr = s.double().clone().requires_grad_(True)
        loss_ref = kdk.logit_distill(xr, t.double(), y, spec, backend="reference")
        go = torch.rand(loss_ref.shape, generator=gen, dtype=torch.float64).to(DEVICE) + 0.5
        g_ref, = torch.autograd.grad(loss_ref, xr, go)
        for inplace in ((False, True) if reduction == "sum" else (False,)):
            x = s.clone().requires_grad_(True)
            with E.forced_block_c(block) if block else contextlib.nullcontext():
                loss = kdk.logit_distill(x, t, y, spec.replace(inplace=inplace), backend="triton")
                g, = torch.autograd.grad(loss, x, go.float())
            what = f"{name} {reduction} inplace={inplace}"
            assert not inplace or g.data_ptr() == x.data_ptr(), f"{what}: gradient not in the logits' storage"
            torch.testing.assert_close(loss.double(), loss_ref.detach(), rtol=1e-4, atol=1e-6, msg=what)
            torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-5, msg=what)


@pytest.mark.parametrize("layout", ["C10", "C100-streamed"])
def test_nan_and_inf_rows_stay_in_their_row(layout, gen):
    """A NaN student logit (row 2) and a +inf teacher logit (row 3) make exactly those rows NaN (loss and
    whole gradient row) — also through the softcap, which would map +inf to the cap."""
    C, block = LAYOUTS[layout]
    s, t, y = make_inputs(gen, N_ROWS, C, torch.float32)
    s[2, 3] = float("nan")
    t[3, 5] = float("inf")
    for name, kw in dict(LLM_SPECS, teacher=dict(teacher_topk=kdk.TopK(3, "teacher"), softcap=(5.0, 3.0))).items():
        spec = kdk.LogitDistill(temperature=2.0, reduction="none", **kw)
        loss, grad = run(s, t, y, spec, "triton", block_c=block)
        assert torch.isnan(loss[2:]).all() and torch.isnan(grad[2:]).all(), name
        assert loss[1] == 0 and (grad[1] == 0).all(), f"{name}: the ignored row must be exactly 0"
        loss_ref, grad_ref = reference64(s, t, y, spec)
        assert_close((loss[:2], grad[:2]), (loss_ref[:2], grad_ref[:2]), torch.float32, name)


@pytest.mark.parametrize("layout", ["C10", "C100-streamed"])
def test_renorm_row_with_no_finite_student_on_the_support_is_kd_free(layout, gen):
    """renorm: a row whose student is −inf on all of S has KD term 0 (its CE and the other rows stay)."""
    C, block = LAYOUTS[layout]
    s, t, y = make_inputs(gen, N_ROWS, C, torch.float32, masked=False, ignore=False)
    top = torch.sort(t[0], descending=True, stable=True).indices[:3]
    s[0, top] = float("-inf")
    y[0] = int(torch.sort(t[0], descending=True, stable=True).indices[5])  # a finite target for CE
    for ce in (0.0, 0.5):
        spec = kdk.LogitDistill(temperature=2.0, reduction="none", teacher_topk=kdk.TopK(3, "renorm"),
                                ce_weight=ce)
        got = run(s, t, y, spec, "triton", block_c=block)
        want = reference64(s, t, y, spec)
        assert_close(got, want, torch.float32, f"ce={ce}")
        if ce == 0:
            assert got[0][0] == 0 and (got[1][0] == 0).all()


def test_ce_only_with_divergence_and_topk_flags_off():
    """kd_weight = 0: the divergence and the top-k teacher do not reach the kernel's switches."""
    spec = kdk.LogitDistill(kd_weight=0.0, ce_weight=1.0, divergence=("jsd", 0.3), teacher_topk=kdk.TopK(3, "tail"))
    flags = E.kernel_flags(E.unpack(*spec.pack()), learnable=False, has_labels=True, temp_is_tensor=False,
                           has_gfactor=False, write_grad=True, dtype=torch.float32, C=100)
    assert flags["DIVERGENCE"] == 0 and flags["TOPK_MODE"] == 0 and not flags["NEED_SUMS"]


def test_presets_without_the_llm_family_keep_their_switches_off():
    """A preset that does not use the LLM family compiles as before: every new switch at its off value."""
    for name, spec in presets(100).items():
        flags = E.kernel_flags(E.unpack(*spec.pack()), learnable=spec.learnable_temperature, has_labels=True,
                               temp_is_tensor=False, has_gfactor=False, write_grad=True, dtype=torch.float32, C=100)
        assert (flags["DIVERGENCE"], flags["SOFTCAP_S"], flags["SOFTCAP_T"], flags["TOPK_MODE"], flags["TOPK_K"],
                flags["TOPK_NORM"]) == (0, False, False, 0, 1, 0), name


# ---- sm_90 compile of the new configurations (no GPU needed) ---------------------------------------
def _llm_jobs():
    from test_triton_aot import engine_job
    L = kdk.LogitDistill
    return [
        engine_job(L(divergence=("jsd", 0.5)), torch.bfloat16, 1000, "jsd bf16 C=1000 single-block"),
        engine_job(L(divergence="reverse_kl"), torch.bfloat16, 128_000, "reverse_kl bf16 C=128k streaming"),
        engine_job(L(teacher_topk=kdk.TopK(64, "tail")), torch.bfloat16, 128_000, "top-64 tail bf16 C=128k streaming"),
        engine_job(L(teacher_topk=kdk.TopK(8, "renorm"), divergence=("jsd", 0.5), ce_weight=0.5, softcap=30.0),
                   torch.bfloat16, 128_000, "top-8 renorm jsd ce softcap bf16 C=128k streaming"),
        engine_job(L(teacher_topk=kdk.TopK(16, "teacher")), torch.float64, 1000, "top-16 teacher fp64 C=1000"),
    ]


def test_llm_configurations_compile_for_sm90_without_spills():
    import sys
    from pathlib import Path
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.compile_facts import compile_jobs, tool
    if tool("cuobjdump") is None:
        pytest.skip("cuobjdump (the spill count) is not installed")
    jobs = _llm_jobs()
    results = compile_jobs(jobs, arch=90)
    failed = [f"{j['label']}: {r.get('error', '')[:500]}" for j, r in zip(jobs, results) if not r["ok"]]
    assert not failed, "\n".join(failed)
    spilled = {j["label"]: r["spills"] for j, r in zip(jobs, results) if r["spills"]}
    assert not spilled, f"register spills on sm_90: {spilled}"
