"""The presets and shape classes the static measurements (``python -m benchmarks.static``) cover.

A preset is a :class:`kdkernels.LogitDistill` spec evaluated through the public entry point
``kdkernels.logit_distill`` — the same spec that ``kd_loss``/``dkd_loss``/… build with their defaults.
A sparse preset (``sparse_renorm``, ``sparse_tail``, ``sparse_renorm+ce``) is given the stored top-K of
the dense teacher (``kdk.SparseTeacher(ids, logprobs, normalize)``, K = 64) instead of its logits.
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
import torch.nn.functional as F

import kdkernels as kdk

#: the engine's block size for streamed rows (``MAX_BLOCK_C`` of the Triton engine)
REAL_BLOCK = 4096
#: the forced block size of the interpreter stand-in for streamed rows
STANDIN_BLOCK = 16
TEMPERATURE = 4.0
TOPK = 5
#: the LLM family (docs/divergences.md, docs/topk_teachers.md): temperature 1, TRL's default β, the dense
#: top-k and the sparse teacher's K of the static presets
LLM_TEMPERATURE = 1.0
JSD_BETA = 0.5
DENSE_TOPK = 64
SPARSE_K = 64
#: the narrowest row the top-k presets are measured on (k = 64 classes and a tail that is not empty)
TOPK_MIN_C = 4 * DENSE_TOPK


def sparse_teacher(t: torch.Tensor, K: int, normalize: str) -> kdk.SparseTeacher:
    """A stored top-K teacher from dense teacher logits ``t``: its ``K`` largest log-probabilities
    (float32, temperature 1) and their int64 ids, as a distillation data set stores them."""
    logprobs, ids = F.log_softmax(t.float(), dim=-1).topk(K, dim=-1)
    return kdk.SparseTeacher(ids.contiguous(), logprobs.contiguous(), normalize)


@dataclass(frozen=True)
class Preset:
    name: str
    spec: Callable[[], kdk.LogitDistill]
    #: the public function (with its defaults) that builds the same spec
    public: str
    #: the normalisation of a sparse (top-K) teacher; None: dense teacher logits
    sparse: Optional[str] = None
    #: the narrowest row the preset is defined on (the tiny launch/host inputs are widened to it)
    min_C: int = 0

    def build(self) -> kdk.LogitDistill:
        return self.spec()

    @property
    def needs_labels(self) -> bool:
        return self.build().needs_labels

    def teacher(self, t: torch.Tensor):
        """What the preset is given as its teacher: the dense logits ``t``, or their stored top-K
        (:func:`sparse_teacher`, K = ``SPARSE_K``) for a sparse preset."""
        return t if self.sparse is None else sparse_teacher(t, SPARSE_K, self.sparse)


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
    # --- the LLM family (issue 12): divergences, dense top-k with a tail, the sparse (stored top-K) teacher
    Preset("reverse_kl", lambda: kdk.LogitDistill(temperature=LLM_TEMPERATURE, divergence="reverse_kl"),
           "kd_loss(s, t, 1.0, divergence='reverse_kl') (torchtune ReverseKLLoss)"),
    Preset("jsd", lambda: kdk.LogitDistill(temperature=LLM_TEMPERATURE, divergence=kdk.JSD(JSD_BETA)),
           "kd_loss(s, t, 1.0, divergence=kdk.JSD(0.5)) (TRL generalized_jsd_loss)"),
    Preset("tvd", lambda: kdk.LogitDistill(temperature=LLM_TEMPERATURE, divergence="tvd"),
           "kd_loss(s, t, 1.0, divergence='tvd')"),
    Preset("topk_tail", lambda: kdk.LogitDistill(temperature=LLM_TEMPERATURE,
                                                 teacher_topk=kdk.TopK(DENSE_TOPK, "tail")),
           "kd_loss(s, t, 1.0, teacher_topk=kdk.TopK(64, 'tail'))", min_C=TOPK_MIN_C),
    Preset("sparse_renorm", lambda: kdk.LogitDistill(temperature=LLM_TEMPERATURE),
           "kd_loss(s, kdk.SparseTeacher(ids, logprobs, 'renorm'), 1.0), K = 64", sparse="renorm", min_C=TOPK_MIN_C),
    Preset("sparse_tail", lambda: kdk.LogitDistill(temperature=LLM_TEMPERATURE),
           "kd_loss(s, kdk.SparseTeacher(ids, logprobs, 'tail'), 1.0), K = 64", sparse="tail", min_C=TOPK_MIN_C),
    Preset("sparse_renorm+ce", lambda: kdk.LogitDistill(temperature=LLM_TEMPERATURE, ce_weight=1.0),
           "kd_loss(s, kdk.SparseTeacher(ids, logprobs, 'renorm'), 1.0, labels=y, ce_weight=1.0), K = 64",
           sparse="renorm", min_C=TOPK_MIN_C),
]}

#: the presets of the LLM family (issue 12) and the sparse-teacher ones among them
LLM_PRESETS = ("reverse_kl", "jsd", "tvd", "topk_tail", "sparse_renorm", "sparse_tail", "sparse_renorm+ce")
SPARSE_PRESETS = tuple(name for name in LLM_PRESETS if PRESETS[name].sparse is not None)
#: the presets before the LLM family (their budgets: tests/test_budgets.py)
CLASSIC_PRESETS = tuple(name for name in PRESETS if name not in LLM_PRESETS)


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
#: the streamed stand-in of the top-k presets in CI (16 blocks of 16 columns: room for k = 64 and a tail)
STREAMED_TOPK = ShapeClass("streamed (16 blocks)", 16 * REAL_BLOCK, 16 * STANDIN_BLOCK, STANDIN_BLOCK, 1)

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
