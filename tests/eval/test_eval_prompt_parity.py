"""Prompts as lmms-eval 0.7.3 renders them: each task's YAML is read (its `include`, its `doc_to_text: !function
utils.f` and its `default` pre/post prompts), the reference `doc_to_text` is called on a parquet row, and Stitch's
reader must put the same text after the image placeholder. Rows carry the quirks the reference keeps (surrounding
spaces, capitals mid-question, empty hints, the replaced "Please answer ..." sentences)."""

from __future__ import annotations

import copy
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
    """Reads lmms-eval's YAML, keeping `!function module.name` as a `Function` string."""


class Function(str):
    """A `!function module.name` value (a plain string in `doc_to_text` is the prompt itself)."""


_Loader.add_constructor("!function", lambda loader, node: Function(loader.construct_scalar(node)))


def task_config(yaml_path: str) -> dict:
    """The task's YAML with its `include`s folded in (the including file's keys win)."""
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
    return config


def reference_prompt_fn(yaml_path: str):
    """The task's `doc_to_text` and its default `lmms_eval_specific_kwargs`, following `include`s."""
    config = task_config(yaml_path)
    kwargs = (config.get("lmms_eval_specific_kwargs") or {}).get("default")
    if not isinstance(config["doc_to_text"], Function):  # a literal prompt (no template braces in these)
        assert "{" not in config["doc_to_text"]
        return (lambda doc: config["doc_to_text"]), kwargs
    module, name = config["doc_to_text"].rsplit(".", 1)
    fn = getattr(importlib.import_module(f"lmms_eval.tasks.{Path(yaml_path).parent.name}.{module}"), name)
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


_MMMU = {"answer": "B", "image_1": None, "question_type": "multiple-choice"}
# (task, YAML, parquet path, row without its image, the image column, Stitch sample id)
IMAGE_COLUMN_CASES = [
    ("mmmu", "mmmu/mmmu_val.yaml", "Art/validation-00000-of-00001.parquet",
     {**_MMMU, "id": "validation_Art_1", "question": " Which painting? <image 1> ",
      "options": "['Mona  Lisa', ' The Scream', '3']"}, "image_1", None),
    ("mmmu", "mmmu/mmmu_val.yaml", "Art/validation-00000-of-00001.parquet",
     {**_MMMU, "id": "validation_Art_2", "question": " How many <image 1>? ", "options": "[]", "answer": "2",
      "question_type": "open"}, "image_1", None),
    ("mathvista", "mathvista/mathvista_testmini_format.yaml", "testmini-00000-of-00001.parquet",
     {"pid": "1", "question": " Which angle is larger? ", "query": "unused", "choices": ["145°", " 155° "],
      "unit": None, "answer": "145°", "question_type": "multi_choice", "answer_type": "text", "precision": None,
      "metadata": {"task": "geometry problem solving"}}, "decoded_image", None),
    ("mathvista", "mathvista/mathvista_testmini_format.yaml", "testmini-00000-of-00001.parquet",
     {"pid": "2", "question": "How long is it?\n", "query": "unused", "choices": None, "unit": "cm",
      "answer": "1.5", "question_type": "free_form", "answer_type": "float", "precision": 1.0,
      "metadata": {"task": "figure question answering"}}, "decoded_image", None),
    ("mathvista", "mathvista/mathvista_testmini_format.yaml", "testmini-00000-of-00001.parquet",
     {"pid": "3", "question": "How much?", "query": "unused", "choices": None, "unit": "", "answer": "3.25",
      "question_type": "free_form", "answer_type": "float", "precision": 2.0, "metadata": {"task": "x"}},
     "decoded_image",
     None),
    ("mathvista", "mathvista/mathvista_testmini_format.yaml", "testmini-00000-of-00001.parquet",
     {"pid": "4", "question": "How many?", "query": "unused", "choices": None, "unit": "", "answer": "3",
      "question_type": "free_form", "answer_type": "integer", "precision": None, "metadata": {"task": "x"}},
     "decoded_image", None),
    ("mathvista", "mathvista/mathvista_testmini_format.yaml", "testmini-00000-of-00001.parquet",
     {"pid": "5", "question": "Which values?", "query": "unused", "choices": None, "unit": "", "answer": "[1, 2]",
      "question_type": "free_form", "answer_type": "list", "precision": None, "metadata": {"task": "x"}},
     "decoded_image",
     None),
    ("coco", "coco_cap/coco2017_cap_val.yaml", "val-00000-of-00001.parquet",
     {"question_id": "000000000139.jpg", "question": "Please carefully observe the image ...",
      "answer": ["A room.", "A living room."], "id": 139}, "image", None),
    ("ocrbench_v2", "ocrbench_v2/ocrbench_v2.yaml", "test-00000-of-00001.parquet",
     {"id": 0, "dataset_name": "x", "question": " What is written here? ", "type": "text recognition en",
      "answers": ["hi"], "eval": "None", "bbox": None, "content": None}, "image", None),
]  # fmt: skip


