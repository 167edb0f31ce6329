"""Video decode + sample + preprocess throughput (`python bench/data_throughput.py --video`).

A 720p H.264 clip (a photo from `skimage.data` panned and zoomed, so the encoder has real motion and texture
to code; 30 fps, 2 s GOP as cameras and web videos have it) is read the way a training sample reads it:
`stitch.data.video.load_video` probes the header, samples 16 frames by the seed's uniform rule, seeks to each
and decodes only what it must, then every frame is resized to one 448 px tile and normalised as the processor
does. Reported: frames per CPU-second (all of the process's threads counted, so it is per core), the bar
>= 30, and the wall rate; the same with `EXACT` decoding (FFmpeg's threads, every frame decoded) and with the
resize done in the decoder (`frame_resize: decoder`), and CPU milliseconds per frame of each stage.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_clip(path: Path, seconds: float = 20.0, fps: int = 30) -> Path:
    import av
    from skimage import data as skdata

    photo = Image.fromarray(skdata.astronaut()).resize((1920, 1920), Image.BICUBIC)
    out = av.open(str(path), "w")
    stream = out.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
    stream.codec_context.gop_size = 2 * fps
    stream.options = {"preset": "veryfast", "crf": "23"}
    n = int(seconds * fps)
    for t in range(n):
        x, y = int(600 * t / n), int(400 * t / n)
        frame = np.asarray(photo.crop((x, y, x + 1280, y + 720)))
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    return path


def measure(path: Path, samples: int, num_frames: int = 16, size: int = 448, options=None) -> dict:
    from stitch.data.image import ImageProcessor, tile_image
    from stitch.data.video import DecodeOptions, load_video

    options = options or DecodeOptions()
    images = ImageProcessor(image_size=size)
    frames = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for k in range(samples):
        # a different sub-range each time, so no two samples decode the same frames
        video = load_video(path, num_frames + k % 4, "uniform", options=options)
        tiles = np.concatenate([tile_image(f, (1, 1), size, False) for f in video.frames])
        images.normalize(tiles)
        frames += len(video.frames)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"samples": samples, "frames": frames, "frames_per_cpu_s": round(frames / cpu, 1),
            "frames_per_s_wall": round(frames / wall, 1), "cpu_s": round(cpu, 2), "wall_s": round(wall, 2)}


def stages(path: Path, samples: int, num_frames: int = 16, size: int = 448) -> dict:
    """CPU milliseconds per sampled frame of each stage, the decode under each `DecodeOptions` setting."""
    from stitch.data.image import ImageProcessor, tile_image
    from stitch.data.video import EXACT, DecodeOptions, decode_frames, probe_video, sample_indices

    info = probe_video(path)
    plans = [sample_indices(info.total_frames, num_frames + k % 4, "uniform") for k in range(samples)]
    count = sum(len(p) for p in plans)
    out, frames = {}, []
    settings = {"EXACT (FFmpeg threads, seeks, every frame)": EXACT,
                "one thread": DecodeOptions(threads=1, skip_nonref=False, look_ahead=False),
                "one thread, non-ref skipped": DecodeOptions(threads=1, skip_nonref=True, look_ahead=False),
                "default (+ look-ahead to key frames)": DecodeOptions()}
    for label, opts in settings.items():
        cpu = time.process_time()
        frames = [f for p in plans for f in decode_frames(path, p, options=opts)[0]]
        out[f"decode to RGB: {label}"] = round(1000 * (time.process_time() - cpu) / count, 2)
    cpu = time.process_time()
    for p in plans:
        decode_frames(path, p, options=DecodeOptions(size=(size, size)))
    out["decode to 448 px RGB in the decoder (frame_resize: decoder)"] = \
        round(1000 * (time.process_time() - cpu) / count, 2)
    images = ImageProcessor(image_size=size)
    cpu = time.process_time()
    tiles = [tile_image(f, (1, 1), size, False) for f in frames]
    out["resize to one 448 px tile (PIL bicubic)"] = round(1000 * (time.process_time() - cpu) / count, 2)
    cpu = time.process_time()
    for t in tiles:
        images.normalize(t)
    out["normalise"] = round(1000 * (time.process_time() - cpu) / count, 2)
    return {"ms_per_frame": out, "frames": count}


def run(work: Path, samples: int) -> dict:
    from stitch.data.video import EXACT, DecodeOptions

    clip = make_clip(work / "clip720p.mp4")
    measure(clip, 2)  # warm-up
    result = measure(clip, samples)
    exact = measure(clip, max(4, samples // 4), options=EXACT)
    in_decoder = measure(clip, max(4, samples // 2), options=DecodeOptions(size=(448, 448)))
    result.update(clip="1280x720 H.264, 30 fps, 20 s, GOP 60", bar_frames_per_s_per_core=30,
                  meets_bar=result["frames_per_cpu_s"] >= 30, exact_path=exact, resize_in_decoder=in_decoder,
                  stages=stages(clip, max(4, samples // 4)))
    return result
