"""Videos to frames: safe probing and decoding through PyAV, and the frame-sampling rules of the systems we follow.

Why probe first: the processor's visual-token budget lowers a video's frame count before it cuts text, and that
needs only the frame count and rate, which the container header gives. Pixels are then decoded once, for the
chosen frames only: each wanted frame is reached by seeking to the key frame before its timestamp and decoding
forward (a wanted frame not far ahead is reached by reading on instead), so a 16-frame sample of an hour-long
video decodes a few GOPs, not the hour. Decoding is single-threaded by default (a data worker is one core) and
drops the non-reference frames presented before the one sought (`DecodeOptions`): the same pixels for less work.
A `VideoClip` restricts sampling to [start, end] seconds (MVBench's bounds; `clip_indices`).

Nothing silent: a file that is missing, not a video, corrupt, truncated (ends before a wanted frame), has no
frames, or is over a limit (bytes, duration, pixels per frame, frames) raises `SampleError` with a reason from
`stitch.data.skips.REASONS`; training skips and counts it, the server answers 4xx, `generate` reports it.

Sources: a video file (mp4, webm, mkv, avi, anything FFmpeg reads), its bytes, a folder of frame images (sorted
by name, numbers compared as numbers; `frames_fps` gives their rate), or frames already decoded (a list of PIL
images or a uint8 array [F, H, W, 3]).

Sampling rules (`sample_indices`), all returning sorted frame indices into [0, F):
- "uniform" (the seed system, Megatron's `dataset_helpers.py`): `linspace(0, F-1, min(n, F))` rounded down.
- "internvl" (InternVL's `get_index`): F split into n equal segments, the middle frame of each.
- "hf" (transformers' `InternVLVideoProcessor.sample_frames`): `arange(F/n/2, F, F/n)` truncated to int.
- "fps": `fps` frames per second of video (transformers' count rule), capped by `max_frames`, at segment middles.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stitch.data.image import load_image
from stitch.data.skips import SampleError

__all__ = [
    "VideoInput",
    "VideoClip",
    "clip_indices",
    "VideoLimits",
    "VideoInfo",
    "Video",
    "DecodeOptions",
    "EXACT",
    "SAMPLING_RULES",
    "uniform_indices",
    "internvl_indices",
    "hf_indices",
    "sample_indices",
    "probe_video",
    "decode_frames",
    "load_video",
    "frame_steps",
]



@dataclass(frozen=True)
class VideoClip:
    """A video whose frames are sampled only within [start, end] seconds, as MVBench's evaluation does for the
    questions that carry a `start`/`end` (`clip_indices`).

    `first_frame` is the number the reference gives the first frame (MVBench's frame folders are named from
    00001.jpg, and its `get_index` counts from 1 for them); `fps` is a frame folder's rate (MVBench's TVQA
    frames: 3), None for a file, whose header gives it."""

    source: str | Path | bytes | np.ndarray | Sequence[Image.Image]
    start: float
    end: float
    first_frame: int = 0
    fps: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.start) and math.isfinite(self.end)) or self.end < self.start:
            raise ValueError(f"a clip needs finite start <= end seconds, got [{self.start}, {self.end}]")


VideoInput = str | Path | bytes | np.ndarray | Sequence[Image.Image] | VideoClip
SAMPLING_RULES = ("uniform", "internvl", "hf", "fps")
FRAME_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
# Wanted frames at most this many frames apart are reached by decoding forward instead of a new seek: a seek
# restarts at the key frame before the target, so for close targets decoding on is never slower.
SEEK_GAP_FRAMES = 32
# With `DecodeOptions.look_ahead`, wanted frames up to this many frames ahead are reached by demuxing on (cheap:
# nothing is decoded) to the last key frame before them, or decoding on when there is none: never more work
# than a seek, which lands on that same key frame.
LOOK_AHEAD_FRAMES = 300


@dataclass(frozen=True)
class VideoLimits:
    """What a video may be before it is refused (`video_too_large`): checked on the header, before decoding."""

    max_bytes: int = 4 << 30
    max_duration_s: float = 4 * 3600.0
    max_pixels: int = 4096 * 2304  # per frame (4K DCI fits)
    max_frames: int = 1_000_000  # frames in the stream


@dataclass(frozen=True)
class VideoInfo:
    """A video's header facts; `total_frames` is exact (the container's count, or its packets counted)."""

    total_frames: int
    fps: float
    width: int
    height: int
    name: str = "<video>"

    @property
    def duration(self) -> float:
        return self.total_frames / self.fps if self.fps > 0 else 0.0


@dataclass
class Video:
    """Sampled frames (RGB PIL images) with their indices into the source and timestamps in seconds."""

    frames: list[Image.Image]
    indices: list[int]
    info: VideoInfo
    timestamps: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.frames)


# ------------------------------------------------------------------ frame sampling
def uniform_indices(total: int, num_frames: int) -> list[int]:
    """The seed system's rule: `linspace(0, F-1, min(n, F))`, floored."""
    n = min(num_frames, total)
    return np.linspace(0, total - 1, n).astype(np.int64).tolist()


