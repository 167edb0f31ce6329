"""Where a video's frames go in the token stream: `<video>` placeholders expanded before the chat encoder runs.

The chat encoder knows only `<image>` placeholders, each with its (tiles, thumbnail) layout. A video becomes
such placeholders, so the loss mask, the image-range bookkeeping and truncation need nothing video-specific:
- "internvl" (transformers' `InternVLProcessor.replace_video_token`): one image of one tile per frame, as
  `Frame1: <img>...</img>\\nFrame2: ...` (with `video_timestamps`, `Frame1 (0.0s): ...`, Stitch's own form);
- "nvlm" (the seed system's `dataset_helpers.py`): the frames spliced at the placeholder as the tiles of one
  image (one wrapper, tile tags when the model uses them), no thumbnail.
Each frame is one tile, never tiled: "to limit the number of tokens", as the seed says.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from stitch.data.chat import IMAGE_PLACEHOLDER
from stitch.data.skips import SampleError

__all__ = ["VIDEO_PLACEHOLDER", "visual_order", "insert_default_placeholders", "expand_videos", "frame_prefix"]

VIDEO_PLACEHOLDER = "<video>"
_VISUAL = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")


def visual_order(messages: Sequence[dict[str, str]], num_images: int, num_videos: int) -> list[str]:
    """"image"/"video" for every placeholder in text order; counts must match what the sample carries."""
    order = [m for msg in messages for m in _VISUAL.findall(msg["content"])]
    n_videos = order.count(VIDEO_PLACEHOLDER)
    if n_videos != num_videos:
        raise SampleError(
            "video_count_mismatch", f"{n_videos} {VIDEO_PLACEHOLDER} placeholders for {num_videos} videos"
        )
    if len(order) - n_videos != num_images:
        raise SampleError(
            "image_count_mismatch", f"{len(order) - n_videos} {IMAGE_PLACEHOLDER} placeholders for {num_images} images"
        )
    return ["video" if m == VIDEO_PLACEHOLDER else "image" for m in order]


def insert_default_placeholders(messages: list[dict[str, str]], num_images: int, num_videos: int) -> None:
    """No placeholder of a kind at all: that many go first in the first user turn (InternVL's convention),
    videos before images."""
    first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
    prefix = ""
    if num_videos and not any(VIDEO_PLACEHOLDER in m["content"] for m in messages):
        prefix += f"{VIDEO_PLACEHOLDER}\n" * num_videos
    if num_images and not any(IMAGE_PLACEHOLDER in m["content"] for m in messages):
        prefix += f"{IMAGE_PLACEHOLDER}\n" * num_images
    if prefix:
        messages[first_user] = {"role": "user", "content": prefix + messages[first_user]["content"]}


def frame_prefix(i: int, timestamp: float | None) -> str:
    """"Frame{i+1}: " (transformers' form), or with the frame's time "Frame{i+1} (1.5s): "."""
    return f"Frame{i + 1}: " if timestamp is None else f"Frame{i + 1} ({timestamp:.1f}s): "


def expand_videos(
    messages: Sequence[dict[str, str]],
    order: Sequence[str],
    image_layouts: Sequence[tuple[int, bool]],
    video_timestamps: Sequence[Sequence[float]],
    layout: str,
    with_timestamps: bool = False,
) -> tuple[list[dict[str, str]], list[tuple[int, bool]], list[tuple[str, int, int]]]:
    """Replace each `<video>` by `<image>` placeholders. Returns the messages, the (tiles, thumbnail) layout of
    every `<image>` now in the text, and per layout entry its source: ("image", k, 0) or ("video", k, first
    frame) with the entry's frames being [first, first + tiles)."""
    if layout not in ("internvl", "nvlm"):
        raise ValueError(f"video layout must be 'internvl' or 'nvlm', got {layout!r}")
    out, layouts, sources = [], [], []
    k_img = k_vid = pos = 0
    for msg in messages:
        pieces = _VISUAL.split(msg["content"])
        text = []
        for piece in pieces:
            if piece == IMAGE_PLACEHOLDER:
                assert order[pos] == "image"
                text.append(IMAGE_PLACEHOLDER)
                layouts.append(image_layouts[k_img])
                sources.append(("image", k_img, 0))
                k_img += 1
                pos += 1
            elif piece == VIDEO_PLACEHOLDER:
                stamps = video_timestamps[k_vid]
                if layout == "nvlm":
                    text.append(IMAGE_PLACEHOLDER)
                    layouts.append((len(stamps), False))
                    sources.append(("video", k_vid, 0))
                else:
                    frames = []
                    for i, t in enumerate(stamps):
                        frames.append(frame_prefix(i, t if with_timestamps else None) + IMAGE_PLACEHOLDER)
                        layouts.append((1, False))
                        sources.append(("video", k_vid, i))
                    text.append("\n".join(frames))
                k_vid += 1
                pos += 1
            else:
                text.append(piece)
        out.append({"role": msg["role"], "content": "".join(text)})
    return out, layouts, sources
