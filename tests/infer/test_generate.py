"""Generation on a tiny random VLM: the KV-cache path against full recomputation, batching, sampling, stop
strings, streaming, the background-thread engine and the `stitch generate` command."""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image

import stitch
from stitch.cli import main
from stitch.infer.engine import Engine, Request, _bucket_batch, _bucket_len
from stitch.infer.generate import build_conversation, generate, generate_batch
from stitch.infer.sampling import SamplingParams

GREEDY = SamplingParams(max_new_tokens=16, ignore_eos=True)


def image(w: int, h: int, color=(200, 30, 30)) -> Image.Image:
    img = Image.new("RGB", (w, h), color)
    for x in range(0, w, 7):  # some structure so tiles differ
        img.putpixel((x, x % h), (x % 255, 255 - x % 255, 90))
    return img


# Different prompt lengths and image counts (2 images, 1 wide image, text only, 1 small image).
CASES = [
    ("What is in these two pictures?", [image(120, 40), image(30, 30, (0, 90, 200))]),
    ("Describe it.", [image(200, 60)]),
    ("Tell me a long story about a cat who lived in a small house by the sea, in detail.", []),
    ("?", [image(20, 50, (10, 200, 10))]),
]


def requests(engine: Engine, params: SamplingParams = GREEDY):
    return [engine.prepare(build_conversation(p, len(ims)), ims, params) for p, ims in CASES]


def full_recompute_greedy(model, request, n: int) -> list[int]:
    """The reference: run the whole sequence again at every step and take the argmax of the last position."""
    device = next(model.parameters()).device
    ids = request.input_ids[None].to(device)
    pixels = None if request.pixel_values is None else request.pixel_values.to(device)
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(ids, pixels).logits[0, -1].argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
    return out


def test_kv_cache_greedy_equals_full_recomputation(loaded):
    model, processor = loaded
    engine = Engine(model, processor)
    reqs = requests(engine, SamplingParams(max_new_tokens=10, ignore_eos=True))
    # alone (two images), then a left-padded batch of two (text only + a small image)
    got = engine.generate(reqs[:1]) + engine.generate(reqs[2:])
    for req, completion in zip(reqs[:1] + reqs[2:], got):
        assert completion.token_ids == full_recompute_greedy(model, req, 10)
        assert len(set(completion.token_ids)) > 3  # a non-trivial output


def test_batched_equals_one_by_one(loaded):
    model, processor = loaded
    engine = Engine(model, processor)
    reqs = requests(engine)
    alone = [engine.generate([r])[0] for r in reqs]
    together = engine.generate(reqs)
    in_pairs = engine.generate(reqs, max_batch_size=2)
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.text for c in in_pairs] == [c.text for c in alone]
    # the public helper: conversations + image lists, same answers as `generate` one by one
    texts = generate_batch(model, processor, [build_conversation(p, len(ims)) for p, ims in CASES],
                           [ims for _, ims in CASES], max_new_tokens=8)
    assert texts == [generate(model, processor, ims, p, max_new_tokens=8) for p, ims in CASES]


def test_seeded_sampling_is_batch_invariant_and_params_are_per_request(loaded):
    model, processor = loaded
    engine = Engine(model, processor)
    mixed = [
        SamplingParams(max_new_tokens=12, ignore_eos=True),
        SamplingParams(max_new_tokens=12, temperature=1.0, seed=7, ignore_eos=True),
        SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=40, seed=8, ignore_eos=True),
        SamplingParams(max_new_tokens=5, temperature=1.2, repetition_penalty=1.5, seed=9, ignore_eos=True),
    ]
    reqs = [engine.prepare(build_conversation(p, len(ims)), ims, params) for (p, ims), params in zip(CASES, mixed)]
    together = engine.generate(reqs)
    alone = [engine.generate([r])[0] for r in reqs]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [len(c.token_ids) for c in together] == [12, 12, 12, 5]
    assert [c.finish_reason for c in together] == ["length"] * 4


