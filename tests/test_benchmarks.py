"""The benchmark harness on tiny shapes with the reference provider (CPU, a few seconds)."""
import csv
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import plots, report, run, verify  # noqa: E402
from benchmarks.harness import COLUMNS, Runner  # noqa: E402
from benchmarks.providers import INTERPRET_REASON, Compiled, Eager, Kdkernels, Provider, Reference, select  # noqa: E402
from benchmarks.shapes import Case, make_inputs, min_bytes, min_flops, suite_cases  # noqa: E402

CPU = torch.device("cpu")
FAST = dict(warmup_ms=1.0, rep_ms=2.0, progress=False, min_reps=2)


def tiny(method="kd", N=8, C=40, dtype="fp32"):
    return Case("tiny", method, N, C, dtype)


class Raising(Provider):
    name, description = "raising", "raises inside the loss"

    def build(self, case, device):
        def f(s, t, y):
            raise RuntimeError("boom from a broken provider")
        return f


class Missing(Provider):
    name, description = "missing", "never available"

    def unavailable_reason(self, case, device):
        return "not installed on this machine"


class Wrong(Provider):
    """Plain KD at the wrong temperature: close enough to look plausible, wrong enough to be caught."""
    name, description = "wrong", "kd at T=3.9"

    def build(self, case, device):
        import kdkernels as kdk
        return lambda s, t, y: kdk.kd_loss(s, t, 3.9, backend="reference")


class OutOfMemory(Provider):
    name, description = "oom", "runs out of memory"

    def build(self, case, device):
        def f(s, t, y):
            raise RuntimeError("CUDA out of memory. Tried to allocate 64.00 GiB")
        return f


def by(rows, provider, mode=None):
    return [r for r in rows if r["provider"] == provider and (mode is None or r["mode"] == mode)]


def test_bytes_formula():
    c = tiny(N=8, C=40, dtype="fp32")
    assert min_bytes(c, "fwd") == 2 * 8 * 40 * 4          # read s, read t
    assert min_bytes(c, "fwd+bwd") == 3 * 8 * 40 * 4      # + write the gradient once
    assert min_bytes(tiny(dtype="bf16"), "fwd+bwd") == 3 * 8 * 40 * 2
    assert min_flops(c, "fwd") == 0
    m = Case("tiny", "infonce", 16, 8, "fp32")
    assert min_bytes(m, "fwd") == 2 * 16 * 8 * 4 and min_flops(m, "fwd+bwd") == 4 * 16 * 16 * 8


def test_suites_have_the_named_shapes():
    imagenet = suite_cases("imagenet", "cuda")
    assert {(c.N, c.C) for c in imagenet} == {(256, 1000), (512, 1000), (1024, 1000), (2048, 1000)}
    assert {c.dtype for c in imagenet} == {"fp32", "bf16"}
    llm = suite_cases("llm", "cuda")
    assert {c.C for c in llm} == {32768, 131072, 262144} and {c.N for c in llm} >= {4096, 32768}
    assert {c.dtype for c in llm} == {"bf16"}
    assert {c.N for c in suite_cases("contrastive", "cuda")} == {256, 1024, 4096, 16384}
    quick_cpu = suite_cases("quick", "cpu")
    assert {c.method for c in quick_cpu} == {"kd", "dkd", "dtkd", "ldrld", "topkd", "aekt"}
    assert {(c.N, c.C, c.dtype) for c in quick_cpu} == {(256, 1000, "fp32")}
    assert (4096, 32768, "bf16") in {(c.N, c.C, c.dtype) for c in suite_cases("quick", "cuda")}
    assert suite_cases("imagenet", "cpu", methods=["kd"], dtypes=["bf16"])[0].dtype == "bf16"


