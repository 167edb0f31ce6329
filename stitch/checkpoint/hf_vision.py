"""HF <-> Stitch for vision encoders: configs, feature selection and weights, one explicit name table per layout.

Layouts (the names below follow the prefix the caller passes, e.g. `vision_tower.` inside a saved VLM,
`model.vision_tower.` for in-memory transformers-5 modules, `vision_model.` inside OpenGVLab's InternVL-Chat):
- `internvl_hf`       transformers' `InternVLVisionModel` (`encoder.layer.{i}.attention.q_proj`, ...).
- `internvit_remote`  OpenGVLab's remote-code `InternVisionModel` (fused `encoder.layers.{i}.attn.qkv`, split on
                      import and re-fused on export; q/k/v are stacked along the output dimension).
- `siglip`            `SiglipVisionModel` (the attention-pooling `head.*` is unused by VLMs and not imported).
- `clip`              `CLIPVisionModel`.
SigLIP/CLIP towers saved by transformers 4 (and LLaVA checkpoints on the Hub) nest everything under an extra
`vision_model.`; it is found automatically under the given prefix.

Feature selection follows each VLM's own rule so imported models give HF's features:
- InternVL (HF-native): `last_hidden_state` when vision_feature_layer == -1, else `hidden_states[layer]`.
- InternVL-Chat (remote code): `hidden_states[select_layer]` (-1 = last layer), class token always dropped.
- LLaVA: `hidden_states[vision_feature_layer]`; strategy "default" drops the first token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from pydantic import ValidationError

from stitch.config import VisionConfig
from stitch.errors import CheckpointError
from stitch.models.vision import VisionEncoder

__all__ = [
    "VISION_LAYOUTS",
    "vision_config_from_hf",
    "vision_config_to_hf",
    "vision_select_to_hf",
    "vision_state_from_hf",
    "vision_state_to_hf",
    "vision_name_pairs",
    "detect_vision_layout",
    "find_vision_prefix",
    "default_vision_layout",
]

VISION_LAYOUTS = ("internvl_hf", "internvit_remote", "siglip", "clip")
_LAYOUT_TITLE = {
    "internvl_hf": "InternVLVisionModel",
    "internvit_remote": "OpenGVLab InternVisionModel",
    "siglip": "SiglipVisionModel",
    "clip": "CLIPVisionModel",
}

# ----------------------------------------------------------------------------------------------- name tables
# A table maps a Stitch name to an HF name, or to (HF name, part) for a slice of a fused q/k/v tensor.
HFName = str | tuple[str, int]

_TOP: dict[str, dict[str, str]] = {
    "internvl_hf": {
        "embeddings.cls_token": "embeddings.cls_token",
        "embeddings.pos_embed": "embeddings.position_embeddings",
        "embeddings.patch_embed.weight": "embeddings.patch_embeddings.projection.weight",
        "embeddings.patch_embed.bias": "embeddings.patch_embeddings.projection.bias",
        "post_norm.weight": "layernorm.weight",
        "post_norm.bias": "layernorm.bias",
    },
    "internvit_remote": {
        "embeddings.cls_token": "embeddings.class_embedding",
        "embeddings.pos_embed": "embeddings.position_embedding",
        "embeddings.patch_embed.weight": "embeddings.patch_embedding.weight",
        "embeddings.patch_embed.bias": "embeddings.patch_embedding.bias",
    },
    "siglip": {
        "embeddings.pos_embed": "embeddings.position_embedding.weight",
        "embeddings.patch_embed.weight": "embeddings.patch_embedding.weight",
        "embeddings.patch_embed.bias": "embeddings.patch_embedding.bias",
        "post_norm.weight": "post_layernorm.weight",
        "post_norm.bias": "post_layernorm.bias",
    },
    "clip": {
        "embeddings.cls_token": "embeddings.class_embedding",
        "embeddings.pos_embed": "embeddings.position_embedding.weight",
        "embeddings.patch_embed.weight": "embeddings.patch_embedding.weight",
        "pre_norm.weight": "pre_layrnorm.weight",
        "pre_norm.bias": "pre_layrnorm.bias",
        "post_norm.weight": "post_layernorm.weight",
        "post_norm.bias": "post_layernorm.bias",
    },
}

_LAYER_PREFIX = {
    "internvl_hf": "encoder.layer.{i}.",
    "internvit_remote": "encoder.layers.{i}.",
    "siglip": "encoder.layers.{i}.",
    "clip": "encoder.layers.{i}.",
}

_CLIP_LIKE_LAYER: dict[str, HFName] = {
    "norm1.weight": "layer_norm1.weight",
    "norm1.bias": "layer_norm1.bias",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.q_proj.bias": "self_attn.q_proj.bias",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.k_proj.bias": "self_attn.k_proj.bias",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.v_proj.bias": "self_attn.v_proj.bias",
    "attn.o_proj.weight": "self_attn.out_proj.weight",
    "attn.o_proj.bias": "self_attn.out_proj.bias",
    "norm2.weight": "layer_norm2.weight",
    "norm2.bias": "layer_norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}

_LAYER: dict[str, dict[str, HFName]] = {
    "internvl_hf": {
        "ls1": "lambda_1",
        "ls2": "lambda_2",
        "norm1.weight": "layernorm_before.weight",
        "norm1.bias": "layernorm_before.bias",
        "attn.q_proj.weight": "attention.q_proj.weight",
        "attn.q_proj.bias": "attention.q_proj.bias",
        "attn.k_proj.weight": "attention.k_proj.weight",
        "attn.k_proj.bias": "attention.k_proj.bias",
        "attn.v_proj.weight": "attention.v_proj.weight",
        "attn.v_proj.bias": "attention.v_proj.bias",
        "attn.o_proj.weight": "attention.projection_layer.weight",
        "attn.o_proj.bias": "attention.projection_layer.bias",
        "attn.q_norm.weight": "attention.q_norm.weight",
        "attn.k_norm.weight": "attention.k_norm.weight",
        "norm2.weight": "layernorm_after.weight",
        "norm2.bias": "layernorm_after.bias",
        "mlp.fc1.weight": "mlp.fc1.weight",
        "mlp.fc1.bias": "mlp.fc1.bias",
        "mlp.fc2.weight": "mlp.fc2.weight",
        "mlp.fc2.bias": "mlp.fc2.bias",
    },
    "internvit_remote": {
        "ls1": "ls1",
        "ls2": "ls2",
        "norm1.weight": "norm1.weight",
        "norm1.bias": "norm1.bias",
        "attn.q_proj.weight": ("attn.qkv.weight", 0),
        "attn.k_proj.weight": ("attn.qkv.weight", 1),
        "attn.v_proj.weight": ("attn.qkv.weight", 2),
        "attn.q_proj.bias": ("attn.qkv.bias", 0),
        "attn.k_proj.bias": ("attn.qkv.bias", 1),
        "attn.v_proj.bias": ("attn.qkv.bias", 2),
        "attn.o_proj.weight": "attn.proj.weight",
        "attn.o_proj.bias": "attn.proj.bias",
        "attn.q_norm.weight": "attn.q_norm.weight",
        "attn.k_norm.weight": "attn.k_norm.weight",
        "norm2.weight": "norm2.weight",
        "norm2.bias": "norm2.bias",
        "mlp.fc1.weight": "mlp.fc1.weight",
        "mlp.fc1.bias": "mlp.fc1.bias",
        "mlp.fc2.weight": "mlp.fc2.weight",
        "mlp.fc2.bias": "mlp.fc2.bias",
    },
    "siglip": _CLIP_LIKE_LAYER,
    "clip": _CLIP_LIKE_LAYER,
}


# InternViT keeps the class token as [1, 1, C] and positions as [1, P, C]; Stitch stores [C] and [P, C].
def _batch1(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (1, *shape)


def _batch11(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (1, 1, *shape)


_INTERNVIT_SHAPES: dict[str, Callable[[tuple[int, ...]], tuple[int, ...]]] = {
    "embeddings.cls_token": _batch11,
    "embeddings.pos_embed": _batch1,
}
_HF_SHAPE = {"internvl_hf": _INTERNVIT_SHAPES, "internvit_remote": _INTERNVIT_SHAPES, "siglip": {}, "clip": {}}

# Tensors some checkpoints carry that no VLM uses: SigLIP's pooling head, InternVL's masked-image-modelling
# token, and the position-id buffers old transformers versions saved.
_UNUSED_PARTS = ("head.", "embeddings.mask_token", "embeddings.position_ids")


def _hf_name(layout: str, name: str) -> HFName:
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        entry = _LAYER[layout][rest]
        prefix = _LAYER_PREFIX[layout].format(i=i)
        return (prefix + entry[0], entry[1]) if isinstance(entry, tuple) else prefix + entry
    return _TOP[layout][name]


def _stitch_shapes(cfg: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Every Stitch tensor of an encoder built from `cfg`, with its shape (built on the meta device)."""
    with torch.device("meta"):
        model = VisionEncoder(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def default_vision_layout(cfg: VisionConfig, fmt: str | None = None) -> str:
    """The layout an encoder exports to: `fmt` is a VLM format (internvl, llava, internvl_chat) or a layout."""
    if fmt in VISION_LAYOUTS:
        layout = fmt
    elif cfg.kind == "internvit":
        layout = "internvit_remote" if fmt == "internvl_chat" else "internvl_hf"
    elif fmt == "internvl_chat":
        raise CheckpointError(f"InternVL-Chat (remote code) holds only InternViT encoders, not {cfg.kind}")
    else:
        layout = cfg.kind
    if fmt not in (None, "internvl", "llava", "internvl_chat", *VISION_LAYOUTS):
        raise CheckpointError(f"unknown vision export format '{fmt}' (internvl, llava, internvl_chat)")
    return layout


def vision_name_pairs(cfg: VisionConfig, layout: str | None = None, prefix: str = "") -> list[tuple[str, HFName]]:
    """(Stitch name, HF name) for every tensor of the encoder; a fused slice's HF name is (name, part)."""
    layout = layout or default_vision_layout(cfg)
    pairs = []
    for name in _stitch_shapes(cfg):
        theirs = _hf_name(layout, name)
        pairs.append((name, (prefix + theirs[0], theirs[1]) if isinstance(theirs, tuple) else prefix + theirs))
    return pairs


# ----------------------------------------------------------------------------------------------- weights
def detect_vision_layout(state: Iterable[str], cfg: VisionConfig, prefix: str = "") -> str:
    """Which layout the tensors under `prefix` follow (InternViT: HF-native or OpenGVLab's fused qkv)."""
    if cfg.kind != "internvit":
        return cfg.kind
    for key in state:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            if rest.startswith("encoder.layer."):
                return "internvl_hf"
            if rest.startswith("encoder.layers."):
                return "internvit_remote"
    return "internvl_hf"


def find_vision_prefix(names: Iterable[str], cfg: VisionConfig, layout: str | None = None) -> str:
    """The prefix under which a checkpoint holds the vision tower (found by its patch-embedding weight)."""
    names = list(names)
    layouts = [layout] if layout else ([cfg.kind] if cfg.kind != "internvit" else ["internvl_hf", "internvit_remote"])
    found = []
    for lay in layouts:
        anchor = _TOP[lay]["embeddings.patch_embed.weight"]
        found += [n[: -len(anchor)] for n in names if n == anchor or n.endswith("." + anchor)]
    found = sorted(set(found))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(repr(f) for f in found)})"
        raise CheckpointError(f"vision tower ({cfg.kind}): found {what} candidate prefixes in the checkpoint")
    return found[0]


