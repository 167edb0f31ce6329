"""Blends: the seed metadataset loads as is; weights hold; streams are disjoint; save/restore is exact."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from stitch.data.blend import FeistelPermutation, WeightedSchedule, build_train_stream, load_blend
from stitch.data.config import DataConfig
from stitch.errors import DataError

from .conftest import make_image
from .test_sources import write_jsonl, write_tar

FIXTURE = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "pretrain_blend.yaml"


def text_rows(prefix: str, n: int):
    return [
        {"conversations": [{"from": "human", "value": f"{prefix} question {i}?"},
                           {"from": "gpt", "value": f"{prefix} answer {i} " + "word " * (i % 7)}]}
        for i in range(n)
    ]


@pytest.fixture
def three_sets(tmp_path):
    """Three JSONL datasets (one with images) and a blend file over them."""
    make_image(tmp_path / "img" / "a.png", size=(90, 60))
    make_image(tmp_path / "img" / "b.png", size=(40, 100))
    a = write_jsonl(tmp_path / "a.jsonl", text_rows("alpha", 400))
    b = write_jsonl(tmp_path / "b.jsonl", [
        {"image": f"img/{'ab'[i % 2]}.png", "caption": f"picture {i}"} for i in range(60)])
    c = write_jsonl(tmp_path / "c.jsonl", text_rows("gamma", 25))
    blend = tmp_path / "blend.yaml"
    blend.write_text(yaml.safe_dump({"splits": {"train": {"datasets": [
        {"weight": 3, "path": a.name}, {"weight": 1.5, "path": b.name}, {"weight": 0.5, "path": c.name}]}}}))
    return blend


def test_seed_metadataset_loads_as_is(tmp_path, processor):
    if not FIXTURE.is_file():
        pytest.skip("shared/fixtures/pretrain_blend.yaml not present")
    shutil.copy(FIXTURE, tmp_path / "blend.yaml")
    train = load_blend(tmp_path / "blend.yaml")
    assert [d.weight for d in train] == [0.6, 0.3, 0.1]
    assert [Path(d.path).name for d in train] == ["captions", "vqa", "docs"]
    assert all(Path(d.path).is_absolute() and d.subflavors == {"augmentation": False} for d in train)
    assert len(load_blend(tmp_path / "blend.yaml", split="val")) == 1
    # with its placeholder paths filled by WebDataset shards, it streams
    for name in ("captions", "vqa", "docs"):
        members = {}
        for i in range(4):
            members[f"{name}{i}.png"] = make_image(tmp_path / "p.png", size=(50 + i, 40)).read_bytes()
            members[f"{name}{i}.txt"] = f"{name} text {i}".encode()
        write_tar(tmp_path / name / "shard-0.tar", members)
    cfg = DataConfig(blend=str(tmp_path / "blend.yaml"), num_workers=0, seq_length=512)
    stream = build_train_stream(cfg, processor, seed=0)
    samples = stream.samples()
    names = [Path(next(samples).dataset).name for _ in range(20)]
    assert names.count("captions") == 12 and names.count("vqa") == 6 and names.count("docs") == 2


def test_blend_file_errors(tmp_path):
    p = tmp_path / "b.yaml"
    p.write_text("splits:\n  train:\n    datasets:\n      - weight: -1\n        path: x.jsonl\n")
    with pytest.raises(DataError, match=r"b.yaml: splits.train.datasets\[0\]: weight must be a finite number > 0"):
        load_blend(p)
    p.write_text("splits:\n  train:\n    datasets: []\n")
    with pytest.raises(DataError, match="non-empty list"):
        load_blend(p)
    with pytest.raises(DataError, match="no split 'val'"):
        p.write_text("splits:\n  train:\n    datasets:\n      - path: x.jsonl\n")
        load_blend(p, split="val")
    with pytest.raises(DataError, match="blend file not found"):
        load_blend(tmp_path / "nope.yaml")


def test_nested_metadataset_flattens_weights(tmp_path):
    (tmp_path / "inner.yaml").write_text(
        "splits:\n  train:\n    datasets:\n      - {weight: 1, path: x.jsonl}\n      - {weight: 3, path: y.jsonl}\n")
    (tmp_path / "outer.yaml").write_text(
        "splits:\n  train:\n    datasets:\n      - {weight: 2, path: inner.yaml}\n      - {weight: 2, path: z.jsonl}\n")
    specs = load_blend(tmp_path / "outer.yaml")
    assert [(Path(s.path).name, s.weight) for s in specs] == [("x.jsonl", 0.5), ("y.jsonl", 1.5), ("z.jsonl", 2)]


@pytest.mark.parametrize("weights", [[0.6, 0.3, 0.1], [3, 1.5, 0.5, 0.01], [1, 1]])
def test_100k_draws_match_weights_within_1_percent(weights):
    sched = WeightedSchedule(weights)
    n = 100_000
    counts = [0] * len(weights)
    for _ in range(n):
        counts[sched.next()] += 1
    total = sum(weights)
    for w, c in zip(weights, counts):
        assert abs(c / n - w / total) <= 0.01 * w / total
        assert abs(c - n * w / total) <= 1  # deterministic interleaving is exact to one sample


def test_feistel_is_a_permutation():
    for n in (1, 2, 3, 7, 64, 100, 1000):
        perm = FeistelPermutation(n, key=42)
        values = [perm[i] for i in range(n)]
        assert sorted(values) == list(range(n))
    a = [FeistelPermutation(1000, key=1)[i] for i in range(20)]
    b = [FeistelPermutation(1000, key=2)[i] for i in range(20)]
    assert a != b and a != list(range(20))


def test_ranks_and_workers_draw_disjoint_streams(three_sets, processor):
    """2 ranks x 2 worker slots: within one epoch of a dataset no sample is drawn twice."""
    cfg = DataConfig(blend=str(three_sets), num_workers=2, seq_length=512)
    seen: dict[str, list[str]] = {}
    for rank in range(2):
        stream = build_train_stream(cfg, processor, rank=rank, world_size=2, seed=7)
        for slot in range(2):
            consumer = stream.dataset.consumer(slot)
            for _ in range(60):
                s = consumer.next_sample()
                seen.setdefault(Path(s.dataset).name, []).append(s.key)
    a = seen["a.jsonl"]
    assert len(a) == len(set(a)) == 4 * 36  # 60 draws at weight 0.6 per consumer, 400 records: one epoch
    b = seen["b.jsonl"]
    assert len(b) == 4 * 18 and len(set(b)) == 60  # 72 draws over 60 records: exactly one full epoch + 12
    c = seen["c.jsonl"]
    assert len(c) == len(set(c)) == 24  # 6 draws each: 24 of the 25 records, none twice


def _take(stream, n):
    it = iter(stream)
    out = []
    for _ in range(n):
        b = next(it)
        # numpy digest: torch ops in the main process stall on intra-op threads while workers hold the cores
        pixels = b["pixel_values"]
        digest = None if pixels is None else hashlib.blake2b(pixels.numpy().tobytes(), digest_size=16).digest()
        out.append((tuple(b["sample_keys"]), b["input_ids"].numpy().copy(), digest))
    return out


@pytest.mark.parametrize("pack", [False, True])
def test_save_restore_mid_stream_is_exact(three_sets, processor, pack):
    """2 ranks x 2 DataLoader workers: state saved after M batches, restored into a fresh stream, gives the same
    next batches (same samples, same order, same tensors) as the uninterrupted stream."""
    # 1000 samples after the cut: 250 batches of 4, or 150 packed rows of ~7 samples
    n_next = 250 if not pack else 150
    cfg = DataConfig(blend=str(three_sets), num_workers=2, seq_length=256, pack=pack, max_tokens=512,
                     batch_size=4)
    for rank in range(2):
        middle = 17 + rank  # the next worker to be served differs between the ranks
        full = _take(build_train_stream(cfg, processor, rank=rank, world_size=2, seed=3), middle + n_next)
        first = build_train_stream(cfg, processor, rank=rank, world_size=2, seed=3)
        head = _take(first, middle)
        state = json.loads(json.dumps(first.state_dict()))  # plain data: survives JSON
        resumed = build_train_stream(cfg, processor, rank=rank, world_size=2, seed=3)
        resumed.load_state_dict(state)
        tail = _take(resumed, n_next)
        assert [h[0] for h in head] == [f[0] for f in full[:middle]]
        assert [t[0] for t in tail] == [f[0] for f in full[middle:]]
        assert sum(len(t[0]) for t in tail) >= 1000
        for t, f in zip(tail, full[middle:]):
            assert np.array_equal(t[1], f[1]) and t[2] == f[2]
        assert sum(resumed.stats.used.values()) == sum(len(k) for k, _, _ in full)


def test_state_from_another_layout_is_refused(three_sets, processor):
    cfg = DataConfig(blend=str(three_sets), num_workers=2)
    state = build_train_stream(cfg, processor, rank=0, world_size=2).state_dict()
    other = build_train_stream(cfg.model_copy(update={"num_workers": 3}), processor, rank=0, world_size=2)
    with pytest.raises(DataError, match="num_slots"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match="rank"):
        build_train_stream(cfg, processor, rank=1, world_size=2).load_state_dict(state)


def test_padded_batches_from_stream(three_sets, processor):
    cfg = DataConfig(blend=str(three_sets), num_workers=0, batch_size=4, seq_length=256)
    batch = next(iter(build_train_stream(cfg, processor, seed=0)))
    assert batch["input_ids"].shape[0] == 4 and len(batch["sample_keys"]) == 4
    assert batch["attention_mask"].sum().item() == sum(
        int(m.sum()) for m in batch["attention_mask"])
    assert "cu_seqlens" not in batch


def test_data_config_options_reach_the_processor(tmp_path, processor):
    make_image(tmp_path / "big.png", size=(300, 200))
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"image": "big.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                               {"from": "gpt", "value": "A gradient."}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
    ])
    cfg = DataConfig(datasets=[{"path": str(data)}], num_workers=0, system_prompt="You check data.",
                     max_image_pixels=10_000, max_skip_fraction=1.0)
    stream = build_train_stream(cfg, processor, seed=0)
    it = stream.samples()
    drawn = [next(it) for _ in range(3)]
    text = processor.decode(drawn[0].input_ids, skip_special_tokens=False)
    assert "You check data." in text and "SmolLM" not in text
    assert all(s.key.endswith("#1") for s in drawn)  # the 300x200 image is over max_image_pixels: skipped
    assert stream.stats.skipped[str(data)]["decompression_bomb"] >= 1
    assert processor.system_prompt is None  # the caller's processor is untouched


def _blend_file(path: Path, datasets: list) -> Path:
    path.write_text(yaml.safe_dump({"splits": {"train": {"datasets": datasets}}}))
    return path


@pytest.mark.parametrize(("entry", "message"), [
    ({"path": "a.jsonl", "weight": float("inf")}, "weight must be a finite number"),
    ({"path": "a.jsonl", "kind": "foo"}, "datasets[0].kind:"),
    ({"path": "a.jsonl", "limit": 0}, "datasets[0].limit:"),
    ({"path": "a.jsonl", "prompt_taks": "x"}, "datasets[0].prompt_taks:"),
    ({"path": "inner.yaml", "limit": 3}, "'limit' would be ignored"),
])
def test_bad_blend_entries_name_the_entry_and_field(tmp_path, entry, message):
    _blend_file(tmp_path / "inner.yaml", [{"path": "a.jsonl"}])
    from stitch.errors import DataError

    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_blend(_blend_file(tmp_path / "b.yaml", [entry]))


def test_blend_that_includes_itself_and_non_utf8_files_are_clear_errors(tmp_path):
    from stitch.errors import DataError

    _blend_file(tmp_path / "a.yaml", [{"path": "b.yaml"}])
    _blend_file(tmp_path / "b.yaml", [{"path": "a.yaml"}])
    with pytest.raises(DataError, match="includes itself"):
        load_blend(tmp_path / "a.yaml")
    (tmp_path / "latin1.yaml").write_bytes("splits: {train: {datasets: [{path: caf\xe9.jsonl}]}}".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_blend(tmp_path / "latin1.yaml")
    assert DataConfig(datasets=[{"path": "a.jsonl", "weight": 2}]).datasets[0].weight == 2
    with pytest.raises(Exception, match="finite"):
        DataConfig(datasets=[{"path": "a.jsonl", "weight": float("inf")}])