def test_temperature_zero_is_deterministic_and_seeds_reproduce(loaded):
    model, processor = loaded
    img = image(90, 60)
    greedy = [generate(model, processor, img, "Hi", max_new_tokens=10) for _ in range(2)]
    assert greedy[0] == greedy[1] and greedy[0]
    # temperature 0 ignores the seed: it is greedy
    assert generate(model, processor, img, "Hi", max_new_tokens=10, seed=3) == greedy[0]
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.95)
    a = generate(model, processor, img, "Hi", seed=1, **kw)
    b = generate(model, processor, img, "Hi", seed=1, **kw)
    c = generate(model, processor, img, "Hi", seed=2, **kw)
    assert a == b
    assert a != c


def test_stop_strings_end_generation(loaded):
    model, processor = loaded
    engine = Engine(model, processor)
    req = requests(engine)[1]
    full = engine.generate([req])[0]
    # a stop string from the middle of the greedy output (spanning a token boundary when possible)
    mid = len(full.text) // 2
    stop = full.text[mid : mid + 3]
    assert stop.strip()
    params = SamplingParams(max_new_tokens=GREEDY.max_new_tokens, stop=("@@never@@", stop), ignore_eos=True)
    stopped = engine.generate([engine.prepare(build_conversation(CASES[1][0], 1), CASES[1][1], params)])[0]
    assert stopped.text == full.text[: full.text.find(stop)]
    assert stopped.finish_reason == "stop"
    assert len(stopped.token_ids) < len(full.token_ids)
    # streamed: the pieces join to the same cut text, and no piece shows part of the stop string
    events = list(engine.stream([engine.prepare(build_conversation(CASES[1][0], 1), CASES[1][1], params)]))
    assert "".join(e.text for e in events) == stopped.text
    assert events[-1].completion.text == stopped.text
    # through the public function
    text = generate(model, processor, CASES[1][1], CASES[1][0], max_new_tokens=16, stop=[stop])
    assert stop not in text and full.text.startswith(text)


def test_eos_ends_generation(loaded):
    model, processor = loaded
    reference = Engine(model, processor).generate(requests(Engine(model, processor))[:1])[0]
    eos = reference.token_ids[5]
    first = reference.token_ids.index(eos)
    engine = Engine(model, processor, eos_ids={eos})
    got = engine.generate(requests(engine, SamplingParams(max_new_tokens=16))[:1])[0]
    assert got.token_ids == reference.token_ids[:first]  # EOS itself is not part of the output
    assert got.finish_reason == "stop"
    # the checkpoint's own EOS: the ChatML end-of-turn token of the SmolLM2 template
    assert processor.tokenizer.convert_tokens_to_ids("<|im_end|>") in Engine(model, processor).eos_ids


def test_streaming_pieces_join_to_the_full_text(loaded):
    model, processor = loaded
    imgs = [image(60, 60), image(100, 40)]
    pieces = list(generate(model, processor, imgs, "Compare <image> with <image>.", max_new_tokens=20, stream=True))
    assert len(pieces) > 3
    assert "".join(pieces) == generate(model, processor, imgs, "Compare <image> with <image>.", max_new_tokens=20)


