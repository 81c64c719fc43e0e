"""One test per validation error at the API boundary, and the check mode (docs/conventions.md, §9)."""
from __future__ import annotations

import math

import pytest
import torch

import kdkernels as kdk
from kdkernels import dispatch
from kdkernels.spec import LogitDistill, RankRelation, TopKDecoupled, TopKScale

R = "reference"
N, C = 4, 9


@pytest.fixture
def st(gen):
    s = torch.randn(N, C, generator=gen) * 2
    t = torch.randn(N, C, generator=gen) * 2
    y = torch.randint(0, C, (N,), generator=gen)
    return s, t, y


# ------------------------------------------------------------------------------------------------
# tensors: type, dtype, rank, shape, device
# ------------------------------------------------------------------------------------------------
def test_non_tensor_student(st):
    s, t, y = st
    with pytest.raises(TypeError, match=r"student_logits must be a torch\.Tensor, got list"):
        kdk.kd_loss(s.tolist(), t, backend=R)


def test_non_tensor_teacher(st):
    s, t, y = st
    with pytest.raises(TypeError, match=r"teacher_logits must be a torch\.Tensor, got ndarray"):
        kdk.dkd_loss(s, t.numpy(), y, backend=R)


def test_shape_mismatch(st):
    s, t, y = st
    with pytest.raises(ValueError, match=r"must have the same shape, got \(4, 9\) and \(4, 8\)"):
        kdk.kd_loss(s, t[:, :8], backend=R)
    with pytest.raises(ValueError, match=r"must have the same shape"):
        kdk.ldrld_loss(s, t[:3], backend=R)


def test_mixed_dtypes_are_accepted(st):
    """Student and teacher may differ in floating dtype (each is loaded as it is; see test_parity)."""
    s, t, y = st
    mixed = kdk.kd_loss(s, t.half(), backend=R)
    torch.testing.assert_close(mixed, kdk.kd_loss(s, t.half().float(), backend=R))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_unsupported_dtype(st, dtype):
    s, t, y = st
    with pytest.raises(TypeError, match=r"student_logits must be float32, bfloat16, float16 or float64, got"):
        kdk.kd_loss(s.to(dtype), t.to(dtype), backend=R)
    with pytest.raises(TypeError, match=r"teacher_logits must be float32, bfloat16, float16 or float64"):
        kdk.kd_loss(s, t.to(dtype), backend=R)


def test_device_mismatch(st):
    s, t, y = st
    with pytest.raises(ValueError, match=r"must be on the same device, got meta and cpu"):
        kdk.kd_loss(s.to("meta"), t, backend=R)


def test_zero_dim_logits():
    with pytest.raises(ValueError, match=r"student_logits must have shape \[\.\.\., C\], got a 0-dim tensor"):
        kdk.kd_loss(torch.tensor(1.5), torch.tensor(0.5), backend=R)


def test_zero_classes():
    with pytest.raises(ValueError, match=r"logits need at least one class"):
        kdk.kd_loss(torch.empty(3, 0), torch.empty(3, 0), backend=R)


def test_one_class_for_standardize_and_dkd(gen):
    s, t = torch.randn(3, 1, generator=gen), torch.randn(3, 1, generator=gen)
    with pytest.raises(ValueError, match=r"standardize=True needs at least 2 classes"):
        kdk.kd_loss(s, t, standardize=True, backend=R)
    with pytest.raises(ValueError, match=r"dkd/aekt need at least 2 classes"):
        kdk.dkd_loss(s, t, torch.zeros(3, dtype=torch.long), backend=R)


# ------------------------------------------------------------------------------------------------
# labels
# ------------------------------------------------------------------------------------------------
def test_label_dtype_float(st):
    s, t, y = st
    with pytest.raises(TypeError, match=r"labels must be an integer tensor, got torch\.float32"):
        kdk.dkd_loss(s, t, y.float(), backend=R)
    with pytest.raises(TypeError, match=r"labels must be an integer tensor"):
        kdk.kd_loss(s, t, labels=y.bool(), backend=R)


def test_label_not_a_tensor(st):
    s, t, y = st
    with pytest.raises(TypeError, match=r"labels must be a torch\.Tensor, got list"):
        kdk.dkd_loss(s, t, y.tolist(), backend=R)


