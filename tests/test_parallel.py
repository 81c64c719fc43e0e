"""Tensor (vocabulary) parallel distillation on spawned gloo groups of 2 and 3 CPU processes with unequal
shards (docs/tensor_parallel.md): for every preset family × {float64, float32} the loss on every rank equals
the unsharded loss and each rank's gradient its slice of the unsharded gradient (float64 ≤ 1e-12 relative);
a learnable temperature's and the hidden states' gradients (replicated inputs) are exact on every rank;
ignored rows, labels on every rank or on one rank only, −inf columns confined to one shard, top-k entries
all on one rank, ties across shard boundaries, sparse teachers with padding, DTensor logits, fused linear
distillation with a sharded weight; and the bytes each rank sends do not grow with the vocabulary.
The cases and the worker: tests/parallel_cases.py."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kdkernels as kdk
from parallel_cases import CASES, SPARSE_CASES, SPLIT, SPLIT_CASES, TOL, N, worker

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

ROOT = Path(__file__).resolve().parents[1]
NAMES = (list(CASES) + list(SPARSE_CASES) + ["temperature", "fused_linear", "dtensor"]
         + (list(SPLIT_CASES) + [f"split_{name}" for name in SPARSE_CASES] + ["split_fused_linear"] if SPLIT else []))
#: the Triton split's special cases (tests/parallel_cases.run_split_special): tolerance of loss and gradient
SPLIT_SPECIAL_TOL = {"streamed": 1e-12, "streamed_jsd": 1e-12, "row_temperature": 1e-12,
                     "bf16_student_fp32_teacher": 1e-2, "fp16": 2e-3, "masked_one_shard_nan_row": 1e-12,
                     "no_grad": 1e-12, "learnable_temperature_batchmean": 1e-12, "learnable_temperature_none": 1e-12,
                     "sparse_tail_streamed_bad_id": 1e-12, "topk_renorm_nan_outside_support": 1e-12, "sparse_renorm_streamed_bad_id": 1e-12}
DTYPES = {"float64": torch.float64, "float32": torch.float32}


@pytest.fixture(scope="module", params=[2, 3], ids=["P2", "P3"])
def group_results(request, tmp_path_factory):
    """Every case's errors on every rank of one spawned gloo group (one spawn per group size)."""
    world = request.param
    out = tmp_path_factory.mktemp(f"tp{world}")
    try:
        mp.spawn(worker, args=(world, str(out / "rendezvous"), str(out)), nprocs=world, join=True)
    except Exception as exc:  # a rank failed: show its traceback
        reports = [json.load(open(out / f)) for f in sorted(os.listdir(out)) if f.endswith(".json")]
        errors = "\n".join(r.get("error", "") for r in reports)
        pytest.fail(f"the spawned group failed: {exc}\n{errors}")
    return world, [json.load(open(out / f"rank{r}.json")) for r in range(world)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_preset_matches_unsharded(group_results, dtype):
    world, ranks = group_results
    tol = TOL[DTYPES[dtype]]
    failures = []
    for rank, res in enumerate(ranks):
        for name in NAMES:
            errs = res[f"{name}-{dtype}"]
            if not all(e <= tol for e in errs):
                failures.append(f"P={world} rank {rank} {name}: loss/gradient errors {errs} > {tol}")
    assert not failures, "\n".join(failures)


@pytest.mark.skipif(not SPLIT, reason="the Triton split runs on CUDA or under TRITON_INTERPRET=1")
def test_triton_split_special_cases(group_results):
    """Streamed rows, a per-row temperature, mixed bf16/fp32, fp16, no_grad, a student row −inf on one shard
    only, a NaN on one shard, a learnable temperature (its gradient on every rank): each rank's loss and
    gradient slice equal the unsharded ones."""
    world, ranks = group_results
    failures = []
    for rank, res in enumerate(ranks):
        for name, tol in SPLIT_SPECIAL_TOL.items():
            errs = res["split_special"][name]
            if not all(e <= tol for e in errs):
                failures.append(f"P={world} rank {rank} {name}: loss/gradient errors {errs} > {tol}")
    assert not failures, "\n".join(failures)


def test_communication_does_not_grow_with_the_vocabulary(group_results):
    """The statistics each rank sends per step (forward + backward) are O(N·k): the same bytes at 4× the
    vocabulary, and a few values per row (KD: under 24 four-byte values per row and rank, LDRLD with k = 5:
    under 24 + 8k)."""
    world, ranks = group_results
    for res in ranks:
        comm = res["communication"]
        for label in ("kd", "ldrld"):
            small, large = comm[f"{label}-x1"], comm[f"{label}-x4"]
            assert small == large, (label, small, large)
        kd_bytes, ldrld_bytes = comm["kd-x1"][0], comm["ldrld-x1"][0]
        assert 0 < kd_bytes <= 24 * 4 * N * world
        assert kd_bytes < ldrld_bytes <= (24 + 8 * 5) * 4 * N * world


def test_refusals_and_the_compile_boundary(group_results):
    """On the ranks: backend="cpu" (no C++ split), backend="triton" for a preset outside the split, inplace
    and the contrastive term raise clear errors; under torch.compile the sharded loss is a graph break and
    gives the eager loss and gradient."""
    world, ranks = group_results
    for res in ranks:
        checks = res["boundary"]
        errs = checks.pop("compiled")
        assert all(e <= 1e-12 for e in errs), errs
        assert checks and all(checks.values()), checks


def test_errors_at_the_boundary():
    """Without an initialised group, and for what the sharded path does not take: clear errors."""
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="not initialized"):
            kdk.kd_loss(s, t, process_group=object())
    with pytest.raises(ValueError, match="both vocab_offset and vocab_size"):
        from kdkernels.parallel import shard_layout
        shard_layout(None, 5, "cpu", vocab_offset=0)


