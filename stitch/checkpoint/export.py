"""`stitch export-hf` in Python: a Stitch checkpoint (LoRA adapters merged) as an HF VLM folder that
`transformers`, and so vLLM, loads. Outside the command module so tests and scripts call it directly."""

from __future__ import annotations

import json
from pathlib import Path

from stitch.checkpoint.hf import vlm_config_to_hf, vlm_state_to_hf
from stitch.checkpoint.io import atomic_dir, save_tensors
from stitch.checkpoint.store import load_model, model_state
from stitch.checkpoint.tokenizer import load_tokenizer
from stitch.models.lora import merge_lora

__all__ = ["export_to_hf"]


def export_to_hf(checkpoint: str | Path, fmt: str, out: str | Path) -> Path:
    """Write `checkpoint` as an HF `fmt` folder; LoRA adapters are merged into the base weights first."""
    model = merge_lora(load_model(checkpoint))
    cfg = model.config
    hf_cfg = vlm_config_to_hf(cfg, fmt)
    state = vlm_state_to_hf(model_state(model), cfg, fmt)
    tok = load_tokenizer(checkpoint)
    with atomic_dir(out, inputs=[checkpoint]) as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        save_tensors(state, Path(tmp))
        tok.save_pretrained(str(tmp))
    return Path(out)
