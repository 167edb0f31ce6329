"""Parallelism applied to a built model, never written into it (see docs/parallel.md).

`parallelize(model, parallel_cfg)` returns a `ParallelModel`. The layout rules it shares with `stitch reshard`
live below both, in `stitch.layout` (re-exported here as `Layout`). Attributes are imported lazily so that
`import stitch.parallel` stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["parallelize", "ParallelModel", "StepOutput", "Layout", "split_batch", "save_dcp", "load_dcp"]

_WHERE = {
    "parallelize": "stitch.parallel.runtime",
    "ParallelModel": "stitch.parallel.runtime",
    "StepOutput": "stitch.parallel.runtime",
    "split_batch": "stitch.parallel.runtime",
    "Layout": "stitch.layout",
    "save_dcp": "stitch.parallel.dcp",
    "load_dcp": "stitch.parallel.dcp",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'stitch.parallel' has no attribute '{name}'")
