"""Images to normalised tiles: safe loading, dynamic tiling (InternVL/NVLM rule), per-encoder normalisation.

Dynamic tiling (the reference's rule): candidate grids (cols, rows) with 1 <= cols*rows <= max_tiles, tried in
order of tile count; the grid whose aspect ratio cols/rows is closest to the image's wins; on an exact tie a
later (larger) grid replaces the current one only when the image's area exceeds half the grid's pixel area
(0.5 * size^2 * cols * rows), so a large image gets more tiles and a small one is not blown up. The image is
resized (bicubic) to (size*cols, size*rows) and cut into tiles row-major; with more than one tile and
`use_thumbnail`, the whole image resized to size x size is appended.

Choosing the grid needs only the image size, so `grid_for()` is called first (the tile budget step-down in
`stitch.data.chat` tries budgets without touching pixels), and pixels are processed once. Cutting is one numpy
reshape/transpose of the resized image and normalisation two in-place array ops: no per-pixel or per-tile
Python.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from stitch.data.skips import SampleError

__all__ = [
    "ImageInput",
    "candidate_grids",
    "choose_grid",
    "tile_count",
    "tile_budgets",
    "load_image",
    "image_size_of",
    "tile_image",
    "ImageProcessor",
]

ImageInput = str | Path | bytes | Image.Image


@lru_cache(maxsize=64)
def candidate_grids(max_tiles: int, min_tiles: int = 1) -> tuple[tuple[int, int], ...]:
    """All (cols, rows) with min_tiles <= cols*rows <= max_tiles, by tile count (then cols) ascending."""
    grids = [
        (c, r)
        for c in range(1, max_tiles + 1)
        for r in range(1, max_tiles + 1)
        if min_tiles <= c * r <= max_tiles
    ]
    return tuple(sorted(grids, key=lambda g: (g[0] * g[1], g[0])))


def choose_grid(width: int, height: int, image_size: int, max_tiles: int, min_tiles: int = 1) -> tuple[int, int]:
    """The tiling grid (cols, rows) for an image of `width` x `height` (see module docstring for the rule)."""
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(max_tiles, min_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def tile_count(grid: tuple[int, int], use_thumbnail: bool) -> int:
    """Tiles an image contributes: the grid's, plus one thumbnail when the grid has more than one tile."""
    n = grid[0] * grid[1]
    return n + 1 if use_thumbnail and n > 1 else n


def tile_budgets(max_tiles: int, steps: Sequence[int] = (12, 8, 6, 4, 2, 1)) -> list[int]:
    """Tile budgets to try, largest first, when image tokens would overflow the sequence: `max_tiles`, then
    the steps below it (12 -> 8 -> 6 -> 4 -> 2 -> 1 in the reference); always ends at 1."""
    out = [max_tiles] + [s for s in sorted(set(steps), reverse=True) if s < max_tiles]
    return out if out[-1] == 1 else [*out, 1]


