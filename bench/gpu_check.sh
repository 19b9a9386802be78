#!/usr/bin/env bash
# One command for a CUDA machine (under 8 minutes on one H100/H200-class GPU): the LSOR and
# AdapN steps at 64³ and 128³ in bf16 (samples/s, TFLOP/s, MFU), the loader on a real store,
# and 1-process DDP and DeepSpeed ZeRO-2 smoke runs over NCCL; one table at the end.
# Without CUDA it says so and exits 0.
#
#   bash bench/gpu_check.sh [OUT_DIR]      (default: runs/bench/gpu_check)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-runs/bench/gpu_check}
mkdir -p "$OUT"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False): nothing to check"
    exit 0
fi
"$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| cuda', torch.version.cuda, '| bf16', torch.cuda.is_bf16_supported())"

TABLE="$OUT/table.md"
{
    echo "| what | size | batch | precision | device | samples/s | GFLOP/step | GFLOP/s | MFU |"
    echo "|---|---|---|---|---|---|---|---|---|"
} > "$TABLE"
status=0
row() { echo "$1" | tee -a "$TABLE"; }

# 1. training steps (samples: pairs for LSOR, scans for AdapN)
for method in lsor adapn; do
    for size in 64 128; do
        batch=8; [ "$size" = 128 ] && batch=4
        line=$(timeout 120 "$PY" -m bench.train_throughput --method "$method" --size "$size" \
               --batch "$batch" --precision bf16 --steps 10 \
               --json "$OUT/step-$method-$size.json" 2>"$OUT/step-$method-$size.err" | tail -1)
        if [ -n "$line" ]; then row "$line"; else row "| $method | ${size}³ | $batch | bf16 | FAILED (see $OUT/step-$method-$size.err) | | | | |"; status=1; fi
    done
done

# 1b. hpcbrain plan against the GPU's own peak (bf16, LSOR and AdapN at 64³, checkpointing off/on)
if timeout 300 "$PY" -m bench.plan_memory --device cuda --shapes 64 --batch 8 \
        > "$OUT/plan_memory.txt" 2> "$OUT/plan_memory.err"; then
    grep -E "^\| (lsor|adapn)" "$OUT/plan_memory.txt" | sed 's/^/plan /' | tee -a "$OUT/plan_rows.md"
else
    row "| plan vs measured GPU peak | 64³ | 8 | bf16 | FAILED (see $OUT/plan_memory.err) | | | | |"; status=1
fi

# 2. a real store, then the loader on it
STORE="$OUT/cohort.zarr"
if [ ! -f "$STORE/zarr.json" ]; then
    timeout 180 .venv/bin/hpcbrain synth --out "$OUT/bids" --subjects 40 --seed 0 --quiet \
        && timeout 180 .venv/bin/hpcbrain convert "$OUT/bids" --out "$STORE" --shape 64 \
               --workers 8 --quiet || status=1
fi
{
    echo
    echo "| loader | workers | batch | rate |"
    echo "|---|---|---|---|"
} >> "$TABLE"
timeout 150 "$PY" -m bench.loader_throughput --store "$STORE" --kind pairs --workers 4 8 \
    --batch 8 --batches 40 --augment 2>"$OUT/loader.err" | tee -a "$TABLE" || status=1

# 3. one-process DDP and DeepSpeed ZeRO-2 over NCCL, bf16, end to end (smoke config at 64³)
{
    echo
    echo "| smoke run | exit | seconds |"
    echo "|---|---|---|"
} >> "$TABLE"
for engine in "engine.name=ddp" "engine.name=deepspeed engine.zero_stage=2"; do
    name=$(echo "$engine" | tr ' =.' '_--')
    started=$(date +%s)
    # shellcheck disable=SC2086
    timeout 180 "$PY" launch/submit.py --cfg lsor.yaml --cfg smoke.yaml --local \
        data.store="$STORE" data.input_size=64 run.root="$OUT/runs" run.name="$name" \
        engine.backend=nccl train.precision=bf16 tracking.uri="sqlite:///$OUT/mlflow.db" \
        tracking.registered_model=null $engine > "$OUT/$name.log" 2>&1
    code=$?
    row "| $engine (NCCL, bf16) | $code | $(( $(date +%s) - started )) |"
    [ "$code" = 0 ] || status=1
done

echo
echo "gpu_check: table in $TABLE"
exit $status
