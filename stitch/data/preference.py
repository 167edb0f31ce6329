"""Preference pairs (a prompt with images, a chosen and a rejected answer) for DPO/MPO training.

Why a reader of its own: a preference record is not a conversation to learn whole, it is one prompt with two
alternative last answers, and only the answer tokens may carry a loss. Each pair is rendered twice through the
model's chat template (`Processor.encode`, so the masks are the exact ones SFT uses), the prompt part is checked
to be the same tokens in both, and everything before the last answer is masked; a multi-turn prompt's earlier
assistant turns are context, not targets. A micro-batch is `[chosen_1..chosen_B, rejected_1..rejected_B]`
padded into one tensor, so chosen and rejected go through the model in one forward (TRL's layout too).

Field names (first match wins), so RLAIF-V, LLaVA-RLHF and TRL-style files load as they are published:
- prompt: `prompt` (text or messages), `question` (RLAIF-V), `conversations` / `messages` (LLaVA `from`/`value`
  or `role`/`content` turns ending with a user turn; LLaVA-RLHF);
- answers: `chosen` / `rejected` (text, one `{from, value}` / `{role, content}` turn, or a list of turns whose
  last is the assistant's), or LLaVA-RLHF's `output_1` / `output_2` with `preference` (1 or 2);
- images: `image` or `images` (paths relative to `image_root` or the file's folder, `{"bytes": ...}` or
  `{"path": ...}` objects as the HF `datasets` Image feature writes them); in WebDataset shards, the image
  members of the sample (`key.jpg`, `key.0.png`...) beside `key.json`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stitch.data.chat import IGNORE_INDEX, IMAGE_PLACEHOLDER
from stitch.data.collate import Sample, collate
from stitch.data.config import DataConfig, DatasetSpec
from stitch.data.image import ImageInput, load_image
from stitch.data.skips import SampleError, SkipStats
from stitch.data.sources import (
    ROLE_MAP,
    _decode_json,
    _images_of,
    _line_offsets,
    _shard_list,
    _TarIndex,
    energon_fields,
    energon_shards,
    is_energon,
)
from stitch.errors import DataError

__all__ = ["PreferencePair", "parse_preference_row", "encode_pair", "collate_pairs", "PreferenceSource",
           "PreferenceStream", "is_preference_row"]


@dataclass
class PreferencePair:
    """One preference record: `prompt` messages (ending with a user turn), two answers, the images."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    images: list[ImageInput] = field(default_factory=list)
    key: str = ""


# --------------------------------------------------------------------------- record parsing
def is_preference_row(row: Any) -> bool:
    """Whether a raw row is a preference record (used by `stitch data check` to pick the report)."""
    return isinstance(row, dict) and (("chosen" in row and "rejected" in row) or ("output_1" in row and "output_2"
                                                                               in row))


def _turns(value: Any, where: str, what: str) -> list[dict[str, str]]:
    """LLaVA (`from`/`value`) or chat (`role`/`content`) turns as role/content dicts."""
    if not isinstance(value, list):
        raise SampleError("malformed_record", f"{where}: {what} must be a list of turns")
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise SampleError("malformed_record", f"{where}: {what}[{i}] is not an object")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in ROLE_MAP:
            raise SampleError("bad_roles", f"{where}: {what}[{i}] has unknown role {role!r}")
        if not isinstance(content, str):
            raise SampleError("malformed_record", f"{where}: {what}[{i}] content is not a string")
        out.append({"role": ROLE_MAP[role], "content": content})
    return out


