#!/usr/bin/env bash
# Every GPU check of one device session, in about 12 minutes on an H200: the throughput figures of
# the README table (compiled and eager), H/16 and G/16 with --grad_checkpoint, the bf16 drift, a CUDA run of main_jit.py (bf16, compile,
# checkpoint, demo samples), and a resume from a reference-format checkpoint (AdamW `step` counters
# on the CPU, fused=None). Results go to $OUT (default ./gpu_check).
#   bash bench/gpu_check.sh            # on the GPU machine
#   SMOKE=1 bash bench/gpu_check.sh    # the same steps with tiny models, to try the script on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
if [ "${SMOKE:-0}" = 1 ]; then
  B16=(--model JiT-XS/4 --img_size 16 --batch_size 4 --steps 2 --warmup 1 --sample_batch 4 --sample_steps 2 --parity_steps 2)
  H16=("${B16[@]}")
  G16=("${B16[@]}")
  DEMO=(--epochs 1 --device cpu)
else
  B16=(--model JiT-B/16 --img_size 256 --batch_size 128 --steps 30 --warmup 10)
  H16=(--model JiT-H/16 --img_size 256 --batch_size 128 --steps 15 --warmup 8)
  G16=(--model JiT-G/16 --img_size 256 --batch_size 64 --steps 8 --warmup 5)  # one GPU: no sharding, 48 GB of state
  DEMO=(--epochs 2)
fi
status=0
run() {  # run NAME CMD...: log to $OUT/NAME.log, keep going on failure
  local name=$1; shift
  echo "== $name: $*"
  "$@" > "$OUT/$name.log" 2>&1 || { echo "FAILED: $name (see $OUT/$name.log)"; status=1; }
  tail -n 6 "$OUT/$name.log"
}
run b16 python bench/bench.py "${B16[@]}" --parity --json "$OUT/b16.json"
run h16 python bench/bench.py "${H16[@]}" --skip_sample --json "$OUT/h16.json"
run h16_ckpt python bench/bench.py "${H16[@]}" --skip_sample --grad_checkpoint --json "$OUT/h16_ckpt.json"
run g16_ckpt python bench/bench.py "${G16[@]}" --skip_sample --grad_checkpoint --json "$OUT/g16_ckpt.json"
run b16_eager python bench/bench.py "${B16[@]}" --no_compile --json "$OUT/b16_eager.json"
run demo python main_jit.py --demo "${DEMO[@]}" --output_dir "$OUT/demo"
run ref_resume python bench/reference_resume.py "$OUT/demo/checkpoint-last.pth" "$OUT/ref_resume" --demo "${DEMO[@]}"
exit $status
