"""Named benchmark shapes: the cases of each suite, and the random inputs of a case.

A *case* is one (method, shape, dtype). Logit methods take ``s``, ``t``: ``[N, C]`` and labels ``[N]``;
the contrastive method (``infonce``) takes ``a``, ``b``: ``[M, D]`` (N = M rows, C = D columns).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LOGIT_METHODS = ("kd", "dkd", "dtkd", "ldrld", "topkd", "aekt")
CONTRASTIVE_METHODS = ("infonce",)
METHODS = LOGIT_METHODS + CONTRASTIVE_METHODS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

K = 1024


@dataclass(frozen=True)
class Case:
    suite: str
    method: str
    N: int          # rows (tokens / images / contrastive samples M)
    C: int          # classes / vocabulary / feature dim D
    dtype: str      # a key of DTYPES

    @property
    def family(self) -> str:
        return "contrastive" if self.method in CONTRASTIVE_METHODS else "logit"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def shape(self) -> str:
        return f"M={self.N} D={self.C}" if self.family == "contrastive" else f"N={self.N} C={self.C}"

    @property
    def elements(self) -> int:
        """The largest tensor a plain implementation holds: [N, C], or the [M, M] similarity matrix."""
        return self.N * max(self.C, self.N) if self.family == "contrastive" else self.N * self.C

    @property
    def label(self) -> str:
        return f"{self.method} {self.shape} {self.dtype}"


def min_bytes(case: Case, mode: str) -> int:
    """The fewest bytes a pass must move: read s and t once (fwd), and write the gradient once (fwd+bwd)."""
    reads_writes = 2 if mode == "fwd" else 3
    return reads_writes * case.N * case.C * case.itemsize


def min_flops(case: Case, mode: str) -> int:
    """Contrastive only (the similarity matrix): 2·M²·D for fwd, 4·M²·D for fwd+bwd; 0 for logit rows."""
    if case.family != "contrastive":
        return 0
    return (2 if mode == "fwd" else 4) * case.N * case.N * case.C


# ---------------------------------------------------------------------------------------------
# suites: (N, C) grids per dtype
# ---------------------------------------------------------------------------------------------
IMAGENET = [(n, 1000) for n in (256, 512, 1024, 2048)]
#: an N sweep at V = 128k and a V sweep at N = 16k (plus the mid-size shape of the quick suite)
LLM = [(4 * K, 32 * K), (16 * K, 32 * K),
       (4 * K, 128 * K), (8 * K, 128 * K), (16 * K, 128 * K), (32 * K, 128 * K),
       (16 * K, 256 * K)]
CONTRASTIVE = [(m, 256) for m in (256, 1 * K, 4 * K, 16 * K)]
#: the headline shapes of one GPU call (benchmarks/gpu_check.sh), in priority order
HEADLINE_IMAGENET = [(1024, 1000), (8192, 1000)]
HEADLINE_LLM = [(16 * K, 128 * K)]
HEADLINE_METHODS = ("kd", "dkd", "ldrld", "topkd", "dtkd")


def suite_cases(suite: str, device_type: str, methods=None, dtypes=None) -> list:
    """The cases of a named suite on a device type ("cpu" or "cuda"), filtered by methods and dtypes."""
    if suite == "all":
        return [c for s in ("imagenet", "llm", "contrastive") for c in suite_cases(s, device_type, methods, dtypes)]
    grids = {  # suite -> [(methods, [(N, C)], default dtypes)]
        "imagenet": [(LOGIT_METHODS, IMAGENET, ("fp32", "bf16"))],
        "llm": [(LOGIT_METHODS, LLM, ("bf16",))],
        "contrastive": [(CONTRASTIVE_METHODS, CONTRASTIVE, ("fp32", "bf16"))],
        "quick": ([(LOGIT_METHODS, [(256, 1000)], ("fp32",))] if device_type != "cuda" else
                  [(LOGIT_METHODS, [(1024, 1000)], ("fp32",)), (LOGIT_METHODS, [(4 * K, 32 * K)], ("bf16",))]),
        # one GPU call: ImageNet N = 1024/8192 C = 1000 fp32, LLM N = 16k V = 128k bf16
        "headline": [(HEADLINE_METHODS, HEADLINE_IMAGENET, ("fp32",)), (HEADLINE_METHODS, HEADLINE_LLM, ("bf16",))],
        # a few-second suite for the tests and for trying the harness
        "tiny": [(LOGIT_METHODS, [(8, 40)], ("fp32",)), (CONTRASTIVE_METHODS, [(16, 8)], ("fp32",))],
    }
    if suite not in grids:
        raise ValueError(f"unknown suite {suite!r}; choose one of {sorted(grids) + ['all']}")
    out = []
    for suite_methods, grid, default_dtypes in grids[suite]:
        for dt in (dtypes or default_dtypes):
            for m in suite_methods:
                if methods is None or m in methods:
                    out.extend(Case(suite, m, n, c, dt) for n, c in grid)
    return out


def make_inputs(case: Case, device, seed: int = 0):
    """Fresh random inputs (never zeros): logits ~ 3·N(0, 1) with labels, or feature rows ~ N(0, 1)."""
    g = torch.Generator(device=device).manual_seed(seed + 7919 * case.N + case.C)
    scale = 1.0 if case.family == "contrastive" else 3.0
    s = (torch.randn(case.N, case.C, generator=g, device=device, dtype=torch.float32) * scale).to(case.torch_dtype)
    t = (torch.randn(case.N, case.C, generator=g, device=device, dtype=torch.float32) * scale).to(case.torch_dtype)
    if case.family == "contrastive":
        t = (t + s.float()).to(case.torch_dtype)  # a teacher correlated with the student, like real features
        y = None
    else:
        y = torch.randint(0, case.C, (case.N,), generator=g, device=device)
    return s, t, y