def _answer(value: Any, where: str, what: str) -> str:
    """The assistant text of an answer given as text, one turn, or turns whose last is the assistant's."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):  # one turn; its speaker is the model whatever it is called (LLaVA-RLHF: "llava")
        content = value.get("content", value.get("value"))
        if not isinstance(content, str):
            raise SampleError("malformed_record", f"{where}: {what} has no text ('value' or 'content')")
        return content
    turns = _turns(value, where, what)
    if not turns or turns[-1]["role"] != "assistant":
        raise SampleError("bad_roles", f"{where}: {what} must end with an assistant turn")
    return turns[-1]["content"]


def _prompt(row: dict, where: str) -> list[dict[str, str]]:
    for name in ("prompt", "question", "conversations", "messages"):
        if name in row:
            value = row[name]
            turns = [{"role": "user", "content": value}] if isinstance(value, str) else _turns(value, where, name)
            break
    else:
        raise SampleError("malformed_record", f"{where}: no prompt (need one of prompt, question, conversations, "
                          "messages)")
    if isinstance(row.get("system"), str) and row["system"] and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": row["system"]})
    if not turns or turns[-1]["role"] != "user":
        raise SampleError("bad_roles", f"{where}: the prompt must end with a user turn (the answers follow it)")
    return turns


def _image_refs(row: dict, where: str, image_root: Path | None) -> list[ImageInput]:
    value = row.get("images", row.get("image"))
    if value is None:
        return []
    refs = value if isinstance(value, list) else [value]
    out: list[ImageInput] = []
    for i, ref in enumerate(refs):
        if isinstance(ref, dict):  # the HF datasets Image feature: {"bytes": ..., "path": ...}
            ref = ref.get("bytes") or ref.get("path")
        if isinstance(ref, (bytes, bytearray)):
            out.append(bytes(ref))
        elif isinstance(ref, str) and ref:
            p = Path(ref)
            out.append(str(p if p.is_absolute() or image_root is None else image_root / p))
        else:
            raise SampleError("malformed_record", f"{where}: image {i} must be a path, bytes or "
                              "{'bytes'|'path'} object")
    return out


def parse_preference_row(row: Any, where: str, image_root: Path | None = None,
                         images: list[ImageInput] | None = None) -> PreferencePair:
    """A raw JSON row as a `PreferencePair` (field names: see the module docstring); SampleError if unusable.
    `images` (WebDataset members) replaces the row's own image fields."""
    if not isinstance(row, dict):
        raise SampleError("malformed_record", f"{where}: a preference record must be a JSON object")
    prompt = _prompt(row, where)
    if "chosen" in row and "rejected" in row:
        chosen, rejected = _answer(row["chosen"], where, "chosen"), _answer(row["rejected"], where, "rejected")
    elif "output_1" in row and "output_2" in row:  # LLaVA-RLHF: two outputs and which one humans preferred
        pref = row.get("preference")
        if pref not in (1, 2, "1", "2"):
            raise SampleError("malformed_record", f"{where}: preference must be 1 or 2 (which of output_1/output_2 "
                              f"is preferred), got {pref!r}")
        a, b = _answer(row["output_1"], where, "output_1"), _answer(row["output_2"], where, "output_2")
        chosen, rejected = (a, b) if int(pref) == 1 else (b, a)
    else:
        raise SampleError("malformed_record", f"{where}: no answers (need chosen and rejected, or output_1, "
                          "output_2 and preference)")
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise SampleError("empty_conversation", f"{where}: the {name} answer is empty")
    imgs = images if images is not None else _image_refs(row, where, image_root)
    if imgs and not any(IMAGE_PLACEHOLDER in m["content"] for m in prompt):
        # RLAIF-V and TRL rows carry the image beside a bare question: it goes first in the first user turn.
        first = next(i for i, m in enumerate(prompt) if m["role"] == "user")
        prompt[first] = {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n" * len(imgs) + prompt[first]["content"]}
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, images=imgs, key=where)


# --------------------------------------------------------------------------- rendering
def encode_pair(processor, pair: PreferencePair, max_length: int | None = None,
                dataset: str = "") -> tuple[Sample, Sample]:
    """(chosen, rejected) samples through the chat template; labels only on the last answer and its end-of-turn.

    The chat encoder labels every assistant turn; the last answer is the last run of labelled tokens, and all
    before it is masked. Both renderings must share that prompt token for token (else the pair is skipped as
    `template_mismatch`: a DPO pair compares two answers to one prompt)."""
    images = [load_image(im, processor.images.max_pixels) for im in pair.images]
    out = []
    for answer in (pair.chosen, pair.rejected):
        conv = [*pair.prompt, {"role": "assistant", "content": answer}]
        s = processor.encode(conv, images, max_length=max_length, dataset=dataset, key=pair.key)
        labelled = (s.labels != IGNORE_INDEX).nonzero().flatten()
        start = int(labelled[-1])
        while start > 0 and s.labels[start - 1] != IGNORE_INDEX:  # back to the start of the last labelled run
            start -= 1
        s.labels[:start] = IGNORE_INDEX
        out.append((s, start))
    (c, nc), (r, nr) = out
    if nc != nr or not torch.equal(c.input_ids[:nc], r.input_ids[:nr]):
        raise SampleError("template_mismatch", f"{pair.key}: the chosen and rejected renderings do not share the "
                          f"prompt's tokens ({nc} vs {nr} prompt tokens; a tile budget lowered for max_length "
                          f"{max_length} in one of them?)")
    return c, r


def collate_pairs(pairs: Sequence[tuple[Sample, Sample]], pad_token_id: int) -> dict[str, Any]:
    """A micro-batch of B pairs: rows [chosen_1..chosen_B, rejected_1..rejected_B] right-padded ([2B, T]), each
    row with its own tiles (an image is repeated for its two rows); `num_pairs` = B."""
    rows = [c for c, _ in pairs] + [r for _, r in pairs]
    batch = collate(rows, pack=False, pad_token_id=pad_token_id)
    batch["num_pairs"] = len(pairs)
    batch["sample_keys"] = [c.key for c, _ in pairs]
    return batch


