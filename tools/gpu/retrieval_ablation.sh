#!/usr/bin/env bash
# Issue 26 ablation on the GPU machine: per-epoch ML-1M (users 1-2999) HR@10 of the retrieval configs as they were
# before the fixes, with one difference from the HSTU paper's public code changed at a time (ROUND 1), or each on
# top of the embedding scaling (ROUND 2), or the shipped configs (ROUND 3), each variant in its own process (the models
# are tiny; the GPU and 16 cores are shared). Carry .gpu-wheels and .data (a copy of ../shared/data/ml-1m).
#   bash tools/gpu/retrieval_ablation.sh EPOCHS    # JSON per variant under $OUT (or /tmp/ablation)
set -uo pipefail
cd "$(dirname "$0")/../.."
epochs=${1:-10}
out=${OUT:-/tmp/ablation}
mkdir -p "$out"
GR_SKIP_TESTS=1 source tools/gpu/setup.sh >"$out/setup.log" 2>&1 || { cat "$out/setup.log"; exit 1; }
common=(device=cuda data.path=.data/ml-1m data.options.ratings_path=partial/ratings_users0001-2999.dat.gz
        hstu.dtype=float32 hstu.kernel_backend=pytorch retrieval.eval_exclude_history=true data.eval_batch_size=128)
# the shipped configs before issue 26's fixes (commit 3b86d70), and each fix as overrides on top of them
old_hstu='hstu.position_encoding.scale_embeddings=false;hstu.position_encoding.init_std=null;hstu.alpha=null;hstu.uvqk_init_std=null;hstu.kv_channels=25;hstu.relative_bias=null;embeddings.default.betas=[0.9,0.999]'
old_sasrec='hstu.position_encoding.scale_embeddings=false;hstu.position_encoding.init_std=null;embeddings.default.betas=[0.9,0.999]'
scale='hstu.position_encoding.scale_embeddings=true;hstu.position_encoding.init_std=0.1414'
betas='embeddings.default.betas=[0.9,0.98]'
hstu_all="hstu.alpha=1.0;$scale;hstu.kv_channels=50;hstu.relative_bias={};$betas"
run() {  # name config seeds overrides
  OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 timeout "${DEADLINE_S:-460}" python3 tools/quality.py curves --config "packages/gr-models/configs/ml1m_retrieval_$2.yaml" \
    --epochs "$epochs" --seeds $3 --variant "$1=$4" --out "$out/$1.json" -- "${common[@]}" >"$out/$1.log" 2>&1 &
}
case "${ROUND:-1}" in
1)  # one difference at a time from the shipped configs
run hstu_base hstu "1 2" "$old_hstu"
run hstu_alpha1 hstu 1 "$old_hstu;hstu.alpha=1.0"
run hstu_scale hstu 1 "$old_hstu;$scale"
run hstu_kv50 hstu 1 "$old_hstu;hstu.kv_channels=50"
run hstu_relbias hstu 1 "$old_hstu;hstu.relative_bias={}"
run hstu_betas hstu 1 "$old_hstu;$betas"
run hstu_all hstu "1 2" "$old_hstu;$hstu_all"
run hstu_all_norelbias hstu 1 "$old_hstu;hstu.alpha=1.0;$scale;hstu.kv_channels=50;$betas"
run sasrec_base sasrec "1 2" "$old_sasrec"
run sasrec_scale sasrec 1 "$old_sasrec;$scale"
run sasrec_betas sasrec 1 "$old_sasrec;$betas"
run sasrec_all sasrec "1 2" "$old_sasrec;$scale;$betas"
;;
2)  # one difference at a time on top of the embedding scaling (round 1's one large effect)
run hstu_scale hstu "1 2" "$old_hstu;$scale"
run hstu_scale_relbias hstu "1 2" "$old_hstu;$scale;hstu.relative_bias={}"
run hstu_scale_alpha1 hstu 1 "$old_hstu;$scale;hstu.alpha=1.0"
run hstu_scale_kv50 hstu 1 "$old_hstu;$scale;hstu.kv_channels=50"
run hstu_scale_betas hstu 1 "$old_hstu;$scale;$betas"
run hstu_all hstu "1 2" "$old_hstu;$hstu_all"
run sasrec_scale_betas sasrec "1 2" "$old_sasrec;$scale;$betas"
;;
3)  # the shipped configs as they are (after every fix, the UVQK init included)
run hstu_shipped hstu "1 2 3" ""
run hstu_shipped_xavier hstu "1 2" "hstu.uvqk_init_std=null"
run sasrec_shipped sasrec "1 2 3" ""
;;
esac
wait
grep -h "hr@10 by epoch\|Error\|error" "$out"/*.log
# few files come back from the device: one JSON of every row, one archive of the logs
python3 -c 'import json,sys; print(json.dumps([r for f in sys.argv[1:] for r in json.load(open(f))], indent=1))' \
  "$out"/*.json >"$out/rows.all" && rm -f "$out"/*.json && mv "$out/rows.all" "$out/rows.json"
tar -czf "$out/logs.tgz" -C "$out" $(cd "$out" && ls *.log) && rm -f "$out"/*.log
