"""The fused InfoNCE kernel (kdkernels/_triton/info_nce.py) and the contrastive losses built on it.

CPU runs go through the Triton interpreter (``TRITON_INTERPRET=1`` before import, as ``make test``
sets it); without it the Triton tests skip. Every parity case compares loss and ∂loss/∂a with the
float64 reference evaluated on the same input values. Grids stay tiny (~2.5 ms per program instance,
~4 ms per nested ``tl.sum``/``tl.max``); the multi-tile paths are forced with small tile overrides.
The ahead-of-time sm_80/sm_90 compile of every shipped configuration runs without the interpreter.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kdkernels as kdk
from kdkernels import contrastive, reference
from kdkernels.dispatch import BackendUnavailableError, resolve

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aot_util import aot_compile  # noqa: E402

K = pytest.importorskip("kdkernels._triton.info_nce")

CUDA = torch.cuda.is_available()
TRITON_OK = K.launcher.unavailable_reason(torch.device("cpu")) is None
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="Triton on CPU needs TRITON_INTERPRET=1 before import")

#: (loss rtol, gradient tolerance relative to max |grad|) vs the float64 reference of the same values
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 5e-3),
       torch.bfloat16: (2e-3, 2e-2)}


def _inputs(gen, G, M, D, dtype, device="cpu", scale=1.0):
    a = (torch.randn(G, M, D, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    b = (torch.randn(G, M, D, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    b = (b + 0.5 * a).to(dtype)  # correlated teacher: a realistic, non-uniform softmax
    return a, b


def _reference(a, b, tau):
    a64 = a.detach().double().requires_grad_()
    loss = reference.info_nce(a64, b.double(), tau)
    grad, = torch.autograd.grad(loss, a64)
    return loss.detach(), grad


def _assert_grad_close(got, want, rtol):
    got, want = got.double().cpu(), want.double().cpu()
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    # M = 1: the exact gradient is 0 and the reference's is round-off; compare on an absolute scale
    assert err <= rtol * max(scale, 1e-3 if want.dtype == torch.float64 else 1.0), (err, scale)


def _check(a, b, tau, **tiles):
    want_loss, want_grad = _reference(a, b, tau)
    x = a.detach().clone().requires_grad_()
    loss = K.launcher.info_nce(x, b, tau, **tiles)
    assert loss.dim() == 0 and loss.dtype == (torch.float64 if a.dtype == torch.float64 else torch.float32)
    grad, = torch.autograd.grad(loss, x)
    assert grad.dtype == a.dtype and grad.shape == a.shape
    rtol_loss, rtol_grad = TOL[a.dtype]
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert abs(loss.item() - want_loss.item()) <= rtol_loss * max(abs(want_loss.item()), 1e-6), \
        (loss.item(), want_loss.item())
    _assert_grad_close(grad, want_grad, rtol_grad)


# ---------------------------------------------------------------------------------------------
# parity matrix: G ∈ {1, 21}, M ∈ {1, 2, 7, 64, 200}, D ∈ {3, 64, 100}, fp32 / bf16 / fp64 (+ fp16)
# ---------------------------------------------------------------------------------------------
PARITY = [
    # G, M,   D,   dtype,          tiles (block_m/block_n/block_d overrides; {} = the heuristic)
    (1, 1, 3, torch.float32, {}),
    (1, 1, 64, torch.float64, {}),
    (21, 1, 100, torch.bfloat16, {}),
    (1, 2, 100, torch.float32, {}),
    (21, 2, 3, torch.float64, {}),
    (1, 2, 64, torch.bfloat16, {}),
    (21, 7, 3, torch.float32, {}),
    (21, 7, 64, torch.bfloat16, {}),
    (1, 7, 100, torch.float64, dict(block_d=16)),          # D in 7 chunks, output in 7 chunks
    (2, 7, 100, torch.float16, {}),
    (1, 64, 64, torch.float32, {}),                         # one 64 × 64 tile
    (1, 64, 100, torch.float64, dict(block_m=16, block_n=16)),  # 4 × 4 tiles, 2 D-chunks
    (1, 64, 3, torch.bfloat16, dict(block_m=16, block_n=32)),   # BM ≠ BN
    (1, 200, 64, torch.float32, dict(block_m=32, block_n=32)),  # 7 × 7 tiles, ragged last tile
    (1, 200, 3, torch.bfloat16, dict(block_m=32, block_n=32)),
    (1, 200, 100, torch.float64, dict(block_m=64, block_n=64)),  # 4 × 4 tiles, 2 D-chunks
]


@needs_triton
@pytest.mark.parametrize("G,M,D,dtype,tiles", PARITY,
                         ids=[f"G{g}-M{m}-D{d}-{str(t)[6:]}-{'-'.join(f'{k[6]}{v}' for k, v in ti.items()) or 'auto'}"
                              for g, m, d, t, ti in PARITY])
def test_parity(gen, G, M, D, dtype, tiles):
    a, b = _inputs(gen, G, M, D, dtype)
    _check(a, b, 0.1, **tiles)


@needs_triton
@pytest.mark.parametrize("tau", [0.05, 0.5, 2.0])
def test_parity_tau(gen, tau):
    a, b = _inputs(gen, 2, 9, 20, torch.float64, scale=3.0)
    _check(a, b, tau)


@needs_triton
def test_module_level_tile_override_forces_multi_tile(gen, monkeypatch):
    monkeypatch.setattr(K, "BLOCK_M", 16)
    monkeypatch.setattr(K, "BLOCK_N", 16)
    monkeypatch.setattr(K, "BLOCK_D", 16)
    assert K.tiles(40, 40, torch.float32)[:3] == (16, 16, 16)
    a, b = _inputs(gen, 2, 40, 40, torch.float64)
    _check(a, b, 0.1)


def test_tile_heuristic_and_errors():
    assert K.tiles(4096, 256, torch.bfloat16) == K.default_tiles(256, torch.bfloat16) == (64, 64, 128, 8)
    assert K.tiles(4096, 256, torch.float32) == (64, 64, 64, 4)
    assert K.default_tiles(3, torch.float64) == (32, 32, 16, 4)
    assert K.tiles(7, 3, torch.float64) == ((16, 16, 16, 4) if K._INTERPRETED_AT_IMPORT else (32, 32, 16, 4))
    for bad in (8, 48):
        with pytest.raises(ValueError, match="power of two >= 16"):
            K.tiles(64, 64, torch.float32, block_m=bad)


@needs_triton
def test_zero_rows_and_grad_output_scaling(gen):
    a, b = _inputs(gen, 2, 6, 5, torch.float64)
    a[0, 2] = 0.0  # ‖a‖ < ε: F.normalize's a/ε branch (gradient g/ε, no projection)
    b[1, 4] = 0.0
    _check(a, b, 0.2)
    x = a.clone().requires_grad_()
    (3.5 * K.launcher.info_nce(x, b, 0.2)).backward()
    x2 = a.clone().requires_grad_()
    (3.5 * reference.info_nce(x2, b, 0.2)).backward()
    _assert_grad_close(x.grad, x2.grad, 1e-10)


@needs_triton
def test_gradcheck_float64(gen):
    a, b = _inputs(gen, 2, 5, 4, torch.float64)
    a.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: K.InfoNCEFunction.loss(x, b, 0.3, 16, 16, 16), (a,),
                                    eps=1e-6, atol=1e-8, rtol=1e-6)


@needs_triton
def test_public_api_routes_to_kernel_and_teacher_gets_no_grad(gen):
    a, b = _inputs(gen, 3, 5, 7, torch.float32)
    a.requires_grad_()
    b.requires_grad_()
    assert resolve("auto", a.device, family="contrastive") == "triton"
    K.launch_count = 0
    loss = kdk.info_nce(a, b, 0.3, backend="triton")
    loss.backward()
    assert K.launch_count == 2 and b.grad is None
    ref = reference.info_nce(a.double(), b.double(), 0.3)
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()
    # [M, D] input is one group; non-contiguous views work and get a gradient of their own shape
    base = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    x = base.t().requires_grad_()  # [5, 7], stride (1, 5)
    y = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    loss = kdk.info_nce(x, y, 0.1, backend="triton")
    g, = torch.autograd.grad(loss, x)
    want_loss, want_grad = _reference(x[None], y[None], 0.1)
    assert abs(loss.item() - want_loss.item()) < 1e-10 * want_loss.item()
    _assert_grad_close(g, want_grad[0], 1e-10)
    # no gradient wanted: forward only (one launch)
    K.launch_count = 0
    with torch.no_grad():
        kdk.info_nce(y, y, 0.1, backend="triton")
    assert K.launch_count == 1


@needs_triton
def test_kernels_write_only_their_outputs(gen):
    """Launch the raw kernels into views of NaN-poisoned buffers: the guard regions stay NaN."""
    G, M, D, bm, bd = 2, 19, 21, 16, 16     # ragged in M and D
    a, b = _inputs(gen, G, M, D, torch.float32)
    pad = 37
    bufs = [torch.full((2 * G * M + 2 * pad,), float("nan")) for _ in range(3)]
    lse, terms, rn = (buf[pad:pad + 2 * G * M].view(2, G, M) for buf in bufs)
    hi, lo = K._tau_split(0.1)
    K._info_nce_fwd_kernel[(triton_cdiv(M, bm), G, 2)](
        a, b, lse, terms, rn, G, M, D, M * D, D, hi, lo,
        BLOCK_M=bm, BLOCK_N=bm, BLOCK_D=bd, DOT_PRECISION="ieee", UPCAST=False)
    for buf in bufs:
        assert torch.isnan(buf[:pad]).all() and torch.isnan(buf[-pad:]).all()
        assert torch.isfinite(buf[pad:-pad]).all()
    gbuf = torch.full((G * M * D + 2 * pad,), float("nan"))
    grad = gbuf[pad:pad + G * M * D].view(G, M, D)
    gout = torch.ones(1)
    K._info_nce_bwd_kernel[(triton_cdiv(M, bm), G)](
        a, b, lse, rn, gout, grad, G, M, D, M * D, D, hi, lo,
        BLOCK_M=bm, BLOCK_N=bm, BLOCK_D=bd, DOT_PRECISION="ieee", UPCAST=False)
    assert torch.isnan(gbuf[:pad]).all() and torch.isnan(gbuf[-pad:]).all()
    want_loss, want_grad = _reference(a, b, 0.1)
    assert abs(terms.sum().item() / (2 * G * M) - want_loss.item()) < 1e-5 * want_loss.item()
    _assert_grad_close(grad, want_grad, 1e-5)


def triton_cdiv(x, y):
    return (x + y - 1) // y


def test_torch_library_ops_registered():
    assert hasattr(torch.ops.kdkernels, "info_nce_fwd") and hasattr(torch.ops.kdkernels, "info_nce_bwd")
    # triton_op on the GPU; under the interpreter an opaque custom_op (triton_op's fake-tensor tracing
    # would run the interpreted kernel on fake tensors — benchmarks/README.md)
    assert K.USE_TRITON_OP == (hasattr(torch.library, "triton_op") and not K._INTERPRETED_AT_IMPORT)


@needs_triton
def test_opcheck(gen):
    a, b = _inputs(gen, 2, 9, 20, torch.float32)
    torch.library.opcheck(torch.ops.kdkernels.info_nce_fwd.default, (a, b, 0.1, 0, 0, 0))
    terms, lse, rn = torch.ops.kdkernels.info_nce_fwd(a, b, 0.1, 0, 0, 0)
    torch.library.opcheck(torch.ops.kdkernels.info_nce_bwd.default, (torch.tensor(1.5), a, b, lse, rn, 0.1, 0, 0, 0))


@needs_triton
def test_torch_compile_cpu_custom_op(gen):
    """torch.compile(fullgraph=True) traces the Function and the custom ops (CPU: the custom_op path)."""
    torch._dynamo.reset()
    a, b = _inputs(gen, 2, 9, 20, torch.float32)
    f = torch.compile(lambda x, y: kdk.info_nce(x, y, 0.1, backend="triton") * 2.0, backend="aot_eager",
                      fullgraph=True)
    x = a.clone().requires_grad_()
    loss = f(x, b)
    loss.backward()
    want, want_grad = _reference(a, b, 0.1)
    assert abs(loss.item() - 2 * want.item()) < 1e-5 * want.item()
    _assert_grad_close(x.grad, 2 * want_grad, 1e-5)


# ---------------------------------------------------------------------------------------------
# availability and errors
# ---------------------------------------------------------------------------------------------
def test_unavailable_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in K.launcher.unavailable_reason(torch.device("cpu"))
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        kdk.info_nce(torch.randn(3, 4), torch.randn(3, 4), backend="triton")
    if not CUDA:
        assert K.launcher.unavailable_reason(torch.device("cuda")) is not None


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_errors(backend):
    a = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="same shape"):
        kdk.info_nce(a, torch.randn(2, 3, 5), backend=backend)
    with pytest.raises(ValueError, match=r"\[G, M, D\]"):
        kdk.info_nce(a[None], a[None], backend=backend)
    with pytest.raises(TypeError, match="same dtype"):
        kdk.info_nce(a, a.double(), backend=backend)
    for tau in (0, -1.0, float("inf"), None, True):
        with pytest.raises(ValueError, match="tau"):
            kdk.info_nce(a, a, tau, backend=backend)
    f = torch.randn(2, 4, 4, 4)
    with pytest.raises(ValueError, match="channel mismatch"):
        kdk.msd_contrastive_loss(f, torch.randn(2, 5, 4, 4), backend=backend)
    with pytest.raises(ValueError, match="batch mismatch"):
        kdk.msd_contrastive_loss(f, torch.randn(3, 4, 4, 4), backend=backend)
    with pytest.raises(ValueError, match=r"\[N, D, H, W\]"):
        kdk.msd_contrastive_loss(f[0], f[0], backend=backend)
    with pytest.raises(ValueError, match="scales"):
        kdk.msd_contrastive_loss(f, f, scales=(0, 2), backend=backend)
    with pytest.raises(ValueError, match="tau"):
        kdk.msd_contrastive_loss(f, f, tau=-0.1, backend=backend)


def test_launcher_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same shape"):
        K.launcher.info_nce(torch.randn(1, 3, 4), torch.randn(1, 4, 4), 0.1)
    with pytest.raises(ValueError, match="same shape"):
        K.launcher.info_nce(torch.randn(3, 4), torch.randn(3, 4), 0.1)


# ---------------------------------------------------------------------------------------------
# msd_contrastive_loss on the kernel
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw,scales", [((8, 8), (1, 2, 4)), ((4, 4), (1, 2, 4)), ((12, 12), (1, 3)),
                                       ((6, 6), (1, 2, 4)), ((5, 7), (1, 2)), ((12, 12), (2, 3))])
def test_pooling_matches_adaptive_pool(gen, hw, scales):
    f = torch.randn(3, 4, *hw, generator=gen, dtype=torch.float64)
    for g, p in zip(scales, contrastive._pool_scales(f, scales)):
        torch.testing.assert_close(p, F.adaptive_avg_pool2d(f, g), rtol=1e-13, atol=1e-13)


def test_packed_groups_match_reference_groups(gen):
    f = torch.randn(3, 5, 8, 8, generator=gen, dtype=torch.float64)
    scales = (1, 2, 4)
    sample, feature = contrastive.msd_groups_packed(f, scales)
    ref_sample, ref_feature = reference.msd_groups(f, scales)
    torch.testing.assert_close(sample, ref_sample, rtol=1e-13, atol=1e-13)
    assert feature.shape == (3, 5, 3 * 16)
    for i, rf in enumerate(ref_feature):
        L = rf.shape[-1]
        torch.testing.assert_close(feature[i, :, :L], rf[0], rtol=1e-13, atol=1e-13)
        assert (feature[i, :, L:] == 0).all()


@needs_triton
@pytest.mark.parametrize("shape,scales,dtype", [((4, 8, 8, 8), (1, 2, 4), torch.float64),
                                                ((3, 5, 6, 6), (1, 2, 4), torch.float64),
                                                ((5, 20, 4, 4), (1, 2), torch.float32),
                                                ((4, 6, 8, 8), (1, 2, 4), torch.bfloat16)])
def test_msd_parity(gen, shape, scales, dtype):
    fs = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    ft = (torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype) + fs).to(dtype)
    x = fs.clone().requires_grad_()
    loss = kdk.msd_contrastive_loss(x, ft, scales, 0.2, 0.7, 1.3, backend="triton")
    grad, = torch.autograd.grad(loss, x)
    x64 = fs.double().requires_grad_()
    want = reference.msd_contrastive_loss(x64, ft.double(), scales, 0.2, 0.7, 1.3)
    want_grad, = torch.autograd.grad(want, x64)
    rtol_loss, rtol_grad = TOL[dtype]
    if dtype == torch.bfloat16:  # the coarse scales are averaged from bf16-rounded fine cells
        rtol_loss, rtol_grad = 1e-2, 3e-2
    assert abs(loss.item() - want.item()) <= rtol_loss * abs(want.item())
    _assert_grad_close(grad, want_grad, rtol_grad)
    # the module form routes the same way
    m = kdk.nn.MSDContrastiveLoss(scales, 0.2, 0.7, 1.3, backend="triton")
    assert abs(m(fs, ft).item() - loss.item()) <= 1e-6 * abs(loss.item())


class _FakeLaunch:
    """Stands in for ``wrap_triton(kernel)``: records the launch, runs nothing (outputs stay garbage)."""

    def __init__(self, log, kernel):
        self.log, self.kernel = log, kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.kernel.__name__, tuple(grid)))
        return launch


#: aten ops that only make views (no kernel launch)
VIEW_OPS = {f"aten.{v}.default" for v in ("view", "permute", "unsqueeze", "expand", "as_strided", "detach",
                                          "_unsafe_view", "alias", "t", "transpose", "squeeze")} | \
    {"aten.slice.Tensor", "aten.select.int", "aten.transpose.int", "aten.unbind.int", "aten.split.Tensor",
     "aten.squeeze.dim"}


def _msd_counts(shape, monkeypatch, run_kernels):
    """(Triton launches, aten ops) of one msd forward + backward (scales 1, 2, 4)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    log = []
    if not run_kernels:
        monkeypatch.setattr(K, "_wrap", lambda kernel: _FakeLaunch(log, kernel))
    aten = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            aten.append(str(func))
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(0)
    fs = torch.randn(*shape, generator=gen).requires_grad_()
    ft = torch.randn(*shape, generator=gen)
    K.launch_count = 0
    with Count():
        loss = kdk.msd_contrastive_loss(fs, ft, (1, 2, 4), backend="triton")
        loss.backward()
    if not run_kernels:
        assert len(log) == K.launch_count
    return K.launch_count, aten


