#!/usr/bin/env bash
# One command for a task that is lent a GPU: install kdkernels into the machine's own python (no network),
# build the CUDA extension, run the whole test suite on CUDA tensors (no TRITON_INTERPRET), measure the
# copy bandwidth, run the benchmark suites, and leave everything under benchmarks/results/<gpu-slug>/
# (plus, when $OUT is set, one tarball of that folder, the log and a summary in $OUT).
#
#   bash benchmarks/gpu_check.sh [--dry-run] [PART ...]        (default PART: tests)
#
# PART (each fits one ~10-minute device call; run them in separate calls):
#   tests        env + install/build + kdkernels.info + pytest on CUDA + copy bandwidth / matmul ceilings
#   quick        --suite quick (ImageNet N=1024 fp32 and LLM N=4096 V=32k bf16, every method)
#   imagenet     --suite imagenet (N=256..2048, C=1000, fp32 and bf16, every method)
#   llm          --suite llm --methods kd,topkd (N=4k..32k, V=32k/128k/256k, bf16: the headline + top-k ratio)
#   llm-rest     --suite llm --methods dkd,dtkd,ldrld,aekt
#   contrastive  --suite contrastive (InfoNCE, M=256..16k, D=256)
#   all          tests imagenet llm llm-rest contrastive (longer than one call: for a manual session)
# Environment: GPU_CHECK_MINUTES (whole-invocation budget, default 9), GPU_CHECK_BUILD_CUDA (1 default;
# 0 skips the CUDA extension: faster, kdk-cuda rows are then skipped), PYTHON (default python3),
# KDKERNELS_GIT_COMMIT (the commit, for provenance: the device copy has no .git).
# Liger-Kernel is not on the GPU image: to get the liger rows, download its wheel here first
#   (python3 -m pip download --no-deps --only-binary=:all: -d .whl liger-kernel==0.8.5; .whl/ is git-ignored)
# and name ".whl" in the device call's carry; this script installs .whl/*.whl into /tmp/site.
# Suggested device call (tool `run`): command "bash benchmarks/gpu_check.sh tests", timeout_s 600;
# then fetch $OUT's tarball, untar it into benchmarks/results/ and commit.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(tests)
if [ "${PARTS[*]}" = "all" ]; then PARTS=(tests imagenet llm llm-rest contrastive); fi
PY=${PYTHON:-python3}
BUDGET_S=$(( ${GPU_CHECK_MINUTES:-9} * 60 ))
BUILD_CUDA=${GPU_CHECK_BUILD_CUDA:-1}
START=$SECONDS
unset TRITON_INTERPRET                 # real GPU kernels only: never time or test the interpreter here
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

for p in "${PARTS[@]}"; do
  case $p in tests|quick|imagenet|llm|llm-rest|contrastive) ;;
    *) echo "unknown part '$p' (tests quick imagenet llm llm-rest contrastive all)" >&2; exit 2;; esac
done

if [ $DRY = 1 ]; then
  SLUG="<gpu-slug>"
else
  if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to $PY (this script is for a lent GPU machine)" >&2; exit 3
  fi
  SLUG=$($PY -c "import torch; from benchmarks.env import slug; print(slug(torch.device('cuda')))")
fi
DEST=benchmarks/results/$SLUG
LOG=$DEST/gpu_check.log
SUMMARY=$DEST/gpu_check-summary.md
[ $DRY = 1 ] || mkdir -p "$DEST"

left() { echo $(( BUDGET_S - (SECONDS - START) )); }
say() { if [ $DRY = 1 ]; then echo "# $*"; else echo "== $* ($(( SECONDS - START )) s)" | tee -a "$LOG"; fi; }
# run CMD: print it; unless dry, run it with output appended to the log; returns its exit status
run() {
  echo "+ $*"
  [ $DRY = 1 ] && return 0
  echo "+ $*" >>"$LOG"
  bash -c "$*" 2>&1 | tee -a "$LOG"
  return "${PIPESTATUS[0]}"
}
note() { [ $DRY = 1 ] || echo "$*" >>"$SUMMARY"; }

environment() {
  say "environment"
  run "{ date -u; nvidia-smi; nvcc --version; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__); print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))'; } >$DEST/env.txt 2>&1; cat $DEST/env.txt | head -40"
}

