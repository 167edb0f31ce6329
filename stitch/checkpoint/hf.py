"""HF <-> Stitch: configs and weights of Llama-family LLMs and of whole InternVL / LLaVA VLMs.

Formats (transformers >= 5 layouts):
- LLM folders: `LlamaForCausalLM`, `Qwen2ForCausalLM`, `MistralForCausalLM` (Yi and SmolLM2 are Llama).
- `InternVLForConditionalGeneration`: `model.vision_tower.*`, `model.multi_modal_projector.*`,
  `model.language_model.*`, `lm_head.weight`.
- `LlavaForConditionalGeneration`: the same prefixes with a CLIP/SigLIP tower.
Vision tables live in `hf_vision.py`; LLM and projector tables in `names.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from stitch.checkpoint.hf_vision import (
    default_vision_layout,
    find_vision_prefix,
    vision_config_from_hf,
    vision_config_to_hf,
    vision_select_to_hf,
    vision_state_from_hf,
    vision_state_to_hf,
)
from stitch.checkpoint.io import TensorSource, read_json
from stitch.checkpoint.names import PROJECTOR_TABLES, convert, expand, llm_pairs
from stitch.config import LLMConfig, ProjectorConfig, VLMConfig
from stitch.errors import CheckpointError
from stitch.models.llm import LLM

LLM_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}
_HF_CONFIG_CLASS = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}
_HF_LM_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
# Tensors some HF files carry that hold no weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------------------------- configs
def llm_config_from_hf(hf: dict[str, Any], source: str = "config.json") -> LLMConfig:
    model_type = hf.get("model_type")
    if model_type not in _HF_CONFIG_CLASS:
        archs = hf.get("architectures") or []
        known = ", ".join(_HF_CONFIG_CLASS)
        raise CheckpointError(
            f"{source}: unknown LLM architecture model_type={model_type!r} {archs} (supported: {known})"
        )
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    try:
        return LLMConfig(
            family=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            attention_bias=True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: missing field {e.args[0]!r}") from e


def llm_config_to_hf(cfg: LLMConfig) -> dict[str, Any]:
    import transformers

    if cfg.family == "qwen2" and not cfg.attention_bias:
        raise CheckpointError("a Qwen2-family LLM without QKV bias has no HF equivalent; use family 'llama'")
    if cfg.family != "qwen2" and cfg.attention_bias and cfg.family != "llama":
        raise CheckpointError(f"family {cfg.family} has no QKV-bias option in HF")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
        rope.setdefault("rope_type", rope.pop("type", "default"))
    kwargs = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=rope,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    )
    if cfg.family == "llama":
        kwargs["attention_bias"] = cfg.attention_bias
    if cfg.family == "mistral":
        kwargs["sliding_window"] = None
    if cfg.family == "qwen2":
        kwargs["use_sliding_window"] = False
    hf = getattr(transformers, _HF_CONFIG_CLASS[cfg.family])(**kwargs).to_dict()
    hf["architectures"] = [_HF_LM_CLASS[cfg.family]]
    return hf


# ----------------------------------------------------------------------------------------------- LLM weights
def _check_extras(source: TensorSource, used: set[str], path: Path) -> None:
    extra = [n for n in source if n not in used and not n.endswith(_IGNORED_SUFFIXES)]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"{source.file_of(extra[0])}: unexpected tensor '{extra[0]}'{more}")


def expected_llm_shapes(cfg: LLMConfig, stitch_prefix: str = "") -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = LLM(cfg)
    return {stitch_prefix + k: tuple(v.shape) for k, v in model.state_dict().items()}


def llm_state_from_hf(source, cfg: LLMConfig, hf_prefix: str, head: str, where, stitch_prefix: str = ""):
    pairs = llm_pairs(cfg.num_layers, cfg.attention_bias, cfg.tie_word_embeddings, stitch_prefix, hf_prefix, head)
    shapes = expected_llm_shapes(cfg, stitch_prefix)
    return convert(source, pairs, "to_stitch", shapes, where=where), {theirs for _, theirs in pairs}


def llm_state_to_hf(state, cfg: LLMConfig, hf_prefix: str, head: str, stitch_prefix: str = ""):
    pairs = llm_pairs(cfg.num_layers, cfg.attention_bias, cfg.tie_word_embeddings, stitch_prefix, hf_prefix, head)
    return convert(state, pairs, "to_hf")


def load_hf_llm(path: str | Path) -> tuple[LLMConfig, dict[str, torch.Tensor]]:
    """An HF causal-LM folder -> (LLMConfig, Stitch-named LLM state dict)."""
    path = Path(path)
    hf = read_json(path / "config.json")
    cfg = llm_config_from_hf(hf, str(path / "config.json"))
    source = TensorSource(path)
    state, used = llm_state_from_hf(source, cfg, "model.", "lm_head.weight", source.origin)
    if cfg.tie_word_embeddings and "lm_head.weight" in source:
        used.add("lm_head.weight")
    _check_extras(source, used, path)
    return cfg, state


# ----------------------------------------------------------------------------------------------- whole VLMs
VLM_ARCHITECTURES = ("InternVLForConditionalGeneration", "LlavaForConditionalGeneration")


def vlm_config_from_hf(hf: dict[str, Any], source: str) -> VLMConfig:
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    text, vision = hf.get("text_config"), hf.get("vision_config")
    if model_type not in ("internvl", "llava") or text is None or vision is None:
        raise CheckpointError(
            f"{source}: unknown VLM architecture model_type={model_type!r} {archs} "
            f"(supported: {', '.join(VLM_ARCHITECTURES)})"
        )
    llm = llm_config_from_hf(text, f"{source}: text_config")
    layer = hf.get("vision_feature_layer", -1)
    if isinstance(layer, list):
        raise CheckpointError(f"{source}: several vision_feature_layer values are not supported")
    strategy = hf.get("vision_feature_select_strategy", "default")
    vis = vision_config_from_hf(
        {**vision, "vision_feature_layer": layer, "vision_feature_select_strategy": strategy, "vlm": model_type}
    )
    if "tie_word_embeddings" in hf:  # the composite model's own setting decides whether its head is tied
        llm.tie_word_embeddings = bool(hf["tie_word_embeddings"])
    if model_type == "internvl":
        projector = ProjectorConfig(kind="mlp", downsample_ratio=hf.get("downsample_ratio", 0.5))
        extra = dict(tile_tags="none", image_wrapper="internvl", source_format="internvl", max_tiles=12)
    else:
        if hf.get("projector_hidden_act", "gelu") != "gelu" or not hf.get("multimodal_projector_bias", True):
            raise CheckpointError(f"{source}: only LLaVA's GELU projector with biases is supported")
        projector = ProjectorConfig(kind="mlp2x_gelu")
        extra = dict(tile_tags="none", image_wrapper="none", source_format="llava", max_tiles=1,
                     use_thumbnail=False)
    return VLMConfig(
        vision=vis, llm=llm, projector=projector,
        image_token_id=hf.get("image_token_id", hf.get("image_token_index", 0)),
        **extra,
    )


def vlm_config_to_hf(cfg: VLMConfig, fmt: str) -> dict[str, Any]:
    import transformers

    if fmt not in ("internvl", "llava"):
        raise CheckpointError(f"unknown export format '{fmt}' (internvl, llava)")
    text = llm_config_to_hf(cfg.llm)
    vision = vision_config_to_hf(cfg.vision, fmt)
    select = vision_select_to_hf(cfg.vision, fmt)
    if fmt == "internvl":
        if cfg.projector.kind != "mlp":
            raise CheckpointError(f"InternVL export needs the pixel-shuffle 'mlp' projector, not {cfg.projector.kind}")
        if cfg.projector.downsample != "pixel_shuffle":
            raise CheckpointError(
                f"InternVL export needs projector.downsample 'pixel_shuffle', not '{cfg.projector.downsample}'"
            )
        if cfg.projector.hidden_size not in (None, cfg.llm.hidden_size):
            raise CheckpointError(
                f"InternVL export needs projector width = LLM width ({cfg.llm.hidden_size}), "
                f"got {cfg.projector.hidden_size}"
            )
        hf = transformers.InternVLConfig(
            vision_config=vision, text_config=text, image_token_id=cfg.image_token_id,
            image_seq_length=cfg.tokens_per_tile, downsample_ratio=cfg.projector.downsample_ratio,
            tie_word_embeddings=cfg.llm.tie_word_embeddings, **select,
        ).to_dict()
        hf["architectures"] = ["InternVLForConditionalGeneration"]
    elif fmt == "llava":
        if cfg.projector.kind != "mlp2x_gelu":
            raise CheckpointError(f"LLaVA export needs the 'mlp2x_gelu' projector, not {cfg.projector.kind}")
        if cfg.projector.hidden_size not in (None, cfg.llm.hidden_size):
            raise CheckpointError("LLaVA export needs projector width = LLM width")
        hf = transformers.LlavaConfig(
            vision_config=vision, text_config=text, image_token_id=cfg.image_token_id,
            image_seq_length=cfg.tokens_per_tile, projector_hidden_act="gelu", multimodal_projector_bias=True,
            tie_word_embeddings=cfg.llm.tie_word_embeddings, **select,
        ).to_dict()
        hf["architectures"] = ["LlavaForConditionalGeneration"]
    return hf


# Where each part of a whole VLM lives in its safetensors: the Hub layout (what `save_pretrained` writes and what
# published checkpoints use) and transformers' in-memory module names. Import accepts both; export writes the Hub one.
VLM_LAYOUTS = {
    "hub": dict(llm="language_model.model.", head="language_model.lm_head.weight",
                projector="multi_modal_projector.", vision="vision_tower."),
    "native": dict(llm="model.language_model.", head="lm_head.weight",
                   projector="model.multi_modal_projector.", vision="model.vision_tower."),
}


def detect_vlm_layout(names) -> dict[str, str]:
    names = set(names)
    for layout in VLM_LAYOUTS.values():
        if layout["llm"] + "embed_tokens.weight" in names:
            return layout
    raise CheckpointError("no language-model embeddings found (expected 'language_model.model.embed_tokens.weight')")


def _projector_pairs(cfg: VLMConfig, prefix: str) -> list[tuple[str, str]]:
    return expand(PROJECTOR_TABLES[cfg.projector.kind], 0, "projector.", prefix)


def vlm_state_from_hf(source: TensorSource, cfg: VLMConfig) -> dict[str, torch.Tensor]:
    where = source.origin
    try:
        layout = detect_vlm_layout(source)
    except CheckpointError as e:
        raise CheckpointError(f"{source.root}: {e}") from e
    state, used = llm_state_from_hf(source, cfg.llm, layout["llm"], layout["head"], where, "llm.")
    if cfg.llm.tie_word_embeddings and layout["head"] in source:
        used.add(layout["head"])
    proj_pairs = _projector_pairs(cfg, layout["projector"])
    state.update(convert(source, proj_pairs, "to_stitch", where=where))
    used |= {theirs for _, theirs in proj_pairs}
    vision_names = [n for n in source if n.startswith(layout["vision"])]
    try:
        prefix = find_vision_prefix(vision_names, cfg.vision)
    except CheckpointError as e:
        raise CheckpointError(f"{source.root}: {e}") from e
    vision_state = vision_state_from_hf(_SubView(source, vision_names), cfg.vision, prefix, strict=True)
    state.update({f"vision.{k}": v for k, v in vision_state.items()})
    used |= set(vision_names)
    _check_extras(source, used, source.root)
    return state


def vlm_state_to_hf(state: dict[str, torch.Tensor], cfg: VLMConfig, fmt: str) -> dict[str, torch.Tensor]:
    layout = VLM_LAYOUTS["hub"]
    out = llm_state_to_hf(state, cfg.llm, layout["llm"], layout["head"], "llm.")
    out.update(convert(state, _projector_pairs(cfg, layout["projector"]), "to_hf"))
    vision = {k[len("vision."):]: v for k, v in state.items() if k.startswith("vision.")}
    vision_layout = default_vision_layout(cfg.vision, fmt)
    out.update(vision_state_to_hf(vision, cfg.vision, layout["vision"], vision_layout))
    return out


class _SubView(dict):
    """A dict of just some names of a lazy source (vision maps read a plain mapping)."""

    def __init__(self, source: TensorSource, names: list[str]):
        super().__init__({n: source[n] for n in names})

