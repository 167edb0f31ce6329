"""Videos through the `Processor`: the per-frame layout and pixels as transformers' InternVL renders them, the
NVLM layout, mixed image + video samples, the frame-then-tile budget, and bad videos as skip reasons."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stitch.data.chat import IGNORE_INDEX
from stitch.data.processor import Processor
from stitch.data.skips import SampleError

from .conftest import make_image, tiny_config
from .video_clips import encode, frame_number, moving_square, numbered_frames

INTERNVL = dict(image_wrapper="internvl", tile_tags="none", use_thumbnail=False)


def _hf_video_text(num_frames: int, tokens: int) -> str:
    """transformers' own `InternVLProcessor.replace_video_token` (its constructor needs torchvision's video
    processor, so the method runs on an instance carrying just the attributes it reads)."""
    from transformers import InternVLProcessor

    proc = InternVLProcessor.__new__(InternVLProcessor)
    proc.start_image_token, proc.end_image_token = "<img>", "</img>"
    proc.image_token, proc.image_seq_length = "<IMG_CONTEXT>", tokens
    return proc.replace_video_token({"pixel_values_videos": [torch.zeros(num_frames, 3, 1, 1)]}, 0)


def test_internvl_layout_and_pixels_equal_transformers(tmp_path, smol_tok):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    config = tiny_config(**INTERNVL)
    proc = Processor(smol_tok, config).with_options(num_frames=6, frame_sampling="internvl")
    path = tmp_path / "clip.mp4"
    encode(moving_square(20, size=64), path, fps=10)
    conv = [{"role": "user", "content": "<video>\nWhich way does the square move?"},
            {"role": "assistant", "content": "left to right"}]
    batch = proc(conv, videos=[path])
    # text: the rendered template with transformers' per-frame layout at the placeholder
    text = proc.render_text(conv).replace("<video>", _hf_video_text(6, config.tokens_per_tile))
    want = smol_tok(text, add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0].tolist() == want
    assert batch["num_tiles"] == [1] * 6
    assert (batch["labels"][0][batch["input_ids"][0] == proc.image_token_id] == IGNORE_INDEX).all()
    # pixels: each sampled frame through transformers' InternVL image processor at one tile (no tiling)
    from stitch.data.video import load_video

    video = load_video(path, num_frames=6, rule="internvl")
    ref_proc = GotOcr2ImageProcessorPil(
        crop_to_patches=False, size={"height": 56, "width": 56}, image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    ref = ref_proc(images=video.frames, return_tensors="pt")["pixel_values"]
    assert batch["pixel_values"].shape == (6, 3, 56, 56)
    torch.testing.assert_close(batch["pixel_values"], ref, atol=1e-5, rtol=1e-5)


def test_timestamps_and_nvlm_layout(tmp_path, smol_tok):
    path = tmp_path / "clip.webm"
    encode(numbered_frames(16), path, container="webm", fps=4)
    stamped = Processor(smol_tok, tiny_config(**INTERNVL, video_timestamps=True)).with_options(num_frames=4)
    text = smol_tok.decode(stamped([{"role": "user", "content": "<video>Go"}], videos=[path],
                                   add_generation_prompt=True)["input_ids"][0])
    # uniform rule on 16 frames: 0, 5, 10, 15 at 4 fps
    assert "Frame1 (0.0s): <img>" in text and "Frame2 (1.2s): <img>" in text and "Frame4 (3.8s): <img>" in text
    nvlm = Processor(smol_tok, tiny_config(use_thumbnail=True)).with_options(num_frames=4)
    batch = nvlm([{"role": "user", "content": "<video>Go"}], videos=[path], add_generation_prompt=True)
    text = smol_tok.decode(batch["input_ids"][0])
    # one image of four tiles at the placeholder, tile tags, no thumbnail for a video
    assert text.count("<Image>") == 1 and "<tile_4>" in text and "<tile_global_thumbnail>" not in text
    assert batch["num_tiles"] == [4] and batch["pixel_values"].shape[0] == 4
    # the frames are the sampled ones, in order (numbered_frames carries its index in its pixels)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    pixels = (batch["pixel_values"].permute(0, 2, 3, 1).numpy() * std + mean) * 255
    assert [frame_number(p) for p in pixels] == [0, 5, 10, 15]


def test_mixed_images_and_videos_in_text_order(tmp_path, smol_tok):
    config = tiny_config(**INTERNVL)
    proc = Processor(smol_tok, config).with_options(num_frames=3)
    img = make_image(tmp_path / "a.png", size=(56, 56))
    vid = tmp_path / "v.mkv"
    encode(numbered_frames(9), vid, container="mkv")
    conv = [{"role": "user", "content": "<image> then <video> compare"}, {"role": "assistant", "content": "same"}]
    batch = proc(conv, images=[img], videos=[vid])
    assert batch["num_tiles"] == [1, 1, 1, 1]
    alone = proc([{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}], images=[img])
    torch.testing.assert_close(batch["pixel_values"][:1], alone["pixel_values"])
    # without a <video> placeholder the video goes first in the first user turn
    first = proc([{"role": "user", "content": "what?"}, {"role": "assistant", "content": "x"}], videos=[vid])
    assert smol_tok.decode(first["input_ids"][0]).count("Frame") == 3
    with pytest.raises(SampleError, match="video_count_mismatch"):
        proc([{"role": "user", "content": "<video><video>"}, {"role": "assistant", "content": "x"}], videos=[vid])


def test_budget_lowers_frames_then_tiles_then_text(tmp_path, smol_tok):
    config = tiny_config(**INTERNVL, max_tiles=4)
    proc = Processor(smol_tok, config).with_options(num_frames=8)
    vid = tmp_path / "v.mp4"
    encode(numbered_frames(32), vid)
    img = make_image(tmp_path / "wide.png", size=(224, 56))  # 4 tiles at max_tiles 4
    conv = [{"role": "user", "content": "<image><video>describe"}, {"role": "assistant", "content": "a clip"}]
    full = proc(conv, images=[img], videos=[vid])
    assert full["num_tiles"] == [4] + [1] * 8
    length = full["input_ids"].shape[1]
    fewer_frames = proc(conv, images=[img], videos=[vid], max_length=length - 1)
    assert fewer_frames["num_tiles"] == [4] + [1] * 4  # frames halved first, image untouched
    at_one = proc.with_options(num_frames=1)(conv, images=[img], videos=[vid])["input_ids"].shape[1]
    one_frame = proc(conv, images=[img], videos=[vid], max_length=at_one - 1)
    assert one_frame["num_tiles"][1:] == [1] and one_frame["num_tiles"][0] < 4  # then the tiles
    assert one_frame["input_ids"].shape[1] <= at_one - 1
    # nothing left to lower: the text is cut, never inside a frame, and the answer is gone -> skipped
    with pytest.raises(SampleError, match="fully_masked"):
        proc(conv, images=[img], videos=[vid], max_length=20)
    assert one_frame["pixel_values"].shape[0] == sum(one_frame["num_tiles"])


def test_bad_video_in_a_sample_is_a_skip_reason(tmp_path, smol_tok):
    proc = Processor(smol_tok, tiny_config(**INTERNVL))
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 500)
    conv = [{"role": "user", "content": "<video>"}, {"role": "assistant", "content": "x"}]
    with pytest.raises(SampleError) as err:
        proc.encode(conv, videos=[bad])
    assert err.value.reason == "unreadable_video" and "bad.mp4" in str(err.value)
    frames = [Image.fromarray(f) for f in numbered_frames(5)]
    assert proc(conv, videos=[frames])["pixel_values"].shape[0] == 5  # 8 asked, the seed's rule keeps 5


def test_decoder_frame_resize_option(tmp_path, smol_tok):
    """`frame_resize="decoder"` (the data config's option) resizes in the decoder: the same tokens and frames,
    pixel values close to the default PIL path's."""
    path = tmp_path / "clip.mp4"
    encode(moving_square(20, size=64), path, fps=10)
    conv = [{"role": "user", "content": "<video>\nWhich way?"}, {"role": "assistant", "content": "right"}]
    proc = Processor(smol_tok, tiny_config(**INTERNVL)).with_options(num_frames=5)
    exact = proc(conv, videos=[path])
    fast = proc.with_options(frame_resize="decoder")(conv, videos=[path])
    assert fast["input_ids"].tolist() == exact["input_ids"].tolist()
    assert fast["pixel_values"].shape == exact["pixel_values"].shape
    diff = (fast["pixel_values"] - exact["pixel_values"]).abs()  # normalised units: 1/255 is ~0.017
    assert diff.mean() < 0.05, diff.mean()
    from stitch.data.config import DataConfig

    assert DataConfig.model_fields["frame_resize"].default == "exact"


def test_clips_are_sampled_within_their_bounds(tmp_path, smol_tok):
    """A `VideoClip` (MVBench's start/end) through the processor: the frames and their timestamps come from
    within [start, end], by the processor's rule."""
    from stitch.data.video import VideoClip

    path = tmp_path / "clip.mp4"
    encode(numbered_frames(80), path, fps=8, gop=10)
    config = tiny_config(**INTERNVL, video_timestamps=True, video_sampling="internvl")
    proc = Processor(smol_tok, config).with_options(num_frames=4)
    batch = proc([{"role": "user", "content": "<video>Go"}], videos=[VideoClip(str(path), 2.0, 6.0)],
                 add_generation_prompt=True)
    text = smol_tok.decode(batch["input_ids"][0])
    # get_index((2, 6), 8, 79, 0, 4) = 20, 28, 36, 44 -> 2.5 s ... 5.5 s
    assert "Frame1 (2.5s):" in text and "Frame2 (3.5s):" in text and "Frame4 (5.5s):" in text
    whole = proc([{"role": "user", "content": "<video>Go"}], videos=[path], add_generation_prompt=True)
    assert "Frame1 (1.1s):" in smol_tok.decode(whole["input_ids"][0])  # the whole video: 9, 29, 49, 68
    assert batch["pixel_values"].shape == whole["pixel_values"].shape
    assert not torch.equal(batch["pixel_values"], whole["pixel_values"])
