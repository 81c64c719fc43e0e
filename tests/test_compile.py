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


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_compile_fullgraph_gpu(backend, gen):
    if unavailable_reason(backend, torch.device("cuda")) is not None:
        pytest.skip(unavailable_reason(backend, torch.device("cuda")))
    _check(backend, "cuda", gen)
