"""Named benchmark shapes: the cases of each suite, and the random inputs of a case.

A *case* is one (method, shape, dtype). Logit methods take ``s``, ``t``: ``[N, C]`` and labels ``[N]``;
the contrastive method (``infonce``) takes ``a``, ``b``: ``[M, D]`` (N = M rows, C = D columns); a sparse
method (``sparse_renorm``, ``sparse_tail``) takes the student ``[N, C]`` and a stored top-K teacher
``kdk.SparseTeacher(ids int64 [N, K], logprobs float32 [N, K], normalize)`` (``Case.K``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import kdkernels as kdk

LOGIT_METHODS = ("kd", "dkd", "dtkd", "ldrld", "topkd", "aekt")
#: the LLM family on dense teacher logits (divergences, dense top-k with a tail bucket)
LLM_METHODS = ("reverse_kl", "jsd", "tvd", "topk_tail")
#: the LLM family against a stored top-K teacher (its normalisation: the name's suffix)
SPARSE_METHODS = ("sparse_renorm", "sparse_tail")
CONTRASTIVE_METHODS = ("infonce",)
#: the LLM family from hidden states (``kdk.fused_linear_distill``, benchmarks/linear.py): forward KL and
#: JSD(β = 0.5) on a dense teacher, and the stored top-K teacher renormalised / with a tail bucket
LINEAR_METHODS = ("linear_kl", "linear_jsd", "linear_renorm", "linear_tail")
LINEAR_SPARSE_METHODS = ("linear_renorm", "linear_tail")
METHODS = LOGIT_METHODS + LLM_METHODS + SPARSE_METHODS + CONTRASTIVE_METHODS + LINEAR_METHODS
#: the stored top-K teacher's element types (ids as torch.topk returns them, log-probabilities in float32)
SPARSE_IDS_DTYPE, SPARSE_LOGPROBS_DTYPE = torch.int64, torch.float32
#: teacher rows made at a time for a sparse case (bounds the dense float32 teacher behind the top-K)
SPARSE_TEACHER_ROWS = 1024
#: k of the dense top-k method (``kdk.TopK(64, "tail")``, benchmarks/presets.py)
TOPK_TAIL_K = 64
_INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}

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
    K: int = 0      # slots of a sparse (stored top-K) teacher; 0 for a dense teacher
    H: int = 0      # hidden size of a fused-linear case (C is then the vocabulary V); 0 otherwise

    @property
    def family(self) -> str:
        if self.method in LINEAR_METHODS:
            return "linear"
        return "contrastive" if self.method in CONTRASTIVE_METHODS else "logit"

    @property
    def sparse(self) -> bool:
        return self.method in SPARSE_METHODS + LINEAR_SPARSE_METHODS

    @property
    def normalize(self) -> str:
        """The sparse teacher's normalisation (``sparse_renorm`` → ``"renorm"``)."""
        return self.method.split("_", 1)[1]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def shape(self) -> str:
        if self.family == "contrastive":
            return f"M={self.N} D={self.C}"
        if self.family == "linear":
            return f"N={self.N} H={self.H} V={self.C}" + (f" K={self.K}" if self.K else "")
        return f"N={self.N} C={self.C}" + (f" K={self.K}" if self.K else "")

    @property
    def elements(self) -> int:
        """The largest tensor a plain implementation holds: [N, C], or the [M, M] similarity matrix."""
        return self.N * max(self.C, self.N) if self.family == "contrastive" else self.N * self.C

    @property
    def label(self) -> str:
        return f"{self.method} {self.shape} {self.dtype}"


def sparse_slot_bytes() -> int:
    """Bytes of one stored top-K slot (an id and a log-probability)."""
    return SPARSE_IDS_DTYPE.itemsize + SPARSE_LOGPROBS_DTYPE.itemsize


