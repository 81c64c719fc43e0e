"""Shared test setup: seeded fresh inputs, the GPU marker, the backends available here, and the `slow`
marker of `make test-fast`."""
import os
import re

import pytest
import torch

#: node-id patterns (`*` matches anything; brackets are literal) of the tests that `make test-fast` (``-m "not slow"``) leaves out: measured
#: with ``--durations=0`` on 2 cores under TRITON_INTERPRET=1 (the whole suite took 24.5 min); together
#: they take ~21 min of it. Ahead-of-time GPU compiles, the Triton-interpreted gradchecks (the C++
#: backend's stay), the 16-bit Triton parity matrix (fp32/fp64 stay), nvcc compiles and the largest
#: contrastive sweeps. `make test` (CI) runs everything.
SLOW = (
    "tests/test_triton_aot.py::*",                                        # ~250 s: sm_80/sm_90 compiles
    "tests/test_info_nce.py::test_aot_*",                                 # ~250 s
    "tests/test_parity.py::test_gradcheck*triton]",                        # ~330 s
    "tests/test_parity.py::test_matrix[*-fp16-triton]",                    # ~60 s
    "tests/test_parity.py::test_matrix[*-bf16-triton]",                    # ~30 s
    "tests/test_parity.py::test_fp16_gradient_keeps_a_loss_scale[triton]",  # ~45 s
    "tests/test_parity.py::test_inplace_writes_gradient_into_logits[triton]",
    "tests/test_parity.py::test_leading_dims[triton]",
    "tests/test_parity.py::test_multi_block[*-triton]",
    "tests/test_info_nce.py::test_msd_parity*",                            # ~90 s
    "tests/test_info_nce.py::test_gradcheck_float64",                      # ~50 s
    "tests/test_info_nce.py::test_module_level_tile_override_forces_multi_tile",
    "tests/test_info_nce.py::test_parity[G1-M200-*",
    "tests/test_cpp.py::test_cuda_sources_compile*",                       # nvcc, ~35 s
    "tests/test_cpp.py::test_cuda_binding_syntax",
    "tests/test_compile.py::test_compile_fullgraph_cpu_twin",
    # the LLM family: interpreted gradchecks, compiles and the sm_80/sm_90 AOT of the new kernels
    "tests/test_llm.py::test_gradcheck_float64[*-triton]",
    "tests/test_llm.py::test_compile_fullgraph[*]",
    "tests/test_triton_llm.py::test_llm_configurations_compile_for_sm90_without_spills",
    "tests/test_triton_llm.py::test_softcap_with_every_preset_float64*",
    "tests/test_triton_sparse.py::test_compiles_for_sm80_and_sm90",
    "tests/test_linear.py::test_torch_compile_across_the_call[*]",
    # tensor parallel: the spawned gloo groups (~100 s), the torchrun example and the GPU-check step
    "tests/test_parallel.py::test_*[P*]",
    "tests/test_parallel.py::test_example_runs_under_torchrun",
    "tests/test_parallel.py::test_gpu_check_tp_step_runs_on_cpu",
)


_SLOW_RE = re.compile("|".join(".*".join(map(re.escape, pattern.split("*"))) for pattern in SLOW))


def is_slow(nodeid: str) -> bool:
    return _SLOW_RE.fullmatch(nodeid) is not None


def pytest_collection_modifyitems(config, items):
    slow = pytest.mark.slow
    for item in items:
        if is_slow(item.nodeid):
            item.add_marker(slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen(request):
    """A generator seeded from the test's id: fresh inputs per test, reproducible per test."""
    seed = abs(hash(request.node.nodeid)) % (2 ** 31) if os.environ.get("PYTHONHASHSEED") else \
        sum(map(ord, request.node.nodeid)) * 7919 % (2 ** 31)
    return torch.Generator().manual_seed(seed)