def internvl_indices(
    total: int, num_frames: int, fps: float | None = None, bound: tuple[float, float] | None = None, first_idx: int = 0
) -> list[int]:
    """InternVL's `get_index` (its `load_video`, `max_frame = len(video) - 1`): the middles of n equal segments
    of [start, end]; `bound` (seconds, needs `fps`) restricts it to a clip, as MVBench's loader does."""
    max_frame = total - 1
    start, end = bound if bound else (-100000.0, 100000.0)
    rate = fps if fps else 1.0
    start_idx = max(first_idx, round(start * rate))
    end_idx = min(round(end * rate), max_frame)
    seg_size = float(end_idx - start_idx) / num_frames
    return [int(start_idx + seg_size / 2 + np.round(seg_size * idx)) for idx in range(num_frames)]


def hf_indices(total: int, num_frames: int) -> list[int]:
    """transformers' `InternVLVideoProcessor.sample_frames` with `initial_shift=True` (torch's float arange,
    so the same float32 steps give the same truncation)."""
    if num_frames > total:
        raise SampleError("video_too_large", f"{num_frames} frames asked of a video of {total}")
    shift = total / num_frames / 2
    return torch.arange(shift, total, total / num_frames).int().tolist()


def sample_indices(
    total: int,
    num_frames: int = 8,
    rule: str = "uniform",
    *,
    video_fps: float | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
) -> list[int]:
    """Frame indices by `rule` (see module docstring); `max_frames` caps every rule's count."""
    if total < 1:
        raise SampleError("empty_video", "the video has no frames")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    n = min(num_frames, max_frames) if max_frames else num_frames
    if rule == "uniform":
        return uniform_indices(total, n)
    if rule == "internvl":
        return internvl_indices(total, n)
    if rule == "hf":
        return hf_indices(total, min(n, total))
    if rule == "fps":
        if not fps or not video_fps:
            raise ValueError("the 'fps' rule needs the video's frame rate and a target fps")
        count = max(1, int(total / video_fps * fps))
        if max_frames:
            count = min(count, max_frames)
        return hf_indices(total, min(count, total))
    raise ValueError(f"unknown frame sampling rule {rule!r}; expected one of {SAMPLING_RULES}")


def clip_indices(
    clip: VideoClip,
    total: int,
    video_fps: float,
    num_frames: int = 8,
    rule: str = "uniform",
    *,
    fps: float | None = None,
    max_frames: int | None = None,
) -> list[int]:
    """Frame indices (0-based, into [0, total)) of `rule` applied to the clip's frames only.

    "internvl" is MVBench's own rule: InternVL's `get_index(bound, fps, max_frame, first_idx)` verbatim, with
    `max_frame` the last frame's number in the reference's counting (`len(video) - 1` for a file,
    `len(frames)` for a frame folder counted from 1). Other rules sample [round(start*fps), round(end*fps)]
    (clamped to the video) as they would a whole video of those frames."""
    if total < 1:
        raise SampleError("empty_video", "the video has no frames")
    n = min(num_frames, max_frames) if max_frames else num_frames
    first = clip.first_frame
    lo = max(first, round(clip.start * video_fps))
    hi = min(round(clip.end * video_fps), total - 1 + first)
    if lo > hi:
        raise SampleError("empty_video", f"the clip [{clip.start}, {clip.end}] s holds no frame of a video of "
                                         f"{total} frames at {video_fps:g} fps")
    if rule == "internvl":
        return [i - first for i in internvl_indices(total + first, n, video_fps, (clip.start, clip.end), first)]
    return [i + lo - first for i in sample_indices(hi - lo + 1, n, rule, video_fps=video_fps, fps=fps,
                                                   max_frames=max_frames)]


