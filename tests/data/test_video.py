"""Video reading and frame sampling on real files the tests encode with PyAV (mp4, webm, mkv, avi, frame
folders); bad videos raise `SampleError` with their skip reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from stitch.data.skips import REASONS, SampleError
from stitch.data.video import (
    EXACT,
    DecodeOptions,
    VideoClip,
    VideoLimits,
    clip_indices,
    decode_frames,
    frame_steps,
    load_video,
    probe_video,
    sample_indices,
)

from .video_clips import CODECS, encode, frame_number, moving_square, numbered_frames


@pytest.mark.parametrize("container", sorted(CODECS))
def test_each_container_decodes_the_frames_asked_for(tmp_path, container):
    path = tmp_path / f"clip.{container}"
    encode(numbered_frames(24), path, container=container, fps=8, gop=6)
    info = probe_video(path)
    assert (info.total_frames, info.fps, info.width, info.height) == (24, 8.0, 64, 64)
    wanted = [0, 5, 6, 13, 23, 2]  # unsorted on purpose: frames come back in the order asked
    frames, _ = decode_frames(path, wanted)
    assert [frame_number(f) for f in frames] == wanted
    assert all(f.mode == "RGB" and f.size == (64, 64) for f in frames)


def test_far_apart_frames_are_reached_by_seeking(tmp_path):
    path = tmp_path / "long.mp4"
    encode(numbered_frames(200), path, fps=25, gop=10, faststart=True)
    wanted = [0, 1, 97, 98, 150, 199, 40]
    frames, info = decode_frames(path, wanted)
    assert info.total_frames == 200
    assert [frame_number(f) for f in frames] == wanted
    video = load_video(path, num_frames=5, rule="uniform")
    assert video.indices == [0, 49, 99, 149, 199]
    assert [frame_number(f) for f in video.frames] == video.indices
    assert video.timestamps == pytest.approx([i / 25 for i in video.indices])
    # B-frames (decode order differs from display order): still the frames asked for
    bframes = encode(numbered_frames(120), fps=25, gop=30, preset="medium")
    wanted = [3, 4, 33, 61, 62, 90, 119, 7]
    assert [frame_number(f) for f in decode_frames(bframes, wanted)[0]] == wanted


def test_frame_folder_and_decoded_frames(tmp_path):
    frames = numbered_frames(12)
    folder = tmp_path / "frames"
    folder.mkdir()
    for t, f in enumerate(frames):  # names sorted as numbers: frame_2 before frame_10
        Image.fromarray(f).save(folder / f"frame_{t}.png")
    (folder / "notes.txt").write_text("not a frame")
    video = load_video(folder, num_frames=4, rule="internvl", frames_fps=2.0)
    assert video.info.total_frames == 12 and video.timestamps == [i / 2.0 for i in video.indices]
    assert [frame_number(f) for f in video.frames] == video.indices
    from_array = load_video(frames, num_frames=4, rule="internvl")
    assert [frame_number(f) for f in from_array.frames] == video.indices
    from_pil = load_video([Image.fromarray(f) for f in frames], num_frames=3)
    assert [frame_number(f) for f in from_pil.frames] == [0, 5, 11]


def _reference_get_index(bound, fps, max_frame, first_idx=0, num_segments=32):
    """InternVL's `get_index` verbatim (OpenGVLab/InternVL, internvl_chat README / video demo)."""
    if bound:
        start, end = bound[0], bound[1]
    else:
        start, end = -100000, 100000
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    frame_indices = np.array([
        int(start_idx + (seg_size / 2) + np.round(seg_size * idx))
        for idx in range(num_segments)
    ])
    return frame_indices


PAIRS = [(f, n) for f in (1, 2, 3, 7, 8, 16, 17, 31, 64, 100, 127, 300, 1001, 4500) for n in (1, 4, 8, 16, 32)]


def test_sampling_rules_equal_their_references():
    assert len(PAIRS) >= 50
    for total, n in PAIRS:
        # the seed system (Megatron dataset_helpers): linspace(0, F-1, min(n, F)), floored
        seed = np.linspace(0, total - 1, min(n, total)).astype(int).tolist()
        assert sample_indices(total, n, "uniform") == seed, (total, n)
        ref = _reference_get_index(None, 30.0, total - 1, num_segments=n).tolist()
        assert sample_indices(total, n, "internvl") == ref, (total, n)
        got = sample_indices(total, n, "hf")
        assert got == sorted(got) and len(got) == min(n, total) and got[0] >= 0 and got[-1] < total
    # the seed's rule never repeats a frame; InternVL's does when n > F (it always returns n indices)
    assert sample_indices(3, 8, "uniform") == [0, 1, 2]
    assert len(sample_indices(3, 8, "internvl")) == 8


