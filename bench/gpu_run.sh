#!/usr/bin/env bash
# The benchmarks on one GPU node, in one call sized to a lease of 15 minutes of device time
# (the machine's start included). PHASES names the phases in the order they run, comma-separated;
# phases joined by '+' run at the same time (only those whose figures are not timings). Each has
# its own time limit, and all end by BUDGET seconds. The default call answers the open question
# first:
#   throughput  the trainer's step and the fastest combinations of the levers of
#               bench/mlm_levers.py (not yet timed on a GPU), each against the eager baseline in
#               the same process;
#   tune        the fastest combination again with the compiler's product search (minutes of
#               compiling), in a process of its own, so that a compile that outlasts its limit
#               loses nothing else;
#   check       the masked-LM step's tests and the levers', the GPU-only ones included (CUDA
#               graphs, cuDNN's attention op).
# Other phases, for calls of their own: floor (the step's matrix products alone), real (real text,
# packed vs padded), profile, bytes (the compiler's byte count on this device), accuracy (the
# TrainConfig recipes of RECIPES, all processes at once: MiniLM fine-tuning leaves a GPU mostly
# idle; the recipe levers are no TrainConfig fields, bench/mlm_step_check.py compares them).
#
# What the node lacks travels in the git-ignored folder .devcarry/, made where the data is by
#   python bench/prepare_gpu_inputs.py   (canonical split + Reuters texts, MiniLM in float16, wheels)
# Then, on the node:  OUT=<results folder> bash bench/gpu_run.sh
# THROUGHPUT_MODES / TUNE_MODES the fast runs, most telling first; RECIPES the accuracy recipe file;
# <PHASE>_TIMEOUT a phase's limit in seconds; PROFILE_MODE the one profiled.
# A smoke test of the plumbing on a CPU (two cores need longer limits than a GPU node):
#   OUT=/tmp/gpu_out DEVICE=cpu SMOKE=1 PY=.venv/bin/python BUDGET=1500 bash bench/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
# Everything ends by BUDGET seconds: a device call's limit is 600.
BUDGET=${BUDGET:-585}
PHASES=${PHASES:-throughput,tune,check}
RECIPES_FILE=${RECIPES:-bench/recipes/defaults.txt}
OUT=${OUT:?set OUT to a results folder}
DEVICE=${DEVICE:-cuda}
SMOKE=${SMOKE:-0}
PY=${PY:-python3}
CARRY=.devcarry
mkdir -p "$OUT"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/summary.txt"; }

if ! "$PY" -c "import pydantic_settings, datasets, pytest" 2>/dev/null; then
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
# A phase's limit: its own, and never past BUDGET.
limit() { local left=$((BUDGET - SECONDS)); echo $(( $1 < left ? $1 : (left > 1 ? left : 1) )); }

phase_check() {
  log "check: the masked-LM step's tests and the levers', the GPU-only ones included"
  timeout "$(limit ${CHECK_TIMEOUT:-150})" "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_fast_mlm.py \
    bench/test_mlm_levers.py > "$OUT/check.log" 2>&1
  log "check rc=$?"
  tail -n 15 "$OUT/check.log" | grep -E "passed|failed|error|SKIPPED|FAILED" | tee -a "$OUT/summary.txt"
}

phase_floor() {
  log "floor: the step's matrix products alone"
  timeout "$(limit ${FLOOR_TIMEOUT:-120})" "$PY" bench/gemm_floor.py --device "$DEVICE" $TP $FLOOR --seq 128 ${FLOOR_OPTIONS:-} \
    --out "$OUT/gemm_floor.jsonl" > "$OUT/floor.log" 2>&1
  log "floor rc=$?"
  grep -E "products|ceiling|failed" "$OUT/floor.log" | tee -a "$OUT/summary.txt"
}

# throughput_runs NAME LIMIT MODES [ARGS...]: one bench process, its own baseline first; ARGS go to
# the bench after the phase's defaults. Each Trainer run compiles bert-base afresh (30-45 s on an
# H100 with a cold cache). A run cut off by the limit loses the JSON line, but the log keeps the
# tok/s lines of the runs before it.
throughput_runs() {
  local name=$1 seconds=$2 modes=$3
  shift 3
  log "$name: $modes $*"
  timeout "$(limit "$seconds")" "$PY" bench/train_throughput.py --device "$DEVICE" $TP --seq 128 --compile-mode "$modes" \
    "$@" --out "$OUT/train_throughput.jsonl" > "$OUT/$name.log" 2>&1
  log "$name rc=$?"
  grep -E "tok/s|ratio|host syncs|skipped|failed" "$OUT/$name.log" | tee -a "$OUT/summary.txt"
}

