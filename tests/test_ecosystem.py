"""kdkernels in real training code (issue 16): modules that are real modules, torch.func over the fused
contrastive Function, the normalisation conventions of the peer libraries (README "Using kdkernels in
training"), and the ``value=`` option of the spec. Compile with dynamic shapes: tests/test_compile.py.

Every numeric check is float64 on fresh seeded inputs against the reference or an independent
transcription written here. The whole file runs in ~20 s on 2 cores (the Triton torch.func cases need
``TRITON_INTERPRET=1``; ~5 s).
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kdkernels as kdk
from kdkernels import nn as knn
from kdkernels import reference
from kdkernels.dispatch import unavailable_reason
from kdkernels.spec import INT_FIELDS, LogitDistill

R = "reference"
DT = torch.float64

LOGIT_MODULES = [knn.KDLoss, knn.DKDLoss, knn.AEKTLoss, knn.DTKDLoss, knn.LDRLDLoss, knn.TopKDLoss]
#: module → (its functional form, positional settings to construct with, labels needed)
POSITIONAL = {
    knn.KDLoss: (kdk.kd_loss, (2.0,), False),
    knn.DKDLoss: (kdk.dkd_loss, (2.0, 4.0, 3.0), True),
    knn.AEKTLoss: (kdk.aekt_loss, (0.5, 4.0, 2.0), True),
    knn.DTKDLoss: (kdk.dtkd_loss, (2.0, 1.5, 0.5), False),
    knn.LDRLDLoss: (kdk.ldrld_loss, (3, 2.0, 5.0, 2.0), False),
    knn.TopKDLoss: (kdk.topkd_loss, (2, 2.0), True),
}


def _close(got, want, tol=1e-12):
    got, want = torch.as_tensor(got, dtype=DT), torch.as_tensor(want, dtype=DT)
    assert got.shape == want.shape
    err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-300)
    assert err <= tol, f"relative error {err:.3e}"


def _data(gen, N=6, C=9):
    s = torch.randn(N, C, generator=gen, dtype=DT) * 2
    t = torch.randn(N, C, generator=gen, dtype=DT) * 2
    y = torch.randint(0, C, (N,), generator=gen)
    return s, t, y


def _loss_grad(fn, s):
    x = s.detach().clone().requires_grad_(True)
    loss = fn(x)
    g, = torch.autograd.grad(loss, x)
    return loss.detach(), g


# ------------------------------------------------------------------------------------------------
# modules are real modules (item 3; issue 15)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", LOGIT_MODULES, ids=lambda c: c.__name__)
def test_module_positional_order_is_the_functional_one(gen, cls):
    """``DKDLoss(2.0, 4.0, 3.0)`` is ``dkd_loss(s, t, y, 2.0, 4.0, 3.0)`` (mdistiller's order), etc.;
    the other settings are keyword-only."""
    fn, args, labels = POSITIONAL[cls]
    s, t, y = _data(gen)
    mod = cls(*args, backend=R)
    l1, g1 = _loss_grad(lambda x: mod(x, t, y if labels else None), s)
    l2, g2 = _loss_grad(lambda x: fn(x, t, y, *args, backend=R) if labels else fn(x, t, *args, backend=R), s)
    _close(l1, l2, 0)
    _close(g1, g2, 0)
    fn_params = inspect.signature(fn).parameters.values()
    positional = [p.name for p in fn_params if p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in knn.FORWARD_ARGS]
    signature = inspect.signature(cls)
    assert [p.name for p in signature.parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD] == positional
    assert all(p.kind is p.KEYWORD_ONLY for p in signature.parameters.values() if p.name not in positional)


def test_dkd_first_positional_is_alpha_not_warmup():
    """Before: ``DKDLoss(8.0)`` silently meant ``warmup=8.0`` and the repr hid it."""
    mod = knn.DKDLoss(8.0)
    assert mod.alpha == 8.0 and mod.warmup is None
    assert "alpha=8.0" in repr(mod) and "warmup=None" in repr(mod)


def test_kd_loss_module_takes_the_temperature_positionally(gen):
    """Issue 15: ``KDLoss(4.0)`` failed with an error naming a private class."""
    s, t, _ = _data(gen)
    _close(knn.KDLoss(4.0, backend=R)(s, t), kdk.kd_loss(s, t, 4.0, backend=R), 0)


@pytest.mark.parametrize("cls", LOGIT_MODULES, ids=lambda c: c.__name__)
def test_misspelt_keyword_fails_at_construction(cls):
    with pytest.raises(TypeError, match=rf"{cls.__name__}\(.*unexpected keyword argument 'temprature'.*"
                                        r"did you mean 'temperature'"):
        cls(temprature=2.0)
    with pytest.raises(TypeError, match=rf"{cls.__name__}\(.*too many positional arguments"):
        cls(*range(len(POSITIONAL[cls][1]) + 1))


@pytest.mark.parametrize("cls", LOGIT_MODULES, ids=lambda c: c.__name__)
def test_repr_shows_every_setting_and_docstring_covers_it(cls):
    """``extra_repr`` lists every constructor argument with its value; the docstring names every one
    and has the parts a newcomer needs (formula, Args, shapes, published origin, example)."""
    mod = cls(*POSITIONAL[cls][1])
    text = repr(mod)
    for name, param in inspect.signature(cls).parameters.items():
        assert f"{name}=" in text, name
    for name, value in zip(inspect.signature(cls).parameters, POSITIONAL[cls][1]):
        assert f"{name}={value!r}" in text
    doc = cls.__doc__
    for name in inspect.signature(cls).parameters:
        assert name in doc, f"{cls.__name__} docstring does not describe {name}"
    for part in ("ℓ", "Args:", "Shapes:", "Example::", "reduction"):
        assert part in doc
    assert "Equals" in doc or "[reconstructed]" in doc


def test_topkd_defaults_on_ten_classes_say_what_to_pass(gen):
    """Issue 15: the default k = 5 does not fit C = 10; the error says which argument and which value."""
    s, t, y = _data(gen, C=10)
    with pytest.raises(ValueError, match=r"pass k <= 4, e\.g\. .*kdk\.nn\.TopKDLoss\(4\); or tdl_weight=0"):
        knn.TopKDLoss(backend=R)(s, t, y)
    knn.TopKDLoss(4, backend=R)(s, t, y)  # the advice works


def test_tensor_temperature_is_a_buffer_moved_and_saved(gen):
    s, t, _ = _data(gen)
    mod = knn.KDLoss(torch.tensor(2.0), backend=R)
    assert [name for name, _ in mod.named_buffers()] == ["temperature"]
    assert list(mod.parameters()) == []
    assert torch.equal(mod.state_dict()["temperature"], torch.tensor(2.0))
    assert mod.double().temperature.dtype == DT          # moved by .double() / .to()
    _close(mod(s, t), kdk.kd_loss(s, t, 2.0, backend=R), 1e-15)
    other = knn.KDLoss(torch.tensor(5.0), backend=R)
    other.load_state_dict({"temperature": torch.tensor(2.0)})
    _close(other(s, t), kdk.kd_loss(s, t, 2.0, backend=R), 1e-7)
    assert "temperature=tensor(2)" in repr(other)


def test_learnable_temperature_is_a_parameter(gen):
    s, t, _ = _data(gen)
    mod = knn.KDLoss(torch.tensor(3.0, dtype=DT, requires_grad=True), backend=R)
    assert [name for name, _ in mod.named_parameters()] == ["temperature"]
    mod(s, t).backward()
    T = torch.tensor(3.0, dtype=DT, requires_grad=True)
    kdk.kd_loss(s, t, T, backend=R).backward()
    _close(mod.temperature.grad, T.grad, 1e-14)
    assert "learnable" in repr(mod)
    given = torch.nn.Parameter(torch.tensor(2.0))
    assert knn.DTKDLoss(given).temperature is given      # the caller's parameter, not a copy
    with pytest.raises(ValueError, match=r"KDLoss: temperature is the result of a computation"):
        knn.KDLoss(torch.tensor(2.0, requires_grad=True) * 1.5)


def test_logit_distill_module_registers_the_spec_temperature(gen):
    s, t, y = _data(gen)
    spec = LogitDistill(temperature=torch.tensor(2.0), ce_weight=0.5)
    mod = knn.LogitDistillLoss(spec, backend=R)
    assert "temperature" in mod.state_dict()
    mod.double()
    _close(mod(s, t, y), kdk.logit_distill(s, t, y, LogitDistill(temperature=2.0, ce_weight=0.5), backend=R),
           1e-15)
    with pytest.raises(TypeError):
        knn.LogitDistillLoss(spec, "reference")          # backend is keyword-only


@pytest.mark.parametrize("cls,fn,labels", [(knn.DKDLoss, kdk.dkd_loss, True), (knn.DTKDLoss, kdk.dtkd_loss, False)],
                         ids=["dkd", "dtkd"])
def test_warmup_scales_loss_and_gradient(gen, cls, fn, labels):
    """The recipes' ``min(epoch / warmup, 1)``; DTKD gets the official DTKD's ``warmup``."""
    s, t, y = _data(gen)
    mod = cls(warmup=20, backend=R)
    base = (lambda x: fn(x, t, y, backend=R)) if labels else (lambda x: fn(x, t, backend=R))
    call = (lambda x, e: mod(x, t, y, epoch=e)) if labels else (lambda x, e: mod(x, t, epoch=e))
    l0, g0 = _loss_grad(base, s)
    for epoch, factor in ((5, 0.25), (20, 1.0), (45, 1.0), (None, 1.0)):
        loss, grad = _loss_grad(lambda x: call(x, epoch), s)
        _close(loss, factor * l0, 1e-14)
        _close(grad, factor * g0, 1e-14)
    assert "warmup=20" in repr(mod)
    with pytest.raises(ValueError, match="warmup must be a finite positive number"):
        cls(warmup=0)


def test_warmup_travels_as_loss_weight(gen, monkeypatch):
    """The warm-up is folded into the functional form's ``loss_weight=`` (one fused gradient scale), not
    a multiplication of the returned loss (an extra pass over the gradient in backward)."""
    if "loss_weight" not in inspect.signature(kdk.dkd_loss).parameters:
        pytest.skip("this build's functional forms have no loss_weight= yet")
    s, t, y = _data(gen)
    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return kdk.dkd_loss(*args, **kwargs)
    monkeypatch.setattr(knn.DKDLoss, "fn", staticmethod(spy))
    mod = knn.DKDLoss(1.0, 8.0, 4.0, warmup=20, loss_weight=0.5, backend=R)
    out = mod(s, t, y, epoch=5)
    assert seen["loss_weight"] == 0.5 * 0.25
    _close(out, 0.125 * kdk.dkd_loss(s, t, y, backend=R), 1e-14)


def test_module_compiles_fullgraph_with_its_buffer(gen):
    """A module with a tensor setting inside torch.compile(fullgraph=True). (~5 s)"""
    s, t, y = _data(gen)
    mod = knn.KDLoss(torch.tensor(2.0, dtype=DT), ce_weight=0.5, backend=R)
    torch._dynamo.reset()
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    l1, g1 = _loss_grad(lambda x: compiled(x, t, y), s)
    l2, g2 = _loss_grad(lambda x: mod(x, t, y), s)
    _close(l1, l2, 1e-13)
    _close(g1, g2, 1e-13)


# ------------------------------------------------------------------------------------------------
# torch.func over the fused contrastive Function (item 2)
# ------------------------------------------------------------------------------------------------
TRITON_CPU = unavailable_reason("triton", torch.device("cpu"), family="contrastive") is None


@pytest.mark.parametrize("backend", [R] + (["triton"] if TRITON_CPU else []))
def test_info_nce_torch_func_grad_vmap_jacrev(gen, backend):
    """``torch.func.grad`` equals autograd; ``vmap`` over a batch of groups (one launch forward, one
    backward) equals a loop; ``vmap(grad)`` and ``jacrev`` (a vmapped backward with a batched
    grad_output) too. Before: "must override the setup_context staticmethod"."""
    a = torch.randn(2, 5, 4, generator=gen, dtype=DT)
    b = torch.randn(2, 5, 4, generator=gen, dtype=DT)
    A = torch.randn(3, 2, 5, 4, generator=gen, dtype=DT)
    B = torch.randn(3, 2, 5, 4, generator=gen, dtype=DT)

    def loss(x, y=b):
        return kdk.info_nce(x, y, 0.3, backend=backend)

    def want(x, y=b):
        return reference.info_nce(x, y, 0.3)

    x = a.clone().requires_grad_(True)
    loss(x).backward()
    _close(torch.func.grad(loss)(a), x.grad, 1e-12)
    _close(torch.func.grad(loss)(a), torch.func.grad(want)(a), 1e-10)
    _close(torch.func.vmap(loss)(A), torch.stack([want(A[i]) for i in range(3)]), 1e-12)
    _close(torch.func.vmap(loss)(A, B), torch.stack([want(A[i], B[i]) for i in range(3)]), 1e-12)
    _close(torch.func.vmap(torch.func.grad(loss))(A),
           torch.stack([torch.func.grad(want)(A[i]) for i in range(3)]), 1e-10)
    two = (lambda f: lambda x: torch.stack([f(x), 2.5 * f(x)]))
    _close(torch.func.jacrev(two(loss))(a), torch.func.jacrev(two(want))(a), 1e-10)


@pytest.mark.parametrize("backend", [R] + (["triton"] if TRITON_CPU else []))
def test_msd_contrastive_torch_func(gen, backend):
    """The feature-map loss over the same Function: grad and vmap equal the reference."""
    fs = torch.randn(3, 4, 4, 4, generator=gen, dtype=DT)
    ft = torch.randn(3, 4, 4, 4, generator=gen, dtype=DT)
    batch = torch.randn(2, 3, 4, 4, 4, generator=gen, dtype=DT)

    def loss(x):
        return kdk.msd_contrastive_loss(x, ft, (1, 2), 0.2, 0.5, 2.0, backend=backend)

    def want(x):
        return reference.msd_contrastive_loss(x, ft, (1, 2), 0.2, 0.5, 2.0)
    _close(torch.func.grad(loss)(fs), torch.func.grad(want)(fs), 1e-10)
    _close(torch.func.vmap(loss)(batch), torch.stack([want(f) for f in batch]), 1e-12)


@pytest.mark.skipif(not TRITON_CPU, reason="Triton on CPU needs TRITON_INTERPRET=1 before import")
def test_info_nce_function_has_setup_context():
    from kdkernels._triton.info_nce import InfoNCEFunction
    assert "setup_context" in vars(InfoNCEFunction) and InfoNCEFunction.generate_vmap_rule
    assert "ctx" not in inspect.signature(InfoNCEFunction.forward).parameters


# ------------------------------------------------------------------------------------------------
# the peers' normalisation conventions (item 5; README "Using kdkernels in training")
# ------------------------------------------------------------------------------------------------
def _torchtune_forward_kl(student_logits, teacher_logits, labels, ignore_index=-100, normalize=True):
    """torchtune's ``ForwardKLLoss`` (torchtune/modules/loss/kd_losses.py), written out here: the soft
    cross-entropy ``−Σ p·log q`` at T = 1, masked by labels, divided by the count of valid tokens."""
    teacher_prob = F.softmax(teacher_logits, dim=-1, dtype=torch.float32 if teacher_logits.dtype != DT else DT)
    student_logprob = F.log_softmax(student_logits, dim=-1)
    prod = torch.masked_fill(teacher_prob * student_logprob, torch.isinf(student_logits), 0)
    x = prod.sum(-1).view(-1)
    mask = (labels != ignore_index).view(-1).to(x.dtype)
    if not normalize:
        return -(x * mask).sum()
    return -(x * mask).sum() / mask.sum()


def _trl_forward_kl(student_logits, teacher_logits, labels=None, temperature=1.0):
    """TRL's ``GKDTrainer.generalized_jsd_loss`` with ``beta=0`` (forward KL), ``reduction="batchmean"``:
    no T², masked token sum / #tokens with labels, / batch size B (not B·L) without."""
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    jsd = F.kl_div(s, t, reduction="none", log_target=True)
    if labels is not None:
        mask = labels != -100
        return jsd[mask].sum() / mask.sum()
    return jsd.sum() / jsd.size(0)


def _tokens(gen, B=3, L=5, V=11):
    s = torch.randn(B, L, V, generator=gen, dtype=DT) * 2
    t = torch.randn(B, L, V, generator=gen, dtype=DT) * 2
    labels = torch.randint(0, V, (B, L), generator=gen)
    labels[0, :2] = -100
    labels[-1, -1] = -100
    return s, t, labels


def _teacher_entropy(t, T=1.0):
    logp = torch.log_softmax(t / T, -1)
    return -(logp.exp() * logp).sum(-1)


def test_torchtune_forward_kl_is_kl_plus_teacher_entropy(gen):
    s, t, labels = _tokens(gen)
    mask = (labels != -100).to(DT)
    entropy = (_teacher_entropy(t) * mask).sum() / mask.sum()
    want = _torchtune_forward_kl(s, t, labels)
    _close(kdk.kd_loss(s, t, 1.0, labels=labels, backend=R) + entropy, want, 1e-12)
    _, g1 = _loss_grad(lambda x: kdk.kd_loss(x, t, 1.0, labels=labels, backend=R), s)
    _, g2 = _loss_grad(lambda x: _torchtune_forward_kl(x, t, labels), s)
    _close(g1, g2, 1e-12)                                 # same gradient, different value
    _close(kdk.kd_loss(s, t, 1.0, labels=labels, reduction="sum", backend=R)
           + (_teacher_entropy(t) * mask).sum(), _torchtune_forward_kl(s, t, labels, normalize=False), 1e-12)


def test_trl_forward_kl_convention(gen):
    s, t, labels = _tokens(gen)
    B, T = s.shape[0], 2.0
    with_labels = kdk.kd_loss(s, t, T, labels=labels, loss_weight=1 / T ** 2, backend=R)
    _close(with_labels, _trl_forward_kl(s, t, labels, T), 1e-12)
    label_free = kdk.kd_loss(s, t, T, reduction="sum", loss_weight=1 / (T ** 2 * B), backend=R)
    _close(label_free, _trl_forward_kl(s, t, None, T), 1e-12)
    backends = [b for b in ("cpu", "triton") if unavailable_reason(b, torch.device("cpu")) is None]
    for backend in backends:  # the weight folded into the fused launch: loss and gradient
        loss, grad = _loss_grad(lambda x: kdk.kd_loss(x, t, T, reduction="sum", loss_weight=1 / (T ** 2 * B),
                                                      backend=backend), s)
        want, want_grad = _loss_grad(lambda x: _trl_forward_kl(x, t, None, T), s)
        _close(loss, want, 1e-12)
        _close(grad, want_grad, 1e-12)


def test_num_items_in_batch_is_sum_over_n(gen):
    """HF Trainer's gradient accumulation: each micro-batch's summed token loss / the token count of the
    whole accumulated batch; the accumulated gradient equals one batchmean over all micro-batches."""
    micro = [_tokens(gen) for _ in range(3)]
    num_items_in_batch = sum(int((labels != -100).sum()) for _, _, labels in micro)
    x = [s.clone().requires_grad_(True) for s, _, _ in micro]
    total = sum(kdk.kd_loss(xi, t, 2.0, labels=labels, reduction="sum", backend=R) / num_items_in_batch
                for xi, (_, t, labels) in zip(x, micro))
    total.backward()
    s_all = torch.cat([s for s, _, _ in micro]).requires_grad_(True)
    t_all, l_all = torch.cat([t for _, t, _ in micro]), torch.cat([labels for _, _, labels in micro])
    whole = kdk.kd_loss(s_all, t_all, 2.0, labels=l_all, backend=R)
    whole.backward()
    _close(total, whole, 1e-13)
    _close(torch.cat([xi.grad for xi in x]), s_all.grad, 1e-13)


def test_ddp_uneven_padding_needs_the_global_count(gen):
    """Two ranks with different numbers of valid tokens, DDP averaging the gradients (÷ world size).
    Per-rank batchmean is not the global token mean; ``reduction="sum"`` × world / all-reduced count is."""
    ranks = [_tokens(gen, B=2), _tokens(gen, B=2)]
    ranks[1][2][:, 1:] = -100                             # rank 1: mostly padding
    world = len(ranks)
    count = sum((labels != -100).sum() for _, _, labels in ranks)   # dist.all_reduce(count)
    s_all = torch.cat([s for s, _, _ in ranks]).requires_grad_(True)
    global_mean = kdk.kd_loss(s_all, torch.cat([t for _, t, _ in ranks]), 2.0,
                              labels=torch.cat([labels for _, _, labels in ranks]), backend=R)
    want, = torch.autograd.grad(global_mean, s_all)

    def ddp_grad(rank_loss):
        grads = []
        for s, t, labels in ranks:
            x = s.clone().requires_grad_(True)
            grads.append(torch.autograd.grad(rank_loss(x, t, labels), x)[0])
        return torch.cat(grads) / world                   # DDP all-reduces and averages

    right = ddp_grad(lambda x, t, labels: kdk.kd_loss(x, t, 2.0, labels=labels, reduction="sum",
                                                      backend=R) * world / count)
    _close(right, want, 1e-13)
    wrong = ddp_grad(lambda x, t, labels: kdk.kd_loss(x, t, 2.0, labels=labels, backend=R))
    assert (wrong - want).abs().max() > 1e-3 * want.abs().max()


# ------------------------------------------------------------------------------------------------
# value="cross_entropy" (torchtune's number)
# ------------------------------------------------------------------------------------------------
def test_value_option_is_validated():
    assert LogitDistill().value == "kl"
    with pytest.raises(ValueError, match=r"value must be one of \('kl', 'cross_entropy'\), got 'ce'"):
        LogitDistill(value="ce")
    with pytest.raises(ValueError, match=r"value='cross_entropy' .* also has \['dkd'\]"):
        LogitDistill(value="cross_entropy", decoupled=kdk.Decoupled())
    with pytest.raises(ValueError, match=r"also has \['dtkd'\]"):
        LogitDistill(value="cross_entropy", dtkd_weight=1.0)
    with pytest.raises(ValueError, match=r"not supported with a learnable temperature"):
        LogitDistill(value="cross_entropy", temperature=torch.tensor(2.0, requires_grad=True))


def test_value_cross_entropy_is_torchtunes_number_or_refused(gen):
    """value="cross_entropy" equals torchtune's ForwardKLLoss on every backend here, with the KL's gradient."""
    s, t, labels = _tokens(gen)
    spec = LogitDistill(temperature=1.0, value="cross_entropy")
    backends = [R] + [b for b in ("cpu", "triton") if unavailable_reason(b, torch.device("cpu")) is None]
    _, want_grad = _loss_grad(lambda x: kdk.kd_loss(x, t, 1.0, labels=labels, backend=R), s)
    for backend in backends:
        loss, grad = _loss_grad(lambda x: kdk.logit_distill(x, t, labels, spec, backend=backend), s)
        _close(loss, _torchtune_forward_kl(s, t, labels), 1e-12)
        _close(grad, want_grad, 1e-12)


# ------------------------------------------------------------------------------------------------
# the README section runs
# ------------------------------------------------------------------------------------------------
def test_readme_training_section_examples_run():
    """Every Python example of README "Using kdkernels in training" runs as written (the DDP one needs a
    process group and the compile one is tests/test_compile.py's subject: both skipped here)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Using kdkernels in training", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 4
    ran = 0
    for code in blocks:
        if "torch.distributed" in code or "torch.compile" in code:
            continue
        torch.manual_seed(0)
        exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README's own examples
        ran += 1
    assert ran >= 3
