#!/usr/bin/env bash
# The benchmarks on one GPU node, in one go: the masked-LM step's tests first (some run on a GPU
# only), then the product floor and the training-throughput runs (alone on the GPU, so their
# timings are clean), then, if asked, the accuracy recipes, all seeds at once as parallel
# processes (MiniLM fine-tuning leaves an H100 mostly idle, so they share it).
#
# What the node lacks travels in the git-ignored folder .devcarry/, made where the data is by
#   python bench/prepare_gpu_inputs.py   (canonical split + Reuters texts, MiniLM in float16, wheels)
# Then, on the node:  OUT=<results folder> bash bench/gpu_run.sh
# PHASES picks the parts (check, floor, throughput, real, profile, bytes, accuracy; default check, floor, throughput);
# RECIPES the accuracy recipe file; THROUGHPUT_MODES the fast runs, most telling first (THROUGHPUT_TIMEOUT seconds for all, default 360); PROFILE_MODE the one profiled.
# A smoke test of the plumbing on a CPU:  OUT=/tmp/gpu_out DEVICE=cpu SMOKE=1 PY=.venv/bin/python bash bench/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
# Everything ends by BUDGET seconds (the accuracy processes get what the throughput runs leave).
BUDGET=${BUDGET:-570}
PHASES=${PHASES:-check,floor,throughput}
RECIPES_FILE=${RECIPES:-bench/recipes/round1.txt}
OUT=${OUT:?set OUT to a results folder}
DEVICE=${DEVICE:-cuda}
SMOKE=${SMOKE:-0}
PY=${PY:-python3}
CARRY=.devcarry
mkdir -p "$OUT"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/summary.txt"; }

if ! "$PY" -c "import pydantic_settings, datasets, torchao, pytest" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $CARRY/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
"$PY" - <<'EOF' || exit 1
import shutil
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst = Path(".devcarry/minilm-fp16"), Path("/tmp/minilm")
dst.mkdir(parents=True, exist_ok=True)
for item in src.iterdir():
    if item.name != "model.safetensors":
        shutil.copy(item, dst / item.name)
