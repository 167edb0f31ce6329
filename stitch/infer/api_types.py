"""The OpenAI chat API's request, as pydantic models, with the server's limits and its error shape.

`ChatCompletionRequest.model_validate(data, context={"limits": limits})` checks the shape, the types and the
ranges of a `/v1/chat/completions` body. Every check raises a `PydanticCustomError` whose type is the error
`code` the server answers with and whose message is the server's own text, so `first_error` turns pydantic's
error list back into the one `APIError` the hand-written checks used to raise: the first by the order the server
checks fields in (unknown fields, unsupported parameters, `model`, `messages`, then the sampling fields).
What needs more than the request (the served model's name, decoding images, the context length) is checked in
`stitch.infer.request` and `stitch.infer.server`.
"""

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from PIL import Image
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

__all__ = ["MiB", "Limits", "APIError", "ChatJob", "ChatCompletionRequest", "Message", "ContentPart", "ImageURL",
           "StreamOptions", "bad", "type_name", "first_error", "NEUTRAL_FIELDS", "IGNORED_FIELDS"]

MiB = 1 << 20


# ------------------------------------------------------------------------------------------------ limits
@dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything beyond gets a 4xx. Defaults suit a single-GPU server."""

    max_body_bytes: int = 20 * MiB  # the whole JSON body (base64 images included)
    max_image_bytes: int = 10 * MiB  # one image file, decoded from base64
    max_image_pixels: int = 25_000_000  # width x height, checked from the header before decoding
    max_images: int = 8  # images in one request
    max_videos: int = 1  # `video_url` parts in one request
    max_video_bytes: int = 16 * MiB  # one video file, decoded from base64 (the body limit applies too)
    max_video_pixels: int = 3840 * 2160  # per frame, from the container header
    max_video_seconds: float = 3600.0  # duration, from the container header
    max_tokens: int = 2048  # largest max_tokens; also the default when a request leaves it out
    max_stop: int = 4  # stop strings (OpenAI's limit)
    max_stop_chars: int = 256  # length of one stop string
    max_pending: int = 128  # requests admitted at once (reading, queued or generating); beyond: 503


class APIError(Exception):
    """An error for the client, in OpenAI's shape. `param` names the field at fault (`messages[0].content`)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str | None = None) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code=code)


def type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


@dataclass
class ChatJob:
    """A chat request, checked and turned into what the processor takes (images decoded, not yet tokenised)."""

    conversation: list[dict[str, str]]
    images: list[Image.Image]
    max_tokens: int | None  # None: as many as fit in the context, up to `Limits.max_tokens`
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields other than max_new_tokens
    stream: bool = False
    include_usage: bool = False
    videos: list[bytes] = field(default_factory=list)  # video files, header-checked, decoded by the processor


# ------------------------------------------------------------------------------------------- validators
def _fail(code: str, message: str, suffix: str = "") -> PydanticCustomError:
    """A validation error carrying the server's code and text; `suffix` extends the field's name in `param`
    (`.url` of `image_url`) where the fault is inside a value the validator reads as a whole."""
    return PydanticCustomError(code, "{message}", {"message": message, "suffix": suffix})


def _limits(info: ValidationInfo) -> Limits:
    return (info.context or {}).get("limits") or Limits()


def _number(lo: float, hi: float, default: float, lo_open: bool = False) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if value is None:
            return default
        if type(value) not in (int, float) or not math.isfinite(value):
            raise _fail("invalid_type", f"expected a number, got {type_name(value)} {value!r}"[:200])
        if value < lo or (lo_open and value == lo) or value > hi:
            lower = "(" if lo_open else "["
            raise _fail("invalid_value", f"{value} is out of range {lower}{lo}, {hi}]")
        return float(value)

    return check


def _integer(value: Any, lo: int | None, hi: int | None) -> int | None:
    if value is None:
        return None
    if type(value) is not int:  # bool is an int subclass: refuse it too
        raise _fail("invalid_type", f"expected an integer, got {type_name(value)} {value!r}"[:200])
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _fail("invalid_value", f"{value} is out of range [{lo}, {hi}]"[:200])
    return value


