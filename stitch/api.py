"""The Python API: `stitch.load` and `stitch.generate`.

`stitch/__init__.py` exposes these two lazily (PEP 562), so `import stitch` stays cheap and a script pays for
torch and transformers only when it first calls one. They sit above every library layer (checkpoints, data,
inference) and below the command line; the work itself is done in `stitch.infer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stitch.infer.generate import generate as _generate
from stitch.infer.pretrained import load_pretrained

__all__ = ["load", "generate"]


def load(path: str | Path, device="cpu", dtype=None, **kwargs: Any):
    """Open a Stitch checkpoint folder (or an HF VLM folder) as `(model, processor)`, the model in eval mode.

    `merge_lora=True` folds a LoRA checkpoint's adapters into the base weights; see
    `stitch.infer.pretrained.load_pretrained`."""
    return load_pretrained(path, device=device, dtype=dtype, **kwargs)


def generate(model, processor, images, prompt, **kwargs: Any) -> str:
    """Answer `prompt` about `images` (paths or PIL images) and, with `videos=`, videos (`num_frames=` per
    video); see `stitch.infer.generate.generate`."""
    return _generate(model, processor, images, prompt, **kwargs)
