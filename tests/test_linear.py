"""fused_linear_distill (docs/fused_linear.md) on every fused backend: equal to the unfused
``logit_distill(F.linear(...))`` in value and in the three gradients for every teacher form × a
representative set of specs × dtypes; uneven chunks; the largest allocation; autocast; tied weights;
torch.compile across the call."""

import pytest
import torch
import torch.nn.functional as F

import kdkernels as kdk
from parity import DEVICE, FUSED, Allocations

pytestmark = pytest.mark.skipif(not FUSED, reason=f"no fused backend can run on {DEVICE} here")

SPECS = {
    "kd": kdk.LogitDistill(temperature=2.0),
    "rev_ce": kdk.LogitDistill(temperature=1.0, divergence="reverse_kl", ce_weight=0.5),
    "jsd_softcap": kdk.LogitDistill(temperature=1.5, divergence=("jsd", 0.4), softcap=(6.0, 4.0)),
    "dkd": kdk.LogitDistill(kd_weight=0.0, decoupled=kdk.Decoupled(1.0, 8.0)),
    "ldrld": kdk.LogitDistill(kd_weight=0.0, relation=kdk.RankRelation(k=3)),
    "topkd": kdk.LogitDistill(teacher_topk_scale=kdk.TopKScale(k=2), tdl=kdk.TopKDecoupled(k=2)),
    "topk_tail_none": kdk.LogitDistill(temperature=1.0, teacher_topk=kdk.TopK(4, "tail"), reduction="none"),
}
SPARSE_SPECS = {
    "renorm": (kdk.LogitDistill(temperature=2.0), "renorm"),
    "renorm_jsd_sum": (kdk.LogitDistill(temperature=2.0, divergence=("jsd", 0.5), reduction="sum"), "renorm"),
    "tail_ce": (kdk.LogitDistill(temperature=1.0, ce_weight=0.3), "tail"),
    "teacher_none": (kdk.LogitDistill(temperature=1.0, reduction="none"), "teacher"),
}
TOL = {torch.float64: 1e-12, torch.float32: 1e-4, torch.bfloat16: 1e-2}
#: bf16 ∂hidden = g_bf16 @ W_bf16 as the unfused bf16 model's autograd computes it (the logits' gradient rounded
#: to bf16 first, then a bf16 matmul): looser than the float32-accumulated weight gradient
BF16_HIDDEN_TOL = 2e-2


def problem(gen, N=10, H=12, V=40, dtype=torch.float64, bias=True):
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)
    h, W = rnd(N, H), rnd(V, H, scale=0.7)
    b = rnd(V, scale=0.5) if bias else None
    y = torch.randint(0, V, (N,), generator=gen).to(DEVICE)
    y[1] = -100
    return h, W, b, y


def model_logits(h, W, b):
    """The unfused model's logits ``F.linear(h, W, b)`` in the inputs' dtype (bf16 logits are rounded to bf16,
    as the model computes them), carried to float64 with the float64 chain rule for the gradients."""
    z64 = F.linear(h.double(), W.double(), b.double() if b is not None else None)
    z = F.linear(h, W, b).double().detach()
    return z + (z64 - z64.detach())


def grads(fn, h, W, b):
    leaves = [x.detach().clone().requires_grad_(True) for x in (h, W) + ((b,) if b is not None else ())]
    loss = fn(*leaves)
    return (loss.detach(),) + torch.autograd.grad(loss.sum(), leaves)


def assert_equal_to_unfused(got, want, dtype, what):
    for name, a, c in zip(("loss", "d_hidden", "d_weight", "d_bias"), got, want):
        tol = BF16_HIDDEN_TOL if dtype == torch.bfloat16 and name == "d_hidden" else TOL[dtype]
        a, c = a.double(), c.double()
        finite = torch.isfinite(c)
        assert torch.equal(finite, torch.isfinite(a)), f"{what} {name}: finiteness differs"
        if not finite.any():
            continue
        if dtype == torch.bfloat16:  # relative error in norm (the elements carry bf16 roundings of their own)
            err = float((a - c)[finite].norm() / c[finite].norm().clamp(min=1e-6))
        else:  # relative to the largest entry
            err = float((a - c)[finite].abs().max() / c[finite].abs().max().clamp(min=1e-6))
        assert err <= tol, f"{what} {name}: relative error {err:.3e} > {tol}"


