#!/usr/bin/env bash
# One machine, N ranks. The easy way is `dpinfer serve --model M --dp N`; this is what it does.
set -euo pipefail
MODEL=${MODEL:-tiny-llama}
NPROC=${NPROC:-2}
PORT=${PORT:-5555}

dpinfer coordinator --host 127.0.0.1 --port "$PORT" &
COORD=$!
trap 'dpinfer stop --address tcp://127.0.0.1:$PORT || true; kill $COORD 2>/dev/null || true' EXIT

torchrun --standalone --nproc_per_node="$NPROC" launch/engine.py \
    --coordinator "tcp://127.0.0.1:$PORT" --model "$MODEL" --max-restarts 1
