"""Videos in training data: LLaVA-Video JSON records, WebDataset `.mp4` members, Energon `has_video`, mixed
image + video blends packed like images, and bad videos skipped and counted by reason."""

from __future__ import annotations

import pytest

from stitch.data.config import DataConfig, DatasetSpec
from stitch.data.processor import Processor
from stitch.data.sources import open_source

from .conftest import make_image, tiny_config
from .test_sources import PROMPTS, write_energon, write_jsonl, write_tar
from .video_clips import encode, moving_square


@pytest.fixture
def video_proc(smol_tok):
    return Processor(smol_tok, tiny_config(image_wrapper="internvl", tile_tags="none")).with_options(num_frames=4)


def test_llava_video_records(tmp_path, video_proc):
    (tmp_path / "clips").mkdir()
    encode(moving_square(12), tmp_path / "clips" / "a.mp4")
    rows = [
        # LLaVA-Video writes the video's place as <image>
        {"video": "a.mp4", "conversations": [{"from": "human", "value": "<image>\nWhere does it go?"},
                                             {"from": "gpt", "value": "right"}]},
        {"video": "a.mp4", "question": "Where?", "answer": "right"},  # VQA-style record
    ]
    path = write_jsonl(tmp_path / "video.jsonl", rows)
    src = open_source(DatasetSpec(path=str(path), video_root=str(tmp_path / "clips")), PROMPTS)
    for i in range(2):
        rec = src.get(i)
        assert rec.videos == [str(tmp_path / "clips" / "a.mp4")] and rec.images == []
        assert "<video>" in rec.conversation[0]["content"] and "<image>" not in rec.conversation[0]["content"]
        sample = video_proc.encode(rec.conversation, rec.images, rec.videos)
        assert sample.num_tiles == [1] * 4 and sample.pixel_values.shape[0] == 4


def test_webdataset_and_energon_video_members(tmp_path, video_proc):
    clip = encode(moving_square(10))
    shard = write_tar(tmp_path / "wds" / "s-0.tar", {
        "k0.mp4": clip, "k0.json": b'{"conversations": [{"from": "human", "value": "<video>Go?"},'
                                   b' {"from": "gpt", "value": "yes"}]}',
        "k1.webm": encode(moving_square(10), container="webm"), "k1.txt": b"a red square",
    })
    src = open_source(DatasetSpec(path=str(shard)), PROMPTS)
    assert src.get(0).videos == [clip]
    caption = src.get(1)
    assert len(caption.videos) == 1 and caption.conversation[0]["content"].startswith("<video>\n")
    for i in range(2):
        rec = src.get(i)
        assert video_proc.encode(rec.conversation, rec.images, rec.videos).pixel_values.shape[0] == 4
    root = write_energon(tmp_path / "en", tmp_path, "CaptioningSample", {"image": "mp4", "caption": "txt"},
                         {"0.mp4": clip, "0.txt": b"moving right"})
    plain = open_source(DatasetSpec(path=str(root)), PROMPTS).get(0)
    assert plain.images == [clip] and plain.videos == []  # without the subflavor it is an image field
    rec = open_source(DatasetSpec(path=str(root), subflavors={"has_video": True}), PROMPTS).get(0)
    assert rec.videos == [clip] and rec.images == [] and "<video>" in rec.conversation[0]["content"]


def test_mixed_blend_packs_and_counts_bad_videos(tmp_path, video_proc):
    from stitch.data.blend import build_train_stream
    from stitch.data.collate import collate

    encode(moving_square(12), tmp_path / "good.mp4")
    data = encode(moving_square(40), tmp_path / "long.mp4", gop=4, faststart=True)
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.mp4").write_bytes(b"\x00" * 300)
    (tmp_path / "empty.mp4").write_bytes(b"")
    make_image(tmp_path / "img.png", size=(56, 56))

    def row(video):
        return {"video": video, "conversations": [{"from": "human", "value": "<video>\nQ?"},
                                                  {"from": "gpt", "value": "A."}]}
    videos = write_jsonl(tmp_path / "videos.jsonl", [
        row("good.mp4"), row("cut.mp4"), row("junk.mp4"), row("empty.mp4"), row("gone.mp4"),
        {"video": "good.mp4", "image": "img.png",
         "conversations": [{"from": "human", "value": "<image> vs <video>?"}, {"from": "gpt", "value": "same"}]},
    ])
    images = write_jsonl(tmp_path / "images.jsonl", [
        {"image": "img.png", "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                               {"from": "gpt", "value": "A."}]}])
    cfg = DataConfig(datasets=[{"path": str(videos), "weight": 1.0}, {"path": str(images), "weight": 1.0}],
                     num_workers=0, max_skip_fraction=1.0, skip_check_after=1, seq_length=512, num_frames=3)
    stream = build_train_stream(cfg, video_proc, seed=0)
    it = stream.samples()
    samples = [next(it) for _ in range(12)]
    assert {s.dataset for s in samples} == {str(videos), str(images)}
    skipped = stream.stats.skipped[str(videos)]
    assert set(skipped) == {"truncated_video", "unreadable_video", "empty_video", "missing_file"}
    mixed = [s for s in samples if len(s.num_tiles) == 4]  # image + 3 frames
    assert mixed and all(s.pixel_values.shape[0] == 4 for s in mixed)
    batch = collate(samples[:4], pack=True, pad_token_id=video_proc.pad_token_id)
    assert batch["input_ids"].shape[0] == 1 and len(batch["cu_seqlens"]) == 5
    assert batch["pixel_values"].shape[0] == sum(s.pixel_values.shape[0] for s in samples[:4])
    ids = batch["input_ids"][0]
    per_tile = video_proc.config.tokens_per_tile
    assert int((ids == video_proc.image_token_id).sum()) == batch["pixel_values"].shape[0] * per_tile