def _documented_table() -> dict:
    """docs/tensor_parallel.md's communication table: preset → [collectives fwd, bytes/row fwd, collectives
    bwd, bytes/row bwd]."""
    text = (ROOT / "docs" / "tensor_parallel.md").read_text(encoding="utf-8")
    section = text.split("## Communication per step", 1)[1].split("\n## ", 1)[0]
    table = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and re.fullmatch(r"[\d.]+", cells[1]):
            table[cells[0]] = [float(c) for c in cells[1:]]
    return table


def test_documented_communication_is_what_the_collectives_carry(group_results):
    """Every row of the docs' communication table equals the payload counted on every rank at P = 2 (the
    split's rows where Triton runs), and every measured preset is documented."""
    world, ranks = group_results
    if world != 2:
        pytest.skip("the table is stated for P = 2")
    documented = _documented_table()
    for rank, res in enumerate(ranks):
        measured = res["communication_table"]
        assert set(measured) <= set(documented), sorted(set(measured) - set(documented))
        for name, values in measured.items():
            assert values == documented[name], (rank, name, values, documented[name])
        missing = set(documented) - set(measured)
        assert not missing or not SPLIT and all(name.endswith(", split") for name in missing), missing


def test_example_runs_under_torchrun(tmp_path):
    """examples/tensor_parallel.py (the README's command) on 2 gloo ranks: it asserts the sharded loss and
    gradient equal the unsharded ones."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(ROOT / "examples" / "tensor_parallel.py"), "--steps", "1"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "equal the unsharded ones" in out.stdout


@pytest.mark.skipif(not SPLIT, reason="the Triton split runs on CUDA or under TRITON_INTERPRET=1")
def test_gpu_check_tp_step_runs_on_cpu():
    """benchmarks.tp_check (gpu_check.sh's tensor-parallel step) on a one-rank gloo group: the split equals
    the float64 reference on a tiny shape."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT="29547")
    out = subprocess.run([sys.executable, "-m", "benchmarks.tp_check"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    for name, row in result["presets"].items():
        assert row["loss_rel_err"] < 1e-5 and row["grad_rel_err"] < 1e-5, (name, row)
