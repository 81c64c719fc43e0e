"""The tensor-parallel Triton split on one device: correctness against float64 and time against the unsharded
engine (``python -m benchmarks.tp_check``; a step of ``gpu_check.sh``).

A process group of one rank (nccl on a GPU, gloo on CPU) runs the split's real launches, merges and
collectives (each a no-op copy on one rank): its loss and gradient must equal the unsharded loss on the
same logits, and its time shows what the split costs over the one-launch engine (two launches and two
reads of the row instead of one). Multi-GPU scaling needs more than one device and is not measured here.
On CPU (``TRITON_INTERPRET=1``) it runs a tiny shape as a smoke test.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

import kdkernels as kdk

#: (name, loss) of the presets checked: forward KL + CE (the split's shortest path), JSD (three launches), DKD,
#: a stored top-K teacher with its tail (one exchange, no all_reduce)
PRESETS = {
    "kd+ce": lambda s, t, y, **kw: kdk.kd_loss(s, t, 1.0, labels=y, ce_weight=0.5, **kw),
    "jsd": lambda s, t, y, **kw: kdk.kd_loss(s, t, 1.0, labels=y, divergence=("jsd", 0.5), **kw),
    "dkd": lambda s, t, y, **kw: kdk.dkd_loss(s, t, y, 1.0, 8.0, 4.0, **kw),
    "sparse tail K=64 + ce": lambda s, t, y, **kw: kdk.kd_loss(s, _stored_top_k(t, 64, "tail"), 1.0, labels=y,
                                                            ce_weight=0.5, **kw),
}


def _stored_top_k(t: torch.Tensor, K: int, normalize: str) -> kdk.SparseTeacher:
    """The teacher's top-K log-probabilities, as an offline teacher stores them (cached per tensor)."""
    key = (id(t), K, normalize)
    if key not in _TEACHERS:
        lp = torch.log_softmax(t.float(), -1)
        ids = lp.topk(min(K, t.shape[-1] - 1), -1).indices
        _TEACHERS[key] = kdk.SparseTeacher(ids, lp.gather(-1, ids), normalize)
    return _TEACHERS[key]


_TEACHERS: dict = {}


def _bench(fn, device) -> float:
    if device.type != "cuda":
        return float("nan")
    from triton.testing import do_bench
    return do_bench(fn, warmup=5, rep=30)


def check(rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    s = (torch.randn(rows, vocab, generator=gen) * 3).to(device=device, dtype=dtype)
    t = (torch.randn(rows, vocab, generator=gen) * 3).to(device=device, dtype=dtype)
    y = torch.randint(0, vocab, (rows,), generator=gen).to(device)
    y[::9] = -100
    group = dist.group.WORLD
    out = {}
    for name, fn in PRESETS.items():
        s64 = s.double().requires_grad_()
        ref = fn(s64, t.double(), y, backend="reference")
        ref.backward()
        x = s.clone().requires_grad_()
        loss = fn(x, t, y, process_group=group, backend="triton")
        loss.backward()
        err_loss = ((loss.double() - ref).abs() / ref.abs().clamp(min=1e-30)).item()
        err_grad = ((x.grad.double() - s64.grad).norm() / s64.grad.norm()).item()

        def split_step():
            fn(s.requires_grad_(), t, y, process_group=group, backend="triton").backward()

        def engine_step():
            fn(s.requires_grad_(), t, y, backend="triton").backward()
        out[name] = {"loss_rel_err": err_loss, "grad_rel_err": err_grad,
                     "split_ms": _bench(split_step, device), "engine_ms": _bench(engine_step, device)}
        s.grad = None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    rows = args.rows or (4096 if cuda else 6)
    vocab = args.vocab or (16_384 if cuda else 37)   # a 128k vocabulary over 8 ranks
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    try:
        result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "rows": rows, "vocab_shard": vocab,
                  "dtype": "bfloat16" if cuda else "float32",
                  "presets": check(rows, vocab, torch.bfloat16 if cuda else torch.float32, device)}
    finally:
        dist.destroy_process_group()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
