"""`Processor`: conversation + images -> model inputs, for training and for generation alike.

One object owns everything that must agree between training and inference: the tokenizer and its chat
template, the image-context token, tiling, tile tags, wrappers and normalisation (all from `VLMConfig`).
Training data goes through `encode()` (one unbatched `Sample`, errors as `SampleError` so the data stream can
skip and count them); callers that want a ready batch of one use `processor(conversation, images, ...)`.

Videos (`<video>` placeholders, `stitch.data.video` / `video_layout`): each video is probed (header only),
its frames sampled by the configured rule, laid out per `config.resolved_video_layout`, and only the chosen
frames are decoded, once, after the budget below has settled their count.

Visual-token budget step-down: when `max_length` is given and the visual tokens would overflow it, first the
frame count of every video is lowered (halving, down to `min_frames`), then the tile budget of the images
(max_tiles, then 12 -> 8 -> 6 -> 4 -> 2 -> 1 below it), until the sample fits; only if it still does not fit
is the text cut (never inside an image or frame: those that don't fit are dropped with everything after
them). A training sample left with no assistant token fails with `fully_masked`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stitch.config import VLMConfig
from stitch.data.chat import (
    IGNORE_INDEX,
    ChatEncoder,
    Encoded,
    add_image_token,
    validate_conversation,
)
from stitch.data.collate import Sample
from stitch.data.image import ImageInput, ImageProcessor, load_image, tile_budgets, tile_image
from stitch.data.skips import SampleError
from stitch.data.video import (
    DecodeOptions,
    VideoClip,
    VideoInfo,
    VideoInput,
    VideoLimits,
    clip_indices,
    decode_frames,
    frame_steps,
    probe_video,
    sample_indices,
)
from stitch.data.video_layout import expand_videos, insert_default_placeholders, visual_order
from stitch.errors import StitchConfigError

__all__ = ["Processor", "add_image_token", "PLAIN_TEMPLATE"]

# LLaVA's "plain" pretraining format: the tokenizer's BOS, the user turns as written (LLaVA puts only the image
# there), then the assistant's text and EOS; no role markers and no system turn. Projector pretraining on
# captions needs no instructions, and the short sequences make each step several times cheaper than the chat
# template's. The leading token matters: LLMs park attention on whatever sits at position 0 (the "attention
# sink") and read little from it, so an image placed there loses its first token. Tokenizers without a BOS
# (Qwen2) start with their EOS instead.
PLAIN_TEMPLATE = (
    "{{ bos_token if bos_token else eos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


class Processor:
    """Turns `[{"role", "content"}]` conversations with `<image>` placeholders (+ images) into model inputs."""

    def __init__(
        self,
        tokenizer,
        config: VLMConfig,
        *,
        max_image_pixels: int = 64_000_000,
        budget_steps: Sequence[int] = (12, 8, 6, 4, 2, 1),
        system_prompt: str | None = None,
    ):
        token_id = add_image_token(tokenizer, config)
        if config.image_token_id and config.image_token_id != token_id:
            raise StitchConfigError(
                f"config.image_token_id is {config.image_token_id} but the tokenizer maps "
                f"{config.image_token!r} to {token_id}"
            )
        self.tokenizer = tokenizer
        self.config = config
        self.image_token_id = token_id
        self.images = ImageProcessor.from_config(config, max_pixels=max_image_pixels)
        self.encoder = ChatEncoder(tokenizer, config, token_id)
        self.budget_steps = tuple(budget_steps)
        self.system_prompt = system_prompt if system_prompt is not None else config.system_prompt
        self.num_frames = config.video_frames
        self.frame_sampling = config.video_sampling
        self.sample_fps: float | None = None  # for the "fps" rule
        self.max_frames: int | None = None
        self.min_frames = 1
        self.frames_fps = 1.0  # the rate of a folder of frames / of decoded frames given as a list
        self.video_limits = VideoLimits()
        self.frame_resize = "exact"  # "decoder": frames resized by swscale while decoding (DecodeOptions.size)

    @classmethod
    def from_pretrained(cls, ckpt_dir: str | Path, **kwargs: Any) -> Processor:
        """Open the processor of a Stitch checkpoint: `config.json` plus the tokenizer files beside it."""
        from transformers import AutoTokenizer

        ckpt_dir = Path(ckpt_dir)
        config = VLMConfig.load(ckpt_dir / "config.json")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(ckpt_dir))
        except (OSError, ValueError) as e:
            raise StitchConfigError(f"{ckpt_dir}: cannot load the tokenizer files ({e})") from e
        return cls(tokenizer, config, **kwargs)

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write the tokenizer files (with the chat template) and `config.json`."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(out_dir))
        self.config.save(out_dir / "config.json")

    def with_options(
        self,
        *,
        max_image_pixels: int | None = None,
        budget_steps: Sequence[int] | None = None,
        system_prompt: str | None = None,
        chat_format: str = "template",
        **video: Any,
    ) -> Processor:
        """A copy sharing the tokenizer, with data-config options applied (used by the training stream).

        `chat_format="plain"` renders LLaVA's plain pretraining format instead of the chat template (on a
        private copy of the tokenizer, so checkpoints keep the model's own template). Video options (any of
        `num_frames`, `frame_sampling`, `sample_fps`, `max_frames`, `min_frames`, `frames_fps`,
        `video_limits`, `frame_resize`) replace the processor's; None keeps it."""
        other = copy.copy(self)
        for name, value in video.items():
            if name not in _VIDEO_OPTIONS:
                raise StitchConfigError(f"unknown video option {name!r}; expected one of {sorted(_VIDEO_OPTIONS)}")
            if value is not None:
                setattr(other, name, value)
        if chat_format == "plain":
            tokenizer = copy.deepcopy(self.tokenizer)
            tokenizer.chat_template = PLAIN_TEMPLATE
            other.tokenizer = tokenizer
            other.encoder = ChatEncoder(tokenizer, self.config, self.image_token_id)
        elif chat_format != "template":
            raise StitchConfigError(f"data.chat_format must be 'template' or 'plain', got {chat_format!r}")
        if max_image_pixels is not None:
            other.images = dataclasses.replace(self.images, max_pixels=max_image_pixels)
        if budget_steps is not None:
            other.budget_steps = tuple(budget_steps)
        if system_prompt is not None:
            other.system_prompt = system_prompt
        return other

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        return int(pad) if pad is not None else 0

    # ------------------------------------------------------------------ encoding
    def encode(
        self,
        conversation: Sequence[dict],
        images: Sequence[ImageInput] | None = None,
        videos: Sequence[VideoInput] | None = None,
        *,
        add_generation_prompt: bool = False,
        max_length: int | None = None,
        dataset: str = "",
        key: str = "",
    ) -> Sample:
        """Render one conversation; raises `SampleError` (with a skip reason) for anything unusable."""
        images, videos = list(images or []), list(videos or [])
        messages = validate_conversation(conversation, for_generation=add_generation_prompt)
        if self.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        insert_default_placeholders(messages, len(images), len(videos))
        order = visual_order(messages, len(images), len(videos))
        loaded = [load_image(im, self.images.max_pixels) for im in images]
        infos = [probe_video(v, self.video_limits, self.frames_fps) for v in videos]
        with_labels = not add_generation_prompt
        layout_name = self.config.resolved_video_layout
        for frames, budget in self._budgets(max_length, bool(videos), bool(loaded)):
            indices = [self._frame_indices(video, info, frames) for video, info in zip(videos, infos)]
            stamps = [[i / info.fps for i in idx] for info, idx in zip(infos, indices)]
            grids = [self.images.grid(im.size, budget) for im in loaded]
            image_layouts = [(c * r, self.config.use_thumbnail and c * r > 1) for c, r in grids]
            expanded, layout, sources = expand_videos(
                messages, order, image_layouts, stamps, layout_name, self.config.video_timestamps
            )
            enc = self.encoder.encode(expanded, layout, add_generation_prompt, with_labels)
            if max_length is None or len(enc) <= max_length:
                break
        if max_length is not None and len(enc) > max_length and not add_generation_prompt:
            kept = enc.truncate(max_length)
            layout, sources = layout[:kept], sources[:kept]
        if with_labels and not _has_labels(enc):
            raise SampleError("fully_masked", f"no assistant token within max_length {max_length}")
        frames_of = self._decode(videos, indices, sources)
        return Sample(
            input_ids=torch.from_numpy(enc.input_ids),
            labels=torch.from_numpy(enc.labels) if enc.labels is not None else None,
            pixel_values=self._pixels(loaded, grids, frames_of, layout, sources),
            num_tiles=[n + int(t) for n, t in layout],
            dataset=dataset,
            key=key,
        )

    def _budgets(self, max_length: int | None, has_videos: bool, has_images: bool) -> list[tuple[int, int]]:
        """(frames per video, tile budget) to try in order: frames lowered first, then tiles."""
        frames = frame_steps(self.num_frames, min(self.min_frames, self.num_frames)) if max_length and has_videos \
            else [self.num_frames]
        tiles = tile_budgets(self.config.max_tiles, self.budget_steps) if max_length and has_images \
            else [self.config.max_tiles]
        return [(f, tiles[0]) for f in frames] + [(frames[-1], t) for t in tiles[1:]]

    def _frame_indices(self, video: VideoInput, info: VideoInfo, num_frames: int) -> list[int]:
        if isinstance(video, VideoClip):  # sampled within its [start, end] (MVBench's bounds)
            return clip_indices(video, info.total_frames, info.fps, num_frames, self.frame_sampling,
                                fps=self.sample_fps, max_frames=self.max_frames)
        return sample_indices(
            info.total_frames, num_frames, self.frame_sampling,
            video_fps=info.fps, fps=self.sample_fps, max_frames=self.max_frames,
        )

    def _decode(self, videos, indices, sources) -> dict[int, list]:
        """Decode, once, the frames of each video that made it into the sample."""
        used: dict[int, int] = {}
        for kind, k, first in sources:
            if kind == "video":
                used[k] = max(used.get(k, 0), first + 1)
        out = {}
        size = self.images.image_size
        options = DecodeOptions(size=(size, size)) if self.frame_resize == "decoder" else DecodeOptions()
        for k in used:
            n = len(indices[k]) if self.config.resolved_video_layout == "nvlm" else used[k]
            out[k], _ = decode_frames(videos[k], indices[k][:n], self.video_limits, self.frames_fps, options)
        return out

    def _pixels(self, images, grids, frames_of, layout, sources) -> torch.Tensor | None:
        """Tiles of every layout entry in text order: an image's grid (+ thumbnail), or a video's frames, each
        resized to one tile."""
        if not sources:
            return None
        size, thumb = self.images.image_size, self.config.use_thumbnail
        tiles = []
        for (n, _), (kind, k, first) in zip(layout, sources):
            if kind == "image":
                tiles.append(tile_image(images[k], grids[k], size, thumb))
            else:
                tiles.extend(tile_image(f, (1, 1), size, False) for f in frames_of[k][first : first + n])
        return self.images.normalize(np.concatenate(tiles) if len(tiles) > 1 else tiles[0])

    def __call__(
        self,
        conversation: Sequence[dict],
        images: Sequence[ImageInput] | None = None,
        videos: Sequence[VideoInput] | None = None,
        add_generation_prompt: bool = False,
        max_length: int | None = None,
    ) -> dict[str, Any]:
        """A batch of one: input_ids/attention_mask/position_ids [1, T], labels [1, T] (training only),
        pixel_values [tiles, 3, H, W] or None, num_tiles per image."""
        sample = self.encode(
            conversation, images, videos, add_generation_prompt=add_generation_prompt, max_length=max_length
        )
        n = len(sample)
        batch: dict[str, Any] = {
            "input_ids": sample.input_ids[None],
            "attention_mask": torch.ones((1, n), dtype=torch.long),
            "position_ids": torch.arange(n, dtype=torch.long)[None],
            "pixel_values": sample.pixel_values,
            "num_tiles": sample.num_tiles,
        }
        if sample.labels is not None:
            batch["labels"] = sample.labels[None]
            batch["num_label_tokens"] = torch.tensor(sample.num_label_tokens)
        return batch

    def decode(self, ids, skip_special_tokens: bool = True) -> str | list[str]:
        """Text of `ids` (1-D: a string; 2-D: one string per row)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if ids and isinstance(ids[0], list):
            return [self.tokenizer.decode(row, skip_special_tokens=skip_special_tokens) for row in ids]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_text(self, conversation: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The chat-template text of a conversation (placeholders kept as `<image>`), for display."""
        messages = validate_conversation(conversation, for_generation=add_generation_prompt)
        return self.encoder.render(messages, add_generation_prompt)


_VIDEO_OPTIONS = {
    "num_frames", "frame_sampling", "sample_fps", "max_frames", "min_frames", "frames_fps", "video_limits",
    "frame_resize",
}


def _has_labels(enc: Encoded) -> bool:
    return enc.labels is not None and bool((enc.labels != IGNORE_INDEX).any())