# --------------------------------------------------------------------------- sources
class PreferenceSource:
    """A JSONL / JSON-list file, WebDataset shards or an Energon-prepared folder of preference records, read
    lazily by index. An Energon folder is read natively (no `megatron-energon` needed): the shards of the spec's
    `split` part, members turned into fields by its dataset.yaml's `field_map` or `sample_loader`, else read as
    WebDataset's (`key.json` + image members)."""

    def __init__(self, spec: DatasetSpec):
        self.name = spec.display_name
        path = Path(spec.path)
        self.image_root = Path(spec.image_root) if spec.image_root else path.parent
        self._rows: list[Any] | None = None
        self._tar: _TarIndex | None = None
        self._fields = None  # an Energon folder's member -> field mapping
        if path.suffix in (".jsonl", ".json") and path.is_file():
            self.path = path
            if path.suffix == ".json":
                try:
                    rows = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise DataError(f"{path}: not a readable JSON file ({e})") from e
                if not isinstance(rows, list):
                    raise DataError(f"{path}: a .json preference file must hold a list of records")
                self._rows = rows
                n = len(rows)
            else:
                self.offsets, self.lines = _line_offsets(path)
                n = len(self.offsets)
        elif path.suffix in (".jsonl", ".json"):
            raise DataError(f"{path}: preference file not found")
        elif is_energon(path):
            self._tar = _TarIndex(energon_shards(path, spec.option("split") or "train"))
            self._fields = energon_fields(path)
            n = len(self._tar)
        else:
            self._tar = _TarIndex(_shard_list(spec.path))
            n = len(self._tar)
        self.limit = min(spec.limit or n, n)
        if self.limit == 0:
            raise DataError(f"{spec.path}: no preference records")

    def __len__(self) -> int:
        return self.limit

    def raw(self, index: int) -> tuple[Any, str, list[ImageInput] | None]:
        """(row, where, images from the shard or None)."""
        if self._tar is not None:
            where, files = self._tar.read(index)
            if self._fields is not None:
                return self._fields(files, where), where, None
            if "json" not in files:
                raise SampleError("malformed_record", f"{where}: no .json member (has {sorted(files)})")
            return _decode_json(files["json"], where), where, _images_of(files) or None
        if self._rows is not None:
            return self._rows[index], f"{self.path}[{index}]", None
        with open(self.path, "rb") as f:
            f.seek(self.offsets[index])
            line = f.readline()
        where = f"{self.path}:{self.lines[index]}"
        return _decode_json(line, where), where, None

    def get(self, index: int) -> PreferencePair:
        row, where, images = self.raw(index)
        return parse_preference_row(row, where, self.image_root, images)


# --------------------------------------------------------------------------- the stream
class PreferenceStream:
    """Micro-batches of `data.batch_size` pairs from `data.datasets`, shuffled per epoch, split over ranks.

    The position is (epoch, index into this epoch's order), so `state_dict()` resumes exactly; the datasets'
    sizes are part of the state and a resume onto different data fails. Unusable pairs are skipped and counted
    (`SkipStats`), and a dataset skipping more than `data.max_skip_fraction` stops the run. Records are read in
    this process (no workers): a preference set is small next to the forward it feeds.
    """

    def __init__(self, data: DataConfig, processor, rank: int = 0, world_size: int = 1, seed: int = 0):
        if data.pack:
            raise DataError("data.pack: preference stages batch pairs padded (chosen and rejected rows of one "
                            "forward); set data.pack: false")
        self.data = data
        self.processor = processor
        self.sources = [PreferenceSource(s) for s in data.resolve_datasets()]
        self.index = [(d, i) for d, src in enumerate(self.sources) for i in range(len(src))]
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.position = 0, 0
        self.stats = SkipStats()
        # set by the trainer for `preference.reference: precomputed`: drawn pairs -> (ref chosen [B], rejected [B])
        self.reference_logps = None

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(len(self.index), generator=g).tolist()
        return perm[self.rank :: self.world_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "sizes": [len(s) for s in self.sources],
                "stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        sizes = [len(s) for s in self.sources]
        if state.get("sizes") != sizes:
            raise DataError(f"resume: the checkpoint's preference data had {state.get('sizes')} records per "
                            f"dataset, these datasets have {sizes}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.stats = SkipStats.from_state(state.get("stats") or {})

    def pairs(self) -> Iterator[tuple[Sample, Sample]]:
        """Encoded pairs, endlessly (epochs reshuffle), skipping unusable ones."""
        for _, chosen, rejected in self.indexed_pairs():
            yield chosen, rejected

    def indexed_pairs(self) -> Iterator[tuple[int, Sample, Sample]]:
        """(record number over all datasets, chosen, rejected), as `pairs()`."""
        order = self._order()
        while True:
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order()
                if not order:
                    raise DataError("preference data: this rank has no records (fewer records than ranks)")
            n = order[self.position]
            d, i = self.index[n]
            self.position += 1
            src = self.sources[d]
            try:
                pair = encode_pair(self.processor, src.get(i), self.data.seq_length, dataset=src.name)
            except SampleError as e:
                self.stats.record_skip(src.name, e)
                self.stats.check(src.name, self.data.max_skip_fraction, self.data.skip_check_after)
                continue
            self.stats.record_ok(src.name)
            yield n, pair[0], pair[1]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        pairs = self.indexed_pairs()
        pad = self.processor.pad_token_id
        while True:
            drawn = [next(pairs) for _ in range(self.data.batch_size)]
            batch = collate_pairs([(c, r) for _, c, r in drawn], pad)
            if self.reference_logps is not None:  # precomputed reference log-probs, checked against the pair
                batch["ref_chosen"], batch["ref_rejected"] = self.reference_logps(drawn)
            yield batch
