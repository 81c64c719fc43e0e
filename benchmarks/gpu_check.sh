#!/usr/bin/env bash
# The one GPU call of a task that is lent a GPU: ONE invocation of at most 7 minutes (default), no network,
# writing everything to $OUT as it goes (a timeout still returns what was measured), in priority order:
#
#   1. device facts (nvidia-smi, torch/triton, SMs, L2, memory) and the copy-bandwidth / matmul ceilings
#   2. install kdkernels without building the CUDA extension (KDKERNELS_BUILD_CUDA=0; GPU_CHECK_BUILD_CUDA=1 to build it)
#   3. correctness spot checks: every timed configuration (kdk-triton, eager) against a float64 reference
#      on the GPU, on the timed shapes (python -m benchmarks.run --suite headline --verify-only)
#   4. do_bench timings of the headline shapes: ImageNet N = 1024/8192, C = 1000 fp32 and LLM N = 16k,
#      V = 128k bf16 for kd, dkd, ldrld, topkd, dtkd, then the LLM family at N = 16k V = 128k bf16
#      (reverse_kl, jsd; the stored top-K teacher sparse_renorm/sparse_tail, K = 64) — kdk-triton vs the
#      eager published arithmetic, torch.compile of it (kd and dkd) and Liger (kd, when its wheel is carried)
#   4b. fused linear (kdk.fused_linear_distill, forward KL) at N = 16k, H = 4096, V = 128k bf16: every
#      teacher form vs F.linear + kdk.logit_distill, eager F.linear + log_softmax + kl_div and Liger's
#      fused linear JSD (beta 0), each verified (loss, dh, dW) against float64 first (--suite headline-linear)
#   5. when ncu exists: DRAM bytes, L2 hit rate, achieved occupancy, instructions and registers of a few
#      engine launches (python -m benchmarks.ncu_probe), to check the static figures of
#      benchmarks/results/static/ against the hardware
#
#   bash benchmarks/gpu_check.sh [--dry-run]           the main call (default budget 420 s)
#   bash benchmarks/gpu_check.sh [--dry-run] tests     optional, separate call: CUDA extension build + CUDA test subset
#
# Environment: OUT (results folder; default benchmarks/results/gpu-check), GPU_CHECK_SECONDS (budget of the
# call, default 420), GPU_CHECK_BUILD_CUDA (0 default), PYTHON (default python3), KDKERNELS_GIT_COMMIT (the
# commit, for provenance: the device copy has no .git). Device call (tool `run`):
#   command "KDKERNELS_GIT_COMMIT=<sha> bash benchmarks/gpu_check.sh", timeout_s 480
# then copy $OUT's files into benchmarks/results/<gpu-slug>/ and commit. Plan and timings: benchmarks/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
PART=${1:-main}
case $PART in main|tests) ;; *) echo "unknown part '$PART' (main, tests)" >&2; exit 2;; esac
PY=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_SECONDS:-420}
BUILD_CUDA=${GPU_CHECK_BUILD_CUDA:-0}
[ "$PART" = tests ] && BUILD_CUDA=1
DEST=${OUT:-benchmarks/results/gpu-check}
START=$SECONDS
unset TRITON_INTERPRET                 # real GPU kernels only: never time or test the interpreter here
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
LOG=$DEST/gpu_check.log
SUMMARY=$DEST/summary.md

left() { echo $(( BUDGET_S - (SECONDS - START) )); }
say() { if [ $DRY = 1 ]; then echo "# [~$2 s] $1"; else echo "== $1 ($(( SECONDS - START )) s, $(left) s left)" | tee -a "$LOG"; fi; }
note() { [ $DRY = 1 ] || echo "- $*" >>"$SUMMARY"; }
# step SECONDS CMD: print CMD; unless dry, run it under a timeout of at most SECONDS (and the time left),
# output appended to the log; returns its exit status (124 on timeout)
step() {
  local want=$1; shift
  local t; t=$(left); [ "$want" -lt "$t" ] && t=$want
  echo "+ $*"
  [ $DRY = 1 ] && return 0
  if [ "$t" -le 5 ]; then echo "skipped: budget spent" | tee -a "$LOG"; return 124; fi
  echo "+ (timeout ${t}s) $*" >>"$LOG"
  timeout "$t" bash -c "$*" 2>&1 | tee -a "$LOG"
  return "${PIPESTATUS[0]}"
}

if [ $DRY = 0 ]; then
  mkdir -p "$DEST"; : >"$LOG"
  echo "# gpu_check $PART, $(date -u '+%Y-%m-%d %H:%M UTC'), commit ${KDKERNELS_GIT_COMMIT:-unknown}" >"$SUMMARY"
  if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to $PY (this script is for a lent GPU machine)" | tee -a "$LOG" >&2
    exit 3
  fi
fi

# --- 1. device facts and ceilings ----------------------------------------------------------------
say "device facts" 15
step 30 "{ date -u; nvidia-smi; nvidia-smi -q -d CLOCK,MEMORY | head -60; command -v ncu nvcc; $PY -c 'import sys, torch, triton; p = torch.cuda.get_device_properties(0); print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__); print(p); print(\"SMs\", p.multi_processor_count, \"L2 bytes\", getattr(p, \"L2_cache_size\", \"?\"))'; } >$DEST/env.txt 2>&1; head -30 $DEST/env.txt"
say "copy bandwidth and matmul ceilings" 20
step 60 "$PY -m benchmarks.timing cuda | tee $DEST/ceilings.txt"
[ $DRY = 1 ] || note "ceilings: $(tr '\n' ';' <"$DEST/ceilings.txt" 2>/dev/null)"

