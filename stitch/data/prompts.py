"""Prompt variety: task -> variant -> templates, one template drawn per sample with a seeded generator.

Captioning and VQA records carry no instruction of their own, so the seed system draws one from a JSON file
of templates (`{"Captioning": {"raw": ["...", ...]}, "VQASFT": {"raw": [...], "docvqa": [...]}, ...}`),
where `{}` marks where the question (or region) goes. We read that layout as is (so the seed system's own
`nvlm_prompts.json` loads too) and ship our own sentences in `stitch/resources/prompts.json`.

The draw is a pure function of (seed, sample key): a resumed or re-sharded run renders every sample with the
same prompt, and two workers never need to share generator state.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

from stitch.errors import DataError

__all__ = ["PromptLibrary", "default_prompts_path", "sample_seed"]


def default_prompts_path() -> Path:
    return Path(str(resources.files("stitch") / "resources" / "prompts.json"))


def sample_seed(*parts: object) -> int:
    """A stable 64-bit seed from any printable parts (seed, dataset, index, epoch...), same on every machine."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class PromptLibrary:
    """Templates by task and variant; `render(task, variant, text, key)` picks one and fills it."""

    def __init__(self, templates: dict[str, dict[str, list[str]]], source: str = "<prompts>"):
        self.templates = templates
        self.source = source

    @classmethod
    def load(cls, path: str | Path | None = None) -> PromptLibrary:
        """Read a prompt file in the seed layout; non-object top-level entries (e.g. "COMMENT") are ignored."""
        path = Path(path) if path is not None else default_prompts_path()
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise DataError(f"{path}: prompt file not found") from e
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(raw, dict):
            raise DataError(f"{path}: expected an object of task -> variant -> templates")
        templates: dict[str, dict[str, list[str]]] = {}
        for task, variants in raw.items():
            if not isinstance(variants, dict):
                continue  # comments and metadata
            for variant, items in variants.items():
                if not isinstance(items, list) or not items or not all(isinstance(t, str) for t in items):
                    raise DataError(f"{path}: {task}.{variant} must be a non-empty list of strings")
            templates[task] = {v: list(items) for v, items in variants.items()}
        if not templates:
            raise DataError(f"{path}: no tasks found")
        return cls(templates, source=str(path))

    @property
    def tasks(self) -> list[str]:
        return list(self.templates)

    def __len__(self) -> int:
        return sum(len(items) for variants in self.templates.values() for items in variants.values())

    def choices(self, task: str, variant: str = "raw") -> list[str]:
        try:
            variants = self.templates[task]
        except KeyError:
            raise DataError(f"{self.source}: no prompt task {task!r} (have {', '.join(self.tasks)})") from None
        try:
            return variants[variant]
        except KeyError:
            raise DataError(
                f"{self.source}: task {task!r} has no variant {variant!r} (have {', '.join(variants)})"
            ) from None

    def pick(self, task: str, variant: str = "raw", key: int | str = 0) -> str:
        """The template for sample `key` (an int seed or any string; same key -> same template)."""
        items = self.choices(task, variant)
        seed = key if isinstance(key, int) else sample_seed(key)
        return items[seed % len(items)]

    def render(self, task: str, variant: str = "raw", text: str | None = None, key: int | str = 0) -> str:
        """Pick a template and put `text` (question, region...) into it.

        A template with `{}` gets the text there; one without gets the text appended (the seed file's VQA
        templates are prefixes such as "Answer the question: "); captioning templates take no text.
        """
        template = self.pick(task, variant, key)
        if "{}" in template:
            return template.replace("{}", text or "")
        if not text:
            return template
        sep = "" if template[-1:].isspace() else "\n"
        return f"{template}{sep}{text}"
