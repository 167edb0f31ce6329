"""What makes an evaluation reproducible, recorded in every summary: the checkpoint's content hash (a folder
renamed or copied keeps it; retrained weights change it), beside the task version, prompt, metric rules and
decoding settings that the runner adds."""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["checkpoint_fingerprint"]

# Weights and the files that change what the model answers; logs and optimizer states are left out.
_MODEL_FILES = {".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".txt", ".gguf", ".yaml", ".jinja"}
_SKIPPED_DIRS = {"optimizer", "optim", "logs", "tensorboard", "__pycache__"}


def checkpoint_fingerprint(ckpt: str | Path) -> str | None:
    """SHA-256 over the model files of a checkpoint folder (relative names and bytes, in name order), or of a
    single file; None when `ckpt` is not on disk (a hub name or a stand-in)."""
    root = Path(ckpt).expanduser()
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(
            p for p in root.rglob("*")
            if p.is_file() and p.suffix in _MODEL_FILES and not _SKIPPED_DIRS & set(p.relative_to(root).parts)
        )  # fmt: skip
    else:
        return None
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(root) if root.is_dir() else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