def _resolve_prefix(state: Mapping[str, Any], layout: str, prefix: str) -> str:
    """Add transformers-4 style `vision_model.` nesting when the checkpoint uses it."""
    anchor = _TOP[layout]["embeddings.patch_embed.weight"]
    if prefix + anchor not in state and prefix + "vision_model." + anchor in state:
        return prefix + "vision_model."
    return prefix


def vision_state_from_hf(
    state: Mapping[str, torch.Tensor],
    cfg: VisionConfig,
    prefix: str = "",
    layout: str | None = None,
    strict: bool = False,
) -> dict[str, torch.Tensor]:
    """HF-named tensors under `prefix` -> Stitch-named encoder tensors (no prefix).

    Only the tensors the encoder needs are read, so `state` may hold a whole VLM. Fused qkv tensors are split
    (copies, so the result can be saved as safetensors). A missing tensor or a wrong shape raises
    CheckpointError naming it. `strict` also rejects tensors under the prefix that nothing reads (except
    SigLIP's pooling head, InternVL's mask token and position-id buffers), e.g. layers beyond `num_layers`.
    """
    layout = layout or detect_vision_layout(state, cfg, prefix)
    prefix = _resolve_prefix(state, layout, prefix)
    where = f"vision tower ({_LAYOUT_TITLE[layout]} layout, prefix '{prefix}')"
    reshape = _HF_SHAPE[layout]
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name, shape in _stitch_shapes(cfg).items():
        theirs = _hf_name(layout, name)
        key, part = (prefix + theirs[0], theirs[1]) if isinstance(theirs, tuple) else (prefix + theirs, None)
        if key not in state:
            raise CheckpointError(f"{where}: missing tensor '{key}' (for '{name}')")
        tensor = state[key]
        want = (3 * shape[0], *shape[1:]) if part is not None else reshape.get(name, lambda s: s)(shape)
        if tuple(tensor.shape) != want:
            raise CheckpointError(
                f"{where}: tensor '{key}' has shape {tuple(tensor.shape)}, expected {want} for "
                f"hidden_size={cfg.hidden_size}, intermediate_size={cfg.intermediate_size}, "
                f"image_size={cfg.image_size}, patch_size={cfg.patch_size}"
            )
        if part is not None:
            out[name] = tensor.narrow(0, part * shape[0], shape[0]).clone()
        else:
            out[name] = tensor.reshape(shape)
        used.add(key)
    if strict:
        extra = [
            k for k in state
            if k.startswith(prefix) and k not in used and not k[len(prefix):].startswith(_UNUSED_PARTS)
        ]
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise CheckpointError(f"{where}: unexpected tensor '{extra[0]}'{more}")
    return out


