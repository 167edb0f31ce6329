"""The prefix KV cache on a tiny random VLM: with it, greedy outputs equal those of an engine without it, token
for token (a 2-turn chat, a batch mixing hits and misses, a request joining a running batch), only matching
tokens and equal images are reused, the byte budget evicts, and changed weights empty it."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from stitch.errors import StitchError
from stitch.infer.engine import Engine, Request
from stitch.infer.generate import build_conversation
from stitch.infer.prefix_cache import PrefixKVCache
from stitch.infer.sampling import SamplingParams

GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)


def picture(color, w: int = 60, h: int = 30) -> Image.Image:
    img = Image.new("RGB", (w, h), color)
    for x in range(0, w, 5):
        img.putpixel((x, x % h), (x * 3 % 255, 40, 255 - x % 255))
    return img


RED, BLUE = picture((200, 30, 30)), picture((20, 60, 220))


@pytest.fixture(scope="module")
def engines(loaded):
    model, processor = loaded
    cached = Engine(model, processor, prefix_cache_bytes=64 << 20)
    plain = Engine(model, processor, prefix_cache_bytes=0)
    assert plain.prefix_cache is None
    return cached, plain


def turns(engine: Engine, image, questions: list[str], replies: list[str], params=GREEDY) -> Request:
    """The request of the next turn of a chat about `image`: earlier questions with their replies, then one more."""
    conv = build_conversation(questions[0], 1)
    for reply, question in zip(replies, questions[1:]):
        conv += [{"role": "assistant", "content": reply}, {"role": "user", "content": question}]
    return engine.prepare(conv, [image], params)


def test_second_turn_reuses_the_first_and_answers_the_same(engines):
    cached, plain = engines
    cached.prefix_cache.clear()
    first_q = ["What colour is this picture?", "And what shape is in it?"]
    one = turns(cached, RED, first_q[:1], [])
    reply = cached.generate([one])[0]
    assert reply.token_ids == plain.generate([turns(plain, RED, first_q[:1], [])])[0].token_ids
    before = cached.prefix_cache.reused_tokens
    two = turns(cached, RED, first_q, [reply.text])
    got = cached.generate([two])[0]
    want = plain.generate([turns(plain, RED, first_q, [reply.text])])[0]
    assert got.token_ids == want.token_ids and len(set(got.token_ids)) > 3
    # the whole first prompt (image included) came from the cache: only the reply and the new question ran
    assert cached.prefix_cache.reused_tokens - before >= one.input_ids.numel() - 1
    # the second turn's entry extends the first's and replaced it
    assert len(cached.prefix_cache) == 1


def test_batch_of_hits_and_misses_equals_no_cache(engines):
    """One batch: a chat's second turn (a long hit), the same question about another image (its text prefix
    matches, the image must not), a new short text prompt, a new image prompt and a long text prompt (misses).
    The hit still reuses its whole first turn: rows with a match prefill as their own group."""
    cached, plain = engines
    cached.prefix_cache.clear()
    q = ["Describe this picture in a few words.", "Now tell me about the corners."]
    first = turns(cached, RED, q[:1], [])
    reply = cached.generate([first])[0].text
    cached.generate([turns(cached, BLUE, ["Is it dark?"], [])])  # a stored entry the blue row could match

    def batch(engine):
        return [turns(engine, RED, q, [reply]), turns(engine, BLUE, q, [reply]),
                engine.prepare(build_conversation("Hi there", 0), [], GREEDY),
                engine.prepare(build_conversation("What is it?", 1), [picture((10, 200, 10), 40, 40)], GREEDY),
                engine.prepare(build_conversation("A long story, please, about rivers. " * 10, 0), [], GREEDY)]

    before = dict(cached.prefix_cache.stats())
    requests = batch(cached)
    assert requests[-1].input_ids.numel() > requests[0].input_ids.numel()  # the longest prompt is a miss
    got = cached.generate(requests)
    want = plain.generate(batch(plain))
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    stats = cached.prefix_cache.stats()
    assert stats["prefix_hits"] > before["prefix_hits"] and stats["prefix_misses"] > before["prefix_misses"]
    assert stats["prefix_reused_tokens"] - before["prefix_reused_tokens"] >= first.input_ids.numel() - 1


def test_a_different_image_matches_only_up_to_its_first_tile(engines):
    cached, _ = engines
    red, blue = turns(cached, RED, ["Same words"], []), turns(cached, BLUE, ["Same words"], [])
    assert torch.equal(red.input_ids, blue.input_ids)  # only the pixels differ
    store = PrefixKVCache(1 << 20, cached.prefix_cache.image_token_id, cached.prefix_cache.tokens_per_tile, 1)
    kv = torch.zeros(2, 1, 1, red.input_ids.numel(), 1)
    store.store(red.input_ids, cached._tile_keys(red), kv)
    first_image = int((red.input_ids == store.image_token_id).nonzero()[0])
    entry, n = store.lookup(blue.input_ids, cached._tile_keys(blue), limit=10_000)
    assert n == first_image
    assert store.lookup(red.input_ids, cached._tile_keys(red), limit=10_000)[1] == red.input_ids.numel()


def test_byte_budget_evicts_least_recently_used(loaded, engines):
    model, processor = loaded
    _, plain = engines
    probe = Engine(model, processor, prefix_cache_bytes=1 << 30)
    a = probe.prepare(build_conversation("First prompt about the red one", 1), [RED], GREEDY)
    b = probe.prepare(build_conversation("Second prompt, the blue one", 1), [BLUE], GREEDY)
    size_a = probe._kv_bytes_per_token() * a.input_ids.numel()
    size_b = probe._kv_bytes_per_token() * b.input_ids.numel()
    engine = Engine(model, processor, prefix_cache_bytes=max(size_a, size_b) + min(size_a, size_b) // 2)
    engine.generate([a])
    assert engine.prefix_cache.bytes == size_a
    engine.generate([b])  # both do not fit: a goes
    assert len(engine.prefix_cache) == 1 and engine.prefix_cache.bytes == size_b <= engine.prefix_cache.max_bytes
    reused = engine.prefix_cache.reused_tokens
    again = engine.generate([a])[0]
    # a was evicted: only the system prompt it shares with b came from the cache, not its image
    first_image = int((a.input_ids == engine.prefix_cache.image_token_id).nonzero()[0])
    assert 0 < engine.prefix_cache.reused_tokens - reused <= first_image
    assert again.token_ids == plain.generate([a])[0].token_ids
    small = Engine(model, processor, prefix_cache_bytes=size_a // 2)  # a prompt over the budget is not kept
    small.generate([a])
    assert len(small.prefix_cache) == 0 and small.prefix_cache.bytes == 0


def test_joining_a_running_batch_uses_the_cache(engines):
    """Continuous batching: a second turn joining a running batch is prefilled from the cache into its row."""
    cached, plain = engines
    model, processor = cached.model, cached.processor
    engine = Engine(model, processor, max_batch_size=2, continuous_batching=True, prefix_cache_bytes=64 << 20)
    q = ["What is this?", "Say more."]
    reply = engine.generate([turns(engine, RED, q[:1], [])])[0].text
    second = turns(engine, RED, q, [reply], SamplingParams(max_new_tokens=6, ignore_eos=True))
    long = engine.prepare(build_conversation("Tell me a story about a long road. " * 12, 0), [],
                          SamplingParams(max_new_tokens=40, ignore_eos=True))
    want = [plain.generate([r])[0].token_ids for r in (turns(plain, RED, q, [reply], second.params), long)]
    assert long.input_ids.numel() >= second.input_ids.numel()  # so the second turn fits the running batch
    reused = engine.prefix_cache.reused_tokens
    joins = []
    prefill_row = engine._prefill_row
    engine._prefill_row = lambda *a: joins.append(a[1]) or prefill_row(*a)
    handle = engine.submit(long)
    events = iter(handle)
    next(events)
    assert engine.submit(second).result().token_ids == want[0]
    assert handle.result().token_ids == want[1]
    assert joins == [1] and engine.prefix_cache.reused_tokens > reused
    engine.close()


def test_changed_weights_empty_the_cache(loaded, engines):
    model, processor = loaded
    _, plain = engines
    engine = Engine(model, processor, prefix_cache_bytes=64 << 20)
    req = engine.prepare(build_conversation("Weights change between calls", 1), [RED], GREEDY)
    engine.generate([req])
    weight = model.llm.layers[0].mlp.down_proj.weight if hasattr(model.llm.layers[0].mlp, "down_proj") else next(
        model.llm.layers[0].parameters())
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(1.5)  # an optimizer step's in-place update
        hits = engine.prefix_cache.hits
        got = engine.generate([req])[0].token_ids
        assert engine.prefix_cache.hits == hits  # nothing reused from the old weights
        assert got == plain.generate([req])[0].token_ids
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_refuses_a_negative_budget(loaded):
    model, processor = loaded
    with pytest.raises(StitchError, match="prefix_cache_bytes"):
        Engine(model, processor, prefix_cache_bytes=-1)


def test_device_hash_tells_tiles_apart():
    """The on-GPU tile hash (run here on CPU tensors): equal tiles equal keys; one changed pixel, one changed
    dtype or shape, a different key."""
    from stitch.infer.image_cache import _device_keys

    tiles = torch.randn(3, 3, 8, 8)
    changed = tiles.clone()
    changed[1, 0, 0, 0] += 1e-3
    keys, again, other = _device_keys(tiles), _device_keys(tiles.clone()), _device_keys(changed)
    assert keys == again and len(set(keys)) == 3
    assert other[0] == keys[0] and other[1] != keys[1] and other[2] == keys[2]
    assert _device_keys(tiles.bfloat16())[0] != keys[0] and _device_keys(tiles.reshape(3, 3, 4, 16))[0] != keys[0]