def test_label_shape(st):
    s, t, y = st
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\) \(the logits' leading dims\), got \(3,\)"):
        kdk.dkd_loss(s, t, y[:3], backend=R)
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 2\)"):
        kdk.kd_loss(s.reshape(2, 2, C), t.reshape(2, 2, C), labels=y, backend=R)


def test_label_device(st):
    s, t, y = st
    with pytest.raises(ValueError, match=r"labels must be on the logits' device cpu, got meta"):
        kdk.dkd_loss(s, t, y.to("meta"), backend=R)


def test_dkd_and_aekt_without_labels(st):
    s, t, y = st
    with pytest.raises(ValueError, match=r"this loss needs labels"):
        kdk.dkd_loss(s, t, None, backend=R)
    with pytest.raises(ValueError, match=r"this loss needs labels"):
        kdk.aekt_loss(s, t, None, backend=R)


def test_ce_weight_without_labels(st):
    s, t, y = st
    with pytest.raises(ValueError, match=r"this loss needs labels \(ce_weight > 0"):
        kdk.kd_loss(s, t, ce_weight=0.5, backend=R)


# ------------------------------------------------------------------------------------------------
# temperature
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [0, 0.0, -1.0, -3, math.inf, math.nan])
def test_temperature_not_positive(st, T):
    s, t, y = st
    with pytest.raises(ValueError, match=r"temperature must be a finite positive number, got"):
        kdk.kd_loss(s, t, T, backend=R)
    with pytest.raises(ValueError, match=r"temperature must be a finite positive number"):
        kdk.dkd_loss(s, t, y, 1.0, 8.0, T, backend=R)


@pytest.mark.parametrize("T", [True, "4", None])
def test_temperature_wrong_type(st, T):
    s, t, y = st
    with pytest.raises(TypeError, match=r"temperature must be a float"):
        kdk.kd_loss(s, t, T, backend=R)


def test_temperature_tensor_integer(st):
    s, t, y = st
    with pytest.raises(TypeError, match=r"temperature tensor must be floating point, got torch\.int64"):
        kdk.kd_loss(s, t, torch.tensor(4), backend=R)


@pytest.mark.parametrize("shape", [(N + 1,), (N, 1), (2, 2)])
def test_per_row_temperature_wrong_shape(st, shape):
    s, t, y = st
    with pytest.raises(ValueError, match=r"a per-row temperature must have shape \(4,\) or \(4,\), got"):
        kdk.kd_loss(s, t, torch.full(shape, 2.0), backend=R)


def test_temperature_device(st):
    s, t, y = st
    with pytest.raises(ValueError, match=r"temperature must be on the logits' device cpu, got meta"):
        kdk.kd_loss(s, t, torch.full((N,), 2.0, device="meta"), backend=R)


@pytest.mark.parametrize("method", ["dkd", "aekt", "dtkd", "ldrld", "spec"])
def test_learnable_temperature_with_other_terms(st, method):
    s, t, y = st
    T = torch.tensor(3.0, requires_grad=True)
    with pytest.raises(ValueError, match=r"learnable temperature .* KD term only"):
        if method == "dkd":
            kdk.dkd_loss(s, t, y, 1.0, 8.0, T, backend=R)
        elif method == "aekt":
            kdk.aekt_loss(s, t, y, 1.0, 8.0, T, backend=R)
        elif method == "dtkd":
            kdk.dtkd_loss(s, t, T, backend=R)
        elif method == "ldrld":
            kdk.ldrld_loss(s, t, 3, T, backend=R)
        else:
            LogitDistill(temperature=T, decoupled=kdk.Decoupled())


def test_learnable_temperature_allowed_with_kd_ce_tsm(st):
    s, t, y = st
    T = torch.tensor(3.0, requires_grad=True)
    loss = kdk.kd_loss(s, t, T, labels=y, ce_weight=0.2, standardize=True, teacher_topk_scale=TopKScale(k=2),
                       backend=R)
    loss.backward()
    assert torch.isfinite(T.grad)


# ------------------------------------------------------------------------------------------------
# reduction, backend
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "", None, "Sum"])
def test_unknown_reduction(st, reduction):
    s, t, y = st
    with pytest.raises(ValueError, match=r"reduction must be one of \('batchmean', 'sum', 'none'\)"):
        kdk.kd_loss(s, t, reduction=reduction, backend=R)


