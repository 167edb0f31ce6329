"""Whole VLMs against transformers: InternVL and LLaVA import, export, round trip, bad input."""

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from stitch.checkpoint.export import export_to_hf
from stitch.checkpoint.hf import vlm_config_to_hf, vlm_state_to_hf
from stitch.checkpoint.io import TensorSource, save_tensors
from stitch.checkpoint.store import load_model, model_state
from stitch.errors import CheckpointError

VOCAB, IMAGE_TOKEN = 128, 127
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)


def internvl_config(qk_norm: bool = False):
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=56,
                  patch_size=14, layer_scale_init_value=0.5)
    if qk_norm:
        vision.update(use_qk_norm=True, norm_type="rms_norm", attention_bias=False)
    return transformers.InternVLConfig(
        vision_config=vision, text_config={"model_type": "qwen2", **TEXT}, image_token_id=IMAGE_TOKEN,
        image_seq_length=4, downsample_ratio=0.5, vision_feature_layer=-1,
    )


def llava_config(tower: str):
    if tower == "clip":
        vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32)
        layer = -2
    else:
        vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=2, image_size=56, patch_size=14)
        layer = -1
    return transformers.LlavaConfig(
        vision_config=vision, text_config={"model_type": "llama", **TEXT}, image_token_id=IMAGE_TOKEN,
        vision_feature_layer=layer, vision_feature_select_strategy="default" if tower == "clip" else "full",
        image_seq_length=16,
    )


CASES = {
    "internvl": (internvl_config, transformers.InternVLForConditionalGeneration, {}),
    "internvl-6b-style": (internvl_config, transformers.InternVLForConditionalGeneration, {"qk_norm": True}),
    "llava-clip": (llava_config, transformers.LlavaForConditionalGeneration, {"tower": "clip"}),
    "llava-siglip": (llava_config, transformers.LlavaForConditionalGeneration, {"tower": "siglip"}),
}


def make_hf(name, path):
    make_cfg, cls, kw = CASES[name]
    torch.manual_seed(0)
    model = cls(make_cfg(**kw)).eval()
    with torch.no_grad():  # non-trivial norms/biases so every tensor matters
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n or "lambda" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model


def inputs_for(model_cfg, n_images=(2, 1)):
    """Two rows with different image counts; image tokens exactly where HF expects them."""
    tokens = model_cfg.tokens_per_tile
    rows, tiles = [], 0
    for k in n_images:
        row = [5, 6]
        for _ in range(k):
            row += [IMAGE_TOKEN] * tokens + [7, 8]
            tiles += 1
        rows.append(row)
    length = max(len(r) for r in rows)
    rows = [r + [9] * (length - len(r)) for r in rows]
    torch.manual_seed(1)
    return torch.tensor(rows), torch.randn(tiles, 3, 56, 56)


@pytest.mark.parametrize("name", list(CASES))
def test_vlm_import_matches_transformers_and_exports_back(tmp_path, name):
    hf = make_hf(name, tmp_path / "hf")
    ours = load_model(tmp_path / "hf").eval()
    ids, pixels = inputs_for(ours.config)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels).logits
        got = ours(ids, pixel_values=pixels).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)

    # Round trip: Stitch -> HF names gives back the very tensors of the original file, bit for bit.
    original = TensorSource(tmp_path / "hf")
    exported = vlm_state_to_hf(model_state(ours), ours.config, ours.config.source_format)
    # SigLIP's attention-pooling head is unused by VLMs and not imported; everything else comes back.
    assert set(exported) == {k for k in original if ".head." not in k}
    for key, tensor in exported.items():
        assert torch.equal(tensor, original[key]), key

    # Export through the config too: transformers loads it and gives the same logits.
    out = tmp_path / "export"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(vlm_config_to_hf(ours.config, ours.config.source_format)))
    save_tensors(exported, out)
    reloaded = type(hf).from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, pixel_values=pixels).logits, ref, atol=1e-5, rtol=1e-5)


def test_missing_tensor_and_shape_mismatch_name_the_tensor(tmp_path):
    make_hf("internvl", tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    state = load_file(f)
    victim = "language_model.model.layers.1.mlp.up_proj.weight"
    bad = {k: v for k, v in state.items() if k != victim}
    save_file(bad, f)
    with pytest.raises(CheckpointError, match=r"hf: missing tensor 'language_model.model.layers.1.mlp.up_proj"):
        load_model(tmp_path / "hf")
    bad[victim] = torch.zeros(3, 3)
    save_file(bad, f)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor '.*up_proj.weight' has shape \(3, 3\)"):
        load_model(tmp_path / "hf")


def test_not_a_checkpoint_and_unknown_architecture(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip", "architectures": ["Blip2Model"]}))
    with pytest.raises(CheckpointError, match="unknown VLM architecture"):
        load_model(tmp_path)


def test_export_cli_writes_loadable_internvl(tmp_path):
    make_hf("internvl", tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    # a Stitch checkpoint (no tokenizer needed for this check): config + weights
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    ours.config.save(ckpt / "config.json")
    save_tensors(model_state(ours), ckpt)
    with pytest.raises(CheckpointError, match="tokenizer"):
        export_to_hf(ckpt, "internvl", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing left behind on failure


def test_imported_internvl_gives_transformers_logits_on_a_video(tmp_path):
    """A video as transformers' InternVL takes it (each frame one tile, `Frame{i}: <img>...</img>` runs of image
    tokens) through `stitch import-hf`: the same logits, fp32, within 1e-4."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from stitch.checkpoint.store import load_model as load_stitch
    from stitch.cli import main
    from stitch.data.image import ImageProcessor, tile_image
    from stitch.data.video import load_video
    from tests.data.video_clips import encode, moving_square

    hf = make_hf("internvl", tmp_path / "hf")
    vocab = {f"t{i}": i for i in range(VOCAB - 1)} | {"<IMG_CONTEXT>": IMAGE_TOKEN}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    ours = load_stitch(tmp_path / "ckpt").eval()

    clip = tmp_path / "clip.mp4"
    encode(moving_square(24, size=64), clip, fps=8)
    video = load_video(clip, num_frames=5, rule="internvl")
    pixels = ImageProcessor(image_size=56).normalize(
        np.concatenate([tile_image(f, (1, 1), 56, False) for f in video.frames]))  # [5, 3, 56, 56]
    # "Frame1: <img><IMG_CONTEXT>x4</img>\n..." with stand-in ids for the text around the image tokens
    ids = [3, 4]
    for i in range(len(video)):
        ids += [10 + i, 11, 12] + [IMAGE_TOKEN] * ours.config.tokens_per_tile + [13, 14]
    ids = torch.tensor([ids + [20, 21, 22]])
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels).logits
        got = ours(ids, pixel_values=pixels).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