def _open(src: ImageInput, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and check the pixel count before any decoding happens."""
    if isinstance(src, Image.Image):
        img = src
    else:
        name = "<bytes>" if isinstance(src, bytes) else str(src)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
        except FileNotFoundError as e:
            raise SampleError("missing_file", f"{name}: no such file") from e
        except IsADirectoryError as e:
            raise SampleError("missing_file", f"{name}: is a directory") from e
        except Image.DecompressionBombError as e:
            raise SampleError("decompression_bomb", f"{name}: {e}") from e
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise SampleError("unreadable_image", f"{name}: {e}") from e
    w, h = img.size
    if w * h > max_pixels:
        raise SampleError("decompression_bomb", f"{_name(src)}: {w}x{h} pixels > max_image_pixels {max_pixels}")
    if w < 1 or h < 1:
        raise SampleError("unreadable_image", f"{_name(src)}: empty image {w}x{h}")
    return img


def _name(src: ImageInput) -> str:
    if isinstance(src, Image.Image):
        return "<PIL image>"
    return "<bytes>" if isinstance(src, bytes) else str(src)


def image_size_of(src: ImageInput, max_pixels: int = 64_000_000) -> tuple[int, int]:
    """(width, height) from the header alone; raises SampleError for missing/unreadable/oversized files."""
    return _open(src, max_pixels).size


_TRUNCATION_LOCK = threading.Lock()


def load_complete(img: Image.Image) -> None:
    """`img.load()` that refuses a truncated file (OSError) whatever `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` says:
    some libraries (lmms-eval's task module) set that global to True on import, which would let a cut-off file
    decode as a partly grey image. Loads are serialised while the flag is held off, then it is put back."""
    with _TRUNCATION_LOCK:
        saved, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            img.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved


def load_image(src: ImageInput, max_pixels: int = 64_000_000) -> Image.Image:
    """A fully decoded RGB image; a bad file raises SampleError with its reason (never a partial image)."""
    img = _open(src, max_pixels)
    try:
        load_complete(img)
    except Image.DecompressionBombError as e:
        raise SampleError("decompression_bomb", f"{_name(src)}: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises OSError("image file is truncated ...")
        raise SampleError("truncated_image", f"{_name(src)}: {e}") from e
    return _to_rgb(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with high-bit-depth grayscale (16/32-bit integer, float) rescaled to 8 bits: PIL's own convert
    clips those at 255, turning a 16-bit photo black-and-white."""
    if img.mode == "RGB":
        return img
    if img.mode not in ("I", "F") and not img.mode.startswith("I;16"):
        return img.convert("RGB")
    arr = np.asarray(img, dtype=np.float64)
    if img.mode == "F" and arr.size and arr.min() >= 0 and arr.max() <= 1:
        arr = arr * 255.0  # a 0..1 float image
    elif img.mode == "F" or (arr.size and arr.min() < 0):
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 1.0)
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    elif arr.size and arr.max() > 255:
        arr = arr * (255.0 / (65535.0 if arr.max() <= 65535 else float(2**32 - 1)))  # 16-bit or 32-bit range
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L").convert("RGB")


def tile_image(image: Image.Image, grid: tuple[int, int], image_size: int, use_thumbnail: bool) -> np.ndarray:
    """Cut an RGB image into its grid's tiles (+ thumbnail): uint8 [tiles, 3, size, size] (channels first, as
    the model takes them), tiles row-major as the reference crops them."""
    cols, rows = grid
    s = image_size
    resized = image.resize((s * cols, s * rows), Image.BICUBIC)
    arr = np.asarray(resized)  # [rows*s, cols*s, 3]
    # [rows, s, cols, s, 3] -> [rows, cols, 3, s, s]: tile (r, c) is index r*cols + c. One uint8 copy.
    tiles = arr.reshape(rows, s, cols, s, 3).transpose(0, 2, 4, 1, 3).reshape(rows * cols, 3, s, s)
    if use_thumbnail and rows * cols > 1:
        thumb = np.asarray(image.resize((s, s), Image.BICUBIC)).transpose(2, 0, 1)[None]
        tiles = np.concatenate([tiles, thumb], axis=0)
    return tiles


@dataclass(frozen=True)
class ImageProcessor:
    """Turns images into the `pixel_values` a VLM expects: [tiles, 3, size, size] float32, normalised."""

    image_size: int
    max_tiles: int = 6
    use_thumbnail: bool = True
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    max_pixels: int = 64_000_000

    @classmethod
    def from_config(cls, config, max_pixels: int = 64_000_000) -> ImageProcessor:
        """From a `VLMConfig`: tile size from the vision encoder, stats from its kind, tiling from the model."""
        mean, std = config.vision.image_mean_std
        return cls(
            image_size=config.vision.image_size,
            max_tiles=config.max_tiles,
            use_thumbnail=config.use_thumbnail,
            mean=tuple(mean),
            std=tuple(std),
            max_pixels=max_pixels,
        )

    def grid(self, size: tuple[int, int], max_tiles: int | None = None) -> tuple[int, int]:
        """The grid for an image of `size` = (width, height) under a tile budget (default `max_tiles`)."""
        return choose_grid(size[0], size[1], self.image_size, max_tiles or self.max_tiles)

    def num_tiles(self, size: tuple[int, int], max_tiles: int | None = None) -> int:
        return tile_count(self.grid(size, max_tiles), self.use_thumbnail)

    def normalize(self, tiles: np.ndarray) -> torch.Tensor:
        """uint8 [n, 3, s, s] -> float32 [n, 3, s, s] = (x/255 - mean) / std, as one scale and one shift.

        numpy rather than torch: contiguous single-threaded passes, no intra-op thread pool (which stalls
        when data workers and the trainer share the cores).
        """
        out = tiles.astype(np.float32)
        out *= self._scale
        out -= self._shift
        return torch.from_numpy(out)

    @property
    def _scale(self) -> np.ndarray:
        return (1.0 / (255.0 * np.asarray(self.std, dtype=np.float32)))[None, :, None, None]

    @property
    def _shift(self) -> np.ndarray:
        return (np.asarray(self.mean, dtype=np.float32) / np.asarray(self.std, dtype=np.float32))[None, :, None, None]

    def __call__(self, image: ImageInput, max_tiles: int | None = None) -> torch.Tensor:
        """Load (if a path/bytes), tile and normalise one image: [tiles, 3, size, size]."""
        img = load_image(image, self.max_pixels)
        grid = self.grid(img.size, max_tiles)
        return self.normalize(tile_image(img, grid, self.image_size, self.use_thumbnail))
