"""Stitch: build vision-language models the NVLM way.

`stitch.load(path)` opens a checkpoint as `(model, processor)`; `stitch.generate(...)` answers a prompt. Both live
in `stitch.api` and are imported on first use (a module-level `__getattr__`, PEP 562), so `import stitch` stays
cheap: no torch, no transformers.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load", "generate"]

_API = ("load", "generate")


def __getattr__(name: str) -> Any:
    """`stitch.load` / `stitch.generate`: imported from `stitch.api` the first time they are asked for."""
    if name in _API:
        from stitch import api

        return getattr(api, name)
    raise AttributeError(f"module 'stitch' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