def _teacher(form, gen, h, W, V, dtype):
    N = h.shape[0]
    if form == "logits":
        return kdk.TeacherLogits((torch.randn(N, V, generator=gen, dtype=torch.float64) * 2).to(dtype).to(DEVICE))
    Ht = 7
    return kdk.TeacherHidden(torch.randn(N, Ht, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE),
                             torch.randn(V, Ht, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE),
                             torch.randn(V, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE))


def _cases():
    for form in ("logits", "hidden"):
        for name in SPECS:
            yield pytest.param(form, name, torch.float64, id=f"{form}-{name}-fp64")
    # bf16 with dense teacher logits: a hidden teacher's bf16 logits computed chunk by chunk may round
    # differently (by an ulp) from the reference's one full matmul, which moves the bf16 gradient by ~1 %
    for name in ("kd", "rev_ce", "topk_tail_none"):
        yield pytest.param("hidden", name, torch.float32, id=f"hidden-{name}-fp32")
        yield pytest.param("logits", name, torch.bfloat16, id=f"logits-{name}-bf16")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("form,name,dtype", list(_cases()))
def test_equals_unfused(backend, form, name, dtype, gen):
    h, W, b, y = problem(gen, dtype=dtype)
    teacher = _teacher(form, gen, h, W, W.shape[0], dtype)
    spec = SPECS[name]

    def unfused(h, W, b):
        t = teacher.logits if form == "logits" else F.linear(teacher.hidden, teacher.weight, teacher.bias)
        return kdk.logit_distill(model_logits(h, W, b), t.double(), y, spec, backend="reference")

    got = grads(lambda h, W, b: kdk.fused_linear_distill(h, W, teacher, y, spec, student_bias=b, chunk_size=3,
                                                         backend=backend), h, W, b)
    assert got[2].dtype == dtype and got[1].dtype == dtype
    assert_equal_to_unfused(got, grads(unfused, h, W, b), dtype, f"{backend} {form} {name}")


def sparse(gen, N, V, K, normalize):
    lp = F.log_softmax(torch.randn(N, V, generator=gen, dtype=torch.float64) * 2, -1)
    ids = torch.stack([torch.randperm(V, generator=gen)[:K] for _ in range(N)])
    logprobs = lp.gather(-1, ids)
    ids[0, -2:] = -1
    return kdk.SparseTeacher(ids.to(DEVICE), logprobs.to(DEVICE), normalize)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", list(SPARSE_SPECS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_sparse_teacher_equals_unfused(backend, name, dtype, gen):
    """renorm without CE computes the student logits at the K ids only (gathered weight rows)."""
    h, W, b, y = problem(gen, dtype=dtype)
    spec, normalize = SPARSE_SPECS[name]
    teacher = sparse(gen, h.shape[0], W.shape[0], 6, normalize)

    def unfused(h, W, b):
        return kdk.logit_distill(model_logits(h, W, b), teacher, y, spec, backend="reference")

    got = grads(lambda h, W, b: kdk.fused_linear_distill(h, W, teacher, y, spec, student_bias=b, chunk_size=4,
                                                         backend=backend), h, W, b)
    assert_equal_to_unfused(got, grads(unfused, h, W, b), dtype, f"{backend} sparse {name}")


@pytest.mark.parametrize("backend", FUSED)
def test_leading_dims_no_bias_and_chunk_choices(backend, gen):
    h, W, _, y = problem(gen, N=12, bias=False)
    h3, y3 = h.reshape(3, 4, -1), y.reshape(3, 4)
    t = torch.randn(3, 4, W.shape[0], generator=gen, dtype=torch.float64).to(DEVICE)
    spec = kdk.LogitDistill(temperature=2.0, ce_weight=0.2, reduction="none")
    want = kdk.logit_distill(F.linear(h3, W), t, y3, spec, backend="reference")
    for chunk in (None, 1, 5, 12, 100):
        got = kdk.fused_linear_distill(h3, W, t, y3, spec, chunk_size=chunk, backend=backend)
        assert got.shape == (3, 4)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("form", ["logits", "hidden", "sparse_renorm"])
