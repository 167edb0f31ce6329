"""Tiling equals an independent implementation of the reference rule; loading fails with counted reasons."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from stitch.data.image import (
    ImageProcessor,
    choose_grid,
    image_size_of,
    load_image,
    tile_budgets,
    tile_count,
    tile_image,
)
from stitch.data.skips import SampleError

from .conftest import make_image, tiny_config


# ---- the reference rule, written out independently (InternVL's published algorithm, literally) ----
def ref_closest_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:  # noqa: SIM102 - the reference, written as published
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:  # noqa: SIM102 (kept literal)
                best_ratio = ratio
    return best_ratio


def ref_grid(width, height, image_size, max_num, min_num=1):
    target_ratios = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    return ref_closest_ratio(width / height, target_ratios, width, height, image_size)


def ref_tiles(image, image_size, max_num, use_thumbnail):
    """Reference cropping: resize to the grid, crop tile by tile, then the thumbnail."""
    w, h = image.size
    cols, rows = ref_grid(w, h, image_size, max_num)
    resized = image.resize((image_size * cols, image_size * rows), Image.BICUBIC)
    out = []
    for i in range(cols * rows):
        box = ((i % cols) * image_size, (i // cols) * image_size,
               (i % cols + 1) * image_size, (i // cols + 1) * image_size)
        out.append(resized.crop(box))
    if use_thumbnail and len(out) != 1:
        out.append(image.resize((image_size, image_size), Image.BICUBIC))
    return out


def ref_normalize(tile, mean, std):
    x = torch.from_numpy(np.asarray(tile, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


SIZES = [1, 7, 50, 100, 224, 300, 448, 500, 672, 896, 1000, 1344, 2000, 3000]


@pytest.mark.parametrize("image_size", [448, 56])
@pytest.mark.parametrize("max_tiles", [1, 2, 6, 12])
def test_grid_matches_reference_over_aspect_and_size_grid(image_size, max_tiles):
    cases = 0
    for w in SIZES:
        for h in SIZES:
            assert choose_grid(w, h, image_size, max_tiles) == ref_grid(w, h, image_size, max_tiles), (w, h)
            cases += 1
    # exact ties: aspect ratios that sit exactly on a candidate grid's ratio, at sizes either side of the
    # area threshold (this is where the tie rule decides)
    for cols in range(1, max_tiles + 1):
        for rows in range(1, max_tiles // cols + 1):
            for scale in (0.3, 0.5, 0.71, 1.0, 1.5, 2.0, 3.0):
                w, h = max(1, round(cols * image_size * scale)), max(1, round(rows * image_size * scale))
                assert choose_grid(w, h, image_size, max_tiles) == ref_grid(w, h, image_size, max_tiles)
                cases += 1
    assert cases > 196


def test_tie_rule_prefers_larger_grid_only_for_large_images():
    # square images: (1,1), (2,2), (3,3) all tie on aspect ratio
    assert choose_grid(448, 448, 448, 12) == (1, 1)  # area not > 0.5*448^2*4
    assert choose_grid(900, 900, 448, 12) == (2, 2)
    assert choose_grid(1400, 1400, 448, 12) == (3, 3)
    assert choose_grid(1400, 1400, 448, 6) == (2, 2)  # (3,3) is over budget


@pytest.mark.parametrize("size,max_tiles,thumb", [((300, 100), 6, True), ((100, 300), 6, False),
                                                  ((57, 57), 6, True), ((500, 260), 12, True),
                                                  ((64, 40), 1, True)])
def test_tiles_equal_reference_pixels(tmp_path, size, max_tiles, thumb):
    img = Image.open(make_image(tmp_path / "x.png", size=size)).convert("RGB")
    proc = ImageProcessor(image_size=56, max_tiles=max_tiles, use_thumbnail=thumb)
    got = proc(img)
    want = torch.stack([ref_normalize(t, proc.mean, proc.std) for t in ref_tiles(img, 56, max_tiles, thumb)])
    assert got.shape == want.shape
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    grid = choose_grid(*size, 56, max_tiles)
    assert got.shape[0] == tile_count(grid, thumb) == proc.num_tiles(size)


def test_tile_row_major_order():
    # a 2x1 grid of solid colours: tile 0 must be the left half
    arr = np.zeros((56, 112, 3), np.uint8)
    arr[:, :56] = (255, 0, 0)
    arr[:, 56:] = (0, 0, 255)
    tiles = tile_image(Image.fromarray(arr), (2, 1), 56, use_thumbnail=True)
    assert tiles.shape == (3, 3, 56, 56) and tiles.dtype == np.uint8
    assert (tiles[0, :, 10, 10] == (255, 0, 0)).all() and (tiles[1, :, 10, 10] == (0, 0, 255)).all()


def test_normalisation_per_encoder():
    from stitch.config import VisionConfig

    white = Image.new("RGB", (56, 56), (255, 255, 255))
    for kind, expect in [("siglip", 1.0), ("internvit", (1 - 0.485) / 0.229), ("clip", (1 - 0.48145466) / 0.26862954)]:
        cfg = tiny_config(vision=VisionConfig(kind=kind, image_size=56, patch_size=14, hidden_size=32,
                                              intermediate_size=64, num_layers=1, num_heads=2))
        px = ImageProcessor.from_config(cfg)(white)
        assert px.shape == (1, 3, 56, 56)
        assert px[0, 0, 0, 0].item() == pytest.approx(expect, abs=1e-5)


def test_tile_budgets_step_down():
    assert tile_budgets(12) == [12, 8, 6, 4, 2, 1]
    assert tile_budgets(6) == [6, 4, 2, 1]
    assert tile_budgets(7) == [7, 6, 4, 2, 1]
    assert tile_budgets(1) == [1]
    assert tile_budgets(6, steps=(3,)) == [6, 3, 1]


def _png_header_only(w: int, h: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def test_bad_images_raise_reasons(tmp_path):
    with pytest.raises(SampleError) as e:
        load_image(tmp_path / "nope.jpg")
    assert e.value.reason == "missing_file"

    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(SampleError) as e:
        load_image(tmp_path / "text.jpg")
    assert e.value.reason == "unreadable_image"

    good = make_image(tmp_path / "good.jpg", size=(200, 150))
    data = good.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(SampleError) as e:
        load_image(tmp_path / "cut.jpg")
    assert e.value.reason == "truncated_image"

    # a header claiming 100k x 100k pixels: refused before any decoding
    (tmp_path / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    with pytest.raises(SampleError) as e:
        load_image(tmp_path / "bomb.png")
    assert e.value.reason == "decompression_bomb"
    with pytest.raises(SampleError) as e:
        load_image(good, max_pixels=1000)
    assert e.value.reason == "decompression_bomb"

    assert image_size_of(good) == (200, 150)
    assert load_image(good.read_bytes()).size == (200, 150)
    rgba = Image.new("RGBA", (10, 10))
    assert load_image(rgba).mode == "RGB"


def test_high_bit_depth_grayscale_keeps_its_tones(tmp_path):
    """16-bit PNGs and float TIFFs are rescaled to 8 bits, not clipped (PIL's convert made them black-and-white)."""
    import numpy as np
    from PIL import Image

    from stitch.data.image import load_image

    ramp16 = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (4, 1))
    Image.fromarray(ramp16).save(tmp_path / "g16.png")
    ramp01 = np.tile(np.linspace(0, 1, 256).astype(np.float32), (4, 1))
    Image.fromarray(ramp01, mode="F").save(tmp_path / "f.tiff")
    for name in ("g16.png", "f.tiff"):
        arr = np.asarray(load_image(tmp_path / name))
        assert arr.shape == (4, 256, 3) and arr.dtype == np.uint8
        assert abs(int(arr[0, 128, 0]) - 128) <= 1 and arr[0, 0, 0] == 0 and arr[0, 255, 0] == 255
        assert len(np.unique(arr)) > 200  # a ramp, not two tones


def test_a_truncated_file_is_refused_even_when_a_library_told_pil_to_accept_them(tmp_path, monkeypatch):
    """lmms-eval sets `ImageFile.LOAD_TRUNCATED_IMAGES = True` on import; a cut-off file must still be a skip
    (and a 400 in the server), and the library's setting is left as it was."""
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = make_image(tmp_path / "good.png", size=(200, 150)).read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(SampleError) as e:
        load_image(tmp_path / "cut.png")
    assert e.value.reason == "truncated_image"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True