@needs_triton
def test_msd_launch_count(monkeypatch):
    """[64, 256, 8, 8] with scales (1, 2, 4): 21 sample-wise + 3 feature-wise groups in 2 forward and 2
    backward Triton launches. The real shape runs with recorded (not executed) launches — the interpreter
    would need ~2 min — and a tiny map of the same structure runs for real; the counts are equal."""
    real, aten_small = _msd_counts((4, 8, 8, 8), monkeypatch, run_kernels=True)
    with monkeypatch.context() as m:
        full, aten_full = _msd_counts((64, 256, 8, 8), m, run_kernels=False)
    assert real == full == 4
    # the PyTorch glue (pooling once per map, packing, the loss sums and their backward) is a fixed,
    # size-independent set of small ops too: 41 kernel-launching aten ops here (views excluded)
    assert aten_small == aten_full
    glue = [op for op in aten_full if op not in VIEW_OPS and not op.startswith("kdkernels.")]
    assert len(glue) <= 45, glue
    # the sample-wise groups are one [21, N, D] launch, the feature-wise one [3, D, 16·N] launch
    log = []
    monkeypatch.setattr(K, "_wrap", lambda kernel: _FakeLaunch(log, kernel))
    fs = torch.randn(64, 256, 8, 8)
    kdk.msd_contrastive_loss(fs, fs, backend="triton")
    assert [grid for _, grid in log] == [(1, 21, 2), (4, 3, 2)]


