"""An image-embedding cache: questions (or chat turns) that share an image run the vision encoder once.

Benchmarks ask several questions about each image (easy-vqa about 10, VQAv2 about 5), and the vision encoder
plus projector is a large part of answering a short question. The cache wraps the model's `image_embeddings`
(pixel tiles -> projected embeddings) and keys each tile by a hash of its pixel values, so it needs no image ids
and is correct whatever the reader or the processor does: equal pixels give equal embeddings. It is bounded by
bytes and evicts the least recently used tiles; a benchmark's questions come grouped by image, so a small budget
already catches nearly every repeat. A chat (`stitch demo`) sends its whole conversation again every turn, so
its images come from the cache from the second turn on.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections import OrderedDict
from typing import Any

import torch

__all__ = ["ImageEmbeddingCache", "tile_key", "tile_keys"]

_COEFFICIENTS: dict[tuple, torch.Tensor] = {}
_SEED = int.from_bytes(os.urandom(8), "little") >> 1  # secret per process: hashes cannot be steered into collisions


def tile_key(tile: torch.Tensor) -> bytes:
    """A content hash of one tile (pixels, shape and dtype): equal keys mean equal embeddings."""
    data = tile.detach().contiguous().cpu()
    digest = hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=20)
    digest.update(f"{tuple(data.shape)}{data.dtype}".encode())
    return digest.digest()


def tile_keys(pixel_values: torch.Tensor) -> tuple[bytes, ...]:
    """`tile_key` of every tile [tiles, 3, H, W]; tiles already on a GPU are hashed there (`_device_keys`),
    sparing a copy of the pixels to the host and a blake2b pass over them (~10 ms for 5 tiles)."""
    if pixel_values.is_cuda:
        return _device_keys(pixel_values)
    return tuple(tile_key(t) for t in pixel_values)


def _device_keys(pixel_values: torch.Tensor) -> tuple[bytes, ...]:
    """Two random linear hashes (mod 2^64, odd coefficients drawn from a per-process secret seed) of each tile's
    bit pattern: 128 bits per tile, one small copy to the host for the whole batch of tiles."""
    tiles = pixel_values.detach().contiguous()
    flat = tiles.reshape(tiles.shape[0], -1)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    bits = flat.view(ints).long()
    key = (bits.shape[1], bits.device)
    coef = _COEFFICIENTS.get(key)
    if coef is None:
        gen = torch.Generator().manual_seed(_SEED)
        coef = (torch.randint(-(2**62), 2**62, (2, bits.shape[1]), generator=gen) * 2 + 1).to(bits.device)
        _COEFFICIENTS[key] = coef
    sums = torch.stack([(bits * c).sum(1) for c in coef], 1).tolist()
    tag = f"{tuple(tiles.shape[1:])}{tiles.dtype}".encode()
    return tuple(struct.pack("<qq", a, b) + tag for a, b in sums)


class ImageEmbeddingCache:
    """Memoises `model.image_embeddings` per tile. `install()` replaces the method on this model instance only;
    `remove()` puts it back. `hits` / `misses` count tiles."""

    def __init__(self, model: Any, max_bytes: int = 1 << 30):
        self.model = model
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._original = None

    @staticmethod
    def supports(model: Any) -> bool:
        """Stitch VLMs have `image_embeddings` and `config.tokens_per_tile`; other models run uncached."""
        return callable(getattr(model, "image_embeddings", None)) and hasattr(
            getattr(model, "config", None), "tokens_per_tile"
        )

    def install(self) -> ImageEmbeddingCache:
        self._original = self.model.image_embeddings
        self.model.image_embeddings = self._embeddings
        return self

    def remove(self) -> None:
        if self._original is not None:
            self.model.image_embeddings = self._original
            self._original = None

    def stats(self) -> dict[str, int]:
        return {"tile_hits": self.hits, "tile_misses": self.misses, "cached_tiles": len(self._entries)}

    _key = staticmethod(tile_key)

    def _embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [tiles, 3, H, W] -> [tiles * tokens_per_tile, D], computing only unseen tiles."""
        keys = list(tile_keys(pixel_values))
        missing = [i for i, k in enumerate(keys) if k not in self._entries]
        fresh: dict[bytes, torch.Tensor] = {}
        if missing:
            # Unique unseen tiles only (one image may be asked twice in the same batch).
            unique = list(dict.fromkeys(keys[i] for i in missing))
            first = [keys.index(k) for k in unique]
            out = self._original(pixel_values[first])  # [n * tokens, D]
            for k, emb in zip(unique, out.unflatten(0, (len(unique), -1))):  # [tokens, D] each
                fresh[k] = emb
                self._store(k, emb)
        self.misses += len(fresh)
        self.hits += len(keys) - len(fresh)
        parts = []
        for k in keys:
            emb = fresh.get(k)
            if emb is None:
                emb = self._entries[k]
                self._entries.move_to_end(k)
            parts.append(emb)
        return torch.cat(parts, dim=0)

    def _store(self, key: bytes, emb: torch.Tensor) -> None:
        size = emb.numel() * emb.element_size()
        if size > self.max_bytes:
            return
        self._entries[key] = emb.detach()
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()