# The trainer's step (round 4's 56.1 ms on an H100), every lever with the recipe changes, the same
# under CUDA graphs (no custom op left in the graph without dropout), and every lever that keeps the
# recipe's dropout; last the Trainer uncompiled (no compile: seconds), which says whether
# torch_compile should be on by default on a GPU.
LEVERS=sparselast:padvocab:fusedqkv:bf16res
phase_throughput() {
  throughput_runs throughput "${THROUGHPUT_TIMEOUT:-225}" \
    "${THROUGHPUT_MODES:-default,default:$LEVERS:nodrop,reduce-overhead:$LEVERS:nodrop,default:$LEVERS:cudnnattn,none}"
}

# The compiler's product search: GELU, bias and dropout + residual fused into the products' epilogues.
phase_tune() {
  throughput_runs tune "${TUNE_TIMEOUT:-200}" "${TUNE_MODES:-default:$LEVERS:nodrop:gemmtune}"
}

# Real text, packed against padded.
phase_real() {
  throughput_runs real "${REAL_TIMEOUT:-110}" default --real --inputs $CARRY/inputs
}

# The Trainer's steps and the baseline's, costliest kernels.
phase_profile() {
  throughput_runs profile "${PROFILE_TIMEOUT:-120}" "${PROFILE_MODE:-default}" --steps 10 --profile 3
}

phase_bytes() {
  log "bytes: the compiler's count of the step's generated kernels' bytes, on this device (the CPU's count estimates it)"
  timeout "$(limit ${BYTES_TIMEOUT:-200})" "$PY" bench/step_bytes.py --device "$DEVICE" $BYTES --options default,bf16res --top 8 \
    --out "$OUT/step_bytes.jsonl" > "$OUT/bytes.log" 2>&1
  log "bytes rc=$?"
  grep -E "generated kernels" "$OUT/bytes.log" | tee -a "$OUT/summary.txt"
}

# ---- accuracy: one process per line of the recipe file (label | variant | seeds | TrainConfig overrides)
# The fine-tuning defaults before 2026-11-26 (rounds 1 and 2 ran with them), then the changes recipes make.
LEGACY="epochs=3 learning_rate=8e-5 layer_lr_decay=1.0 pooling=cls agreement_soft_labels=false"
LLRD="layer_lr_decay=0.85 learning_rate=1.5e-4 epochs=5"
MLM="mlm_steps=1000 mlm_batch_size=64 mlm_learning_rate=1e-4 mlm_max_corpus_texts=25000 checkpoint_steps=0"
phase_accuracy() {
  local line index label variant seeds overrides item
  local -a recipe_lines recipes sets pids
  mapfile -t recipe_lines < <(grep -v -E "^\s*(#|$)" "$RECIPES_FILE")
  for line in "${recipe_lines[@]}"; do
    line=${line//\$LEGACY/$LEGACY}; line=${line//\$LLRD/$LLRD}; recipes+=("${line//\$MLM/$MLM}")
  done
  local acc=/tmp/accuracy-runs acc_timeout
  rm -rf $acc && mkdir -p $acc
  acc_timeout=$(limit "${ACCURACY_TIMEOUT:-200}")
  log "accuracy: ${#recipes[@]} processes of $RECIPES_FILE, ${acc_timeout} s"
  for index in "${!recipes[@]}"; do
    IFS="|" read -r label variant seeds overrides <<< "${recipes[$index]}"
    sets=(--set base_model=/tmp/minilm)
    for item in $overrides; do sets+=(--set "$item"); done
    if [ "$SMOKE" = 1 ]; then sets+=(--limit-rows 64 --set epochs=1 --set mlm_steps=2 --set mlm_batch_size=4); fi
    OMP_NUM_THREADS=1 timeout "$acc_timeout" "$PY" bench/accuracy.py --device "$DEVICE" --inputs $CARRY/inputs --variants "$variant" \
      --seed-list "$seeds" --label "$label" "${sets[@]}" --out "$acc/$index.jsonl" > "$acc/$index.log" 2>&1 &
    pids+=($!)
  done
  for index in "${!pids[@]}"; do
    wait "${pids[$index]}"
    log "accuracy process $index (${recipes[$index]%%|*}) rc=$?"
  done
  cat $acc/*.jsonl > "$OUT/accuracy.jsonl" 2>/dev/null
  for f in $acc/*.log; do echo "=== $f"; grep -v -E "it/s\]|s/it\]|^\s*$" "$f" | tail -40; done > "$OUT/accuracy_logs.txt"
  grep -h -o "run: {.*}" $acc/*.log | tee -a "$OUT/summary.txt"
  "$PY" bench/accuracy.py --combine "$OUT/accuracy.jsonl" | tee -a "$OUT/summary.txt"
}

for group in ${PHASES//,/ }; do
  IFS=+ read -r -a phases <<< "$group"
  for phase in "${phases[@]}"; do
    if ! declare -F "phase_$phase" > /dev/null; then log "unknown phase $phase"; continue; fi
    if (( SECONDS >= BUDGET - 5 )); then log "$phase: skipped, the budget of $BUDGET s is spent"; continue; fi
    "phase_$phase" &
  done
  wait
done
log "done"