# ---------------------------------------------------------------------------------------------
# TopKD's logit contrastive term uses the kernel
# ---------------------------------------------------------------------------------------------
@needs_triton
def test_topkd_contrastive_term_uses_kernel(gen, monkeypatch):
    """``topkd_loss(..., contrastive_weight>0)`` adds ``w·info_nce(s[None], t[None], τ)`` through this
    kernel (backend "auto"); the logit part is pinned to the reference so only the kernel is tested."""
    from kdkernels import dispatch
    monkeypatch.setitem(dispatch.LAUNCHERS, "logit", {})
    monkeypatch.setattr(dispatch, "_cache", {})
    assert resolve("auto", torch.device("cpu"), family="logit") == "reference"
    N, C, w, tau = 6, 12, 0.7, 0.3
    s = (torch.randn(N, C, generator=gen, dtype=torch.float64) * 2)
    t = torch.randn(N, C, generator=gen, dtype=torch.float64) * 2
    y = torch.randint(0, C, (N,), generator=gen)
    x0, x1 = s.clone().requires_grad_(), s.clone().requires_grad_()
    base = kdk.topkd_loss(x0, t, y, 2, contrastive_weight=0.0)
    K.launch_count = 0
    full = kdk.topkd_loss(x1, t, y, 2, contrastive_weight=w, contrastive_tau=tau)
    assert K.launch_count == 1
    g_base, = torch.autograd.grad(base, x0)
    g_full, = torch.autograd.grad(full, x1)
    assert K.launch_count == 2
    want, want_grad = _reference(s[None], t[None], tau)
    assert abs((full - base).item() - w * want.item()) < 1e-10 * abs(want.item())
    _assert_grad_close(g_full - g_base, w * want_grad[0], 1e-9)


