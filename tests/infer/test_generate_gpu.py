"""The CUDA paths of the engine: captured CUDA graphs (and torch.compile) give the eager engine's tokens."""

from __future__ import annotations

import pytest
import torch

import stitch
from stitch.infer.engine import Engine
from stitch.infer.generate import build_conversation, generate
from stitch.infer.sampling import SamplingParams
from tests.infer.test_generate import CASES, full_recompute_greedy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def cuda_model(ckpt):
    return stitch.load(ckpt, device="cuda", dtype=torch.float32)


def make_requests(engine, params):
    return [engine.prepare(build_conversation(p, len(ims)), ims, params) for p, ims in CASES]


def test_cuda_graphs_equal_eager_and_full_recomputation(cuda_model):
    model, processor = cuda_model
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    eager = Engine(model, processor, cuda_graphs=False)
    graphs = Engine(model, processor, cuda_graphs=True)
    reqs = make_requests(eager, params)
    want = [c.token_ids for c in eager.generate(reqs)]
    assert [c.token_ids for c in graphs.generate(reqs)] == want  # batch 4, padded to the graph's shape
    assert [c.token_ids for c in graphs.generate(reqs[:3])] == want[:3]  # batch 3 -> bucket 4: graph reused
    assert len(graphs._states) == 1
    assert graphs.generate(reqs[:1])[0].token_ids == full_recompute_greedy(model, reqs[0], 12)
    sampled = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=30, repetition_penalty=1.2,
                             seed=5, ignore_eos=True)
    reqs = make_requests(eager, sampled)
    assert [c.token_ids for c in graphs.generate(reqs)] == [c.token_ids for c in eager.generate(reqs)]


def test_compiled_decode_step_equals_eager(cuda_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model, processor = cuda_model
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    eager = Engine(model, processor, cuda_graphs=False)
    compiled = Engine(model, processor, cuda_graphs=True, compile=True)
    reqs = make_requests(eager, params)
    assert [c.token_ids for c in compiled.generate(reqs)] == [c.token_ids for c in eager.generate(reqs)]


def test_bf16_generate_and_stream(ckpt):
    model, processor = stitch.load(ckpt, device="cuda", dtype=torch.bfloat16)
    prompt, images = CASES[0]
    text = generate(model, processor, images, prompt, max_new_tokens=16)
    assert text
    assert "".join(generate(model, processor, images, prompt, max_new_tokens=16, stream=True)) == text
