"""kdkernels.testing: check_spec passes on correct backends and reports a wrong one with its case."""
import math

import pytest
import torch

import kdkernels as kdk
from kdkernels import dispatch, testing
from kdkernels.testing import assert_spec_matches_reference, check_spec

FUSED = [b for b, why in testing.available_backends("cpu").items() if why is None]
#: the cheapest fused backend here (the C++ twin when built; Triton through the interpreter otherwise)
FAST = FUSED[-1] if FUSED else None
needs_fused = pytest.mark.skipif(not FUSED, reason="no fused backend runs here (build kdkernels._C or set "
                                                   "TRITON_INTERPRET=1)")
SHAPES = [(4, 12)]
DTYPES = [torch.float32, torch.float64]
COMPOSED = kdk.LogitDistill(temperature=2.0, standardize=True, ce_weight=0.5,
                            decoupled=kdk.Decoupled(alpha=1.0, beta=4.0),
                            teacher_topk_scale=kdk.TopKScale(k=2))


class WrongLauncher:
    """Wraps a real launcher; for inputs of ``dtype`` it scales the gradient (and, when asked, the loss).
    It has no ``fused_loss`` (the C++ launchers' native autograd path would bypass ``forward``)."""

    fused_loss = None

    def __init__(self, inner, dtype, grad_factor=1.05, loss_factor=1.0):
        self.inner, self.dtype = inner, dtype
        self.grad_factor, self.loss_factor = grad_factor, loss_factor

    def __getattr__(self, name):  # contract version, unavailable_reason, scale_, …
        return getattr(self.inner, name)

    def forward(self, s, t, labels, temperature, spec, grad, *rest):
        loss, dtemp = self.inner.forward(s, t, labels, temperature, spec, grad, *rest)
        if s.dtype == self.dtype:
            if grad is not None:
                grad.mul_(self.grad_factor)
            loss = loss * self.loss_factor
        return loss, dtemp


@pytest.fixture
def wrong_backend(monkeypatch):
    """Install a WrongLauncher in place of backend FAST's launcher; returns a setter."""
    real, _ = dispatch.load_launcher("logit", FAST)

    def install(**kwargs):
        monkeypatch.setitem(dispatch._cache, ("logit", FAST), (WrongLauncher(real, **kwargs), None))
    return install


@needs_fused
def test_a_composed_spec_matches_on_every_backend():
    result = assert_spec_matches_reference(COMPOSED, shapes=[(4, 12), (2, 3, 20)], dtypes=DTYPES)
    assert {c.backend for c in result.passed} == set(FUSED)
    assert any(c.check == "gradcheck" for c in result.passed)
    assert result.ok and not result.mismatches


@needs_fused
def test_learnable_temperature_and_aekt_specs_pass():
    T = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    assert_spec_matches_reference(kdk.LogitDistill(temperature=T, ce_weight=0.3), shapes=SHAPES,
                                  dtypes=DTYPES, backends=[FAST])
    aekt = kdk.LogitDistill(kd_weight=0.0, decoupled=kdk.Decoupled(1.0, 8.0, adaptive=True))
    assert_spec_matches_reference(aekt, shapes=SHAPES, dtypes=DTYPES, backends=[FAST])


@needs_fused
def test_a_wrong_gradient_is_reported_with_its_case(wrong_backend):
    wrong_backend(dtype=torch.float32)
    result = check_spec(COMPOSED, shapes=SHAPES, dtypes=DTYPES, backends=[FAST], seed=7, gradcheck=False)
    assert not result.ok
    assert [(m.what, m.case.dtype, m.case.shape, m.case.seed, m.case.backend) for m in result.mismatches] == \
        [("grad", torch.float32, (4, 12), 7, FAST)]
    assert [c.dtype for c in result.passed] == [torch.float64]  # the correct dtype still passes
    with pytest.raises(AssertionError) as err:
        assert_spec_matches_reference(COMPOSED, shapes=SHAPES, dtypes=DTYPES, backends=[FAST], seed=7,
                                      gradcheck=False)
    message = str(err.value)
    assert f"backend={FAST} shape=(4, 12) dtype=float32 seed=7" in message and "grad: relative error" in message


@needs_fused
def test_a_wrong_loss_is_reported(wrong_backend):
    wrong_backend(dtype=torch.float32, grad_factor=1.0, loss_factor=1.01)
    result = check_spec(COMPOSED, shapes=SHAPES, dtypes=[torch.float32], backends=[FAST], gradcheck=False)
    assert [m.what for m in result.mismatches] == ["loss"]


@needs_fused
def test_gradcheck_catches_a_wrong_float64_gradient(wrong_backend):
    wrong_backend(dtype=torch.float64)
    result = check_spec(COMPOSED, shapes=SHAPES, dtypes=[], backends=[FAST])
    assert [(m.what, m.case.check, m.case.dtype) for m in result.mismatches] == \
        [("gradcheck", "gradcheck", torch.float64)]


