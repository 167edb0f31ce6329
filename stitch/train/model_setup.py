"""The model a training run starts from, and how its layers run: load or random-init, dropout, compile and
activation checkpointing.

`build_training_model` loads the checkpoint a run starts (or resumes) from, or builds a preset at random with
`init_for_training` and, when one is at hand, a tokenizer whose image token the model's config then names.
`configure_layers` applies per-block activation checkpointing and torch.compile from outside the model, as
torchtitan does; `set_dropout` changes dropout after the build.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from stitch.checkpoint.store import build_model, load_model
from stitch.checkpoint.tokenizer import default_tokenizer_source, ensure_image_token, load_tokenizer
from stitch.config import VLMConfig
from stitch.errors import StitchError
from stitch.models.layers import set_any_shape_attention
from stitch.models.lora import merge_lora
from stitch.models.presets import vlm_preset
from stitch.models.vlm import VLM
from stitch.train.config import ModelSource, TrainConfig

__all__ = ["build_training_model", "tokenizer_for_random_init", "init_for_training", "configure_layers",
           "batch_shapes_vary", "set_dropout"]


def tokenizer_for_random_init(source: str | None, vlm_cfg: VLMConfig):
    """The tokenizer for a randomly initialised model (`model.tokenizer`, else the default one; None when there
    is none at hand), with the image token added; `vlm_cfg` takes its image token id, vocabulary size and special
    token ids from it."""
    src = source
    if src is None:
        try:
            src = default_tokenizer_source()
        except StitchError:
            return None
    tok = load_tokenizer(src)
    vlm_cfg.image_token_id = ensure_image_token(tok, vlm_cfg.image_token)
    if len(tok) > vlm_cfg.llm.vocab_size:
        vlm_cfg.llm.vocab_size = len(tok)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(vlm_cfg.llm, attr) is None and getattr(tok, attr, None) is not None:
            setattr(vlm_cfg.llm, attr, getattr(tok, attr))
    return tok


def build_training_model(src: ModelSource, device: torch.device, resume_from: Path | None) -> tuple[VLM, Any]:
    """(model in fp32 on the device, tokenizer or None) from a checkpoint, or from a preset at random."""
    if resume_from is not None or not src.random_init:
        path = resume_from or Path(src.checkpoint)
        model = load_model(path, device=device, dtype=torch.float32)
        if resume_from is None:
            merge_lora(model)  # a run that starts from a LoRA checkpoint starts from its merged weights
        has_tokenizer = any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
        return model, load_tokenizer(path) if has_tokenizer else None
    vlm_cfg = vlm_preset(src.preset)
    tok = tokenizer_for_random_init(src.tokenizer, vlm_cfg)
    if tok is None:
        # No tokenizer at hand: synthetic data only needs an id for the image token.
        vlm_cfg.image_token_id = vlm_cfg.llm.vocab_size - 1
    model = build_model(vlm_cfg, device=device, dtype=torch.float32)
    init_for_training(model)
    return model, tok


@torch.no_grad()
def init_for_training(model: VLM, std: float = 0.02) -> None:
    """Random init that trains: N(0, std) for the LLM's and projector's matrices and embeddings, zero biases.

    PyTorch's defaults (N(0, 1) embeddings, which a tied LM head reuses) start a large-vocabulary LLM at a
    loss in the hundreds; this is the HF/Megatron-style init (`initializer_range` 0.02). The ViT initialises
    itself (`VisionEncoder.init_weights`). Only for `model.random_init`; real runs load pretrained weights.
    """
    for part in (model.llm, model.projector):
        for m in part.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)


def configure_layers(model: VLM, activation_checkpointing: bool | str, compile_layers: bool = False,
                     dynamic_shapes: bool = False, shapes_vary: bool | None = None) -> None:
    """Per-block activation checkpointing and torch.compile, applied from outside the model as torchtitan
    does: every ViT and LLM block is compiled on its own (its graph is reused by all layers of the same shape)
    and, with checkpointing, recomputed in backward.

    `activation_checkpointing`: True (both parts), "vision" or "llm" (one part), False. `dynamic_shapes`:
    packed rows, whose length and tile count change every micro-batch, so the blocks are compiled for symbolic
    sizes from the first call instead of once per new size (each a compile of seconds, and past dynamo's
    recompile limit a silent fall back to eager). `shapes_vary` (default: `dynamic_shapes`): batch shapes change
    from step to step, so attention keeps to kernels without per-shape plans (cuDNN's cost ~140 ms per new
    shape: in a 15-step packed run on an H200, 24.5k -> 25.6k tokens/s without them)."""
    model.llm.gradient_checkpointing = activation_checkpointing in (True, "llm")
    model.vision.gradient_checkpointing = activation_checkpointing in (True, "vision")
    set_any_shape_attention(model, dynamic_shapes if shapes_vary is None else shapes_vary)
    if compile_layers:
        # All layers of a part share one code object, so its variants (first ViT layer's fp32 input, size
        # ranges inductor specialises on) add up; dynamo's default limit of 8 is meant for one function.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        options = _dynamic_compile_options() if dynamic_shapes else None
        for layer in (*model.llm.layers, *model.vision.layers):
            layer.compile(dynamic=True if dynamic_shapes else None, options=options)


def batch_shapes_vary(cfg: TrainConfig) -> bool:
    """Whether this run's micro-batches change shape from step to step: all but unpacked synthetic samples of one
    length (their tiles per sample are fixed too). Real data varies in length and tiles, padded or packed."""
    synthetic = cfg.synthetic
    return cfg.data.pack or not (synthetic.enabled and synthetic.min_tokens == synthetic.max_tokens)


def _dynamic_compile_options() -> dict[str, Any]:
    """Inductor settings for blocks compiled with symbolic sizes.

    Inductor's mix-order reduction (it fuses RMSNorm's backward reductions) decides from the sizes it first
    sees and guards on them (rows >= 4096, rows x width >= 5M), so packed rows crossing those lines recompiled
    every block mid-run (7-10 s each, measured on an H200); without it one graph serves every size. Passed only
    where this torch has the option (an unknown one is an error)."""
    import torch._inductor.config as inductor

    return {"triton.mix_order_reduction": False} if hasattr(inductor.triton, "mix_order_reduction") else {}


def set_dropout(model: VLM, llm: float | None, vision: float | None) -> None:
    """Change dropout after the model is built (modules copy the config's value at construction)."""
    if llm is not None:
        model.config.llm.dropout = llm
        model.llm.config.dropout = llm
        for m in model.llm.modules():
            if isinstance(m, nn.Dropout):
                m.p = llm
            elif hasattr(m, "dropout") and isinstance(m.dropout, float):
                m.dropout = llm
    if vision is not None:
        model.config.vision.dropout = vision
        for m in model.vision.modules():
            if hasattr(m, "dropout") and isinstance(m.dropout, float):
                m.dropout = vision