# ---------------------------------------------------------------------------------------------
# ahead-of-time GPU compile of every shipped configuration (no interpreter, no GPU needed)
# ---------------------------------------------------------------------------------------------
def test_aot_compile_shipped_configs_sm80_sm90():
    jobs = K.shipped_configs()
    kernels = {j["kernel"].split(":")[1] for j in jobs}
    assert kernels == {"_info_nce_fwd_kernel", "_info_nce_bwd_kernel"}
    # every tile the heuristic can pick is shipped (and so compile-checked)
    shipped = {(j["signature"]["a_ptr"], j["constexprs"]["BLOCK_M"], j["constexprs"]["BLOCK_D"]) for j in jobs}
    ptr = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float64: "*fp64"}
    for dtype in ptr:
        for D in (1, 3, 16, 17, 64, 100, 128, 256, 4096):
            bm, _, bd, _ = K.default_tiles(D, dtype)
            assert (ptr[dtype], bm, bd) in shipped
            assert bd >= 16 and bm >= 16
    # at run time Triton specialises integer arguments equal to 1 as constexprs (G = 1, M = 1, D = 1...):
    # compile that variant of the smallest fp32 and fp64 configurations too
    for j in [j for j in jobs if j["constexprs"]["BLOCK_D"] == 16 and j["constexprs"]["DOT_PRECISION"] == "ieee"
              and j["signature"]["a_ptr"] in ("*fp32", "*fp64")]:
        ones = ("G", "M", "D", "stride_g", "stride_m")
        jobs.append(dict(j, signature={k: v for k, v in j["signature"].items() if k not in ones},
                         constexprs=dict(j["constexprs"], **dict.fromkeys(ones, 1)), label=j["label"] + " G=M=D=1"))
    errors = aot_compile(jobs, archs=(80, 90))
    assert not errors, "\n".join(errors)