@pytest.mark.parametrize(("task", "yaml_path", "file", "row", "column", "sid"), IMAGE_COLUMN_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(IMAGE_COLUMN_CASES)])  # fmt: skip
def test_prompt_is_lmms_evals_mmmu_mathvista_coco(tmp_path, monkeypatch, task, yaml_path, file, row, column, sid):
    """MMMU (interleaved_format off, as the YAML: the `<image 1>` references stay), MathVista as
    `mathvista_testmini_format`, COCO's parquet as `coco2017_cap_val`, OCRBench v2."""
    monkeypatch.setenv("OPENAI_API_KEY", "unused")  # mathvista_evals builds its (unused) judge client on import
    write_parquet(tmp_path / file, [{**row, column: image_cell()}])
    assert stitch_text(task, tmp_path, sid) == reference_text(yaml_path, dict(row))


def test_coco_karpathy_prompt_is_coco_karpathy_tests(coco_dir):
    """Karpathy's split is prompted as lmms-eval's coco_karpathy_test (a literal prompt in its YAML)."""
    assert stitch_text("coco", coco_dir) == reference_text("coco_cap/coco_karpathy_test.yaml", {})


# Stitch task -> the lmms-eval YAML whose prompt and decoding it mirrors.
MIRRORED = {
    "vqav2": "vqav2/vqav2_val.yaml", "textvqa": "textvqa/textvqa_val.yaml", "docvqa": "docvqa/docvqa_val.yaml",
    "infovqa": "infovqa/infovqa_val.yaml", "chartqa": "chartqa/chartqa.yaml", "ai2d": "ai2d/ai2d.yaml",
    "mmmu": "mmmu/mmmu_val.yaml", "mathvista": "mathvista/mathvista_testmini_format.yaml",
    "ocrbench": "ocrbench/ocrbench.yaml", "ocrbench_v2": "ocrbench_v2/ocrbench_v2.yaml",
    "coco": "coco_cap/coco_karpathy_test.yaml", "realworldqa": "realworldqa/realworldqa.yaml",
    "mmbench": "mmbench/mmbench_en_dev.yaml", "mmstar": "mmstar/mmstar.yaml", "pope": "pope/pope.yaml",
    "seedbench": "seedbench/seedbench.yaml", "scienceqa": "scienceqa/scienceqa_img.yaml",
    "hallusionbench": "hallusion_bench/hallusion_bench_image.yaml",
}  # fmt: skip


@pytest.mark.parametrize("task", sorted(MIRRORED))
def test_generation_settings_are_lmms_evals(task):
    """max_new_tokens and stop strings as lmms-eval's TaskConfig completes `generation_kwargs`: `until` is
    ["\\n\\n"] (its default few-shot delimiter) when the YAML names none; max_new_tokens, when it names none, the
    1024 its llava / llava_hf / internvl_hf model classes fall back to; greedy wherever it says (temperature 0,
    no sampling)."""
    from lmms_eval.api.task import TaskConfig

    from stitch.eval.tasks import get_task

    def completed(yaml_path: str) -> dict:
        config = task_config(yaml_path)
        return TaskConfig(task=config["task"], output_type=config["output_type"],
                          generation_kwargs=copy.deepcopy(config.get("generation_kwargs"))).generation_kwargs

    kwargs = completed(MIRRORED[task])
    t = get_task(task)
    assert t.stop == tuple(kwargs["until"]), task
    assert t.max_new_tokens == kwargs.get("max_new_tokens", 1024), task
    assert float(kwargs.get("temperature", 0)) == 0.0 and not kwargs.get("do_sample", False)
    if task == "coco":  # the parquet / official-captions layouts' task decodes alike
        assert completed("coco_cap/coco2017_cap_val.yaml") == kwargs
