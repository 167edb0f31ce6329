"""Vision encoders against transformers' own implementations (tiny random models, fp32), and their name maps.

Each HF model is saved with `save_pretrained` and read back from its safetensors file, so the tests see the
names a real checkpoint folder holds, not just the in-memory module names.
"""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from stitch.checkpoint.hf_vision import (
    find_vision_prefix,
    vision_config_from_hf,
    vision_config_to_hf,
    vision_select_to_hf,
    vision_state_from_hf,
    vision_state_to_hf,
)
from stitch.config import VisionConfig
from stitch.errors import CheckpointError
from stitch.models.vision import VISION_PRESETS, VisionEncoder, vision_param_count

TOL = dict(atol=1e-5, rtol=1e-5)
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2)

VISION = {
    "internvit": lambda **kw: transformers.InternVLVisionConfig(
        **TINY, image_size=56, patch_size=14, attention_bias=True, **kw),
    "internvit-postnorm": lambda **kw: transformers.InternVLVisionConfig(
        **TINY, image_size=56, patch_size=14, attention_bias=True, use_mean_pooling=False, **kw),
    "internvit6b": lambda **kw: transformers.InternVLVisionConfig(
        **TINY, image_size=56, patch_size=14, norm_type="rms_norm", use_qk_norm=True, attention_bias=False, **kw),
    "siglip": lambda **kw: transformers.SiglipVisionConfig(**TINY, image_size=64, patch_size=16, **kw),
    "clip": lambda **kw: transformers.CLIPVisionConfig(**TINY, image_size=56, patch_size=14, projection_dim=16, **kw),
}
VISION_MODEL = {
    "internvit": transformers.InternVLVisionModel,
    "internvit-postnorm": transformers.InternVLVisionModel,
    "internvit6b": transformers.InternVLVisionModel,
    "siglip": transformers.SiglipVisionModel,
    "clip": transformers.CLIPVisionModel,
}


def randomize(model: torch.nn.Module) -> None:
    """Perturb every parameter so that norms, biases, layer scales and positions all matter."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def pixels(cfg: VisionConfig, n: int = 2, size: int | None = None) -> torch.Tensor:
    torch.manual_seed(1)
    size = size or cfg.image_size
    return torch.randn(n, cfg.num_channels, size, size)


def save(model, tmp_path):
    model.save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text()), load_file(str(tmp_path / "model.safetensors"))


def load_ours(cfg: VisionConfig, state: dict) -> VisionEncoder:
    model = VisionEncoder(cfg).eval()
    model.load_state_dict(state, strict=True)
    return model


def assert_bit_identical(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------------------- standalone towers
@pytest.mark.parametrize("family", list(VISION))
def test_standalone_tower_matches_hf(tmp_path, family):
    """A standalone vision checkpoint: features are HF's last_hidden_state (class token dropped)."""
    hf = VISION_MODEL[family](VISION[family]()).eval()
    randomize(hf)
    hf_cfg, hf_state = save(hf, tmp_path)
    cfg = vision_config_from_hf(hf_cfg)
    assert cfg.num_layers == 3 and cfg.select_layer == -1
    prefix = find_vision_prefix(hf_state, cfg)
    state = vision_state_from_hf(hf_state, cfg, prefix)
    ours = load_ours(cfg, state)

    x = pixels(cfg)
    with torch.no_grad():
        want = hf(x).last_hidden_state
        got = ours(x)
    if cfg.has_cls_token:
        want = want[:, 1:]
    assert got.shape == (2, 16, 32)
    torch.testing.assert_close(got, want, **TOL)

    # Export is the exact inverse (SigLIP's unused pooling head aside).
    back = vision_state_to_hf(state, cfg, prefix)
    assert_bit_identical(back, {k: v for k, v in hf_state.items() if not k.startswith("head.")})


