#!/usr/bin/env bash
# Every GPU measurement in ONE device call (about 9 minutes on an H200), each benchmark's output
# in its own file under $OUT:
#   bench_step.py for every backbone, baseline vs HIST, bf16: ALBEF and BLIP (batch 56),
#     BLIP-2 (batch 32: ViT-g), LLaVA (batch 8: CLIP ViT-L/14-336 + a 1.1B decoder, every text
#     row a ~620-token decoder pass); profile_step.py (ALBEF)
#   with EXTRA=1 also bench_eval_retrieval.py (ALBEF-base 384 px) and bench_vqa.py
# On the device (its image's python3; the repository's src/ on PYTHONPATH):
#   bash benchmarks/gpu_session.sh
# Rehearsal on CPU at tiny sizes (what to run before spending device time):
#   SIZE=tiny DEVICE=cpu PY=.venv/bin/python OUT=/tmp/gpu_out bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-/tmp/gpu_out}
PY=${PY:-python3}
SIZE=${SIZE:-base}
DEVICE=${DEVICE:-cuda}
if [ "$SIZE" = base ]; then RETRIEVAL="--size base --images 32 --k 64"; else RETRIEVAL="--size small --images 8 --k 8"; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

run() {  # name, seconds, script and arguments: output and exit status into $OUT/name.txt
  local name=$1 limit=$2
  shift 2
  echo "== $name ($*)"
  timeout "$limit" "$PY" "$@" > "$OUT/$name.txt" 2>&1
  echo "exit status $?" >> "$OUT/$name.txt"
  grep -v '^USDT' "$OUT/$name.txt" | tail -14
}

{ nvidia-smi || true; "$PY" -c "import torch, transformers, timm; print('torch', torch.__version__, '| transformers',
transformers.__version__, '| timm', timm.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"; } > "$OUT/env.txt" 2>&1
tail -1 "$OUT/env.txt"
run step_albef 100 benchmarks/bench_step.py --size "$SIZE" --device "$DEVICE"
run step_blip 100 benchmarks/bench_step.py --size "$SIZE" --backbone blip --device "$DEVICE"
run step_blip2 110 benchmarks/bench_step.py --size "$SIZE" --backbone blip2 --batch 32 --device "$DEVICE"
run step_llava 130 benchmarks/bench_step.py --size "$SIZE" --backbone llava --batch 8 --device "$DEVICE"
run profile_albef 100 benchmarks/profile_step.py --size "$SIZE" --device "$DEVICE"
if [ "${EXTRA:-0}" = 1 ]; then
  run retrieval 90 benchmarks/bench_eval_retrieval.py $RETRIEVAL --device "$DEVICE"
  run vqa 90 benchmarks/bench_vqa.py --size "$SIZE" --device "$DEVICE"
fi