def min_bytes(case: Case, mode: str) -> int:
    """The fewest bytes a pass must move: read s and t once (fwd), and write the gradient once (fwd+bwd).
    A sparse teacher is its N·K slots: read s once (+ write the gradient) and the K ids and logprobs.
    A fused-linear case counts the student's operands: read h [N, H] and W [V, H] (fwd), and write ∂h, ∂W
    once more (fwd+bwd), plus a sparse teacher's slots (a dense teacher is not counted: its form varies)."""
    if case.family == "linear":
        operands = (case.N + case.C) * case.H * case.itemsize
        return (1 if mode == "fwd" else 2) * operands + case.N * case.K * sparse_slot_bytes()
    if case.sparse:
        return (1 if mode == "fwd" else 2) * case.N * case.C * case.itemsize + case.N * case.K * sparse_slot_bytes()
    reads_writes = 2 if mode == "fwd" else 3
    return reads_writes * case.N * case.C * case.itemsize


def min_flops(case: Case, mode: str) -> int:
    """Contrastive (the similarity matrix): 2·M²·D for fwd, 4·M²·D for fwd+bwd; fused linear (the
    student's dense lm_head matmuls, ``z = h·Wᵀ``, ``∂h = g·W``, ``∂W = gᵀ·h``): 2·N·V·H for fwd, 6·N·V·H
    for fwd+bwd (a sparse renorm teacher needs only the K gathered columns: its rate is dense-equivalent);
    0 for logit rows."""
    if case.family == "linear":
        return (2 if mode == "fwd" else 6) * case.N * case.C * case.H
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
#: the LLM family's headline rows (after the classic ones: lower priority): dense reverse KL and JSD, and
#: the stored top-K teacher with K = 64, renormalised and with a tail bucket, at N = 16k V = 128k bf16
HEADLINE_LLM_METHODS = ("reverse_kl", "jsd")
HEADLINE_SPARSE_K = 64
#: the sparse (stored top-K) teacher: N = 16k tokens at V = 128k / 256k, K = 64, 128, 256
SPARSE_LLM = [(16 * K, 128 * K), (16 * K, 256 * K)]
SPARSE_KS = (64, 128, 256)
#: the LLM family on a CPU: one small shape (seconds per row, not a GPU shape)
LLM_CPU = [(64, 32 * K)]
#: fused linear (N, V, H): an N sweep at H = 4096, V = 128k, a V sweep at N = 16k and H = 2048 at 16k x 128k;
#: the JSD row and the sparse (K = 64) teacher at fewer shapes; on a CPU one small fp32 shape
LINEAR_LLM = [(4 * K, 128 * K, 4096), (16 * K, 128 * K, 4096), (32 * K, 128 * K, 4096),
              (16 * K, 32 * K, 4096), (16 * K, 256 * K, 4096), (16 * K, 128 * K, 2048)]
LINEAR_JSD = [(16 * K, 128 * K, 4096)]
LINEAR_SPARSE = [(4 * K, 128 * K, 4096), (16 * K, 128 * K, 4096), (16 * K, 256 * K, 4096)]
LINEAR_K = 64
LINEAR_CPU = [(512, 8 * K, 64)]
#: the fused-linear headline of one GPU call (benchmarks/gpu_check.sh): forward KL, every provider
HEADLINE_LINEAR = [(16 * K, 128 * K, 4096)]


