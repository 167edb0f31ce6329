"""Videos at inference: `stitch.generate(..., videos=)`, `stitch generate --video`, and `video_url` parts in
`stitch serve` (vLLM's OpenAI form) give the same greedy answer; bad videos are a clear error / a 4xx."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

import stitch
from stitch.cli import main
from stitch.data.skips import SampleError
from tests.data.video_clips import encode, moving_square

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from tests.infer.test_server import API_KEY, LIMITS, Server, user  # noqa: E402

PROMPT = "What happens in this video?"


def video_part(raw: bytes, mime: str = "video/mp4") -> dict:
    return {"type": "video_url", "video_url": {"url": f"data:{mime};base64,{base64.b64encode(raw).decode()}"}}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("videos")
    good = folder / "clip.mp4"
    encode(moving_square(12, size=64), good, fps=6)
    long = encode(moving_square(40, size=64), folder / "long.mp4", gop=4, faststart=True)
    (folder / "cut.mp4").write_bytes(long[: len(long) // 2])
    (folder / "junk.mp4").write_bytes(b"\x00\x01" * 400)
    return {"good": good, "cut": folder / "cut.mp4", "junk": folder / "junk.mp4"}


def test_generate_cli_and_server_agree_on_a_video(ckpt, clips, capsys):
    from stitch.infer.server import create_app

    model, processor = stitch.load(ckpt)
    expected = stitch.generate(model, processor, None, PROMPT, videos=[clips["good"]], num_frames=4,
                               max_new_tokens=8)
    assert expected.strip()
    assert stitch.generate(model, processor, None, PROMPT, videos=clips["good"], num_frames=4,
                           max_new_tokens=8) == expected
    # the frame count matters: fewer frames, a shorter prompt
    engine_prompt = [{"role": "user", "content": f"<video>\n{PROMPT}"}]
    n4 = len(processor.with_options(num_frames=4).encode(engine_prompt, videos=[clips["good"]],
                                                          add_generation_prompt=True))
    n2 = len(processor.with_options(num_frames=2).encode(engine_prompt, videos=[clips["good"]],
                                                          add_generation_prompt=True))
    assert n4 - n2 >= 2 * processor.config.tokens_per_tile  # two frames (and their tile tags) fewer
    args = ["generate", str(ckpt), "--video", str(clips["good"]), "--num-frames", "4", "--prompt", PROMPT,
            "--max-new-tokens", "8", "--device", "cpu", "--dtype", "float32"]
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out[:-1] == expected
    # a bad video is a one-line error naming the file and the reason
    assert main([*args[:2], "--video", str(clips["junk"]), *args[4:]]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "junk.mp4" in errors[0] and "unreadable_video" in errors[0]
    with pytest.raises(SampleError, match="truncated_video"):
        stitch.generate(model, processor, None, PROMPT, videos=[clips["cut"]], num_frames=8)

    # the server, with the model's default frame count set to 4 as the CLI asked
    processor.num_frames = 4
    app = create_app(model, processor, model_name="tiny", limits=LIMITS, api_key=API_KEY)
    server = Server(app)
    try:
        client = server.client()
        reply = client.chat.completions.create(
            model="tiny", messages=user(video_part(clips["good"].read_bytes()), PROMPT), max_tokens=8,
            temperature=0)
        assert reply.choices[0].message.content == expected
        assert reply.usage.prompt_tokens == n4
        bad_cases = {
            "unreadable_video": user(video_part(clips["junk"].read_bytes()), PROMPT),
            "truncated_video": user(video_part(clips["cut"].read_bytes()), PROMPT),
            "too_many_videos": user(video_part(clips["good"].read_bytes()), video_part(clips["good"].read_bytes())),
            "unsupported_video_url": user({"type": "video_url", "video_url": {"url": "https://x/v.mp4"}}),
            "unsupported_video_format": user(video_part(b"abc", mime="text/plain")),
            "invalid_value": user("a literal <video> in the text"),
        }
        for code, messages in bad_cases.items():
            r = httpx.post(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                           json={"model": "tiny", "messages": messages, "max_tokens": 4}, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["code"] == code, (code, r.text)
        again = client.chat.completions.create(
            model="tiny", messages=user(video_part(clips["good"].read_bytes()), PROMPT), max_tokens=8,
            temperature=0)
        assert again.choices[0].message.content == expected  # still serving after the bad requests
    finally:
        server.stop()
        app.state.service.engine.close()
