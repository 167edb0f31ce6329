"""`stitch serve`: an OpenAI-compatible HTTP server (`/v1/chat/completions`, `/v1/models`, `/health`).

Why it looks like this:
- The wire format is OpenAI's, so the official `openai` client (and everything built on it) works unchanged:
  messages with `text` and `image_url` parts, `stream` as server-sent events, usage counts, and errors as
  `{"error": {"message", "type", "param", "code"}}` with the status codes OpenAI uses.
- Requests arriving together share decode steps: every request goes to the generation engine's queue
  (`Engine.submit`), whose background thread batches whatever is waiting. Greedy output does not depend on the
  batch, so a request answers the same alone or among 31 others.
- A server faces hostile input. Everything is checked *before* it reaches the engine, where one bad row would
  fail the whole batch: body size (counted while reading, not trusted from headers), JSON shape and types,
  image count, bytes and pixels (the header is read before anything is decoded, so a decompression bomb never
  allocates), image formats, prompt length against the context and `max_tokens`. Each gets a 4xx naming the
  field; nothing a client sends can stop the server or disturb other requests.
- Parameters the engine cannot honour (`n > 1`, `logprobs`, tools, penalties OpenAI-style) are refused with a
  400 rather than ignored: an answer computed differently from what was asked is a silent error.
- Images come as base64 `data:` URLs. The server never fetches remote URLs (no outbound requests on a
  client's behalf) and reads local files only under a folder named by `--allow-local-images`.
- It binds to loopback unless told otherwise; `--api-key` (or `STITCH_API_KEY`) requires `Bearer` auth.

The request is checked in `stitch.infer.request` (JSON, the served model, text, images) against the pydantic models
of `stitch.infer.api_types` (shape, types, ranges, limits, `APIError`); this module re-exports those names.
FastAPI and uvicorn are the optional extra `serve`; they are imported only when a server is built.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stitch.data.skips import SampleError
from stitch.device import compute_dtype, resolve_device
from stitch.errors import StitchError
from stitch.infer.api_types import APIError, ChatJob, Limits, MiB
from stitch.infer.engine import Completion, Engine, Event, RequestHandle
from stitch.infer.engine import Request as EngineRequest
from stitch.infer.generate import get_engine
from stitch.infer.pretrained import load_pretrained
from stitch.infer.request import decode_image, parse_chat_request
from stitch.infer.sampling import SamplingParams

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["Limits", "APIError", "ChatJob", "parse_chat_request", "decode_image", "create_app", "serve",
           "serve_arguments"]

log = logging.getLogger("stitch.serve")

# A token is rarely longer than this many characters; text beyond `context * this` is refused before it is
# tokenised (tokenising megabytes only to say "too long" would be a cheap way to keep the server busy).
MAX_CHARS_PER_TOKEN = 64


# ---------------------------------------------------------------------------------------- the service
class _Pipe:
    """Carries one request's engine events from a pump thread into the event loop.

    The engine delivers events through a blocking `RequestHandle`; a pump thread drains it (always to the end,
    so admission is released when the engine is done, even if the client left) and hands each event to the
    loop with `call_soon_threadsafe`."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def pump(self, handle: RequestHandle, done: Callable[[], None]) -> None:
        try:
            for event in handle:
                self._put(event)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting request
            self._put(e)
        finally:
            done()

    def _put(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: the server is shutting down
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def events(self) -> AsyncIterator[Event]:
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.completion is not None:
                return


class Service:
    """The model behind the HTTP layer: admission, request preparation and the engine queue."""

    def __init__(self, model, processor, model_name: str, limits: Limits, local_images: Path | None = None,
                 engine: Engine | None = None):
        self.model_name = model_name
        self.limits = limits
        self.local_images = Path(local_images) if local_images is not None else None
        self.engine = engine if engine is not None else get_engine(model, processor)
        self.context = int(model.config.llm.max_position_embeddings)
        self.created = int(time.time())
        # Tokenizers may reconfigure themselves on a call (truncation/padding state): one prompt at a time.
        self._prepare_lock = threading.Lock()
        self._admit_lock = threading.Lock()
        self.admitted = 0

    # ----------------------------------------------------------------- admission
    def admit(self) -> None:
        """Count a request in, or refuse it (503) when `max_pending` are already being served."""
        with self._admit_lock:
            if self.admitted >= self.limits.max_pending:
                raise APIError(503, f"the server is busy ({self.admitted} requests in progress); retry shortly",
                               code="server_busy", type="server_busy", headers={"Retry-After": "1"})
            self.admitted += 1

    def release(self) -> None:
        with self._admit_lock:
            self.admitted -= 1

    # ----------------------------------------------------------------- requests
    def prepare(self, body: bytes) -> tuple[ChatJob, EngineRequest]:
        """Parse, decode images, tokenise and check lengths (runs in a worker thread: it is CPU work)."""
        job = parse_chat_request(body, self.model_name, self.limits, self.local_images)
        chars = sum(len(m["content"]) for m in job.conversation)
        if chars > self.context * MAX_CHARS_PER_TOKEN:
            raise APIError(400, f"the messages hold {chars} characters, far more than this model's context of "
                           f"{self.context} tokens", param="messages", code="context_length_exceeded")
        try:
            with self._prepare_lock:
                request = self.engine.prepare(job.conversation, job.images, videos=job.videos)
        except SampleError as e:
            raise APIError(400, f"messages: {e.detail}", param="messages", code=e.reason) from e
        prompt = int(request.input_ids.numel())
        room = self.context - prompt
        if job.max_tokens is None and room < 1:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; the messages "
                           f"resulted in {prompt} tokens", param="messages", code="context_length_exceeded")
        if job.max_tokens is not None and job.max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; you requested "
                           f"{prompt + job.max_tokens} tokens ({prompt} in the messages, {job.max_tokens} in the "
                           "completion)", param="messages", code="context_length_exceeded")
        max_new = job.max_tokens if job.max_tokens is not None else min(self.limits.max_tokens, room)
        try:
            request.params = SamplingParams(max_new_tokens=max_new, **job.sampling)
        except StitchError as e:  # the parser checks ranges first; this is a backstop
            raise APIError(400, str(e), code="invalid_value") from e
        return job, request

    def submit(self, request: EngineRequest) -> _Pipe:
        """Queue `request` in the engine; its events arrive on the returned pipe. Admission is released when the
        engine finishes it."""
        pipe = _Pipe(asyncio.get_running_loop())
        handle = self.engine.submit(request)
        # A daemon thread: one whose engine went away must not keep the process from exiting.
        threading.Thread(target=pipe.pump, args=(handle, self.release), name="stitch-serve-pump",
                         daemon=True).start()
        return pipe


