"""`stitch demo`: chat with a checkpoint in the browser (Gradio), on the engine `stitch serve` uses.

Why it looks like this:
- Gradio is the field's convention for VLM demos (LLaVA, InternVL); it is the optional extra `demo`, imported only
  when a demo is built.
- The page is a thin skin over the same pieces as the HTTP server: images pass `decode_image` and videos
  `decode_video` under the same `Limits` (bytes, pixels and duration from the header before decoding, formats,
  count), prompts are rendered by the model's `Processor` (a video's frames sampled as `stitch generate --video`
  samples them: the model's `video_frames`), and requests go to the shared `Engine` queue, so a greedy answer
  here is `stitch generate`'s.
- A chat is a list of turns kept in the page's session state. A turn that fails (a non-image file, a huge image,
  a corrupt, truncated or too long video, an empty prompt, a reply that would not fit the context) leaves the
  chat as it was and says why in the status line; the user's text stays in the box to fix and resend.
- Images and videos share the upload button; a file is taken as a video by its name (`VIDEO_SUFFIXES`).
- Nothing is fetched from the network: Gradio's analytics are off and the theme uses the system's fonts, so the
  page works (and its console stays clean) on an offline machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from stitch.data.chat import IMAGE_PLACEHOLDER
from stitch.data.skips import SampleError
from stitch.data.video_layout import VIDEO_PLACEHOLDER
from stitch.errors import StitchError
from stitch.infer.api_types import APIError, Limits
from stitch.infer.engine import Engine
from stitch.infer.generate import get_engine
from stitch.infer.image_cache import ImageEmbeddingCache
from stitch.infer.request import IMAGE_FORMATS, decode_image, decode_video
from stitch.infer.sampling import SamplingParams
from stitch.infer.server import (
    add_limit_arguments,
    add_prefix_cache_argument,
    limits_from_args,
    load_for_serving,
    prefix_cache_bytes,
)

__all__ = ["Chat", "DemoBackend", "build_demo", "demo", "demo_arguments", "run_turn", "VIDEO_SUFFIXES"]

STATUS_ID, STATS_ID = "stitch-status", "stitch-stats"
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")


@dataclass(frozen=True)
class Chat:
    """The conversation so far: processor turns (`<image>` / `<video>` placeholders in order), their images and
    their videos (the files' bytes, header-checked; frames are decoded by the processor)."""

    turns: tuple[dict[str, str], ...] = ()
    images: tuple[Image.Image, ...] = field(default=(), repr=False)
    videos: tuple[bytes, ...] = field(default=(), repr=False)


@dataclass
class TurnStats:
    tokens: int = 0
    first_token_s: float | None = None
    seconds: float = 0.0

    def line(self, done: bool) -> str:
        """"12 tokens, 30.1 tokens/s, first token 0.08 s"; while streaming it starts with an hourglass."""
        if not self.tokens:
            return "" if done else "⏳"
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        first = f", first token {self.first_token_s:.2f} s" if self.first_token_s is not None else ""
        return f"{'' if done else '⏳ '}{self.tokens} tokens, {rate:.1f} tokens/s{first}"


class DemoBackend:
    """What a chat turn does, independent of Gradio: check the input, render the prompt, stream the reply."""

    def __init__(self, engine: Engine, limits: Limits, context: int):
        self.engine = engine
        self.limits = limits
        self.context = context

    def load_images(self, paths: list[str], chat: Chat) -> list[Image.Image]:
        """Uploaded files as RGB images, each checked against the limits; an APIError names the file."""
        if len(chat.images) + len(paths) > self.limits.max_images:
            raise APIError(400, f"this chat would hold {len(chat.images) + len(paths)} images; at most "
                           f"{self.limits.max_images}")
        images = []
        for path in paths:
            p = Path(path)
            images.append(decode_image(p.name, p.name, self.limits, local_images=p.parent))
        return images

    def load_videos(self, paths: list[str], chat: Chat) -> list[bytes]:
        """Uploaded video files' bytes, each header-checked against the server's video limits (bytes, pixels
        per frame, duration); an APIError names the file and the reason."""
        if len(chat.videos) + len(paths) > self.limits.max_videos:
            raise APIError(400, f"this chat would hold {len(chat.videos) + len(paths)} videos; at most "
                           f"{self.limits.max_videos}")
        videos = []
        for path in paths:
            p = Path(path)
            videos.append(decode_video(p.name, p.name, self.limits, local_images=p.parent))
        return videos

    def load_files(self, paths: list[str], chat: Chat) -> tuple[list[Image.Image], list[bytes]]:
        """Uploads split by name into videos (`VIDEO_SUFFIXES`) and images, each loaded and checked."""
        videos = [p for p in paths if Path(p).suffix.lower() in VIDEO_SUFFIXES]
        return self.load_images([p for p in paths if p not in videos], chat), self.load_videos(videos, chat)

    def start_turn(self, chat: Chat, text: str, images: list[Image.Image], params: SamplingParams,
                   videos: list[bytes] = ()):
        """The chat with the user's turn added and the engine request that answers it."""
        text = text.strip()
        if not text:
            what = " about the video" if videos else " about the image" if images else ""
            raise APIError(400, "the prompt is empty: type a question" + what)
        for placeholder, article, kind in ((IMAGE_PLACEHOLDER, "an", "image"), (VIDEO_PLACEHOLDER, "a", "video")):
            if placeholder in text:
                raise APIError(400, f"the prompt contains {placeholder!r}, which this model reads as {article} "
                               f"{kind} placeholder; attach {kind}s with the upload button instead")
        # what `stitch generate` builds: videos first, then images, then the text
        content = (VIDEO_PLACEHOLDER + "\n") * len(videos) + (IMAGE_PLACEHOLDER + "\n") * len(images) + text
        chat = Chat(chat.turns + ({"role": "user", "content": content},), chat.images + tuple(images),
                    chat.videos + tuple(videos))
        try:
            request = self.engine.prepare(list(chat.turns), list(chat.images), params, videos=list(chat.videos))
        except SampleError as e:  # e.g. a video whose header was fine but whose frames are cut off
            raise APIError(400, f"{e.reason}: {e.detail.removeprefix('<bytes>: ')}") from e
        room = self.context - int(request.input_ids.numel())
        if room < 1:
            raise APIError(400, f"the chat is {self.context - room} tokens, the model's whole context of "
                           f"{self.context}: start a new chat")
        request.params = dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens, room))
        return chat, request

    def stream(self, request, stats: TurnStats) -> Iterator[str]:
        """The reply's text so far after each engine event; `stats` is updated as tokens arrive."""
        start, reply = time.perf_counter(), ""
        for event in self.engine.submit(request):
            stats.tokens += len(event.token_ids)
            if stats.first_token_s is None and event.token_ids:
                stats.first_token_s = time.perf_counter() - start
            stats.seconds = time.perf_counter() - start
            reply = event.completion.text if event.completion is not None else reply + event.text
            yield reply


