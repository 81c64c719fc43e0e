"""Vocabulary-parallel distillation: each rank holds a shard of the student's and teacher's lm_head.

Run on CPUs (gloo) or GPUs (nccl, one GPU per rank):

    torchrun --nproc-per-node 2 examples/tensor_parallel.py
    torchrun --nproc-per-node 3 examples/tensor_parallel.py --vocab 1001 --steps 3

Each rank owns the classes ``[offset, offset + V_r)`` of a ``V``-class vocabulary (shards of unequal width
when P does not divide V), computes its logits ``[N, V_r]`` from its weight shard, and calls the loss with
``process_group=``: the loss is the unsharded one on every rank, and the gradient each rank receives is the
slice of the unsharded gradient that belongs to its shard. Only per-row statistics cross ranks. At the end
rank 0 checks the first step against the unsharded loss and gradient (the whole weights are built from the
same seed on every rank).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import kdkernels as kdk


def shard_bounds(vocab: int, rank: int, world: int) -> tuple:
    """``(offset, width)`` of rank's shard: the first ``vocab % world`` ranks take one class more."""
    base, extra = divmod(vocab, world)
    width = base + (rank < extra)
    return rank * base + min(rank, extra), width


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=503)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda" if cuda else "cpu")
    offset, width = shard_bounds(args.vocab, rank, world)

    gen = torch.Generator().manual_seed(0)  # the same full weights on every rank; each keeps its rows
    W_student = torch.randn(args.vocab, args.hidden, generator=gen) * 0.2
    W_teacher = torch.randn(args.vocab, args.hidden, generator=gen) * 0.2
    student_shard = W_student[offset:offset + width].clone().to(device).requires_grad_()
    teacher_shard = W_teacher[offset:offset + width].to(device)
    opt = torch.optim.SGD([student_shard], lr=0.5)
    loss_fn = kdk.nn.KDLoss(2.0, ce_weight=0.5, process_group=dist.group.WORLD)

    for step in range(args.steps):
        batch = torch.Generator().manual_seed(100 + step)
        h = torch.randn(args.tokens, args.hidden, generator=batch).to(device)
        labels = torch.randint(0, args.vocab, (args.tokens,), generator=batch).to(device)
        labels[::7] = -100                                  # padding / prompt tokens
        s = h @ student_shard.T                             # [N, V_r]: this rank's logits only
        with torch.no_grad():
            t = h @ teacher_shard.T
        loss = loss_fn(s, t, labels)                        # global labels, the unsharded loss
        opt.zero_grad()
        loss.backward()                                     # every rank calls backward
        if step == 0:
            grad = student_shard.grad.detach().cpu()
            W_full = W_student.clone().requires_grad_()
            full = kdk.kd_loss(h.cpu() @ W_full.T, h.cpu() @ W_teacher.T, 2.0, labels=labels.cpu(),
                               ce_weight=0.5)
            full.backward()
            assert torch.allclose(loss.detach().cpu(), full.detach(), rtol=1e-5, atol=1e-6), (loss, full)
            assert torch.allclose(grad, W_full.grad[offset:offset + width], rtol=1e-4, atol=1e-6)
        opt.step()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.6f} (P = {world}, shard widths "
                  f"{[shard_bounds(args.vocab, r, world)[1] for r in range(world)]})")
    if rank == 0:
        print("the sharded loss and gradient equal the unsharded ones")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