def suite_cases(suite: str, device_type: str, methods=None, dtypes=None) -> list:
    """The cases of a named suite on a device type ("cpu" or "cuda"), filtered by methods and dtypes."""
    if suite == "all":
        return [c for s in ("imagenet", "llm", "contrastive") for c in suite_cases(s, device_type, methods, dtypes)]
    gpu = device_type == "cuda"
    if suite in ("llm-linear", "headline-linear", "tiny-linear"):
        return _linear_cases(suite, gpu, methods, dtypes)
    grids = {  # suite -> [(methods, [(N, C)] or [(N, C, K)], default dtypes)]
        "imagenet": [(LOGIT_METHODS, IMAGENET, ("fp32", "bf16"))],
        "llm": [(LOGIT_METHODS, LLM, ("bf16",)),
                (LLM_METHODS, LLM if gpu else LLM_CPU, ("bf16",)),
                (SPARSE_METHODS, [(n, c, k) for n, c in (SPARSE_LLM if gpu else LLM_CPU) for k in SPARSE_KS],
                 ("bf16",))],
        "contrastive": [(CONTRASTIVE_METHODS, CONTRASTIVE, ("fp32", "bf16"))],
        "quick": ([(LOGIT_METHODS, [(256, 1000)], ("fp32",))] if device_type != "cuda" else
                  [(LOGIT_METHODS, [(1024, 1000)], ("fp32",)), (LOGIT_METHODS, [(4 * K, 32 * K)], ("bf16",))]),
        # one GPU call: ImageNet N = 1024/8192 C = 1000 fp32, LLM N = 16k V = 128k bf16
        "headline": [(HEADLINE_METHODS, HEADLINE_IMAGENET, ("fp32",)), (HEADLINE_METHODS, HEADLINE_LLM, ("bf16",)),
                     (HEADLINE_LLM_METHODS, HEADLINE_LLM, ("bf16",)),
                     (SPARSE_METHODS, [(n, c, HEADLINE_SPARSE_K) for n, c in HEADLINE_LLM], ("bf16",))],
        # a few-second suite for the tests and for trying the harness
        "tiny": [(LOGIT_METHODS, [(8, 40)], ("fp32",)), (CONTRASTIVE_METHODS, [(16, 8)], ("fp32",)),
                 (LLM_METHODS, [(8, 256)], ("fp32",)), (SPARSE_METHODS, [(8, 256, 64)], ("fp32",))],
    }
    if suite not in grids:
        raise ValueError(f"unknown suite {suite!r}; choose one of {sorted(grids) + ['all']}")
    out = []
    for suite_methods, grid, default_dtypes in grids[suite]:
        for dt in (dtypes or default_dtypes):
            for m in suite_methods:
                if methods is None or m in methods:
                    out.extend(Case(suite, m, *shape[:2], dt, *shape[2:]) for shape in grid)
    return out


def _linear_cases(suite: str, gpu: bool, methods, dtypes) -> list:
    """Fused-linear cases: ``Case(suite, method, N, V, dtype, K, H)``."""
    dense, sparse = ("linear_kl",), LINEAR_SPARSE_METHODS
    if suite == "tiny-linear":  # the tests: seconds on a CPU
        grids = [(LINEAR_METHODS, [(16, 256, 8)], ("fp32",))]
    elif suite == "headline-linear":
        grids = [(dense, HEADLINE_LINEAR, ("bf16",))]
    elif gpu:
        grids = [(dense, LINEAR_LLM, ("bf16",)), (("linear_jsd",), LINEAR_JSD, ("bf16",)),
                 (sparse, LINEAR_SPARSE, ("bf16",))]
    else:
        grids = [(LINEAR_METHODS, LINEAR_CPU, ("fp32",))]
    out = []
    for suite_methods, grid, default_dtypes in grids:
        for dt in (dtypes or default_dtypes):
            for m in suite_methods:
                if methods is None or m in methods:
                    out.extend(Case(suite, m, n, v, dt, LINEAR_K if m in sparse else 0, h) for n, v, h in grid)
    return out