# ------------------------------------------------------------------------------------------- HTTP layer
def _error_response(err: APIError):
    from fastapi.responses import JSONResponse

    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _read_body(request, limit: int) -> bytes:
    """The body, refused (413) as soon as it passes `limit`: Content-Length is checked first, then the bytes as
    they arrive (a chunked body has no length to trust)."""
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes; at most {limit}", code="request_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
            chunks.append(chunk)
    except ClientDisconnect as e:
        raise APIError(400, "the request body ended early (client disconnected)", code="incomplete_body") from e
    return b"".join(chunks)


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _usage(c: Completion) -> dict[str, int]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def create_app(model, processor, *, model_name: str, limits: Limits | None = None, api_key: str | None = None,
               local_images: str | Path | None = None, engine: Engine | None = None) -> FastAPI:
    """The ASGI app serving `model`. `app.state.service` holds the engine and admission state."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    service = Service(model, processor, model_name, limits or Limits(), local_images, engine)
    app = FastAPI(title="Stitch", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    expected_auth = f"Bearer {api_key}".encode() if api_key else None

    @app.exception_handler(APIError)
    async def _api_error(_request, err: APIError):
        return _error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, err: StarletteHTTPException):  # unknown route, wrong method
        message = {404: "Unknown URL", 405: "Method not allowed"}.get(err.status_code, str(err.detail))
        return _error_response(APIError(err.status_code, f"{message}: see /v1/chat/completions, /v1/models, /health",
                                        headers=err.headers))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, err: RequestValidationError):
        return _error_response(APIError(400, str(err)[:500]))

    @app.exception_handler(Exception)
    async def _unexpected(_request, err: Exception):
        log.exception("internal error", exc_info=err)
        return _error_response(APIError(500, "internal server error", code="internal_error"))

    def authorize(request) -> None:
        if expected_auth is None:
            return
        given = request.headers.get("authorization", "").encode("utf-8", "replace")
        if not hmac.compare_digest(given, expected_auth):
            raise APIError(401, "Incorrect or missing API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key", type="authentication_error")

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": service.created, "owned_by": "stitch"}

    # Plain Starlette endpoints (the request is their one argument): the body is read here (size-checked as it
    # arrives) and checked by `parse_chat_request`, so every refusal has the server's own status, code and text.
    async def health(request):
        cache = service.engine.prefix_cache
        return JSONResponse({"status": "ok", "model": model_name, "requests_in_progress": service.admitted,
                             "prefix_cache": cache.stats() if cache is not None else None})

    async def list_models(request):
        authorize(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def get_model(request):
        authorize(request)
        name = request.path_params["name"]
        if name != model_name:
            raise APIError(404, f"The model {name[:200]!r} does not exist", param="model", code="model_not_found")
        return JSONResponse(model_card())

    async def chat_completions(request):
        authorize(request)
        service.admit()
        submitted = False
        try:
            body = await _read_body(request, service.limits.max_body_bytes)
            job, req = await run_in_threadpool(service.prepare, body)
            pipe = service.submit(req)
            submitted = True  # from here the pump thread releases admission
        finally:
            if not submitted:
                service.release()
        cid, created = _completion_id(), int(time.time())
        if job.stream:
            return StreamingResponse(_sse(pipe, cid, created, model_name, job.include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        completion = None
        async for event in pipe.events():
            completion = event.completion
        assert completion is not None
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": created, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                         "finish_reason": completion.finish_reason, "logprobs": None}],
            "usage": _usage(completion), "system_fingerprint": None,
        })

    app.add_route("/health", health, methods=["GET"])
    app.add_route("/v1/models", list_models, methods=["GET"])
    app.add_route("/v1/models/{name:path}", get_model, methods=["GET"])
    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
    return app


async def _sse(pipe: _Pipe, cid: str, created: int, model_name: str, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format: the role first, then text deltas, then the finish reason
    (and usage when asked), then `[DONE]`. An engine failure mid-stream becomes an `error` event."""

    def chunk(delta: dict, finish_reason: str | None = None, usage: dict | None = None) -> str:
        body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created,
                                "model": model_name, "system_fingerprint": None,
                                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                             "logprobs": None}]}
        if usage is not None:
            body["choices"], body["usage"] = [], usage
        elif include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for event in pipe.events():
            if event.text:
                yield chunk({"content": event.text})
            if event.completion is not None:
                yield chunk({}, event.completion.finish_reason)
                if include_usage:
                    yield chunk({}, usage=_usage(event.completion))
    except Exception as e:  # noqa: BLE001 - the status line is already sent: report in-band
        log.exception("generation failed mid-stream", exc_info=e)
        yield f"data: {json.dumps(APIError(500, 'internal server error', code='internal_error').body())}\n\n"
    yield "data: [DONE]\n\n"


