"""bench/train_throughput.py on tiny shapes on a CPU: both sides train, and they are measured by one FLOP count.

The script is the GPU benchmark's own code path (`main`), shrunk with `--tiny`; what must hold at any size is
that the two sides see the same model shapes (so the same FLOPs per step) and both produce a throughput.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import train_throughput as tt  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check_pairs(report: dict, configs: int) -> None:
    rows = report["results"]
    assert len(rows) == 2 * configs
    for label in {r["config"] for r in rows}:
        by = {r["side"]: r for r in rows if r["config"] == label}
        assert set(by) == {"stitch", "hf"}
        for r in by.values():
            assert r["status"] == "ok"
            assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
            assert math.isfinite(r["loss_last"]) and r["skipped_steps"] == 0
        # Same samples, same formula, same shapes: the same FLOPs and tokens per step.
        assert by["stitch"]["flops_per_step"] == by["hf"]["flops_per_step"] > 0
        assert by["stitch"]["tokens_per_step"] == by["hf"]["tokens_per_step"]
        assert by["stitch"]["flop_shapes"] == by["hf"]["flop_shapes"]
    assert report["flop_shapes_agree"]


def test_tiny_both_sides_both_checkpointing_modes(tmp_path):
    out = tmp_path / "tiny.json"
    report = tt.main(["--tiny", "--steps", "1", "--warmup", "1", "--checkpointing", "both", "--out", str(out)])
    _check_pairs(report, configs=2)
    assert {r["checkpointing"] for r in report["results"]} == {True, False}
    saved = json.loads(out.read_text())
    assert saved["machine"]["torch"] == torch.__version__ and "transformers" in saved["machine"]
    assert "6 * N * D" in saved["flop_convention"]
    # Equal-length samples: no padding on either side.
    assert all(r["padded_tokens_per_step"] == r["tokens_per_step"] for r in saved["results"])


def test_tiny_packed(tmp_path):
    report = tt.main(["--tiny", "--steps", "1", "--warmup", "1", "--checkpointing", "off", "--packed",
                      "--batch", "6", "--micro-batch", "3", "--out", str(tmp_path / "packed.json"),
                      "--profile", str(tmp_path / "profile")])
    _check_pairs(report, configs=1)
    for side in ("stitch", "hf"):  # one extra step per side under the profiler, outside the timed figures
        text = (tmp_path / "profile" / f"b6-mb3-packed_{side}.txt").read_text()
        assert text.startswith("wall ") and "aten::mm" in text
    by = {r["side"]: r for r in report["results"]}
    assert by["stitch"]["padded_tokens_per_step"] == by["stitch"]["tokens_per_step"]  # packed rows: no padding
    assert by["hf"]["padded_tokens_per_step"] > by["hf"]["tokens_per_step"]  # padded to the longest sample


def test_param_counts_match_hf():
    """Stitch's VLM and HF's InternVL built from the exported config hold the same parameters, part by part and
    in all (the FLOP count excludes the token-embedding table on both sides alike; there is no other difference:
    no vocabulary padding, and the tied Qwen2.5 head is one tensor on both sides)."""
    from stitch.checkpoint.store import build_model

    for preset in ("vlm-tiny", "internvl-2b"):
        cfg = tt.model_config(preset)
        ours = build_model(cfg, device="meta")
        hf = tt.build_hf(cfg, torch.device("meta"))
        assert tt.stitch_shapes(ours) == tt.hf_shapes(hf), preset
        assert tt.count_params([ours]) == tt.count_params([hf]), preset
        embedding = cfg.llm.vocab_size * cfg.llm.hidden_size
        untied_embedding = 0 if cfg.llm.tie_word_embeddings else embedding
        shapes = tt.stitch_shapes(ours)
        flop_params = shapes.vision_params + shapes.projector_params + shapes.llm_params
        assert flop_params == tt.count_params([ours]) - untied_embedding, preset


def test_merge_keeps_earlier_rows(tmp_path):
    """A sweep split over several commands ends in one file: the second run adds its rows to the first's."""
    out = tmp_path / "merged.json"
    base = ["--tiny", "--steps", "1", "--warmup", "0", "--sides", "stitch", "--out", str(out)]
    tt.main([*base, "--checkpointing", "off"])
    report = tt.main([*base, "--checkpointing", "on"])
    assert [(r["config"], r["side"]) for r in report["results"]] == [("b2", "stitch"), ("b2 ckpt", "stitch")]
    assert json.loads(out.read_text())["results"] == report["results"]