def frame_steps(num_frames: int, min_frames: int = 1) -> list[int]:
    """Frame counts to try, largest first, when a sample's visual tokens overflow: halving down to `min_frames`."""
    out, n = [num_frames], num_frames
    while n > min_frames:
        n = max(min_frames, n // 2)
        out.append(n)
    return out


# ------------------------------------------------------------------ probing and decoding
def _name(src: VideoInput) -> str:
    if isinstance(src, (str, Path)):
        return str(src)
    return "<bytes>" if isinstance(src, bytes) else "<frames>"


def _frame_files(folder: Path) -> list[Path]:
    def natural(p: Path):
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]

    return sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=natural)


def _open_container(src: str | Path | bytes, limits: VideoLimits):
    import av  # PyAV; imported here so `stitch.data` imports stay cheap for image-only work

    name = _name(src)
    if isinstance(src, bytes):
        size = len(src)
    else:
        path = Path(src)
        if not path.exists():
            raise SampleError("missing_file", f"{name}: no such file")
        size = path.stat().st_size
    if size > limits.max_bytes:
        raise SampleError("video_too_large", f"{name}: {size} bytes > max_bytes {limits.max_bytes}")
    if size == 0:
        raise SampleError("empty_video", f"{name}: empty file")
    try:
        container = av.open(io.BytesIO(src) if isinstance(src, bytes) else str(src), metadata_errors="ignore")
    except (av.FFmpegError, OSError, ValueError) as e:  # FFmpeg's text without its repeat of the path
        raise SampleError("unreadable_video", f"{name}: {getattr(e, 'strerror', None) or e}") from e
    if not container.streams.video:
        container.close()
        raise SampleError("empty_video", f"{name}: no video stream")
    return container


def _count_packets(container, stream, limits: VideoLimits, name: str) -> int:
    """Frames of a stream whose container does not store the count (webm, mkv): its packets, demuxed (cheap;
    nothing is decoded)."""
    import av

    count = 0
    try:
        for packet in container.demux(stream):
            if packet.size:
                count += 1
                if count > limits.max_frames:
                    raise SampleError("video_too_large", f"{name}: more than max_frames {limits.max_frames} frames")
    except av.FFmpegError as e:
        raise SampleError("truncated_video", f"{name}: {e}") from e
    container.seek(0)
    return count


def _stream_info(container, name: str, limits: VideoLimits) -> VideoInfo:
    stream = container.streams.video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    if width * height > limits.max_pixels:
        raise SampleError("video_too_large", f"{name}: {width}x{height} pixels > max_pixels {limits.max_pixels}")
    if width < 1 or height < 1 or fps <= 0:
        raise SampleError(
            "unreadable_video", f"{name}: no frame size or rate in the header ({width}x{height}, {fps} fps)"
        )
    total = int(stream.frames or 0)
    if total == 0:
        seconds = float(stream.duration * stream.time_base) if stream.duration else (container.duration or 0) / 1e6
        if seconds > limits.max_duration_s:
            raise SampleError("video_too_large", f"{name}: {seconds:.0f} s > max_duration_s {limits.max_duration_s}")
        total = _count_packets(container, stream, limits, name)
    info = VideoInfo(total_frames=total, fps=fps, width=width, height=height, name=name)
    if total < 1:
        raise SampleError("empty_video", f"{name}: the video has no frames")
    if total > limits.max_frames:
        raise SampleError("video_too_large", f"{name}: {total} frames > max_frames {limits.max_frames}")
    if info.duration > limits.max_duration_s:
        raise SampleError("video_too_large", f"{name}: {info.duration:.0f} s > max_duration_s {limits.max_duration_s}")
    return info


def probe_video(src: VideoInput, limits: VideoLimits = VideoLimits(), frames_fps: float = 1.0) -> VideoInfo:
    """Frame count, rate and size from the header (or the folder / the frames given); nothing is decoded."""
    if isinstance(src, VideoClip):
        return probe_video(src.source, limits, src.fps or frames_fps)
    name = _name(src)
    if isinstance(src, np.ndarray) or (isinstance(src, Sequence) and not isinstance(src, (str, bytes))):
        if len(src) == 0:
            raise SampleError("empty_video", f"{name}: no frames")
        first = src[0]
        w, h = (first.shape[1], first.shape[0]) if isinstance(first, np.ndarray) else first.size
        return VideoInfo(total_frames=len(src), fps=frames_fps, width=w, height=h, name=name)
    if isinstance(src, (str, Path)) and Path(src).is_dir():
        files = _frame_files(Path(src))
        if not files:
            raise SampleError("empty_video", f"{name}: a folder with no frame images ({sorted(FRAME_SUFFIXES)})")
        if len(files) > limits.max_frames:
            raise SampleError("video_too_large", f"{name}: {len(files)} frames > max_frames {limits.max_frames}")
        with Image.open(files[0]) as im:
            w, h = im.size
        return VideoInfo(total_frames=len(files), fps=frames_fps, width=w, height=h, name=name)
    container = _open_container(src, limits)
    try:
        return _stream_info(container, name, limits)
    finally:
        container.close()


