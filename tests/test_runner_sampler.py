"""The batched sampler on synthetic logits: greedy, top-k, top-p, temperature and seeds."""

from __future__ import annotations

from collections import Counter

import torch

from dpinfer.runner.sampler import SamplingInfo, make_generator, sample
from dpinfer.sampling import SamplingParams

CPU = torch.device("cpu")
VOCAB = 8
# Probabilities 0.4, 0.3, 0.2, 0.1 on tokens 5, 2, 7, 0; the rest ~0.
PROBS = torch.full((VOCAB,), 1e-9)
PROBS[[5, 2, 7, 0]] = torch.tensor([0.4, 0.3, 0.2, 0.1])
LOGITS = PROBS.log()


def info_for(params: list[SamplingParams], seeds: list[int | None]) -> SamplingInfo:
    gens = [None if p.greedy else make_generator(s) for p, s in zip(params, seeds, strict=True)]
    return SamplingInfo.build(params, gens, VOCAB, CPU)


def draw(params: SamplingParams, n: int, seed: int = 0) -> Counter[int]:
    info = info_for([params] * n, [seed + i for i in range(n)])
    return Counter(sample(LOGITS.repeat(n, 1), info).tolist())


def test_all_greedy_batch_is_argmax() -> None:
    logits = torch.randn(5, VOCAB)
    info = info_for([SamplingParams(temperature=0.0)] * 5, [None] * 5)
    assert info.all_greedy
    assert sample(logits.clone(), info).tolist() == logits.argmax(-1).tolist()


def test_top_k_one_is_greedy_even_with_temperature() -> None:
    params = SamplingParams(temperature=1.5, top_k=1)
    assert params.greedy
    assert set(draw(params, 50)) == {5}


def test_tiny_temperature_and_top_p_behave_as_greedy() -> None:
    """Values that pass validation but underflow float32 must not pick the least likely token."""
    for params in (
        SamplingParams(temperature=1e-40),
        SamplingParams(temperature=1e-6),
        SamplingParams(top_p=1e-46),
        SamplingParams(temperature=0.7, top_p=1e-7),
    ):
        assert params.greedy, params
        assert set(draw(params, 20)) == {5}, params
    assert not SamplingParams(temperature=1e-3).greedy, "a small but real temperature still samples"


def test_top_k_keeps_only_the_k_most_likely() -> None:
    counts = draw(SamplingParams(temperature=1.0, top_k=2), 400)
    assert set(counts) == {5, 2}
    # Renormalised 0.4 : 0.3 -> about 57% / 43%.
    assert 0.47 < counts[5] / 400 < 0.67


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    # 0.4 + 0.3 = 0.7 >= 0.65: tokens 5 and 2 only.
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.65), 400)) == {5, 2}
    # 0.4 < 0.75 <= 0.9: tokens 5, 2, 7.
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.75), 400)) == {5, 2, 7}


def test_plain_sampling_follows_the_distribution() -> None:
    counts = draw(SamplingParams(temperature=1.0), 2000)
    for token, p in ((5, 0.4), (2, 0.3), (7, 0.2), (0, 0.1)):
        assert abs(counts[token] / 2000 - p) < 0.05, (token, counts)


def test_low_temperature_sharpens() -> None:
    counts = draw(SamplingParams(temperature=0.1), 200)
    assert counts[5] / 200 > 0.9


def test_same_seed_same_tokens_whatever_the_batch() -> None:
    params = SamplingParams(temperature=1.0, seed=1234)
    info = info_for([params], [1234])
    alone = [sample(LOGITS.unsqueeze(0), info).item() for _ in range(20)]
    # Same request in a batch with greedy and other sampled rows around it.
    other = SamplingParams(temperature=0.7)
    batch_params = [SamplingParams(temperature=0.0), params, other]
    batch_info = info_for(batch_params, [None, 1234, 99])
    in_batch = [sample(LOGITS.repeat(3, 1), batch_info)[1].item() for _ in range(20)]
    assert alone == in_batch
    assert len(set(alone)) > 1, "the stream really samples"


def test_mixed_batch_keeps_greedy_rows_greedy() -> None:
    logits = torch.randn(4, VOCAB)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=5.0)] * 2
    out = sample(logits.clone(), info_for(params, [None, 1, None, 2]))
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()
