#!/usr/bin/env bash
# The JPEGs bench/gpu.sh's throughput step reads, small enough to copy to a device machine beside a
# wheelhouse: the first N (default 120, about 20 MB) images of ../shared/data/coco-mini.
#   bench/gpu_images.sh DEST [N]
set -euo pipefail
dest=${1:?usage: bench/gpu_images.sh DEST [N]}
n=${2:-120}
src=$(cd "$(dirname "$0")/.." && pwd)/../shared/data/coco-mini
[ -d "$src" ] || { echo "gpu_images.sh: $src not found" >&2; exit 2; }
mkdir -p "$dest"
find "$src" -name '*.jpg' | sort | head -n "$n" | xargs -I{} cp {} "$dest/"
echo "$dest: $(ls "$dest" | wc -l) images, $(du -sh "$dest" | cut -f1)"
