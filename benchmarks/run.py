"""Benchmark CLI (grown by the benchmark issue). ``--suite quick``: every loss on an example batch with
each available backend: loss, gradient norm, and the largest difference from the reference."""
from __future__ import annotations

import argparse

import torch

import kdkernels as kdk
from kdkernels.dispatch import BACKENDS, unavailable_reason


def example_cases(N=64, C=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, C, generator=g) * 3
    t = torch.randn(N, C, generator=g) * 3
    y = torch.randint(0, C, (N,), generator=g)
    return s, t, y, {
        "kd": lambda s, t, b: kdk.kd_loss(s, t, 4.0, backend=b),
        "dkd": lambda s, t, b: kdk.dkd_loss(s, t, y, backend=b),
        "dtkd": lambda s, t, b: kdk.dtkd_loss(s, t, backend=b),
        "ldrld": lambda s, t, b: kdk.ldrld_loss(s, t, backend=b),
        "topkd": lambda s, t, b: kdk.topkd_loss(s, t, y, backend=b),
        "aekt": lambda s, t, b: kdk.aekt_loss(s, t, y, backend=b),
    }


def quick():
    s, t, y, cases = example_cases()
    backends = [b for b in BACKENDS[1:] if unavailable_reason(b, s.device) is None]
    print(f"{'method':<8}{'backend':<11}{'loss':>12}{'|grad|':>12}{'max|Δloss|':>13}{'max|Δgrad|':>13}")
    for name, fn in cases.items():
        ref_s = s.clone().requires_grad_()
        ref = fn(ref_s, t, "reference")
        ref_g, = torch.autograd.grad(ref, ref_s)
        for b in backends:
            x = s.clone().requires_grad_()
            loss = fn(x, t, b)
            g, = torch.autograd.grad(loss, x)
            print(f"{name:<8}{b:<11}{loss.item():>12.6f}{g.norm().item():>12.6f}"
                  f"{(loss - ref).abs().item():>13.3e}{(g - ref_g).abs().max().item():>13.3e}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--suite", default="quick", choices=["quick"])
    ap.parse_args(argv)
    quick()


if __name__ == "__main__":
    main()