def vision_state_to_hf(
    state: Mapping[str, torch.Tensor],
    cfg: VisionConfig,
    prefix: str = "",
    layout: str | None = None,
) -> dict[str, torch.Tensor]:
    """Stitch-named encoder tensors (no prefix) -> HF names under `prefix`; the inverse of import, bit for bit.

    `layout` defaults to the transformers class of the family (`internvl_hf` for InternViT).
    """
    layout = layout or default_vision_layout(cfg)
    _check_expressible(cfg, layout)
    shapes = _stitch_shapes(cfg)
    unknown = [k for k in state if k not in shapes]
    if unknown:
        raise CheckpointError(f"vision state: unexpected tensor '{unknown[0]}' for this VisionConfig")
    reshape = _HF_SHAPE[layout]
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[torch.Tensor | None]] = {}
    for name, shape in shapes.items():
        if name not in state:
            raise CheckpointError(f"vision state: missing tensor '{name}'")
        tensor = state[name]
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"vision state: tensor '{name}' has shape {tuple(tensor.shape)}, expected {shape}")
        theirs = _hf_name(layout, name)
        if isinstance(theirs, tuple):
            parts = fused.setdefault(prefix + theirs[0], [None, None, None])
            parts[theirs[1]] = tensor
            if all(p is not None for p in parts):
                out[prefix + theirs[0]] = torch.cat(parts, dim=0)
        else:
            out[prefix + theirs] = tensor.reshape(reshape.get(name, lambda s: s)(shape))
    return out


