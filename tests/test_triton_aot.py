"""Ahead-of-time compile of every shipped logit-engine configuration for sm_80 and sm_90 (no GPU needed):
the interpreter accepts programs the GPU compiler rejects, so CI compiles the real thing too."""
import pytest
import torch

import kdkernels as kdk

from aot_util import aot_compile
from parity import presets

E = pytest.importorskip("kdkernels._triton.engine")
S = pytest.importorskip("kdkernels._triton.shard")
SP = pytest.importorskip("kdkernels._triton.sparse")

TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def engine_job(spec, dtype, C, label, *, has_labels=True, temp_is_tensor=False, teacher_dtype=None):
    flags = E.kernel_flags(E.unpack(*spec.pack()), learnable=spec.learnable_temperature,
                           has_labels=has_labels, temp_is_tensor=temp_is_tensor,
                           has_gfactor=has_labels, write_grad=True, dtype=dtype, C=C,
                           vec=E.vector_width(C))
    flags["ACC"] = "tl.float64" if dtype == torch.float64 else "tl.float32"
    ty, acc = TY[dtype], "fp64" if dtype == torch.float64 else "fp32"
    sig = dict(s_ptr="*" + ty, t_ptr="*" + TY[teacher_dtype or dtype], labels_ptr="*i64", temp_ptr="*fp32",
               gfactor_ptr="*" + acc, params_ptr="*" + acc, grad_ptr="*" + ty, row_loss_ptr="*" + acc,
               loss_ptr="*" + acc, dtemp_ptr="*" + acc, ticket_ptr="*i32", N="i32", C="i32",
               stride_s_row="i32", stride_t_row="i32", stride_g_row="i32", stride_temp="i32",
               stride_gfactor="i32", ignore_index="i32")
    return {"kernel": "kdkernels._triton.engine:_logit_distill_kernel", "signature": sig,
            "constexprs": flags, "num_warps": E.block_config(C)[2], "label": label}


def shipped_jobs():
    jobs = []
    for name, spec in presets(1000).items():
        # one row in registers (ImageNet) in fp32, streamed LLM rows in bf16, the fp64 gradcheck path
        jobs.append(engine_job(spec, torch.float32, 1000, f"{name} fp32 C=1000 single-block"))
        jobs.append(engine_job(spec, torch.bfloat16, 128_000, f"{name} bf16 C=128k streaming"))
        jobs.append(engine_job(spec, torch.float64, 1000, f"{name} fp64 C=1000"))
    kd = presets(1000)["kd"]
    jobs.append(engine_job(kd, torch.float16, 32_000, "kd fp16 no labels", has_labels=False))
    jobs.append(engine_job(kd.replace(reduction="sum"), torch.bfloat16, 32_000, "kd bf16 student fp32 teacher sum",
                           teacher_dtype=torch.float32))
    jobs.append(engine_job(kd.replace(reduction="none"), torch.float32, 1000, "kd fp32 reduction none"))
    learnable = kd.replace(temperature=torch.ones(1, requires_grad=True))
    jobs.append(engine_job(learnable, torch.float32, 1000, "kd learnable per-row T", temp_is_tensor=True))
    for dtype in TY:
        jobs.append({"kernel": "kdkernels._triton.engine:_scale_rows_kernel",
                     "signature": {"grad_ptr": "*" + TY[dtype], "factor_ptr": "*fp32", "C": "i32",
                                   "stride_g_row": "i32", "stride_factor": "i32"},
                     "constexprs": {"BLOCK_C": 4096}, "num_warps": 8, "label": f"scale_rows {TY[dtype]}"})
    return jobs + shard_jobs()


