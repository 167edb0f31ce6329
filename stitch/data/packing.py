"""Greedy sequence packing: consecutive samples share one row of `max_tokens` until the next doesn't fit.

Packing removes padding waste (principle 3); the row keeps per-sample boundaries (`cu_seqlens`, restarting
`position_ids`; see `stitch.data.collate`) so attention never crosses samples and each sample's logits equal
those of its own forward pass.

Why next-fit in stream order rather than a sorted knapsack over a buffer: order is what makes the stream
resumable with nothing but counters (a row is emitted exactly when the next sample does not fit, so the state
after a row is the state after its last sample, and the sample that didn't fit is drawn again on resume).
`pack_greedy` (first-fit decreasing over a list) is there for offline use, where order does not matter.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

from stitch.data.collate import Sample

__all__ = ["pack_greedy", "pack_greedy_stream", "packing_efficiency"]

T = TypeVar("T")


def pack_greedy_stream(
    stream: Iterable[tuple[Sample, Any]], max_tokens: int
) -> Iterator[tuple[list[Sample], Any]]:
    """Group a stream of (sample, state-after-it) into rows of at most `max_tokens` tokens, in order.

    Yields (samples, state after the row's last sample). A sample longer than `max_tokens` is an error (the
    processor truncates to `seq_length` <= `max_tokens`, so it means a config mismatch).
    """
    row: list[Sample] = []
    used, last_state = 0, None
    for sample, state in stream:
        n = len(sample)
        if n > max_tokens:
            raise ValueError(f"sample {sample.key} has {n} tokens, more than a packed row ({max_tokens})")
        if row and used + n > max_tokens:
            yield row, last_state
            row, used = [], 0
        row.append(sample)
        used += n
        last_state = state
    if row:
        yield row, last_state


def pack_greedy(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """First-fit decreasing: indices of `lengths` grouped into bins of at most `max_tokens` (offline use)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        if n > max_tokens:
            raise ValueError(f"item {i} has {n} tokens, more than a bin ({max_tokens})")
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_tokens - n)
    return [sorted(b) for b in bins]


def packing_efficiency(rows: Iterable[Sequence[int]], max_tokens: int) -> float:
    """Fraction of row capacity filled with real tokens, for rows given as lists of sample lengths."""
    rows = list(rows)
    return sum(sum(r) for r in rows) / (max_tokens * len(rows)) if rows else 0.0