@needs_fused
def test_a_raising_backend_is_reported_as_an_error_of_its_case(monkeypatch):
    real, _ = dispatch.load_launcher("logit", FAST)

    class Broken(WrongLauncher):
        def forward(self, *args):
            raise RuntimeError("kernel exploded")
    monkeypatch.setitem(dispatch._cache, ("logit", FAST), (Broken(real, torch.float32), None))
    result = check_spec(COMPOSED, shapes=SHAPES, dtypes=[torch.float32], backends=[FAST], gradcheck=False)
    assert len(result.mismatches) == 1
    assert result.mismatches[0].what == "error" and "kernel exploded" in result.mismatches[0].detail


def test_nothing_checked_is_not_a_pass():
    result = check_spec(COMPOSED, shapes=SHAPES, backends=[])
    assert not result.ok and "no fused backend ran" in str(result)
    with pytest.raises(AssertionError, match="python -m kdkernels.info"):
        assert_spec_matches_reference(COMPOSED, shapes=SHAPES, backends=[])


def test_inputs_are_seeded_and_hold_the_edge_cases():
    spec = kdk.LogitDistill(ignore_index=-1)
    s, t, y = testing.make_inputs(spec, (5, 12), torch.float32, 3, "cpu")
    s2, t2, y2 = testing.make_inputs(spec, (5, 12), torch.float32, 3, "cpu")
    assert torch.equal(s, s2) and torch.equal(t, t2) and torch.equal(y, y2)
    assert int(y[1]) == -1                                   # an ignored row, with the spec's ignore_index
    masked = (s[0] == -math.inf).nonzero().flatten().tolist()
    assert len(masked) == 1 and masked[0] != int(y[0]) and t[0, masked[0]] == -math.inf
    s3, _, _ = testing.make_inputs(spec, (5, 12), torch.float32, 4, "cpu")
    assert not torch.equal(s, s3)
    s_half, _, _ = testing.make_inputs(spec, (5, 12), torch.float16, 3, "cpu")
    assert torch.equal(s_half.float(), s.half().float())      # every dtype sees the same logits


def test_arguments_are_checked_at_once():
    with pytest.raises(ValueError, match="2k < C"):
        check_spec(kdk.LogitDistill(tdl=kdk.TopKDecoupled(k=5)), shapes=[(4, 10)])
    with pytest.raises(ValueError, match="unknown fused backend"):
        check_spec(COMPOSED, backends=["reference"])
    with pytest.raises(TypeError):
        check_spec(kdk.kd_loss)
    with pytest.raises(ValueError, match="no tolerance"):
        check_spec(COMPOSED, dtypes=[torch.int32])


def test_compare_flags_dtype_finiteness_and_error():
    loss_ref, grad_ref = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64)
    ok = (loss_ref.float(), grad_ref.float(), None)
    assert testing.compare(ok, (loss_ref, grad_ref, None), torch.float32) == []
    nan_loss = (torch.tensor([1.0, float("nan")]), grad_ref.float(), None)
    assert [w for w, _ in testing.compare(nan_loss, (loss_ref, grad_ref, None), torch.float32)] == ["finiteness"]
    wrong_dtype = (loss_ref.half(), grad_ref.float(), None)
    assert "dtype" in [w for w, _ in testing.compare(wrong_dtype, (loss_ref, grad_ref, None), torch.float32)]


@needs_fused
def test_float64_tolerance_exposes_float32_rounding(wrong_backend):
    """A float64 gradient off by 1e-8 relative (what a parameter rounded through float32 gives) fails."""
    wrong_backend(dtype=torch.float64, grad_factor=1 + 1e-8)
    result = check_spec(COMPOSED, shapes=SHAPES, dtypes=[torch.float64], backends=[FAST], gradcheck=False)
    assert [(m.what, m.case.dtype) for m in result.mismatches] == [("grad", torch.float64)]


PRESETS = {  # the method functions' specs (docs/engine.md), at a size that suits C = 12
    "kd": kdk.LogitDistill(temperature=4.0),
    "dkd": kdk.LogitDistill(kd_weight=0.0, decoupled=kdk.Decoupled(1.0, 8.0)),
    "aekt": kdk.LogitDistill(kd_weight=0.0, decoupled=kdk.Decoupled(1.0, 8.0, adaptive=True)),
    "dtkd": kdk.LogitDistill(kd_weight=1.0, dtkd_weight=3.0),
    "ldrld": kdk.LogitDistill(kd_weight=0.0, relation=kdk.RankRelation(k=5)),
    "topkd": kdk.LogitDistill(teacher_topk_scale=kdk.TopKScale(k=3), tdl=kdk.TopKDecoupled(k=3)),
    "ls_kd_ce": kdk.LogitDistill(temperature=2.0, standardize=True, ce_weight=1.0),
}


@needs_fused
@pytest.mark.parametrize("name", list(PRESETS))
def test_every_method_preset_passes_check_spec(name):
    assert_spec_matches_reference(PRESETS[name], shapes=[(5, 12)], backends=[FAST])
