"""Sources: LLaVA JSON/JSONL, captioning/VQA records, WebDataset shards, Energon folders, easy-vqa; bad data."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from stitch.data.config import DataConfig, DatasetSpec
from stitch.data.prompts import PromptLibrary
from stitch.data.skips import SampleError
from stitch.data.sources import braceexpand, easy_vqa_records, open_source
from stitch.errors import DataError

from .conftest import make_image

PROMPTS = PromptLibrary.load()


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def png_bytes(tmp_path: Path, size=(64, 48)) -> bytes:
    return make_image(tmp_path / f"tmp_{size[0]}x{size[1]}.png", size=size).read_bytes()


def test_llava_jsonl_multi_image_and_text_only(tmp_path):
    make_image(tmp_path / "imgs" / "a.jpg")
    make_image(tmp_path / "imgs" / "b.png")
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"image": "imgs/a.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                  {"from": "gpt", "value": "A picture."}]},
        {"image": ["imgs/a.jpg", "imgs/b.png"], "conversations": [
            {"from": "system", "value": "Be brief."}, {"from": "human", "value": "<image> vs <image>"},
            {"from": "gpt", "value": "Same."}]},
        {"conversations": [{"from": "human", "value": "Just text"}, {"from": "gpt", "value": "Fine."}]},
        "",
        "{not json",
    ])
    src = open_source(DatasetSpec(path=str(path)), PROMPTS)
    assert len(src) == 4  # blank lines are not records
    r0, r1, r2 = src.get(0), src.get(1), src.get(2)
    assert r0.images == [str(tmp_path / "imgs" / "a.jpg")]
    assert r0.conversation == [{"role": "user", "content": "<image>\nWhat?"},
                               {"role": "assistant", "content": "A picture."}]
    assert len(r1.images) == 2 and r1.conversation[0]["role"] == "system"
    assert r2.images == []
    with pytest.raises(SampleError) as e:
        src.get(3)
    assert e.value.reason == "malformed_record" and "d.jsonl:5" in str(e.value)


def test_caption_and_vqa_records_use_prompts(tmp_path):
    make_image(tmp_path / "a.jpg")
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([
        {"image": "a.jpg", "caption": "A red block."},
        {"image": "a.jpg", "question": "What colour?", "answers": ["red", "red", "crimson"]},
        {"image": "a.jpg", "captions": ["one", "two"]},
    ]))
    src = open_source(DatasetSpec(path=str(path)), PROMPTS)
    cap = src.get(0, key=3)
    assert cap.conversation[0]["content"].startswith("<image>\n")
    assert cap.conversation[0]["content"][len("<image>\n"):] in PROMPTS.choices("Captioning", "raw")
    assert cap.conversation[1] == {"role": "assistant", "content": "A red block."}
    vqa = src.get(1, key=3)
    assert "What colour?" in vqa.conversation[0]["content"] and vqa.conversation[1]["content"] == "red"
    assert src.get(1, key=3).conversation == vqa.conversation  # same key, same prompt
    assert {src.get(2, key=k).conversation[1]["content"] for k in range(4)} == {"one", "two"}
    # the task and variant come from the spec (or its subflavors)
    doc = open_source(DatasetSpec(path=str(path), subflavors={"prompt_task": "VQASFT", "prompt_variant": "docvqa"}),
                      PROMPTS)
    assert doc.get(1, key=0).conversation[0]["content"][len("<image>\n"):] in [
        t.replace("{}", "What colour?") for t in PROMPTS.choices("VQASFT", "docvqa")]
    with pytest.raises(DataError, match="no variant 'nope'"):
        open_source(DatasetSpec(path=str(path), kind="vqa", prompt_variant="nope"), PROMPTS)


def test_webdataset_shards(tmp_path):
    img = png_bytes(tmp_path)
    write_tar(tmp_path / "shards" / "data-000.tar", {
        "s0.png": img, "s0.txt": b"a caption",
        "s1.0.png": img, "s1.1.png": img,
        "s1.json": json.dumps({"conversations": [{"from": "human", "value": "<image><image>Diff?"},
                                                 {"from": "gpt", "value": "None."}]}).encode(),
    })
    write_tar(tmp_path / "shards" / "data-001.tar", {
        "dir/s2.jpg": img, "dir/s2.json": json.dumps({"question": "Shape?", "answer": "square"}).encode(),
        "s3.png": img,
    })
    for path in (str(tmp_path / "shards"), str(tmp_path / "shards" / "data-{000..001}.tar")):
        src = open_source(DatasetSpec(path=path), PROMPTS)
        assert len(src) == 4
        caption = src.get(0)
        assert caption.conversation[1]["content"] == "a caption" and caption.images == [img]
        assert len(src.get(1).images) == 2
        assert src.get(2).conversation[1]["content"] == "square"
        with pytest.raises(SampleError, match="no .json or .txt"):
            src.get(3)
    assert braceexpand("a-{08..10}-{x,y}.tar") == [
        "a-08-x.tar", "a-08-y.tar", "a-09-x.tar", "a-09-y.tar", "a-10-x.tar", "a-10-y.tar"]


def write_energon(root: Path, tmp_path: Path, sample_type: str, field_map: dict, members: dict) -> Path:
    write_tar(root / "parts" / "train-0.tar", members)
    write_tar(root / "parts" / "val-0.tar", dict(list(members.items())[:len(field_map)]))
    meta = root / ".nv-meta"
    meta.mkdir(parents=True)
    n = len(members) // len(field_map)
    (meta / ".info.yaml").write_text(f"shard_counts:\n  parts/train-0.tar: {n}\n  parts/val-0.tar: 1\n")
    (meta / "split.yaml").write_text("split_parts:\n  train:\n    - parts/train-{0..0}.tar\n  val:\n"
                                     "    - parts/val-0.tar\nexclude: []\n")
    fm = "".join(f"  {k}: {v}\n" for k, v in field_map.items())
    (meta / "dataset.yaml").write_text(
        f"sample_type:\n  __module__: megatron.energon\n  __class__: {sample_type}\nfield_map:\n{fm}")
    return root


def test_energon_prepared_dataset(tmp_path):
    img = png_bytes(tmp_path)
    cap = write_energon(tmp_path / "cap", tmp_path, "CaptioningSample", {"image": "jpg", "caption": "txt"},
                        {"0.jpg": img, "0.txt": b"first", "1.jpg": img, "1.txt": b"second"})
    src = open_source(DatasetSpec(path=str(cap)), PROMPTS)
    assert len(src) == 2
    assert [src.get(i).conversation[1]["content"] for i in range(2)] == ["first", "second"]
    assert src.get(0).images == [img]
    val = open_source(DatasetSpec(path=str(cap), split="val"), PROMPTS)
    assert len(val) == 1
    vqa = write_energon(tmp_path / "vqa", tmp_path, "VQASample",
                        {"image": "png", "context": "q.txt", "answers": "a.json"},
                        {"0.png": img, "0.q.txt": b"Colour?", "0.a.json": b'["blue", "blue", "navy"]'})
    rec = open_source(DatasetSpec(path=str(vqa)), PROMPTS).get(0)
    assert "Colour?" in rec.conversation[0]["content"] and rec.conversation[1]["content"] == "blue"
    with pytest.raises(DataError, match="no split part 'test'"):
        open_source(DatasetSpec(path=str(vqa), split="test"), PROMPTS)


def test_easy_vqa_records_and_source():
    train, test = easy_vqa_records("train"), easy_vqa_records("test")
    assert len(train) == 38575 and len(test) == 9673
    path, question, answer = train[0]
    assert Path(path).is_file() and question.endswith("?") and isinstance(answer, str)
    src = open_source(DatasetSpec(path="easy-vqa:test", limit=10), PROMPTS)
    assert len(src) == 10
    rec = src.get(0)
    assert rec.images == [test[0][0]] and rec.conversation[1]["content"] == test[0][2]


def test_open_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        open_source(DatasetSpec(path=str(tmp_path / "missing.jsonl")), PROMPTS)
    with pytest.raises(DataError, match="no such file or folder"):
        open_source(DatasetSpec(path=str(tmp_path / "missing.txt")), PROMPTS)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: holds no records"):
        open_source(DatasetSpec(path=str(tmp_path / "empty.jsonl")), PROMPTS)
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(DataError, match="bad.json: not valid JSON"):
        open_source(DatasetSpec(path=str(tmp_path / "bad.json")), PROMPTS)
    (tmp_path / "x.tar").write_bytes(b"garbage" * 100)
    with pytest.raises(DataError, match="x.tar: not a readable tar shard"):
        open_source(DatasetSpec(path=str(tmp_path / "x.tar")), PROMPTS)
    with pytest.raises(DataError, match="no datasets"):
        DataConfig().resolve_datasets()


def test_bad_data_is_skipped_counted_and_bounded(tmp_path, processor):
    """Every kind of bad sample is skipped with its reason; too many skips stop the run with a clear error."""
    from stitch.data.blend import build_train_stream

    good = make_image(tmp_path / "good.jpg", size=(200, 150))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "notimg.jpg").write_text("hello")
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(
        ">IIBBBBB", 90000, 90000, 8, 2, 0, 0, 0)) + chunk(b"IEND", b""))

    def conv(q="<image>\nQ?", a="A."):
        return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]

    rows = [
        {"image": "good.jpg", "conversations": conv()},
        {"image": "cut.jpg", "conversations": conv()},  # truncated_image
        {"image": "missing.jpg", "conversations": conv()},  # missing_file
        {"image": "notimg.jpg", "conversations": conv()},  # unreadable_image
        {"image": "bomb.png", "conversations": conv()},  # decompression_bomb
        "{broken",  # malformed_record
        {"conversations": []},  # empty_conversation
        {"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},  # bad_roles
        {"image": "good.jpg", "conversations": conv(q="<image><image>")},  # image_count_mismatch
        {"conversations": [{"from": "human", "value": "only a question"}]},  # no_assistant_turn
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    cfg = DataConfig(datasets=[{"path": str(path)}], num_workers=0, max_skip_fraction=1.0, skip_check_after=1)
    stream = build_train_stream(cfg, processor, seed=0)
    samples = stream.samples()
    keys = [next(samples).key for _ in range(3)]
    assert all(k.endswith("#0") for k in keys)  # only the good record survives, once per epoch
    stats = stream.stats
    assert stats.used[str(path)] == 3
    skipped = stats.skipped[str(path)]
    assert set(skipped) == {
        "truncated_image", "missing_file", "unreadable_image", "decompression_bomb", "malformed_record",
        "empty_conversation", "bad_roles", "image_count_mismatch", "no_assistant_turn",
    }
    assert all(n >= 2 for n in skipped.values())  # two full epochs at least
    assert stats.attempted[str(path)] == 3 + sum(skipped.values())
    # with a 50% ceiling the run stops, naming the dataset and the top reasons
    cfg = cfg.model_copy(update={"max_skip_fraction": 0.5, "skip_check_after": 10})
    stream = build_train_stream(cfg, processor, seed=0)
    with pytest.raises(DataError, match=r"bad.jsonl: \d+ of \d+ samples skipped .*max_skip_fraction 50.0%"):
        for _ in range(10):
            next(iter(stream))


def test_malformed_energon_metadata_is_named(tmp_path):
    """Hand-edited `.nv-meta` files and a misbehaving sample_loader give errors naming the file and key (they
    were AttributeErrors), and a loader returning nothing skips its sample instead of crashing mid-run."""
    import shutil

    img = png_bytes(tmp_path)
    base = write_energon(tmp_path / "base", tmp_path, "CaptioningSample", {"image": "jpg", "caption": "txt"},
                         {"0.jpg": img, "0.txt": b"first", "1.jpg": img, "1.txt": b"second"})

    def variant(name: str, file: str, text: str) -> Path:
        root = tmp_path / name
        shutil.copytree(base, root)
        (root / ".nv-meta" / file).write_text(text)
        return root

    cases = [
        (variant("a", "split.yaml", "- a\n"), "split.yaml: expected a mapping"),
        (variant("b", ".info.yaml", "[1]\n"), ".info.yaml: expected a mapping"),
        (variant("c", "dataset.yaml", "__class__: 5\n"), "__class__ must be a class name"),
        (variant("d", "split.yaml", "split_parts: {train: parts/train-0.tar}\n"), "must be a list of shard names"),
        (variant("e", "dataset.yaml", "sample_loader: ld.py:nofunc\n"), "has no function 'nofunc'"),
    ]
    (tmp_path / "e" / ".nv-meta" / "ld.py").write_text("def other(m):\n    return {}\n")
    for root, message in cases:
        with pytest.raises(DataError, match=message):
            open_source(DatasetSpec(path=str(root)), PROMPTS)
    none = variant("f", "dataset.yaml", "sample_loader: ld.py:load\n")
    (none / ".nv-meta" / "ld.py").write_text("def load(m):\n    return None\n")
    with pytest.raises(SampleError, match="returned NoneType"):
        open_source(DatasetSpec(path=str(none)), PROMPTS).get(0)
