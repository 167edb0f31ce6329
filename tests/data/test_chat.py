"""Chat templates: ids equal `apply_chat_template`'s and labels cover exactly assistant content + end of turn."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from stitch.data.chat import IGNORE_INDEX, add_image_token, image_token_text, validate_conversation
from stitch.data.processor import Processor
from stitch.data.skips import SampleError
from stitch.errors import StitchConfigError

from .conftest import make_image, tiny_config

QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN25 = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
LLAMA2 = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}{% elif message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'] | trim + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

CONVS = [
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Crimson, obviously."}],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "How many legs has a spider?"},
        {"role": "assistant", "content": "Eight."},
        {"role": "user", "content": "And an ant?"},
        {"role": "assistant", "content": "Six legs, arranged in three pairs.\nAll on the thorax."},
    ],
    # the answer also occurs in the question and in a role header: must still be located at the right place
    [{"role": "user", "content": "Say assistant or user: user"}, {"role": "assistant", "content": "user"}],
]


def with_template(tok, template, extra_specials=()):
    from tokenizers import AddedToken

    if extra_specials:
        tok.add_tokens([AddedToken(s, special=True, normalized=False) for s in extra_specials], special_tokens=True)
    tok.chat_template = template
    return tok


def template_ids(tok, conv, add_generation_prompt=False):
    out = tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def labelled_runs(labels):
    """Contiguous runs of labelled positions."""
    runs, cur = [], []
    for i, v in enumerate(labels.tolist()):
        if v != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def check_labels(tok, batch, conv, eot):
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert labels.shape == ids.shape
    sel = labels != IGNORE_INDEX
    assert torch.equal(labels[sel], ids[sel])
    answers = [m["content"] for m in conv if m["role"] == "assistant"]
    runs = labelled_runs(labels)
    assert len(runs) == len(answers)
    for run, answer in zip(runs, answers):
        text = tok.decode(ids[run].tolist(), skip_special_tokens=False)
        assert text.endswith(eot), text
        assert text[: -len(eot)].strip() == answer.strip(), text
    return runs


@pytest.mark.parametrize("name,template,specials,eot", [
    ("smollm2", None, (), "<|im_end|>"),
    ("qwen2", QWEN2, (), "<|im_end|>"),
    ("qwen2.5", QWEN25, (), "<|im_end|>"),
    ("llama2", LLAMA2, (), "<|im_end|>"),  # SmolLM2's eos stands in for </s>
    ("llama3", LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|eot_id|>"),
])
def test_text_ids_equal_template_and_labels_exact(smol_tok, config, name, template, specials, eot):
    tok = with_template(smol_tok, template or smol_tok.chat_template, specials)
    proc = Processor(tok, config)
    for conv in CONVS:
        batch = proc(conv)
        assert batch["input_ids"][0].tolist() == template_ids(tok, conv), name
        runs = check_labels(tok, batch, conv, eot)
        if name in ("smollm2", "qwen2", "qwen2.5"):
            # ChatML: exactly the content's own tokens plus <|im_end|>
            answers = [m["content"] for m in conv if m["role"] == "assistant"]
            for run, answer in zip(runs, answers):
                assert len(run) == len(tok(answer, add_special_tokens=False)["input_ids"]) + 1
        assert batch["pixel_values"] is None and batch["num_tiles"] == []
        assert batch["num_label_tokens"].item() == sum(len(r) for r in runs)


def test_generation_prompt_matches_template(processor, smol_tok):
    conv = [{"role": "user", "content": "Hello there"}]
    batch = processor(conv, add_generation_prompt=True)
    assert batch["input_ids"][0].tolist() == template_ids(smol_tok, conv, add_generation_prompt=True)
    assert "labels" not in batch
    assert processor.decode(batch["input_ids"][0], skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    with pytest.raises(SampleError, match="bad_roles"):
        processor(CONVS[0], add_generation_prompt=True)  # ends with the assistant


@pytest.mark.parametrize("tags,wrapper", [("nvlm", "nvlm"), ("none", "internvl"), ("nvlm", "none")])
def test_image_expansion(tmp_path, smol_tok, tags, wrapper):
    cfg = tiny_config(tile_tags=tags, image_wrapper=wrapper, max_tiles=6)
    proc = Processor(smol_tok, cfg)
    wide = make_image(tmp_path / "wide.png", size=(180, 60))  # 3x1 grid + thumbnail = 4 tiles
    small = Image.new("RGB", (30, 30), (9, 9, 9))  # 1 tile, no thumbnail
    conv = [
        {"role": "user", "content": "<image>\nCompare with <image> please."},
        {"role": "assistant", "content": "The first is wider."},
    ]
    batch = proc(conv, [wide, small])
    tpt = cfg.tokens_per_tile
    assert batch["num_tiles"] == [4, 1]
    assert batch["pixel_values"].shape == (5, 3, 56, 56)
    ids = batch["input_ids"][0]
    assert int((ids == proc.image_token_id).sum()) == 5 * tpt
    # the same text with every image written out in full goes through the template to the same ids
    full = [dict(m) for m in conv]
    parts = full[0]["content"].split("<image>")
    full[0]["content"] = (parts[0] + image_token_text(3, True, cfg, per_tile=tpt) + parts[1]
                          + image_token_text(1, False, cfg, per_tile=tpt) + parts[2])
    assert ids.tolist() == template_ids(smol_tok, full)
    text = proc.decode(ids, skip_special_tokens=False)
    if tags == "nvlm":
        assert text.index("<tile_1>") < text.index("<tile_2>") < text.index("<tile_3>") < text.index(
            "<tile_global_thumbnail>")
        assert text.count("<tile_1>") == 2 and "<tile_4>" not in text
    else:
        assert "<tile_" not in text
    if wrapper == "nvlm":
        assert text.count("<Image>") == 2 and text.count("</Image>") == 2
    elif wrapper == "internvl":
        assert text.count("<img>") == 2 and text.count("</img>") == 2
    # image tokens are never labelled; labels are just the answer
    check_labels(smol_tok, batch, conv, "<|im_end|>")


def test_image_in_assistant_turn_is_not_labelled(processor, smol_tok, tmp_path):
    img = make_image(tmp_path / "a.png", size=(60, 60))
    conv = [{"role": "user", "content": "Show me."}, {"role": "assistant", "content": "Here: <image> done"}]
    batch = processor(conv, [img])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    text = smol_tok.decode(ids[labels != IGNORE_INDEX].tolist(), skip_special_tokens=False)
    assert "IMG_CONTEXT" not in text and "Image>" not in text and "tile" not in text
    assert text.replace(" ", "") == "Here:done<|im_end|>"


def test_images_without_placeholder_go_first(processor, tmp_path):
    img = make_image(tmp_path / "a.png", size=(60, 60))
    batch = processor([{"role": "user", "content": "What is it?"}], [img], add_generation_prompt=True)
    text = processor.decode(batch["input_ids"][0], skip_special_tokens=False)
    assert text.index("<Image>") < text.index("What is it?")


def test_tile_step_down_then_truncation(processor, tmp_path):
    big = make_image(tmp_path / "big.png", size=(400, 140))
    conv = [{"role": "user", "content": "<image>\nDescribe."}, {"role": "assistant", "content": "A gradient."}]
    full = processor(conv, [big])
    assert full["num_tiles"] == [4]  # 3x1 + thumbnail at max_tiles 6
    n = full["input_ids"].shape[1]
    smaller = processor(conv, [big], max_length=n - 1)
    assert smaller["num_tiles"][0] < 4 and smaller["input_ids"].shape[1] <= n - 1
    assert smaller["pixel_values"].shape[0] == smaller["num_tiles"][0]
    one = processor(conv, [big], max_length=n - 3 * 8)
    assert one["num_tiles"] == [1]
    # too short even for one tile: the image is dropped, never cut; no assistant token left -> an error
    with pytest.raises(SampleError) as e:
        processor(conv, [big], max_length=30)
    assert e.value.reason == "fully_masked"
    # long text answer cut by max_length keeps a partial answer
    long = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": " ".join(["one"] * 50)}]
    cut = processor(long, max_length=40)
    assert cut["input_ids"].shape[1] == 40 and cut["num_label_tokens"].item() > 0


def test_template_mismatch_fails_loudly(smol_tok, config):
    drop_assistant = (
        "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ '<|im_start|>' + m['role'] + '\n' + "
        "m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    )
    proc = Processor(with_template(smol_tok, drop_assistant), config)
    with pytest.raises(SampleError) as e:
        proc(CONVS[0])
    assert e.value.reason == "template_mismatch"
    no_eot = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    proc = Processor(with_template(smol_tok, no_eot), config)
    with pytest.raises(SampleError, match="end-of-turn"):
        proc(CONVS[0])


@pytest.mark.parametrize("conv,reason", [
    ([], "empty_conversation"),
    ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}], "empty_conversation"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "bad_roles"),
    ([{"role": "assistant", "content": "a"}], "bad_roles"),
    ([{"role": "robot", "content": "a"}], "bad_roles"),
    ([{"role": "user", "content": "a"}], "no_assistant_turn"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
     "bad_roles"),
    ([{"role": "user", "content": 3}], "malformed_record"),
])
def test_conversation_validation(conv, reason):
    with pytest.raises(SampleError) as e:
        validate_conversation(conv, for_generation=False)
    assert e.value.reason == reason


def test_placeholder_count_mismatch(processor, tmp_path):
    img = make_image(tmp_path / "a.png")
    conv = [{"role": "user", "content": "<image> and <image>"}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(SampleError) as e:
        processor(conv, [img])
    assert e.value.reason == "image_count_mismatch"
    literal = [{"role": "user", "content": "<IMG_CONTEXT> sneaky"}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(SampleError) as e:
        processor(literal)
    assert e.value.reason == "image_count_mismatch"


def test_add_image_token_and_round_trip(smol_tok, config, tmp_path):
    n = len(smol_tok)
    tid = add_image_token(smol_tok, config)
    assert tid == n and add_image_token(smol_tok, config) == tid and len(smol_tok) == n + 1
    proc = Processor(smol_tok, config.model_copy(update={"image_token_id": tid}))
    proc.save_pretrained(tmp_path / "ckpt")
    again = Processor.from_pretrained(tmp_path / "ckpt")
    assert again.image_token_id == tid
    img = make_image(tmp_path / "a.png")
    conv = [{"role": "user", "content": "<image>\nHi"}, {"role": "assistant", "content": "Hello"}]
    a, b = proc(conv, [img]), again(conv, [img])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"])
    with pytest.raises(StitchConfigError, match="image_token_id"):
        Processor(smol_tok, config.model_copy(update={"image_token_id": 5}))


def test_template_without_prefix_property_falls_back_to_ordered_search(smol_tok, config):
    """A template whose earlier text depends on later turns (here: a turn count in the header) breaks the
    render-the-prefix rule; assistant content is then searched in order after the turns before it."""
    counting = (
        "{{ '<|im_start|>system\nTurns: ' + (messages|length)|string + '<|im_end|>\n' }}"
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tok = with_template(smol_tok, counting)
    proc = Processor(tok, config)
    for conv in CONVS:
        batch = proc(conv)
        assert batch["input_ids"][0].tolist() == template_ids(tok, conv)
        check_labels(tok, batch, conv, "<|im_end|>")


def test_plain_format_is_bos_images_then_answer_and_eos(processor, tmp_path):
    """LLaVA's plain pretraining format: BOS (EOS for tokenizers without one), image tokens, the caption and
    EOS; only caption + EOS carry labels, and no image token sits at position 0 (the LLM's attention sink).
    The chat template of the shared tokenizer is left untouched."""
    template = processor.tokenizer.chat_template
    plain = processor.with_options(chat_format="plain", system_prompt="Be brief.")
    image = make_image(tmp_path / "a.png", size=(56, 56))
    conv = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "A red box."}]
    sample = plain.encode(conv, [image])
    tok = processor.tokenizer
    caption = tok("A red box.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n_img = processor.config.tokens_per_tile
    wrapper_len = len(sample.input_ids) - n_img - len(caption)
    assert sample.input_ids[-len(caption):].tolist() == caption
    assert int((sample.input_ids == processor.image_token_id).sum()) == n_img
    assert sample.labels[-len(caption):].tolist() == caption
    assert (sample.labels[: wrapper_len + n_img] == IGNORE_INDEX).all()
    lead = tok.bos_token_id if tok.bos_token is not None else tok.eos_token_id
    assert sample.input_ids[0].item() == lead != processor.image_token_id
    assert "Be brief" not in tok.decode(sample.input_ids) and "system" not in tok.decode(sample.input_ids)
    assert processor.tokenizer.chat_template == template
    with pytest.raises(StitchConfigError, match="chat_format"):
        processor.with_options(chat_format="fancy")


def test_role_order_errors_count_messages_as_given():
    """The index in the message is the position in the list the caller sent (a system message counts)."""
    conv = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(SampleError, match="message 2 is 'user', expected 'assistant'"):
        validate_conversation(conv, for_generation=False)
