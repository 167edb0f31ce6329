"""Small real video files for the tests, encoded with PyAV: a square moving across a plain background."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

CODECS = {  # container -> (codec, pixel format)
    "mp4": ("libx264", "yuv420p"),
    "webm": ("libvpx", "yuv420p"),
    "mkv": ("libx264", "yuv420p"),
    "avi": ("mpeg4", "yuv420p"),
}


def moving_square(num_frames: int = 16, size: int = 64, direction: int = 1, square: int = 12, seed: int = 0,
                  color: tuple[int, int, int] = (250, 40, 40)) -> np.ndarray:
    """uint8 [F, size, size, 3]: a square crossing left->right (direction 1) or right->left (-1) at a random
    height over a dark noisy background."""
    rng = np.random.default_rng(seed)
    y = int(rng.integers(0, size - square))
    bg = rng.integers(0, 40, size=(size, size, 3), dtype=np.uint8)
    frames = np.repeat(bg[None], num_frames, axis=0)
    span = size - square
    for t in range(num_frames):
        x = int(round(span * t / max(1, num_frames - 1)))
        if direction < 0:
            x = span - x
        frames[t, y : y + square, x : x + square] = color
    return frames


def numbered_frames(num_frames: int, size: int = 64) -> np.ndarray:
    """Frame t shows its index in two flat halves, gray levels 16*(t // 16) on top and 16*(t % 16) below
    (t < 256), so a decoded frame's index can be read back from its pixels despite compression."""
    frames = np.zeros((num_frames, size, size, 3), dtype=np.uint8)
    for t in range(num_frames):
        frames[t, : size // 2] = 16 * (t // 16)
        frames[t, size // 2 :] = 16 * (t % 16)
    return frames


def frame_number(frame) -> int:
    """The index `numbered_frames` wrote into a (decoded) frame."""
    arr = np.asarray(frame, dtype=np.float64)
    h = arr.shape[0]
    top, bottom = arr[2 : h // 2 - 2].mean(), arr[h // 2 + 2 : -2].mean()
    return int(round(top / 16)) * 16 + int(round(bottom / 16))


def encode(frames: np.ndarray, path: Path | None = None, container: str = "mp4", fps: int = 8,
           gop: int | None = None, faststart: bool = False, preset: str = "ultrafast", codec: str | None = None,
           bframes: int | None = None, bit_rate: int | None = None) -> bytes:
    """Encode uint8 [F, H, W, 3] frames; writes `path` when given; returns the bytes. `faststart` (the index
    first, as streaming mp4s have it, so a cut file still opens) needs `path`: FFmpeg rewrites the file.
    `codec` replaces the container's default one; `bframes` sets the encoder's B-frame count, `bit_rate` the
    rate of the codecs not told a quality (mpeg2/mpeg4: their default 200 kb/s blurs the frame numbers)."""
    import av

    if faststart and path is None:
        raise ValueError("faststart needs a path")

    default, pix = CODECS[container]
    codec = codec or default
    buf = io.BytesIO()
    fmt = {"mkv": "matroska"}.get(container, container)
    options = {"movflags": "faststart"} if faststart else {}
    out = av.open(str(path) if faststart else buf, "w", format=fmt, options=options)
    stream = out.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix
    if gop:
        stream.codec_context.gop_size = gop
    if bit_rate:
        stream.bit_rate = bit_rate
    if bframes is not None:
        stream.codec_context.max_b_frames = bframes
    if codec in ("libx264", "libx265"):
        stream.options = {"crf": "10", "preset": preset}  # "medium" and slower code B-frames, as cameras do
        if codec == "libx265":
            stream.options["x265-params"] = "log-level=error"
    for f in frames:
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    if faststart:
        return Path(path).read_bytes()
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def drifting_square(num_frames: int = 8, size: int = 56, direction: int = 1, square: int = 14, step: int = 7,
                    seed: int = 0) -> np.ndarray:
    """uint8 [F, size, size, 3]: a bright square drifting `step` px per frame to the right (direction 1) or
    left (-1), wrapping around the edges, from a random start over a noisy background. Any single frame is
    equally likely under either direction, so only the order of the frames tells them apart."""
    rng = np.random.default_rng(seed)
    x0, y = int(rng.integers(0, size)), int(rng.integers(0, size - square))
    frames = rng.integers(0, 60, size=(num_frames, size, size, 3), dtype=np.uint8)
    cols = np.arange(square)
    for t in range(num_frames):
        xs = (x0 + direction * step * t + cols) % size
        frames[t, y : y + square][:, xs] = (250, 220, 40)
    return frames


def drifting_bar(num_frames: int = 8, size: int = 56, direction: int = 1, width: int = 14, step: int = 14,
                 seed: int = 0) -> np.ndarray:
    """uint8 [F, size, size, 3]: a full-height bright bar drifting `step` px per frame right (1) or left (-1),
    wrapping around, from a random start over noise: every frame is equally likely under both directions."""
    rng = np.random.default_rng(seed)
    x0 = int(rng.integers(0, size))
    frames = rng.integers(0, 60, size=(num_frames, size, size, 3), dtype=np.uint8)
    cols = np.arange(width)
    for t in range(num_frames):
        frames[t][:, (x0 + direction * step * t + cols) % size] = (250, 220, 40)
    return frames