def shard_jobs():
    """The tensor-parallel split (kdkernels._triton.shard): its statistics kernel and both phases of its apply
    kernel, for a forward-KL + CE + softcap spec and a JSD spec, on a single-block fp32 shard and a streamed
    bf16 shard (a 128k vocabulary over 8 ranks)."""
    jobs = []
    specs = {"kd+ce+softcap": kdk.LogitDistill(temperature=2.0, ce_weight=0.5, softcap=30.0),
             "jsd": kdk.LogitDistill(temperature=1.0, divergence=("jsd", 0.5)),
             "aekt": kdk.LogitDistill(temperature=4.0, kd_weight=0.0,
                                      decoupled=kdk.Decoupled(alpha=1.0, beta=8.0, adaptive=True)),
             "kd learnable T": kdk.LogitDistill(temperature=torch.ones(1, requires_grad=True), ce_weight=0.5)}
    for name, spec in specs.items():
        for dtype, C in ((torch.float32, 1000), (torch.bfloat16, 16_000)):
            flags = E.kernel_flags(E.unpack(*spec.pack()), learnable=False, has_labels=True, temp_is_tensor=False,
                                   has_gfactor=False, write_grad=True, dtype=dtype, C=C)
            ty, acc = TY[dtype], "fp32"
            block, single, warps = E.block_config(C)
            row = dict(HAS_LABELS=True, TEMP_IS_TENSOR=False, USE_CE=flags["USE_CE"], USE_DEC=flags["USE_DEC"],
                       REC=S.record_width(flags["USE_DEC"]), BLOCK_C=block,
                       SINGLE_BLOCK=single, ACC="tl.float32", SOFTCAP_S=flags["SOFTCAP_S"],
                       SOFTCAP_T=flags["SOFTCAP_T"])
            base = dict(s_ptr="*" + ty, t_ptr="*" + ty, labels_ptr="*i64", temp_ptr="*fp32")
            jobs.append({"kernel": "kdkernels._triton.shard:_shard_stats_kernel", "num_warps": warps,
                         "signature": dict(base, params_ptr="*" + acc, record_ptr="*" + acc, C="i32", V="i32",
                                           offset="i32", stride_s_row="i32", stride_t_row="i32",
                                           stride_temp="i32", ignore_index="i32"),
                         "constexprs": row, "label": f"shard stats {name} {ty} C={C}"})
            for phase in (0, 1) if flags["DIVERGENCE"] or spec.learnable_temperature else (1,):
                jobs.append({"kernel": "kdkernels._triton.shard:_shard_apply_kernel", "num_warps": warps,
                             "signature": dict(base, gfactor_ptr="*" + acc, params_ptr="*" + acc,
                                               record_ptr="*" + acc, sums_ptr="*" + acc, grad_ptr="*" + ty,
                                               part_ptr="*" + acc, terms_ptr="*" + acc, N="i32", C="i32", V="i32",
                                               offset="i32", P="i32", stride_s_row="i32", stride_t_row="i32",
                                               stride_g_row="i32", stride_temp="i32", stride_gfactor="i32",
                                               ignore_index="i32"),
                             "constexprs": dict(row, HAS_GFACTOR=False, WRITE_GRAD=True, PHASE=phase,
                                                REDUCTION=flags["REDUCTION"], USE_KD=flags["USE_KD"],
                                                ADAPTIVE=flags["ADAPTIVE"], WANT_DTEMP=spec.learnable_temperature,
                                                BATCH_BLOCK=flags["BATCH_BLOCK"], DIVERGENCE=flags["DIVERGENCE"]),
                             "label": f"shard apply phase {phase} {name} {ty} C={C}"})
    for norm, ce in (("renorm", False), ("tail", True), ("teacher", True)):
        for dtype, C, K in ((torch.float32, 1000, 64), (torch.bfloat16, 16_000, 256)):
            ty, acc = TY[dtype], "fp32"
            block, single, warps = E.block_config(C)
            k_pad = max(E._next_pow2(K), 16)
            row = dict(HAS_LABELS=True, TEMP_IS_TENSOR=False, USE_KD=True, USE_CE=ce, NORM=SP.NORMALIZATION_CODES[norm],
                       SOFTCAP_S=ce, K_PAD=k_pad, BLOCK_C=block, SINGLE_BLOCK=single, ACC="tl.float32")
            base = dict(s_ptr="*" + ty, ids_ptr="*i64", lp_ptr="*fp32", labels_ptr="*i64", temp_ptr="*fp32")
            label = f"{norm}{' + ce + softcap' if ce else ''} {ty} C={C} K={K}"
            jobs.append({"kernel": "kdkernels._triton.shard:_shard_sparse_stats_kernel", "num_warps": warps,
                         "signature": dict(base, params_ptr="*" + acc, record_ptr="*" + acc, C="i32", K="i32",
                                           V="i32", offset="i32", stride_s_row="i32", stride_ids_row="i32",
                                           stride_lp_row="i32", stride_temp="i32", ignore_index="i32"),
                         "constexprs": dict(row, LOG_K_PAD=k_pad.bit_length() - 1),
                         "label": f"shard sparse stats {label}"})
            jobs.append({"kernel": "kdkernels._triton.shard:_shard_sparse_apply_kernel", "num_warps": warps,
                         "signature": dict(base, gfactor_ptr="*" + acc, params_ptr="*" + acc, record_ptr="*" + acc,
                                           grad_ptr="*" + ty, rows_ptr="*" + acc, N="i32", C="i32", K="i32",
                                           V="i32", offset="i32", P="i32", stride_s_row="i32",
                                           stride_ids_row="i32", stride_lp_row="i32", stride_g_row="i32",
                                           stride_temp="i32", stride_gfactor="i32", ignore_index="i32"),
                         "constexprs": dict(row, HAS_GFACTOR=False, WRITE_GRAD=True, REDUCTION=2, DIVERGENCE=0,
                                            BATCH_BLOCK=E.BATCH_BLOCK),
                         "label": f"shard sparse apply {label}"})
    for dtype, C, k in ((torch.float32, 1000, 8), (torch.bfloat16, 16_000, 64)):
        block, single, warps = E.block_config(C)
        jobs.append({"kernel": "kdkernels._triton.shard:_shard_topk_kernel", "num_warps": warps,
                     "signature": dict(s_ptr="*" + TY[dtype], t_ptr="*" + TY[dtype], labels_ptr="*i64",
                                       params_ptr="*fp32", record_ptr="*fp32", C="i32", V="i32", offset="i32",
                                       stride_s_row="i32", stride_t_row="i32", ignore_index="i32"),
                     "constexprs": dict(HAS_LABELS=True, TOPK_K=k, K_PAD=E._next_pow2(k), BLOCK_C=block,
                                        SINGLE_BLOCK=single, ACC="tl.float32", SOFTCAP_S=True, SOFTCAP_T=True),
                     "label": f"shard top-k k={k} {TY[dtype]} C={C}"})
    return jobs


