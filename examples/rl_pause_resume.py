"""The reinforcement-learning rollout loop: generate, train, pause, swap weights, resume.

Each iteration samples rollouts, "trains" (here: perturbs the weights of the served model and
saves them to a directory every rank can read), then pauses the engines, tells every rank to
load the new weights, and unpauses. Requests in flight across the swap are kept, none is lost.
"""

import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM

from dpinfer import InferenceClient, SamplingParams
from dpinfer.config import ModelConfig
from dpinfer.runner.registry import resolve_model

address = sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:5555"
model_name = sys.argv[2] if len(sys.argv) > 2 else "tiny-llama"
params = SamplingParams(max_new_tokens=8, temperature=0.0)

policy = AutoModelForCausalLM.from_pretrained(
    resolve_model(ModelConfig(model=model_name)).path, dtype=torch.float32
)
with InferenceClient(address) as client, tempfile.TemporaryDirectory() as weights_dir:
    previous = None
    for step in range(2):
        rollouts = client.generate(["The quick brown fox", "In a galaxy far away"], params)
        texts = [r.text for r in rollouts]
        print(f"step {step}: {texts}")
        assert previous is None or texts != previous, "new weights should change greedy rollouts"
        previous = texts
        with torch.no_grad():  # stand-in for an optimiser step
            for p in policy.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        policy.save_pretrained(weights_dir)
        client.pause_engines()
        ack = client.update_weights(weights_dir)
        print(f"weights swapped on ranks {[a.rank for a in ack.acks]}")
        client.unpause_engines()
