#!/usr/bin/env bash
# Issue 26 quality results in one GPU call: ML-1M (users 1-2999) retrieval (SASRec, SASRec with full softmax, HSTU,
# HSTU-large; seeds 1 2 3; early stopping on validation NDCG@10, test metrics at the best epoch) and ranking
# (RankingGR, RankingGR trained on every history position, DLRM baseline; per-task AUC), every (model, seed) in its
# own background process (the models are tiny; one GPU, 16 cores). The whole call ends within about TOTAL_S seconds
# (default 450): after the install, every process gets the same end time, TOTAL_S - 40 s after this script started,
# and stops training before an epoch that would end past it (rows say "stopped": "time budget"; a process with
# several seeds shares its time evenly among them); each writes its rows after every seed.
# Carry .gpu-wheels and .data (a copy of ../shared/data/ml-1m as .data/ml-1m); inside a snapshot folder (with a
# COMMIT file, read as the commit of the rows) the carried folders may sit one level up.
#   bash tools/gpu/quality_ml1m.sh
# Under $OUT (or /tmp/quality): quality-ml1m.json, quality-ml1m-curves.json, quality-ml1m-ranking.json,
# quality-ml1m-ranking-curves.json, logs.tgz.
# RETRIEVAL_MODELS, RANKING_MODELS (default "hstu hstu_all_positions dlrm_all_positions") and SEEDS (default "1 2 3") narrow the runs;
# RANKING_MODELS= (set and empty) runs no ranking at all, the DLRM baseline included (more CPU for retrieval).
# SEQUENTIAL_SEEDS (default "sasrec sasrec_full_softmax hstu"): retrieval models whose seeds run one after another in
# one process (sharing its time evenly) instead of one process per seed. Fewer processes on the GPU: without MPS the
# contexts of concurrent processes time-slice it, and 19 processes (the first run) trained these tiny models at 6-15 s
# per epoch. The other models (hstu_large) keep one process per seed.
# QUALITY_MPS=1 shares the GPU between the processes through MPS (see below).
# CPU smoke of this script's logic (no install, first 60 users, 1 epoch, short sequences, seed 1; dlrm seeds 1 2):
#   QUALITY_SMOKE=1 bash tools/gpu/quality_ml1m.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/quality}
mkdir -p "$out"
started=$(date +%s)
total=${TOTAL_S:-450}
for carried in .gpu-wheels .data; do
  [ -e "$carried" ] || [ ! -e "../$carried" ] || ln -s "../$carried" "$carried"
done
export GR_COMMIT=${GR_COMMIT:-$(cat COMMIT 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)}
data=${GR_ML1M:-.data/ml-1m}
[ -e "$data" ] || [ ! -e ../shared/data/ml-1m ] || data=../shared/data/ml-1m  # the CPU machine's team copy
ratings="$data/partial/ratings_users0001-2999.dat.gz"
[ -f "$ratings" ] || { echo "error: no $ratings (carry .data: a copy of ../shared/data/ml-1m as .data/ml-1m)" >&2; exit 1; }
if [ -n "${QUALITY_SMOKE:-}" ]; then
  py=${PYTHON:-.venv/bin/python}
  common=(device=cpu "data.path=$data" data.max_sequence_length=24 data.batch_size=32)
  retrieval_limits=(--max-users 60 --max-epochs 1)
  ranking_limits=(--max-users 60 --max-epochs 1)
  seeds=${SEEDS:-1}
  dlrm_seeds="1 2"
else
  GR_SKIP_TESTS=1 source tools/gpu/setup.sh >"$out/setup.log" 2>&1 || { cat "$out/setup.log"; exit 1; }
  py=python3
  common=(device=cuda "data.path=$data" hstu.dtype=float32 hstu.kernel_backend=pytorch)
  retrieval_limits=(--max-epochs 200 --patience 10)
  ranking_limits=(--max-epochs "${RANKING_EPOCHS:-10}" --patience 4)
  seeds=${SEEDS:-1 2 3}
  dlrm_seeds=$seeds
fi
# QUALITY_MPS=1: start an MPS control daemon (CUDA Multi-Process Service, a user-space server; no card setting
# changes) so that the processes' kernels share the GPU instead of time-slicing it; it is checked with one CUDA
# op and shut down on exit. Without nvidia-cuda-mps-control, or if the check fails, the run goes on without it.
mps=off
stop_mps() { [ "$mps" != on ] || echo quit | nvidia-cuda-mps-control >/dev/null 2>&1; }
trap stop_mps EXIT
if [ "${QUALITY_MPS:-0}" = 1 ] && [ -z "${QUALITY_SMOKE:-}" ] && command -v nvidia-cuda-mps-control >/dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/gr-mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/gr-mps/log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d && mps=on \
    && timeout 60 "$py" -c "import torch; assert torch.ones(4, device='cuda').sum().item() == 4"; then
    echo "MPS on"
  else
    stop_mps
    mps=off
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    echo "MPS could not start: the processes time-slice the GPU"
  fi
