#!/usr/bin/env bash
# The GPU checks of a device session, in parts of at most 6 minutes each (a part's steps share its
# budget; a step still running at the end is stopped), correctness first:
#   train   a CUDA run of main_jit.py: bf16, compile, checkpoints, --phema_stds, the demo samples; then
#           a resume of that run for one more epoch
#   checks  a resume from a reference-format checkpoint (AdamW `step` counters on the CPU, fused=None);
#           FSDP with torch.compile on inductor (1 GPU): graphs, dynamic ones, breaks, recompiles
#   b16     the README's B/16 throughput rows: training and sampling, compiled (with the bf16 drift) and eager
#   large   H/16 (with and without --grad_checkpoint) and G/16 with --grad_checkpoint, training only
# Every step appends one JSON line to $OUT/results.jsonl when it ends (part, step, exit status,
# seconds, its JSON file), so a part cut short leaves what finished. Logs and JSON go to $OUT
# (default ./gpu_check).
#   bash bench/gpu_check.sh                 # all parts, in the order above
#   bash bench/gpu_check.sh train checks    # some parts (each call: at most 6 minutes per part)
#   SMOKE=1 bash bench/gpu_check.sh         # every part with tiny models on the CPU (tries the script)
#   PRINT=1 bash bench/gpu_check.sh         # print the commands instead of running them
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
PART_SECONDS=${PART_SECONDS:-$([ "${SMOKE:-0}" = 1 ] && echo 3600 || echo 360)}  # SMOKE on a busy CPU: no cut
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ "${SMOKE:-0}" = 1 ]; then
  B16=(--model JiT-XS/4 --img_size 16 --batch_size 4 --steps 2 --warmup 1 --sample_batch 4 --sample_steps 2 --parity_steps 2 --device cpu)
  H16=("${B16[@]}")
  G16=("${B16[@]}")
  DEMO=(--demo --epochs 1 --device cpu --model JiT-XS/4 --img_size 16 --num_sampling_steps 2)
  TRAIN=("${DEMO[@]}" --phema_stds 0.05 0.1)  # compiling on the CPU would build C++ kernels for minutes
  RESUMED=(--epochs 2)
  FSDP=(--device cpu --backend aot_eager --steps 4)
else
  B16=(--model JiT-B/16 --img_size 256 --batch_size 128 --steps 30 --warmup 10)
  H16=(--model JiT-H/16 --img_size 256 --batch_size 128 --steps 15 --warmup 8)
  G16=(--model JiT-G/16 --img_size 256 --batch_size 64 --steps 8 --warmup 5)  # one GPU: no sharding, 48 GB of state
  DEMO=(--demo --epochs 1)
  TRAIN=(--demo --epochs 2 --compile --phema_stds 0.05 0.1)
  RESUMED=(--epochs 3)
  FSDP=(--device cuda --backend inductor --steps 6)
fi
TORCHRUN=(python -m torch.distributed.run --nproc_per_node=1 --master_addr=127.0.0.1 --master_port=29533)
status=0
part_end=0

step() {  # step NAME JSON CMD...: run CMD within the part's time left, log to $OUT/NAME.log, record the outcome
  local name=$1 json=$2; shift 2
  if [ "${PRINT:-0}" = 1 ]; then echo "$*"; return 0; fi
  local left=$((part_end - SECONDS))
  if ((left <= 0)); then
    echo "SKIPPED: $name (the part's ${PART_SECONDS}s are spent)"; code=124; seconds=0
  else
    echo "== $name: $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$left" "$@" > "$OUT/$name.log" 2>&1; code=$?
    seconds=$((SECONDS - t0))
    ((code == 0)) || echo "FAILED ($code): $name (see $OUT/$name.log)"
    tail -n 4 "$OUT/$name.log"
  fi
  ((code == 0)) || status=1
  printf '{"part": "%s", "step": "%s", "status": %d, "seconds": %d, "json": %s, "log": "%s"}\n' \
    "$part" "$name" "$code" "$seconds" "$( [ -n "$json" ] && [ -f "$json" ] && echo "\"$json\"" || echo null)" "$OUT/$name.log" \
    >> "$OUT/results.jsonl"
}

check() {  # check NAME CONDITION_DESCRIPTION TEST...: one recorded step that only tests what earlier steps left
  local name=$1 what=$2; shift 2
  step "$name" "" bash -c "$* || { echo 'not so: $what'; exit 1; }; echo 'ok: $what'"
}

part_train() {
  rm -rf "$OUT/train"
  step train "" python main_jit.py "${TRAIN[@]}" --output_dir "$OUT/train"
  check train_outputs "checkpoint, demo samples and power-EMA snapshots written" \
    "test -f $OUT/train/checkpoint-last.pth && test -f $OUT/train/samples.png && ls $OUT/train/phema/*.pth >/dev/null"
  step train_resume "" python main_jit.py "${TRAIN[@]}" "${RESUMED[@]}" --output_dir "$OUT/train" --resume "$OUT/train"
  check train_resumed "the second run resumed from the checkpoint of the first" "grep -q 'resumed from' $OUT/train_resume.log"
}

part_checks() {
  rm -rf "$OUT/ref_source" "$OUT/ref_resume"
  # eager: what is checked is fused AdamW meeting the reference's CPU `step` counters, not compilation
  step ref_source "" python main_jit.py "${DEMO[@]}" --no_compile --output_dir "$OUT/ref_source"
  step ref_resume "" python bench/reference_resume.py "$OUT/ref_source/checkpoint-last.pth" "$OUT/ref_resume" "${DEMO[@]}" --no_compile
  step fsdp_compile "$OUT/fsdp_compile.json" "${TORCHRUN[@]}" bench/fsdp_compile.py --mode blocks "${FSDP[@]}" --json "$OUT/fsdp_compile.json"
}

part_b16() {
  step b16 "$OUT/b16.json" python bench/bench.py "${B16[@]}" --parity --json "$OUT/b16.json"
  step b16_eager "$OUT/b16_eager.json" python bench/bench.py "${B16[@]}" --no_compile --skip_sample --json "$OUT/b16_eager.json"
}

part_large() {
  step h16 "$OUT/h16.json" python bench/bench.py "${H16[@]}" --skip_sample --json "$OUT/h16.json"
  step h16_ckpt "$OUT/h16_ckpt.json" python bench/bench.py "${H16[@]}" --skip_sample --grad_checkpoint --json "$OUT/h16_ckpt.json"
  step g16_ckpt "$OUT/g16_ckpt.json" python bench/bench.py "${G16[@]}" --skip_sample --grad_checkpoint --json "$OUT/g16_ckpt.json"
}

parts=("$@")
((${#parts[@]})) || parts=(train checks b16 large)
for part in "${parts[@]}"; do
  declare -F "part_$part" > /dev/null || { echo "error: no part '$part' (train, checks, b16, large)" >&2; exit 2; }
done
[ "${PRINT:-0}" = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
for part in "${parts[@]}"; do
  part_end=$((SECONDS + PART_SECONDS))
  "part_$part"
done
exit $status
