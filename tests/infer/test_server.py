"""`stitch serve` on a tiny random VLM: the official `openai` client against a server on a free loopback port.

Checks that plain and streamed completions with an image equal `stitch generate` (greedy), that 200+ malformed
or hostile requests each get a 4xx while other requests keep running, that 32 concurrent requests are batched
and answer as they do one at a time, and the command line itself.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import stitch  # noqa: E402
from stitch.cli import main  # noqa: E402
from stitch.errors import StitchError  # noqa: E402
from stitch.infer.server import Limits, create_app, listen_socket, uvicorn_server  # noqa: E402

API_KEY = "test-key"
MAX_TOKENS = 12
# Small limits so each can be crossed cheaply.
LIMITS = Limits(max_body_bytes=1 << 20, max_image_bytes=200_000, max_image_pixels=1_000_000, max_images=3,
                max_tokens=64, max_pending=128)


def picture(w: int = 96, h: int = 64, color=(200, 30, 30)) -> Image.Image:
    img = Image.new("RGB", (w, h), color)
    for x in range(0, w, 5):  # some structure so tiles differ
        img.putpixel((x, x % h), (x % 255, 255 - x % 255, 90))
    return img


def encoded(img: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}]


class Server:
    """A uvicorn server running `app` in a thread, on a free loopback port."""

    def __init__(self, app):
        self.app = app
        self.sock = listen_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn_server(app, log_level="critical")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "the server did not start"
            time.sleep(0.01)

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=60, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve_images")
    picture().save(folder / "red.png")
    picture(40, 120, (10, 90, 200)).save(folder / "blue.jpg", quality=95)
    return folder


@pytest.fixture(scope="module")
def served(ckpt, images_dir):
    model, processor = stitch.load(ckpt)  # its own copy: the generate tests keep theirs
    app = create_app(model, processor, model_name=Path(ckpt).name, limits=LIMITS, api_key=API_KEY,
                     local_images=images_dir)
    server = Server(app)
    server.model_name = Path(ckpt).name
    server.processor = processor
    yield server
    server.stop()
    app.state.service.engine.close()


def stitch_generate(capsys, ckpt, image: Path | None, prompt: str, max_new_tokens: int = MAX_TOKENS) -> str:
    # float32 as `served` loads it (the CLI's own default follows this CPU's measured bf16 speed)
    args = ["generate", str(ckpt), "--prompt", prompt, "--max-new-tokens", str(max_new_tokens), "--device", "cpu",
            "--dtype", "float32"]
    if image is not None:
        args += ["--image", str(image)]
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")
    return out[:-1]


# ------------------------------------------------------------------------------------------ happy paths
def test_health_models_and_auth(served):
    health = httpx.get(f"{served.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    client = served.client()
    assert [m.id for m in client.models.list().data] == [served.model_name]
    assert client.models.retrieve(served.model_name).id == served.model_name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    bad = openai.OpenAI(base_url=f"{served.url}/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    missing = httpx.get(f"{served.url}/v1/models")
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"


def test_completion_with_image_equals_stitch_generate(served, ckpt, images_dir, capsys):
    client = served.client()
    prompt = "What is in this picture?"
    expected = stitch_generate(capsys, ckpt, images_dir / "red.png", prompt)
    assert expected.strip()
    messages = user(image_part(data_url((images_dir / "red.png").read_bytes())), prompt)

    reply = client.chat.completions.create(model=served.model_name, messages=messages, max_tokens=MAX_TOKENS,
                                           temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected
    prompt_tokens = len(served.processor.encode(
        [{"role": "user", "content": f"<image>\n{prompt}"}], [picture()], add_generation_prompt=True))
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.completion_tokens == (MAX_TOKENS if choice.finish_reason == "length" else
                                             reply.usage.completion_tokens)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert choice.finish_reason in ("stop", "length")

    stream = client.chat.completions.create(model=served.model_name, messages=messages, max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == reply.usage.total_tokens
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # really streamed

    # A local file, allowed because it is inside --allow-local-images; JPEG through a file:// URL.
    local = client.chat.completions.create(model=served.model_name, messages=user(image_part("red.png"), prompt),
                                           max_tokens=MAX_TOKENS, temperature=0)
    assert local.choices[0].message.content == expected
    jpeg = stitch_generate(capsys, ckpt, images_dir / "blue.jpg", "Describe it.")
    got = client.chat.completions.create(
        model=served.model_name, messages=user(image_part(f"file://{images_dir / 'blue.jpg'}"), "Describe it."),
        max_tokens=MAX_TOKENS, temperature=0)
    assert got.choices[0].message.content == jpeg


def test_text_only_system_stop_and_seed(served, ckpt, capsys):
    client = served.client()
    expected = stitch_generate(capsys, ckpt, None, "Tell me a story.", max_new_tokens=20)
    messages = [{"role": "user", "content": "Tell me a story."}]
    reply = client.chat.completions.create(model=served.model_name, messages=messages, max_tokens=20,
                                           temperature=0)
    assert reply.choices[0].message.content == expected
    # A stop string cuts the text where it begins.
    stop = expected[len(expected) // 2 :][:4]
    cut = client.chat.completions.create(model=served.model_name, messages=messages, max_tokens=20, temperature=0,
                                         stop=[stop, "never appears"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == expected[: expected.index(stop)]
    # Seeded sampling is reproducible; a different seed gives another sample.
    kwargs = dict(model=served.model_name, messages=messages, max_tokens=20, temperature=1.0, top_p=0.9)
    first = client.chat.completions.create(seed=7, **kwargs).choices[0].message.content
    assert client.chat.completions.create(seed=7, **kwargs).choices[0].message.content == first
    assert client.chat.completions.create(seed=8, **kwargs).choices[0].message.content != first
    # top_k / repetition_penalty as extra parameters (as vLLM takes them), and the developer role.
    extra = client.chat.completions.create(
        model=served.model_name, max_tokens=8, temperature=0.7, seed=1,
        messages=[{"role": "developer", "content": "Be brief."}, *messages],
        extra_body={"top_k": 5, "repetition_penalty": 1.2})
    assert extra.choices[0].message.content is not None


# ------------------------------------------------------------------------------------ hostile requests
def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` (a decompression bomb's signature)."""
    raw = bytearray(encoded(picture(8, 8)))
    ihdr = bytearray(raw[16:29])  # the IHDR chunk's data: width, height, depth, color, ...
    ihdr[0:8] = struct.pack(">II", width, height)
    raw[16:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(raw)


def hostile_bodies(model: str, context: int) -> list[tuple[str, bytes | dict]]:
    """(what, body) pairs that must each get a 4xx: bodies as bytes, or dicts to send as JSON."""
    good_image = data_url(encoded(picture()))
    ok = {"model": model, "messages": user(image_part(good_image), "Hi"), "max_tokens": 4}
    valid = json.dumps(ok).encode()

    def msg(**changes) -> dict:
        return {**ok, **changes}

    def with_image(url: str) -> dict:
        return msg(messages=user(image_part(url), "What is it?"))

    def with_raw_image(raw: bytes, mime: str = "image/png") -> dict:
        return with_image(data_url(raw, mime))

    cases: list[tuple[str, bytes | dict]] = []
    # Malformed JSON and truncated bodies.
    cases += [("empty body", b""), ("open brace", b"{"), ("truncated key", b'{"model":'), ("null", b"null"),
              ("array", b"[]"), ("number", b"123"), ("string", b'"hi"'), ("not utf-8", b'{"model": "\xff\xfe"}'),
              ("NaN", valid.replace(b'"max_tokens": 4', b'"max_tokens": 4, "temperature": NaN')),
              ("Infinity", valid.replace(b'"max_tokens": 4', b'"max_tokens": 4, "temperature": Infinity')),
              ("1e999", valid.replace(b'"max_tokens": 4', b'"max_tokens": 4, "temperature": 1e999')),
              ("deep nesting", b"[" * 100_000 + b"]" * 100_000), ("deep object", b'{"a":' * 50_000 + b"1" +
                                                                   b"}" * 50_000),
              ("trailing garbage", valid + b"xx"), ("form body", b"model=x&messages=y")]
    # Every strict prefix of a JSON object is invalid JSON: 40 cuts spread over the body.
    cuts = sorted({1, 2, 10, *(len(valid) * k // 40 for k in range(1, 40)), len(valid) - 2, len(valid) - 1})
    cases += [(f"truncated at {n}/{len(valid)}", valid[:n]) for n in cuts]
    # Wrong types and values.
    bad_fields = {
        "model": [123, None, ["x"]], "messages": ["hi", {}, [], [1], None, [[]]],
        "max_tokens": ["10", 1.5, True, 0, -1, 10**6, 2**80], "max_completion_tokens": [0, "5", 10**4],
        "temperature": ["hot", -0.1, 2.5, True, [1], {}], "top_p": [0, -1, 1.5, "0.9"],
        "top_k": [-2, 1.5, "3"], "repetition_penalty": [0, -1, 100, "x"],
        "seed": ["x", 1.5, 2**80, True], "stop": [5, [1], ["a"] * 5, "x" * 1000, {"a": 1}],
        "stream": ["yes", 1, [True]], "stream_options": [{"include_usage": True}],
        "n": [2, 0, "1"], "logprobs": [True], "top_logprobs": [3], "tools": [[{"type": "function"}]],
        "tool_choice": ["auto"], "frequency_penalty": [0.5], "presence_penalty": [1], "logit_bias": [{"1": 5}],
        "response_format": [{"type": "json_object"}], "functions": [[{"name": "f"}]], "foo": [1],
        "prompt": ["completions-style"],
    }
    for key, values in bad_fields.items():
        base = {k: v for k, v in ok.items() if key != "max_completion_tokens" or k != "max_tokens"}
        cases += [(f"{key}={json.dumps(v)[:30]}", {**base, key: v}) for v in values]
    cases += [("stream_options not an object", msg(stream=True, stream_options="yes")),
              ("stream_options unknown key", msg(stream=True, stream_options={"foo": 1})),
              ("both max_tokens fields", msg(max_completion_tokens=4)), ("no model", {"messages": ok["messages"]}),
              ("no messages", {"model": model}), ("unknown model", msg(model="gpt-4o")),
              ("model differs in case", msg(model=model.upper()))]
    # Message shapes.
    bad_messages = [
        [{"content": "hi"}], [{"role": "user"}], [{"role": "tool", "content": "x"}], [{"role": 5, "content": "x"}],
        [{"role": "user", "content": 5}], [{"role": "user", "content": None}], [{"role": "user", "content": [5]}],
        [{"role": "user", "content": [{"type": "audio", "data": "x"}]}],
        [{"role": "user", "content": [{"type": "text"}]}], [{"role": "user", "content": [{"type": "text", "text": 5}]}],
        [{"role": "user", "content": [{"text": "no type"}]}], [{"role": "user", "content": [{"type": "image_url"}]}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": good_image, "detail": "ultra"}}]}],
        [{"role": "user", "content": "hi", "tool_calls": []}], [{"role": "user", "content": "hi", "name": 5}],
        [{"role": "user", "content": ""}], [{"role": "user", "content": "   "}],
        [{"role": "assistant", "content": "first"}], [{"role": "system", "content": "only a system message"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "system", "content": "late system"},
         {"role": "user", "content": "c"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [image_part(good_image)]},
         {"role": "user", "content": "x"}],
        [{"role": "user", "content": "look: <image>"}], [{"role": "user", "content": "<IMG_CONTEXT><IMG_CONTEXT>"}],
        [{"role": "user", "content": [{"type": "text", "text": "<image>"}, image_part(good_image)]}],
    ]
    cases += [(f"messages #{i}", msg(messages=m)) for i, m in enumerate(bad_messages)]
    # Images: count, base64, URL kinds, formats, sizes, bombs, corrupt files.
    noise = Image.frombytes("RGB", (300, 300), os.urandom(300 * 300 * 3))
    png = encoded(picture())
    bad_urls = [
        "data:image/png;base64,!!!!", "data:image/png;base64,abc", "data:image/png;base64,aGVsbG8=x",
        "data:image/png;base64,", "data:image/png,rawbytes", "data:image/png;base64", "data:;base64,aGk=",
        "data:text/plain;base64,aGVsbG8=", "data:image/png;base64," + "A" * 300_000,
        "http://example.com/cat.png", "https://example.com/cat.png", "/etc/passwd", "file:///etc/passwd",
        "../../../../etc/hostname", "no-such-file.png", ".", "ftp://host/x.png", "red.png\x00.txt", "",
    ]
    cases += [(f"url {u[:40]!r}", with_image(u)) for u in bad_urls]
    bad_images = [
        ("text as png", b"hello world, not an image"),
        ("tiff", encoded(picture(), "TIFF")), ("ico", encoded(picture(32, 32), "ICO")),
        ("ppm", encoded(picture(), "PPM")), ("pdf header", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj"),
        ("truncated png", png[: len(png) // 2]), ("png header only", png[:33]),
        ("truncated jpeg", encoded(picture(), "JPEG")[:200]),
        ("too many bytes", encoded(noise)), ("bomb header 20000x20000", _png_claiming(20_000, 20_000)),
        ("bomb header 1x2000000", _png_claiming(1, 2_000_000)),
        ("bomb header 65535x65535", _png_claiming(65_535, 65_535)),
        ("too many pixels (real)", encoded(Image.new("1", (2000, 1000)))),
        ("zero width", _png_claiming(0, 10)),
    ]
    cases += [(what, with_raw_image(raw)) for what, raw in bad_images]
    cases += [("svg", with_raw_image(b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml")),
              ("4 images", msg(messages=user(*[image_part(good_image)] * 4, "Compare."))),
              ("images across messages", msg(messages=[*user(image_part(good_image), image_part(good_image), "a"),
                                                       {"role": "assistant", "content": "b"},
                                                       *user(image_part(good_image), image_part(good_image), "c")]))]
    # Lengths against the context.
    cases += [("prompt past the context", msg(messages=user("hello " * (context + 100)))),
              ("characters far past the context", msg(messages=user("a" * 300_000))),
              ("max_tokens past the limit", msg(max_tokens=LIMITS.max_tokens + 1))]
    return cases


def edge_of_context(processor, context: int) -> dict:
    """Messages whose prompt leaves 10 tokens of context: max_tokens 11+ must be refused."""
    words = context - 40
    while True:
        conv = [{"role": "user", "content": "hi " * words}]
        n = len(processor.encode(conv, [], add_generation_prompt=True))
        if n == context - 10:
            return {"messages": conv}
        words += (context - 10) - n


def raw_http(port: int, data: bytes, half_close: bool = False, timeout: float = 10) -> int | None:
    """Send raw bytes; the response's status code, or None if the server closed without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        buf = b""
        try:
            while b"\r\n" not in buf:
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    m = re.match(rb"HTTP/1\.[01] (\d{3})", buf)
    return int(m.group(1)) if m else None


def hostile_raw(port: int, auth: str) -> list[tuple[str, bytes]]:
    """Requests broken at the HTTP level: huge or malformed headers, lying lengths, wrong methods and paths."""
    def request(head: str, body: bytes = b"") -> bytes:
        return head.encode() + b"\r\n\r\n" + body

    post = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {auth}\r\n"
    return [
        ("huge header", request(post + "X-Big: " + "a" * 100_000 + "\r\nContent-Length: 2", b"{}")),
        ("many headers", request(post + "".join(f"X-H{i}: {'v' * 50}\r\n" for i in range(2000)) +
                                 "Content-Length: 2", b"{}")),
        ("huge url", request("GET /" + "a" * 100_000 + " HTTP/1.1\r\nHost: x")),
        ("garbage request line", request("GARBAGE")),
        ("bad content-length", request(post + "Content-Length: abc", b"{}")),
        ("negative content-length", request(post + "Content-Length: -5", b"{}")),
        ("two content-lengths", request(post + "Content-Length: 2\r\nContent-Length: 3", b"{}")),
        ("body over the limit (declared)", request(post + f"Content-Length: {LIMITS.max_body_bytes + 1}")),
        ("body over the limit (chunked)", request(post + "Transfer-Encoding: chunked",
                                                  b"".join(b"%x\r\n" % 65536 + b"x" * 65536 + b"\r\n"
                                                           for _ in range(20)) + b"0\r\n\r\n")),
        ("bad chunk size", request(post + "Transfer-Encoding: chunked", b"zz\r\nxx\r\n0\r\n\r\n")),
        ("GET on completions", request("GET /v1/chat/completions HTTP/1.1\r\nHost: x")),
        ("DELETE on models", request("DELETE /v1/models HTTP/1.1\r\nHost: x")),
        ("unknown path", request("GET /v2/whatever HTTP/1.1\r\nHost: x")),
        ("no auth", request("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2", b"{}")),
        ("wrong auth", request("GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope")),
        ("non-ascii auth", b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n\r\n"),
        ("http/0.9", b"GET /\r\n\r\n"),
        *((f"{method} {path}", request(f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {auth}"))
          for method in ("PUT", "PATCH", "DELETE") for path in ("/v1/chat/completions", "/v1/models", "/health")),
        ("no host", request("GET /health HTTP/1.1\r\nX: y")),
    ]


def test_hostile_requests_get_4xx_and_the_server_keeps_working(served, ckpt, capsys):
    model = served.model_name
    context = served.app.state.service.context
    expected = stitch_generate(capsys, ckpt, None, "Count to ten.", max_new_tokens=40)
    good = {"model": model, "messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 40,
            "temperature": 0}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    # Valid requests running while the barrage goes on must finish untouched.
    with ThreadPoolExecutor(4) as background, httpx.Client(base_url=served.url, headers=headers,
                                                           timeout=60) as http:
        running = [background.submit(http.post, "/v1/chat/completions", json=good) for _ in range(4)]
        cases = hostile_bodies(model, context)
        cases.append(("context edge", {"model": model, "max_tokens": 11,
                                       **edge_of_context(served.processor, context)}))
        failures = []
        for what, body in cases:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = http.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
            error = r.json().get("error") if r.headers.get("content-type") == "application/json" else None
            if not 400 <= r.status_code < 500 or not (error and error["message"] and error["type"]):
                failures.append(f"{what}: {r.status_code} {r.text[:200]}")
        # One request below the edge of the context is fine.
        edge = http.post("/v1/chat/completions", json={"model": model, "max_tokens": 10,
                                                       **edge_of_context(served.processor, context)})
        assert edge.status_code == 200, edge.text
        oversized = http.post("/v1/chat/completions", content=b"x" * (LIMITS.max_body_bytes + 10))
        assert oversized.status_code == 413

        def chunked():
            for _ in range(40):
                yield b"x" * 65536

        assert http.post("/v1/chat/completions", content=chunked()).status_code == 413
        n_raw = 0
        for what, data in hostile_raw(served.port, API_KEY):
            status = raw_http(served.port, data)
            n_raw += 1
            if status is None or not 400 <= status < 500:
                failures.append(f"raw {what}: {status}")
        # Bodies that stop early and close: there is no one to answer, but nothing may break.
        for cut in (0, 10, 100):
            head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            body = json.dumps(good).encode()
            status = raw_http(served.port, (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body[:cut],
                              half_close=True)
            assert status is None or 400 <= status < 500
        assert not failures, "\n".join(failures)
        assert len(cases) + n_raw >= 200, len(cases) + n_raw  # each answered with a 4xx
        for future in running:
            r = future.result()
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected
    # Afterwards: still healthy and still right, through the official client.
    assert httpx.get(f"{served.url}/health").json()["requests_in_progress"] == 0
    reply = served.client().chat.completions.create(**good)
    assert reply.choices[0].message.content == expected


def test_busy_server_answers_503(served):
    service = served.app.state.service
    service.admitted += LIMITS.max_pending  # as if that many were in progress
    try:
        r = httpx.post(f"{served.url}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"model": served.model_name, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "server_busy"
    finally:
        service.admitted -= LIMITS.max_pending


def test_engine_failure_is_a_500_and_the_server_recovers(served):
    """A failure inside the engine (not the client's fault) fails that batch's requests with a 500 (an error
    event once streaming has begun); the next requests are served as usual."""
    engine = served.app.state.service.engine

    def broken(batch, track_text):
        raise RuntimeError("simulated device failure")
        yield  # a generator, like the real one

    client = served.client()
    kwargs = dict(model=served.model_name, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                  temperature=0)
    engine._run_batch = broken
    try:
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(**kwargs)
        with httpx.stream("POST", f"{served.url}/v1/chat/completions", json={**kwargs, "stream": True},
                          headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            assert r.status_code == 200
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[-2][6:])["error"]["type"] == "server_error" and events[-1] == "data: [DONE]"
    finally:
        del engine._run_batch
    assert client.chat.completions.create(**kwargs).choices[0].message.content is not None
    assert httpx.get(f"{served.url}/health").json()["requests_in_progress"] == 0


# ------------------------------------------------------------------------------------------- concurrency
def test_32_concurrent_requests_are_batched_and_match_sequential(served, images_dir):
    client = served.client()
    red, blue = (data_url((images_dir / n).read_bytes(), m) for n, m in (("red.png", "image/png"),
                                                                          ("blue.jpg", "image/jpeg")))
    prompts = [f"Question {i}: what do you see?" + " Please answer." * (i % 5) for i in range(32)]
    requests = []
    for i, p in enumerate(prompts):
        parts = [image_part(red)] if i % 3 == 0 else [image_part(blue)] if i % 3 == 1 else []
        requests.append(user(*parts, p))

    def ask(messages):
        r = client.chat.completions.create(model=served.model_name, messages=messages, max_tokens=MAX_TOKENS,
                                           temperature=0)
        return r.choices[0].message.content, r.usage.completion_tokens

    engine = served.app.state.service.engine
    sizes: list[int] = []
    run_batch = engine._run_batch

    def spy(batch, track_text):
        sizes.append(len(batch))
        return run_batch(batch, track_text)

    start = time.perf_counter()
    sequential = [ask(m) for m in requests]
    t_seq = time.perf_counter() - start
    engine._run_batch = spy
    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(32) as pool:
            concurrent = list(pool.map(ask, requests))
        t_con = time.perf_counter() - start
    finally:
        del engine._run_batch
    assert concurrent == sequential
    assert sum(sizes) == 32 and max(sizes) > 1, sizes  # requests that arrived together shared decode steps
    tokens = sum(n for _, n in concurrent)
    print(f"\n32 requests x {MAX_TOKENS} tokens (tiny model, CPU): sequential {t_seq:.2f} s "
          f"({tokens / t_seq:.0f} tok/s), concurrent {t_con:.2f} s ({tokens / t_con:.0f} tok/s), "
          f"speed-up {t_seq / t_con:.1f}x, batches {sizes}")


def test_continuous_batching_server_answers_as_sequential(ckpt, images_dir):
    """`--continuous-batching`: concurrent requests of mixed lengths (streamed and not) answer exactly as the same
    server answers them one at a time, and requests sent while a batch runs join it where they fit."""
    from stitch.infer.engine import Engine

    model, processor = stitch.load(ckpt)
    engine = Engine(model, processor, max_batch_size=4, continuous_batching=True)
    joins: list[int] = []
    prefill_row = engine._prefill_row
    engine._prefill_row = lambda *a: joins.append(a[1]) or prefill_row(*a)
    limits = dataclasses.replace(LIMITS, max_tokens=400)
    app = create_app(model, processor, model_name="m", limits=limits, api_key=API_KEY, engine=engine)
    server = Server(app)
    try:
        client = server.client()
        red = data_url((images_dir / "red.png").read_bytes(), "image/png")
        long_ask = user(image_part(red), "Describe the picture at length.")
        asks = [(user(f"Short question {i}?"), 2 + i % 4) for i in range(7)]

        def ask(item):
            messages, max_tokens = item
            r = client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens, temperature=0)
            return r.choices[0].message.content, r.usage.completion_tokens

        def stream_long(started: threading.Event) -> str:
            chunks = client.chat.completions.create(model="m", messages=long_ask, max_tokens=400, temperature=0,
                                                    stream=True)
            text = ""
            for chunk in chunks:
                text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
                started.set()
            return text

        sequential = [ask(a) for a in asks]
        long_alone = stream_long(threading.Event())
        assert not joins  # one request at a time: nothing to join
        started = threading.Event()
        with ThreadPoolExecutor(8) as pool:
            long_text = pool.submit(stream_long, started)
            assert started.wait(60)  # the long one is decoding (400 tokens): the short ones join it
            rest = list(pool.map(ask, asks))
        assert rest == sequential and long_text.result() == long_alone
        assert joins, "no request joined the running batch"
    finally:
        server.stop()
        engine.close()


# ------------------------------------------------------------------------------------------ command line
def test_serve_help_and_startup_errors(tmp_path, ckpt, capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "Example:" in out and "--api-key" in out and "--allow-local-images" in out
    assert main(["serve", str(tmp_path / "missing")]) != 0
    assert "not a checkpoint folder" in capsys.readouterr().err
    assert main(["serve", str(ckpt), "--max-images", "0"]) != 0
    taken = listen_socket("127.0.0.1", 0)
    with pytest.raises(StitchError, match="cannot listen"):
        listen_socket("127.0.0.1", taken.getsockname()[1])
    taken.close()


def test_stitch_serve_command(ckpt):
    """The real command in a subprocess: starts on a free port, answers, stops on SIGINT."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "stitch", "serve", str(ckpt), "--port", "0", "--api-key", "k",
                             "--log-level", "warning"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        port = None
        deadline = time.time() + 120
        lines = []
        while port is None and time.time() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
            port = int(m.group(1)) if m else None
        assert port is not None, "".join(lines)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        reply = client.chat.completions.create(model=Path(ckpt).name, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=4, temperature=0)
        assert reply.usage.completion_tokens <= 4
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(timeout=30) in (0, 130, -signal.SIGINT)
        finally:
            proc.kill()


def test_image_urls_schemes_and_percent_encoded_file_urls(images_dir, tmp_path):
    """file:// URLs are percent-decoded, schemes are case-insensitive, and an unsupported scheme is named."""
    from stitch.infer.server import APIError, decode_image

    picture().save(tmp_path / "a b.png")
    raw = (images_dir / "red.png").read_bytes()
    assert decode_image(f"file://{tmp_path}/a%20b.png", "img", LIMITS, tmp_path).size == picture().size
    upper = data_url(raw, "image/png").replace("data:", "DATA:").replace(";base64", ";BASE64")
    assert decode_image(upper, "img", LIMITS).mode == "RGB"
    with pytest.raises(APIError, match="unsupported URL scheme 'ftp'"):
        decode_image("ftp://x/y.png", "img", LIMITS, tmp_path)