def test_rows_are_produced_verified_and_timed():
    cases = [tiny("kd"), tiny("dkd"), Case("tiny", "infonce", 16, 8, "fp32")]
    runner = Runner([Reference()], CPU, copy_GBps=10.0, matmul_TFLOPs={"fp32": 0.1}, **FAST)
    rows = runner.run(cases)
    assert len(rows) == len(cases) * 2
    for r in rows:
        assert set(COLUMNS) <= set(r)
        assert r["status"] == "ok", r
        assert r["time_ms"] > 0 and r["p20_ms"] <= r["time_ms"] <= r["p80_ms"]
        assert r["bytes_min"] == (2 if r["mode"] == "fwd" else 3) * r["N"] * r["C"] * 4
        assert r["GBps"] == pytest.approx(r["bytes_min"] / (r["time_ms"] * 1e6))
        assert r["pct_copy"] == pytest.approx(100 * r["GBps"] / 10.0)
        assert r["loss_err"] < 1e-5 and r["peak_extra_MiB"] is None  # no CUDA allocator on CPU
        assert (r["grad_err"] is None) == (r["mode"] == "fwd")
    contrastive = [r for r in rows if r["family"] == "contrastive"]
    assert all(r["TFLOPs"] > 0 and r["pct_matmul"] is not None for r in contrastive)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_published_baselines_match_the_reference(dtype):
    """The eager provider is the published arithmetic (benchmarks/baselines.py), verified like any other
    provider against the float64 reference: an honest baseline computes the same loss and gradient."""
    from benchmarks.shapes import LOGIT_METHODS
    # bf16 logits of a 40-class row tie often; TopKD's groups are then ambiguous (either choice is right)
    methods = [m for m in LOGIT_METHODS if dtype == "fp32" or m != "topkd"]
    cases = [tiny(m, N=8, C=40, dtype=dtype) for m in methods]
    rows = Runner([Eager()], CPU, modes=("fwd+bwd",), **FAST).run(cases)
    assert [r["method"] for r in rows] == methods
    bad = [(r["method"], r["reason"]) for r in rows if r["status"] != "ok"]
    assert not bad, bad
    assert Eager().applies(tiny("infonce")) is False  # no published code: only the reference row


def test_failing_missing_wrong_and_oom_providers_are_rows_not_crashes():
    rows = Runner([Raising(), Missing(), Wrong(), OutOfMemory(), Reference()], CPU, **FAST).run([tiny("kd")])
    assert len(rows) == 5 * 2
    for r in by(rows, "raising"):
        assert r["status"] == "failed" and "boom from a broken provider" in r["reason"]
    for r in by(rows, "missing"):
        assert r["status"] == "skipped" and r["reason"] == "not installed on this machine"
    for r in by(rows, "wrong"):
        assert r["status"] == "failed" and "float64 reference" in r["reason"], r
        assert r["loss_err"] > verify.TOLERANCE["fp32"] and r["time_ms"] is None
    for r in by(rows, "oom"):
        assert r["status"] == "skipped" and r["reason"].startswith("out of memory")
    assert all(r["status"] == "ok" for r in by(rows, "reference"))  # the run went on after the failures


def test_cases_too_large_for_the_device_are_skipped_rows():
    rows = Runner([Reference()], CPU, max_elements=100, **FAST).run([tiny(N=8, C=40)])
    assert [r["status"] for r in rows] == ["skipped", "skipped"] and "--max-elements" in rows[0]["reason"]
    llm = Runner([Reference()], CPU, **FAST)
    assert llm.max_elements == 1 << 26


def test_a_provider_that_fails_to_build_or_to_say_why():
    class NoBuild(Provider):
        name = "nobuild"

        def build(self, case, device):
            raise ImportError("kernel module missing")

    class BadReason(Provider):
        name = "badreason"

        def unavailable_reason(self, case, device):
            raise ValueError("cannot tell")

    rows = Runner([NoBuild(), BadReason()], CPU, **FAST).run([tiny()])
    assert [r["status"] for r in rows] == ["failed"] * 4
    assert "kernel module missing" in rows[0]["reason"] and "cannot tell" in rows[2]["reason"]