def test_hub_style_vision_model_nesting_is_found(tmp_path):
    """transformers-4 / Hub checkpoints nest CLIP and SigLIP under `vision_model.`; import finds it."""
    hf = transformers.CLIPVisionModel(VISION["clip"]()).eval()
    randomize(hf)
    hf_cfg, hf_state = save(hf, tmp_path)
    nested = {f"vision_tower.vision_model.{k}": v for k, v in hf_state.items()}
    cfg = vision_config_from_hf(hf_cfg)
    assert find_vision_prefix(nested, cfg) == "vision_tower.vision_model."
    state = vision_state_from_hf(nested, cfg, "vision_tower.")
    x = pixels(cfg)
    with torch.no_grad():
        torch.testing.assert_close(load_ours(cfg, state)(x), hf(x).last_hidden_state[:, 1:], **TOL)


# ----------------------------------------------------------------------------------------------- inside VLMs
def build_vlm(kind: str, family: str, **vlm_kw):
    torch.manual_seed(0)
    vision = VISION[family]()
    if kind == "internvl":
        config = transformers.InternVLConfig(vision_config=vision, text_config=transformers.Qwen2Config(**TEXT),
                                             **vlm_kw)
        model = transformers.InternVLForConditionalGeneration(config)
    else:
        config = transformers.LlavaConfig(vision_config=vision, text_config=transformers.LlamaConfig(**TEXT),
                                          **vlm_kw)
        model = transformers.LlavaForConditionalGeneration(config)
    model.eval()
    randomize(model.model.vision_tower)
    return model


def hf_vlm_features(model, kind: str, x: torch.Tensor) -> torch.Tensor:
    """HF's own selected image features: the VLM's get_image_features with the projector made the identity."""
    model.model.multi_modal_projector = torch.nn.Identity()
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=x).pooler_output
    return torch.stack(list(out)) if kind == "llava" else out


VLM_CASES = {
    # InternVL: vision_feature_layer -1 takes last_hidden_state (post-normed when the tower has a final norm).
    "internvl-last": ("internvl", "internvit", {}),
    "internvl-last-postnorm": ("internvl", "internvit-postnorm", {}),
    "internvl-penultimate-postnorm": ("internvl", "internvit-postnorm", dict(vision_feature_layer=-2)),
    "internvl-6b-last": ("internvl", "internvit6b", {}),
    "internvl-6b-layer1": ("internvl", "internvit6b", dict(vision_feature_layer=1)),
    # LLaVA: hidden_states[layer], never post-normed; "default" drops the class token.
    "llava-clip-penultimate": ("llava", "clip", {}),
    # hidden_states[-4] of 3 layers = the embeddings after CLIP's pre-norm: no layer runs. (HF itself fails
    # on vision_feature_layer=0, which its output_hidden_states=0 reads as "no hidden states".)
    "llava-clip-embeddings": ("llava", "clip", dict(vision_feature_layer=-4)),
    "llava-clip-full": ("llava", "clip", dict(vision_feature_select_strategy="full")),
    "llava-siglip-last-full": ("llava", "siglip", dict(vision_feature_layer=-1,
                                                       vision_feature_select_strategy="full")),
}


@pytest.mark.parametrize("case", list(VLM_CASES))
def test_vlm_feature_selection_matches_hf(tmp_path, case):
    kind, family, vlm_kw = VLM_CASES[case]
    model = build_vlm(kind, family, **vlm_kw)
    hf_cfg, hf_state = save(model, tmp_path)
    cfg = vision_config_from_hf(hf_cfg)
    prefix = find_vision_prefix(hf_state, cfg)
    assert prefix == "vision_tower."
    state = vision_state_from_hf(hf_state, cfg, prefix)
    ours = load_ours(cfg, state)

    x = pixels(cfg)
    with torch.no_grad():
        got = ours(x)
    want = hf_vlm_features(model, kind, x)
    if kind == "internvl":  # HF pixel-shuffles before the projector; do the same to ours
        n, t, c = got.shape
        side = int(t**0.5)
        got = model.model.pixel_shuffle(got.reshape(n, side, side, c), 0.5).reshape(n, -1, 4 * c)
    torch.testing.assert_close(got, want, **TOL)

    vision_keys = {k: v for k, v in hf_state.items() if k.startswith(prefix) and not k.startswith(prefix + "head.")}
    assert_bit_identical(vision_state_to_hf(state, cfg, prefix), vision_keys)
    # The selection exports back to the same VLM keys.
    select = vision_select_to_hf(cfg, kind)
    assert select == {k: hf_cfg[k] for k in ("vision_feature_layer", "vision_feature_select_strategy")}
    # stitch.checkpoint.hf's calling convention: the vision dict plus the VLM's selection keys.
    merged = {**hf_cfg["vision_config"], **select, "vlm": kind}
    assert vision_config_from_hf(merged) == cfg


