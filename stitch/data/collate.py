"""Samples and batches: one rendered sample (`Sample`), and `collate()` into the batch layout of CONTRACTS.md.

Two layouts, one function:
- padded (`pack=False`): `input_ids`/`labels`/`attention_mask`/`position_ids` [B, T_max], right-padded with the
  tokenizer's pad id (labels -100, attention 0 under padding);
- packed (`pack=True`): the samples concatenated into one row [1, sum T]; `position_ids` restart at 0 for each
  sample, `cu_seqlens` [n+1] (int32) marks the boundaries so attention never crosses samples, and the first
  label of every sample is -100 so no sample is trained to predict its first token from the previous sample.
Both carry `pixel_values` [total_tiles, 3, H, W] in order of appearance (None when text-only), `num_tiles`
per image, and `num_label_tokens` (labels != -100; labels are unshifted, the model shifts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from stitch.data.chat import IGNORE_INDEX

__all__ = ["Sample", "collate", "IGNORE_INDEX"]


@dataclass
class Sample:
    """One rendered sample: ids [T], labels [T] (None for a generation prompt), its tiles, and provenance."""

    input_ids: torch.Tensor
    labels: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None  # [tiles, 3, H, W]
    num_tiles: list[int] = field(default_factory=list)  # per image, thumbnail included
    dataset: str = ""
    key: str = ""  # stable identity of the source record (dataset/index or file:line)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_label_tokens(self) -> int:
        return 0 if self.labels is None else int((self.labels != IGNORE_INDEX).sum())


def _pixels(samples: Sequence[Sample]) -> torch.Tensor | None:
    tiles = [s.pixel_values for s in samples if s.pixel_values is not None and s.pixel_values.shape[0]]
    if not tiles:
        return None
    if len(tiles) == 1:
        return tiles[0]
    # numpy's single-threaded copy: torch.cat's intra-op threads only contend in data workers
    return torch.from_numpy(np.concatenate([t.numpy() for t in tiles], axis=0))


def collate(
    samples: Sequence[Sample],
    pack: bool = False,
    max_tokens: int | None = None,
    pad_token_id: int = 0,
    pad_to_multiple_of: int | None = None,
) -> dict[str, Any]:
    """Batch `samples` padded ([B, T_max]) or packed ([1, sum T]); see the module docstring for the keys.

    `max_tokens` bounds a packed row (ValueError if the samples exceed it; group them with
    `stitch.data.packing.pack_greedy` first). `pad_to_multiple_of` pads T (both layouts) so shapes repeat,
    which helps torch.compile; in a packed row the padding is a last segment of its own with no loss.
    """
    if not samples:
        raise ValueError("collate: no samples")
    has_labels = all(s.labels is not None for s in samples)
    batch: dict[str, Any] = {}
    if pack:
        total = sum(len(s) for s in samples)
        if max_tokens is not None and total > max_tokens:
            raise ValueError(f"collate: {total} tokens do not fit a packed row of {max_tokens}")
        ids = torch.cat([s.input_ids for s in samples])
        labels = torch.cat([_first_masked(s.labels) for s in samples]) if has_labels else None
        lengths = [len(s) for s in samples]
        positions = torch.cat([torch.arange(n, dtype=torch.long) for n in lengths])
        pad = _pad_amount(total, pad_to_multiple_of)
        if pad:
            ids = torch.cat([ids, ids.new_full((pad,), pad_token_id)])
            positions = torch.cat([positions, torch.arange(pad, dtype=torch.long)])
            if labels is not None:
                labels = torch.cat([labels, labels.new_full((pad,), IGNORE_INDEX)])
            lengths.append(pad)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
        batch["input_ids"] = ids[None]
        batch["position_ids"] = positions[None]
        batch["cu_seqlens"] = cu
        batch["max_seqlen"] = max(lengths)
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        if labels is not None:
            batch["labels"] = labels[None]
    else:
        width = max(len(s) for s in samples)
        width += _pad_amount(width, pad_to_multiple_of)
        B = len(samples)
        ids = torch.full((B, width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((B, width), dtype=torch.long)
        positions = torch.zeros((B, width), dtype=torch.long)
        labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long) if has_labels else None
        for b, s in enumerate(samples):
            n = len(s)
            ids[b, :n] = s.input_ids
            mask[b, :n] = 1
            positions[b, :n] = torch.arange(n)
            if labels is not None:
                labels[b, :n] = s.labels
        batch.update(input_ids=ids, attention_mask=mask, position_ids=positions)
        if labels is not None:
            batch["labels"] = labels
    batch["pixel_values"] = _pixels(samples)
    batch["num_tiles"] = [n for s in samples for n in s.num_tiles]
    if "labels" in batch:
        batch["num_label_tokens"] = torch.tensor(int((batch["labels"] != IGNORE_INDEX).sum()))
    return batch


def _first_masked(labels: torch.Tensor) -> torch.Tensor:
    out = labels.clone()
    if out.numel():
        out[0] = IGNORE_INDEX
    return out


def _pad_amount(n: int, multiple: int | None) -> int:
    return (-n) % multiple if multiple else 0