def _sampling(temperature: float, top_p: float, max_new_tokens: float, limits: Limits) -> SamplingParams:
    max_new = int(max_new_tokens)
    if not 1 <= max_new <= limits.max_tokens:
        raise APIError(400, f"max new tokens must be between 1 and {limits.max_tokens}, got {max_new}")
    try:
        return SamplingParams(max_new_tokens=max_new, temperature=float(temperature), top_p=float(top_p))
    except StitchError as e:
        raise APIError(400, str(e)) from e


def _message_files(message: Any) -> tuple[str, list[str]]:
    """A MultimodalTextbox value -> (text, uploaded file paths)."""
    if isinstance(message, str):
        return message, []
    message = message or {}
    files = [f if isinstance(f, str) else (f.get("path") or f.get("name")) for f in message.get("files") or []]
    return message.get("text") or "", [f for f in files if f]


def run_turn(backend: DemoBackend, message: Any, chat: Chat, shown: list, temperature: float, top_p: float,
             new_tokens: float, keep: Any = None) -> Iterator[tuple]:
    """One chat turn, as the page runs it: yields (box, chat, shown messages, stats line, status line) as the
    reply streams. A failure yields the chat unchanged, the status saying why, and `keep` (Gradio's "leave the
    stats line as it is") for the stats."""
    text, paths = _message_files(message)
    try:
        params = _sampling(temperature, top_p, new_tokens, backend.limits)
        try:
            images, videos = backend.load_files(paths, chat)
        except APIError as e:  # the text stays in the box; the files go, to be attached again
            yield {"text": text, "files": []}, chat, shown, keep, f"⚠️ {e.message}"
            return
        chat_after, request = backend.start_turn(chat, text, images, params, videos)
    except APIError as e:
        yield message, chat, shown, keep, f"⚠️ {e.message}"
        return
    user = [{"role": "user", "content": {"path": p}} for p in paths]
    user.append({"role": "user", "content": text.strip()})
    stats = TurnStats()
    reply = ""
    yield None, chat, shown + user, stats.line(done=False), ""
    try:
        for reply in backend.stream(request, stats):
            answer = {"role": "assistant", "content": reply}
            yield None, chat, shown + user + [answer], stats.line(done=False), ""
    except (StitchError, RuntimeError) as e:
        yield message, chat, shown, keep, f"⚠️ the model failed on this turn: {e}"
        return
    chat_after = dataclasses.replace(chat_after, turns=chat_after.turns + ({"role": "assistant", "content": reply},))
    yield None, chat_after, shown + user + [{"role": "assistant", "content": reply}], stats.line(done=True), ""