def test_layers_after_the_selected_one_do_not_run():
    cfg = VISION_PRESETS["clip-tiny"]  # select_layer -2 of 2 layers: only layer 0 runs
    model = VisionEncoder(cfg).eval()
    calls = []
    model.layers[1].register_forward_hook(lambda *_: calls.append(1))
    x = pixels(cfg)
    with torch.no_grad():
        before = model(x)
    assert calls == [] and model.num_layers_used == 1
    new_cfg = model.trim_unused_layers()
    assert len(model.layers) == 1 and new_cfg.num_layers == 1 and new_cfg.select_layer == -1
    with torch.no_grad():
        assert torch.equal(model(x), before)


# ----------------------------------------------------------------------------------------------- OpenGVLab layout
def to_opengvlab_layout(hf_state: dict, num_layers: int) -> dict:
    """Re-implementation of OpenGVLab's InternVisionModel names (fused qkv) from HF-native tensors."""
    out = {
        "vision_model.embeddings.class_embedding": hf_state["embeddings.cls_token"],
        "vision_model.embeddings.position_embedding": hf_state["embeddings.position_embeddings"],
        "vision_model.embeddings.patch_embedding.weight": hf_state["embeddings.patch_embeddings.projection.weight"],
        "vision_model.embeddings.patch_embedding.bias": hf_state["embeddings.patch_embeddings.projection.bias"],
    }
    rename = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.projection_layer": "attn.proj",
              "attention.q_norm": "attn.q_norm", "attention.k_norm": "attn.k_norm", "mlp.fc1": "mlp.fc1",
              "mlp.fc2": "mlp.fc2"}
    for i in range(num_layers):
        src, dst = f"encoder.layer.{i}.", f"vision_model.encoder.layers.{i}."
        out[dst + "ls1"], out[dst + "ls2"] = hf_state[src + "lambda_1"], hf_state[src + "lambda_2"]
        for theirs, ours in rename.items():
            for suffix in ("weight", "bias"):
                if f"{src}{theirs}.{suffix}" in hf_state:
                    out[f"{dst}{ours}.{suffix}"] = hf_state[f"{src}{theirs}.{suffix}"]
        for suffix in ("weight", "bias"):
            parts = [hf_state.get(f"{src}attention.{p}_proj.{suffix}") for p in "qkv"]
            if parts[0] is not None:
                out[f"{dst}attn.qkv.{suffix}"] = torch.cat(parts, dim=0)
    return out


@pytest.mark.parametrize("family", ["internvit", "internvit6b"])
def test_opengvlab_fused_qkv_layout(tmp_path, family):
    hf = transformers.InternVLVisionModel(VISION[family]()).eval()
    randomize(hf)
    hv = hf.config
    _, hf_state = save(hf, tmp_path)
    remote = to_opengvlab_layout(hf_state, 3)
    chat_config = {
        "model_type": "internvl_chat", "architectures": ["InternVLChatModel"], "select_layer": -1,
        "vision_config": {
            "model_type": "intern_vit_6b", "architectures": ["InternVisionModel"], "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "image_size": 56,
            "patch_size": 14, "qkv_bias": hv.attention_bias, "qk_normalization": hv.use_qk_norm,
            "norm_type": hv.norm_type, "layer_norm_eps": 1e-6, "hidden_act": "gelu", "initializer_factor": 0.1,
        },
    }
    cfg = vision_config_from_hf(chat_config)
    assert find_vision_prefix(remote, cfg) == "vision_model."
    state = vision_state_from_hf(remote, cfg, "vision_model.", strict=True)
    x = pixels(cfg)
    with torch.no_grad():
        torch.testing.assert_close(load_ours(cfg, state)(x), hf(x).last_hidden_state[:, 1:], **TOL)
    assert_bit_identical(vision_state_to_hf(state, cfg, "vision_model.", layout="internvit_remote"), remote)
    # The same encoder exported HF-native gives back transformers' own tensors.
    assert_bit_identical(vision_state_to_hf(state, cfg), hf_state)
    assert vision_select_to_hf(cfg, "internvl_chat") == {"select_layer": -1}


