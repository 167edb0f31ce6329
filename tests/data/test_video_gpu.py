"""For the same decoded frames, our processor's `input_ids` and `pixel_values` equal transformers' full
`InternVLProcessor` video output (its `InternVLVideoProcessor` needs torchvision, which has CUDA-only wheels
on the package registry: run on the GPU machine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stitch.data.processor import Processor

from .conftest import tiny_config
from .video_clips import moving_square

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.mark.parametrize("num_frames", [1, 4, 7])
def test_video_input_ids_and_pixels_equal_transformers_internvl_processor(smol_dir, num_frames):
    pytest.importorskip("torchvision")
    from transformers import AutoTokenizer, InternVLProcessor, InternVLVideoProcessor
    from transformers.models.got_ocr2.image_processing_got_ocr2_fast import GotOcr2ImageProcessorFast

    specials = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>"}
    # One tokenizer for both, with InternVL's image tokens as special tokens, as an InternVL checkpoint ships it
    # (without them `<img>` splits into pieces and the ids differ while the text is the same).
    hf_tok = AutoTokenizer.from_pretrained(str(smol_dir), extra_special_tokens=specials)
    ours_tok = hf_tok
    config = tiny_config(image_wrapper="internvl", tile_tags="none", use_thumbnail=False)
    proc = Processor(ours_tok, config).with_options(num_frames=num_frames)
    frames = moving_square(num_frames, size=56)  # already at the tile size: no resampler difference
    conv = [{"role": "user", "content": "<video>\nWhere does the square go?"}]
    ours = proc(conv, videos=[frames], add_generation_prompt=True)

    hf = InternVLProcessor(
        image_processor=GotOcr2ImageProcessorFast(crop_to_patches=False, size={"height": 56, "width": 56},
                                                  image_mean=MEAN, image_std=STD),
        tokenizer=hf_tok,
        video_processor=InternVLVideoProcessor(size={"height": 56, "width": 56}, image_mean=MEAN, image_std=STD,
                                               do_sample_frames=False),
        image_seq_length=config.tokens_per_tile,
    )
    text = proc.render_text(conv, add_generation_prompt=True)
    out = hf(text=[text], videos=[frames], return_tensors="pt", add_special_tokens=False)
    assert ours["input_ids"][0].tolist() == out["input_ids"][0].tolist()
    torch.testing.assert_close(ours["pixel_values"], out["pixel_values"].float(), atol=1e-5, rtol=1e-5)
    assert np.isfinite(ours["pixel_values"].numpy()).all()
