"""Videos in stored records: LLaVA-Video / LLaVA-OneVision `"video"` fields, video members of WebDataset and
Energon shards, and the placeholder convention of those datasets.

Kept apart from `sources.py` so the readers there each gain a line, not a branch per format:
- LLaVA-Video / LLaVA-OneVision JSON: `{"video": "clip.mp4" | ["a.mp4", ...] | "frames_dir", "conversations":
  [...]}`, paths relative to `video_root` (default: `image_root`, then the file's folder). Those datasets write
  the video's place as `<image>` (LLaVA's one visual token); a record with videos, no images and no `<video>`
  has its `<image>` placeholders read as `<video>`.
- WebDataset / Energon: members `key.mp4` (or `key.0.mp4`, `key.1.webm`...); an Energon dataset with the seed
  system's subflavor `has_video: true` stores its video in the image field, which is then read as a video.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stitch.data.chat import IMAGE_PLACEHOLDER
from stitch.data.skips import SampleError
from stitch.data.video import VideoInput
from stitch.data.video_layout import VIDEO_PLACEHOLDER

__all__ = ["VIDEO_EXTS", "video_refs", "videos_of", "llava_video_placeholders"]

VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov", "m4v")


def video_refs(row: dict, root: Path | None, where: str) -> list[VideoInput]:
    """The `video` (or `videos`) field of a record as paths (resolved against `root`) or bytes."""
    ref = row.get("video", row.get("videos"))
    refs = [] if ref is None else ref if isinstance(ref, list) else [ref]
    out: list[VideoInput] = []
    for r in refs:
        if isinstance(r, (bytes, bytearray)):
            out.append(bytes(r))
            continue
        if not isinstance(r, str) or not r:
            raise SampleError("malformed_record", f"{where}: video must be a path string, got {type(r).__name__}")
        p = Path(r)
        out.append(str(root / p if root is not None and not p.is_absolute() else p))
    return out


def videos_of(files: dict[str, bytes]) -> list[bytes]:
    """Video members of a shard sample: `mp4` alone, or numbered `0.mp4`, `1.webm`... in order."""
    found = []
    for ext, data in files.items():
        parts = ext.split(".")
        if parts[-1] in VIDEO_EXTS:
            order = int(parts[0]) if len(parts) > 1 and parts[0].isdigit() else -1
            found.append((order, ext, data))
    return [data for _, _, data in sorted(found)]


def llava_video_placeholders(conversation: list[dict[str, Any]], num_videos: int, num_images: int) -> None:
    """LLaVA-Video's `<image>`-for-the-video convention read as `<video>` (in place; see module docstring)."""
    if not num_videos or num_images or any(VIDEO_PLACEHOLDER in m["content"] for m in conversation):
        return
    for m in conversation:
        m["content"] = m["content"].replace(IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)
