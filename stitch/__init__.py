"""Stitch: build vision-language models the NVLM way.

`stitch.load(path)` opens a checkpoint as `(model, processor)`; `stitch.generate(...)` answers a prompt.
Both import lazily so `import stitch` stays cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"


def load(path, device="cpu", dtype=None, **kwargs):
    """Open a Stitch checkpoint folder (or an HF VLM folder) as `(model, processor)`."""
    from stitch.checkpoint.store import load as _load

    return _load(path, device=device, dtype=dtype, **kwargs)


def generate(model, processor, images, prompt, **kwargs) -> str:
    """Answer `prompt` about `images` (paths or PIL images); see `stitch.infer.generate.generate`."""
    from stitch.infer.generate import generate as _generate

    return _generate(model, processor, images, prompt, **kwargs)
