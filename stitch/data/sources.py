"""Dataset sources: random-access readers that turn stored records into conversations + images.

Every source is a sequence: `len(source)` and `source.get(index, key) -> Record`, where `key` is the sample's
stable seed (used to draw a prompt template, so the same sample renders the same on every run). Random
access is what lets the blend (`stitch.data.blend`) give every rank and worker a disjoint, resumable stream
without reading anything it does not use. A record that can't be used raises `SampleError` with a reason;
the stream counts and skips it.

Formats (chosen by `DatasetSpec.kind`, or detected from the path with kind "auto"):
- `llava`: JSON array or JSONL of `{"image": "a.jpg" | ["a.jpg", "b.jpg"] | absent, "conversations":
  [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}` (also `messages` with
  role/content). Image paths are relative to `image_root` (default: the file's folder).
- `captioning`: `{"image", "caption"}` records (or `captions`: a list; one is drawn per sample);
  `vqa`: `{"image", "question", "answers" | "answer"}` (the most common answer is the target). Both are
  rendered through the prompt file: task `prompt_task` (default Captioning / VQASFT), variant `prompt_variant`.
  Detected per record in JSON/JSONL files, so one file may mix them.
- `webdataset`: tar shards (a `.tar`, a folder of them, or a brace pattern `data-{000..009}.tar`); files
  sharing a key (the name up to the first dot) form a sample: an image (`jpg`/`png`/`webp`..., or several as
  `0.jpg`, `1.jpg`) plus `json` (any record above) or `txt` (a caption).
- `energon`: a folder prepared by Megatron-Energon (`.nv-meta/` with `.info.yaml|json`, `split.yaml`,
  `dataset.yaml`); its shards are read natively (no need for the `megatron-energon` package) and its
  `field_map` applied; sample types CaptioningSample, VQASample and the like map onto captioning/VQA records.
- `easy-vqa`: the bundled `easy-vqa` set (`easy-vqa:train` or `easy-vqa:test`), as VQA records.
"""

from __future__ import annotations

import importlib.util
import json
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stitch.data.image import ImageInput
from stitch.data.metadataset import DatasetSpec
from stitch.data.prompts import PromptLibrary
from stitch.data.skips import SampleError
from stitch.data.video_records import VIDEO_EXTS, llava_video_placeholders, video_refs, videos_of
from stitch.errors import DataError

__all__ = [
    "Record",
    "Source",
    "JsonSource",
    "WebDatasetSource",
    "EnergonSource",
    "EasyVQASource",
    "open_source",
    "easy_vqa_records",
    "braceexpand",
    "row_to_record",
]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
            "model": "assistant", "system": "system"}


@dataclass
class Record:
    """A conversation (role/content, `<image>` placeholders) with its images (paths, bytes or PIL)."""

    conversation: list[dict[str, str]]
    images: list[ImageInput] = field(default_factory=list)
    key: str = ""
    videos: list = field(default_factory=list)  # paths, bytes or frame folders (stitch.data.video_records)


class Source:
    """Base of all sources: a named, sized, random-access collection of `Record`s."""

    name: str = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, index: int, key: int = 0) -> Record:
        raise NotImplementedError


def _label(name: str, path: str | Path) -> str:
    """How errors name a dataset: its path, and its name too when it has one of its own."""
    return str(path) if name == str(path) else f"dataset {name} ({path})"


# --------------------------------------------------------------------------- record conversion
class _Renderer:
    """Shared conversion of raw rows (dicts) into records, with the dataset's prompt settings."""

    def __init__(self, spec: DatasetSpec, prompts: PromptLibrary, base_dir: Path | None):
        self.spec = spec
        self.prompts = prompts
        root = spec.option("image_root")
        self.image_root = Path(root) if root else base_dir
        self.video_root = Path(spec.option("video_root")) if spec.option("video_root") else self.image_root
        self.caption_task = (spec.option("prompt_task") or "Captioning", spec.option("prompt_variant") or "raw")
        self.vqa_task = (spec.option("prompt_task") or "VQASFT", spec.option("prompt_variant") or "raw")
        kind = spec.kind
        # Fail at open, not at sample 10 000, when the prompt file lacks the task/variant.
        if kind in ("captioning", "auto", "webdataset", "energon"):
            _check_prompt(prompts, *self.caption_task, optional=kind != "captioning")
        if kind in ("vqa", "auto", "easy-vqa", "webdataset", "energon"):
            _check_prompt(prompts, *self.vqa_task, optional=kind not in ("vqa", "easy-vqa"))

    def image_ref(self, ref: Any, where: str) -> ImageInput:
        if isinstance(ref, (bytes, bytearray)):
            return bytes(ref)
        if not isinstance(ref, str) or not ref:
            raise SampleError("malformed_record", f"{where}: image must be a path string, got {type(ref).__name__}")
        p = Path(ref)
        if not p.is_absolute() and self.image_root is not None:
            p = self.image_root / p
        return str(p)

    def convert(self, row: Any, key: int, where: str, images: list[ImageInput] | None = None,
                videos: list | None = None) -> Record:
        record = row_to_record(row, key, where, self, images)
        record.videos = video_refs(row, self.video_root, where) if videos is None else videos
        llava_video_placeholders(record.conversation, len(record.videos), len(record.images))
        return record


