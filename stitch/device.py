"""The `--device` flag of the commands that run a model (generate, serve, eval), checked before anything loads."""

from __future__ import annotations

import torch

from stitch.errors import StitchError


def resolve_device(device: str | None) -> torch.device:
    """`--device` as a torch.device (default: cuda when there is one), checked before anything loads."""
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError as e:
        raise StitchError(f"--device {name!r}: not a device ({str(e).splitlines()[0]})") from e
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise StitchError(f"--device {name!r}: this torch has no CUDA device (use --device cpu)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise StitchError(f"--device {name!r}: there are {torch.cuda.device_count()} CUDA devices")
    elif resolved.type not in ("cpu", "mps"):
        raise StitchError(f"--device {name!r}: Stitch runs on cpu or cuda")
    return resolved
