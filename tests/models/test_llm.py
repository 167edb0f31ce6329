"""The Llama-family LLM against transformers' own implementations (tiny random models, fp32)."""

import pytest
import torch
import transformers

from stitch.checkpoint.hf import llm_config_to_hf, load_hf_llm
from stitch.models.llm import LLM, token_loss

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

CASES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(rms_norm_eps=1e-5)),
    "llama3-rope-scaling": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                            dict(rope_parameters=LLAMA3_ROPE)),
    "llama-tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=True)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=None)),
}


def stitch_logits(model: LLM, ids: torch.Tensor, **kw) -> torch.Tensor:
    return model.lm_head(model(model.embed_tokens(ids), **kw))


def import_llm(tmp_path, name):
    cfg_cls, model_cls, extra = CASES[name]
    torch.manual_seed(0)
    hf = model_cls(cfg_cls(**COMMON, **extra)).eval()
    if "qwen2" in name:  # random biases so the QKV-bias path is really tested
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    hf.save_pretrained(tmp_path)
    cfg, state = load_hf_llm(tmp_path)
    ours = LLM(cfg)
    ours.load_state_dict(state, strict=not cfg.tie_word_embeddings)
    return hf, ours.eval(), cfg, state


@pytest.mark.parametrize("name", list(CASES))
def test_llm_logits_match_transformers(tmp_path, name):
    hf, ours, cfg, _ = import_llm(tmp_path, name)
    ids = torch.randint(0, 97, (2, 80))  # past original_max_position_embeddings=32: scaling matters
    with torch.no_grad():
        torch.testing.assert_close(stitch_logits(ours, ids), hf(ids).logits, atol=1e-5, rtol=1e-5)
    # export back: the HF config reproduces the same model
    hf_cfg = llm_config_to_hf(cfg)
    assert hf_cfg["model_type"] == hf.config.model_type
    assert hf_cfg["tie_word_embeddings"] == hf.config.tie_word_embeddings


def test_padding_and_packing_match_separate_sequences(tmp_path):
    _, ours, _, _ = import_llm(tmp_path, "qwen2")
    a, b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 4))
    with torch.no_grad():
        la, lb = stitch_logits(ours, a), stitch_logits(ours, b)
        packed = torch.cat([a, b], 1)
        pos = torch.cat([torch.arange(7), torch.arange(4)])[None]
        cu = torch.tensor([0, 7, 11], dtype=torch.int32)
        lp = stitch_logits(ours, packed, position_ids=pos, cu_seqlens=cu)
        torch.testing.assert_close(lp[:, :7], la, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lp[:, 7:], lb, atol=1e-5, rtol=1e-5)
        padded = torch.cat([b, torch.zeros(1, 3, dtype=torch.long)], 1)
        mask = torch.tensor([[1] * 4 + [0] * 3])
        lpad = stitch_logits(ours, padded, attention_mask=mask)
        torch.testing.assert_close(lpad[:, :4], lb, atol=1e-5, rtol=1e-5)


def test_chunked_loss_equals_full_cross_entropy(tmp_path):
    _, ours, _, _ = import_llm(tmp_path, "llama")
    ids = torch.randint(0, 97, (2, 30))
    labels = ids.clone()
    labels[:, :10] = -100
    hidden = ours(ours.embed_tokens(ids))
    loss, n = token_loss(hidden, ours.lm_head, labels, chunk_size=7)
    logits = ours.lm_head(hidden)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1))
    assert int(n) == 2 * 20
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    loss.backward()
    grad_chunked = ours.lm_head.weight.grad.clone()
    ours.zero_grad()
    hidden = ours(ours.embed_tokens(ids))
    full = ours.lm_head(hidden)[:, :-1].reshape(-1, 97)
    torch.nn.functional.cross_entropy(full, labels[:, 1:].reshape(-1)).backward()
    torch.testing.assert_close(grad_chunked, ours.lm_head.weight.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_prefill_into_a_fresh_cache_matches_attending_over_the_whole_cache(tmp_path, padded):
    """`fresh_cache` (attention over the prompt's own keys) gives the logits and cache contents of attending over
    the whole cache buffer, left-padded or not, and the first decode step after it agrees too."""
    from stitch.models.llm import KVCache

    _, ours, cfg, _ = import_llm(tmp_path, "qwen2")
    torch.manual_seed(1)
    batch, prompt, length = 4, 9, 16
    ids = torch.randint(0, 97, (batch, prompt))
    mask = torch.ones(batch, length, dtype=torch.long)  # slots past the prompt are open for decoding
    if padded:
        mask[1, :3] = 0
        mask[2, :5] = 0
        mask[3, :prompt] = 0  # a row of bucket padding: no prompt at all
    positions = (mask[:, :prompt].cumsum(-1) - 1).clamp(min=0)
    slots = torch.arange(prompt)
    results = []
    for fresh in (False, True):
        cache = KVCache(cfg, batch, length)
        with torch.no_grad():
            prefill = stitch_logits(ours, ids, position_ids=positions, kv_cache=cache, cache_position=slots,
                                    attention_mask=mask if padded or not fresh else None, fresh_cache=fresh)
            step = stitch_logits(ours, ids[:, -1:], position_ids=positions[:, -1:] + 1, kv_cache=cache,
                                 cache_position=torch.tensor([prompt]), attention_mask=mask)
        results.append((prefill, step, torch.stack(cache.k), torch.stack(cache.v)))
    real = mask[:, :prompt].bool()  # padded query rows are don't-care in both paths
    for want, got in zip(results[0][1:], results[1][1:]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[1][0][real], results[0][0][real], atol=1e-5, rtol=1e-5)