def _check_prompt(prompts: PromptLibrary, task: str, variant: str, optional: bool) -> None:
    try:
        prompts.choices(task, variant)
    except DataError:
        if not optional:
            raise


def row_to_record(
    row: Any, key: int, where: str, renderer: _Renderer, images: list[ImageInput] | None = None
) -> Record:
    """One raw row (LLaVA, messages, captioning or VQA layout) as a Record; `images` overrides the row's."""
    if not isinstance(row, dict):
        raise SampleError("malformed_record", f"{where}: expected a JSON object, got {type(row).__name__}")
    if images is None:
        ref = row.get("image", row.get("images"))
        refs = [] if ref is None else ref if isinstance(ref, list) else [ref]
        images = [renderer.image_ref(r, where) for r in refs]
    if "conversations" in row or "messages" in row:
        turns = row.get("conversations", row.get("messages"))
        if not isinstance(turns, list):
            raise SampleError("malformed_record", f"{where}: 'conversations' must be a list")
        conv = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise SampleError("malformed_record", f"{where}: turn {i} is not an object")
            role = turn.get("from", turn.get("role"))
            content = turn.get("value", turn.get("content"))
            if role not in ROLE_MAP:
                raise SampleError("bad_roles", f"{where}: turn {i} has unknown role {role!r}")
            if not isinstance(content, str):
                raise SampleError("malformed_record", f"{where}: turn {i} has no text value")
            conv.append({"role": ROLE_MAP[role], "content": content})
        if not conv:
            raise SampleError("empty_conversation", f"{where}: no turns")
        return Record(conv, images, where)
    placeholder = "".join("<image>\n" for _ in images) + "".join("<video>\n" for _ in video_refs(row, None, where))
    if "question" in row or "context" in row:
        question = row.get("question", row.get("context"))
        answer = _answer(row.get("answers", row.get("answer")), where)
        if not isinstance(question, str):
            raise SampleError("malformed_record", f"{where}: question must be a string")
        prompt = renderer.prompts.render(*renderer.vqa_task, text=question, key=key)
        return Record([{"role": "user", "content": placeholder + prompt},
                       {"role": "assistant", "content": answer}], images, where)
    if "caption" in row or "captions" in row or "text" in row:
        caption = row.get("caption", row.get("captions", row.get("text")))
        if isinstance(caption, list) and caption:
            caption = caption[key % len(caption)]
        if not isinstance(caption, str):
            raise SampleError("malformed_record", f"{where}: caption must be a string")
        prompt = renderer.prompts.render(*renderer.caption_task, key=key)
        return Record([{"role": "user", "content": placeholder + prompt},
                       {"role": "assistant", "content": caption}], images, where)
    raise SampleError(
        "malformed_record", f"{where}: no 'conversations', 'messages', 'caption' or 'question' field"
    )


def _answer(answers: Any, where: str) -> str:
    if isinstance(answers, str):
        return answers
    if isinstance(answers, list) and answers:
        texts = [a.get("answer") if isinstance(a, dict) else a for a in answers]
        if all(isinstance(t, str) for t in texts):
            return Counter(texts).most_common(1)[0][0]  # VQAv2: 10 answers, the most common is the target
    raise SampleError("malformed_record", f"{where}: 'answers' must be a string or a list of strings")