def test_engine_submit_from_threads(loaded):
    model, processor = loaded
    engine = Engine(model, processor, batch_wait_s=0.05)
    reqs = requests(engine)
    expected = [c.text for c in engine.generate(reqs)]
    handles = [None] * len(reqs)

    def client(i):
        handles[i] = engine.submit(reqs[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    streamed = "".join(e.text for e in handles[0])
    assert streamed == expected[0]
    assert [h.result().text for h in handles] == expected
    engine.close()


def test_bad_sampling_params_are_user_errors():
    with pytest.raises(stitch.errors.StitchError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(stitch.errors.StitchError, match="temperature"):
        SamplingParams(temperature=-1)
    assert SamplingParams(stop="x").stop == ("x",)


def test_shape_buckets():
    assert [_bucket_batch(b) for b in (1, 3, 5, 9, 16, 17, 64)] == [1, 4, 8, 16, 16, 32, 64]
    assert [_bucket_len(n) for n in (1, 256, 257, 400, 1300, 1500)] == [256, 256, 384, 512, 1536, 1536]


def test_cli_generate(ckpt, tmp_path, capsys):
    png = tmp_path / "img.png"
    image(80, 50).save(png)
    args = ["generate", str(ckpt), "--image", str(png), "--prompt", "What is it?", "--max-new-tokens", "6"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.strip()
    assert main([*args, "--stream", "--temperature", "0.7", "--seed", "1", "--top-k", "20"]) == 0
    assert capsys.readouterr().out.strip()
    # errors are one line on stderr and a non-zero exit
    assert main(["generate", str(ckpt), "--image", str(tmp_path / "missing.png"), "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert "missing.png" in err and len(err.strip().splitlines()) == 1
    assert main(["generate", str(tmp_path), "--prompt", "x"]) != 0
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "Example:" in capsys.readouterr().out


def test_greedy_equals_transformers_generate(loaded, ckpt, tmp_path):
    """The same weights exported to HF InternVL: `transformers`' greedy `generate` gives the same tokens."""
    import transformers

    from stitch.checkpoint.export import export_to_hf

    model, processor = loaded
    hf = transformers.InternVLForConditionalGeneration.from_pretrained(export_to_hf(ckpt, "internvl", tmp_path))
    engine = Engine(model, processor)
    for req in requests(engine, SamplingParams(max_new_tokens=12, ignore_eos=True))[:3:2]:  # 2 images; text only
        ids = req.input_ids[None]
        with torch.no_grad():
            images = {} if req.pixel_values is None else {"pixel_values": req.pixel_values}
            ref = hf.generate(input_ids=ids, **images, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                              pad_token_id=0)
        assert engine.generate([req])[0].token_ids == ref[0, ids.shape[1] :].tolist()


def test_compiled_decode_step_gives_the_eager_tokens(loaded):
    """`Engine(compile=True)` on a CPU: the torch.compile'd decode step (writing one per-layer cache tensor in
    place) generates what the eager step does, for a left-padded batch."""
    model, processor = loaded
    eager, compiled = Engine(model, processor), Engine(model, processor, compile=True)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    want = [c.token_ids for c in eager.generate(requests(eager, params))]
    assert [c.token_ids for c in compiled.generate(requests(compiled, params))] == want


@pytest.mark.parametrize("any_shape", [True, False])
def test_prefill_attention_kernels_are_the_engines_choice_and_restored(loaded, any_shape):
    """The engine's prefill runs with its own any-shape setting (each prompt batch is a new shape); the model's
    attention modules get their own setting back afterwards, so a model also being trained keeps its choice."""
    model, processor = loaded
    modules = [m for m in model.modules() if hasattr(m, "any_shape_kernels")]
    assert len(modules) == model.config.vision.num_layers + model.config.llm.num_layers
    seen: list[bool] = []
    hook = modules[0].register_forward_pre_hook(lambda m, args: seen.append(m.any_shape_kernels))
    try:
        engine = Engine(model, processor, any_shape_attention=any_shape)
        engine.generate(requests(engine, SamplingParams(max_new_tokens=3, ignore_eos=True))[:1])
    finally:
        hook.remove()
    assert seen and seen[0] is any_shape  # the ViT's first layer runs in the prefill only
    assert not any(m.any_shape_kernels for m in modules)


class _IdsOnly:
    """A processor for requests given as ids: the engine needs a pad id and a tokenizer to decode."""

    pad_token_id = 0

    class tokenizer:  # noqa: N801 - stands in for an attribute holding a tokenizer
        eos_token_id = None
        chat_template = None

        @staticmethod
        def decode(ids, skip_special_tokens: bool = True) -> str:
            return " ".join(map(str, ids))

        @staticmethod
        def get_vocab() -> dict:
            return {}


@pytest.mark.parametrize(("heads", "kv_heads"), [(7, 1), (14, 2)])
def test_greedy_equals_transformers_with_seven_query_heads_per_kv_head(tmp_path, heads, kv_heads):
    """The 8B shape's grouping (Qwen2.5-7B: 28 query heads over 4 K/V heads) at tiny width: a left-padded batch of
    two image prompts gives `transformers`' greedy tokens (prefill, then decode steps on the folded-GQA path)."""
    import json

    import transformers

    from stitch.checkpoint.hf import vlm_config_to_hf, vlm_state_to_hf
    from stitch.checkpoint.io import save_tensors
    from stitch.checkpoint.store import build_model, model_state
    from stitch.models.presets import vlm_preset

    cfg = vlm_preset("vlm-tiny")
    cfg.llm = type(cfg.llm)(**{**cfg.llm.model_dump(), "family": "qwen2", "attention_bias": True, "rope_theta": 1e6,
                               "hidden_size": 112, "num_heads": heads, "num_kv_heads": kv_heads, "head_dim": None})
    cfg.image_token_id = cfg.llm.vocab_size - 1
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert model.llm.layers[0].self_attn.k_proj.out_features == kv_heads * 112 // heads
    (tmp_path / "config.json").write_text(json.dumps(vlm_config_to_hf(cfg, "internvl")))
    save_tensors(vlm_state_to_hf(model_state(model), cfg, "internvl"), tmp_path)
    hf = transformers.InternVLForConditionalGeneration.from_pretrained(tmp_path).eval()
    gen = torch.Generator().manual_seed(1)
    image = torch.full((cfg.tokens_per_tile,), cfg.image_token_id)
    prompts = [torch.cat([torch.randint(10, 1000, (n,), generator=gen), image, torch.randint(10, 1000, (5,))])
               for n in (3, 9)]
    pixels = [torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen) for _ in prompts]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    got = Engine(model, _IdsOnly(), eos_ids=()).generate([Request(p, x, params) for p, x in zip(prompts, pixels)])
    for prompt, pix, completion in zip(prompts, pixels, got):
        with torch.no_grad():
            ref = hf.generate(input_ids=prompt[None], pixel_values=pix, max_new_tokens=10, min_new_tokens=10,
                              do_sample=False, pad_token_id=0)
        assert completion.token_ids == ref[0, prompt.numel():].tolist()
        assert len(set(completion.token_ids)) > 3  # not a degenerate repetition


def _join_at(calls: list, when: int, joiners: list):
    """An `admit` for `Engine._run_batch` that lets `joiners` in at its `when`-th call, where they fit."""

    def admit(free: int, cache_position: int, length: int):
        calls.append((free, cache_position, length))
        if len(calls) != when:
            return []
        fits = [(i, r) for i, r in joiners
                if r.input_ids.numel() <= cache_position and cache_position + r.params.max_new_tokens - 1 <= length]
        assert len(fits) == len(joiners) <= free
        return fits

    return admit


def test_requests_joining_a_running_batch_get_their_own_tokens(loaded):
    """Continuous batching: requests admitted mid-batch (into a spare row, and into the row of a request that has
    finished) produce what they produce alone, greedy and seeded sampling with repetition penalty alike, and the
    rows already running are unchanged."""
    model, processor = loaded
    engine = Engine(model, processor, max_batch_size=2, continuous_batching=True)
    first = engine.prepare(build_conversation(*CASES[0][:1], 2), CASES[0][1],
                           SamplingParams(max_new_tokens=24, ignore_eos=True))
    short = engine.prepare(build_conversation("Hi", 0), [], SamplingParams(max_new_tokens=3, ignore_eos=True))
    sampled = engine.prepare(build_conversation("?", 1), CASES[3][1], SamplingParams(
        max_new_tokens=8, temperature=0.9, top_k=30, repetition_penalty=1.3, seed=4, ignore_eos=True))
    greedy = engine.prepare(build_conversation("Describe it.", 1), CASES[1][1],
                            SamplingParams(max_new_tokens=6, ignore_eos=True))
    alone = {i: engine.generate([r])[0].token_ids for i, r in enumerate((first, short, sampled, greedy))}

    calls: list = []
    current = [_join_at(calls, 2, [(1, short)])]  # at step 2: into the spare row
    events = []
    for event in engine._run_batch([(0, first)], track_text=False, admit=lambda *a: current[0](*a)):
        events.append(event)
        if event.finished and event.index == 1:  # the short one is done: its row takes the sampled one
            current[0] = _join_at([], 2, [(2, sampled)])
    done = {e.index: e.completion.token_ids for e in events if e.finished}
    assert done == {0: alone[0], 1: alone[1], 2: alone[2]}
    assert calls[0][:2] == (1, first.input_ids.numel())  # one spare row; step 1 writes the slot after the prompt

    # A full batch asks for nobody until a row is free: here after the short request's last token.
    calls = []
    events = list(engine._run_batch([(0, greedy), (1, short)], track_text=False, admit=_join_at(calls, 99, [])))
    prompt_len = max(greedy.input_ids.numel(), short.input_ids.numel())
    assert calls and all(free == 1 for free, _, _ in calls) and calls[0][1] > prompt_len + 1
    assert {e.index: e.completion.token_ids for e in events if e.finished} == {0: alone[3], 1: alone[1]}


def test_admission_takes_what_fits_first_come_first_in(loaded):
    """A waiting request joins when its prompt fits before the batch's next cache slot and its new tokens after
    it, in arrival order up to the free rows; the others keep their place, in order."""
    from collections import deque

    model, processor = loaded
    engine = Engine(model, processor, continuous_batching=True)

    def req(prompt: int, new: int) -> Request:
        return Request(torch.ones(prompt, dtype=torch.long), None, SamplingParams(max_new_tokens=new))

    waiting = deque([(req(50, 10), "a"), (req(120, 10), "too long"), (req(40, 100), "outruns"), (req(30, 61), "b"),
                     (req(20, 5), "no row left")])
    handles = ["running"]
    joining = engine._admit(waiting, handles, free=2, cache_position=100, length=160)
    assert [(i, r.input_ids.numel()) for i, r in joining] == [(1, 50), (2, 30)]
    assert handles == ["running", "a", "b"]
    assert [h for _, h in waiting] == ["too long", "outruns", "no row left"]


def test_continuous_batching_server_path_answers_as_one_by_one(loaded):
    """`submit` with continuous batching: a request sent while a long one runs joins it (a row prefill, not a new
    batch) and both answer as they do alone."""
    model, processor = loaded
    engine = Engine(model, processor, max_batch_size=4, continuous_batching=True)
    long = engine.prepare(build_conversation(*CASES[0][:1], 2), CASES[0][1],
                          SamplingParams(max_new_tokens=40, ignore_eos=True))
    quick = engine.prepare(build_conversation("Hi", 0), [], SamplingParams(max_new_tokens=4, ignore_eos=True))
    want = [engine.generate([r])[0].token_ids for r in (long, quick)]
    joins = []
    prefill_row = engine._prefill_row
    engine._prefill_row = lambda *a: joins.append(a[1]) or prefill_row(*a)
    handle = engine.submit(long)
    events = iter(handle)
    next(events)  # the long request is running
    second = engine.submit(quick)
    assert second.result().token_ids == want[1]
    assert [t for e in events for t in e.token_ids][-1] == want[0][-1] and handle.result().token_ids == want[0]
    assert joins == [1]  # the quick request was prefilled into row 1 of the running batch
    engine.close()


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"top_k": 2.5}, "top_k"), ({"temperature": "0.5"}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"), ({"seed": 1.5}, "seed"), ({"seed": "abc"}, "seed"),
    ({"stop": 5}, "stop"), ({"stop": ["ok", 3]}, "stop"), ({"top_p": float("nan")}, "top_p"),
    ({"max_new_tokens": True}, "max_new_tokens"), ({"ignore_eos": "yes"}, "ignore_eos"),
])
def test_sampling_params_refuse_wrong_types_naming_the_field(kwargs, field):
    """A wrongly typed or non-finite value is refused when the parameters are made, so it cannot fail the other
    requests of a batch later (a float top_k used to fail the whole batch inside torch.topk)."""
    with pytest.raises(stitch.errors.StitchError, match=field):
        SamplingParams(**kwargs)


def test_tiny_temperatures_decode_greedily_and_top_k_minus_one_is_off(loaded):
    """Temperatures below 1e-5 are greedy (logits / T would overflow float32 into garbage); top_k -1 is off."""
    model, processor = loaded
    engine = Engine(model, processor)
    req = requests(engine, SamplingParams(max_new_tokens=6, ignore_eos=True))[1]
    greedy = engine.generate([req])[0].token_ids
    for params in (SamplingParams(max_new_tokens=6, temperature=1e-40, seed=1, ignore_eos=True),
                   SamplingParams(max_new_tokens=6, temperature=1e-6, top_k=-1, ignore_eos=True)):
        assert engine.generate([Request(req.input_ids, req.pixel_values, params)])[0].token_ids == greedy
    assert SamplingParams(top_k=-1).top_k == 0


def test_requests_longer_than_the_context_are_refused(loaded):
    model, processor = loaded
    engine = Engine(model, processor)
    context = model.config.llm.max_position_embeddings
    too_long = Request(torch.ones(context - 3, dtype=torch.long), None, SamplingParams(max_new_tokens=4))
    with pytest.raises(stitch.errors.StitchError, match=f"request 0: {context - 3} prompt tokens \\+ 4 new"):
        engine.generate([too_long])
    with pytest.raises(stitch.errors.StitchError, match="context"):
        engine.submit(too_long)


@pytest.mark.parametrize("device", ["bogus", "cuda:99" if torch.cuda.is_available() else "cuda"])
def test_bad_device_is_a_one_line_error(ckpt, capsys, device):
    assert main(["generate", str(ckpt), "--prompt", "hi", "--device", device]) != 0
    err = capsys.readouterr().err.strip()
    assert f"--device {device!r}" in err and len(err.splitlines()) == 1, err


def test_fit_context_gives_a_long_budget_what_the_context_leaves(loaded):
    """Benchmarks whose reference budget exceeds the context (MathVista's 16,384) still run: each row gets the
    positions its prompt leaves; without fit_context such a request is refused."""
    model, processor = loaded
    context = model.config.llm.max_position_embeddings
    engine = Engine(model, processor)

    def conv(k: int) -> list[dict]:
        return [{"role": "user", "content": "hi " * k}]

    # A prompt that leaves only a few positions (tokens grow linearly with the repeats), so decoding is short.
    base, step = (int(engine.prepare(conv(k)).input_ids.numel()) for k in (1, 2))
    per = step - base
    k = max(1, 1 + (context - 6 - base) // per)
    prompt = int(engine.prepare(conv(k)).input_ids.numel())
    assert 0 < context - prompt <= 6 + per
    with pytest.raises(stitch.errors.StitchError, match="context"):
        generate_batch(model, processor, [conv(k)], max_new_tokens=context)
    out = generate_batch(model, processor, [conv(k)], max_new_tokens=context, fit_context=True)
    assert len(out) == 1 and len(processor.tokenizer(out[0], add_special_tokens=False)["input_ids"]) <= \
        context - prompt + 2  # at most the room left (re-tokenising may merge or split a piece)