def test_unknown_backend(st):
    s, t, y = st
    with pytest.raises(ValueError, match=r"unknown backend 'tpu'; choose one of"):
        kdk.kd_loss(s, t, backend="tpu")
    with pytest.raises(ValueError, match=r"unknown backend 'tpu'"):
        kdk.info_nce(s[None], t[None], backend="tpu")


class _Unavailable:
    def unavailable_reason(self, device):
        return "fake launcher: no such hardware here"


def test_requested_unavailable_backend_raises_with_reason(st, monkeypatch):
    s, t, y = st
    monkeypatch.setitem(dispatch._cache, ("logit", "cuda"), (_Unavailable(), None))
    with pytest.raises(kdk.BackendUnavailableError,
                       match=r"backend 'cuda' cannot run on cpu: fake launcher: no such hardware here"):
        kdk.kd_loss(s, t, backend="cuda")
    # an import failure is a reason, not a crash
    monkeypatch.setitem(dispatch.LAUNCHERS["logit"], "cpu", "kdkernels._no_such_module:launcher")
    monkeypatch.delitem(dispatch._cache, ("logit", "cpu"), raising=False)
    with pytest.raises(kdk.BackendUnavailableError,
                       match=r"backend 'cpu' cannot run on cpu: kdkernels\._no_such_module failed to import: "
                             r"ModuleNotFoundError"):
        kdk.dkd_loss(s, t, y, backend="cpu")
    # "auto" never raises: with every fused backend unavailable it falls back to the reference
    monkeypatch.setitem(dispatch._cache, ("logit", "triton"), (_Unavailable(), None))
    monkeypatch.delenv("KDKERNELS_BACKEND", raising=False)
    assert dispatch.resolve("auto", torch.device("cpu")) == "reference"
    assert torch.isfinite(kdk.kd_loss(s, t))
    monkeypatch.delitem(dispatch._cache, ("logit", "cpu"), raising=False)


def test_requested_unavailable_backend_real(st):
    """The CUDA C++ backend can never run CPU tensors, whatever is installed."""
    s, t, y = st
    assert issubclass(kdk.BackendUnavailableError, RuntimeError)
    with pytest.raises(kdk.BackendUnavailableError, match=r"backend 'cuda' cannot run on cpu: \S+"):
        kdk.kd_loss(s, t, backend="cuda")
    with pytest.raises(kdk.BackendUnavailableError, match=r"backend 'cuda' cannot run on cpu: \S+"):
        kdk.info_nce(s[None], t[None], backend="cuda")


# ------------------------------------------------------------------------------------------------
# k ranges
# ------------------------------------------------------------------------------------------------
def test_ldrld_k_too_small(st):
    s, t, y = st
    with pytest.raises(ValueError, match=r"k must be in \[2, 64\], got 1"):
        kdk.ldrld_loss(s, t, k=1, backend=R)
    with pytest.raises(ValueError, match=r"k must be in \[2, 64\], got 0"):
        kdk.ldrld_loss(s, t, 0, backend=R)


@pytest.mark.parametrize("k", [C, C + 3])
def test_ldrld_k_not_below_C(st, k):
    s, t, y = st
    with pytest.raises(ValueError, match=rf"ldrld k must be in \[2, C - 1\] = \[2, {C - 1}\], got {k}"):
        kdk.ldrld_loss(s, t, k=k, backend=R)


def test_ldrld_k_above_max_and_not_int(st):
    s, t, y = st
    with pytest.raises(ValueError, match=r"k must be in \[2, 64\], got 65"):
        kdk.ldrld_loss(s, t, k=65, backend=R)
    with pytest.raises(TypeError, match=r"k must be an int, got float"):
        kdk.ldrld_loss(s, t, k=3.0, backend=R)


def test_ldrld_rank_by(st):
    s, t, y = st
    with pytest.raises(ValueError, match=r"rank_by must be one of \('student', 'teacher'\), got 'both'"):
        kdk.ldrld_loss(s, t, 3, rank_by="both", backend=R)


