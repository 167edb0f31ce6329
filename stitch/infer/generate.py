"""`stitch.generate`, `generate_batch` and the `stitch generate` command: conversations in, text out.

These are thin front ends: prompts go through the model's own `Processor` (chat template, tiling, image
tokens) into `Request`s, and an `Engine` (`stitch.infer.engine`) runs them with a static KV cache. One engine
is kept per model so repeated calls reuse its CUDA graphs; `get_engine(model, processor)` returns it for
callers (eval, server) that want the lower-level API.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from stitch.device import DTYPES, compute_dtype, resolve_device
from stitch.errors import StitchError
from stitch.infer.engine import Completion, Engine, Event, Request, RequestHandle, eos_token_ids
from stitch.infer.pretrained import load_pretrained
from stitch.infer.sampling import SamplingParams

__all__ = [
    "generate",
    "generate_batch",
    "get_engine",
    "build_conversation",
    "Engine",
    "Request",
    "Event",
    "Completion",
    "RequestHandle",
    "SamplingParams",
    "eos_token_ids",
    "generate_cmd",
    "generate_cmd_arguments",
]

_ENGINE_ATTR = "_stitch_engine"


def get_engine(model, processor, **engine_kwargs: Any) -> Engine:
    """The engine cached on `model`: created on first use, and again for another processor or when
    `engine_kwargs` (Engine options) are given and differ from the cached engine's."""
    engine = model.__dict__.get(_ENGINE_ATTR)
    options = tuple(sorted(engine_kwargs.items()))
    stale = engine is None or engine.processor is not processor or (options and engine._options != options)
    if stale:
        if engine is not None:
            engine.close()
        engine = Engine(model, processor, **engine_kwargs)
        engine._options = options
        model.__dict__[_ENGINE_ATTR] = engine
    return engine


def build_conversation(prompt: str, num_images: int, system: str | None = None,
                       num_videos: int = 0) -> list[dict[str, str]]:
    """One user turn; without `<image>` (`<video>`) placeholders in `prompt`, one `<image>\\n` per image (one
    `<video>\\n` per video, before the images) goes first."""
    if num_images and "<image>" not in prompt:
        prompt = "<image>\n" * num_images + prompt
    if num_videos and "<video>" not in prompt:
        prompt = "<video>\n" * num_videos + prompt
    conversation = [{"role": "system", "content": system}] if system else []
    return conversation + [{"role": "user", "content": prompt}]


def _as_list(images) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def generate(
    model,
    processor,
    images,
    prompt: str,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    stop: str | Sequence[str] | None = None,
    seed: int | None = None,
    stream: bool = False,
    system: str | None = None,
    videos=None,
    num_frames: int | None = None,
) -> str | Iterator[str]:
    """Answer `prompt` about `images` (paths or PIL images, a list or just one; None for text only) and
    `videos` (video files, frame folders or decoded frames; `num_frames` sampled from each, default the model
    config's `video_frames`). A bad video raises `SampleError` naming the file and the reason.

    Returns the reply text, or with `stream=True` an iterator of text pieces that join to it. Temperature 0 is
    greedy; a `seed` makes sampling reproducible (and independent of batching). Generation ends at the
    tokenizer's EOS / the template's end-of-turn token, at a `stop` string (cut from the text), or after
    `max_new_tokens`.
    """
    images = _as_list(images)
    videos = [] if videos is None else [videos] if isinstance(videos, (str, Path, bytes)) else list(videos)
    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        repetition_penalty=repetition_penalty, stop=stop, seed=seed,
    )
    engine = get_engine(model, processor)
    request = engine.prepare(build_conversation(prompt, len(images), system, len(videos)), images, params,
                             videos, num_frames)
    if stream:
        return (event.text for event in engine.stream([request]) if event.text)
    return engine.generate([request])[0].text


