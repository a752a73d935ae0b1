#!/usr/bin/env bash
# Run on the CPU machine: download the cp312 manylinux wheels listed in tools/gpu/wheels.txt into
# .gpu-wheels/ (git-ignored), to be carried to the GPU machine (see CONTRIBUTING.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=.gpu-wheels
rm -rf "$dest"
mkdir -p "$dest"
platforms=()
for tag in manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 \
           manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
grep -vE '^\s*(#|$)' tools/gpu/wheels.txt | while read -r req; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dest" "$req"
done
total=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
printf '%s\n' "$dest"/*.whl
echo "total: $((total / 1024 / 1024)) MB in $(ls "$dest"/*.whl | wc -l) wheels"
if [ "$total" -gt $((60 * 1024 * 1024)) ]; then
  echo "error: the carried wheels exceed 60 MB; the device tool carries at most 64 MB in all" >&2
  exit 1
fi
