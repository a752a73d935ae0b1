#!/usr/bin/env bash
# One call on the lent GPU machine (issue 13, one GPU): install, the GPU-marked tests of gr-parallel and
# gr-models, then gr-train on the all-dynamic synthetic ranking config with the train pipeline off and on,
# alternating (none, overlap, none, overlap) so drift of the machine falls on both. Everything lands in $OUT.
#   run(command="bash tools/gpu/gr_train_pipeline.sh", carry=[".gpu-wheels"])
# STEPS sets train.max_steps (default 300), ROUNDS the rounds (default 2), TEST_TIMEOUT_S the tests' limit
# (default 150); WARMUP_STEPS (default 20, 0 = none) an untimed run first, so JIT compilation lands on neither
# mode; COMMIT names the commit measured.
set -o pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/gr-train-pipeline}
mkdir -p "$out"
GR_SKIP_TESTS=1 source tools/gpu/setup.sh > "$out/setup.log" 2>&1 || { tail -20 "$out/setup.log"; exit 1; }
grep -E "^device|^torch|^triton|^megatron|^torchrec" "$out/setup.log"

echo "== pytest -m gpu (gr-parallel, gr-models)"
timeout -s INT -k 10 "${TEST_TIMEOUT_S:-150}" python3 -m pytest -m gpu -q -p no:cacheprovider -rfE --tb=line packages/gr-parallel packages/gr-models 2>&1 \
  | tee "$out/pytest-gpu.log" | tail -15

config=packages/gr-models/configs/synthetic_ranking_dynamic.yaml
summarize() {  # the JSON is rewritten after every run, so a call cut short still returns what finished
python3 - "$out" "${COMMIT:-unknown}" <<'PY'
import datetime, json, pathlib, sys
import torch
out, commit = pathlib.Path(sys.argv[1]), sys.argv[2]
rows = []
for metrics in sorted(out.glob("run-*/metrics.json")):
    mode, round_ = metrics.parent.name.split("-")[1:]
    data = json.loads(metrics.read_text())
    t = data["throughput"]
    steps = data.get("step") or data.get("history", [{}])[-1].get("step")
    rows.append({"pipeline": mode, "round": int(round_), "train_seconds": t["train_seconds"],
                 "steps": steps, "tokens_per_s": t["tokens_per_s"], "samples_per_s": t["samples_per_s"],
                 "ms_per_step": 1000 * t["train_seconds"] / steps if steps else None})
result = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "commit": commit,
          "config": "packages/gr-models/configs/synthetic_ranking_dynamic.yaml", "rows": rows}
(out / "gr-train-pipeline.json").write_text(json.dumps(result, indent=2))
print(json.dumps(rows))
PY
}
if [ "${WARMUP_STEPS:-20}" -gt 0 ]; then  # untimed: compiles the Triton kernels into the cache the timed runs share
  echo "== gr-train warm-up (${WARMUP_STEPS:-20} steps, not recorded)"
  timeout 150 python3 -m gr_models.cli --config "$config" device=cuda parallel.pipeline=none \
    train.max_steps="${WARMUP_STEPS:-20}" train.eval_every=100000 output_dir="$out/warmup" > "$out/train-warmup.log" 2>&1 \
    || tail -20 "$out/train-warmup.log"
fi
for round in $(seq 1 "${ROUNDS:-2}"); do
  for mode in none overlap; do
    echo "== gr-train pipeline=$mode (round $round)"
    timeout 150 python3 -m gr_models.cli --config "$config" device=cuda parallel.pipeline="$mode" \
      train.max_steps="${STEPS:-300}" train.eval_every=100000 train.log_every=50 \
      output_dir="$out/run-$mode-$round" > "$out/train-$mode-$round.log" 2>&1 || tail -20 "$out/train-$mode-$round.log"
    summarize
  done
done
