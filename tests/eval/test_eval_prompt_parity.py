"""Prompts as lmms-eval 0.7.3 renders them: each task's YAML is read (its `include`, its `doc_to_text: !function
utils.f` and its `default` pre/post prompts), the reference `doc_to_text` is called on a parquet row, and Stitch's
reader must put the same text after the image placeholder. Rows carry the quirks the reference keeps (surrounding
spaces, capitals mid-question, empty hints, the replaced "Please answer ..." sentences)."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
from eval_fixtures import image_cell, write_parquet

from stitch.eval.tasks import load_task

lmms_tasks = pytest.importorskip("lmms_eval.tasks")
yaml = pytest.importorskip("yaml")
TASKS_DIR = Path(lmms_tasks.__file__).parent


class _Loader(yaml.SafeLoader):
    """Reads lmms-eval's YAML, keeping `!function module.name` as the string."""


_Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def reference_prompt_fn(yaml_path: str):
    """The task's `doc_to_text` and its default `lmms_eval_specific_kwargs`, following `include`s."""
    path = TASKS_DIR / yaml_path
    config: dict = {}
    while True:
        with open(path) as f:
            cfg = yaml.load(f, Loader=_Loader)
        config = {**cfg, **config}
        if "include" not in cfg:
            break
        path = path.parent / cfg["include"]
        config.pop("include")
    module, name = config["doc_to_text"].rsplit(".", 1)
    fn = getattr(importlib.import_module(f"lmms_eval.tasks.{Path(yaml_path).parent.name}.{module}"), name)
    kwargs = (config.get("lmms_eval_specific_kwargs") or {}).get("default")
    return fn, kwargs


def reference_text(yaml_path: str, doc: dict) -> str:
    fn, kwargs = reference_prompt_fn(yaml_path)
    return fn(doc) if len(inspect.signature(fn).parameters) == 1 else fn(doc, kwargs)


def stitch_text(task: str, root: Path, sample_id: str | None = None) -> str:
    data = load_task(task, root)
    sample = data.by_id()[sample_id] if sample_id is not None else data.samples[0]
    content = sample.conversation[-1]["content"]
    assert content.startswith("<image>\n")
    return content[len("<image>\n"):]


_MMB = {"question": "  Which animal is shown? ", "A": "cat", "B": "dog", "C": "bird", "D": None, "E": None,
        "answer": "B", "category": "recognition", "L2-category": "perception", "source": "s", "split": "dev"}
# (task, the lmms-eval YAML, parquet path, row, Stitch sample id)
CASES = [
    ("vqav2", "vqav2/vqav2_val.yaml", "validation-00000-of-00001.parquet",
     {"question_id": 1, "question": "what is the Color of the Car? ", "answers": ["red"] * 10,
      "answer_type": "other"}, None),
    ("textvqa", "textvqa/textvqa_val.yaml", "validation-00000-of-00001.parquet",
     {"question_id": 1, "question": "what brand is the Nokia phone?", "answers": ["nokia"] * 10}, None),
    ("docvqa", "docvqa/docvqa_val.yaml", "DocVQA/validation-00000-of-00001.parquet",
     {"questionId": "7", "question": "What is the DATE? ", "answers": ["1 May"]}, None),
    ("infovqa", "infovqa/infovqa_val.yaml", "validation-00000-of-00001.parquet",
     {"questionId": "8", "question": "How many? ", "answers": ["3"]}, None),
    ("chartqa", "chartqa/chartqa.yaml", "test-00000-of-00001.parquet",
     {"type": "human_test", "question": "What is the max value? ", "answer": "12"}, None),
    ("realworldqa", "realworldqa/realworldqa.yaml", "test-00000-of-00001.parquet",
     {"question": " Which is closer?\nA. car\nB. tree\nPlease answer directly with only the letter of the correct "
                  "option and nothing else. ", "answer": "A"}, None),
    ("ocrbench", "ocrbench/ocrbench.yaml", "test-00000-of-00001.parquet",
     {"dataset": "IIIT5K", "question": " what is written in the image? ", "question_type": "Regular Text "
      "Recognition", "answer": ["hello"]}, None),
    ("pope", "pope/pope.yaml", "test-00000-of-00001.parquet",
     {"question_id": "3", "question": " Is there a dog in the image? ", "answer": "yes", "category": "random"},
     None),
    ("ai2d", "ai2d/ai2d.yaml", "test-00000-of-00001.parquet",
     {"question": "Which stage? ", "options": ["egg", " larva", "adult"], "answer": "1"}, None),
    ("seedbench", "seedbench/seedbench.yaml", "test-00000-of-00001.parquet",
     {"question_id": "q1", "question": "What is it? ", "choice_a": "a cat ", "choice_b": "dog", "choice_c": "c",
      "choice_d": "d", "answer": "B", "data_type": "image", "question_type_id": 1}, None),
    ("scienceqa", "scienceqa/scienceqa_img.yaml", "ScienceQA-IMG/test-00000-of-00001.parquet",
     {"question": "Which is a mammal? ", "choices": ["frog", "whale"], "answer": 1, "hint": "Think. ",
      "subject": "natural science"}, None),
    ("scienceqa", "scienceqa/scienceqa_img.yaml", "ScienceQA-IMG/test-00000-of-00001.parquet",
     {"question": "Which is a mammal?", "choices": ["frog", "whale"], "answer": 1, "hint": "",
      "subject": "natural science"}, None),
    ("mmstar", "mmstar/mmstar.yaml", "val-00000-of-00001.parquet",
     {"index": 0, "question": " Is the cat black? Please answer yes or no. Options: A: yes, B: no ", "answer": "A",
      "category": "c", "l2_category": "l2"}, None),
    ("mmbench", "mmbench/mmbench_en_dev.yaml", "en/dev-00000-of-00001.parquet", {"index": 0, "hint": None, **_MMB},
     "0"),
    ("mmbench", "mmbench/mmbench_en_dev.yaml", "en/dev-00000-of-00001.parquet",
     {"index": 0, "hint": " Look closely.", **_MMB}, "0"),
    ("mmbench", "mmbench/mmbench_en_dev.yaml", "en/dev-00000-of-00001.parquet", {"index": 0, "hint": "", **_MMB},
     "0"),
    ("mmbench", "mmbench/mmbench_en_dev.yaml", "en/dev-00000-of-00001.parquet",
     {"index": 0, "hint": "nan", **_MMB}, "0"),
]  # fmt: skip


@pytest.mark.parametrize(("task", "yaml_path", "file", "row", "sid"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])  # fmt: skip
def test_prompt_is_lmms_evals(tmp_path, task, yaml_path, file, row, sid):
    write_parquet(tmp_path / file, [{**row, "image": image_cell()}])
    assert stitch_text(task, tmp_path, sid) == reference_text(yaml_path, dict(row))


def test_default_post_prompts_are_the_ones_stitch_records():
    """The summary's prompt template names the post prompt each YAML gives by default."""
    from stitch.eval.tasks import get_task

    for task, yaml_path in [("textvqa", "textvqa/textvqa_val.yaml"), ("chartqa", "chartqa/chartqa.yaml"),
                            ("vqav2", "vqav2/vqav2_val.yaml"), ("pope", "pope/pope.yaml")]:  # fmt: skip
        post = reference_prompt_fn(yaml_path)[1]["post_prompt"]
        assert get_task(task).prompt.endswith(post), task
    assert reference_prompt_fn("realworldqa/realworldqa.yaml")[1] == {"pre_prompt": "", "post_prompt": ""}