def test_engine_compiles_for_sm80_and_sm90():
    errors = aot_compile(shipped_jobs(), archs=(80, 90))
    assert not errors, "\n".join(errors)


_PTX_PROBE = r"""
import json, re, sys
import torch, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kdkernels._triton import engine as E
job = json.loads(sys.argv[1])
fn = E._logit_distill_kernel
cons = {k: (getattr(tl, v[3:]) if isinstance(v, str) and v.startswith("tl.") else v)
        for k, v in job["constexprs"].items()}
sig = dict(job["signature"], **{k: "constexpr" for k in cons})
sig = {a: sig[a] for a in fn.arg_names}
# pointers 16-byte aligned, as Triton specialises them at run time
attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if sig[a].startswith("*")}
k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cons, attrs=attrs),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": job["num_warps"]})
ptx = k.asm["ptx"]
print(json.dumps({"ld_v4": len(re.findall(r"ld\.global[^\n]*\.v4", ptx)),
                  "st_v4": len(re.findall(r"st\.global[^\n]*\.v4", ptx))}))
"""


def test_imagenet_rows_use_vector_loads():
    """C = 1000 is not a multiple of 16, so without the VEC hint every load is a scalar 32-bit one."""
    import json
    import os
    import subprocess
    import sys
    job = engine_job(presets(1000)["kd"], torch.float32, 1000, "kd fp32 C=1000")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _PTX_PROBE, json.dumps(job)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["ld_v4"] >= 2 and counts["st_v4"] >= 1, counts