def make_inputs(case: Case, device, seed: int = 0):
    """Fresh random inputs (never zeros): logits ~ 3·N(0, 1) with labels, or feature rows ~ N(0, 1); a
    sparse case's teacher is the top-K of dense teacher logits ~ 3·N(0, 1) (:func:`sparse_teacher`); a
    dense top-k case's teacher has an unambiguous top-k set (:func:`untie_top_k`)."""
    g = torch.Generator(device=device).manual_seed(seed + 7919 * case.N + case.C)
    if case.sparse:
        s = (torch.randn(case.N, case.C, generator=g, device=device, dtype=torch.float32) * 3.0).to(case.torch_dtype)
        t = sparse_teacher(case, g, device)
        return s, t, torch.randint(0, case.C, (case.N,), generator=g, device=device)
    scale = 1.0 if case.family == "contrastive" else 3.0
    s = (torch.randn(case.N, case.C, generator=g, device=device, dtype=torch.float32) * scale).to(case.torch_dtype)
    t = (torch.randn(case.N, case.C, generator=g, device=device, dtype=torch.float32) * scale).to(case.torch_dtype)
    if case.family == "contrastive":
        t = (t + s.float()).to(case.torch_dtype)  # a teacher correlated with the student, like real features
        return s, t, None
    if case.method == "topk_tail":
        t = untie_top_k(t, TOPK_TAIL_K)
    return s, t, torch.randint(0, case.C, (case.N,), generator=g, device=device)


def sparse_teacher(case: Case, g: torch.Generator, device) -> kdk.SparseTeacher:
    """The stored top-K of random dense teacher logits ~ 3·N(0, 1): the K largest log-probabilities
    (float32) and their int64 ids, made ``SPARSE_TEACHER_ROWS`` rows at a time (no [N, C] teacher kept)."""
    ids = torch.empty(case.N, case.K, dtype=SPARSE_IDS_DTYPE, device=device)
    logprobs = torch.empty(case.N, case.K, dtype=SPARSE_LOGPROBS_DTYPE, device=device)
    for a in range(0, case.N, SPARSE_TEACHER_ROWS):
        b = min(case.N, a + SPARSE_TEACHER_ROWS)
        t = torch.randn(b - a, case.C, generator=g, device=device, dtype=torch.float32) * 3.0
        top = torch.log_softmax(t, dim=-1).topk(case.K, dim=-1)
        logprobs[a:b], ids[a:b] = top.values, top.indices
    return kdk.SparseTeacher(ids, logprobs, case.normalize)


def teacher_rows(t, a: int, b: int):
    """Rows ``a:b`` of a dense teacher or of a sparse one."""
    if isinstance(t, kdk.SparseTeacher):
        return kdk.SparseTeacher(t.ids[a:b], t.logprobs[a:b], t.normalize)
    return t[a:b]


def teacher_as(t, dtype: torch.dtype):
    """The teacher's values in ``dtype`` (a sparse teacher: its log-probabilities; the ids stay)."""
    if isinstance(t, kdk.SparseTeacher):
        return kdk.SparseTeacher(t.ids, t.logprobs.to(dtype), t.normalize)
    return t.to(dtype)


def _next_up(x: torch.Tensor) -> torch.Tensor:
    """The next representable value above each (finite) entry of ``x``, in ``x``'s dtype (bit pattern ± 1)."""
    bits = x.view(_INT_OF[x.element_size()])
    step = torch.where(x >= 0, torch.ones_like(bits), -torch.ones_like(bits))
    return torch.where(x == 0, torch.full_like(x, torch.finfo(x.dtype).tiny), (bits + step).view(x.dtype))


def untie_top_k(t: torch.Tensor, k: int) -> torch.Tensor:
    """``t`` with its top-k set made unambiguous: entries of the k largest that equal the (k+1)-th are raised
    to the next representable value. 16-bit logits tie often at the k-th place of a long row (bf16 holds 8
    significant bits); then which tied class joins the support is a free choice (kdkernels takes the lower
    index, ``torch.topk`` any), and an honest baseline would differ from the reference by the choice only."""
    vals, idx = t.topk(k + 1, dim=-1)
    boundary = vals[:, k:]
    return t.scatter(1, idx[:, :k], torch.maximum(vals[:, :k], _next_up(boundary)))