@pytest.mark.parametrize("k", [C, C + 1])
def test_topk_scale_k_not_below_C(st, k):
    s, t, y = st
    with pytest.raises(ValueError, match=rf"TopKScale\.k must be in \[1, C - 1\] = \[1, {C - 1}\], got {k}"):
        kdk.kd_loss(s, t, teacher_topk_scale=TopKScale(k=k), backend=R)
    with pytest.raises(ValueError, match=r"TopKScale\.k must be in \[1, C - 1\]"):
        kdk.dkd_loss(s, t, y, teacher_topk_scale={"k": k}, backend=R)


def test_topk_scale_bad_values():
    with pytest.raises(ValueError, match=r"TopKScale\.k must be in \[1, 64\], got 0"):
        TopKScale(k=0)
    with pytest.raises(ValueError, match=r"TopKScale\.scale must be finite, got nan"):
        TopKScale(scale=math.nan)
    with pytest.raises(ValueError, match=r"teacher_topk_scale: unknown keys \['kk'\]"):
        TopKScale.coerce({"kk": 3})
    with pytest.raises(TypeError, match=r"teacher_topk_scale must be None, a kdkernels\.TopKScale or a dict"):
        TopKScale.coerce(5)


@pytest.mark.parametrize("k", [5, 6])
def test_tdl_2k_not_below_C(gen, k):
    s, t = torch.randn(3, 10, generator=gen), torch.randn(3, 10, generator=gen)
    with pytest.raises(ValueError, match=rf"TDL needs 2k < C \(Pos, Neg and Non groups\), got k={k}, C=10"):
        kdk.topkd_loss(s, t, None, k=k, backend=R)
    with pytest.raises(ValueError, match=r"TDL needs 2k < C"):
        kdk.logit_distill(s, t, None, LogitDistill(tdl=TopKDecoupled(k=k)), backend=R)


def test_topkd_k_boundary_ok(gen):
    s, t = torch.randn(3, 10, generator=gen), torch.randn(3, 10, generator=gen)
    assert torch.isfinite(kdk.topkd_loss(s, t, None, k=4, backend=R))


# ------------------------------------------------------------------------------------------------
# other parameters
# ------------------------------------------------------------------------------------------------
def test_contrastive_with_reduction_none(st):
    s, t, y = st
    with pytest.raises(ValueError, match=r"batch-coupled contrastive term has no per-row value"):
        kdk.topkd_loss(s, t, y, 2, contrastive_weight=0.5, reduction="none", backend=R)


@pytest.mark.parametrize("name,kw,exc,msg", [
    ("alpha", dict(alpha=math.nan), ValueError, r"alpha must be finite, got nan"),
    ("beta", dict(beta=math.inf), ValueError, r"beta must be finite, got inf"),
    ("max_weight", dict(max_weight=0.0), ValueError, r"max_weight must be a finite positive number, got 0"),
    ("alpha_type", dict(alpha="1"), TypeError, r"alpha must be a float, got str"),
])
def test_aekt_parameters(st, name, kw, exc, msg):
    s, t, y = st
    with pytest.raises(exc, match=msg):
        kdk.aekt_loss(s, t, y, backend=R, **kw)


def test_ignore_index_type(st):
    s, t, y = st
    with pytest.raises(TypeError, match=r"ignore_index must be an int"):
        kdk.kd_loss(s, t, ignore_index=-100.0, backend=R)


def test_spec_type(st):
    s, t, y = st
    with pytest.raises(TypeError, match=r"spec must be a kdkernels\.LogitDistill, got dict"):
        kdk.logit_distill(s, t, y, {"kd_weight": 1.0}, backend=R)


def test_ldrld_eps_positive(st):
    s, t, y = st
    with pytest.raises(ValueError, match=r"eps must be a finite positive number, got 0"):
        kdk.ldrld_loss(s, t, 3, eps=0.0, backend=R)


def test_contrastive_tau_positive():
    with pytest.raises(ValueError, match=r"contrastive_tau must be a finite positive number"):
        LogitDistill(contrastive_tau=0.0)


# ------------------------------------------------------------------------------------------------
# contrastive losses
# ------------------------------------------------------------------------------------------------
def test_msd_channel_mismatch(gen):
    fs, ft = torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 6, 4, 4, generator=gen)
    with pytest.raises(ValueError, match=r"channel mismatch: student has D=4, teacher D=6; align the channels"):
        kdk.msd_contrastive_loss(fs, ft, backend=R)


