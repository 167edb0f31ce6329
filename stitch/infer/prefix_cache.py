"""A prefix KV cache: a prompt that starts like an earlier one reuses that prompt's keys and values.

A chat sends its whole conversation again every turn, so the second question about an image starts with the
first turn's prompt (system prompt, thousands of image tokens, the first question): recomputing them is most of
that turn's time to first token. The engine stores each prompt's KV after its prefill and, for a new prompt,
copies the longest stored prefix into its cache rows and prefills only the rest.

Keys are exact: a match counts token ids position by position, and image tokens (all one id) match only where
the tiles they stand for have equal content hashes (`tile_keys`, the image-embedding cache's keys), so no image
ids are needed and a different image never matches. Entries are bounded by bytes and evicted least recently
used first; storing a prompt drops the entries it extends (the new one serves every lookup they served), so a
long chat keeps one entry, not one per turn. Weights that change (training between calls, a LoRA adapter
switched off) empty the cache: see `Engine._prefix_fingerprint`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from stitch.infer.image_cache import tile_keys

__all__ = ["PrefixEntry", "PrefixKVCache", "request_tile_keys"]


Tiles = tuple[bytes, ...]


def request_tile_keys(pixel_values: torch.Tensor | None) -> Tiles:
    """Content hashes of a request's tiles, in the order their image tokens appear (see `tile_keys`)."""
    if pixel_values is None or pixel_values.numel() == 0:
        return ()
    return tile_keys(pixel_values)


@dataclass
class PrefixEntry:
    """One stored prompt: its ids [n] (CPU), its tiles' hashes, and `kv` [2, layers, kv_heads, n, head_dim]."""

    ids: torch.Tensor
    tiles: tuple[bytes, ...]
    kv: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def __len__(self) -> int:
        return int(self.ids.numel())


class PrefixKVCache:
    """Stored prompt KV, LRU by bytes. `lookup` finds the longest reusable prefix, `store` adds a prompt.

    `hits` / `misses` count prompts run with and without reused tokens, `reused_tokens` the tokens not
    recomputed (the engine counts them: a batch may use less of a match than `lookup` found)."""

    def __init__(self, max_bytes: int, image_token_id: int | None, tokens_per_tile: int, min_tokens: int = 16):
        if max_bytes < 0:
            raise ValueError(f"prefix cache max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.image_token_id = image_token_id
        self.tokens_per_tile = max(1, tokens_per_tile)
        self.min_tokens = min_tokens  # shorter prompts (or matches) are not worth a copy
        self._entries: OrderedDict[int, PrefixEntry] = OrderedDict()
        self._next_id = 0
        self.bytes = 0
        self.fingerprint: object = None
        self.hits = self.misses = self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        return {"prefix_hits": self.hits, "prefix_misses": self.misses, "prefix_reused_tokens": self.reused_tokens,
                "prefix_entries": len(self._entries), "prefix_bytes": self.bytes}

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def check(self, fingerprint: object) -> None:
        """Empty the cache when the weights it was computed with are not the current ones."""
        if fingerprint != self.fingerprint:
            self.clear()
            self.fingerprint = fingerprint

    def match(self, ids: torch.Tensor, tiles: Tiles | Callable[[], Tiles], entry: PrefixEntry) -> int:
        """How many leading tokens of (`ids`, `tiles`) equal `entry`'s, image content included. `tiles` may be
        a function giving them: it is called only when the ids match through an image token."""
        n = min(len(ids), len(entry))
        same = ids[:n] == entry.ids[:n]
        m = n if bool(same.all()) else int((~same).nonzero()[0])
        if self.image_token_id is None or m == 0:
            return m
        image_at = (ids[:m] == self.image_token_id).nonzero().flatten()
        if image_at.numel() == 0:
            return m
        needed = -(-image_at.numel() // self.tokens_per_tile)  # tiles with a token in the match
        if callable(tiles):
            tiles = tiles()
        for j in range(needed):
            if j >= len(tiles) or j >= len(entry.tiles) or tiles[j] != entry.tiles[j]:
                return int(image_at[j * self.tokens_per_tile])  # up to this tile's first token
        return m

    def lookup(self, ids: torch.Tensor, tiles: Tiles | Callable[[], Tiles], limit: int
               ) -> tuple[PrefixEntry, int] | None:
        """The entry sharing the longest prefix with the prompt and that length (at most `limit`), or None
        when no entry shares `min_tokens` or more. A hit becomes the most recently used entry."""
        best, best_len = None, 0
        for key, entry in reversed(self._entries.items()):  # most recent first: it wins ties
            if entry.ids[0] != ids[0]:
                continue
            m = min(self.match(ids, tiles, entry), limit)
            if m > best_len:
                best, best_len = key, m
        if best is None or best_len < self.min_tokens:
            return None
        self._entries.move_to_end(best)
        return self._entries[best], best_len

    def store(self, ids: torch.Tensor, tiles: tuple[bytes, ...], kv: torch.Tensor) -> bool:
        """Keep a prompt's KV (`kv` [2, layers, kv_heads, n, head_dim], owned by the cache from now on).
        Returns False when it is not kept: too short, larger than the budget, or already covered by an entry."""
        n = int(ids.numel())
        entry = PrefixEntry(ids.reshape(-1).cpu(), tiles, kv)
        if n < self.min_tokens or entry.nbytes > self.max_bytes:
            return False
        for key, old in list(self._entries.items()):
            shared = self.match(entry.ids, tiles, old)
            if shared == n and len(old) >= n:  # an entry already holds this whole prompt
                self._entries.move_to_end(key)
                return False
            if shared == len(old):  # the new prompt extends this entry: it replaces it
                self.bytes -= old.nbytes
                del self._entries[key]
        self._entries[self._next_id] = entry
        self._next_id += 1
        self.bytes += entry.nbytes
        while self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.nbytes
        return True