def test_chunked_reference_and_sampled_gradient(monkeypatch):
    """The float64 reference in row chunks (as at LLM shapes) agrees, and still catches a wrong provider."""
    monkeypatch.setattr(verify, "CHUNK_ELEMENTS", 2 * 40)      # 2 rows per chunk
    monkeypatch.setattr(verify, "FULL_GRAD_ELEMENTS", 10 * 40)  # sample the gradient's chunks
    case = tiny("kd", N=19, C=40)
    ref = verify.Reference(case, *make_inputs(case, CPU))
    chunks = ref.chunks(sampled=True)
    assert chunks[0][0] == 0 and chunks[-1][1] == 19 and len(chunks) == verify.SAMPLED_CHUNKS
    assert len(ref.chunks(sampled=False)) == 10
    rows = Runner([Reference(), Wrong()], CPU, modes=("fwd+bwd",), **FAST).run([case])
    eager, wrong = by(rows, "reference")[0], by(rows, "wrong")[0]
    assert eager["status"] == "ok" and eager["grad_err"] < 1e-5, eager
    assert eager["verified"] == "loss+grad(15/19 rows)"
    assert wrong["status"] == "failed"


def test_verification_tolerance_is_per_dtype():
    assert verify.TOLERANCE["fp64"] < verify.TOLERANCE["fp32"] < verify.TOLERANCE["bf16"]
    rows = Runner([Reference()], CPU, modes=("fwd+bwd",), **FAST).run([tiny(dtype="bf16"), tiny(dtype="fp64")])
    assert [r["status"] for r in rows] == ["ok", "ok"]


def test_triton_is_never_timed_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert Kdkernels("triton").unavailable_reason(tiny(), CPU) == INTERPRET_REASON
    only_kd = Compiled(("kd",), "compile only kd here")
    assert only_kd.unavailable_reason(tiny("dkd"), CPU) == "compile only kd here"
    assert only_kd.unavailable_reason(tiny("kd"), CPU) is None


def test_provider_selection_and_aliases():
    from benchmarks.providers import all_providers
    names = [p.name for p in select(["reference", "triton"], all_providers())]
    assert names == ["kdk-triton", "reference"]
    assert [p.name for p in select(["published", "compile"], all_providers())] == ["eager", "compile"]
    assert {p.name for p in select(["kdkernels"], all_providers())} == {"kdk-triton", "kdk-cuda", "kdk-cpu"}
    with pytest.raises(ValueError, match="unknown provider"):
        select(["nope"], all_providers())


def test_csv_markdown_and_provenance(tmp_path):
    rows = Runner([Reference(), Missing(), Raising()], CPU, copy_GBps=10.0, **FAST).run([tiny()])
    prov = {"device": "test cpu", "torch": torch.__version__, "triton": "x", "git_commit": "abc",
            "date": "today", "TRITON_INTERPRET": "(unset)"}
    paths = report.write_all(str(tmp_path), "tiny", rows, prov, {"copy bandwidth": "10 GB/s"}, "title")
    with open(paths["csv"]) as f:
        lines = f.read().splitlines()
    comments = [ln for ln in lines if ln.startswith("# ")]
    for key in ("device:", "torch:", "triton:", "git_commit:", "date:", "TRITON_INTERPRET:", "copy bandwidth:"):
        assert any(ln.startswith("# " + key) for ln in comments), key
    assert any("fwd = 2·N·C·itemsize" in ln and "fwd+bwd = 3·N·C·itemsize" in ln for ln in comments)
    table = list(csv.DictReader([ln for ln in lines if not ln.startswith("#")]))
    assert list(table[0])[:len(COLUMNS)] == COLUMNS and "x_vs_reference" in table[0]
    assert {r["status"] for r in table} == {"ok", "skipped", "failed"}
    md = open(paths["md"]).read()
    assert "| method | shape |" in md and "2·N·C·itemsize" in md and "not installed on this machine" in md
    assert "boom from a broken provider" in report.table(rows, markdown=False)