def _required_string(value: Any) -> str:
    if value is None:
        raise _fail("missing_required_parameter", "required")
    if not isinstance(value, str):
        raise _fail("invalid_type", f"expected a string, got {type_name(value)}")
    return value


def _role(value: Any) -> str:
    if value == "developer":  # OpenAI's newer name for the system message
        return "system"
    if value not in ("system", "user", "assistant"):
        raise _fail("invalid_value", f"expected 'system', 'developer', 'user' or 'assistant', got {value!r}"[:200])
    return value


def _name(value: Any) -> str:
    if not isinstance(value, str):
        raise _fail("invalid_type", "expected a string")
    return value


def _content(value: Any) -> Any:
    if not isinstance(value, (str, list)):
        raise _fail("invalid_type", f"expected a string or an array of parts, got {type_name(value)}")
    return value


def _part_type(value: Any) -> str:
    if value not in ("text", "image_url", "video_url"):
        raise _fail("invalid_value", f"unsupported content part type {value!r}; expected 'text', 'image_url' or "
                    "'video_url'"[:200])
    return value


def _neutral(name: str, is_neutral: Callable[[Any], bool]) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if not is_neutral(value):
            raise _fail("unsupported_parameter", f"{json.dumps(value)[:80]} is not supported by this server")
        return value

    check.__name__ = f"check_{name}"
    return check


# Request fields accepted besides the ones we use: harmless metadata, or a value meaning "off".
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")
NEUTRAL_FIELDS: dict[str, Callable[[Any], bool]] = {
    "n": lambda v: v is None or (type(v) is int and v == 1),
    "logprobs": lambda v: v in (None, False),
    "top_logprobs": lambda v: v in (None, 0),
    "presence_penalty": lambda v: v in (None, 0),
    "frequency_penalty": lambda v: v in (None, 0),
    "logit_bias": lambda v: v in (None, {}),
    "tools": lambda v: v in (None, []),
    "functions": lambda v: v in (None, []),
    "tool_choice": lambda v: v in (None, "none"),
    "function_call": lambda v: v in (None, "none"),
    "response_format": lambda v: v is None or v == {"type": "text"},
    "modalities": lambda v: v in (None, ["text"]),
}


def _neutral_field(name: str):
    return Annotated[Any, BeforeValidator(_neutral(name, NEUTRAL_FIELDS[name]))]


# ------------------------------------------------------------------------------------------------ models
class ImageURL(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] = "auto"


class VideoURL(BaseModel):
    url: str


class ContentPart(BaseModel):
    """A `text`, `image_url` or `video_url` part (vLLM's form for videos; the URL may be the bare string)."""

    model_config = ConfigDict(extra="ignore")

    type: Annotated[Literal["text", "image_url", "video_url"], BeforeValidator(_part_type)] = Field(
        None, validate_default=True)
    text: str | None = Field(None, validate_default=True)
    image_url: ImageURL | None = Field(None, validate_default=True)
    video_url: VideoURL | None = Field(None, validate_default=True)

    @field_validator("text", mode="before")
    @classmethod
    def check_text(cls, value: Any, info: ValidationInfo) -> Any:
        if info.data.get("type") != "text":
            return None
        if not isinstance(value, str):
            raise _fail("invalid_type", f"expected a string, got {type_name(value)}")
        return value

    @field_validator("image_url", mode="before")
    @classmethod
    def check_image_url(cls, spec: Any, info: ValidationInfo) -> Any:
        if info.data.get("type") != "image_url":
            return None
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str):
            raise _fail("invalid_type", "expected a string (a data: URL)", ".url")
        detail = spec.get("detail", "auto") if isinstance(spec, dict) else "auto"
        if detail not in ("auto", "low", "high"):
            raise _fail("invalid_value", "expected 'auto', 'low' or 'high'", ".detail")
        return ImageURL(url=url, detail=detail)

    @field_validator("video_url", mode="before")
    @classmethod
    def check_video_url(cls, spec: Any, info: ValidationInfo) -> Any:
        if info.data.get("type") != "video_url":
            return None
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str):
            raise _fail("invalid_type", "expected a string (a data: URL)", ".url")
        return VideoURL(url=url)


