"""Open a checkpoint for use: the model in eval mode and the processor that feeds it.

This is `stitch.load`'s implementation. It pairs `stitch.checkpoint.store.load_model` with a
`stitch.data.processor.Processor`; checkpoints and data sit side by side in one layer and may not import each
other, so the pairing lives here, where `stitch generate`, `stitch serve` and `stitch eval` (which may import
inference) use it directly and `stitch.api` re-exports it as `stitch.load`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from stitch.checkpoint.io import LORA_FILE
from stitch.checkpoint.store import is_stitch_checkpoint, load_model
from stitch.checkpoint.tokenizer import load_tokenizer
from stitch.data.processor import Processor
from stitch.models.lora import merge_lora as merge_adapters
from stitch.models.vlm import VLM

__all__ = ["load_pretrained"]


def load_pretrained(path: str | Path, device="cpu", dtype: torch.dtype | None = None,
                    merge_lora: bool = False) -> tuple[VLM, Processor]:
    """(model in eval mode, processor) of a Stitch checkpoint folder, a LoRA checkpoint or an HF VLM folder.

    `merge_lora` folds a LoRA checkpoint's adapters into the base weights (plain linear layers, as fast as the
    base); otherwise they stay separate layers."""
    path = Path(path)
    model = load_model(path, device=device, dtype=dtype)
    if merge_lora:
        model = merge_adapters(model)
    if is_stitch_checkpoint(path) or (path / LORA_FILE).is_file():
        processor = Processor.from_pretrained(path)
    else:  # an HF InternVL / LLaVA folder: its tokenizer, and the config its weights were read with
        tokenizer = load_tokenizer(path)
        model.config.image_token = tokenizer.convert_ids_to_tokens(model.config.image_token_id)
        processor = Processor(tokenizer, model.config)
    return model.eval(), processor
