"""A few engine launches for ``ncu`` (benchmarks/gpu_check.sh, step 5): one fwd+bwd call per headline
configuration, so the hardware counters (DRAM bytes, L2 hit rate, occupancy, instructions, registers) can be
set against the static figures of ``benchmarks/results/static/`` (transfers per element = DRAM bytes ÷
(N·C·itemsize)). Prints the shapes in launch order.

    ncu --csv -k regex:distill --metrics ... python -m benchmarks.ncu_probe
"""
from __future__ import annotations

import torch

import kdkernels as kdk

from .presets import PRESETS

#: (preset, N, C, dtype) in launch order
PROBES = [("kd", 8192, 1000, torch.float32), ("kd", 4096, 128 * 1024, torch.bfloat16),
          ("dkd", 4096, 128 * 1024, torch.bfloat16), ("topkd", 4096, 128 * 1024, torch.bfloat16),
          ("ldrld", 4096, 128 * 1024, torch.bfloat16), ("topkd", 8192, 1000, torch.float32)]


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, N, C, dtype in PROBES:
        s = (torch.randn(N, C, device="cuda", generator=g) * 3).to(dtype).requires_grad_(True)
        t = (torch.randn(N, C, device="cuda", generator=g) * 3).to(dtype)
        y = torch.randint(0, C, (N,), device="cuda", generator=g)
        spec = PRESETS[name].build()
        loss = kdk.logit_distill(s, t, y if spec.needs_labels else None, spec, backend="triton")
        torch.autograd.grad(loss, s)
        torch.cuda.synchronize()
        print(f"probe {name} N={N} C={C} {str(dtype).replace('torch.', '')}: bytes per transfer "
              f"{N * C * s.element_size()}", flush=True)


if __name__ == "__main__":
    main()
