#!/usr/bin/env bash
# gpu-check.sh: the whole GPU verification in one call.
#
#   scripts/gpu-check.sh bundle   # on the development machine (no GPU needed):
#                                 # builds build-gpu/ for sm_90 and gathers the test
#                                 # and bench binaries, libculoss and the test
#                                 # runtime's shared libraries (Criterion and its
#                                 # dependencies) into gpu-bundle/ (about 20 MB)
#   scripts/gpu-check.sh run      # on the GPU machine (carry gpu-bundle/): the GPU
#                                 # tests, compute-sanitizer memcheck, racecheck,
#                                 # initcheck and synccheck over them, then the
#                                 # benchmark; logs and a summary go to $OUT (or
#                                 # ./gpu-check-out)
#   scripts/gpu-check.sh run tests     # only some steps (tests, sanitize, bench, torch),
#                                      # to fit the device tool's 10-minute calls
#   BENCH_ARGS="--only ce" scripts/gpu-check.sh run bench   # one family (ce, ew, more, lce, distill)
#                                 # (bench also reruns the CE cases with
#                                 # CULOSS_CE_CLUSTER=0: the cluster path against
#                                 # one block per row)
#   scripts/gpu-check.sh all      # both, on a GPU machine that has the tools
#
# The GPU machines of this project have nvcc and compute-sanitizer but no
# Criterion and no network, hence the bundle. Criterion forks a process per
# test: the sanitizer follows children (--target-processes all) and tests run
# with one job.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-all}
arch=${CULOSS_GPU_ARCH:-90}
bdir=build-gpu
bun=gpu-bundle

bundle() {
  set -e
  if [ -d /usr/local/cuda/bin ]; then export PATH="/usr/local/cuda/bin:$PATH"; fi
  cmake -S . -B "$bdir" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$arch" >/dev/null
  cmake --build "$bdir" -j "$(nproc)"
  rm -rf "$bun" && mkdir -p "$bun/lib" "$bun/bin"
  cp "$bdir"/tests/test_* "$bdir"/bench/culoss-bench "$bdir"/examples/train_softmax "$bun/bin/"
  cp -L "$bdir/libculoss.so.0" "$bun/lib/"   # a real file: links travel badly
  # every shared library the test binaries need, except glibc's own and the
  # CUDA runtime (the GPU machine has its own, matching its driver)
  ldd "$bdir"/tests/test_gpu_ce "$bdir"/examples/train_softmax | awk '/=> \//{print $3}' |
    grep -v -E '/(libc|libm|libdl|libpthread|librt|libresolv|libgcc_s|libstdc\+\+)\.so|libcudart|libcublas|libculoss' | sort -u |
    while read -r lib; do cp -L "$lib" "$bun/lib/"; done
  git rev-parse --short HEAD >"$bun/COMMIT" 2>/dev/null || true
  du -sh "$bun" | awk '{print "bundle size: " $1}'
  set +e
}

run() {
  local out=${OUT:-gpu-check-out}
  mkdir -p "$out"
  export LD_LIBRARY_PATH="$PWD/$bun/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
  local steps=${1:-tests,sanitize,bench,torch}
  local summary="$out/summary.txt"
  : >"$summary"
  note() { echo "$*" | tee -a "$summary"; }
  local failures=0
  # records a step's status: anything but 0 is a failure (there is a GPU here:
  # nothing may skip), and the script's exit status says so
  step() {
    local rc=$1
    shift
    note "$* rc=$rc"
    [ "$rc" -eq 0 ] || failures=$((failures + 1))
  }
  note "date: $(date -u +%Y-%m-%dT%H:%MZ)  bundle built at commit: $(cat "$bun/COMMIT" 2>/dev/null || echo unknown)"
  note "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
  local missing
  missing=$(for b in "$bun"/bin/*; do ldd "$b" | grep "not found"; done | sort -u)
  [ -z "$missing" ] || note "WARNING: unresolved libraries (extend LD_LIBRARY_PATH): $missing"
  local t rc
  if [[ $steps == *tests* ]]; then
  for t in test_math test_api test_cpu_ce test_cpu_elementwise test_cpu_more_losses test_cpu_linear_ce \
           test_cpu_vocab_parallel test_cpu_distill test_gpu_ce test_gpu_elementwise test_gpu_more_losses \
           test_gpu_linear_ce test_gpu_graph test_gpu_vocab_parallel test_gpu_distill; do
    "$bun/bin/$t" --jobs 1 >"$out/$t.log" 2>&1
    rc=$?
    if [ "$rc" -eq 0 ] && grep -q "skipped: no CUDA device" "$out/$t.log"; then rc=77; fi
    step "$rc" "$t: $(grep -a 'Synthesis' "$out/$t.log" | tail -1)"
  done
  fi
  local tool
  if [[ $steps == *sanitize* ]]; then
  for tool in memcheck racecheck initcheck synccheck; do
    for t in test_gpu_ce test_gpu_elementwise test_gpu_more_losses test_gpu_linear_ce test_gpu_graph \
             test_gpu_vocab_parallel test_gpu_distill; do
      CULOSS_TEST_QUICK=1 timeout 600 compute-sanitizer --tool "$tool" --target-processes all \
        --error-exitcode 99 "$bun/bin/$t" --jobs 1 >"$out/sanitizer-$tool-$t.log" 2>&1
      rc=$?
      step "$rc" "compute-sanitizer $tool $t: $(grep -a -E 'ERROR SUMMARY' "$out/sanitizer-$tool-$t.log" | sort | uniq -c | tr '\n' ' ')"
    done
  done
  fi
  if [[ $steps == *tests* ]]; then
  "$bun/bin/train_softmax" --graph --epochs 6 --expect 0.80 >"$out/example-graph.log" 2>&1
  step $? "example train_softmax --graph (CUDA graph replay): $(tail -1 "$out/example-graph.log")"
  CULOSS_LIBRARY="$PWD/$bun/lib/libculoss.so.0" python3 -m pytest -q -rs -p no:cacheprovider \
    python/tests >"$out/python.log" 2>&1
  step $? "python binding (numpy + torch CUDA): $(tail -1 "$out/python.log")"
  fi
  if [[ $steps == *bench* ]]; then
  # shellcheck disable=SC2086  # BENCH_ARGS, e.g. "--only ce", is a word list
  "$bun/bin/culoss-bench" ${BENCH_ARGS:-} >"$out/bench.txt" 2>&1
  step $? "culoss-bench:"
  cat "$out/bench.txt"
  # the cluster path for rows too long for one block (issue 16, item 4)
  # against one block per row: the CE cases again with CULOSS_CE_CLUSTER=0
  CULOSS_CE_CLUSTER=0 "$bun/bin/culoss-bench" ${BENCH_ARGS:-} --only ce >"$out/bench-nocluster.txt" 2>&1
  step $? "culoss-bench --only ce with CULOSS_CE_CLUSTER=0 (one block per row):"
  cat "$out/bench-nocluster.txt"
  fi
  if [[ $steps == *torch* ]]; then
  CULOSS_LIBRARY="$PWD/$bun/lib/libculoss.so.0" python3 bench/compare_torch.py \
    >"$out/compare_torch.txt" 2>&1
  step $? "compare_torch.py:"
  cat "$out/compare_torch.txt"
  fi
  echo "---- summary"
  cat "$summary"
  note "failed steps: $failures"
  [ "$failures" -eq 0 ]
}

case "$mode" in
bundle) bundle ;;
run) run "${2:-}" ;;
all) bundle && run ;;
*) echo "usage: $0 bundle | run [tests,sanitize,bench,torch] | all" >&2; exit 2 ;;
esac
