#!/usr/bin/env bash
# ML-1M retrieval quality on the lent GPU machine: trains the named configs one after another on CUDA and writes each
# run's metrics.json, curves and log under $OUT/<config>/. Split the three models over calls to stay under the
# 10-minute limit of one call. The data: copy shared/data/ml-1m into the git-ignored .data/ml-1m and carry it with
# the wheels (carry=[".gpu-wheels", ".data"]); ML1M_DIR overrides the folder. E.g.
#   bash packages/gr-models/benchmarks/gpu_ml1m.sh ml1m_retrieval_hstu ml1m_retrieval_sasrec
#   bash packages/gr-models/benchmarks/gpu_ml1m.sh ml1m_retrieval_hstu_large
set -eo pipefail
export PYTHONUNBUFFERED=1
GR_SKIP_TESTS=1 source tools/gpu/setup.sh
out=${OUT:-/tmp/gr-models-ml1m}
data=${ML1M_DIR:-$PWD/.data/ml-1m}
for name in "${@:-ml1m_retrieval_hstu ml1m_retrieval_sasrec}"; do
  for config in $name; do
    gr-train --config "packages/gr-models/configs/$config.yaml" device=cuda train.progress_bar=false \
      train.checkpoint_every=0 data.path="$data" data.options.ratings_path="$data/partial/ratings_users0001-2999.dat.gz" \
      output_dir="$out/$config" 2>&1 | grep -v -E "fbgemm|cannot determine|WARNING:root|fx_tracing|\x1b|^\s*$" \
      | tee "$out/$config.log"
  done
done
