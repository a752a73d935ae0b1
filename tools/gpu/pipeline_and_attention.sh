#!/usr/bin/env bash
# One GPU call for issues 13 and 22: the whole hstu-attn test directory on CUDA (NaN containment, check_finite,
# Triton forward/backward against the reference), the gr-train pipeline run (tools/gpu/gr_train_pipeline.sh),
# and the Triton attention timed at the NaN-containment commit beside a baseline commit's kernels
# (.baseline/src: `git archive BASE packages/hstu-attn/src`), alternating baseline, current, baseline, current.
#   run(command="bash tools/gpu/pipeline_and_attention.sh", carry=[".gpu-wheels", ".baseline"])
# Environment: COMMIT (the commit measured), BASE_COMMIT (the baseline's), ATTN_TEST_TIMEOUT_S (default 180).
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/pipeline-and-attention}
mkdir -p "$out"
started=$(date +%s)
stamp() { echo "[$(( $(date +%s) - started ))s] $*" | tee -a "$out/steps.txt"; }

stamp "hstu-attn tests on CUDA"
HSTU_ATTN_TRITON_AUTOTUNE=0 PYTHONPATH=packages/hstu-attn/src timeout "${ATTN_TEST_TIMEOUT_S:-180}" \
  python3 -m pytest packages/hstu-attn/tests -q -p no:cacheprovider -rs --durations=10 > "$out/attn-tests.log" 2>&1
stamp "hstu-attn tests exit $?"
tail -25 "$out/attn-tests.log"

stamp "gr-train pipeline"
OUT="$out" bash tools/gpu/gr_train_pipeline.sh
stamp "gr-train pipeline exit $?"

base_src=.baseline/packages/hstu-attn/src
if [ -d "$base_src" ]; then
  for round in 1 2; do
    for side in baseline current; do
      if [ $(( $(date +%s) - started )) -gt "${BENCH_UNTIL_S:-500}" ]; then stamp "no time left for bench $side"; break 2; fi
      src=packages/hstu-attn/src commit=${COMMIT:-unknown}
      [ "$side" = baseline ] && src=$base_src commit=${BASE_COMMIT:-unknown}
      stamp "attention bench $side (round $round)"
      mkdir -p "$out/bench-$side-$round"
      PYTHONPATH="$src" timeout 120 python3 packages/hstu-attn/benchmarks/bench_attention.py --backends ours \
        --shapes N1024 "B8 N4096 H4 D128" --memory-shape none --commit "$commit" --out "$out/bench-$side-$round" \
        > "$out/bench-$side-$round.log" 2>&1
      stamp "exit $?"
      grep -E "ours" "$out/bench-$side-$round.log" | tail -8
    done
  done
fi
stamp done
