"""`stitch build` in Python: a vision encoder and an LLM (presets, HF folders or GGUF files) stitched into a new
checkpoint with a fresh projector.

Kept out of `stitch.checkpoint.commands` (the command-line wrappers) so the quickstart, tests and benchmarks
build checkpoints without importing a CLI module.
"""

from __future__ import annotations

from pathlib import Path

import torch

from stitch.checkpoint.gguf import load_gguf_llm
from stitch.checkpoint.hf import load_hf_llm
from stitch.checkpoint.hf_vision import find_vision_prefix, vision_config_from_hf, vision_state_from_hf
from stitch.checkpoint.io import TensorSource, atomic_dir, read_json, save_tensors
from stitch.checkpoint.tokenizer import default_tokenizer_source, ensure_image_token, load_tokenizer
from stitch.checkpoint.weights import build_model, load_weights, model_state
from stitch.config import LLMConfig, VisionConfig, VLMConfig, validate
from stitch.errors import CheckpointError
from stitch.models.presets import LLM_PRESETS, llm_preset, vision_preset
from stitch.models.vision import VISION_PRESETS

__all__ = ["stitch_build", "resolve_llm", "resolve_vision"]


def resolve_llm(src: str) -> tuple[LLMConfig, dict | None, Path | None]:
    """A preset name, an HF causal-LM folder or a GGUF file -> (config, state or None, tokenizer source)."""
    if src in LLM_PRESETS:
        return llm_preset(src), None, None
    path = Path(src)
    if path.suffix == ".gguf":
        cfg, state = load_gguf_llm(path)
        return cfg, state, path
    if path.is_dir():
        cfg, state = load_hf_llm(path)
        return cfg, state, path
    raise CheckpointError(f"{src}: not an LLM preset ({', '.join(sorted(LLM_PRESETS))}), HF folder or .gguf file")


def resolve_vision(src: str) -> tuple[VisionConfig, dict | None]:
    """A preset name or an HF vision-model folder -> (config, Stitch-named state or None)."""
    if src in VISION_PRESETS:
        return vision_preset(src), None
    path = Path(src)
    if not path.is_dir():
        raise CheckpointError(f"{src}: not a vision preset ({', '.join(sorted(VISION_PRESETS))}) or HF folder")
    cfg = vision_config_from_hf(read_json(path / "config.json"))
    source = TensorSource(path)
    prefix = find_vision_prefix(list(source), cfg)
    tensors = {n: source[n] for n in source if n.startswith(prefix)}
    return cfg, vision_state_from_hf(tensors, cfg, prefix)


def _resize_vocab(state: dict, cfg: LLMConfig, new_size: int) -> None:
    """Grow embeddings (and an untied head) to `new_size` rows, new rows at the mean embedding."""
    for name in ["embed_tokens.weight"] + ([] if cfg.tie_word_embeddings else ["lm_head.weight"]):
        old = state[name]
        extra = old.float().mean(0, keepdim=True).expand(new_size - old.shape[0], -1).to(old.dtype)
        state[name] = torch.cat([old, extra])
    cfg.vocab_size = new_size


def stitch_build(
    vision: str, llm: str, out: str | Path, projector: str = "mlp", projector_hidden: int | None = None,
    tile_tags: str = "nvlm", image_wrapper: str | None = None, max_tiles: int = 6, use_thumbnail: bool = True,
    tokenizer: str | None = None, dtype: torch.dtype = torch.float32, seed: int = 0, downsample_ratio: float = 0.5,
    downsample: str = "pixel_shuffle",
) -> Path:
    """Python form of `stitch build`; returns the checkpoint folder."""
    torch.manual_seed(seed)
    vision_cfg, vision_state = resolve_vision(vision)
    llm_cfg, llm_state, tok_src = resolve_llm(llm)
    tok = load_tokenizer(tokenizer or tok_src or default_tokenizer_source())
    cfg = validate(VLMConfig, dict(
        vision=vision_cfg.model_dump(), llm=llm_cfg.model_dump(),
        projector=dict(kind=projector, hidden_size=projector_hidden, downsample_ratio=downsample_ratio,
                       downsample=downsample),
        tile_tags=tile_tags, image_wrapper=image_wrapper or ("nvlm" if tile_tags == "nvlm" else "internvl"),
        max_tiles=max_tiles, use_thumbnail=use_thumbnail,
    ), source="stitch build")
    cfg.image_token_id = ensure_image_token(tok, cfg.image_token)
    if len(tok) > cfg.llm.vocab_size:
        padded = -(-len(tok) // 64) * 64  # a multiple of 64 keeps the output matmul on fast GPU kernels
        if llm_state is None:
            cfg.llm.vocab_size = padded
        else:
            _resize_vocab(llm_state, cfg.llm, padded)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(cfg.llm, attr) is None and getattr(tok, attr, None) is not None:
            setattr(cfg.llm, attr, getattr(tok, attr))
    model = build_model(cfg, dtype=dtype)
    # Pretrained parts replace their random init; the projector keeps its fresh one.
    state = model_state(model)
    if vision_state is not None:
        state.update({f"vision.{k}": v for k, v in vision_state.items()})
    if llm_state is not None:
        state.update({f"llm.{k}": v for k, v in llm_state.items() if k in model.llm.state_dict()})
    model = load_weights(build_model(cfg, device="meta"), state, f"{vision} + {llm}", dtype=dtype)
    sources = [p for p in (vision, llm, tokenizer) if p is not None and Path(p).exists()]
    with atomic_dir(out, inputs=sources) as tmp:
        cfg.save(tmp / "config.json")
        save_tensors(model_state(model), tmp)
        tok.save_pretrained(str(tmp))
    return Path(out)
