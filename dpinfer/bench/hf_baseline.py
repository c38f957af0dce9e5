"""The engine benchmark's baseline: ``transformers`` ``generate`` on static, left-padded batches.

Batches of ``HF_BATCH_SIZE`` requests in workload order; each batch runs until its longest
output (``min_new_tokens`` keeps EOS from ending it early), and each request's tokens are
timestamped by a logits processor at the step that produced them.
"""

from __future__ import annotations

import time
from typing import Protocol

from dpinfer.bench.workloads import Case, Workload, summarize

HF_BATCH_SIZE = 16


class HFGenerator(Protocol):
    """What the baseline calls on a ``transformers`` causal LM (``AutoModelForCausalLM``)."""

    def generate(self, **kwargs: object) -> object: ...


def run_hf_generate(model: HFGenerator, workload: Workload, pad_id: int, device: str = "cpu") -> Case:
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class StepClock(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.times.append(time.perf_counter())
            return scores

    stamps: list[list[float]] = []
    cpu0, t0 = time.process_time(), time.perf_counter()
    for start in range(0, len(workload.prompts), HF_BATCH_SIZE):
        prompts = workload.prompts[start : start + HF_BATCH_SIZE]
        out_lens = workload.output_lens[start : start + HF_BATCH_SIZE]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        clock = StepClock()
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max(out_lens),
                min_new_tokens=max(out_lens),  # no EOS: every request runs its full length
                do_sample=False,
                pad_token_id=pad_id,
                logits_processor=LogitsProcessorList([clock]),
            )
        stamps.extend(clock.times[:n] for n in out_lens)
    return summarize(workload, "hf_generate", t0, stamps, time.perf_counter(), time.process_time() - cpu0)