def test_largest_allocation_is_a_chunk_not_n_by_v(backend, form, gen):
    """No tensor of N × V elements is ever allocated: the largest is O(chunk · V + V · H)."""
    N, H, V, chunk = 64, 8, 96, 8
    h, W, b, y = problem(gen, N=N, H=H, V=V, dtype=torch.float32)
    if form == "sparse_renorm":
        teacher = sparse(gen, N, V, 5, "renorm")
        teacher = kdk.SparseTeacher(teacher.ids, teacher.logprobs.float(), "renorm")
    else:
        teacher = _teacher(form, gen, h, W, V, torch.float32)
    hh, WW, bb = (x.clone().requires_grad_(True) for x in (h, W, b))
    with Allocations() as rec:
        loss = kdk.fused_linear_distill(hh, WW, teacher, y, kdk.LogitDistill(temperature=1.0), student_bias=bb,
                                        chunk_size=chunk, backend=backend)
        loss.backward()
    assert rec.largest <= max(chunk * V, V * H), (rec.largest, N * V)
    assert rec.largest < N * V


@pytest.mark.parametrize("backend", FUSED)
def test_tied_weights_and_module(backend, gen):
    """The lm_head tied to the embedding: both uses accumulate into one gradient, as in the unfused model."""
    V, H = 30, 8
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        gen.manual_seed(1234)
        emb = torch.nn.Embedding(V, H).double().to(DEVICE)
        tokens = torch.randint(0, V, (2, 5), generator=gen).to(DEVICE)
        teacher = torch.randn(2, 5, V, generator=gen, dtype=torch.float64).to(DEVICE)
        hidden = torch.tanh(emb(tokens))
        labels = tokens.clone()
        if fused:
            loss = kdk.nn.FusedLinearDistillLoss(kdk.LogitDistill(temperature=1.0), chunk_size=4, backend=backend)(
                hidden, emb.weight, teacher, labels)
        else:
            loss = kdk.logit_distill(hidden @ emb.weight.t(), teacher, labels, kdk.LogitDistill(temperature=1.0),
                                     backend="reference")
        loss.backward()
        results.append((loss.detach(), emb.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("backend", FUSED)
def test_autocast(backend, gen):
    """Under CPU autocast (bf16) the matmuls run in bf16 like F.linear does; the loss matches the unfused one."""
    if DEVICE.type != "cpu":
        pytest.skip("CPU autocast")
    h, W, b, y = problem(gen, dtype=torch.float32)
    t = torch.randn(h.shape[0], W.shape[0], generator=gen).to(DEVICE)
    spec = kdk.LogitDistill(temperature=1.0)
    out = []
    for fused in (True, False):
        hh, WW = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (kdk.fused_linear_distill(hh, WW, t, y, spec, chunk_size=4, backend=backend) if fused else
                    kdk.logit_distill(F.linear(hh, WW), t, y, spec, backend="reference"))
        loss.backward()
        out.append((loss.detach().float(), hh.grad, WW.grad))
    assert out[0][2].dtype == torch.float32
    for a, c in zip(out[0], out[1]):
        assert float((a.float() - c.float()).abs().max() / c.float().abs().max()) <= 2e-2


@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_across_the_call(backend, gen):
    """A compiled training step that calls fused_linear_distill (a graph-break boundary) gives the eager
    result."""
    h, W, b, y = problem(gen, dtype=torch.float32)
    t = torch.randn(h.shape[0], W.shape[0], generator=gen).to(DEVICE)
    proj = torch.nn.Linear(h.shape[1], h.shape[1]).to(DEVICE)

    def step(x):
        return kdk.fused_linear_distill(torch.tanh(proj(x)), W, t, y, kdk.LogitDistill(temperature=2.0),
                                        chunk_size=4, backend=backend) * 3.0

    torch.testing.assert_close(torch.compile(step, backend="aot_eager")(h), step(h), rtol=1e-5, atol=1e-6)


def test_validation():
    h, W = torch.randn(4, 8), torch.randn(20, 8)
    with pytest.raises(ValueError, match="must agree in H"):
        kdk.fused_linear_distill(h, torch.randn(20, 7), torch.randn(4, 20))
    with pytest.raises(ValueError, match="teacher logits must have shape"):
        kdk.fused_linear_distill(h, W, torch.randn(4, 21))
    with pytest.raises(TypeError, match="teacher must be"):
        kdk.fused_linear_distill(h, W, "teacher")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        kdk.fused_linear_distill(h, W, torch.randn(4, 20), chunk_size=0)
    with pytest.raises(ValueError, match="contrastive"):
        kdk.fused_linear_distill(h, W, torch.randn(4, 20), spec=kdk.LogitDistill(contrastive_weight=1.0))
    with pytest.raises(ValueError, match="teacher weight has"):
        kdk.fused_linear_distill(h, W, kdk.TeacherHidden(torch.randn(4, 3), torch.randn(21, 3)))
    assert kdk.linear.default_chunk_size(100000, 128000, 2, True) == 1024