def build_demo(model, processor, *, limits: Limits | None = None, engine: Engine | None = None,
               title: str = "Stitch", max_new_tokens: int = 256, markdown: bool = True):
    """A Gradio Blocks app chatting with `model` (call `.launch()` on it, or use `stitch demo`).

    `markdown=False` shows replies as the plain text the model wrote (Markdown would render `*` or `#`)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    limits = limits or Limits()
    if ImageEmbeddingCache.supports(model):  # later turns re-send the chat's images: encode each once
        ImageEmbeddingCache(model, max_bytes=256 << 20).install()
    backend = DemoBackend(engine or get_engine(model, processor), limits,
                          int(model.config.llm.max_position_embeddings))
    default_new = max(1, min(max_new_tokens, limits.max_tokens))

    def turn(message, chat: Chat, shown: list, temperature, top_p, new_tokens):
        yield from run_turn(backend, message, chat, shown, temperature, top_p, new_tokens, keep=gr.update())

    def new_chat():
        return None, Chat(), [], "", ""

    file_types = sorted({f".{fmt.lower()}" for fmt in IMAGE_FORMATS} | {".jpg"} | set(VIDEO_SUFFIXES))
    with gr.Blocks(title=title) as app:
        gr.Markdown(f"### {title}")
        chat_state = gr.State(Chat())
        chatbot = gr.Chatbot(label="Chat", height=460, elem_id="stitch-chat", render_markdown=markdown)
        box = gr.MultimodalTextbox(placeholder="Attach an image or a video and ask about it", file_types=file_types,
                                   file_count="multiple", sources=["upload"], elem_id="stitch-input",
                                   show_label=False)
        status = gr.Markdown(elem_id=STATUS_ID)
        stats = gr.Markdown(elem_id=STATS_ID)
        with gr.Accordion("Sampling", open=False):
            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
            new_tokens = gr.Slider(1, limits.max_tokens, value=default_new, step=1, label="Max new tokens")
        clear = gr.Button("New chat", elem_id="stitch-new-chat")
        box.submit(turn, [box, chat_state, chatbot, temperature, top_p, new_tokens],
                   [box, chat_state, chatbot, stats, status])
        clear.click(new_chat, None, [box, chat_state, chatbot, stats, status])
        chatbot.clear(new_chat, None, [box, chat_state, chatbot, stats, status])  # the chat's own bin button
    return app


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a Stitch checkpoint folder (or an HF InternVL/LLaVA folder)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: loopback only; 0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=7860, help="default: 7860 (0 = any free port)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on CUDA; on a CPU bf16 only where measured faster")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="the slider's starting value")
    parser.add_argument("--plain-text", action="store_true",
                        help="show replies as plain text instead of rendering them as Markdown")
    add_prefix_cache_argument(parser)
    add_limit_arguments(parser)


def demo(args: argparse.Namespace) -> int:
    """Chat with a checkpoint in the browser: upload images or a video, several turns, streamed answers (Gradio).

    Needs the `demo` extra (pip install 'stitch-vlm[demo]'). The server's image limits apply (--max-image-mb,
    --max-image-pixels, --max-images), and its video limits (one video per chat, 16 MiB, 3840x2160, an hour);
    a video's frames are the model's `video_frames`. It listens on loopback unless --host says otherwise.

    Example:
      stitch demo runs/quickstart/sft/final --port 7860
      # then open http://127.0.0.1:7860 in a browser
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError as e:
        raise StitchError(f"stitch demo needs Gradio: pip install 'stitch-vlm[demo]' ({e})") from e
    limits = limits_from_args(args)
    cache_bytes = prefix_cache_bytes(args)
    if args.max_new_tokens <= 0:
        raise StitchError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    ckpt = Path(args.checkpoint)
    model, processor, compute = load_for_serving(ckpt, args.device, args.dtype)
    name = ckpt.resolve().name
    engine = get_engine(model, processor, prefix_cache_bytes=cache_bytes)  # later turns reuse the chat's KV
    app = build_demo(model, processor, limits=limits, engine=engine, title=f"Stitch · {name}",
                     max_new_tokens=args.max_new_tokens, markdown=not args.plain_text)
    port = args.port or _free_port(args.host)
    if args.host not in ("localhost", "127.0.0.1", "::1") and not args.host.startswith("127."):
        print(f"stitch demo: warning: listening on {args.host}: anyone who can reach this port can use the model",
              file=sys.stderr)
    print(f"stitch demo: {name} on http://{args.host}:{port} ({compute}; Ctrl-C stops)", file=sys.stderr, flush=True)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    app.queue(default_concurrency_limit=limits.max_pending).launch(
        server_name=args.host, server_port=port, share=False, inbrowser=False, show_error=True, quiet=True,
        max_file_size=max(limits.max_image_bytes, limits.max_video_bytes), theme=theme, footer_links=[], ssr_mode=False)
    return 0
