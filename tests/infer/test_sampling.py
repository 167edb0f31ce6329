"""The batched sampler against `transformers`' logits processors, and its sampling distribution; text streams."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from stitch.infer.sampling import BatchSampler, SamplingParams
from stitch.infer.text import TextStream

V = 50


def hf_process(logits, prompt, p: SamplingParams):
    """What `transformers.generate` does to the logits of one row (repetition penalty, T, top-k, top-p)."""
    scores = logits[None].clone()
    if p.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(prompt[None], scores)
    if p.temperature:
        scores = TemperatureLogitsWarper(p.temperature)(prompt[None], scores)
    if p.top_k:
        scores = TopKLogitsWarper(p.top_k)(prompt[None], scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(prompt[None], scores)
    return scores[0]


def test_logit_transforms_match_transformers():
    torch.manual_seed(0)
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(temperature=0.9, top_p=0.6),
        SamplingParams(temperature=1.0, top_k=10, top_p=0.8, repetition_penalty=1.4),
        SamplingParams(repetition_penalty=0.7),
    ]
    logits = torch.randn(len(params), V) * 3
    prompts = [torch.randint(0, V, (8,)) for _ in params]
    sampler = BatchSampler(params, len(params), V, torch.device("cpu"), prompts)
    ours = sampler.process(logits)
    for row, p in enumerate(params):
        ref = hf_process(logits[row], prompts[row], p)
        kept = ref > -float("inf")
        assert torch.equal(ours[row] > torch.finfo(torch.float32).min, kept), p
        if p.greedy:  # rows decoded greedily see only the repetition penalty
            torch.testing.assert_close(ours[row], ref)
        else:
            torch.testing.assert_close(ours[row][kept], ref[kept])


def test_greedy_rows_take_the_argmax_and_penalty_history_grows():
    logits = torch.tensor([[0.0, 2.0, 1.05, 1.9]])
    sampler = BatchSampler([SamplingParams(repetition_penalty=2.0)], 1, 4, torch.device("cpu"), [torch.tensor([3])])
    assert sampler(logits, 0).tolist() == [1]  # token 3 (1.9) is penalised to 0.95
    assert sampler(logits, 1).tolist() == [2]  # now token 1 is seen too (2.0 -> 1.0): 1.05 wins


def test_samples_follow_the_softmax_and_depend_only_on_seed_and_step():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    n = 20000
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(n)]
    sampler = BatchSampler(params, n, 5, torch.device("cpu"))
    tokens = sampler(logits.expand(n, 5), 0)
    freq = torch.bincount(tokens, minlength=5).float() / n
    torch.testing.assert_close(freq, logits.softmax(-1), atol=0.015, rtol=0)
    # the same seed gives the same token whatever its batch neighbours, another step gives fresh noise
    alone = BatchSampler(params[123:124], 1, 5, torch.device("cpu"))
    assert alone(logits[None], 0).item() == tokens[123].item()
    assert not torch.equal(sampler(logits.expand(n, 5), 1), tokens)


def test_top_k_1_and_tiny_top_p_are_greedy():
    torch.manual_seed(1)
    logits = torch.randn(4, V)
    params = [SamplingParams(temperature=1.0, top_k=1, seed=1), SamplingParams(temperature=2.0, top_p=1e-6, seed=2)]
    sampler = BatchSampler(params * 2, 4, V, torch.device("cpu"))
    assert torch.equal(sampler(logits, 0), logits.argmax(-1))


@pytest.fixture(scope="module")
def tokenizer(loaded):
    return loaded[1].tokenizer  # SmolLM2's byte-level BPE


def test_text_stream_handles_multibyte_characters_and_stop_strings(tokenizer):
    text = "Café 😀 naïve — done. The END is near."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer)
    pieces = []
    for i in ids:
        stream.add(i)
        pieces.append(stream.take())
    stream.finish()
    pieces.append(stream.take(final=True))
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)

    stream = TextStream(tokenizer, stop=["END"])
    pieces = []
    for i in ids:
        if stream.add(i):
            break
        pieces.append(stream.take())
    pieces.append(stream.take(final=True))
    assert stream.stopped and stream.text == "Café 😀 naïve — done. The "
    assert "".join(pieces) == stream.text
    assert not any("E" in p for p in pieces)  # "E" may start "END": held back, then cut