def test_tiny_one_part_checkpointed_on_both_sides(tmp_path):
    """`--checkpointing vision`: each side recomputes its ViT layers only; the step's parts are timed."""
    report = tt.main(["--tiny", "--steps", "2", "--warmup", "1", "--checkpointing", "vision",
                      "--out", str(tmp_path / "vision.json")])
    _check_pairs(report, configs=1)
    for r in report["results"]:
        assert r["checkpointing"] == "vision" and r["config"].endswith("ckpt-vision")
        assert len(r["step_times_s"]) == 3 and 0 < r["optimizer_s"] < r["step_s"]


def test_decode_step_tiny(tmp_path):
    import decode_step

    report = decode_step.main(["--tiny", "--modes", "eager", "--new-tokens", "6", "--out", str(tmp_path / "d.json")])
    assert [(r["mode"], r["batch"]) for r in report["results"]] == [("eager", 1), ("eager", 4)]
    assert all(r["step_ms"] > 0 and r["ttft_s"] > 0 for r in report["results"])


def test_serve_latency_tiny(tmp_path):
    """bench/serve_latency.py: every request a new shape, each system timed over both passes."""
    import serve_latency

    report = serve_latency.main(["--tiny", "--requests", "3", "--new-tokens", "2", "--out", str(tmp_path / "s.json")])
    assert len({(r["tiles"], r["text_tokens"]) for r in report["requests"]}) == 3  # three different shapes
    assert [r["system"] for r in report["results"]] == ["stitch", "stitch-sdpa-choice", "hf"]
    for row in report["results"]:
        for name in ("first", "again"):
            assert len(row[name]["each_s"]) == 3 and 0 < row[name]["median_s"] <= row[name]["max_s"]


@pytest.mark.dist
def test_dp_scaling_tiny(tmp_path):
    """bench/dp_scaling.py: `stitch train` alone and under torchrun (gloo, 2 processes, dp 2, twice the global
    batch) both finish, and the efficiency is their tokens/s ratio per process."""
    import dp_scaling

    out = tmp_path / "dp.json"
    report = dp_scaling.main(["--tiny", "--steps", "4", "--out", str(out)])
    single, multi = report["single"], report["multi"]
    assert single["status"] == multi["status"] == "ok", (single.get("log_tail"), multi.get("log_tail"))
    assert multi["global_batch_size"] == 2 * single["global_batch_size"]
    assert report["efficiency"] == pytest.approx(multi["tokens_per_s"] / (2 * single["tokens_per_s"]), abs=1e-4)
    assert json.loads(out.read_text())["nproc"] == 2


def test_idle_gaps_name_the_kernels_around_the_longest_gap():
    """The profile's idle-gap summary, on CPU ops standing in for kernels (same `time_range` fields)."""
    import time

    from _common import idle_gaps, kernel_family
    from torch.profiler import ProfilerActivity, profile

    a = torch.randn(64, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        a @ a
        time.sleep(0.02)
        a + a
    ops = [e for e in prof.events() if e.name in ("aten::mm", "aten::add")]
    lines = idle_gaps(ops, min_us=1000)
    assert lines[0].startswith("idle gaps over 1000 us: 1,")
    assert "after aten::mm" in lines[1] and "before aten::add" in lines[1] and float(lines[1].split()[0]) >= 19
    assert kernel_family("sm90_xmma_gemm_bf16") == "matmul" and kernel_family("flash_fwd_kernel") == "attention"
    assert kernel_family("some_new_kernel") == "other"