# --------------------------------------------------------------------------- JSON / JSONL
class JsonSource(Source):
    """LLaVA-style (or captioning/VQA) records in a JSON array file or a JSONL file (indexed by line)."""

    def __init__(self, path: str | Path, spec: DatasetSpec, prompts: PromptLibrary):
        self.path = Path(path)
        self.name = spec.display_name
        if not self.path.is_file():
            raise DataError(f"{_label(self.name, self.path)}: no such file")
        self.renderer = _Renderer(spec, prompts, self.path.parent)
        self._rows: list | None = None
        self._offsets: list[int] = []
        self._lines: list[int] = []
        if self.path.suffix == ".json":
            try:
                data = json.loads(self.path.read_text())
            except json.JSONDecodeError as e:
                raise DataError(f"{self.path}: not valid JSON ({e}); use .jsonl for one record per line") from e
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                raise DataError(f"{self.path}: expected a JSON array of records")
            self._rows = data
        else:
            self._offsets, self._lines = _line_offsets(self.path)
        if spec.limit:
            if self._rows is not None:
                self._rows = self._rows[: spec.limit]
            self._offsets = self._offsets[: spec.limit]
        if len(self) == 0:
            raise DataError(f"{_label(self.name, self.path)}: holds no records")

    def __len__(self) -> int:
        return len(self._rows) if self._rows is not None else len(self._offsets)

    def get(self, index: int, key: int = 0) -> Record:
        if self._rows is not None:
            return self.renderer.convert(self._rows[index], key, f"{self.path}[{index}]")
        where = f"{self.path}:{self._lines[index]}"
        with open(self.path, "rb") as f:
            f.seek(self._offsets[index])
            line = f.readline()
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SampleError("malformed_record", f"{where}: not valid JSON ({e})") from e
        return self.renderer.convert(row, key, where)


def _line_offsets(path: Path) -> tuple[list[int], list[int]]:
    """Byte offsets and 1-based numbers of non-blank lines (a fast scan; lines are parsed only when used)."""
    data = path.read_bytes()
    offsets, numbers, start, line = [], [], 0, 1
    n = len(data)
    while start < n:
        end = data.find(b"\n", start)
        end = n if end < 0 else end
        if data[start:end].strip():
            offsets.append(start)
            numbers.append(line)
        start, line = end + 1, line + 1
    return offsets, numbers


