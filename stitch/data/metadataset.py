"""Metadataset files and their entries: what one dataset of a blend is (`DatasetSpec`) and how a blend YAML
lists them (`load_blend`).

Kept apart from `stitch.data.config` (the data section of a run, which resolves a `blend:` file through
`load_blend`) and `stitch.data.blend` (the streams, which read `DataConfig`), so the config never imports the
streaming code that imports it back.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stitch.config import first_error, read_yaml_file
from stitch.errors import DataError

__all__ = ["DatasetSpec", "SourceKind", "load_blend"]

SourceKind = Literal["auto", "llava", "captioning", "vqa", "webdataset", "energon", "easy-vqa"]


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class DatasetSpec(_Base):
    """One dataset of a blend.

    `path` is a LLaVA-style `.json`/`.jsonl` file, a WebDataset `.tar` (or a folder of them, or a brace
    pattern such as `shards/data-{000..009}.tar`), an Energon-prepared folder (has `.nv-meta/`), or
    `easy-vqa[:train|test]` for the bundled set. Relative paths are relative to the blend file.
    Captioning/VQA records have no conversation of their own; they are turned into one with a prompt drawn
    from `prompt_task`/`prompt_variant` of the prompt file (default: Captioning / VQASFT).
    """

    path: str
    weight: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    kind: SourceKind = "auto"
    # Energon passes subflavors to its task encoder; we keep them (and read our own keys from them, so a
    # seed-system blend can carry `prompt_task` etc. without new fields).
    subflavors: dict[str, Any] = Field(default_factory=dict)
    prompt_task: str | None = None
    prompt_variant: str | None = None
    image_root: str | None = None  # base folder for relative image paths (default: the file's folder)
    video_root: str | None = None  # base folder for relative video paths (default: image_root)
    split: str = "train"  # Energon split part / easy-vqa split
    limit: int | None = Field(default=None, gt=0)  # use only the first N records (debugging, smoke runs)
    name: str | None = None  # shown in reports; default: the path

    @property
    def display_name(self) -> str:
        return self.name or self.path

    def option(self, key: str, default: Any = None) -> Any:
        """A per-dataset option: the field if set, else the subflavor of the same name, else `default`."""
        value = getattr(self, key, None) if key in type(self).model_fields else None
        if value is not None:
            return value
        return self.subflavors.get(key, default)


# --------------------------------------------------------------------------- blend files
def load_blend(path: str | Path, split: str = "train", _chain: tuple[Path, ...] = ()) -> list[DatasetSpec]:
    """The datasets of `split` in a metadataset YAML (seed-system/Energon layout), paths made absolute.

    Layout: `splits: {train: {datasets: [{weight, path, subflavors}, ...]}, val: {...}}` (`__module__` and
    `__class__` are accepted and ignored; `blend:` is read as an alias of `datasets:`). Weights are relative.
    An entry whose path is another metadataset YAML is flattened into it, its weights scaled to the entry's.
    Entries may carry Stitch keys beside the Energon ones: kind, prompt_task, prompt_variant, image_root,
    split, limit, name.
    """
    path = Path(path)
    if path.resolve() in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path.resolve()))
        raise DataError(f"{path}: the blend includes itself ({cycle})")
    doc = read_yaml_file(path, DataError, "blend file not found")
    if not isinstance(doc, dict) or not isinstance(doc.get("splits"), dict):
        raise DataError(f"{path}: expected a metadataset with 'splits: {{train: {{datasets: [...]}}}}'")
    part = doc["splits"].get(split)
    if not isinstance(part, dict):
        raise DataError(f"{path}: no split {split!r} (have {', '.join(doc['splits'])})")
    entries = part.get("datasets", part.get("blend"))
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: splits.{split}.datasets must be a non-empty list")
    out: list[DatasetSpec] = []
    for i, entry in enumerate(entries):
        where = f"{path}: splits.{split}.datasets[{i}]"
        if not isinstance(entry, dict) or "path" not in entry:
            raise DataError(f"{where}: each dataset needs a 'path'")
        entry = dict(entry)
        try:
            weight = float(entry.pop("weight", 1.0))
        except (TypeError, ValueError) as e:
            raise DataError(f"{where}: weight must be a number") from e
        if not math.isfinite(weight) or weight <= 0:
            raise DataError(f"{where}: weight must be a finite number > 0, got {weight}")
        entry_path = str(entry["path"])
        if not entry_path.startswith("easy-vqa") and not Path(entry_path).is_absolute():
            entry_path = str((path.parent / entry_path).resolve())
        if entry_path.endswith((".yaml", ".yml")):  # nested metadataset
            ignored = sorted(set(entry) - {"path", "__module__", "__class__", "subflavors"})
            if ignored:
                raise DataError(f"{where}: a nested blend entry takes only path and weight; {ignored[0]!r} would be "
                                "ignored (set it on the inner blend's datasets)")
            inner = load_blend(entry_path, split, (*_chain, path.resolve()))
            total = sum(d.weight for d in inner)
            out.extend(d.model_copy(update={"weight": weight * d.weight / total}) for d in inner)
            continue
        for root in ("image_root", "video_root"):
            if entry.get(root) and not Path(entry[root]).is_absolute():
                entry[root] = str((path.parent / entry[root]).resolve())
        if "split_part" in entry:  # Energon's name for the split of a prepared dataset
            entry["split"] = entry.pop("split_part")
        entry.update(path=entry_path, weight=weight)
        entry["subflavors"] = entry.get("subflavors") or {}
        try:
            out.append(DatasetSpec.model_validate(entry))
        except ValidationError as e:  # name the entry and the field
            field, msg = first_error(e)
            raise DataError(f"{where}.{field or 'entry'}: {msg}") from e
    return out