weights = {k: t.float() if t.is_floating_point() else t for k, t in load_file(src / "model.safetensors").items()}
save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
EOF
{ nvidia-smi 2>&1; "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } > "$OUT/machine.txt"
log "machine: $(head -c 2000 "$OUT/machine.txt" | grep -m1 -E 'H100|H200|A100' || echo "$DEVICE")"

# ---- training throughput: bert-base, seq 128, batch 256; synthetic blocks, then real text
if [ "$SMOKE" = 1 ]; then TP="--size tiny --batch 4 --steps 3 --warmup 2"; FLOOR="--repeats 2"; BYTES="--size tiny --batches 2,4"; else TP="--size base --batch 256 --steps 40 --warmup 8"; FLOOR="--steps 20"; BYTES="--size base --batches 8,16"; fi
if [[ $PHASES == *check* ]]; then
  log "check: the masked-LM step's tests, the GPU-only ones included"
  timeout 90 "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_fast_mlm.py > "$OUT/check.log" 2>&1
  log "check rc=$?"
  tail -n 15 "$OUT/check.log" | grep -E "passed|failed|error|SKIPPED|FAILED" | tee -a "$OUT/summary.txt"
fi
if [[ $PHASES == *floor* ]]; then
  log "floor: the step's matrix products alone (FLOOR_OPTIONS=--float8: one encoder layer in bf16 and float8 too)"
  timeout 120 "$PY" bench/gemm_floor.py --device "$DEVICE" $TP $FLOOR --seq 128 ${FLOOR_OPTIONS:-} \
    --out "$OUT/gemm_floor.jsonl" > "$OUT/floor.log" 2>&1
  log "floor rc=$?"
  grep -E "products|ceiling|encoder layer|skipped|failed" "$OUT/floor.log" | tee -a "$OUT/summary.txt"
fi
if [[ $PHASES == *throughput* ]]; then
  log "throughput, synthetic"
  # Each Trainer run compiles bert-base afresh (30-40 s on an H200 with a cold cache).
  # A run cut off by the limit loses the JSON line, but the log keeps the tok/s lines of the runs before it.
  timeout ${THROUGHPUT_TIMEOUT:-360} "$PY" bench/train_throughput.py --device "$DEVICE" $TP --seq 128 \
    --compile-mode ${THROUGHPUT_MODES:-default,default:bf16res,default:cudnnattn,default:fusedqkv,default:bf16res:cudnnattn:fusedqkv,default:nodrop,none,default:denselast,default:nopadvocab} \
    --out "$OUT/train_throughput.jsonl" > "$OUT/throughput.log" 2>&1
  log "throughput synthetic rc=$?"
  grep -E "tok/s|ratio|host syncs|skipped|failed" "$OUT/throughput.log" | tee -a "$OUT/summary.txt"
fi
if [[ $PHASES == *real* ]]; then
  log "throughput, real text (packed vs padded)"
  timeout 110 "$PY" bench/train_throughput.py --device "$DEVICE" $TP --seq 128 --real --inputs $CARRY/inputs \
    --compile-mode default --out "$OUT/train_throughput.jsonl" > "$OUT/real.log" 2>&1
  log "throughput real rc=$?"
  grep -E "tok/s|ratio|host syncs|skipped|failed" "$OUT/real.log" | tee -a "$OUT/summary.txt"
fi
if [[ $PHASES == *profile* ]]; then
  log "profile: the Trainer's steps (${PROFILE_MODE:-default}) and the baseline's, costliest kernels"
  timeout 120 "$PY" bench/train_throughput.py --device "$DEVICE" $TP --steps 10 --seq 128 --compile-mode "${PROFILE_MODE:-default}" --profile 3 \
    --out "$OUT/train_throughput.jsonl" > "$OUT/profile.log" 2>&1
  log "profile rc=$?"
fi
if [[ $PHASES == *bytes* ]]; then
  log "bytes: the compiler's count of the step's generated kernels' bytes, on this device (the CPU's count estimates it)"
  timeout 200 "$PY" bench/step_bytes.py --device "$DEVICE" $BYTES --options default,bf16res --top 8 \
    --out "$OUT/step_bytes.jsonl" > "$OUT/bytes.log" 2>&1
  log "bytes rc=$?"
  grep -E "generated kernels" "$OUT/bytes.log" | tee -a "$OUT/summary.txt"
fi
[[ $PHASES == *accuracy* ]] || { log "done"; exit 0; }

# ---- accuracy: one process per line of the recipe file (label | variant | seeds | TrainConfig overrides)
# The fine-tuning defaults before 2026-11-26 (rounds 1 and 2 ran with them), then the changes recipes make.
LEGACY="epochs=3 learning_rate=8e-5 layer_lr_decay=1.0 pooling=cls agreement_soft_labels=false"
LLRD="layer_lr_decay=0.85 learning_rate=1.5e-4 epochs=5"
MLM="mlm_steps=1000 mlm_batch_size=64 mlm_learning_rate=1e-4 mlm_max_corpus_texts=25000 checkpoint_steps=0"
mapfile -t RECIPE_LINES < <(grep -v -E "^\s*(#|$)" "$RECIPES_FILE")
RECIPES=()
for line in "${RECIPE_LINES[@]}"; do
  line=${line//\$LEGACY/$LEGACY}; line=${line//\$LLRD/$LLRD}; RECIPES+=("${line//\$MLM/$MLM}")
done
ACC=/tmp/accuracy-runs
rm -rf $ACC && mkdir -p $ACC
ACC_TIMEOUT=$((BUDGET - SECONDS - 15))
log "accuracy: ${#RECIPES[@]} processes, ${ACC_TIMEOUT} s"
pids=()
for index in "${!RECIPES[@]}"; do
  IFS="|" read -r label variant seeds overrides <<< "${RECIPES[$index]}"
  sets=(--set base_model=/tmp/minilm)
  for item in $overrides; do sets+=(--set "$item"); done
  if [ "$SMOKE" = 1 ]; then sets+=(--limit-rows 64 --set epochs=1 --set mlm_steps=2 --set mlm_batch_size=4 --set soup_size=2); fi
  OMP_NUM_THREADS=1 timeout $ACC_TIMEOUT "$PY" bench/accuracy.py --device "$DEVICE" --inputs $CARRY/inputs --variants "$variant" \
    --seed-list "$seeds" --label "$label" "${sets[@]}" --out "$ACC/$index.jsonl" > "$ACC/$index.log" 2>&1 &
  pids+=($!)
done
for index in "${!pids[@]}"; do
  wait "${pids[$index]}"
  log "accuracy process $index (${RECIPES[$index]%%|*}) rc=$?"
done
cat $ACC/*.jsonl > "$OUT/accuracy.jsonl" 2>/dev/null
for f in $ACC/*.log; do echo "=== $f"; grep -v -E "it/s\]|s/it\]|^\s*$" "$f" | tail -40; done > "$OUT/accuracy_logs.txt"
grep -h -o "run: {.*}" $ACC/*.log | tee -a "$OUT/summary.txt"
"$PY" bench/accuracy.py --combine "$OUT/accuracy.jsonl" | tee -a "$OUT/summary.txt"
log "done"