# --------------------------------------------------------------------------- tar shards
def braceexpand(pattern: str) -> list[str]:
    """Expand `{a,b}` alternatives and `{000..009}` ranges (zero padding kept), as WebDataset/Energon do."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        a, b = rng.groups()
        width = len(a) if a.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(a), int(b) + 1)]
    else:
        items = body.split(",")
    return [x for item in items for x in braceexpand(head + item + tail)]


_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # key = name up to the first dot of the basename


class _TarIndex:
    """Samples of tar shards, grouped by key: [(shard path, {ext: (offset, size)})], built from headers only."""

    def __init__(self, shards: Sequence[Path]):
        self.samples: list[tuple[Path, str, dict[str, tuple[int, int]]]] = []
        for shard in shards:
            try:
                with tarfile.open(shard, "r:") as tar:
                    members = tar.getmembers()
            except (OSError, tarfile.TarError) as e:
                raise DataError(f"{shard}: not a readable tar shard ({e})") from e
            groups: dict[str, dict[str, tuple[int, int]]] = {}
            for m in members:
                if not m.isfile():
                    continue
                match = _KEY_RE.match(m.name)
                if not match or re.search(r"__[^/]*__($|/)", m.name):
                    continue
                key, ext = match.groups()
                groups.setdefault(key, {})[ext.lower()] = (m.offset_data, m.size)
            self.samples.extend((shard, key, files) for key, files in groups.items())

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> tuple[str, dict[str, bytes]]:
        shard, key, files = self.samples[index]
        out = {}
        with open(shard, "rb") as f:
            for ext, (offset, size) in files.items():
                f.seek(offset)
                data = f.read(size)
                if len(data) != size:
                    raise SampleError("truncated_image", f"{shard}:{key}.{ext}: shard ends early")
                out[ext] = data
        return f"{shard.name}:{key}", out


def _images_of(files: dict[str, bytes]) -> list[ImageInput]:
    """Image members of a sample: `jpg` alone, or numbered `0.jpg`, `1.png`... in order."""
    found = []
    for ext, data in files.items():
        parts = ext.split(".")
        if parts[-1] in IMAGE_EXTS:
            order = int(parts[0]) if len(parts) > 1 and parts[0].isdigit() else -1
            found.append((order, ext, data))
    return [data for _, _, data in sorted(found)]


def _decode_json(data: bytes, where: str) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SampleError("malformed_record", f"{where}: not valid JSON ({e})") from e


def _text(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise SampleError("malformed_record", f"{where}: text is not UTF-8") from e


class WebDatasetSource(Source):
    """WebDataset tar shards: `key.jpg` (or `key.0.jpg`, `key.1.png`...) + `key.json` or `key.txt`."""

    def __init__(self, path: str, spec: DatasetSpec, prompts: PromptLibrary):
        self.name = spec.display_name
        shards = _shard_list(path)
        self.index = _TarIndex(shards)
        self.renderer = _Renderer(spec, prompts, None)
        self.limit = min(spec.limit or len(self.index), len(self.index))
        if self.limit == 0:
            raise DataError(f"{_label(self.name, path)}: the shards hold no samples")

    def __len__(self) -> int:
        return self.limit

    def get(self, index: int, key: int = 0) -> Record:
        where, files = self.index.read(index)
        images, videos = _images_of(files), videos_of(files)
        if "json" in files:
            row = _decode_json(files["json"], where)
            return self.renderer.convert(row, key, where, images, videos)
        if "txt" in files:
            row = {"caption": _text(files["txt"], where), "video": videos}
            return self.renderer.convert(row, key, where, images, videos)
        raise SampleError("malformed_record", f"{where}: no .json or .txt member (has {sorted(files)})")


def _shard_list(path: str) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        shards = sorted(p.glob("*.tar"))
    else:
        shards = [Path(s) for s in braceexpand(path)]
    if not shards:
        raise DataError(f"{path}: no .tar shards found")
    missing = [s for s in shards if not s.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: shard not found")
    return shards


# --------------------------------------------------------------------------- Energon
_ENERGON_TYPES = {  # sample type -> how its fields map onto our records
    "CaptioningSample": "captioning",
    "VQASample": "vqa",
    "VQAOCRSample": "vqa",
    "MultiChoiceVQASample": "vqa",
    "OCRSample": "ocr",
}


class EnergonSource(Source):
    """A Megatron-Energon prepared dataset (a folder with `.nv-meta/`), read natively."""

    def __init__(self, path: str | Path, spec: DatasetSpec, prompts: PromptLibrary):
        self.path = Path(path)
        self.name = spec.display_name
        meta = self.path / ".nv-meta"
        split = spec.option("split") or "train"
        self.index = _TarIndex(energon_shards(self.path, split))
        ds = _load_meta(meta, ("dataset.yaml", "dataset.json"))
        self.sample_type = _energon_type(ds, meta)
        self.field_map: dict[str, str] | None = ds.get("field_map")
        self.loader = _energon_loader(ds, meta)
        self.renderer = _Renderer(spec, prompts, None)
        self.limit = min(spec.limit or len(self.index), len(self.index))
        if self.limit == 0:
            raise DataError(f"{_label(self.name, self.path)}: split {split!r} holds no samples")

    def __len__(self) -> int:
        return self.limit

    def get(self, index: int, key: int = 0) -> Record:
        where, files = self.index.read(index)
        if self.loader is not None:
            fields = self.loader({**files, "__key__": where})
        elif self.field_map is not None:
            fields = {}
            for name, ext in self.field_map.items():
                if ext not in files:
                    raise SampleError("malformed_record", f"{where}: field {name!r} needs member .{ext}")
                data = files[ext]
                fields[name] = data if ext.split(".")[-1] in IMAGE_EXTS + VIDEO_EXTS else (
                    _decode_json(data, where) if ext.endswith("json") else _text(data, where))
        else:
            fields = {"image": (_images_of(files) or [None])[0], "videos": videos_of(files), **{
                k: _decode_json(v, where) if k == "json" else _text(v, where)
                for k, v in files.items() if k in ("json", "txt")}}
        return self._to_record(fields, key, where)

    def _to_record(self, fields: dict[str, Any], key: int, where: str) -> Record:
        image = fields.get("image")
        images = [image] if isinstance(image, (bytes, bytearray)) else []
        videos = list(fields.get("videos") or [])
        if self.renderer.spec.option("has_video"):  # the seed's subflavor: the image field holds the video
            images, videos = [], images + videos
        kind = self.sample_type
        if kind == "captioning" or (kind is None and "caption" in fields):
            row = {"caption": fields.get("caption")}
        elif kind == "vqa" or (kind is None and "context" in fields):
            row = {"question": fields.get("context"), "answers": fields.get("answers")}
        elif kind == "ocr":
            row = {"caption": fields.get("text")}
        elif isinstance(fields.get("json"), dict):
            row = fields["json"]
        else:
            row = {k: v for k, v in fields.items() if k != "image"}
        return self.renderer.convert({**row, "video": videos}, key, where, images, videos)


def is_energon(path: str | Path) -> bool:
    """An Energon-prepared folder: it has `.nv-meta/`."""
    return (Path(path) / ".nv-meta").is_dir()


def energon_shards(path: Path, split: str) -> list[Path]:
    """The shards of `split` in an Energon-prepared folder (`.nv-meta/split.yaml`'s split part, brace patterns
    expanded, `exclude` dropped), each checked against `.info`'s shard counts."""
    meta = path / ".nv-meta"
    info = _load_meta(meta, (".info.json", ".info.yaml"))
    splits = _load_meta(meta, ("split.yaml", "split.json"))
    split_parts = splits.get("split_parts") or {}
    if not isinstance(split_parts, dict):
        raise DataError(f"{meta}/split.yaml: split_parts must map split names to lists of shards")
    parts = split_parts.get(split)
    if parts is None:
        raise DataError(f"{meta}/split.yaml: no split part {split!r} (have {list(split_parts)})")
    if not isinstance(parts, list) or not all(isinstance(x, str) for x in parts):
        raise DataError(f"{meta}/split.yaml: split_parts.{split} must be a list of shard names, got {parts!r}")
    excludes = {x for e in splits.get("exclude", []) or [] for x in braceexpand(e)}
    shard_names = [n for p in parts for n in braceexpand(p) if n not in excludes]
    counts = info.get("shard_counts", {})
    for n in shard_names:
        if n not in counts:
            raise DataError(f"{meta}: shard {n} of split {split!r} is not in .info shard_counts")
    return [path / n for n in shard_names]