# ----------------------------------------------------------------------------------------------- export to HF
def hf_model_from_export(cfg: VisionConfig):
    exported = vision_config_to_hf(cfg)
    kwargs = {k: v for k, v in exported.items() if k not in ("model_type", "architectures")}
    cls = {"internvl_vision": (transformers.InternVLVisionConfig, transformers.InternVLVisionModel),
           "siglip_vision_model": (transformers.SiglipVisionConfig, transformers.SiglipVisionModel),
           "clip_vision_model": (transformers.CLIPVisionConfig, transformers.CLIPVisionModel)}
    config_cls, model_cls = cls[exported["model_type"]]
    return model_cls(config_cls(**kwargs)).eval()


@pytest.mark.parametrize("preset", ["internvit-tiny", "internvit6b-tiny", "siglip-tiny", "clip-tiny"])
def test_presets_export_to_loadable_hf_models(preset):
    """A randomly initialised Stitch encoder exports to a transformers model that computes the same features."""
    cfg = VISION_PRESETS[preset]
    torch.manual_seed(0)
    ours = VisionEncoder(cfg).eval()
    hf = hf_model_from_export(cfg)
    hf.load_state_dict(vision_state_to_hf(ours.state_dict(), cfg), strict=True)
    x = pixels(cfg)
    with torch.no_grad():
        out = hf(x, output_hidden_states=True)
        got = ours(x)
    want = out.last_hidden_state if cfg.applies_post_norm else out.hidden_states[cfg.select_layer]
    if cfg.has_cls_token and cfg.drop_cls_token:
        want = want[:, 1:]
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("preset", [k for k, v in VISION_PRESETS.items() if v.patch_stem == "linear"])
def test_config_round_trip_through_hf(preset):
    cfg = VISION_PRESETS[preset]
    formats = ["internvl", "internvl_chat"] if cfg.kind == "internvit" else ["llava"]
    for fmt in formats:
        hf = {"model_type": fmt, "vision_config": vision_config_to_hf(cfg, fmt), **vision_select_to_hf(cfg, fmt)}
        assert vision_config_from_hf(hf) == cfg, fmt


def test_conv_stem_encoder_keeps_the_patch_grid_and_refuses_hf_export():
    """Early convolutions give the same token grid as a patch conv, train (gradients reach the first conv),
    save/load through Stitch's own names, and `export-hf` names the switch it cannot write."""
    cfg = VisionConfig(kind="internvit", image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                       num_layers=2, num_heads=4, patch_stem="conv")
    encoder = VisionEncoder(cfg)
    pixels = torch.randn(3, 3, 32, 32)
    features = encoder(pixels)
    assert features.shape == (3, cfg.num_patches, 32)
    features.sum().backward()
    assert encoder.embeddings.patch_embed.layers[0].weight.grad.abs().sum() > 0
    again = VisionEncoder(cfg)
    again.load_state_dict(encoder.state_dict())
    torch.testing.assert_close(again(pixels), features.detach())
    with pytest.raises(CheckpointError, match="patch_stem 'conv'"):
        vision_state_to_hf(encoder.state_dict(), cfg)
    with pytest.raises(ValueError, match="power-of-two"):
        VisionConfig(**{**cfg.model_dump(), "patch_size": 6})


def test_siglip_post_normed_features_export_as_internvl_last_hidden_state():
    cfg = VISION_PRESETS["siglip-tiny"].model_copy(update={"feature_post_norm": True})
    assert vision_select_to_hf(cfg, "internvl")["vision_feature_layer"] == -1
    with pytest.raises(CheckpointError, match="post-norm"):
        vision_select_to_hf(cfg, "llava")
    # Without the post-norm, InternVL must name the last layer by its positive index.
    plain = VISION_PRESETS["siglip-tiny"]
    assert vision_select_to_hf(plain, "internvl")["vision_feature_layer"] == plain.num_layers