def generate_batch(
    model,
    processor,
    conversations: Sequence[Sequence[dict]],
    images: Sequence[Sequence] | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    stop: str | Sequence[str] | None = None,
    seed: int | None = None,
    max_batch_size: int = 64,
    videos: Sequence[Sequence] | None = None,
    num_frames: int | None = None,
    fit_context: bool = False,
) -> list[str]:
    """Replies to many conversations (`[{"role", "content"}]` with `<image>` placeholders), batched.

    `images[i]` are conversation i's images (None or [] for text only), `videos[i]` its videos. Each row samples
    with `seed` as if it ran alone, so the result does not depend on batch composition; greedy results equal
    one-by-one runs. `fit_context`: a row whose prompt leaves fewer than `max_new_tokens` positions in the
    model's context gets only those (benchmarks whose reference budget, e.g. MathVista's 16,384, exceeds the
    context: the KV cache is allocated for the whole budget, and positions past the context were never trained).
    """
    if images is None:
        images = [[] for _ in conversations]
    if len(images) != len(conversations):
        raise StitchError(f"{len(conversations)} conversations but {len(images)} image lists")
    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        repetition_penalty=repetition_penalty, stop=stop, seed=seed,
    )
    engine = get_engine(model, processor)
    videos = videos if videos is not None else [[] for _ in conversations]
    if len(videos) != len(conversations):
        raise StitchError(f"{len(conversations)} conversations but {len(videos)} video lists")
    requests = [engine.prepare(conv, _as_list(imgs), params, _as_list(vids), num_frames)
                for conv, imgs, vids in zip(conversations, images, videos)]
    if fit_context:
        context = engine.model.config.llm.max_position_embeddings
        for r in requests:
            room = context - int(r.input_ids.numel())
            if 1 <= room < r.params.max_new_tokens:
                r.params = dataclasses.replace(r.params, max_new_tokens=room)
    return [c.text for c in engine.generate(requests, max_batch_size=max_batch_size)]


# ------------------------------------------------------------------------------------------- command line



def generate_cmd_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a Stitch checkpoint folder (or an HF InternVL/LLaVA folder)")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="an image file (repeat for several; they go before the prompt unless it has <image>)")
    parser.add_argument("--video", action="append", default=[], metavar="PATH",
                        help="a video file or a folder of frames (repeatable; goes first unless the prompt has "
                             "<video>)")
    parser.add_argument("--num-frames", type=int, default=None, metavar="N",
                        help="frames sampled per video (default: the model config's video_frames)")
    parser.add_argument("--prompt", required=True, help="the user message")
    parser.add_argument("--system", default=None, help="a system message")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--stop", action="append", default=None, metavar="TEXT", help="a stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stream", action="store_true", help="print the reply as it is generated")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES),
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA)")


def generate_cmd(args: argparse.Namespace) -> int:
    """Answer a prompt about images or videos with a checkpoint.

    Example:
      stitch generate ckpt/sft --image cat.jpg --prompt "What animal is this?" --max-new-tokens 64 --stream
      stitch generate ckpt/video-sft --video clip.mp4 --num-frames 16 --prompt "What happens?"
    """
    for path in args.image:
        if not Path(path).is_file():
            raise StitchError(f"{path}: no such image file")
    for path in args.video:
        if not Path(path).exists():
            raise StitchError(f"{path}: no such video file or frame folder")
    if args.num_frames is not None and args.num_frames < 1:
        raise StitchError(f"--num-frames must be >= 1, got {args.num_frames}")
    torch_device = resolve_device(args.device)
    compute = compute_dtype(torch_device, args.dtype)
    try:
        model, processor = load_pretrained(args.checkpoint, device=torch_device, dtype=compute.dtype)
    except StitchError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise StitchError(f"{args.checkpoint}: cannot load the checkpoint ({type(e).__name__}: {e})") from e
    print(f"stitch generate: {compute}", file=sys.stderr)
    if args.compile:
        get_engine(model, processor, compile=True)
    kwargs = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed, system=args.system,
        videos=args.video, num_frames=args.num_frames,
    )
    if args.stream:
        for piece in generate(model, processor, args.image, args.prompt, stream=True, **kwargs):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        print(generate(model, processor, args.image, args.prompt, **kwargs))
    return 0