# Codecs whose decoders honour `skip_frame=NONREF` (a non-reference frame is dropped, never needed by another
# frame) in containers that store each packet's presentation time, so a packet can be told to be before the
# wanted frame before it is decoded. AVI stores no presentation times (its B-frames' packets carry decode order).
SKIP_NONREF_CODECS = {"h264", "hevc", "vp8", "vp9", "mpeg2video"}
NO_PTS_FORMATS = {"avi"}


@dataclass(frozen=True)
class DecodeOptions:
    """How frames are decoded; the defaults are the fast path, whose frames equal the exact path's (`EXACT`).

    - `threads`: decoder threads; 1 (one core per data worker) costs the least CPU per frame: FFmpeg's frame
      threads restart their pipeline at every seek. 0 lets FFmpeg choose (frame + slice threads on all cores).
    - `skip_nonref`: packets presented before the frame being sought that no other frame refers to are not
      decoded (`skip_frame=NONREF`, set per packet before it is sent, only for `SKIP_NONREF_CODECS` in
      containers with presentation times). Dropping a frame nothing refers to cannot change another frame, so
      the wanted frames' pixels are unchanged (tested bit for bit, with B-frames).
    - `look_ahead`: the next wanted frame, when at most `LOOK_AHEAD_FRAMES` ahead, is reached by reading
      packets on without decoding them: from the last key frame before it if one comes first (what a seek
      would decode), else by decoding on from the current position (less than a seek would decode).
    - `size` (width, height): frames come back at that size, converted and resized in one swscale bicubic pass
      from the decoder's YUV, instead of full-size RGB that the processor then resizes with PIL. Cheaper
      (docs/video.md) but not the same pixels: they differ from PIL's by ~1/255 on average (chroma is scaled
      from its own plane), so it is off by default and training opts in (`frame_resize: decoder`); parity
      with transformers' processors, which resize full frames, needs the default. Files only.
    """

    threads: int = 1
    skip_nonref: bool = True
    look_ahead: bool = True
    size: tuple[int, int] | None = None


EXACT = DecodeOptions(threads=0, skip_nonref=False, look_ahead=False)