def test_fps_rule_and_caps():
    # 10 s at 30 fps, 2 frames per second -> 20 frames at segment middles; capped by max_frames
    got = sample_indices(300, 8, "fps", video_fps=30.0, fps=2.0)
    assert len(got) == 20 and got[0] == 7 and got[-1] == 292
    assert len(sample_indices(300, 8, "fps", video_fps=30.0, fps=2.0, max_frames=6)) == 6
    assert len(sample_indices(300, 16, "uniform", max_frames=4)) == 4
    assert frame_steps(16) == [16, 8, 4, 2, 1] and frame_steps(6, min_frames=2) == [6, 3, 2]
    with pytest.raises(ValueError, match="unknown frame sampling rule"):
        sample_indices(10, 4, "random")


def test_bad_videos_raise_their_reasons(tmp_path):
    good = encode(numbered_frames(48), tmp_path / "good.mp4", gop=8, faststart=True)
    cases = {
        "missing_file": tmp_path / "nope.mp4",
        "unreadable_video": b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50,
        "truncated_video": good[: len(good) * 2 // 3],
        "empty_video": b"",
    }
    import av

    buf = io.BytesIO()  # a valid container with a video stream and no frames
    out = av.open(buf, "w", format="matroska")
    stream = out.add_stream("libx264", rate=8)
    stream.width = stream.height = 64
    stream.pix_fmt = "yuv420p"
    out.close()
    cases["empty_video "] = buf.getvalue()
    (tmp_path / "empty_dir").mkdir()
    cases["empty_video  "] = tmp_path / "empty_dir"
    for reason, src in cases.items():
        with pytest.raises(SampleError) as err:
            load_video(src, num_frames=48)
        assert err.value.reason == reason.strip() and reason.strip() in REASONS, (reason, err.value)
    # a plain cut mp4 (index at the end) no longer opens: unreadable, not a crash
    plain = encode(numbered_frames(48), gop=8)
    with pytest.raises(SampleError, match="unreadable_video"):
        probe_video(plain[: len(plain) // 2])
    limits = {"max_bytes": 100, "max_pixels": 32 * 32, "max_frames": 10, "max_duration_s": 1.0}
    for key, value in limits.items():
        with pytest.raises(SampleError) as err:
            probe_video(good, VideoLimits(**{key: value}))
        assert err.value.reason == "video_too_large" and key in str(err.value)


def _textured(num_frames: int, size: int = 64) -> np.ndarray:
    """Frames whose every pixel matters: a noise texture sliding by one pixel a frame, and a bright square
    crossing it, so a neighbouring frame or a wrongly predicted block shows as a pixel difference."""
    rng = np.random.default_rng(3)
    texture = rng.integers(0, 255, size=(size, 3 * size, 3), dtype=np.uint8)
    frames = np.stack([texture[:, t % (2 * size) : t % (2 * size) + size] for t in range(num_frames)])
    return frames | moving_square(num_frames, size, seed=4)


FAST_CLIPS = {  # (container, codec, encoder options): B-frames (with B-pyramids), hidden frames, open GOPs
    "h264-bpyramid": ("mp4", "libx264", {"preset": "medium"}),
    "hevc": ("mkv", "libx265", {"preset": "medium"}),
    "vp9": ("webm", "libvpx-vp9", {}),
    "mpeg2-bframes": ("mkv", "mpeg2video", {"bframes": 2, "bit_rate": 4_000_000}),
    # AVI stores no presentation times: decoded without skipping. (With B-frames both paths misplace frames.)
    "mpeg4-avi": ("avi", "mpeg4", {"bit_rate": 4_000_000}),
}


@pytest.mark.parametrize("clip", sorted(FAST_CLIPS))
def test_fast_decoding_returns_the_exact_paths_frames(tmp_path, clip):
    """The default decode (one thread, non-reference frames before the wanted one skipped, key frames reached
    by reading on) returns the same frames, bit for bit, as FFmpeg's plain threaded decode of every frame after
    a seek (`EXACT`), on every index pattern: each frame alone, neighbours, far jumps, repeats, unsorted."""
    container, codec, opts = FAST_CLIPS[clip]
    total = 90
    data = encode(_textured(total), container=container, codec=codec, fps=25, gop=24, **opts)
    numbered = encode(numbered_frames(total), container=container, codec=codec, fps=25, gop=24, **opts)
    rng = np.random.default_rng(0)
    patterns = [list(range(total)), [total - 1, 0, 45, 44, 45], *[rng.integers(0, total, 7).tolist() for _ in range(6)]]
    patterns += [[i] for i in range(0, total, 7)]
    # each saving alone too (on a few patterns): skipping, looking ahead, FFmpeg's threads
    alone = [DecodeOptions(look_ahead=False), DecodeOptions(skip_nonref=False), DecodeOptions(threads=0)]
    for k, wanted in enumerate(patterns):
        exact, _ = decode_frames(data, wanted, options=EXACT)
        for options in [DecodeOptions()] + (alone if k < 3 else []):
            fast, _ = decode_frames(data, wanted, options=options)
            assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(fast, exact)), \
                (clip, wanted, options)
        assert [frame_number(f) for f in decode_frames(numbered, wanted)[0]] == wanted, (clip, wanted)
    assert DecodeOptions() == DecodeOptions(threads=1, skip_nonref=True, look_ahead=True, size=None)


def test_decoder_resize_is_close_to_the_pil_resize(tmp_path):
    """`DecodeOptions(size=...)` (swscale bicubic from YUV while decoding) gives the same frames as decoding
    full size then PIL's bicubic resize, within a documented tolerance (not bit for bit: chroma is scaled from
    its own plane), on a moving scene with colour as smooth as camera footage has it."""
    yy, xx = np.mgrid[0:96, 0:96]
    # detail in brightness, colour varying slowly (as in camera footage; 4:2:0 chroma has a quarter of the
    # samples, and scaling it apart from luma is where the two paths differ most)
    luma = 60 * np.sin(xx / 5.0) * np.cos(yy / 7.0)
    tint = [40 * np.sin(xx / 40.0), 30 * np.cos(yy / 35.0), -40 * np.sin((xx + yy) / 50.0)]
    scene = np.clip(np.stack([127 + luma + t for t in tint], axis=-1), 0, 255).astype(np.uint8)
    frames = np.stack([np.roll(scene, 3 * t, axis=1) for t in range(40)])
    data = encode(frames, container="mp4", fps=20, gop=12, preset="medium")
    wanted = [0, 7, 8, 21, 39, 3]
    exact, _ = decode_frames(data, wanted)
    small, _ = decode_frames(data, wanted, options=DecodeOptions(size=(56, 56)))
    assert all(f.size == (56, 56) and f.mode == "RGB" for f in small)
    ref = np.stack([np.asarray(f.resize((56, 56), Image.BICUBIC), dtype=np.int16) for f in exact])
    diff = np.abs(np.stack([np.asarray(f, dtype=np.int16) for f in small]) - ref)
    assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 6, (diff.mean(), np.percentile(diff, 99))  # 0.94, 4
    # the indices: numbered frames read back the same at the small size
    numbered = encode(numbered_frames(40, size=96), container="mp4", fps=20, gop=12, preset="medium")
    small, _ = decode_frames(numbered, wanted, options=DecodeOptions(size=(48, 48)))
    assert [frame_number(f) for f in small] == wanted


BOUNDS = [(0.0, 1.0), (1.5, 4.0), (2.0, 2.4), (0.3, 100.0), (-5.0, 3.3), (6.0, 9.9)]


def test_clip_sampling_equals_mvbench_get_index():
    """Within a clip, the "internvl" rule is MVBench's `get_index(bound, fps, max_frame, first_idx)` verbatim:
    videos (`max_frame = len - 1`, first_idx 0) and frame folders (`max_frame = len`, first_idx 1, names from 1;
    our indices are 0-based, so one less). Other rules sample the clip's frames as a whole video of them."""
    checked = 0
    for total in (30, 75, 241):
        for fps in (3.0, 10.0, 29.97):
            for start, end in BOUNDS:
                clip = VideoClip("v.mp4", start, end)
                folder = VideoClip("frames", start, end, first_frame=1)
                lo, hi = max(0, round(start * fps)), min(round(end * fps), total - 1)
                for n in (1, 4, 8, 16):
                    if hi < lo:  # a clip past the video's end: no frame to sample
                        with pytest.raises(SampleError, match="holds no frame"):
                            clip_indices(clip, total, fps, n, "internvl")
                        continue
                    ref = _reference_get_index((start, end), fps, total - 1, num_segments=n).tolist()
                    assert clip_indices(clip, total, fps, n, "internvl") == ref, (total, fps, start, end, n)
                    ref1 = _reference_get_index((start, end), fps, total, first_idx=1, num_segments=n).tolist()
                    assert clip_indices(folder, total, fps, n, "internvl") == [i - 1 for i in ref1]
                    got = clip_indices(clip, total, fps, n, "uniform")
                    assert got == [lo + i for i in sample_indices(hi - lo + 1, n, "uniform")]
                    checked += 1
    assert checked >= 50
    with pytest.raises(ValueError, match="start <= end"):
        VideoClip("v.mp4", 3.0, 1.0)


def test_clips_decode_only_their_frames(tmp_path):
    path = tmp_path / "clip.mp4"
    encode(numbered_frames(100), path, fps=10, gop=12)
    video = load_video(VideoClip(str(path), 2.0, 5.0), num_frames=4, rule="internvl")
    assert video.indices == _reference_get_index((2.0, 5.0), 10.0, 99, num_segments=4).tolist()
    assert all(20 <= i <= 50 for i in video.indices)
    assert [frame_number(f) for f in video.frames] == video.indices
    assert video.timestamps == pytest.approx([i / 10 for i in video.indices])
    # a frame folder at 3 fps named from 00001.jpg, as MVBench's TVQA frames are
    folder = tmp_path / "frames"
    folder.mkdir()
    for t, f in enumerate(numbered_frames(30, size=32)):
        Image.fromarray(f).save(folder / f"{t + 1:05d}.png")
    clip = VideoClip(str(folder), 2.0, 6.0, first_frame=1, fps=3.0)
    video = load_video(clip, num_frames=3, rule="internvl")
    names = _reference_get_index((2.0, 6.0), 3.0, 30, first_idx=1, num_segments=3).tolist()  # file numbers
    assert [frame_number(f) + 1 for f in video.frames] == names and video.info.fps == 3.0
