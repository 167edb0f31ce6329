"""A `/v1/chat/completions` body into a `ChatJob`: the JSON checked (`parse_json`), its shape, types and ranges
(`stitch.infer.api_types.ChatCompletionRequest`), the served model's name, the text, and the images decoded
(`decode_image`), each check's failure an `APIError` that names the field.

Images come as base64 `data:` URLs. The server never fetches remote URLs (no outbound requests on a client's
behalf) and reads local files only under a folder named by `--allow-local-images`. Sizes are checked at each
stage before the next one costs anything: the base64 length before decoding it, the file size before reading it,
the pixel count from the header before decompressing (so a decompression bomb never allocates).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import urllib.parse
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError

from stitch.data.chat import IMAGE_PLACEHOLDER
from stitch.data.image import load_complete
from stitch.data.skips import SampleError
from stitch.data.video import VideoLimits, probe_video
from stitch.data.video_layout import VIDEO_PLACEHOLDER
from stitch.infer.api_types import APIError, ChatCompletionRequest, ChatJob, Limits, bad, first_error, type_name

__all__ = ["parse_json", "parse_chat_request", "decode_image", "decode_video", "IMAGE_FORMATS"]

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what OpenAI's vision API takes, plus BMP


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; anything else (bad UTF-8, bad JSON, NaN, absurd nesting) is a 400."""
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not UTF-8 ({e.reason} at byte {e.start})",
                       code="invalid_json") from e
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})",
                       code="invalid_json") from e
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from e
    except RecursionError as e:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from e
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type_name(data)}", code="invalid_json")
    try:  # a "\ud800" escape decodes to a lone surrogate, which no tokenizer or file system takes
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, "the request body holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff), "
                       "which is not text", code="invalid_json") from e
    return data


def parse_chat_request(body: bytes, model_name: str, limits: Limits,
                       local_images: Path | None = None) -> ChatJob:
    """Check a `/v1/chat/completions` body and decode its images; raises `APIError` for anything unusable.

    The order of the checks is the order of the errors a client sees first: unknown fields and unsupported
    parameters, `model` (its type, then whether it is the served one: 404), `messages` (shape, then text and
    images in order), `max_tokens` vs `max_completion_tokens`, then the sampling fields."""
    data = parse_json(body)
    try:
        request = ChatCompletionRequest.model_validate(data, context={"limits": limits})
        error = None
    except ValidationError as e:
        request = None
        where, error = first_error(e)
        if where not in ("messages", *_LATER_FIELDS):  # unknown fields, unsupported parameters, `model`
            raise error from None
    model = data.get("model")
    if model != model_name:  # a string here: a bad type or a missing one was raised above
        raise APIError(404, f"The model {model[:200]!r} does not exist; this server serves {model_name!r}",
                       param="model", code="model_not_found")
    if error is not None and where == "messages":
        raise error from None
    messages = request.messages if request is not None else _valid_messages(data, limits)
    conversation, images, videos = _conversation(messages, limits, local_images)
    if data.get("max_tokens") is not None and data.get("max_completion_tokens") is not None:
        raise bad("max_tokens", "give max_tokens or max_completion_tokens, not both", "invalid_value")
    if error is not None:
        raise error from None
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    sampling: dict[str, Any] = {
        "temperature": request.temperature,
        "top_p": request.top_p,
        "repetition_penalty": request.repetition_penalty,
        "top_k": request.top_k,
        "seed": request.seed,
        "stop": request.stop,
    }
    include_usage = request.stream_options.include_usage if request.stream_options is not None else False
    return ChatJob(conversation, images, max_tokens, sampling, request.stream, include_usage, videos)


# Fields checked after `messages` (their errors wait until the messages' text and images are checked).
_LATER_FIELDS = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "repetition_penalty", "top_k",
                 "seed", "stop", "stream", "stream_options")


def _valid_messages(data: dict, limits: Limits):
    """The messages of a request whose other fields failed, validated alone (they are checked before those)."""
    return ChatCompletionRequest.model_validate({"model": data["model"], "messages": data["messages"]},
                                                context={"limits": limits}).messages