def test_msd_batch_mismatch(gen):
    fs, ft = torch.randn(2, 4, 4, 4, generator=gen), torch.randn(3, 4, 4, 4, generator=gen)
    with pytest.raises(ValueError, match=r"batch mismatch: student N=2, teacher N=3"):
        kdk.msd_contrastive_loss(fs, ft, backend=R)


def test_msd_not_a_feature_map(gen):
    f = torch.randn(2, 4, 4, generator=gen)
    with pytest.raises(ValueError, match=r"f_s must be a feature map \[N, D, H, W\]"):
        kdk.msd_contrastive_loss(f, torch.randn(2, 4, 4, 4, generator=gen), backend=R)
    with pytest.raises(ValueError, match=r"f_t must be a feature map \[N, D, H, W\]"):
        kdk.msd_contrastive_loss(torch.randn(2, 4, 4, 4, generator=gen), [1.0], backend=R)


def test_msd_dtype_and_scales(gen):
    fs, ft = torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 4, 4, 4, generator=gen)
    with pytest.raises(TypeError, match=r"f_s and f_t must have the same dtype"):
        kdk.msd_contrastive_loss(fs, ft.double(), backend=R)
    for scales in [(), (0,), (1, 2.0), (True,)]:
        with pytest.raises(ValueError, match=r"scales must be positive ints"):
            kdk.msd_contrastive_loss(fs, ft, scales=scales, backend=R)


@pytest.mark.parametrize("tau", [0, 0.0, -0.1, math.inf, math.nan, None, True, "0.1"])
def test_info_nce_bad_tau(gen, tau):
    a, b = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    with pytest.raises(ValueError, match=r"tau must be a finite positive number"):
        kdk.info_nce(a, b, tau, backend=R)


@pytest.mark.parametrize("shape", [(5,), (2, 2, 3, 4)])
def test_info_nce_wrong_rank(gen, shape):
    a, b = torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)
    with pytest.raises(ValueError, match=r"info_nce expects \[G, M, D\] or \[M, D\] tensors, got shape"):
        kdk.info_nce(a, b, backend=R)


def test_info_nce_shape_and_type(gen):
    a = torch.randn(2, 3, 4, generator=gen)
    with pytest.raises(ValueError, match=r"a and b must have the same shape"):
        kdk.info_nce(a, a[:, :2], backend=R)
    with pytest.raises(TypeError, match=r"b must be a torch\.Tensor"):
        kdk.info_nce(a, 1.0, backend=R)


# ------------------------------------------------------------------------------------------------
# check mode (labels range, non-finite logits): check=True and KDKERNELS_CHECK=1
# ------------------------------------------------------------------------------------------------
def _check_on(mode, monkeypatch):
    if mode == "env":
        monkeypatch.setenv("KDKERNELS_CHECK", "1")
        return {}
    monkeypatch.delenv("KDKERNELS_CHECK", raising=False)
    return {"check": True}


CHECK_METHODS = {
    "kd": lambda s, t, y, **kw: kdk.kd_loss(s, t, labels=y, **kw),
    "dkd": lambda s, t, y, **kw: kdk.dkd_loss(s, t, y, **kw),
    "aekt": lambda s, t, y, **kw: kdk.aekt_loss(s, t, y, **kw),
    "dtkd": lambda s, t, y, **kw: kdk.dtkd_loss(s, t, labels=y, **kw),
    "ldrld": lambda s, t, y, **kw: kdk.ldrld_loss(s, t, 3, labels=y, **kw),
    "topkd": lambda s, t, y, **kw: kdk.topkd_loss(s, t, y, 2, **kw),
}


@pytest.mark.parametrize("mode", ["arg", "env"])
@pytest.mark.parametrize("method", sorted(CHECK_METHODS))
def test_check_label_out_of_range_names_first_row(st, monkeypatch, mode, method):
    s, t, y = st
    kw = _check_on(mode, monkeypatch)
    fn = CHECK_METHODS[method]
    y = y.clone()
    y[0] = -100          # ignored: fine
    y[2] = C             # first offending row
    y[3] = -7
    with pytest.raises(ValueError, match=rf"labels\[2\] = {C} is outside \[0, {C}\) and is not ignore_index=-100"):
        fn(s, t, y, backend=R, **kw)