def test_speedups_compare_providers_on_the_same_case():
    base = {k: None for k in COLUMNS}
    base.update(suite="s", method="kd", N=1, C=2, dtype="fp32", mode="fwd", family="logit", status="ok")
    rows = [dict(base, provider="a", time_ms=1.0), dict(base, provider="b", time_ms=4.0),
            dict(base, provider="a", time_ms=1.0, mode="fwd+bwd")]
    assert report.add_speedups(rows) == ["a", "b"]
    assert rows[0]["x_vs_b"] == 4.0 and rows[1]["x_vs_a"] == 0.25 and rows[0]["x_vs_a"] is None
    assert rows[2]["x_vs_b"] is None


def test_plots_are_written_or_skipped_with_a_note(tmp_path):
    rows = Runner([Reference()], CPU, modes=("fwd",), copy_GBps=10.0, **FAST).run([tiny(N=4), tiny(N=8),
                                                                                 tiny("dkd", N=8)])
    paths, note = plots.write_plots(str(tmp_path), "tiny", rows, device="test cpu")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert paths == [] and "matplotlib" in note
    else:
        assert [os.path.basename(p) for p in paths] == ["tiny-kd-fp32.png"]
        assert os.path.getsize(paths[0]) > 1000
        assert "dkd fp32" in note  # one shape only: a table row, not a one-point plot
    assert set(plots.PROVIDER_COLOURS) >= {"kdk-triton", "kdk-cuda", "kdk-cpu", "eager", "reference", "compile"}
    assert len(set(plots.PROVIDER_COLOURS.values())) == len(plots.PROVIDER_COLOURS)


def test_cli_end_to_end(tmp_path, capsys):
    code = run.main(["--suite", "tiny", "--methods", "kd,infonce", "--providers", "eager,liger,kdk-cpu",
                     "--device", "cpu", "--out", str(tmp_path), "--no-plots", "--quiet",
                     "--warmup-ms", "1", "--rep-ms", "2", "--copy-mib", "4"])
    assert code == 0
    out = capsys.readouterr().out
    assert "time ms" in out and "eager" in out and "wall time" in out
    assert os.path.exists(tmp_path / "tiny.csv") and os.path.exists(tmp_path / "tiny.md")
    text = open(tmp_path / "tiny.csv").read()
    assert "liger" in text  # a Liger row for kd: skipped with the reason (not installed / no CUDA here)