def _conversation(messages, limits: Limits, local_images: Path | None
                  ) -> tuple[list[dict[str, str]], list[Image.Image], list[bytes]]:
    """Validated messages -> the processor's `[{"role", "content"}]` with one `<image>` per image part, and the
    images in order. Parts of one message are joined with newlines (as vLLM does), so `[image, text]` becomes
    `"<image>\\n" + text`: what `stitch generate --image I --prompt TEXT` builds."""
    conversation: list[dict[str, str]] = []
    images: list[Image.Image] = []
    videos: list[bytes] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if isinstance(msg.content, str):
            pieces = [_check_text(msg.content, f"{where}.content")]
        else:
            pieces = []
            for j, part in enumerate(msg.content):
                at = f"{where}.content[{j}]"
                if part.type == "text":
                    pieces.append(_check_text(part.text, f"{at}.text"))
                    continue
                if part.type == "video_url":
                    if msg.role != "user":
                        raise bad(at, f"videos are only allowed in user messages, not {msg.role!r}", "invalid_value")
                    videos.append(decode_video(part.video_url.url, f"{at}.video_url.url", limits, local_images))
                    pieces.append(VIDEO_PLACEHOLDER)
                    continue
                if msg.role != "user":
                    raise bad(at, f"images are only allowed in user messages, not {msg.role!r}", "invalid_value")
                images.append(decode_image(part.image_url.url, f"{at}.image_url.url", limits, local_images))
                pieces.append(IMAGE_PLACEHOLDER)
        conversation.append({"role": msg.role, "content": "\n".join(pieces)})
    return conversation, images, videos


def _check_text(text: str, where: str) -> str:
    if IMAGE_PLACEHOLDER in text:
        raise bad(where, f"the text contains {IMAGE_PLACEHOLDER!r}, which this model reads as an image "
                  "placeholder; send images as image_url parts", "invalid_value")
    if VIDEO_PLACEHOLDER in text:
        raise bad(where, f"the text contains {VIDEO_PLACEHOLDER!r}, which this model reads as a video "
                  "placeholder; send videos as video_url parts", "invalid_value")
    return text


# ------------------------------------------------------------------------------------------------- videos
def decode_video(url: str, where: str, limits: Limits, local_images: Path | None = None) -> bytes:
    """A `data:video/...;base64,...` URL (or, when allowed, a local file) as the video file's bytes, its header
    checked against the limits (bytes, pixels per frame, duration) before any frame is decoded. Frames are
    decoded later by the processor; a file that turns out truncated there is a 400 too (`SampleError`)."""
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", url)
    scheme = scheme.group(1).lower() if scheme and len(scheme.group(1)) > 1 else None
    if scheme == "data":
        raw = _data_url_bytes("data:" + url[5:], where, limits, media="video")
    elif scheme in ("http", "https"):
        raise bad(where, "remote video URLs are not fetched by this server; send the video as a base64 data: URL",
                  "unsupported_video_url")
    elif scheme not in (None, "file"):
        raise bad(where, f"unsupported URL scheme {scheme!r} (send a base64 data: URL)", "unsupported_video_url")
    else:
        raw = _local_file_bytes(url, where, limits, local_images, media="video")
    video_limits = VideoLimits(max_bytes=limits.max_video_bytes, max_pixels=limits.max_video_pixels,
                               max_duration_s=limits.max_video_seconds)
    try:
        probe_video(raw, video_limits)
    except SampleError as e:
        raise bad(where, f"{e.detail.removeprefix('<bytes>: ')}"[:300], e.reason) from e
    return raw


