"""Videos in `stitch demo`, through the page's own turn handler (`run_turn`) without a browser: an uploaded
video answers as `stitch.generate(..., videos=...)` (the engine path of `stitch generate --video`), the
server's video limits apply, and a bad video is a message that leaves the chat as it was, so the next turn
still works. (The browser test, tests/infer/test_demo.py, needs Chromium and covers the page itself.)"""

from __future__ import annotations

import dataclasses

import pytest
from PIL import Image

import stitch
from stitch.infer.api_types import Limits
from stitch.infer.demo import Chat, DemoBackend, run_turn
from stitch.infer.generate import generate_batch, get_engine
from tests.data.video_clips import encode, moving_square

NEW_TOKENS = 8
PROMPT = "What happens in this video?"
KEEP = object()  # what the page passes as "leave the stats line as it is"


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo-videos")
    encode(moving_square(12, size=64), folder / "clip.mp4", fps=6)
    long = encode(moving_square(40, size=64), folder / "long.mp4", gop=4, faststart=True)
    (folder / "cut.mp4").write_bytes(long[: len(long) // 2])  # header fine, frames cut off
    (folder / "junk.mp4").write_bytes(b"\x00\x01" * 400)
    encode(moving_square(8, size=64), folder / "clip.webm", container="webm", fps=4)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "red.png")
    return folder


@pytest.fixture(scope="module")
def demo(loaded):
    model, processor = loaded
    backend = DemoBackend(get_engine(model, processor), Limits(max_tokens=64),
                          int(model.config.llm.max_position_embeddings))
    return model, processor, backend


def _turn(backend, message, chat=Chat(), shown=()):
    """The handler's last yield: (box, chat, shown, stats, status)."""
    return list(run_turn(backend, message, chat, list(shown), 0.0, 1.0, NEW_TOKENS, keep=KEEP))[-1]


def test_an_uploaded_video_answers_as_generate_and_a_chat_continues(demo, clips):
    model, processor, backend = demo
    want = stitch.generate(model, processor, None, PROMPT, videos=[clips / "clip.mp4"], max_new_tokens=NEW_TOKENS)
    assert want.strip()
    box, chat, shown, stats, status = _turn(backend, {"text": PROMPT, "files": [str(clips / "clip.mp4")]})
    assert (box, status) == (None, "") and "tokens/s" in stats
    assert shown[-1] == {"role": "assistant", "content": want}
    assert shown[0] == {"role": "user", "content": {"path": str(clips / "clip.mp4")}}
    assert len(chat.videos) == 1 and chat.turns[0]["content"] == f"<video>\n{PROMPT}"
    # a second, text-only turn answers from the whole chat, video included
    follow = "And then?"
    conversation = [{"role": "user", "content": f"<video>\n{PROMPT}"}, {"role": "assistant", "content": want},
                    {"role": "user", "content": follow}]
    want2 = generate_batch(model, processor, [conversation], [[]], max_new_tokens=NEW_TOKENS,
                           videos=[[clips / "clip.mp4"]])[0]
    _, chat2, shown2, _, status2 = _turn(backend, {"text": follow, "files": []}, chat, shown)
    assert status2 == "" and shown2[-1]["content"] == want2 and len(chat2.videos) == 1
    # a video and an image in one turn: videos first, as `stitch generate` lays them out
    _, mixed, _, _, status3 = _turn(backend, {"text": "Both?", "files": [str(clips / "red.png"),
                                                                          str(clips / "clip.webm")]})
    assert status3 == "" and mixed.turns[0]["content"] == "<video>\n<image>\nBoth?"
    assert len(mixed.images) == 1 and len(mixed.videos) == 1


def test_bad_videos_are_messages_and_the_chat_stays(demo, clips):
    model, processor, backend = demo
    _, chat, shown, _, _ = _turn(backend, {"text": PROMPT, "files": [str(clips / "clip.mp4")]})
    cases = {  # upload -> what the status line says
        "junk.mp4": "junk.mp4: Invalid data",  # not a video: FFmpeg cannot open it
        "cut.mp4": "truncated_video: decoding frame",  # the header is fine; frames are cut off
    }
    for name, fragment in cases.items():
        fresh = _turn(backend, {"text": PROMPT, "files": [str(clips / name)]})
        assert fresh[1] == Chat() and fragment in fresh[4] and fresh[4].startswith("⚠️"), (name, fresh[4])
    # the server's limits: one video per chat, its bytes
    box, after, shown_after, stats, status = _turn(backend, {"text": "Another?", "files": [str(clips / "clip.webm")]},
                                                   chat, shown)
    assert "at most 1" in status and after is chat and shown_after == shown and stats is KEEP
    assert box == {"text": "Another?", "files": []}  # the text stays to resend; the files go
    small = DemoBackend(backend.engine, dataclasses.replace(backend.limits, max_video_bytes=1000), backend.context)
    status = _turn(small, {"text": PROMPT, "files": [str(clips / "clip.mp4")]})[4]
    assert "clip.mp4: the video is" in status and "at most 1000" in status
    assert "video placeholder" in _turn(backend, {"text": "<video> here", "files": []})[4]
    # the demo keeps working: the chat with its video answers the next turn
    _, chat2, shown2, _, status2 = _turn(backend, {"text": "And then?", "files": []}, chat, shown)
    assert status2 == "" and len(shown2) == len(shown) + 2 and len(chat2.turns) == 4


def test_the_page_accepts_video_files(ckpt):
    import gradio as gr

    from stitch.infer.demo import build_demo

    app = build_demo(*stitch.load(ckpt))  # its own model: the page installs an image cache on the one it serves
    box = next(b for b in app.blocks.values() if isinstance(b, gr.MultimodalTextbox))
    assert {".mp4", ".webm", ".mkv", ".png"} <= set(box.file_types)
