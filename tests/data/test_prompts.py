"""The prompt file: our own sentences in the seed layout, covering the seed's tasks; seeded choice per sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stitch.data.prompts import PromptLibrary, default_prompts_path, sample_seed
from stitch.errors import DataError

FIXTURE = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "nvlm_prompts.json"


def fixture_path() -> Path:
    if not FIXTURE.is_file():
        pytest.skip("shared/fixtures/nvlm_prompts.json not present")
    return FIXTURE


def test_loads_seed_system_file():
    lib = PromptLibrary.load(fixture_path())
    assert "COMMENT" not in lib.tasks
    assert len(lib) == 104  # the reference counts 104 templates
    assert lib.choices("VQASFT", "docvqa")
    assert "{}" in lib.pick("VQAPretraining", "raw", key=0)


def test_ours_covers_the_seed_tasks_in_our_own_words():
    ours = PromptLibrary.load()
    seed = PromptLibrary.load(fixture_path())
    for task, variants in seed.templates.items():
        assert task in ours.templates, task
        for variant in variants:
            assert ours.choices(task, variant), (task, variant)
    seed_sentences = {t.strip().lower() for v in seed.templates.values() for ts in v.values() for t in ts}
    ours_sentences = {t.strip().lower() for v in ours.templates.values() for ts in v.values() for t in ts}
    assert not (ours_sentences & seed_sentences) - {"{}"}, "prompt sentences copied from the seed file"
    # templates meant to take a question or region have the slot
    for task, variant in [("VQAPretraining", "raw"), ("DocPretraining", "grounded_ocr"),
                          ("DocPretraining", "referring_grounding")]:
        assert all("{}" in t for t in ours.choices(task, variant))
    assert json.loads(default_prompts_path().read_text())["COMMENT"]


def test_seeded_choice_is_deterministic_and_varied():
    lib = PromptLibrary.load()
    picks = [lib.pick("Captioning", "raw", key=sample_seed(0, "ds", 0, i)) for i in range(200)]
    assert picks == [lib.pick("Captioning", "raw", key=sample_seed(0, "ds", 0, i)) for i in range(200)]
    assert len(set(picks)) == len(lib.choices("Captioning", "raw"))
    assert sample_seed(1, "a") != sample_seed(1, "b")


def test_render_fills_or_appends_the_question():
    lib = PromptLibrary({"T": {"slot": ["Q: {} A:"], "prefix": ["Answer this: "], "bare": ["Describe."]}})
    assert lib.render("T", "slot", "why?") == "Q: why? A:"
    assert lib.render("T", "prefix", "why?") == "Answer this: why?"
    assert lib.render("T", "bare") == "Describe."
    assert lib.render("T", "bare", "why?") == "Describe.\nwhy?"


def test_errors_name_the_file_and_task(tmp_path):
    with pytest.raises(DataError, match="no prompt task 'Nope'"):
        PromptLibrary.load().choices("Nope")
    with pytest.raises(DataError, match="no variant 'x'"):
        PromptLibrary.load().choices("Captioning", "x")
    bad = tmp_path / "p.json"
    bad.write_text('{"A": {"raw": []}}')
    with pytest.raises(DataError, match=r"p.json: A.raw must be a non-empty list"):
        PromptLibrary.load(bad)
    bad.write_text("{nope")
    with pytest.raises(DataError, match="not valid JSON"):
        PromptLibrary.load(bad)