# ----------------------------------------------------------------------------------------------- configs
_ACT_FROM_HF = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "quick_gelu": "quick_gelu"}
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}
_FAMILIES = {
    "internvl_vision": "internvl_hf",
    "InternVLVisionModel": "internvl_hf",
    "intern_vit_6b": "internvit_remote",
    "InternVisionModel": "internvit_remote",
    "siglip_vision_model": "siglip",
    "SiglipVisionModel": "siglip",
    "clip_vision_model": "clip",
    "CLIPVisionModel": "clip",
}
_VLMS = ("internvl", "internvl_chat", "llava")
# Keys a caller may add to a vision config dict to say how the VLM selects features (stitch.checkpoint.hf).
_SELECT_KEYS = ("vision_feature_layer", "vision_feature_select_strategy", "select_layer", "vlm")


def _square(value: Any, field: str, where: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointError(f"{where}: non-square {field} {list(value)} is not supported")
        value = value[0]
    return int(value)


def _act(value: str, where: str) -> str:
    if value not in _ACT_FROM_HF:
        raise CheckpointError(f"{where}: unknown hidden_act '{value}' (supported: {', '.join(_ACT_FROM_HF)})")
    return _ACT_FROM_HF[value]


def _family_fields(vision: dict[str, Any], layout: str, where: str) -> dict[str, Any]:
    """VisionConfig fields (without feature selection) from one HF vision config, with HF's defaults."""
    g = vision.get
    if layout == "internvl_hf":
        if not g("use_absolute_position_embeddings", True):
            raise CheckpointError(f"{where}: use_absolute_position_embeddings=false is not supported")
        return dict(
            kind="internvit", image_size=_square(g("image_size", 448), "image_size", where),
            patch_size=_square(g("patch_size", 14), "patch_size", where), num_channels=g("num_channels", 3),
            hidden_size=g("hidden_size", 1024), intermediate_size=g("intermediate_size", 4096),
            num_layers=g("num_hidden_layers", 24), num_heads=g("num_attention_heads", 16),
            norm_type=g("norm_type", "layer_norm"), norm_eps=g("layer_norm_eps", 1e-6),
            qkv_bias=bool(g("attention_bias", False)), qk_norm=bool(g("use_qk_norm", False)), qk_norm_eps=1e-6,
            layer_scale_init=g("layer_scale_init_value", 0.1), hidden_act=_act(g("hidden_act", "gelu"), where),
            post_norm=not g("use_mean_pooling", True), dropout=g("attention_dropout", 0.0),
        )
    if layout == "internvit_remote":
        eps = g("layer_norm_eps", 1e-6)
        return dict(
            kind="internvit", image_size=_square(g("image_size", 224), "image_size", where),
            patch_size=_square(g("patch_size", 14), "patch_size", where), num_channels=g("num_channels", 3),
            hidden_size=g("hidden_size", 3200), intermediate_size=g("intermediate_size", 12800),
            num_layers=g("num_hidden_layers", 48), num_heads=g("num_attention_heads", 25),
            norm_type=g("norm_type", "rms_norm"), norm_eps=eps, qkv_bias=bool(g("qkv_bias", False)),
            qk_norm=bool(g("qk_normalization", True)), qk_norm_eps=eps,
            layer_scale_init=g("initializer_factor", 0.1), hidden_act=_act(g("hidden_act", "gelu"), where),
            post_norm=False, dropout=g("attention_dropout", 0.0),
        )
    defaults = {"siglip": (224, 16, "gelu_pytorch_tanh", 1e-6), "clip": (224, 32, "quick_gelu", 1e-5)}[layout]
    return dict(
        kind=layout, image_size=_square(g("image_size", defaults[0]), "image_size", where),
        patch_size=_square(g("patch_size", defaults[1]), "patch_size", where), num_channels=g("num_channels", 3),
        hidden_size=g("hidden_size", 768), intermediate_size=g("intermediate_size", 3072),
        num_layers=g("num_hidden_layers", 12), num_heads=g("num_attention_heads", 12), norm_type="layer_norm",
        norm_eps=g("layer_norm_eps", defaults[3]), qkv_bias=True, qk_norm=False, layer_scale_init=None,
        hidden_act=_act(g("hidden_act", defaults[2]), where), post_norm=True, dropout=g("attention_dropout", 0.0),
    )


def vision_config_from_hf(hf_config: dict[str, Any]) -> VisionConfig:
    """A VisionConfig from an HF config dict, with the feature selection of the VLM it belongs to.

    Accepts a whole VLM config (`internvl`, `internvl_chat`, `llava`: the vision part is `vision_config`), a
    standalone vision config (`internvl_vision`, `intern_vit_6b`, `siglip_vision_model`, `clip_vision_model`,
    or a CLIP/SigLIP dual model), or a vision config to which the caller added `vlm` (one of the VLM
    model_types), `vision_feature_layer` and `vision_feature_select_strategy`. A standalone encoder selects
    HF's `last_hidden_state`.
    """
    hf = dict(hf_config)
    if isinstance(hf.get("vision_config"), dict):
        vision = dict(hf["vision_config"])
        vlm = hf.get("model_type")
        if vlm in ("clip", "siglip"):  # a dual text+image model: its image tower on its own
            vlm = None
        elif vlm not in _VLMS:
            archs = hf.get("architectures") or []
            raise CheckpointError(
                f"unknown VLM model_type={vlm!r} {archs} holding a vision tower (supported: {', '.join(_VLMS)})"
            )
        select = {k: hf[k] for k in _SELECT_KEYS if k in hf}
    else:
        vision = {k: v for k, v in hf.items() if k not in _SELECT_KEYS}
        select = {k: hf[k] for k in _SELECT_KEYS if k in hf}
        vlm = select.get("vlm")
        if vlm is not None and vlm not in _VLMS:
            raise CheckpointError(f"unknown VLM model_type={vlm!r} (supported: {', '.join(_VLMS)})")

    model_type = vision.get("model_type")
    archs = vision.get("architectures") or []
    layout = _FAMILIES.get(model_type) or next((_FAMILIES[a] for a in archs if a in _FAMILIES), None)
    if layout is None:
        known = ", ".join(k for k in _FAMILIES if k.islower())
        raise CheckpointError(
            f"unknown vision encoder model_type={model_type!r} architectures={archs} (supported: {known})"
        )
    where = f"vision_config ({model_type or archs})"
    fields = _family_fields(vision, layout, where)

    # Feature selection, per VLM.
    strategy = select.get("vision_feature_select_strategy", "default")
    if vlm == "internvl_chat":
        layer, strategy = select.get("select_layer", -1), "default"
    elif vlm in ("llava", "internvl"):
        layer = select.get("vision_feature_layer", -2 if vlm == "llava" else -1)
    else:
        layer, strategy = -1, "default" if fields["kind"] != "siglip" else "full"
    if not isinstance(layer, int):
        raise CheckpointError(f"{where}: vision feature layer {layer!r} (several layers) is not supported")
    if strategy not in ("default", "full"):
        raise CheckpointError(f"{where}: unknown vision_feature_select_strategy '{strategy}' (default, full)")
    if strategy == "default" and fields["kind"] == "siglip":
        raise CheckpointError(
            f"{where}: strategy 'default' drops the first token, but SigLIP has no class token "
            "(that would drop a real patch); only 'full' is supported"
        )
    # HF's last_hidden_state is post-normed for SigLIP and InternVL-HF (use_mean_pooling=false), never for CLIP.
    last_is_normed = fields["post_norm"] and fields["kind"] != "clip"
    takes_last_hidden_state = vlm in (None, "internvl") and layer == -1
    fields.update(
        select_layer=layer,
        drop_cls_token=strategy == "default",
        feature_post_norm=bool(takes_last_hidden_state and last_is_normed),
    )
    try:
        return VisionConfig(**fields)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise CheckpointError(f"{where}: field '{loc}': {first['msg']}") from e


def _check_expressible(cfg: VisionConfig, layout: str) -> None:
    """Raise if `cfg` has switches the target HF class cannot represent."""
    title = _LAYOUT_TITLE[layout]
    wanted_kind = "internvit" if layout in ("internvl_hf", "internvit_remote") else layout
    problems = []
    if cfg.patch_stem != "linear":
        problems.append(f"patch_stem '{cfg.patch_stem}' (HF encoders have a single patch conv)")
    if cfg.kind != wanted_kind:
        problems.append(f"kind '{cfg.kind}'")
    if wanted_kind == "internvit":
        if cfg.layer_scale_init is None:
            problems.append("no layer scale (HF InternViT always has ls1/ls2)")
        if layout == "internvl_hf" and cfg.qk_norm and cfg.qk_norm_eps != 1e-6:
            problems.append(f"qk_norm_eps {cfg.qk_norm_eps} (fixed at 1e-6)")
        if layout == "internvit_remote":
            if cfg.post_norm:
                problems.append("a post_norm")
            if cfg.qk_norm and cfg.qk_norm_eps != cfg.norm_eps:
                problems.append(f"qk_norm_eps {cfg.qk_norm_eps} != norm_eps {cfg.norm_eps}")
    else:
        if cfg.layer_scale_init is not None:
            problems.append("layer scale")
        if cfg.qk_norm:
            problems.append("QK-norm")
        if cfg.norm_type != "layer_norm":
            problems.append(f"norm_type '{cfg.norm_type}'")
        if not cfg.qkv_bias:
            problems.append("no qkv bias")
        if not cfg.post_norm:
            problems.append("no post_norm")
    if problems:
        raise CheckpointError(f"vision encoder not expressible as {title}: {'; '.join(problems)}")


def vision_config_to_hf(cfg: VisionConfig, fmt: str | None = None) -> dict[str, Any]:
    """The HF vision config dict (`vision_config` of a VLM, or a standalone model's config.json).

    `fmt` is the VLM format (internvl, llava, internvl_chat) or a layout name; it picks InternViT's layout.
    Feature selection lives in the VLM config: see `vision_select_to_hf`.
    """
    layout = default_vision_layout(cfg, fmt)
    _check_expressible(cfg, layout)
    act = _ACT_TO_HF[cfg.hidden_act]
    common = dict(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_channels=cfg.num_channels, hidden_act=act,
        layer_norm_eps=cfg.norm_eps, attention_dropout=cfg.dropout,
    )
    if layout == "internvl_hf":
        return dict(
            model_type="internvl_vision", architectures=["InternVLVisionModel"], **common,
            image_size=[cfg.image_size, cfg.image_size], patch_size=[cfg.patch_size, cfg.patch_size],
            attention_bias=cfg.qkv_bias, use_qk_norm=cfg.qk_norm, norm_type=cfg.norm_type,
            layer_scale_init_value=cfg.layer_scale_init, use_mean_pooling=not cfg.post_norm,
            use_absolute_position_embeddings=True, use_mask_token=False, projection_dropout=0.0,
            hidden_dropout_prob=0.0,
        )
    if layout == "internvit_remote":
        return dict(
            model_type="intern_vit_6b", architectures=["InternVisionModel"], **common, image_size=cfg.image_size,
            patch_size=cfg.patch_size, qkv_bias=cfg.qkv_bias, qk_normalization=cfg.qk_norm,
            norm_type=cfg.norm_type, initializer_factor=cfg.layer_scale_init, initializer_range=0.02,
            use_flash_attn=False, dropout=0.0, drop_path_rate=0.0,
        )
    if layout == "siglip":
        return dict(
            model_type="siglip_vision_model", architectures=["SiglipVisionModel"], **common,
            image_size=cfg.image_size, patch_size=cfg.patch_size, vision_use_head=False,
        )
    return dict(
        model_type="clip_vision_model", architectures=["CLIPVisionModel"], **common, image_size=cfg.image_size,
        patch_size=cfg.patch_size,
    )


def vision_select_to_hf(cfg: VisionConfig, fmt: str) -> dict[str, Any]:
    """The VLM-level keys that make HF select the same features as `cfg` does.

    internvl / llava: {vision_feature_layer, vision_feature_select_strategy}; internvl_chat: {select_layer}.
    Raises CheckpointError when the format cannot express the selection (e.g. post-normed SigLIP features in
    LLaVA, which never applies the post-norm).
    """
    strategy = "default" if cfg.has_cls_token and cfg.drop_cls_token else "full"
    last_is_normed = bool(cfg.post_norm) and cfg.kind != "clip"
    if fmt == "internvl":
        if cfg.applies_post_norm:
            if not last_is_normed:
                raise CheckpointError("InternVL cannot post-norm CLIP features (HF's CLIP never does)")
            layer = -1
        elif cfg.select_layer == -1 and last_is_normed:
            layer = cfg.num_layers  # hidden_states[L]: the last layer without the post-norm
        else:
            layer = cfg.select_layer
        return {"vision_feature_layer": layer, "vision_feature_select_strategy": strategy}
    if fmt == "llava":
        if cfg.applies_post_norm:
            raise CheckpointError("LLaVA never applies the vision post-norm; set feature_post_norm=False")
        return {"vision_feature_layer": cfg.select_layer, "vision_feature_select_strategy": strategy}
    if fmt == "internvl_chat":
        if cfg.applies_post_norm or not cfg.has_cls_token or not cfg.drop_cls_token:
            raise CheckpointError("InternVL-Chat always drops the class token and has no post-norm")
        return {"select_layer": cfg.select_layer}
    raise CheckpointError(f"unknown VLM format '{fmt}' (internvl, llava, internvl_chat)")