# ------------------------------------------------------------------------------------------ command line
def serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a Stitch checkpoint folder (or an HF InternVL/LLaVA folder)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: loopback only; 0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=8000, help="default: 8000 (0 = any free port)")
    parser.add_argument("--api-key", default=os.environ.get("STITCH_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $STITCH_API_KEY, else none)")
    parser.add_argument("--model-name", default=None,
                        help="the name clients pass as `model` (default: the checkpoint folder's name)")
    parser.add_argument("--allow-local-images", default=None, metavar="DIR",
                        help="also accept image_url paths (or file:// URLs) of files inside DIR (default: off)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="requests decoded together (default: 32)")
    parser.add_argument("--continuous-batching", action="store_true",
                        help="requests join a running batch (a finished or spare row) instead of waiting for it "
                             "to end")
    add_prefix_cache_argument(parser)
    add_limit_arguments(parser)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """The request limits (`Limits`) as flags, shared by `stitch serve` and `stitch demo`."""
    d = Limits()
    parser.add_argument("--max-request-mb", type=float, default=d.max_body_bytes / MiB,
                        help=f"largest request body (default: {d.max_body_bytes // MiB})")
    parser.add_argument("--max-image-mb", type=float, default=d.max_image_bytes / MiB,
                        help=f"largest image file (default: {d.max_image_bytes // MiB})")
    parser.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                        help=f"largest image width x height (default: {d.max_image_pixels})")
    parser.add_argument("--max-images", type=int, default=d.max_images,
                        help=f"images per request (default: {d.max_images})")
    parser.add_argument("--max-tokens-limit", type=int, default=d.max_tokens,
                        help=f"largest max_tokens a request may ask, and the default (default: {d.max_tokens})")
    parser.add_argument("--max-pending", type=int, default=d.max_pending,
                        help=f"requests in progress at once before new ones get 503 (default: {d.max_pending})")


def limits_from_args(args: argparse.Namespace) -> Limits:
    """`Limits` from `add_limit_arguments`' flags; a non-positive one is a StitchError naming the flag."""
    for flag in ("max_images", "max_tokens_limit", "max_pending", "max_image_pixels", "max_request_mb",
                 "max_image_mb"):
        if getattr(args, flag) <= 0:
            raise StitchError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    return Limits(max_body_bytes=int(args.max_request_mb * MiB), max_image_bytes=int(args.max_image_mb * MiB),
                  max_image_pixels=args.max_image_pixels, max_images=args.max_images,
                  max_tokens=args.max_tokens_limit, max_pending=args.max_pending)


def load_for_serving(checkpoint: Path, device_name: str | None, dtype_name: str | None):
    """(model, processor, ComputeChoice) for a server: a bad folder or checkpoint is a one-line StitchError."""
    if not checkpoint.is_dir():
        raise StitchError(f"{checkpoint}: not a checkpoint folder")
    device = resolve_device(device_name)
    compute = compute_dtype(device, dtype_name)
    try:
        model, processor = load_pretrained(checkpoint, device=device, dtype=compute.dtype)
    except StitchError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise StitchError(f"{checkpoint}: cannot load the checkpoint ({type(e).__name__}: {e})") from e
    return model, processor, compute


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening socket (bound here, so a taken port is a clear error and port 0 picks a free one).

    Created from `getaddrinfo` with the protocol set to TCP: asyncio turns Nagle's algorithm off only on
    sockets whose `proto` says TCP, and `socket.create_server` leaves it 0, which costs every response ~40 ms
    (a response written in two parts waits for the client's delayed ACK)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             proto=socket.IPPROTO_TCP)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise StitchError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise StitchError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    return sock


def uvicorn_server(app, log_level: str = "info"):
    """A uvicorn server for `app`; h11 keeps header limits (16 KiB per request head) the same on every install."""
    import uvicorn

    config = uvicorn.Config(app, http="h11", log_level=log_level, timeout_keep_alive=5, lifespan="on")
    return uvicorn.Server(config)


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


def add_prefix_cache_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefix-cache-mb", type=float, default=1024.0, metavar="MB",
                        help="device memory for the KV of earlier prompts, reused by prompts that start the same "
                             "way (a chat's next turn about the same image); 0 = off (default: 1024)")


def prefix_cache_bytes(args: argparse.Namespace) -> int:
    """`--prefix-cache-mb` in bytes; a StitchError for a negative or non-finite value."""
    mb = args.prefix_cache_mb
    if not math.isfinite(mb) or mb < 0:
        raise StitchError(f"--prefix-cache-mb must be >= 0 (0 = off), got {mb}")
    return int(mb * MiB)


def serve(args: argparse.Namespace) -> int:
    """Serve a checkpoint over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models, /health).

    Needs the `serve` extra (pip install 'stitch-vlm[serve]'). Images go in image_url parts as base64 data: URLs.
    Concurrent requests are batched into shared decode steps. See docs/serve.md for limits and errors.

    Example:
      stitch serve ckpt/sft --port 8000 --api-key secret
      # then: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret").chat.completions.create(
      #           model="sft", messages=[{"role": "user", "content": "Hello"}], max_tokens=64)
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise StitchError(f"stitch serve needs FastAPI and uvicorn: pip install 'stitch-vlm[serve]' ({e})") from e

    ckpt = Path(args.checkpoint)
    if not ckpt.is_dir():
        raise StitchError(f"{ckpt}: not a checkpoint folder")
    local = Path(args.allow_local_images) if args.allow_local_images else None
    if local is not None and not local.is_dir():
        raise StitchError(f"--allow-local-images {local}: not a folder")
    if args.max_batch_size <= 0:
        raise StitchError(f"--max-batch-size must be positive, got {args.max_batch_size}")
    limits = limits_from_args(args)
    sock = listen_socket(args.host, args.port)  # before loading: a taken port fails fast
    model, processor, compute = load_for_serving(ckpt, args.device, args.dtype)
    engine = get_engine(model, processor, max_batch_size=args.max_batch_size, compile=args.compile,
                        continuous_batching=args.continuous_batching, prefix_cache_bytes=prefix_cache_bytes(args))
    name = args.model_name or ckpt.resolve().name
    app = create_app(model, processor, model_name=name, limits=limits, api_key=args.api_key,
                     local_images=local, engine=engine)
    if not _is_loopback(args.host) and not args.api_key:
        print(f"stitch serve: warning: listening on {args.host} without --api-key: anyone who can reach this "
              "port can use the model", file=sys.stderr)
    host, port = sock.getsockname()[:2]
    print(f"stitch serve: {name} on http://{host}:{port}/v1 ({compute}; Ctrl-C stops)", file=sys.stderr, flush=True)
    server = uvicorn_server(app, args.log_level)
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
    return 0
