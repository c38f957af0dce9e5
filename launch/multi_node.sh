#!/usr/bin/env bash
# Several machines, one coordinator. Run the coordinator once (on node 0), then this script
# on every node with NODE_RANK=0..NNODES-1. Ranks are numbered globally by torchrun.
#
#   node 0:   dpinfer keys --out keys/server                                                # the coordinator's pair
#             dpinfer keys --out keys/rank --name rank --role rank --server-dir keys/server  # the ranks' key
#             dpinfer coordinator --host 0.0.0.0 --port 5555 --curve keys/server
#   node k:   (copy keys/rank there) NODE_RANK=k NNODES=2 COORD_HOST=node0 CURVE_DIR=keys/rank \
#                 ./launch/multi_node.sh
#
# Listening beyond loopback without --curve lets anyone on the network submit work: use CURVE.
set -euo pipefail
: "${NODE_RANK:?set NODE_RANK (0..NNODES-1)}"
: "${COORD_HOST:?set COORD_HOST (host name of the coordinator)}"
NNODES=${NNODES:-2}
NPROC=${NPROC:-$(python3 -c 'import torch; print(max(1, torch.cuda.device_count()))')}
MODEL=${MODEL:-tiny-llama}
RDZV_PORT=${RDZV_PORT:-29400}

torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" \
    --rdzv_backend=c10d --rdzv_endpoint="$COORD_HOST:$RDZV_PORT" \
    launch/engine.py --coordinator "tcp://$COORD_HOST:5555" --model "$MODEL" \
    --max-restarts 1 ${CURVE_DIR:+--rank-curve-dir "$CURVE_DIR"}