def test_gpu_check_script_is_one_call_of_at_most_seven_minutes():
    script = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    text = open(script).read()
    assert "GPU_CHECK_SECONDS:-420" in text  # the default budget: 7 minutes
    env = dict(os.environ, OUT="")
    main = subprocess.run(["bash", script, "--dry-run"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert main.returncode == 0, main.stderr
    order = ["benchmarks.timing cuda", "KDKERNELS_BUILD_CUDA=0", "pip install --no-deps --no-build-isolation -e .",
             "--suite headline --mode fwd+bwd --providers kdk-triton --verify-only",
             "--suite headline --mode fwd+bwd --providers kdk-triton,eager,compile",
             "--suite headline-linear --mode fwd+bwd", "ncu --csv", "benchmarks.ncu_probe"]
    pos = [main.stdout.find(needle) for needle in order]
    assert all(p >= 0 for p in pos) and pos == sorted(pos), list(zip(order, pos))  # in priority order
    assert "pytest" not in main.stdout and "TRITON_INTERPRET=1" not in main.stdout
    tests = subprocess.run(["bash", script, "--dry-run", "tests"], capture_output=True, text=True, cwd=ROOT,
                           env=env, timeout=60)
    assert tests.returncode == 0, tests.stderr
    for needle in ("KDKERNELS_BUILD_CUDA=1", "KDKERNELS_TEST_DEVICE=cuda", "tests/test_parity.py"):
        assert needle in tests.stdout, needle
    assert subprocess.run(["bash", script, "--dry-run", "nope"], capture_output=True, cwd=ROOT).returncode == 2


def test_headline_suite_has_the_gpu_call_shapes():
    cases = suite_cases("headline", "cuda")
    assert {(c.N, c.C, c.dtype) for c in cases} == {(1024, 1000, "fp32"), (8192, 1000, "fp32"),
                                                     (16384, 131072, "bf16")}
    classic = ("kd", "dkd", "ldrld", "topkd", "dtkd")
    assert {c.method for c in cases} == set(classic) | {"reverse_kl", "jsd", "sparse_renorm", "sparse_tail"}
    # priority order: the classic rows first, then the LLM family (dense, then the K = 64 sparse teacher)
    first_llm = min(i for i, c in enumerate(cases) if c.method not in classic)
    assert all(c.method in classic for c in cases[:first_llm])
    assert all(c.method not in classic for c in cases[first_llm:])
    assert {c.K for c in cases if c.sparse} == {64}


def test_verify_only_rows_are_checked_not_timed():
    rows = Runner([Reference()], CPU, modes=("fwd+bwd",), verify_only=True, **FAST).run([tiny("kd")])
    assert rows[0]["status"] == "ok" and rows[0]["time_ms"] is None and rows[0]["grad_err"] < 1e-5


# ---------------------------------------------------------------------------------------------------
# the static instruments' parsers (the measurements themselves: tests/test_budgets.py)
# ---------------------------------------------------------------------------------------------------
SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.64 R2, desc[UR16][R2.64] ;
        /*0020*/              @!P5 LDG.E.EL.128 R8, desc[UR10][R6.64] ;
        /*0030*/                   FADD R4, R4, R5 ;
        /*0040*/                   NOP ;
        /*0050*/              @!P6 BRA 0x20 ;
        /*0060*/                   STG.E desc[UR4][R2.64], R4 ;
        /*0070*/              @!P1 BRA 0x60 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x90;
"""


def test_sass_hot_loops_and_vector_width():
    from benchmarks import compile_facts as cf
    insns = [(a, i) for a, i in cf.parse_sass(SASS) if not i.startswith("NOP")]
    assert insns[0] == (0, "LDC R1, c[0x0][0x28]") and len(insns) == 9
    loops = cf.hot_loops(insns)  # 0x20..0x50 holds a load; 0x60..0x70 (a store loop) does not
    assert loops == [{"start": 0x20, "end": 0x50, "instructions": 3, "ldg_bits": [128]}]


def test_ctas_per_sm_and_ptxas_log():
    from benchmarks import compile_facts as cf
    assert cf.ctas_per_sm(64, 8, 32) == 4        # 64 regs x 256 threads: 16384 of 65536 registers
    assert cf.ctas_per_sm(255, 8, 0) == 1
    assert cf.ctas_per_sm(32, 2, 0) == 32        # the CTA limit
    assert cf.ctas_per_sm(32, 4, 200_000) == 1   # shared memory
    log = ("ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z3fooPf\n"
           "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 106 registers, used 0 barriers, 392 bytes cmem[0]\n")
    (row,) = cf.parse_ptxas(log)
    assert (row["arch"], row["registers"], row["stack"], row["spill_stores"], row["spill_loads"]) == \
        ("sm_90", 106, 8, 4, 4)
    assert row["kernel"] in ("foo(float*)", "_Z3fooPf")


def test_op_classification():
    from benchmarks.instruments import OpCounter, classify_ops
    x = torch.randn(4, 5, requires_grad=True)
    with OpCounter() as ops:
        y = x.view(20).sum() * 2
        torch.autograd.grad(y, x, torch.ones(()))
    kinds = classify_ops(ops.ops)
    assert "aten::sum" in kinds["aten_kernels"] and "aten::view" in kinds["aten_free"]
    assert "aten::mul" in kinds["aten_kernels"] and not kinds["custom"]


# ---------------------------------------------------------------------------------------------------
# the LLM family (issue 12): divergences, dense top-k with a tail, the sparse (stored top-K) teacher
# ---------------------------------------------------------------------------------------------------
LLM_BASELINES = ("reverse_kl", "jsd", "tvd", "topk_tail", "sparse_renorm", "sparse_tail", "sparse_renorm+ce")


def _float64_inputs(preset, N=6, C=300, seed=3):
    """Seeded float64 logits, labels with one ignored row, and the preset's teacher (a float64 stored top-K
    for a sparse preset)."""
    import kdkernels as kdk
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, C, generator=g, dtype=torch.float64) * 3
    t = torch.randn(N, C, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, C, (N,), generator=g)
    y[1] = -100
    if preset.sparse is not None:
        from benchmarks.presets import SPARSE_K
        logprobs, ids = torch.log_softmax(t, -1).topk(SPARSE_K, -1)
        t = kdk.SparseTeacher(ids, logprobs, preset.sparse)
    return s, t, y


@pytest.mark.parametrize("name", LLM_BASELINES)
def test_llm_baselines_equal_the_reference_in_float64(name):
    """Each LLM eager baseline (TRL's generalised JSD, torchtune's reverse KL, TVD, the Megatron-style tail
    and the renormalised top-K KL, + CE) is the preset's loss: loss and gradient to 1e-10 in float64."""
    import kdkernels as kdk
    from benchmarks import baselines
    from benchmarks.presets import PRESETS
    preset = PRESETS[name]
    s, t, y = _float64_inputs(preset)
    x_ref = s.clone().requires_grad_(True)
    ref = kdk.logit_distill(x_ref, t, y, preset.build(), backend="reference")
    g_ref, = torch.autograd.grad(ref, x_ref)
    x = s.clone().requires_grad_(True)
    loss = baselines.BASELINES[name][0](x, t, y)
    g, = torch.autograd.grad(loss, x)
    loss, ref = float(loss.detach()), float(ref.detach())
    assert abs(loss - ref) <= 1e-10 * abs(ref), (name, loss, ref)
    assert float((g - g_ref).norm()) <= 1e-10 * float(g_ref.norm()), name
    assert g[1].abs().max() == 0  # the ignored token


def test_llm_suite_has_the_divergences_topk_and_sparse_teacher():
    from benchmarks.shapes import LLM, LLM_CPU, LLM_METHODS, SPARSE_KS, SPARSE_LLM, SPARSE_METHODS
    gpu = suite_cases("llm", "cuda")
    for m in LLM_METHODS:
        assert {(c.N, c.C) for c in gpu if c.method == m} == set(LLM), m
    for m in SPARSE_METHODS:
        got = {(c.N, c.C, c.K) for c in gpu if c.method == m}
        assert got == {(n, c, k) for n, c in SPARSE_LLM for k in SPARSE_KS} == \
            {(16384, v, k) for v in (131072, 262144) for k in (64, 128, 256)}, m
    assert all(c.dtype == "bf16" for c in gpu)
    cpu = [c for c in suite_cases("llm", "cpu") if c.method in LLM_METHODS + SPARSE_METHODS]
    assert {(c.N, c.C) for c in cpu} == set(LLM_CPU) and all(c.elements <= 1 << 23 for c in cpu)
    sparse = Case("t", "sparse_tail", 16, 1000, "bf16", 64)
    assert sparse.sparse and sparse.normalize == "tail" and sparse.shape == "N=16 C=1000 K=64"
    assert suite_cases("llm", "cuda", methods=["kd"])[0].K == 0


def test_sparse_bytes_formula():
    c = Case("t", "sparse_renorm", 8, 1000, "bf16", 64)
    assert min_bytes(c, "fwd") == 8 * 1000 * 2 + 8 * 64 * (8 + 4)      # read s, the int64 ids, float32 logprobs
    assert min_bytes(c, "fwd+bwd") == 2 * 8 * 1000 * 2 + 8 * 64 * 12   # + write the gradient once


def test_sparse_inputs_are_the_teachers_top_k():
    import kdkernels as kdk
    case = Case("t", "sparse_renorm", 5, 200, "bf16", 16)
    s, t, y = make_inputs(case, CPU)
    assert isinstance(t, kdk.SparseTeacher) and t.normalize == "renorm"
    assert t.ids.shape == t.logprobs.shape == (5, 16) and t.ids.dtype == torch.int64
    assert t.logprobs.dtype == torch.float32 and s.dtype == torch.bfloat16
    assert bool((t.logprobs <= 0).all()) and bool((t.logprobs[:, :-1] >= t.logprobs[:, 1:]).all())  # sorted top-K
    assert float(t.logprobs.exp().sum(-1).max()) < 1.0
    assert [int(r.unique().numel()) for r in t.ids] == [16] * 5


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_llm_eager_and_reference_rows_are_verified(dtype):
    """The LLM family through the harness: the eager baselines and the reference verified against the
    float64 reference, sparse rows carry K (a sparse teacher slices and upcasts its logprobs only)."""
    from benchmarks.shapes import LLM_METHODS, SPARSE_METHODS
    methods = LLM_METHODS + SPARSE_METHODS  # topk_tail: an unambiguous top-k set even in bf16 (untie_top_k)
    cases = [Case("tiny", m, 8, 256, dtype, 64 if m in SPARSE_METHODS else 0) for m in methods]
    rows = Runner([Eager(), Reference()], CPU, modes=("fwd+bwd",), **FAST).run(cases)
    bad = [(r["method"], r["provider"], r["reason"]) for r in rows if r["status"] != "ok"]
    assert not bad, bad
    assert {r["K"] for r in rows if r["method"].startswith("sparse")} == {64}
    assert {r["K"] for r in rows if not r["method"].startswith("sparse")} == {None}


def test_a_backend_without_the_option_is_a_skipped_row():
    class Unimplemented(Provider):
        name, description = "unimplemented", "raises NotImplementedError like a backend without the option"

        def build(self, case, device):
            def f(s, t, y):
                raise NotImplementedError("kdkernels triton: divergence='tvd' with a sparse teacher is not supported")
            return f

    class NoModule(Provider):
        name, description = "nomodule", "its kernel module is missing"

        def build(self, case, device):
            def f(s, t, y):
                raise ModuleNotFoundError("No module named 'kdkernels._triton.sparse'")
            return f

    rows = Runner([Unimplemented(), NoModule(), Reference()], CPU, modes=("fwd+bwd",), **FAST).run(
        [Case("tiny", "sparse_tail", 8, 256, "fp32", 64)])
    assert [r["status"] for r in rows] == ["skipped", "skipped", "ok"], rows
    assert "not available in this backend" in rows[0]["reason"] and "divergence='tvd'" in rows[0]["reason"]
    assert "kdkernels._triton.sparse" in rows[1]["reason"]


def test_dense_top_k_inputs_have_an_unambiguous_support():
    """bf16 logits tie at the 64th place of a long row most of the time; the top-k case's teacher is untied
    there (only entries equal to the 65th are raised, by one representable step)."""
    from benchmarks.shapes import untie_top_k
    g = torch.Generator().manual_seed(0)
    raw = (torch.randn(64, 4096, generator=g) * 3).bfloat16()
    top = raw.float().sort(-1, descending=True).values
    assert int((top[:, 63] == top[:, 64]).sum()) > 0  # ties happen
    fixed = untie_top_k(raw, 64)
    top2 = fixed.float().sort(-1, descending=True).values
    assert int((top2[:, 63] == top2[:, 64]).sum()) == 0 and fixed.dtype == torch.bfloat16
    changed = fixed != raw
    assert int(changed.sum(-1).max()) <= 64 and bool((fixed >= raw).all())
    assert torch.equal(top2[:, 64:], top[:, 64:])  # the rest of the row is untouched
    _, t, _ = make_inputs(Case("t", "topk_tail", 32, 4096, "bf16"), CPU)
    top3 = t.float().sort(-1, descending=True).values
    assert int((top3[:, 63] == top3[:, 64]).sum()) == 0


# ---------------------------------------------------------------------------------------------
# the fused-linear suite (--suite llm-linear)
# ---------------------------------------------------------------------------------------------
def test_llm_linear_suite_shapes():
    gpu = suite_cases("llm-linear", "cuda")
    assert {c.family for c in gpu} == {"linear"} and {c.dtype for c in gpu} == {"bf16"}
    assert {c.N for c in gpu} >= {4096, 16384, 32768} and {c.H for c in gpu} == {2048, 4096}
    assert {c.C for c in gpu} == {32768, 131072, 262144}
    assert {c.K for c in gpu if c.sparse} == {64} and {c.method for c in gpu} == {
        "linear_kl", "linear_jsd", "linear_renorm", "linear_tail"}
    cpu = suite_cases("llm-linear", "cpu")
    assert {(c.N, c.H, c.C, c.dtype) for c in cpu} == {(512, 64, 8192, "fp32")}
    head = suite_cases("headline-linear", "cuda")
    assert {(c.N, c.H, c.C, c.method, c.dtype) for c in head} == {(16384, 4096, 131072, "linear_kl", "bf16")}
    case = cpu[0]
    assert min_flops(case, "fwd+bwd") == 6 * 512 * 8192 * 64 and case.shape == "N=512 H=64 V=8192"


@pytest.mark.parametrize("with_bias", [False, True])
def test_llm_linear_rows_are_verified_against_float64(with_bias):
    from benchmarks.linear import LinearRunner, linear_providers
    runner = LinearRunner(linear_providers(), CPU, **FAST)
    runner.with_bias = with_bias
    rows = runner.run(suite_cases("tiny-linear", "cpu"))
    ok = [r for r in rows if r["status"] == "ok"]
    assert not [r for r in rows if r["status"] == "failed"], [r["reason"] for r in rows if r["status"] == "failed"]
    # every provider but liger, every method, both modes; the fused sparse form only on the sparse methods
    got = {(r["method"], r["provider"], r["mode"]) for r in ok}
    for m in ("linear_kl", "linear_jsd"):
        for p in ("kdk-fused-logits", "kdk-fused-hidden", "kdk-unfused", "eager"):
            assert {(m, p, "fwd"), (m, p, "fwd+bwd")} <= got
    for m in ("linear_renorm", "linear_tail"):
        for p in ("kdk-fused-sparse", "kdk-unfused", "eager"):
            assert {(m, p, "fwd"), (m, p, "fwd+bwd")} <= got
    assert not {(m, "kdk-fused-sparse") for m in ("linear_kl", "linear_jsd")} & {(r["method"], r["provider"]) for r in rows}
    grads = ("h", "W", "b") if with_bias else ("h", "W")
    for r in ok:
        assert r["loss_err"] <= 1e-4 and r["H"] == 8 and r["time_ms"] > 0
        if r["mode"] == "fwd+bwd":
            assert r["grad_err"] <= 1e-4 and all(f"{g} " in r["verified"] for g in grads), r["verified"]
            assert ("b " in r["verified"]) == with_bias
    liger = [r for r in rows if r["provider"] == "liger"]
    assert liger and all(r["status"] == "skipped" and r["reason"] for r in liger)


def test_llm_linear_catches_a_wrong_provider():
    from benchmarks.linear import EagerLinear, LinearRunner

    class WrongBeta(EagerLinear):
        name = "wrong"

        def build(self, case, device):
            good = super().build(case, device)
            return lambda h, w, b: good(h, w * 1.01, b)  # a slightly different head: plausible, wrong
    rows = LinearRunner([WrongBeta()], CPU, **FAST).run(suite_cases("tiny-linear", "cpu", methods=["linear_kl"]))
    assert rows and all(r["status"] == "failed" and "float64 reference" in r["reason"] for r in rows)


def test_llm_linear_suite_runs_end_to_end(tmp_path):
    code = run.main(["--suite", "llm-linear", "--methods", "linear_kl,linear_renorm", "--mode", "fwd+bwd",
                     "--warmup-ms", "1", "--rep-ms", "2", "--out", str(tmp_path), "--no-plots", "--quiet",
                     "--strict", "--copy-mib", "4"])
    assert code == 0
    with open(tmp_path / "llm-linear.csv") as fh:
        rows = list(csv.DictReader(line for line in fh if not line.startswith("#")))
    assert {r["provider"] for r in rows if r["status"] == "ok"} == {
        "kdk-fused-logits", "kdk-fused-hidden", "kdk-fused-sparse", "kdk-unfused", "eager"}
    assert all(r["H"] == "64" and r["N"] == "512" for r in rows)
