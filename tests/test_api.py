"""The public API: drop-in signatures, nn modules, backend selection, `python -m kdkernels.info`, spec packing."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdkernels as kdk
from kdkernels import dispatch
from kdkernels import nn as knn
from kdkernels.spec import FLOAT_FIELDS, INT_FIELDS, Decoupled, LogitDistill, RankRelation, TopKDecoupled, TopKScale

R = "reference"
DT = torch.float64
ROOT = Path(__file__).resolve().parents[1]
P = inspect.Parameter


def close(a, b, tol=1e-12):
    a, b = torch.as_tensor(a, dtype=DT), torch.as_tensor(b, dtype=DT)
    assert a.shape == b.shape
    err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-300)
    assert err <= tol, f"relative error {err:.3e}"


def data(gen, N=5, C=9):
    s = torch.randn(N, C, generator=gen, dtype=DT) * 2
    t = torch.randn(N, C, generator=gen, dtype=DT) * 2
    y = torch.randint(0, C, (N,), generator=gen)
    return s, t, y


def loss_grad(fn, s):
    x = s.detach().clone().requires_grad_(True)
    loss = fn(x)
    g, = torch.autograd.grad(loss, x)
    return loss.detach(), g


# ------------------------------------------------------------------------------------------------
# signatures
# ------------------------------------------------------------------------------------------------
def _params(fn):
    return list(inspect.signature(fn).parameters.values())


def _positional(fn):
    return [p for p in _params(fn) if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]


def test_kd_loss_signature_drops_in_for_mdistiller():
    # mdistiller: kd_loss(logits_student, logits_teacher, temperature)
    pos = _positional(kdk.kd_loss)
    assert len(pos) == 3
    assert pos[2].name == "temperature" and pos[2].default == 4.0
    assert pos[0].default is P.empty and pos[1].default is P.empty
    kw_only = {p.name: p.default for p in _params(kdk.kd_loss) if p.kind is P.KEYWORD_ONLY}
    for name, default in dict(labels=None, ignore_index=-100, reduction="batchmean", standardize=False,
                              ce_weight=0.0, teacher_topk_scale=None, backend="auto").items():
        assert name in kw_only and kw_only[name] == default, name


def test_dkd_loss_signature_drops_in_for_mdistiller():
    # mdistiller: dkd_loss(logits_student, logits_teacher, target, alpha, beta, temperature)
    pos = _positional(kdk.dkd_loss)
    assert len(pos) == 6
    assert pos[2].default is P.empty  # labels are required
    assert [(p.name, p.default) for p in pos[3:]] == [("alpha", 1.0), ("beta", 8.0), ("temperature", 4.0)]
    kw_only = {p.name for p in _params(kdk.dkd_loss) if p.kind is P.KEYWORD_ONLY}
    assert {"ignore_index", "reduction", "standardize", "ce_weight", "teacher_topk_scale", "backend"} <= kw_only


def test_positional_calls_equal_keyword_calls(gen):
    s, t, y = data(gen)
    close(kdk.kd_loss(s, t, 2.5, backend=R), kdk.kd_loss(s, t, temperature=2.5, backend=R), 0)
    close(kdk.dkd_loss(s, t, y, 2.0, 5.0, 3.0, backend=R),
          kdk.dkd_loss(s, t, y, alpha=2.0, beta=5.0, temperature=3.0, backend=R), 0)
    # the mdistiller formula: KL(p‖q)·T² summed over classes, mean over the batch
    T = 2.5
    p, lq = torch.softmax(t / T, -1), torch.log_softmax(s / T, -1)
    mdist = (p * (torch.log(p) - lq)).sum(1).mean() * T ** 2
    close(kdk.kd_loss(s, t, T, backend=R), mdist, 1e-12)


@pytest.mark.parametrize("fn,positional", [
    (kdk.dtkd_loss, [("temperature", 4.0), ("alpha", 3.0), ("beta", 1.0)]),
    (kdk.ldrld_loss, [("k", 7), ("temperature", 4.0), ("alpha", 10.5), ("beta", 7.0)]),
    (kdk.topkd_loss, [("labels", None), ("k", 5), ("temperature", 4.0)]),
    (kdk.aekt_loss, [(None, P.empty), ("alpha", 1.0), ("beta", 8.0), ("temperature", 4.0)]),
])
def test_method_signatures_and_defaults(fn, positional):
    pos = _positional(fn)
    assert len(pos) == 2 + len(positional)
    for p, (name, default) in zip(pos[2:], positional):
        if name is not None:
            assert p.name == name
        assert p.default == default or (p.default is default)


def test_keyword_defaults_of_losses_md():
    kw = {p.name: p.default for p in _params(kdk.ldrld_loss)}
    assert (kw["rank_by"], kw["eps"], kw["delta"], kw["lam"]) == ("student", 1.5, 2.0, 0.05)
    kw = {p.name: p.default for p in _params(kdk.topkd_loss)}
    assert (kw["scale"], kw["shift"], kw["gt_scale"], kw["kd_weight"], kw["tdl_weight"],
            kw["tdl_weights"], kw["contrastive_weight"]) == (0.5, 0.5, 0.5, 1.0, 1.0, (1.0, 1.0, 1.0), 0.0)
    kw = {p.name: p.default for p in _params(kdk.aekt_loss)}
    assert kw["max_weight"] == 10.0
    kw = {p.name: p.default for p in _params(kdk.info_nce)}
    assert list(kw)[:3] == ["a", "b", "tau"] and kw["tau"] == 0.1
    kw = {p.name: p.default for p in _params(kdk.msd_contrastive_loss)}
    assert list(kw)[:3] == ["f_s", "f_t", "scales"]
    assert (kw["scales"], kw["tau"], kw["sample_weight"], kw["feature_weight"]) == ((1, 2, 4), 0.1, 1.0, 1.0)
    assert (TopKScale().k, TopKScale().scale, TopKScale().shift, TopKScale().gt_scale) == (5, 0.5, 0.5, 0.5)
    rel = RankRelation()
    assert (rel.k, rel.alpha, rel.beta, rel.rank_by, rel.eps, rel.delta, rel.lam) == \
        (7, 10.5, 7.0, "student", 1.5, 2.0, 0.05)
    assert (Decoupled().alpha, Decoupled().beta, Decoupled().max_weight) == (1.0, 8.0, 10.0)


def test_public_names():
    for name in kdk.__all__:
        assert hasattr(kdk, name), name
    assert kdk.BACKENDS == ("auto", "reference", "triton", "cuda", "cpu")
    for name in ("KDLoss", "DKDLoss", "AEKTLoss", "DTKDLoss", "LDRLDLoss", "TopKDLoss", "LogitDistillLoss",
                 "InfoNCELoss", "MSDContrastiveLoss", "TaskSerialization", "LearnableTemperature"):
        assert issubclass(getattr(knn, name), torch.nn.Module), name


# ------------------------------------------------------------------------------------------------
# nn modules == functional forms
# ------------------------------------------------------------------------------------------------
MODULE_CASES = [
    ("kd", lambda: knn.KDLoss(temperature=3.0, backend=R),
     lambda s, t, y: kdk.kd_loss(s, t, 3.0, backend=R), False),
    ("kd_labels", lambda: knn.KDLoss(temperature=2.0, ce_weight=0.3, backend=R),
     lambda s, t, y: kdk.kd_loss(s, t, 2.0, labels=y, ce_weight=0.3, backend=R), True),
    ("dkd", lambda: knn.DKDLoss(alpha=2.0, beta=4.0, temperature=3.0, backend=R),
     lambda s, t, y: kdk.dkd_loss(s, t, y, 2.0, 4.0, 3.0, backend=R), True),
    ("aekt", lambda: knn.AEKTLoss(max_weight=4.0, backend=R),
     lambda s, t, y: kdk.aekt_loss(s, t, y, max_weight=4.0, backend=R), True),
    ("dtkd", lambda: knn.DTKDLoss(temperature=2.0, alpha=1.5, backend=R),
     lambda s, t, y: kdk.dtkd_loss(s, t, 2.0, 1.5, backend=R), False),
    ("ldrld", lambda: knn.LDRLDLoss(k=3, rank_by="teacher", backend=R),
     lambda s, t, y: kdk.ldrld_loss(s, t, 3, rank_by="teacher", backend=R), False),
    ("topkd", lambda: knn.TopKDLoss(k=2, temperature=2.0, backend=R),
     lambda s, t, y: kdk.topkd_loss(s, t, y, 2, 2.0, backend=R), True),
    ("spec", lambda: knn.LogitDistillLoss(LogitDistill(temperature=2.0, ce_weight=0.5,
                                                       decoupled=Decoupled(alpha=0.5, beta=2.0)), backend=R),
     lambda s, t, y: kdk.logit_distill(s, t, y, LogitDistill(temperature=2.0, ce_weight=0.5,
                                                             decoupled=Decoupled(alpha=0.5, beta=2.0)), backend=R),
     True),
]


@pytest.mark.parametrize("name,make,fn,labels", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_logit_modules_equal_functional(gen, name, make, fn, labels):
    s, t, y = data(gen)
    mod = make()
    l1, g1 = loss_grad(lambda x: mod(x, t, y) if labels else mod(x, t), s)
    l2, g2 = loss_grad(lambda x: fn(x, t, y), s)
    close(l1, l2, 0)
    close(g1, g2, 0)
    assert isinstance(repr(mod), str)


def test_ignore_mask_through_modules(gen):
    s, t, y = data(gen)
    y = y.clone()
    y[1] = -100
    close(knn.KDLoss(backend=R)(s, t, y), kdk.kd_loss(s, t, labels=y, backend=R), 0)
    close(knn.LDRLDLoss(k=3, backend=R)(s, t, labels=y), kdk.ldrld_loss(s, t, 3, labels=y, backend=R), 0)


def test_dkd_module_warmup(gen):
    s, t, y = data(gen)
    base = kdk.dkd_loss(s, t, y, backend=R)
    mod = knn.DKDLoss(warmup=20, backend=R)
    close(mod(s, t, y, epoch=5), 0.25 * base, 1e-15)
    close(mod(s, t, y, epoch=20), base, 0)
    close(mod(s, t, y, epoch=45), base, 0)
    close(mod(s, t, y), base, 0)
    close(knn.DKDLoss(backend=R)(s, t, y, epoch=1), base, 0)
    _, g = loss_grad(lambda x: mod(x, t, y, epoch=4), s)
    _, g0 = loss_grad(lambda x: kdk.dkd_loss(x, t, y, backend=R), s)
    close(g, 0.2 * g0, 1e-14)


def test_contrastive_modules_equal_functional(gen):
    a, b = torch.randn(2, 5, 4, generator=gen, dtype=DT), torch.randn(2, 5, 4, generator=gen, dtype=DT)
    close(knn.InfoNCELoss(tau=0.3, backend=R)(a, b), kdk.info_nce(a, b, 0.3, backend=R), 0)
    fs = torch.randn(3, 4, 4, 4, generator=gen, dtype=DT)
    ft = torch.randn(3, 4, 4, 4, generator=gen, dtype=DT)
    mod = knn.MSDContrastiveLoss(scales=(1, 2), tau=0.2, sample_weight=0.5, feature_weight=2.0, backend=R)
    l1, g1 = loss_grad(lambda x: mod(x, ft), fs)
    l2, g2 = loss_grad(lambda x: kdk.msd_contrastive_loss(x, ft, (1, 2), 0.2, 0.5, 2.0, backend=R), fs)
    close(l1, l2, 0)
    close(g1, g2, 0)


def test_task_serialization_is_identity_at_init(gen):
    C = 7
    mod = knn.TaskSerialization(C)
    assert isinstance(mod.fc, torch.nn.Linear) and mod.fc.in_features == C and mod.fc.out_features == C
    x = torch.randn(4, C, generator=gen)
    assert torch.equal(mod(x), x)
    assert torch.equal(mod.fc.weight, torch.eye(C)) and torch.equal(mod.fc.bias, torch.zeros(C))
    assert all(p.requires_grad for p in mod.parameters())
    # CE on its output trains it; AEKT on the logits before it does not touch it
    y = torch.randint(0, C, (4,), generator=gen)
    torch.nn.functional.cross_entropy(mod(x), y).backward()
    assert mod.fc.weight.grad.abs().sum() > 0


def test_learnable_temperature_module(gen):
    mod = knn.LearnableTemperature(init=4.0, t_min=1.0, t_max=21.0)
    T = mod()
    assert T.dim() == 0 and 1.0 < T.item() < 21.0
    assert abs(T.item() - 4.0) < 1e-5
    T.backward()
    sig = torch.sigmoid(mod.theta.detach())
    # gradient reversal: θ receives −λ·dT/dθ
    close(mod.theta.grad, -(21.0 - 1.0) * sig * (1 - sig), 1e-6)
    mod.theta.grad = None
    mod(lam=0.3).backward()
    close(mod.theta.grad, -0.3 * 20.0 * sig * (1 - sig), 1e-6)
    # inside kd_loss: θ receives −λ·(∂ℓ/∂T)·(dT/dθ)
    s, t, _ = data(gen)
    s, t = s.float(), t.float()
    mod.theta.grad = None
    T = mod(lam=0.5)
    T.retain_grad()
    kdk.kd_loss(s, t, T, backend=R).backward()
    close(mod.theta.grad, -0.5 * T.grad * 20.0 * sig * (1 - sig), 1e-5)
    assert T.grad.abs() > 0
    # range
    for init in (1.0, 21.0, 0.5):
        with pytest.raises(ValueError, match=r"init must lie in \(t_min, t_max\)"):
            knn.LearnableTemperature(init=init)
    big = knn.LearnableTemperature(init=2.0, t_min=1.5, t_max=3.0)
    with torch.no_grad():
        big.theta.fill_(50.0)
    assert 1.5 <= big().item() <= 3.0


# ------------------------------------------------------------------------------------------------
# backends: python -m kdkernels.info, KDKERNELS_BACKEND
# ------------------------------------------------------------------------------------------------
def test_info_module_lists_backends_with_reasons():
    env = dict(os.environ)
    env.pop("KDKERNELS_BACKEND", None)
    out = subprocess.run([sys.executable, "-m", "kdkernels.info"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for name in ("reference", "triton", "cuda", "cpu"):
        assert f" {name} " in text, name
    lines = [ln for ln in text.splitlines() if ln.strip()]
    ref_lines = [ln for ln in lines if " reference " in ln]
    assert ref_lines and all(ln.rstrip().endswith("available") and "unavailable" not in ln for ln in ref_lines)
    for ln in lines:
        if "unavailable" in ln:
            reason = ln.split("unavailable:", 1)[1].strip()
            assert len(reason) > 5, ln
    # on this CPU-only machine nothing else runs the logit kernels without the extension / interpreter
    for name in ("triton", "cuda", "cpu"):
        assert any(f" {name} " in ln for ln in lines if "available" in ln), name


def test_env_backend_is_honoured(gen, monkeypatch):
    s, t, y = data(gen)
    monkeypatch.setenv("KDKERNELS_BACKEND", "reference")
    assert dispatch.resolve("auto", torch.device("cpu")) == "reference"
    assert dispatch.resolve(None, torch.device("cpu")) == "reference"
    close(kdk.kd_loss(s, t), kdk.kd_loss(s, t, backend=R), 0)
    monkeypatch.setenv("KDKERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"unknown backend 'bogus'"):
        kdk.kd_loss(s, t)
    monkeypatch.setenv("KDKERNELS_BACKEND", "cuda")  # never runs CPU tensors
    with pytest.raises(kdk.BackendUnavailableError, match=r"backend 'cuda' cannot run on cpu"):
        kdk.kd_loss(s, t)
    # an explicit backend= wins over the environment
    close(kdk.kd_loss(s, t, backend=R), kdk.kd_loss(s, t, 4.0, backend="reference"), 0)
    assert dispatch.resolve("reference", torch.device("cpu")) == "reference"


# ------------------------------------------------------------------------------------------------
# the spec's flat layout
# ------------------------------------------------------------------------------------------------
def test_pack_lengths_and_values():
    assert len(set(FLOAT_FIELDS)) == len(FLOAT_FIELDS) and len(set(INT_FIELDS)) == len(INT_FIELDS)
    specs = [
        LogitDistill(),
        LogitDistill(temperature=2.5, kd_weight=0.0, ce_weight=0.3, standardize=True,
                     teacher_topk_scale={"k": 3, "scale": 0.2}, decoupled=Decoupled(2.0, 3.0, True, 5.0),
                     dtkd_weight=1.5, relation=RankRelation(k=4, rank_by="teacher"),
                     tdl=TopKDecoupled(k=2, weight=0.7, pos=0.1, neg=0.2, non=0.3), ignore_index=-1),
        LogitDistill(temperature=torch.tensor(3.0)),
    ]
    for spec in specs:
        floats, ints = spec.pack()
        assert len(floats) == len(FLOAT_FIELDS) and len(ints) == len(INT_FIELDS)
        assert all(isinstance(v, float) for v in floats) and all(isinstance(v, int) for v in ints)
    f = dict(zip(FLOAT_FIELDS, specs[1].pack()[0]))
    i = dict(zip(INT_FIELDS, specs[1].pack()[1]))
    assert f["temperature"] == 2.5 and f["kd_weight"] == 0.0 and f["ce_weight"] == 0.3
    assert (f["tckd_weight"], f["nckd_weight"], f["max_weight"]) == (2.0, 3.0, 5.0)
    assert f["dtkd_weight"] == 1.5 and (f["local_weight"], f["rest_weight"]) == (10.5, 7.0)
    assert (f["rel_eps"], f["rel_delta"], f["rel_lambda"]) == (1.5, 2.0, 0.05)
    assert (f["tdl_weight"], f["tdl_pos"], f["tdl_neg"], f["tdl_non"]) == (0.7, 0.1, 0.2, 0.3)
    assert (f["tsm_scale"], f["tsm_shift"], f["tsm_gt_scale"]) == (0.2, 0.5, 0.5)
    assert i == dict(ignore_index=-1, standardize=1, use_tsm=1, tsm_k=3, use_decoupled=1, adaptive_tckd=1,
                     use_relation=1, rel_k=4, rank_by_teacher=1, use_tdl=1, tdl_k=2, reduction=2,
                     divergence=0, topk_mode=0, topk_k=1, topk_norm=0)
    assert f["loss_weight"] == 1.0 and (f["div_param"], f["softcap_s"], f["softcap_t"]) == (0.0, 0.0, 0.0)
    llm = LogitDistill(temperature=1.0, divergence=("jsd", 0.25), teacher_topk=kdk.TopK(5, "tail"),
                       softcap=(30.0, None))
    f1, i1 = (dict(zip(names, values)) for names, values in zip((FLOAT_FIELDS, INT_FIELDS), llm.pack()))
    assert (f1["div_param"], f1["softcap_s"], f1["softcap_t"]) == (0.25, 30.0, 0.0)
    assert (i1["divergence"], i1["topk_mode"], i1["topk_k"], i1["topk_norm"]) == (2, 1, 5, 1)
    i2 = dict(zip(INT_FIELDS, LogitDistill(temperature=1.0).pack(sparse=("teacher", 64))[1]))
    assert (i2["topk_mode"], i2["topk_k"], i2["topk_norm"]) == (2, 64, 2)
    f0 = dict(zip(FLOAT_FIELDS, specs[0].pack()[0]))
    i0 = dict(zip(INT_FIELDS, specs[0].pack()[1]))
    assert f0["temperature"] == 4.0 and f0["kd_weight"] == 1.0
    assert f0["tckd_weight"] == 0.0 and f0["nckd_weight"] == 0.0 and f0["tdl_weight"] == 0.0
    assert f0["local_weight"] == 0.0 and f0["rest_weight"] == 0.0
    assert (i0["use_tsm"], i0["use_decoupled"], i0["use_relation"], i0["use_tdl"], i0["standardize"]) == (0,) * 5
    assert i0["ignore_index"] == -100

