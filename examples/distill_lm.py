"""Distil a small student language model from a small teacher with the loss straight from hidden states.

Both models are randomly initialised ``nn.Module``s defined here (no downloads): an embedding, a few
pre-norm MLP blocks, an lm_head. Token batches carry padding (label -100) and prompt tokens (ignored).
Each run trains a few steps with ``kdk.fused_linear_distill`` for each teacher form — the teacher's logits
(``TeacherLogits``), its hidden states and lm_head (``TeacherHidden``), a stored top-K teacher
(``SparseTeacher``, renorm and tail; captured before the timed steps, as an offline capture is) — and with
the unfused loss (``F.linear`` to full logits, then ``kdk.logit_distill``), each in a fresh process, and
prints the peak memory above the models and batch (the process's peak RSS, measured by the OS, with
glibc told to unmap freed blocks so that it follows the live tensors) and the time per step.

    python examples/distill_lm.py                      # the comparison table (about a minute on 2 cores)
    python examples/distill_lm.py --vocab 32000 --tokens 4096 --hidden 256
    python examples/distill_lm.py --variant hidden     # one variant, in this process
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import kdkernels as kdk

VARIANTS = ("unfused", "logits", "hidden", "sparse-renorm", "sparse-tail")
#: allocations above this many bytes are mmap'd and unmapped when freed (MALLOC_MMAP_THRESHOLD_)
MMAP_THRESHOLD_BYTES = 1 << 17


class TinyLM(nn.Module):
    """Embedding → ``depth`` residual MLP blocks → final norm; ``lm_head`` maps hidden states to logits."""

    def __init__(self, vocab: int, hidden: int, depth: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 2 * hidden), nn.GELU(),
                                                  nn.Linear(2 * hidden, hidden)) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + block(x)
        return self.norm(x)


def batch(args, gen):
    """Token ids [B, L] and next-token labels with a prompt (ignored) and right padding (ignored)."""
    B, L = args.batch, args.tokens // args.batch
    tokens = torch.randint(0, args.vocab, (B, L), generator=gen)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, :L // 8] = -100                                   # prompt tokens
    lengths = torch.randint(L // 2, L + 1, (B,), generator=gen)
    labels[torch.arange(L)[None, :] >= lengths[:, None]] = -100  # padding
    labels[:, -1] = -100
    return tokens, labels


@torch.no_grad()
def capture_topk(teacher, tokens, K, rows_per_step=256):
    """What an offline capture stores: the teacher's top-K (ids, log-probabilities) per token, computed a
    few rows at a time."""
    t_h = teacher.hidden_states(tokens).reshape(-1, teacher.lm_head.in_features)
    ids, vals = [], []
    for start in range(0, t_h.shape[0], rows_per_step):
        top = torch.log_softmax(teacher.lm_head(t_h[start:start + rows_per_step]), -1).topk(K, dim=-1)
        ids.append(top.indices.to(torch.int32))
        vals.append(top.values)
    shape = tokens.shape + (K,)
    return torch.cat(ids).reshape(shape), torch.cat(vals).reshape(shape)


def loss_fn(variant, student, teacher, tokens, labels, spec, stored, chunk):
    h = student.hidden_states(tokens)
    W = student.lm_head.weight
    if variant.startswith("sparse"):
        normalize = variant.split("-")[1]
        teacher_k = kdk.SparseTeacher(*stored, normalize)
        return kdk.fused_linear_distill(h, W, teacher_k, labels, spec.replace(ce_weight=0.0)
                                        if normalize == "renorm" else spec, chunk_size=chunk)
    with torch.no_grad():
        t_h = teacher.hidden_states(tokens)
    if variant == "hidden":
        return kdk.fused_linear_distill(h, W, kdk.TeacherHidden(t_h, teacher.lm_head.weight), labels, spec,
                                        chunk_size=chunk)
    with torch.no_grad():
        t_logits = teacher.lm_head(t_h)
    if variant == "unfused":
        return kdk.logit_distill(student.lm_head(h), t_logits, labels, spec)
    return kdk.fused_linear_distill(h, W, kdk.TeacherLogits(t_logits), labels, spec, chunk_size=chunk)


def run_variant(args) -> dict:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    student, teacher = TinyLM(args.vocab, args.hidden, 2), TinyLM(args.vocab, args.hidden, 4)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    spec = kdk.LogitDistill(temperature=1.0, ce_weight=0.5)
    batches = [batch(args, gen) for _ in range(args.steps)]
    stored = [capture_topk(teacher, tokens, args.topk) if args.variant.startswith("sparse") else None
              for tokens, _ in batches]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, losses = [], []
    for (tokens, labels), teacher_k in zip(batches, stored):
        start = time.perf_counter()
        loss = loss_fn(args.variant, student, teacher, tokens, labels, spec, teacher_k, args.chunk)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": args.variant, "peak_extra_MiB": (peak - base) / 1024, "ms_per_step": 1e3 * min(times[1:] or times),
            "first_loss": losses[0], "last_loss": losses[-1]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=256, help="token rows per chunk of the fused loss")
    parser.add_argument("--variant", choices=VARIANTS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant] + [f"--{k}={v}" for k, v in vars(args).items()
                                                                  if k != "variant"]
        # glibc returns freed blocks above this size to the OS at once, so the peak RSS tracks the peak of
        # live tensors (with its default, adaptive threshold freed chunks stay mapped and the RSS only grows)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD_BYTES))
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout))
    N, V = args.tokens, args.vocab
    print(f"student/teacher LMs, N = {N} tokens, V = {V}, H = {args.hidden}, chunk {args.chunk}, fp32, CPU, backend "
          f"{kdk.dispatch.resolve('auto', torch.device('cpu'))}; one [N, V] fp32 buffer = {N * V * 4 / 2**20:.0f} MiB")
    print(f"{'variant':<15} {'peak extra MiB':>15} {'ms/step':>10} {'loss first -> last':>22}")
    for r in rows:
        print(f"{r['variant']:<15} {r['peak_extra_MiB']:>15.0f} {r['ms_per_step']:>10.1f} "
              f"{r['first_loss']:>10.4f} -> {r['last_loss']:.4f}")


if __name__ == "__main__":
    main()