@pytest.mark.parametrize("mode", ["arg", "env"])
def test_check_label_leading_dims_and_custom_ignore(st, monkeypatch, mode):
    s, t, y = st
    kw = _check_on(mode, monkeypatch)
    y = y.clone().reshape(2, 2)
    y[0, 1] = -1   # ignore_index below
    y[1, 1] = -100  # not the ignore_index here: out of range
    with pytest.raises(ValueError, match=r"labels\[3\] = -100 is outside \[0, 9\) and is not ignore_index=-1"):
        kdk.dkd_loss(s.reshape(2, 2, C), t.reshape(2, 2, C), y, ignore_index=-1, backend=R, **kw)


@pytest.mark.parametrize("mode", ["arg", "env"])
@pytest.mark.parametrize("which,value", [("student", math.inf), ("student", math.nan),
                                         ("teacher", math.inf), ("teacher", math.nan)])
def test_check_non_finite_logits_raise(st, monkeypatch, mode, which, value):
    s, t, y = st
    kw = _check_on(mode, monkeypatch)
    s, t = s.clone(), t.clone()
    (s if which == "student" else t)[2, 5] = value
    (s if which == "student" else t)[3, 1] = value
    with pytest.raises(ValueError, match=rf"{which}_logits row 2 contains \+inf or NaN \(only -inf"):
        kdk.kd_loss(s, t, backend=R, **kw)
    with pytest.raises(ValueError, match=rf"{which}_logits row 2 contains \+inf or NaN"):
        kdk.dkd_loss(s, t, y, backend=R, **kw)


@pytest.mark.parametrize("mode", ["arg", "env"])
def test_check_minus_inf_passes(st, monkeypatch, mode):
    s, t, y = st
    kw = _check_on(mode, monkeypatch)
    s, t = s.clone(), t.clone()
    y = torch.zeros(N, dtype=torch.long)
    s[:, 7:], t[:, 7:] = -math.inf, -math.inf
    for fn in CHECK_METHODS.values():
        loss = fn(s, t, y, backend=R, **kw)
        assert torch.isfinite(loss)


@pytest.mark.parametrize("mode", ["arg", "env"])
def test_check_temperature_tensor_non_positive(st, monkeypatch, mode):
    s, t, y = st
    kw = _check_on(mode, monkeypatch)
    T = torch.tensor([1.0, 2.0, 0.0, 3.0])
    with pytest.raises(ValueError, match=r"temperature tensor has non-positive entries"):
        kdk.kd_loss(s, t, T, backend=R, **kw)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_check_temperature_tensor_non_finite(st, value):
    """Regression: NaN / inf temperature entries are rejected in check mode, like a float temperature."""
    s, t, y = st
    with pytest.raises(ValueError, match=r"temperature"):
        kdk.kd_loss(s, t, torch.tensor([1.0, value, 2.0, 3.0]), check=True, backend=R)


def test_check_off_by_default_and_overridable(st, monkeypatch):
    s, t, y = st
    y = y.clone()
    y[1] = C + 2
    monkeypatch.delenv("KDKERNELS_CHECK", raising=False)
    rows = kdk.dkd_loss(s, t, y, reduction="none", backend=R)      # no sync, no raise: NaN row
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2, 3]]).all()
    for off in ("0", "", "false", "off", "no"):
        monkeypatch.setenv("KDKERNELS_CHECK", off)
        assert torch.isnan(kdk.dkd_loss(s, t, y, backend=R))
    for on in ("1", "true", "yes"):
        monkeypatch.setenv("KDKERNELS_CHECK", on)
        with pytest.raises(ValueError, match=r"labels\[1\]"):
            kdk.dkd_loss(s, t, y, backend=R)
    # an explicit check=False wins over the environment
    monkeypatch.setenv("KDKERNELS_CHECK", "1")
    assert torch.isnan(kdk.dkd_loss(s, t, y, check=False, backend=R))
    s2 = s.clone()
    s2[0, 0] = math.inf
    assert torch.isnan(kdk.kd_loss(s2, t, check=False, backend=R))


def test_spec_objects_validate_themselves():
    with pytest.raises(ValueError, match=r"k must be in \[2, 64\], got 1"):
        RankRelation(k=1)
    with pytest.raises(ValueError, match=r"k must be in \[1, 64\], got 0"):
        TopKDecoupled(k=0)
    with pytest.raises(ValueError, match=r"temperature must be a finite positive number, got -2"):
        LogitDistill(temperature=-2)
