"""Evaluation at scale on a tiny random model: the image-embedding cache (vision encoder runs once per image,
same predictions) and `torchrun` sharding over 2 gloo processes (same predictions file and summary as one)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import stitch
from stitch.checkpoint.build import stitch_build
from stitch.eval.tasks import load_task, open_image
from stitch.infer.image_cache import ImageEmbeddingCache

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return stitch_build(vision="internvit-tiny", llm="llama-tiny", out=tmp_path_factory.mktemp("scale") / "ckpt")


def test_image_cache_runs_the_vision_encoder_once_per_image(tiny_ckpt):
    from stitch.infer.generate import generate_batch

    model, processor = stitch.load(tiny_ckpt, device="cpu")
    data = load_task("easy-vqa", None, limit=12)  # questions come grouped by image
    convs = [s.conversation for s in data.samples]
    images = [[open_image(r) for r in s.images] for s in data.samples]
    distinct = len({str(s.images[0]) for s in data.samples})
    assert 1 < distinct < len(data.samples)
    tiles: list[int] = []
    hook = model.vision.register_forward_hook(lambda m, args, out: tiles.append(args[0].shape[0]))

    def answer() -> list[str]:
        out = []
        for i in range(0, len(convs), 4):  # several batches, so repeats also come from earlier batches
            out += generate_batch(model, processor, convs[i : i + 4], images[i : i + 4], max_new_tokens=3,
                                  temperature=0.0)  # fmt: skip
        return out

    plain = answer()
    plain_tiles = sum(tiles)
    tiles.clear()
    cache = ImageEmbeddingCache(model).install()
    cached = answer()
    cache.remove()
    hook.remove()
    assert cached == plain
    per_image = plain_tiles // len(data.samples)  # tiles of one image (thumbnail included)
    assert sum(tiles) == distinct * per_image  # once per distinct image
    assert cache.stats()["tile_hits"] == (len(data.samples) - distinct) * per_image


def _eval(tiny_ckpt: Path, out: Path, nproc: int) -> None:
    argv = ["eval", str(tiny_ckpt), "--task", "easy-vqa", "--limit", "7", "--batch-size", "2", "--max-new-tokens",
            "3", "--device", "cpu", "--dtype", "float32", "--out", str(out)]  # fmt: skip
    if nproc == 1:  # in this process: the plain single-process path
        from stitch.cli import main

        assert main(argv) == 0
        return
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(port), "-m", "stitch", *argv]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def _sorted_lines(path: Path) -> list[str]:
    return sorted(path.read_text(encoding="utf-8").splitlines(keepends=True), key=lambda l: json.loads(l)["id"])


def test_torchrun_two_gloo_processes_match_one(tiny_ckpt, tmp_path):
    _eval(tiny_ckpt, tmp_path / "one.json", 1)
    # Resume across layouts: 2 rows already there, 5 left to share between 2 ranks.
    two_preds = tmp_path / "two.predictions.jsonl"
    two_preds.write_text("".join((tmp_path / "one.predictions.jsonl").read_text().splitlines(keepends=True)[:2]))
    _eval(tiny_ckpt, tmp_path / "two.json", 2)
    assert _sorted_lines(two_preds) == _sorted_lines(tmp_path / "one.predictions.jsonl")
    assert not list(tmp_path.glob("*.rank-*"))  # shards folded in and removed
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["processes"] == 2 and two["generated"] == 5 and one["generated"] == 7
    volatile = {"predictions", "processes", "generated", "generation_seconds", "image_cache"}
    assert {k: v for k, v in one.items() if k not in volatile} == {k: v for k, v in two.items() if k not in volatile}
    assert one["checkpoint_sha256"] and one["decoding"]["strategy"] == "greedy" and one["task_version"]