def energon_fields(path: Path) -> Callable[[dict, str], dict] | None:
    """How an Energon folder's members become a record's fields: dataset.yaml's `sample_loader` (a function of
    the member dict) or `field_map` (field -> member extension; images kept as bytes, `json` members decoded,
    the rest read as text); None when it has neither (members are read as WebDataset's: `key.json` + images)."""
    meta = path / ".nv-meta"
    ds = _load_meta(meta, ("dataset.yaml", "dataset.json"))
    loader = _energon_loader(ds, meta)
    if loader is not None:
        return lambda files, where: loader({**files, "__key__": where})
    field_map = ds.get("field_map")
    if field_map is None:
        return None
    if not isinstance(field_map, dict):
        raise DataError(f"{meta}/dataset.yaml: field_map must map field names to member extensions")

    def mapped(files: dict, where: str) -> dict:
        fields = {}
        for name, ext in field_map.items():
            if ext not in files:
                raise SampleError("malformed_record", f"{where}: field {name!r} needs member .{ext}")
            data = files[ext]
            fields[name] = data if ext.split(".")[-1] in IMAGE_EXTS + VIDEO_EXTS else (
                _decode_json(data, where) if ext.endswith("json") else _text(data, where))
        return fields

    return mapped


def _load_meta(meta: Path, names: Sequence[str]) -> dict:
    for name in names:
        p = meta / name
        if p.is_file():
            try:
                text = p.read_text(encoding="utf-8")
                data = yaml.safe_load(text) if p.suffix == ".yaml" else json.loads(text)
            except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{p}: cannot parse ({e})") from e
            if data is not None and not isinstance(data, dict):
                raise DataError(f"{p}: expected a mapping of keys, got {type(data).__name__}")
            return data or {}
    raise DataError(f"{meta}: missing {' or '.join(names)} (is this an Energon-prepared dataset?)")


