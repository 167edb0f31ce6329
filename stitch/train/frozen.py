"""Frozen linear weights held in the autocast dtype while a run trains, their loaded values kept for saving.

Autocast casts a weight to bf16 on every use, and caches the cast only for weights that train. A frozen LLM
(stage 1, or the first layers in a last-k-layers SFT) is cast anew every forward: on a CPU that copy is as
costly as the matmuls themselves. Holding those weights in bf16 gives the same values (autocast's cast, done
once) without the copy; checkpoints are written from the original tensors, so a saved model is exactly the
loaded one plus what trained.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class FrozenLinearWeights:
    """Casts the frozen, unshared weights and biases of `model`'s `nn.Linear` layers to `dtype` in place.
    `original()` puts the loaded tensors back for a save; `restore()` puts them back for good."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        owners: dict[int, int] = {}
        for _, module in model.named_modules(remove_duplicate=False):
            for p in module.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        self.params: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []  # (param, original, cast)
        seen: set[int] = set()
        for module in model.modules():
            if not isinstance(module, nn.Linear):
                continue
            for p in (module.weight, module.bias):
                # a tied weight (the LM head sharing the embedding) is also read outside autocast's matmuls
                if p is None or p.requires_grad or p.dtype != torch.float32 or owners[id(p)] > 1 or id(p) in seen:
                    continue
                seen.add(id(p))
                self.params.append((p, p.data, p.data.to(dtype)))
        self._use(cast=True)

    def _use(self, cast: bool) -> None:
        for p, original, converted in self.params:
            p.data = converted if cast else original

    @contextlib.contextmanager
    def original(self) -> Iterator[None]:
        """The loaded fp32 tensors in place for the duration (saving a checkpoint)."""
        self._use(cast=False)
        try:
            yield
        finally:
            self._use(cast=True)

    def restore(self) -> None:
        self._use(cast=False)
        self.params = []