def _content_kind(value: Any) -> str:
    return "<text>" if isinstance(value, str) else "<parts>"


# A string, or an array of parts; the discriminator picks one branch, so errors come only from that one.
Content = Annotated[
    Annotated[str, Tag("<text>")] | Annotated[list[ContentPart], Tag("<parts>")],
    Discriminator(_content_kind),
]


class Message(BaseModel):
    """One chat message; `role` "developer" is read as "system"."""

    model_config = ConfigDict(extra="forbid")

    role: Annotated[Literal["system", "user", "assistant"], BeforeValidator(_role)] = Field(
        None, validate_default=True)
    name: Annotated[str | None, BeforeValidator(_name)] = None
    content: Annotated[Content, BeforeValidator(_content)] = Field(None, validate_default=True)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """A `/v1/chat/completions` body. Fields are declared in the order the server checks them."""

    model_config = ConfigDict(extra="forbid")

    n: _neutral_field("n") = None
    logprobs: _neutral_field("logprobs") = None
    top_logprobs: _neutral_field("top_logprobs") = None
    presence_penalty: _neutral_field("presence_penalty") = None
    frequency_penalty: _neutral_field("frequency_penalty") = None
    logit_bias: _neutral_field("logit_bias") = None
    tools: _neutral_field("tools") = None
    functions: _neutral_field("functions") = None
    tool_choice: _neutral_field("tool_choice") = None
    function_call: _neutral_field("function_call") = None
    response_format: _neutral_field("response_format") = None
    modalities: _neutral_field("modalities") = None
    model: Annotated[str, BeforeValidator(_required_string)] = Field(None, validate_default=True)
    messages: list[Message] = Field(None, validate_default=True)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: Annotated[float, BeforeValidator(_number(0.0, 2.0, default=1.0))] = 1.0  # OpenAI's default is 1
    top_p: Annotated[float, BeforeValidator(_number(0.0, 1.0, default=1.0, lo_open=True))] = 1.0
    repetition_penalty: Annotated[float, BeforeValidator(_number(0.0, 10.0, default=1.0, lo_open=True))] = 1.0
    top_k: int = 0  # -1 (vLLM's "off") and 0 are both off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    parallel_tool_calls: Any = None

    @field_validator("messages", mode="before")
    @classmethod
    def check_messages(cls, messages: Any, info: ValidationInfo) -> Any:
        if messages is None:
            raise _fail("missing_required_parameter", "required")
        if not isinstance(messages, list):
            raise _fail("invalid_type", f"expected an array, got {type_name(messages)}")
        if not messages:
            raise _fail("invalid_value", "must not be empty")
        # Count images first: refuse a request with too many before decoding any of them.
        n_images = sum(
            1 for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
            for p in m["content"] if isinstance(p, dict) and p.get("type") == "image_url"
        )
        limit = _limits(info).max_images
        if n_images > limit:
            raise _fail("too_many_images", f"{n_images} images; at most {limit} per request")
        n_videos = sum(
            1 for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
            for p in m["content"] if isinstance(p, dict) and p.get("type") == "video_url"
        )
        if n_videos > _limits(info).max_videos:
            raise _fail("too_many_videos", f"{n_videos} videos; at most {_limits(info).max_videos} per request")
        return messages

    @field_validator("max_tokens", "max_completion_tokens", mode="before")
    @classmethod
    def check_max_tokens(cls, value: Any, info: ValidationInfo) -> Any:
        return _integer(value, 1, _limits(info).max_tokens)

    @field_validator("top_k", mode="before")
    @classmethod
    def check_top_k(cls, value: Any) -> int:
        return max(_integer(value, -1, 1 << 20) or 0, 0)

    @field_validator("seed", mode="before")
    @classmethod
    def check_seed(cls, value: Any) -> Any:
        return _integer(value, -(1 << 63), (1 << 64) - 1)

    @field_validator("stop", mode="before")
    @classmethod
    def check_stop(cls, stop: Any, info: ValidationInfo) -> tuple[str, ...]:
        if stop is None:
            return ()
        limits = _limits(info)
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _fail("invalid_type", "expected a string or an array of strings")
        if len(stops) > limits.max_stop:
            raise _fail("invalid_value", f"at most {limits.max_stop} stop strings, got {len(stops)}")
        if any(len(s) > limits.max_stop_chars for s in stops):
            raise _fail("invalid_value", f"a stop string is longer than {limits.max_stop_chars} characters")
        return tuple(stops)

    @field_validator("stream", mode="before")
    @classmethod
    def check_stream(cls, value: Any) -> bool:
        if value is not None and type(value) is not bool:
            raise _fail("invalid_type", f"expected a boolean, got {type_name(value)}")
        return bool(value)

    @field_validator("stream_options", mode="before")
    @classmethod
    def check_stream_options(cls, options: Any, info: ValidationInfo) -> Any:
        if options is None:
            return None
        if not info.data.get("stream"):
            raise _fail("invalid_value", "only allowed with stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise _fail("invalid_type", 'expected {"include_usage": true|false}')
        if type(options.get("include_usage", False)) is not bool:
            raise _fail("invalid_type", "expected a boolean", ".include_usage")
        return options


# ---------------------------------------------------------------------------------- errors, in order
_TOP_ORDER = [*NEUTRAL_FIELDS, "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
              "repetition_penalty", "top_k", "seed", "stop", "stream", "stream_options"]
_MESSAGE_ORDER = ["role", "name", "content"]


def _param(loc: tuple[Any, ...]) -> str:
    """`("messages", 0, "content", 1, "text")` -> `messages[0].content[1].text`."""
    out = ""
    for part in loc:
        if isinstance(part, str) and part.startswith("<"):  # a union branch's tag, not a field
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _sort_key(error: dict) -> tuple:
    """The order the server checks in: unknown top-level fields (by name) first, then the fields in `_TOP_ORDER`;
    inside `messages`, message by message: unknown fields (by name), then role, name, content."""
    loc = error["loc"]
    if error["type"] == "extra_forbidden" and len(loc) == 1:
        return (0, str(loc[0]))
    key: tuple = (1, _TOP_ORDER.index(loc[0]) if loc[0] in _TOP_ORDER else len(_TOP_ORDER))
    if loc[0] == "messages" and len(loc) > 1:
        inner = loc[2] if len(loc) > 2 else None
        if error["type"] == "extra_forbidden" and len(loc) == 3:
            key += (loc[1], 0, str(inner))
        else:
            key += (loc[1], 1, _MESSAGE_ORDER.index(inner) if inner in _MESSAGE_ORDER else -1)
    return key


def first_error(err: ValidationError) -> tuple[str, APIError]:
    """(top-level field, the `APIError`) of the error the server reports first among pydantic's."""
    errors = sorted(err.errors(include_url=False), key=_sort_key)  # stable: pydantic's order breaks ties
    e = errors[0]
    loc = tuple(e["loc"])
    param = _param(loc) + (e.get("ctx") or {}).get("suffix", "")
    kind = e["type"]
    if kind == "extra_forbidden":
        if len(loc) == 1:
            return str(loc[0]), bad(param, "unrecognized request argument", "unknown_parameter")
        return str(loc[0]), bad(param, "not supported by this server", "unsupported_parameter")
    if kind in ("model_type", "model_attributes_type", "dict_type"):  # a message or a part that is no object
        return str(loc[0]), bad(param, f"expected an object, got {type_name(e.get('input'))}", "invalid_type")
    if isinstance(e.get("ctx"), dict) and "message" in e["ctx"]:
        return str(loc[0]), bad(param, e["ctx"]["message"], kind)
    return str(loc[0]), bad(param, e["msg"][:200], "invalid_value")  # a backstop: every check above has its text