def _energon_type(ds: dict, meta: Path) -> str | None:
    st = ds.get("sample_type")
    name = st.get("__class__") if isinstance(st, dict) else ds.get("__class__")
    if name is None:
        return None
    if not isinstance(name, str):
        raise DataError(f"{meta}/dataset.yaml: __class__ must be a class name, got {name!r}")
    for type_name, kind in _ENERGON_TYPES.items():
        if name.startswith(type_name.replace("Sample", "")):
            return kind
    if name in ("CrudeWebdataset", "DefaultGenericWebdatasetFactory"):
        return None
    raise DataError(f"{meta}/dataset.yaml: sample type {name!r} is not supported (have {', '.join(_ENERGON_TYPES)})")


def _energon_loader(ds: dict, meta: Path):
    """`sample_loader: file.py:function` in dataset.yaml: a function (raw member dict -> fields)."""
    spec = ds.get("sample_loader")
    if not spec:
        return None
    if not isinstance(spec, str):
        raise DataError(f"{meta}/dataset.yaml: sample_loader must be 'file.py:function', got {spec!r}")
    file, _, func = spec.partition(":")
    path = meta / file
    mod_spec = importlib.util.spec_from_file_location(f"_energon_loader_{abs(hash(str(path)))}", path)
    if mod_spec is None or mod_spec.loader is None or not path.is_file():
        raise DataError(f"{meta}/dataset.yaml: sample_loader file {path} not found")
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    name = func or "sample_loader"
    loader = getattr(module, name, None)
    if not callable(loader):
        raise DataError(f"{meta}/dataset.yaml: sample_loader {spec!r}: {path.name} has no function {name!r}")

    def checked(members: dict) -> dict:
        fields = loader(members)
        if not isinstance(fields, dict):
            raise SampleError("malformed_record", f"{members.get('__key__')}: sample_loader {spec!r} returned "
                              f"{type(fields).__name__}, not a dict of fields")
        return fields

    return checked


# --------------------------------------------------------------------------- easy-vqa
def easy_vqa_records(split: str = "train") -> list[tuple[str, str, str]]:
    """The bundled easy-VQA set as (image_path, question, answer) triples; split "train" or "test"."""
    import easy_vqa

    if split not in ("train", "test"):
        raise DataError(f"easy-vqa: split must be 'train' or 'test', got {split!r}")
    questions, answers, image_ids = (
        easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()
    )
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    return [(paths[i], q, a) for q, a, i in zip(questions, answers, image_ids)]


class EasyVQASource(Source):
    """easy-VQA (shapes and colours, 64x64 PNGs shipped with the `easy-vqa` package) as VQA records."""

    def __init__(self, spec: DatasetSpec, prompts: PromptLibrary):
        self.name = spec.display_name
        _, _, split = spec.path.partition(":")
        self.records = easy_vqa_records(split or spec.option("split") or "train")
        if spec.limit:
            self.records = self.records[: spec.limit]
        self.renderer = _Renderer(spec.model_copy(update={"kind": "easy-vqa"}), prompts, None)

    def __len__(self) -> int:
        return len(self.records)

    def get(self, index: int, key: int = 0) -> Record:
        image, question, answer = self.records[index]
        row = {"question": question, "answer": answer}
        return self.renderer.convert(row, key, f"easy-vqa[{index}]", [image])


# --------------------------------------------------------------------------- dispatch
def detect_kind(path: str) -> str:
    if path.startswith("easy-vqa"):
        return "easy-vqa"
    p = Path(path)
    if p.is_dir() and (p / ".nv-meta").is_dir():
        return "energon"
    if p.is_dir() and any(p.glob("*.tar")) or path.endswith(".tar") or "{" in path:
        return "webdataset"
    if p.suffix in (".json", ".jsonl"):
        return "llava"
    if not p.exists():
        raise DataError(f"dataset path {path}: no such file or folder")
    raise DataError(f"dataset path {path}: unknown format (expected .json/.jsonl, .tar shards or an Energon folder)")


def open_source(spec: DatasetSpec, prompts: PromptLibrary) -> Source:
    """Open the dataset `spec` describes (paths already absolute; see `DataConfig.resolve_datasets`)."""
    kind = spec.kind if spec.kind != "auto" else detect_kind(spec.path)
    if kind == "easy-vqa":
        return EasyVQASource(spec, prompts)
    if kind == "energon":
        return EnergonSource(spec.path, spec, prompts)
    if kind == "webdataset":
        return WebDatasetSource(spec.path, spec, prompts)
    return JsonSource(spec.path, spec, prompts)