fi
end_at=$((started + total - 40))  # 40 s for the last test evaluations, the merge and the archive
budget=$((end_at - $(date +%s)))
echo "commit $GR_COMMIT; install took $(($(date +%s) - started)) s; training ends by $(date -u -d "@$end_at" +%H:%M:%S)" \
  "(${budget} s from now)"

launch() {  # log name, quality.py subcommand, its arguments
  local name=$1 command=$2
  shift 2
  OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 timeout -k 5 $((budget + 20)) "$py" tools/quality.py "$command" \
    --end-at "$end_at" "$@" >"$out/$name.log" 2>&1 &
}
retrieval_models=${RETRIEVAL_MODELS:-sasrec sasrec_full_softmax hstu hstu_large}
ranking_models=${RANKING_MODELS-hstu hstu_all_positions dlrm_all_positions}  # the DLRM baseline runs (all seeds, one process) beside any
sequential_seeds=${SEQUENTIAL_SEEDS-sasrec sasrec_full_softmax hstu}
run_groups() {  # one "model:seed[,seed...]" word per retrieval process
  local model seed
  for model in $retrieval_models; do
    if [[ " $sequential_seeds " == *" $model "* ]]; then
      echo "$model:$(echo $seeds | tr ' ' ',')"
    else
      for seed in $seeds; do echo "$model:$seed"; done
    fi
  done
}
for group in $(run_groups); do
  model=${group%%:*}
  group_seeds=${group#*:}
  # shellcheck disable=SC2046  # the seeds are separate arguments
  launch "run-$model-$group_seeds" run --models "$model" --seeds $(echo "$group_seeds" | tr ',' ' ') \
    "${retrieval_limits[@]}" --out "$out/run-$model-$group_seeds.json" \
    --curves "$out/run-curves-$model-$group_seeds.json" -- "${common[@]}"
done
for seed in $seeds; do
  for model in $ranking_models; do
    launch "ranking-$model-$seed" ranking --models "$model" --seeds "$seed" "${ranking_limits[@]}" \
      --out "$out/ranking-$model-$seed.json" --curves "$out/ranking-curves-$model-$seed.json" -- "${common[@]}"
  done
done
# shellcheck disable=SC2086  # the seeds are separate arguments
[ -z "$ranking_models" ] || launch ranking-dlrm ranking --models dlrm --seeds $dlrm_seeds "${ranking_limits[@]}" \
  --out "$out/ranking-dlrm.json" --curves "$out/ranking-curves-dlrm.json" -- "${common[@]}"
wait
echo "training finished $(date -u +%H:%M:%S), $(($(date +%s) - started)) s after the start"
grep -h "best epoch\|Error\|error:" "$out"/*.log
expected() {  # file prefix, model list, seed list
  local model seed
  for seed in $3; do for model in $2; do echo "$out/$1-$model-$seed.json"; done; done
}
expected_runs() {  # file prefix (run or run-curves): the files of run_groups
  local group
  for group in $(run_groups); do echo "$out/$1-${group%%:*}-${group#*:}.json"; done
}
# few files come back from the device: merged JSONs and one archive of the logs (the merges run side by side)
# shellcheck disable=SC2046  # one path per word
"$py" tools/quality.py merge --kind run --out "$out/quality-ml1m.json" $(expected_runs run) \
  >"$out/merge-run.log" 2>&1 &
# shellcheck disable=SC2046
"$py" tools/quality.py merge --kind curves --out "$out/quality-ml1m-curves.json" \
  $(expected_runs run-curves) >"$out/merge-curves.log" 2>&1 &
[ -z "$ranking_models" ] || {
  # shellcheck disable=SC2046
  "$py" tools/quality.py merge --kind ranking --out "$out/quality-ml1m-ranking.json" \
    $(expected ranking "$ranking_models" "$seeds") "$out/ranking-dlrm.json" >"$out/merge-ranking.log" 2>&1 &
  # shellcheck disable=SC2046
  "$py" tools/quality.py merge --kind curves --out "$out/quality-ml1m-ranking-curves.json" \
    $(expected ranking-curves "$ranking_models" "$seeds") "$out/ranking-curves-dlrm.json" \
    >"$out/merge-ranking-curves.log" 2>&1 &
}
wait
cat "$out"/merge-*.log
rm -f "$out"/run-*.json "$out"/ranking-*.json
tar -czf "$out/logs.tgz" -C "$out" $(cd "$out" && ls ./*.log) && rm -f "$out"/*.log
ls -la "$out"
