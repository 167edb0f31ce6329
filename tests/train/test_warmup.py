"""The encoder warm-up (stage 0): the encoder and projector learn their images' caption words against the LLM's
frozen embeddings; the LLM is never touched."""

import pytest
import torch

from stitch.errors import StitchError
from stitch.train.warmup import caption_targets, warm_up_encoder
from tests.parallel.common import build, tiny_config

COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0)}


def coloured_images(n: int, size: int) -> tuple[torch.Tensor, list[int]]:
    """n noisy solid images, each of one of three colours, and each image's colour index."""
    g = torch.Generator().manual_seed(0)
    which = torch.randint(0, 3, (n,), generator=g).tolist()
    base = torch.tensor([list(COLOURS.values())[c] for c in which])[:, :, None, None]
    return base.expand(n, 3, size, size) + 0.3 * torch.randn(n, 3, size, size, generator=g), which


def image_logits(model, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        tokens = model.image_embeddings(pixels)
        return tokens.view(len(pixels), -1, tokens.shape[-1]).mean(1) @ model.llm.embed_tokens.weight.T


def test_warm_up_teaches_the_caption_words_and_leaves_the_llm_alone():
    cfg = tiny_config()
    model = build(cfg)
    pixels, which = coloured_images(96, cfg.vision.image_size)
    word_ids = [20, 30, 40]  # each colour's "word" in the tiny vocabulary
    targets = torch.zeros(len(which), cfg.llm.vocab_size)
    targets[torch.arange(len(which)), torch.tensor([word_ids[c] for c in which])] = 1.0
    llm_before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    vision_before = {k: v.clone() for k, v in model.vision.state_dict().items()}

    def accuracy() -> float:
        picked = image_logits(model, pixels)[:, word_ids].argmax(-1)
        return float((picked == torch.tensor(which)).float().mean())

    start = accuracy()
    result = warm_up_encoder(model, pixels, targets, steps=60, batch_size=16, vision_lr=1e-3, projector_lr=3e-3)
    assert result.steps == 60 and len(result.losses) == 60
    assert sum(result.losses[-5:]) < sum(result.losses[:5]) / 2
    assert accuracy() == 1.0 > start
    assert all(torch.equal(v, model.llm.state_dict()[k]) for k, v in llm_before.items())
    assert any(not torch.equal(v, model.vision.state_dict()[k]) for k, v in vision_before.items())


def test_warm_up_stops_on_its_time_limit():
    cfg = tiny_config()
    model = build(cfg)
    pixels, which = coloured_images(8, cfg.vision.image_size)
    targets = torch.full((8, cfg.llm.vocab_size), 1.0 / cfg.llm.vocab_size)
    assert warm_up_encoder(model, pixels, targets, steps=10_000, batch_size=4, max_seconds=0.0).steps == 0


@pytest.mark.parametrize("pixels, targets, message", [
    (torch.zeros(4, 3, 56, 56), torch.zeros(3, 128), "same N"),
    (torch.zeros(4, 56, 56), torch.zeros(4, 128), r"\[N, 3, s, s\]"),
])
def test_warm_up_refuses_mismatched_inputs(pixels, targets, message):
    with pytest.raises(StitchError, match=message):
        warm_up_encoder(build(tiny_config()), pixels, targets, steps=1)


def test_caption_targets_spread_over_the_captions_tokens(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    smollm2_tokenizer = AutoTokenizer.from_pretrained(str(smol_tokenizer_dir))
    targets = caption_targets(smollm2_tokenizer, ["red circle", "blue"], vocab_size=len(smollm2_tokenizer))
    red_circle = smollm2_tokenizer("red circle", add_special_tokens=False)["input_ids"]
    assert targets[0].nonzero().flatten().tolist() == sorted(set(red_circle))
    assert torch.allclose(targets.sum(-1), torch.ones(2))
    with pytest.raises(StitchError, match="caption 0 .* has no tokens"):
        caption_targets(smollm2_tokenizer, [""], vocab_size=len(smollm2_tokenizer))