# --- 2. install ------------------------------------------------------------------------------------
say "install kdkernels (KDKERNELS_BUILD_CUDA=$BUILD_CUDA)" $([ "$BUILD_CUDA" = 1 ] && echo 240 || echo 20)
if step $([ "$BUILD_CUDA" = 1 ] && echo 400 || echo 90) "KDKERNELS_BUILD_CUDA=$BUILD_CUDA $PY -m pip install --no-deps --no-build-isolation -e . >$DEST/install.log 2>&1; rc=\$?; tail -8 $DEST/install.log; exit \$rc"; then
  note "install: ok (KDKERNELS_BUILD_CUDA=$BUILD_CUDA)"
else
  note "install: **FAILED** (install.log); the checks import kdkernels from the source tree"
fi
step 30 "$PY -m kdkernels.info | tee $DEST/backends.txt"
if ls .whl/*.whl >/dev/null 2>&1; then   # carried wheels (liger-kernel for the liger rows)
  step 60 "$PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if [ "$PART" = tests ]; then
  # --- optional part: the CUDA test subset (parity, API, C++ engine on CUDA tensors) ----------------
  say "pytest on CUDA (KDKERNELS_TEST_DEVICE=cuda)" 300
  step $(( $(left) - 10 )) "KDKERNELS_TEST_DEVICE=cuda $PY -m pytest -q -x -ra -p no:cacheprovider tests/test_parity.py tests/test_api.py tests/test_cpp.py tests/test_info_nce.py --junitxml=$DEST/pytest-junit.xml >$DEST/pytest.log 2>&1; rc=\$?; tail -40 $DEST/pytest.log; exit \$rc"
  rc=$?; note "pytest on CUDA: exit $rc; $(tail -1 "$DEST/pytest.log" 2>/dev/null)"
  [ $DRY = 1 ] || { echo; cat "$SUMMARY"; }
  exit 0
fi

# --- 3. correctness spot checks of every timed configuration ---------------------------------------
PROVIDERS=kdk-triton,eager,compile,liger
say "spot checks vs float64 on the GPU (headline shapes)" 60
step 120 "$PY -m benchmarks.run --suite headline --mode fwd+bwd --providers kdk-triton --verify-only --tag verify --out $DEST --no-plots --quiet >$DEST/verify.log 2>&1; rc=\$?; tail -25 $DEST/verify.log; exit \$rc"
[ $DRY = 1 ] || note "spot checks: $(grep '^rows:' "$DEST/verify.log" | tail -1)"

# --- 3b. the tensor-parallel split on one GPU (a 1-rank nccl group: real launches, merges, collectives) ---
say "tensor-parallel split: float64 check and time vs the unsharded engine (N = 4096, V_r = 16k bf16)" 40
step 60 "$PY -m benchmarks.tp_check >$DEST/tp_check.json 2>$DEST/tp_check.err; rc=\$?; tail -30 $DEST/tp_check.json; tail -5 $DEST/tp_check.err; exit \$rc"

# --- 4. timings of the headline shapes --------------------------------------------------------------
NCU_RESERVE=$(command -v ncu >/dev/null 2>&1 && echo 60 || echo 0)
LINEAR_RESERVE=${GPU_CHECK_LINEAR_SECONDS:-75}   # step 4b (fused linear) runs after it, in what is left
MIN=$(awk -v s="$(( $(left) - NCU_RESERVE - LINEAR_RESERVE - 25 ))" 'BEGIN { m = s / 60; if (m < 0.5) m = 0.5; printf "%.1f", m }')
say "do_bench timings (--max-minutes $MIN)" 170
step $(( $(left) - NCU_RESERVE - LINEAR_RESERVE )) "$PY -m benchmarks.run --suite headline --mode fwd+bwd --providers $PROVIDERS --compile-methods kd,dkd --max-minutes $MIN --out $DEST --quiet >$DEST/bench.log 2>&1; rc=\$?; tail -40 $DEST/bench.log; exit \$rc"
[ $DRY = 1 ] || note "timings: $(grep '^rows:' "$DEST/bench.log" | tail -1)"

# --- 4b. fused linear: loss from hidden states (verified, then timed; rows written after every case) ---
LMIN=$(awk -v s="$(( $(left) - NCU_RESERVE - 15 ))" 'BEGIN { m = s / 60; if (m < 0.3) m = 0.3; printf "%.1f", m }')
say "fused linear do_bench timings (--max-minutes $LMIN)" 50
step $(( $(left) - NCU_RESERVE )) "$PY -m benchmarks.run --suite headline-linear --mode fwd+bwd --max-minutes $LMIN --out $DEST --quiet >$DEST/bench-linear.log 2>&1; rc=\$?; tail -12 $DEST/bench-linear.log; exit \$rc"
[ $DRY = 1 ] || note "fused linear: $(grep '^rows:' "$DEST/bench-linear.log" | tail -1)"

# --- 5. ncu counters of a few launches ---------------------------------------------------------------
if [ $DRY = 1 ] || command -v ncu >/dev/null 2>&1; then
  say "ncu counters (DRAM bytes, L2 hit rate, occupancy, instructions)" 50
  step $(( $(left) - 3 )) "ncu --csv --target-processes all -k regex:distill --launch-count 6 --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,launch__registers_per_thread,launch__grid_size $PY -m benchmarks.ncu_probe >$DEST/ncu.csv 2>$DEST/ncu.err; rc=\$?; tail -5 $DEST/ncu.err; exit \$rc"
  rc=$?; [ $DRY = 1 ] || note "ncu: exit $rc; $(wc -l <"$DEST/ncu.csv" 2>/dev/null) lines in ncu.csv"
else
  note "ncu: not installed on this machine"
fi

[ $DRY = 1 ] || { echo; cat "$SUMMARY"; echo "gpu_check done in $(( SECONDS - START )) s; results in $DEST"; }
exit 0
