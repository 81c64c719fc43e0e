import torch

import kdkernels as kdk


def test_every_method_runs_on_reference(gen):
    s = (torch.randn(4, 12, generator=gen) * 2).requires_grad_()
    t = torch.randn(4, 12, generator=gen) * 2
    y = torch.randint(0, 12, (4,), generator=gen)
    for loss in (kdk.kd_loss(s, t), kdk.dkd_loss(s, t, y), kdk.dtkd_loss(s, t), kdk.ldrld_loss(s, t),
                 kdk.topkd_loss(s, t, y), kdk.aekt_loss(s, t, y)):
        g, = torch.autograd.grad(loss, s)
        assert torch.isfinite(loss) and loss > 0 and torch.isfinite(g).all()


def test_info_reports_every_backend():
    text = kdk.dispatch.report()
    for name in ("reference", "triton", "cuda", "cpu"):
        assert name in text
