"""Frozen linear weights cast once under CPU autocast: the same step as autocast's per-use cast, saved as loaded."""

import torch

from stitch.checkpoint.store import build_model
from stitch.models.presets import vlm_preset
from stitch.train.frozen import FrozenLinearWeights


def _model():
    cfg = vlm_preset("vlm-tiny")
    cfg.llm.vocab_size = 256
    cfg.image_token_id = 255
    torch.manual_seed(0)
    model = build_model(cfg)
    for p in model.llm.parameters():  # stage 1: the LLM frozen, encoder and projector train
        p.requires_grad_(False)
    return model


def _loss_and_grads(model):
    torch.manual_seed(1)
    tokens = model.config.tokens_per_tile
    ids = torch.randint(0, 200, (2, 12))
    ids[:, 1 : 1 + tokens] = model.config.image_token_id
    pixels = torch.randn(2, 3, model.config.vision.image_size, model.config.vision.image_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, pixel_values=pixels, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_cast_once_gives_autocasts_step_and_saves_the_loaded_weights():
    plain, cast = _model(), _model()
    loaded = {k: v.clone() for k, v in cast.state_dict().items()}
    frozen = FrozenLinearWeights(cast, torch.bfloat16)
    assert frozen.params, "the frozen LLM's linear layers are cast"
    assert cast.llm.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert cast.vision.layers[0].mlp.fc1.weight.dtype == torch.float32  # trains: autocast caches it itself
    loss_a, grads_a = _loss_and_grads(plain)
    loss_b, grads_b = _loss_and_grads(cast)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    with frozen.original():
        state = cast.state_dict()
        assert all(torch.equal(state[k], loaded[k]) and state[k].dtype == loaded[k].dtype for k in loaded)
    frozen.restore()
    assert all(p.dtype == torch.float32 for p in cast.parameters())