def _decode_file(
    src: str | Path | bytes, indices: Sequence[int], limits: VideoLimits, options: DecodeOptions = DecodeOptions()
) -> tuple[list[np.ndarray], VideoInfo]:
    import av

    name = _name(src)
    container = _open_container(src, limits)
    try:
        info = _stream_info(container, name, limits)
        stream = container.streams.video[0]
        if options.threads == 1:
            stream.thread_type, stream.thread_count = "SLICE", 1
        else:
            stream.thread_type, stream.thread_count = "AUTO", options.threads
        codec = stream.codec_context
        skip = options.skip_nonref and codec.name in SKIP_NONREF_CODECS and \
            not NO_PTS_FORMATS.intersection(container.format.name.split(","))
        base = stream.start_time or 0
        tb = float(stream.time_base)

        def index_at(pts: int | None) -> int:
            return int(round((pts - base) * tb * info.fps)) if pts is not None else -1

        def index_of(frame) -> int:
            return index_at(frame.pts if frame.pts is not None else frame.dts)

        target = 0
        width, height = options.size or (None, None)

        def to_rgb(frame) -> np.ndarray:
            if options.size is None:
                return frame.to_ndarray(format="rgb24")
            return frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="BICUBIC")

        def send(packets):
            """Decode `packets`; each non-reference one presented before `target` (read at each packet, as the
            caller moves it) is dropped by the decoder when `skip` is on."""
            for packet in packets:
                early = skip and not packet.is_keyframe and packet.pts is not None and index_at(packet.pts) < target
                codec.skip_frame = "NONREF" if early else "DEFAULT"
                yield from codec.decode(packet)

        def decoded():
            """Frames in presentation order from the current position. With `look_ahead`, packets presented
            before `target` are held, undecoded, until one at or past it arrives; a key frame among them drops
            those before it (and what the decoder holds, all presented earlier), as a seek to it would."""
            held, restart = [], False
            for packet in container.demux(stream):
                if packet.size == 0:  # end of stream: drain the decoder
                    break
                if options.look_ahead and packet.pts is not None and index_at(packet.pts) < target:
                    if packet.is_keyframe:
                        held, restart = [packet], True
                    else:
                        held.append(packet)
                    continue
                if restart:
                    codec.flush_buffers()
                    restart = False
                batch, held = held + [packet], []
                yield from send(batch)
            if restart:
                codec.flush_buffers()
            yield from send(held)
            codec.skip_frame = "DEFAULT"
            yield from codec.decode(None)

        wanted = sorted(set(int(i) for i in indices))
        if wanted and (wanted[0] < 0 or wanted[-1] >= info.total_frames):
            raise ValueError(f"{name}: frame indices {wanted[0]}..{wanted[-1]} outside 0..{info.total_frames - 1}")
        got: dict[int, np.ndarray] = {}
        frames, pos = None, -(10**9)
        for idx in wanted:
            target = idx
            gap = LOOK_AHEAD_FRAMES if options.look_ahead else SEEK_GAP_FRAMES
            if frames is None or idx - pos > gap or idx <= pos:
                container.seek(base + int(idx / info.fps / tb), stream=stream, backward=True, any_frame=False)
                codec.flush_buffers()
                frames = decoded()
            try:
                for frame in frames:
                    pos = index_of(frame)
                    if pos >= idx:
                        got[idx] = to_rgb(frame)
                        break
            except av.FFmpegError as e:
                raise SampleError("truncated_video", f"{name}: decoding frame {idx} failed ({e})") from e
            if idx not in got:
                raise SampleError(
                    "truncated_video", f"{name}: ends before frame {idx} of the {info.total_frames} its header declares"
                )
        return [got[int(i)] for i in indices], info
    finally:
        container.close()


def decode_frames(
    src: VideoInput,
    indices: Sequence[int],
    limits: VideoLimits = VideoLimits(),
    frames_fps: float = 1.0,
    options: DecodeOptions = DecodeOptions(),
) -> tuple[list[Image.Image], VideoInfo]:
    """The frames at `indices` (RGB PIL images, in the order given) and the video's info; `options` say how a
    video file is decoded (`EXACT` for FFmpeg's threads and no skipping)."""
    if isinstance(src, VideoClip):
        return decode_frames(src.source, indices, limits, src.fps or frames_fps, options)
    if isinstance(src, (str, Path, bytes)) and not (isinstance(src, (str, Path)) and Path(src).is_dir()):
        arrays, info = _decode_file(src, indices, limits, options)
        return [Image.fromarray(a) for a in arrays], info
    info = probe_video(src, limits, frames_fps)
    if isinstance(src, (str, Path)):
        files = _frame_files(Path(src))
        return [load_image(files[i], limits.max_pixels) for i in indices], info
    frames = [src[i] for i in indices]
    out = [Image.fromarray(np.asarray(f, dtype=np.uint8)) if isinstance(f, np.ndarray) else f.convert("RGB")
           for f in frames]
    return out, info


def load_video(
    src: VideoInput,
    num_frames: int = 8,
    rule: str = "uniform",
    *,
    fps: float | None = None,
    max_frames: int | None = None,
    limits: VideoLimits = VideoLimits(),
    frames_fps: float = 1.0,
    info: VideoInfo | None = None,
    options: DecodeOptions = DecodeOptions(),
) -> Video:
    """Probe, sample by `rule` (within the clip for a `VideoClip`), decode only the sampled frames."""
    info = info or probe_video(src, limits, frames_fps)
    if isinstance(src, VideoClip):
        indices = clip_indices(src, info.total_frames, info.fps, num_frames, rule, fps=fps, max_frames=max_frames)
    else:
        indices = sample_indices(info.total_frames, num_frames, rule, video_fps=info.fps, fps=fps,
                                 max_frames=max_frames)
    frames, info = decode_frames(src, indices, limits, frames_fps, options)
    return Video(frames=frames, indices=list(indices), info=info, timestamps=[i / info.fps for i in indices])


def seconds(value: float) -> str:
    """A timestamp as the per-frame layout prints it ("1.5s")."""
    return f"{math.floor(value * 10 + 0.5) / 10:.1f}s"