def test_aot_helper_reports_errors():
    """The helper names the failing configuration and the compiler's reason (tl.dot with K = 8)."""
    bad = dict(K.shipped_configs()[0])
    bad["constexprs"] = dict(bad["constexprs"], BLOCK_D=8)
    bad["label"] = "K=8 on purpose"
    errors = aot_compile([bad, dict(bad, signature={"a_ptr": "*fp32"}, label="bad signature")], archs=(90,))
    assert len(errors) == 2
    assert errors[0].startswith("sm_90 K=8 on purpose:") and ">= 16" in errors[0]
    assert "bad signature" in errors[1] and "missing" in errors[1]


# ---------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("G,M,D", [(1, 1, 3), (21, 7, 64), (1, 200, 100), (2, 1000, 256), (1, 4096, 256)])
def test_gpu_parity(gen, G, M, D, dtype):
    a, b = _inputs(gen, G, M, D, dtype, device="cuda")
    _check(a, b, 0.1)


@pytest.mark.gpu
def test_gpu_never_materialises_similarity(gen):
    M, D = 4096, 256
    a, b = _inputs(gen, 1, M, D, torch.float32, device="cuda")
    a.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    kdk.info_nce(a, b, 0.1, backend="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < M * M * 4 // 4, extra  # the reference's S alone is M²·4 bytes (64 MiB)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph(gen):
    a, b = _inputs(gen, 3, 100, 64, torch.float32, device="cuda")

    def f(x, y):
        return kdk.info_nce(x, y, 0.1, backend="triton") * 2.0

    x = a.clone().requires_grad_()
    loss = torch.compile(f, fullgraph=True)(x, b)
    loss.backward()
    want, want_grad = _reference(a, b, 0.1)
    assert abs(loss.item() - 2 * want.item()) < 1e-5 * want.item()
    _assert_grad_close(x.grad, 2 * want_grad, 1e-5)