# ----------------------------------------------------------------------------------------------- errors
def test_missing_tensor_and_shape_mismatch_name_the_tensor(tmp_path):
    hf = transformers.InternVLVisionModel(VISION["internvit6b"]()).eval()
    hf_cfg, hf_state = save(hf, tmp_path)
    cfg = vision_config_from_hf(hf_cfg)

    name = "encoder.layer.1.attention.k_norm.weight"
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        vision_state_from_hf({k: v for k, v in hf_state.items() if k != name}, cfg)

    name = "encoder.layer.2.mlp.fc1.weight"
    with pytest.raises(CheckpointError, match=rf"{name.replace('.', '[.]')}' has shape \(65, 32\)"):
        vision_state_from_hf({**hf_state, name: torch.zeros(65, 32)}, cfg)

    remote = to_opengvlab_layout(hf_state, 3)
    name = "vision_model.encoder.layers.0.attn.qkv.weight"
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        vision_state_from_hf({**remote, name: torch.zeros(95, 32)}, cfg, "vision_model.")
    with pytest.raises(CheckpointError, match="unexpected tensor 'vision_model.extra'"):
        vision_state_from_hf({**remote, "vision_model.extra": torch.zeros(1)}, cfg, "vision_model.", strict=True)

    state = vision_state_from_hf(hf_state, cfg)
    with pytest.raises(CheckpointError, match="layers.0.attn.q_proj.weight"):
        vision_state_to_hf({k: v for k, v in state.items() if k != "layers.0.attn.q_proj.weight"}, cfg)


def test_unknown_or_unsupported_configs_are_named():
    with pytest.raises(CheckpointError, match="model_type='dinov2'"):
        vision_config_from_hf({"model_type": "dinov2", "hidden_size": 32})
    with pytest.raises(CheckpointError, match="model_type='blip_2'"):
        vision_config_from_hf({"model_type": "blip_2", "vision_config": {"model_type": "blip_2_vision_model"}})
    siglip = VISION["siglip"]().to_dict()
    with pytest.raises(CheckpointError, match="no class token"):
        vision_config_from_hf({"model_type": "llava", "vision_config": siglip, "vision_feature_layer": -1})
    with pytest.raises(CheckpointError, match="several layers"):
        vision_config_from_hf({"model_type": "llava", "vision_config": siglip, "vision_feature_layer": [-2, -1],
                               "vision_feature_select_strategy": "full"})
    with pytest.raises(CheckpointError, match="select_layer"):
        vision_config_from_hf({"model_type": "llava", "vision_config": VISION["clip"]().to_dict(),
                               "vision_feature_layer": -9})
    with pytest.raises(CheckpointError, match="not expressible as SiglipVisionModel"):
        vision_config_to_hf(VISION_PRESETS["internvit-tiny"], "siglip")


# ----------------------------------------------------------------------------------------------- model features
def test_real_presets_build_on_meta_device():
    for name, cfg in VISION_PRESETS.items():
        with torch.device("meta"):
            model = VisionEncoder(cfg)
        assert next(model.parameters()).is_meta, name
    # InternViT-6B-448px-V1-5 (45 of InternViT-6B's 48 layers) has 5.54B parameters.
    assert 5.50e9 < vision_param_count(VISION_PRESETS["internvit-6b"]) < 5.58e9
    assert 3.00e8 < vision_param_count(VISION_PRESETS["internvit-300m"]) < 3.08e8
    assert VISION_PRESETS["internvit-6b"].num_output_tokens == 1024


def test_other_image_sizes_interpolate_positions_like_hf(tmp_path):
    hf = transformers.InternVLVisionModel(VISION["internvit"]()).eval()
    randomize(hf)
    hf_cfg, hf_state = save(hf, tmp_path)
    cfg = vision_config_from_hf(hf_cfg)
    ours = load_ours(cfg, vision_state_from_hf(hf_state, cfg))
    x = pixels(cfg, size=84)  # a 6x6 grid from 4x4 learned positions
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).last_hidden_state[:, 1:], **TOL)


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = VISION_PRESETS["internvit6b-tiny"]
    torch.manual_seed(0)
    model = VisionEncoder(cfg).train()
    x = pixels(cfg)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(x).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=0, rtol=0, msg=n)
