"""A tiny random VLM checkpoint (InternViT-tiny + Llama-tiny, SmolLM2's tokenizer) shared by the infer tests."""

from __future__ import annotations

import pytest
import torch

import stitch
from stitch.checkpoint.commands import stitch_build


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    return stitch_build(vision="internvit-tiny", llm="llama-tiny", out=tmp_path_factory.mktemp("gen") / "ckpt")


@pytest.fixture(scope="session")
def loaded(ckpt):
    torch.manual_seed(0)
    return stitch.load(ckpt)
