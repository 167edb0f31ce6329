"""bench/second_turn.py and bench/serve_load.py at their CPU sizes: the GPU benchmarks' own code paths, shrunk.

second_turn: the cached second turn answers as the uncached one and reuses the first turn's KV. serve_load
`--smoke`: real `stitch serve` processes (static and continuous batching) and the bench's HF-generate server
answer every request of a Poisson workload over streaming HTTP, and each gets throughput and latency figures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))


def test_second_turn_tiny(tmp_path):
    import second_turn

    out = tmp_path / "st.json"
    report = second_turn.main(["--device", "cpu", "--repeats", "1", "--systems", "stitch,stitch-no-cache",
                               "--out", str(out)])
    cached, plain = report["results"]["stitch"], report["results"]["stitch-no-cache"]
    assert cached["match"] and plain["match"] and plain["prefix_cache"] is None
    # warm-up + one timed repeat: each second turn reused at least its whole first-turn prompt
    assert cached["prefix_cache"]["prefix_hits"] == 2
    assert cached["prefix_cache"]["prefix_reused_tokens"] >= 2 * (report["turn1_prompt_tokens"] - 1)
    assert all(t > 0 for t in (cached["first_turn_ttft_s"], cached["second_turn_ttft_s"]))
    assert json.loads(out.read_text())["benchmark"] == "second_turn"


def test_serve_load_smoke(tmp_path):
    import serve_load

    out = tmp_path / "sl.json"
    report = serve_load.main(["--smoke", "--requests", "4", "--systems", "stitch-cb,hf",
                              "--workdir", str(tmp_path / "work"), "--out", str(out)])
    assert list(report["results"]) == ["stitch-cb", "hf"]  # static-batching stitch is the same server
    for row in report["results"].values():
        assert row["requests"] == 4 and 0 < row["completion_tokens"] <= 4 * 8
        assert row["output_tok_s"] > 0 and 0 < row["ttft_p50_s"] <= row["ttft_p99_s"] <= row["latency_p99_s"]
    assert json.loads(out.read_text())["benchmark"] == "serve_load"