# ------------------------------------------------------------------------------------------------- images
def decode_image(url: str, where: str, limits: Limits, local_images: Path | None = None) -> Image.Image:
    """A `data:image/...;base64,...` URL (or, when allowed, a local file) as a fully decoded RGB image.

    Sizes are checked at each stage before the next one costs anything: the base64 length before decoding it,
    the file size before reading it, the pixel count from the header before decompressing."""
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", url)
    scheme = scheme.group(1).lower() if scheme and len(scheme.group(1)) > 1 else None  # "C:" is a drive
    if scheme == "data":
        raw = _data_url_bytes("data:" + url[5:], where, limits)
    elif scheme in ("http", "https"):
        raise bad(where, "remote image URLs are not fetched by this server; send the image as a base64 data: URL",
                   "unsupported_image_url")
    elif scheme not in (None, "file"):
        raise bad(where, f"unsupported URL scheme {scheme!r} (send a base64 data: URL)", "unsupported_image_url")
    else:
        raw = _local_file_bytes(url, where, limits, local_images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)  # other parsers never see the bytes
        except Image.DecompressionBombError as e:
            raise bad(where, f"the image has too many pixels ({e})", "image_too_large") from e
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise bad(where, f"not an image in a supported format ({', '.join(IMAGE_FORMATS)})",
                       "unsupported_image_format") from e
        if img.format not in IMAGE_FORMATS:
            raise bad(where, f"unsupported image format {img.format}; use one of {', '.join(IMAGE_FORMATS)}",
                       "unsupported_image_format")
        width, height = img.size
        if width * height > limits.max_image_pixels:
            raise bad(where, f"the image is {width}x{height} = {width * height} pixels; at most "
                       f"{limits.max_image_pixels}", "image_too_large")
        if width < 1 or height < 1:
            raise bad(where, f"empty image ({width}x{height})", "invalid_image")
        try:
            load_complete(img)
            return img if img.mode == "RGB" else img.convert("RGB")
        except Image.DecompressionBombError as e:
            raise bad(where, f"the image has too many pixels ({e})", "image_too_large") from e
        except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
            raise bad(where, f"the {img.format} image is truncated or corrupt ({e})"[:300], "invalid_image") from e


def _data_url_bytes(url: str, where: str, limits: Limits, media: str = "image") -> bytes:
    header, comma, payload = url.partition(",")
    if not comma:
        raise bad(where, "malformed data: URL (no comma)", "invalid_image_url")
    mime, *params = header[len("data:"):].split(";")
    params = [p.strip().lower() for p in params]
    example, max_bytes = ("image/png", limits.max_image_bytes) if media == "image" else \
        ("video/mp4", limits.max_video_bytes)
    if "base64" not in params:
        raise bad(where, f"only base64 data: URLs are supported (data:{example};base64,...)", f"invalid_{media}_url")
    octet = media == "video" and mime.lower() == "application/octet-stream"
    if mime and not mime.lower().startswith(f"{media}/") and not octet:
        raise bad(where, f"media type {mime[:80]!r} is not an {media}" if media == "image" else
                  f"media type {mime[:80]!r} is not a video", f"unsupported_{media}_format")
    if len(payload) > (max_bytes + 2) // 3 * 4 + 64:  # base64 is 4/3 the size (+ some whitespace)
        raise bad(where, f"the {media} is larger than {max_bytes} bytes", f"{media}_too_large")
    payload = "".join(payload.split())  # line breaks some encoders insert
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad(where, f"invalid base64 ({e})", "invalid_base64") from e
    if len(raw) > max_bytes:
        raise bad(where, f"the {media} is {len(raw)} bytes; at most {max_bytes}", f"{media}_too_large")
    if not raw:
        raise bad(where, f"empty {media} data", f"invalid_{media}")
    return raw


def _local_file_bytes(url: str, where: str, limits: Limits, local_images: Path | None,
                      media: str = "image") -> bytes:
    """A local image, only inside the `--allow-local-images` folder (symlinks resolved before the check)."""
    if local_images is None:
        raise bad(where, "expected a base64 data: URL (local image paths are off; the server enables them "
                   "with --allow-local-images DIR)", "invalid_image_url")
    path_text = urllib.parse.unquote(url[len("file://"):]) if url[:7].lower() == "file://" else url
    if "\x00" in path_text:
        raise bad(where, "invalid path", "invalid_image_url")
    root = local_images.resolve()
    path = (root / path_text).resolve()  # a relative path is taken relative to the allowed folder
    if not path.is_relative_to(root):
        raise bad(where, f"{path_text[:200]!r} is outside the folder local images may come from", "forbidden_path")
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise bad(where, f"{path_text[:200]!r} is not a file", "invalid_image_url")
        max_bytes = limits.max_image_bytes if media == "image" else limits.max_video_bytes
        if size > max_bytes:
            raise bad(where, f"the {media} is {size} bytes; at most {max_bytes}", f"{media}_too_large")
        return path.read_bytes()
    except OSError as e:
        raise bad(where, f"cannot read {path_text[:200]!r} ({e.strerror})", "invalid_image_url") from e

