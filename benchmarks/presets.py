"""The presets and shape classes the static measurements (``python -m benchmarks.static``) cover.

A preset is a :class:`kdkernels.LogitDistill` spec evaluated through the public entry point
``kdkernels.logit_distill`` — the same spec that ``kd_loss``/``dkd_loss``/… build with their defaults.
A shape class is a row length the engine treats one way: rows of ≤ ``MAX_BLOCK_C`` columns kept in
registers (single-block), longer rows streamed in blocks.

Under the Triton interpreter a streamed LLM row (V = 32k, 128k) would take minutes, so the streamed
classes run a **stand-in**: a forced small block (``kdkernels._triton.engine.forced_block_c``) and a row
of the same number of blocks (V / 4096 blocks of ``STANDIN_BLOCK`` columns), which takes the same code
path (``SINGLE_BLOCK`` false, every pass a loop over the blocks). Transfers per element do not depend on
the block size, so the stand-in's per-element figures are the real shape's. The AOT compile uses the
real C (and the real block size).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

import kdkernels as kdk

#: the engine's block size for streamed rows (``MAX_BLOCK_C`` of the Triton engine)
REAL_BLOCK = 4096
#: the forced block size of the interpreter stand-in for streamed rows
STANDIN_BLOCK = 16
TEMPERATURE = 4.0
TOPK = 5


@dataclass(frozen=True)
class Preset:
    name: str
    spec: Callable[[], kdk.LogitDistill]
    #: the public function (with its defaults) that builds the same spec
    public: str

    def build(self) -> kdk.LogitDistill:
        return self.spec()

    @property
    def needs_labels(self) -> bool:
        return self.build().needs_labels


PRESETS = {p.name: p for p in [
    Preset("kd", lambda: kdk.LogitDistill(temperature=TEMPERATURE), "kd_loss(s, t, 4.0)"),
    Preset("kd+ce", lambda: kdk.LogitDistill(temperature=TEMPERATURE, ce_weight=1.0),
           "kd_loss(s, t, 4.0, labels=y, ce_weight=1.0)"),
    Preset("kd+standardize", lambda: kdk.LogitDistill(temperature=2.0, standardize=True),
           "kd_loss(s, t, 2.0, standardize=True)"),
    Preset("dkd", lambda: kdk.LogitDistill(temperature=TEMPERATURE, kd_weight=0.0,
                                           decoupled=kdk.Decoupled(alpha=1.0, beta=8.0)), "dkd_loss(s, t, y)"),
    Preset("aekt", lambda: kdk.LogitDistill(temperature=TEMPERATURE, kd_weight=0.0,
                                            decoupled=kdk.Decoupled(1.0, 8.0, adaptive=True, max_weight=10.0)),
           "aekt_loss(s, t, y)"),
    Preset("dtkd", lambda: kdk.LogitDistill(temperature=TEMPERATURE, kd_weight=1.0, dtkd_weight=3.0),
           "dtkd_loss(s, t)"),
    Preset("ldrld", lambda: kdk.LogitDistill(temperature=TEMPERATURE, kd_weight=0.0,
                                             relation=kdk.RankRelation(k=7, alpha=10.5, beta=7.0)),
           "ldrld_loss(s, t)"),
    Preset("topkd", lambda: kdk.LogitDistill(temperature=TEMPERATURE, teacher_topk_scale=kdk.TopKScale(k=TOPK),
                                             tdl=kdk.TopKDecoupled(k=TOPK)),
           "topkd_loss(s, t, y) (TSM + TDL)"),
    Preset("tsm-only", lambda: kdk.LogitDistill(temperature=TEMPERATURE, teacher_topk_scale=kdk.TopKScale(k=TOPK)),
           "topkd_loss(s, t, y, tdl_weight=0) (KD on the TSM-scaled teacher)"),
]}


@dataclass(frozen=True)
class ShapeClass:
    name: str
    #: the real row length
    C: int
    #: the row length the interpreter runs (the real one for single-block rows)
    interp_C: int
    #: forced BLOCK_C of the interpreter run (None: the engine's own choice)
    interp_block: Optional[int]
    #: rows of the interpreter run
    interp_N: int

    @property
    def streamed(self) -> bool:
        return self.interp_block is not None

    @property
    def standin(self) -> str:
        if not self.streamed:
            return f"N={self.interp_N} C={self.C} (real row, engine's block)"
        blocks = self.C // REAL_BLOCK
        return (f"N={self.interp_N} C={self.interp_C} BLOCK_C={self.interp_block} "
                f"({blocks} blocks per row, as V={self.C} in blocks of {REAL_BLOCK})")


SHAPES = {s.name: s for s in [
    ShapeClass("C=1000", 1000, 1000, None, 2),
    ShapeClass("C=4096", 4096, 4096, None, 2),
    ShapeClass("V=32k", 32 * 1024, 32 * 1024 // REAL_BLOCK * STANDIN_BLOCK, STANDIN_BLOCK, 1),
    ShapeClass("V=128k", 128 * 1024, 128 * 1024 // REAL_BLOCK * STANDIN_BLOCK, STANDIN_BLOCK, 1),
]}

#: the smallest streamed stand-in (4 blocks of 16 columns, one row): what CI's budget test runs
STREAMED_SMALL = ShapeClass("streamed (4 blocks)", 4 * REAL_BLOCK, 4 * STANDIN_BLOCK, STANDIN_BLOCK, 1)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(N: int, C: int, dtype: torch.dtype, labels: bool, seed: int = 0, ignored_row: bool = True):
    """Fresh seeded logits ~ 3·N(0, 1) (s, t) and labels (one ignored row when ``ignored_row`` and N ≥ 3)."""
    g = torch.Generator().manual_seed(seed + 7919 * N + C)
    s = (torch.randn(N, C, generator=g) * 3).to(dtype)
    t = (torch.randn(N, C, generator=g) * 3).to(dtype)
    y = torch.randint(0, C, (N,), generator=g) if labels else None
    if y is not None and ignored_row and N >= 3:
        y[1] = -100
    return s, t, y
