"""The engine under torch.compile(fullgraph=True): ops registered with torch.library, no graph breaks.

On CPU the C++ twin's ops are compiled (Triton's triton_op cannot be compiled through the interpreter,
ci.md); on a GPU the Triton engine is."""
import pytest
import torch

import kdkernels as kdk
from kdkernels.dispatch import unavailable_reason


def _check(backend, device, gen):
    s = (torch.randn(8, 100, generator=gen) * 3).to(device).requires_grad_(True)
    t = (torch.randn(8, 100, generator=gen) * 3).to(device)
    y = torch.randint(0, 100, (8,), generator=gen).to(device)

    def f(s, t, y):
        return kdk.dkd_loss(s, t, y, backend=backend) + kdk.kd_loss(s, t, 2.0, labels=y, ce_weight=0.5,
                                                                     backend=backend)
    compiled = torch.compile(f, fullgraph=True)
    loss_c = compiled(s, t, y)
    g_c, = torch.autograd.grad(loss_c, s)
    loss_e = f(s, t, y)
    g_e, = torch.autograd.grad(loss_e, s)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(unavailable_reason("cpu", torch.device("cpu")) is not None,
                    reason="the C++ CPU twin is not built")
def test_compile_fullgraph_cpu_twin(gen):
    _check("cpu", "cpu", gen)


@pytest.mark.skipif(unavailable_reason("triton", torch.device("cpu")) is not None,
                    reason="Triton runs on CPU tensors only under TRITON_INTERPRET=1")
def test_compile_fullgraph_triton_interpreted(gen):
    """The Triton engine's ops (an opaque custom_op under the interpreter, ci.md) inside a fullgraph."""
    _check("triton", "cpu", gen)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_compile_fullgraph_gpu(backend, gen):
    if unavailable_reason(backend, torch.device("cuda")) is not None:
        pytest.skip(unavailable_reason(backend, torch.device("cuda")))
    _check(backend, "cuda", gen)


@pytest.mark.skipif(unavailable_reason("triton", torch.device("cpu")) is not None,
                    reason="Triton runs on CPU tensors only under TRITON_INTERPRET=1")
def test_opcheck_triton_engine_ops(gen):
    s = torch.randn(3, 10, generator=gen)
    t = torch.randn(3, 10, generator=gen)
    y = torch.tensor([1, -100, 4])
    floats, ints = kdk.LogitDistill(kd_weight=0.0, decoupled=kdk.Decoupled(1.0, 8.0)).pack()
    torch.library.opcheck(torch.ops.kdkernels.triton_logit_distill.default,
                          (s, t, y, None, torch.empty_like(s), None, 1 / 3, floats, ints, False))
    torch.library.opcheck(torch.ops.kdkernels.triton_scale_rows_.default,
                          (torch.randn(3, 10, generator=gen), torch.tensor([2.0, 1.0, 0.5])))