INSTALLED=0
install() {
  [ $INSTALLED = 1 ] && return 0
  INSTALLED=1
  say "install kdkernels (KDKERNELS_BUILD_CUDA=$BUILD_CUDA)"
  if run "KDKERNELS_BUILD_CUDA=$BUILD_CUDA KDKERNELS_REQUIRE_EXT=1 $PY -m pip install --no-deps --no-build-isolation -e . >$DEST/build.log 2>&1; rc=\$?; tail -25 $DEST/build.log; exit \$rc"; then
    note "- install: ok (KDKERNELS_BUILD_CUDA=$BUILD_CUDA)"
  else
    note "- install: **FAILED with KDKERNELS_BUILD_CUDA=$BUILD_CUDA** (see build.log); retried with KDKERNELS_BUILD_CUDA=0"
    run "KDKERNELS_BUILD_CUDA=0 $PY -m pip install --no-deps --no-build-isolation -e . >$DEST/build-fallback.log 2>&1; rc=\$?; tail -15 $DEST/build-fallback.log; exit \$rc" \
      || note "- fallback install: **FAILED** (tests and benchmarks import kdkernels from the source tree)"
  fi
  if ls .whl/*.whl >/dev/null 2>&1; then   # carried wheels (e.g. liger-kernel for the liger rows)
    run "$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  run "$PY -m kdkernels.info | tee $DEST/backends.txt"
  run "$PY -c 'import liger_kernel' 2>/dev/null && echo 'liger_kernel importable: liger rows will run' || echo 'liger_kernel not importable: liger rows are skipped (carry its wheel in .whl/, see benchmarks/README.md)'"
}

tests() {
  install
  say "pytest on CUDA (KDKERNELS_TEST_DEVICE=cuda, no TRITON_INTERPRET)"
  local t=$(( $(left) - 90 )); [ $t -lt 60 ] && t=60
  run "KDKERNELS_TEST_DEVICE=cuda timeout $t $PY -m pytest -q -ra -p no:cacheprovider -m 'gpu or not gpu' tests --junitxml=$DEST/pytest-junit.xml >$DEST/pytest.log 2>&1; rc=\$?; tail -60 $DEST/pytest.log; exit \$rc"
  local rc=$?
  [ $DRY = 1 ] || note "- pytest on CUDA: exit $rc; $(tail -1 "$DEST/pytest.log" 2>/dev/null)"
  say "copy bandwidth and matrix-product ceilings"
  run "$PY -m benchmarks.timing cuda | tee $DEST/ceilings.txt"
  [ $DRY = 1 ] || note "- ceilings: $(tr '\n' ';' <"$DEST/ceilings.txt")"
}

bench() {  # bench TAG ARGS...: one benchmark suite with the time that is left
  local tag=$1; shift
  install
  local m; m=$(awk -v s="$(left)" 'BEGIN { m = (s - 45) / 60; if (m < 1) m = 1; printf "%.1f", m }')
  say "benchmark $tag (--max-minutes $m)"
  run "$PY -m benchmarks.run $* --out $DEST --max-minutes $m >$DEST/bench-$tag.log 2>&1; rc=\$?; tail -45 $DEST/bench-$tag.log; exit \$rc"
  local rc=$?
  [ $DRY = 1 ] || note "- benchmark $tag: exit $rc; $(grep '^rows:' "$DEST/bench-$tag.log" | tail -1)"
}

[ $DRY = 1 ] || { : >"$LOG"; echo "# gpu_check: ${PARTS[*]} on $SLUG, $(date -u '+%Y-%m-%d %H:%M UTC')" >"$SUMMARY"; }
environment
for p in "${PARTS[@]}"; do
  case $p in
    tests) tests ;;
    quick) bench quick --suite quick ;;
    imagenet) bench imagenet --suite imagenet ;;
    llm) bench llm --suite llm --methods kd,topkd --tag kd-topkd ;;
    llm-rest) bench llm-rest --suite llm --methods dkd,dtkd,ldrld,aekt --tag rest ;;
    contrastive) bench contrastive --suite contrastive ;;
  esac
done

say "pack"
if [ $DRY = 0 ] && [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  name=$SLUG-$(IFS=-; echo "${PARTS[*]}")
  tar czf "$OUT/$name.tar.gz" -C benchmarks/results "$SLUG" && cp "$SUMMARY" "$OUT/$name-summary.md" && cp "$LOG" "$OUT/$name.log"
  echo "packed: \$OUT/$name.tar.gz (untar into benchmarks/results/), \$OUT/$name-summary.md, \$OUT/$name.log"
fi
[ $DRY = 1 ] || { echo; cat "$SUMMARY"; echo "gpu_check done in $(( SECONDS - START )) s; results in $DEST"; }
exit 0
