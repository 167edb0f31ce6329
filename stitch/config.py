"""Typed model configs, and the one reader of YAML config files.

Every config is a pydantic model so a bad value fails at load time with the field's name, not deep inside a
forward pass. `LoRAConfig` lives here too, not with the training config, because both the adapter layers
(`stitch.models.lora`) and the trainer read it. Training/data/eval configs live beside the code they drive (see
`stitch.train.config`) and import from here. The YAML reader at the end (`base:` inheritance, `key=value`
overrides, errors naming the file that set a field) serves every config file, so `stitch train` and
`stitch data check` read a recipe identically. This module imports nothing of Stitch but `stitch.errors`, so
every other package may depend on it.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stitch.errors import StitchConfigError

__all__ = [
    "StitchConfigError",
    "LLMConfig",
    "VisionConfig",
    "ProjectorConfig",
    "VLMConfig",
    "LoRAConfig",
    "validate",
    "first_error",
    "Provenance",
    "merge_dicts",
    "read_config_yaml",
    "parse_config_overrides",
    "load_yaml_config",
]


ModelT = TypeVar("ModelT", bound=BaseModel)


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class LLMConfig(_Base):
    """The Llama family in one shape: Llama 2/3, Qwen2/2.5, Yi, Mistral, SmolLM2 differ only in these switches."""

    family: Literal["llama", "qwen2", "mistral"] = "llama"
    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int | None = None
    rms_norm_eps: float = Field(default=1e-6, gt=0)
    rope_theta: float = Field(default=10000.0, gt=0)
    # HF-style rope scaling dict, e.g. {"rope_type": "llama3", "factor": 8.0, ...}; None for plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    tie_word_embeddings: bool = False
    hidden_act: Literal["silu"] = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    dropout: float = 0.0

    @model_validator(mode="after")
    def _check(self) -> LLMConfig:
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not divisible by num_kv_heads {self.num_kv_heads}")
        _check_rope_scaling(self.rope_scaling)
        return self


# The rope_scaling types Stitch implements (`stitch.models.layers.rope_inv_freq`) and the keys each needs.
ROPE_SCALING_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _check_rope_scaling(scaling: dict[str, Any] | None) -> None:
    """A clear error at load time for a rope_scaling the model cannot run (instead of a KeyError at build)."""
    if not scaling:
        return
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"rope_scaling type '{kind}' is not supported (supported: {', '.join(ROPE_SCALING_KEYS)})")
    missing = [k for k in ROPE_SCALING_KEYS[kind] if k not in scaling]
    if missing:
        raise ValueError(f"rope_scaling type '{kind}' needs {', '.join(missing)}")
    for key in ROPE_SCALING_KEYS[kind]:
        value = scaling[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"rope_scaling.{key} must be a positive number, got {value!r}")
    if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError("rope_scaling.high_freq_factor must be greater than low_freq_factor")


class VisionConfig(_Base):
    """ViT encoders: InternViT (300M LayerNorm / 6B RMSNorm + QK-norm), SigLIP, CLIP.

    `kind` selects the embeddings (class token or not, CLIP's pre-norm); the switches below reproduce each HF
    implementation. Feature selection follows HF's `hidden_states` tuple, so a VLM's `vision_feature_layer`
    carries over unchanged: index 0 is the embeddings (after CLIP's pre-norm), index i the output of layer i,
    negative indices count from the end (-1 = the last layer). Only the layers up to the selected one run.
    """

    kind: Literal["internvit", "siglip", "clip"] = "internvit"
    image_size: int = Field(default=448, gt=0)
    patch_size: int = Field(default=14, gt=0)
    num_channels: int = 3
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    norm_type: Literal["layer_norm", "rms_norm"] = "layer_norm"
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    qk_norm: bool = False  # InternViT-6B: RMSNorm over the full q/k width (not per head)
    # HF's InternVLVisionModel fixes the QK-norm eps at 1e-6; OpenGVLab's InternViT uses its layer_norm_eps.
    qk_norm_eps: float = 1e-6
    layer_scale_init: float | None = 0.1  # InternViT ls1/ls2; None = no layer scale
    hidden_act: Literal["gelu", "gelu_tanh", "quick_gelu"] = "gelu"
    # Which hidden state feeds the projector: an index into HF's `hidden_states` (see the class docstring).
    select_layer: int = -1
    # Drop the class token before the projector (InternVL/NVLM: yes; LLaVA "default" strategy: yes).
    # Encoders without a class token (SigLIP) ignore it.
    drop_cls_token: bool = True
    # The encoder carries a final LayerNorm `post_norm`: SigLIP's and CLIP's `post_layernorm`, InternVL-HF's
    # `layernorm` (when `use_mean_pooling=False`). None = the family default (SigLIP, CLIP: yes; InternViT: no).
    post_norm: bool | None = None
    # Pass the features through `post_norm` when select_layer == -1, i.e. take HF's `last_hidden_state` rather
    # than `hidden_states[-1]` (what InternVL does for vision_feature_layer == -1). HF never applies CLIP's
    # post_layernorm to the sequence (only to the pooled class token), so CLIP imports leave this off.
    feature_post_norm: bool = False
    dropout: float = 0.0  # attention-probability dropout while training
    # How pixels become patch tokens. "linear": the usual one patch_size-stride conv (every HF encoder).
    # "conv": early convolutions (Xiao et al. 2021, "Early Convolutions Help Transformers See Better"): 3x3
    # stride-2 convs with GroupNorm + GELU down to the patch grid, then a 1x1 projection. A from-scratch ViT
    # with it learns several times faster on small data (the quickstart's encoder); no HF layout has it, so
    # `export-hf` refuses such encoders. Needs a power-of-two patch_size.
    patch_stem: Literal["linear", "conv"] = "linear"

    @model_validator(mode="after")
    def _check(self) -> VisionConfig:
        if self.patch_stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ValueError(f"patch_stem 'conv' needs a power-of-two patch_size >= 2, got {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size {self.image_size} smaller than patch_size {self.patch_size}")
        if not -(self.num_layers + 1) <= self.select_layer <= self.num_layers:
            raise ValueError(
                f"select_layer {self.select_layer} out of range for {self.num_layers} layers "
                f"(valid: {-(self.num_layers + 1)}..{self.num_layers})"
            )
        if self.post_norm is None:
            self.post_norm = self.kind in ("siglip", "clip")
        if self.feature_post_norm and not self.post_norm:
            raise ValueError("feature_post_norm needs post_norm")
        return self

    @property
    def has_cls_token(self) -> bool:
        return self.kind in ("internvit", "clip")

    @property
    def has_pre_norm(self) -> bool:
        """CLIP normalises the embeddings before the first layer (`pre_layrnorm`)."""
        return self.kind == "clip"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        """Patches per side (the conv drops any remainder, as SigLIP-so400m's 384/14 does)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_positions(self) -> int:
        """Learned position embeddings: one per patch, plus one for the class token."""
        return self.num_patches + (1 if self.has_cls_token else 0)

    @property
    def num_layers_used(self) -> int:
        """How many layers run to produce the selected hidden state (later layers are skipped)."""
        return self.select_layer if self.select_layer >= 0 else self.num_layers + 1 + self.select_layer

    @property
    def applies_post_norm(self) -> bool:
        """Whether the returned features pass through `post_norm`."""
        return bool(self.post_norm and self.feature_post_norm and self.select_layer == -1)

    @property
    def num_output_tokens(self) -> int:
        return self.num_patches + (1 if self.has_cls_token and not self.drop_cls_token else 0)

    @property
    def image_mean_std(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """Per-encoder pixel normalisation (ImageNet for InternViT, 0.5 for SigLIP, CLIP's own)."""
        if self.kind == "siglip":
            return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        if self.kind == "clip":
            return (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ProjectorConfig(_Base):
    """`mlp`: pixel shuffle + LayerNorm + Linear-GELU-Linear (InternVL/NVLM). `linear` / `mlp2x_gelu`: LLaVA."""

    kind: Literal["mlp", "linear", "mlp2x_gelu"] = "mlp"
    # Token-grid scale (0.5: 2x2 blocks -> 1 token); only for kind="mlp". 1/ratio must be a whole block side.
    downsample_ratio: float = Field(default=0.5, gt=0, le=1)
    # How kind="mlp" shrinks the grid: InternVL's pixel shuffle folds each block into channels (nothing lost,
    # input width C/ratio^2); "avg_pool" averages each block (width C; LLaVA-OneVision-style pooling), which
    # hands a from-scratch encoder's features to the LLM translation-invariantly. HF export needs pixel_shuffle.
    downsample: Literal["pixel_shuffle", "avg_pool"] = "pixel_shuffle"
    hidden_size: int | None = Field(default=None, gt=0)  # intermediate width; default = LLM hidden size
    layer_norm_eps: float = 1e-5

    @model_validator(mode="after")
    def _check(self) -> ProjectorConfig:
        block = 1 / self.downsample_ratio
        if abs(block - round(block)) > 1e-6:
            raise ValueError(f"downsample_ratio {self.downsample_ratio}: 1/ratio must be a whole number "
                             "(0.5, 0.25, ...)")
        return self

    def input_width(self, vision_width: int) -> int:
        """Width of each token entering the first Linear: pixel shuffle folds 1/ratio^2 patches into one."""
        if self.kind == "mlp" and self.downsample == "pixel_shuffle":
            return vision_width * int(round(1 / self.downsample_ratio)) ** 2
        return vision_width


class VLMConfig(_Base):
    """A stitched model: vision encoder + projector + LLM, plus how images appear in the token stream."""

    vision: VisionConfig
    llm: LLMConfig
    projector: ProjectorConfig = ProjectorConfig()
    image_token: str = "<IMG_CONTEXT>"
    image_token_id: int = 0  # set when the tokenizer is attached (build/import)
    tile_tags: Literal["none", "nvlm"] = "nvlm"
    image_wrapper: Literal["nvlm", "internvl", "none"] = "nvlm"
    max_tiles: int = Field(default=6, ge=1)
    use_thumbnail: bool = True
    # Video (stitch.data.video): each frame is one tile. "internvl" lays a <video> out as transformers'
    # InternVLProcessor does ("Frame1: <img>...</img>\nFrame2: ..."), "nvlm" as the seed system does (the frames
    # spliced at the placeholder as the tiles of one image); "auto" follows image_wrapper.
    video_layout: Literal["auto", "internvl", "nvlm"] = "auto"
    video_frames: int = Field(default=8, ge=1)  # frames sampled per video unless a caller asks otherwise
    video_sampling: Literal["uniform", "internvl", "hf", "fps"] = "uniform"
    video_timestamps: bool = False  # "Frame1 (0.0s): ..." in the internvl layout
    # System message the processor adds when a conversation has none (training and inference alike), so a
    # model fine-tuned with a short system prompt is always asked the way it was trained. None: the chat
    # template's own default.
    system_prompt: str | None = None
    # HF export target this model was imported from / is shaped for; informational.
    source_format: Literal["stitch", "internvl", "llava"] = "stitch"

    @model_validator(mode="after")
    def _check(self) -> VLMConfig:
        self.tokens_per_tile  # noqa: B018 - raises when the projector cannot fold the encoder's token grid
        return self

    @property
    def resolved_video_layout(self) -> str:
        if self.video_layout != "auto":
            return self.video_layout
        return "internvl" if self.image_wrapper == "internvl" else "nvlm"

    @property
    def tokens_per_tile(self) -> int:
        """Embeddings one tile contributes after the projector (256 for a 448px InternViT tile)."""
        n = self.vision.num_output_tokens
        if self.projector.kind == "mlp":
            side = int(round(n**0.5))
            if side * side != n:
                raise StitchConfigError(f"pixel shuffle needs a square token grid, got {n} tokens")
            block = int(round(1 / self.projector.downsample_ratio))
            if side % block:
                raise StitchConfigError(f"projector.downsample_ratio {self.projector.downsample_ratio}: blocks of "
                                        f"{block}x{block} do not tile the vision encoder's {side}x{side} token grid")
            return (side // block) ** 2
        return n

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.model_dump(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> VLMConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise StitchConfigError(f"{path}: no such file") from e
        except json.JSONDecodeError as e:
            raise StitchConfigError(f"{path}: not valid JSON ({e})") from e
        return validate(cls, data, source=str(path))


class LoRAConfig(_Base):
    """Low-rank adapters (LoRA) in place of full fine-tuning for some parts: the layers are `stitch.models.lora`,
    their checkpoint files `stitch.checkpoint.lora`.

    The listed `parts` keep their weights frozen and learn `W + (alpha / rank) * B @ A` on the chosen linear
    layers instead, which cuts gradient and optimizer memory to a few percent. The projector is also frozen
    unless `trainable` names it (it does by default: it is small and starts untrained). Checkpoints then
    hold only the adapters and the fully trained modules, plus a pointer to the base checkpoint.
    """

    enabled: bool = False
    parts: list[Literal["llm", "vision"]] = Field(default_factory=lambda: ["llm"], min_length=1)
    # "attention" (q/k/v/o projections), "mlp" (gate/up/down, or the ViT's fc1/fc2), or explicit module names
    # matched against the end of a module's name (`q_proj`, `self_attn.v_proj`, `attn.o_proj`, `mlp.fc1`).
    modules: list[str] = Field(default_factory=lambda: ["attention", "mlp"], min_length=1)
    rank: int = Field(default=16, gt=0)
    alpha: float = Field(default=32.0, gt=0)  # the update is scaled by alpha / rank
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)  # on the adapter's input only
    # Modules (dotted names: `projector`, `llm.lm_head`, `llm.embed_tokens`, `vision.post_norm`, ...) that
    # train fully beside the adapters; drop `projector` to freeze it too.
    trainable: list[str] = Field(default_factory=lambda: ["projector"])

    @model_validator(mode="after")
    def _check(self) -> LoRAConfig:
        if len(set(self.parts)) != len(self.parts):
            raise ValueError(f"parts lists a part twice: {self.parts}")
        if any(not m.strip() for m in self.modules):
            raise ValueError("modules: empty module name")
        return self


def validate(cls: type[BaseModel], data: Any, source: str) -> Any:
    """Validate `data` as `cls`, turning pydantic's error into one that names `source` and the field path."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        loc, msg = first_error(e)
        raise StitchConfigError(f"{source}: field '{loc or '<root>'}': {msg}") from e


def first_error(e: ValidationError) -> tuple[str, str]:
    """pydantic's first error as (dotted field path, message plus how many more errors there are)."""
    first = e.errors()[0]
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return ".".join(str(p) for p in first["loc"]), f"{first['msg']}{more}"


# ------------------------------------------------------------------------------------------- YAML config files
# One reader for every config file Stitch takes (training recipes, the data section `stitch data check` reads):
# `base:` files merged underneath, `key=value` overrides from the command line on top, and errors that name the
# file (or "command line") that set the offending field. It lives here, in the base layer, so the trainer and
# the data tools share it without importing each other.
class Provenance:
    """Dotted key path -> where its value was last set (a YAML file or "command line")."""

    def __init__(self) -> None:
        self.where: dict[str, str] = {}

    def mark(self, data: Any, source: str, prefix: str = "") -> None:
        if prefix:
            self.where[prefix] = source
        if isinstance(data, dict):
            for k, v in data.items():
                self.mark(v, source, f"{prefix}.{k}" if prefix else str(k))

    def lookup(self, loc: tuple, default: str) -> str:
        parts = [str(p) for p in loc]
        for n in range(len(parts), 0, -1):
            key = ".".join(parts[:n])
            if key in self.where:
                return self.where[key]
        return default


def merge_dicts(base: dict, over: dict) -> dict:
    """Deep merge: dicts merge key by key, anything else (lists included) is replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml_file(path: Path, error: type[Exception], missing: str) -> Any:
    """`path` parsed as YAML; a missing file, non-UTF-8 text or bad YAML raises `error` naming the file (the
    one mapping the config, blend and `data check` readers share; `missing` says what was not found)."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise error(f"{path}: {missing}") from e
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({e})") from e


def _read_yaml(path: Path, prov: Provenance, chain: tuple[Path, ...] = ()) -> dict:
    """Read `path` with its `base:` files merged underneath it."""
    path = path.resolve()
    if path in chain:
        raise StitchConfigError(f"{path}: 'base' includes itself ({' -> '.join(str(p) for p in chain)})")
    data = read_yaml_file(path, StitchConfigError, "no such config file")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise StitchConfigError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}")
    bases = data.pop("base", None)
    bases = [bases] if isinstance(bases, str) else bases or []
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise StitchConfigError(f"{path}: 'base' must be a config file name or a list of them")
    merged: dict = {}
    for base in bases:
        merged = merge_dicts(merged, _read_yaml(path.parent / base, prov, (*chain, path)))
    prov.mark(data, str(path))
    return merge_dicts(merged, data)


def read_config_yaml(path: str | Path) -> dict:
    """A config file as a dict, its `base:` files merged underneath it (unvalidated; for tools that read one
    section of a recipe, such as `stitch data check`)."""
    return _read_yaml(Path(path), Provenance())


def _field_annotation(schema: type[BaseModel], path: list[str]) -> Any:
    """The annotation of a dotted field path in `schema` (None if the path is not a known field)."""
    cls: Any = schema
    ann: Any = None
    for i, key in enumerate(path):
        model = _model_class(cls)
        if model is None:
            # Inside a dict/list field the rest of the path is data, not schema.
            return ann if i else None
        if key not in model.model_fields:
            raise KeyError(key)
        ann = model.model_fields[key].annotation
        cls = ann
    return ann


def _model_class(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        for arg in typing.get_args(ann):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return None


def _is_str_field(ann: Any) -> bool:
    if ann is str:
        return True
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        return args == [str]
    return False


def parse_config_overrides(pairs: list[str], schema: type[BaseModel]) -> dict:
    """`["optim.lr=2e-5", "model.random_init=true"]` -> a nested dict, keys checked against `schema`. Values are
    YAML (typed), except for string fields, which keep the text as written (so `output_dir=2024` stays a path)."""
    out: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise StitchConfigError(f"command line: '{pair}' is not key=value")
        path = key.split(".")
        try:
            ann = _field_annotation(schema, path)
        except KeyError as e:
            known = _known_keys(schema)
            hint = difflib.get_close_matches(key, known, n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise StitchConfigError(f"command line: unknown key '{key}'{extra}") from e
        if _is_str_field(ann) and raw not in ("null", "~"):
            value: Any = raw
        else:
            try:
                value = yaml.safe_load(raw) if raw != "" else None
            except yaml.YAMLError as e:
                raise StitchConfigError(f"command line: '{key}': value is not valid YAML ({e})") from e
            if isinstance(value, str) and _is_float_text(value):
                value = float(value)  # YAML 1.1 reads "1e-4" as a string
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise StitchConfigError(f"command line: '{key}' sets inside a value that is not a section")
        node[path[-1]] = value
    return out


def _is_float_text(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _known_keys(schema: type[BaseModel]) -> list[str]:
    keys: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            full = f"{prefix}{name}"
            keys.append(full)
            sub = _model_class(f.annotation)
            if sub is not None:
                walk(sub, full + ".")

    walk(schema, "")
    return keys


def load_yaml_config(schema: type[ModelT], path: str | Path | None, overrides: list[str] | None = None,
                     data: dict | None = None) -> ModelT:
    """Read a config file (with its bases), apply `key=value` overrides, and validate it as `schema`.

    `data` (a dict) may stand in for the file, for programmatic use and tests. Errors name the file that set
    the offending field (or "command line") and its dotted path.
    """
    prov = Provenance()
    if path is not None:
        merged = _read_yaml(Path(path), prov)
        default_source = str(Path(path))
    else:
        merged = dict(data or {})
        prov.mark(merged, "config")
        default_source = "config"
    if overrides:
        over = parse_config_overrides(overrides, schema)
        prov.mark(over, "command line")
        merged = merge_dicts(merged, over)
    try:
        return schema.model_validate(merged)
    except ValidationError as e:
        first = e.errors()[0]
        loc = tuple(first["loc"])
        field = ".".join(str(p) for p in loc) or "<root>"
        source = prov.lookup(loc, default_source)
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        msg = first["msg"]
        if first["type"] == "extra_forbidden":
            parent = _known_keys(schema)
            hint = difflib.get_close_matches(field, parent, n=1)
            msg = "unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else "")
        raise StitchConfigError(f"{source}: field '{field}': {msg}{more}") from e
