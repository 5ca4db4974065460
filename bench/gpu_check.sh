#!/usr/bin/env bash
# Device entry point of the GPU checks of issues 12 and 13 (one H100/H200 machine, one call each):
#   bench/gpu_check.sh train      # `train` wheel pack (DeepSpeed ...): fused RVQ kernel bench, then asvr-train checks
#   bench/gpu_check.sh pipeline   # `pipeline` wheel pack (Ray as tar.xz): asvr-pipeline tokenize vs in-process
#   bench/gpu_check.sh tokenize   # `pipeline` wheel pack: issue 27's bench/tokenize_speed.py (tokenizer + steady state)
# Wheels come from ../shared/tools/device-pack in WHL (default ../.whl); the EfficientNet-Lite0 feature
# spread from bench/efficientnet_spread.py in SPREAD (default data/effnet_spread.npz).  Every step has its
# own timeout and writes its results under $OUT as it goes (a cut-off run still returns data).
# CPU dry run of the same steps: bench/gpu_check.sh train --tiny (and pipeline --tiny).
set -uo pipefail
what=${1:?usage: gpu_check.sh train|pipeline|tokenize [--tiny]}
tiny=${2:-}
OUT=${OUT:-/tmp/gpu_check}
WHL=${WHL:-../.whl}
SPREAD=${SPREAD:-data/effnet_spread.npz}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
if [ -d "$WHL" ] && [ -z "$tiny" ]; then
  t0=$(date +%s)
  mkdir -p /tmp/site
  [ ! -f "$WHL/ray.tar.xz" ] || tar -C /tmp/site -xJf "$WHL/ray.tar.xz"
  # or Ray's wheel as a zip stripped of jars/rllib/serve/llm/js maps (~43 MB; xz -9 takes too long on a busy
  # 2-core box): unzipped keeping the executable bits of raylet/gcs_server
  [ ! -f "$WHL/ray-stripped.zip" ] || $PY -c "
import os, sys, zipfile
z = zipfile.ZipFile(sys.argv[1]); z.extractall('/tmp/site')
for i in z.infolist():
    m = (i.external_attr >> 16) & 0o777
    if m & 0o111: os.chmod(os.path.join('/tmp/site', i.filename), m)" "$WHL/ray-stripped.zip"
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHL"/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
  $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || exit 4
  echo "installed wheels + asvr in $(( $(date +%s) - t0 ))s"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>/dev/null
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1; } | tee "$OUT/env.txt"
case "$what" in
  train)
    extra=(); [ -f "$SPREAD" ] && extra=(--spread "$SPREAD")
    timeout 230 $PY bench/gpu_rvq_kernel.py --iters 3 --out "$OUT" $tiny "${extra[@]}" 2>&1 | tee "$OUT/gpu_rvq_kernel.log"
    timeout 330 $PY bench/gpu_train_check.py --work /tmp/asvr_gtc --out "$OUT" --timeout 150 $tiny 2>&1 \
      | grep -v "Writing model shards" > "$OUT/gpu_train_check.out"
    tail -n 25 "$OUT/gpu_train_check.out"
    ;;
  pipeline)
    # issue 12 #4: cached codes vs the reference's tokenizer-every-step at SigLIP scale (1.3B LLM)
    if [ -z "$tiny" ]; then
      timeout 110 $PY bench/step_time_cached_vs_online.py --siglip --device cuda --hidden 2048 --layers 24 \
        --text 1318 --depth 8 --codebook 16384 --batch 4 --steps 3 --search-dtype fused-bf16x3 2>&1 \
        | grep -v "Writing model" | tee "$OUT/cached_vs_online.log"
    fi
    timeout 180 $PY bench/gpu_pipeline_ray.py --out "$OUT" --images 2048 --search-dtype float32 fused-bf16x3 $tiny \
      2>&1 | grep -v "Writing model" | tee "$OUT/gpu_pipeline_ray.log"
    ;;
  tokenize)
    timeout 560 $PY bench/tokenize_speed.py --out "$OUT" --images 4096 $tiny 2>&1 | grep -v "Writing model" \
      | tee "$OUT/tokenize_speed.log"
    ;;
  *) echo "gpu_check.sh: train, pipeline or tokenize"; exit 2 ;;
esac
