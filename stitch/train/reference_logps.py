"""Reference log-probs computed once before training and stored in a file (`preference.reference: precomputed`).

Why: with full fine-tuning the frozen reference copy doubles the weights in memory (ms-swift #2082's OOM); one
no-grad pass of the starting model over the pairs, before the first step, needs no copy at all and no reference
forward per step. The file is JSONL: a header naming the model (path + fingerprint of `model.checkpoint`), the
datasets (names, sizes) and `data.seq_length`, then one line per record in dataset order with a digest of the
record's rendered tokens and the chosen/rejected sums (or the skip reason). It is written line by line, so a
pass that is killed continues where it stopped; a file made for other data, another model or other settings is
refused with what differs, and every pair is checked against its digest when training reads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from stitch.checkpoint.lora import base_reference
from stitch.data.collate import Sample
from stitch.data.preference import PreferenceStream, collate_pairs, encode_pair
from stitch.data.skips import SampleError
from stitch.errors import DataError
from stitch.models.vlm import VLM
from stitch.train.step import _to_device

__all__ = ["pair_digest", "precompute_reference_logps", "read_reference_logps", "lookup"]

VERSION = 1


def pair_digest(chosen: Sample, rejected: Sample) -> str:
    """A digest of a pair as the model sees it (ids and labels of both rows; tiles are implied by the ids)."""
    h = hashlib.sha256()
    for s in (chosen, rejected):
        h.update(s.input_ids.numpy().tobytes())
        h.update(s.labels.numpy().tobytes())
    return h.hexdigest()[:20]


def header(stream: PreferenceStream, checkpoint: str) -> dict:
    return {"version": VERSION, "model": base_reference(checkpoint),
            "datasets": [[src.name, len(src)] for src in stream.sources], "seq_length": stream.data.seq_length}


def read_reference_logps(path: Path, expected: dict) -> list[dict]:
    """The records already in `path` (a trailing partial line is ignored); DataError if it belongs elsewhere."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if not lines or not lines[0].strip():
        return []
    try:
        have = json.loads(lines[0])
        done = [json.loads(line) for line in lines[1:-1]]  # the last piece has no newline yet: partial or empty
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not a reference log-probs file ({e}); delete it to recompute") from e
    for key in ("version", "model", "datasets", "seq_length"):
        if have.get(key) != expected[key]:
            raise DataError(f"{path}: reference log-probs made for {key} {have.get(key)!r}, this run has "
                            f"{expected[key]!r}; delete the file (or set preference.reference_logps) to recompute")
    return done


@torch.no_grad()
def precompute_reference_logps(path: Path, model: VLM, stream: PreferenceStream, checkpoint: str,
                               device: torch.device, autocast: Callable, logps_fn: Callable,
                               writer: bool = True, barrier: Callable[[], None] | None = None,
                               shard: tuple[int, int] = (0, 1),
                               gather: Callable[[dict], list[dict]] | None = None) -> dict[int, dict]:
    """Fill `path` with the starting model's log-probs of every record (continuing a partial file) and return
    them by record number. `logps_fn(model, inputs) -> (sums [2B], counts)`.

    The records go in rounds of `batch_size` x data ranks, each written whole, in record order, and fsynced, so
    the file always holds a prefix of the records (a killed pass continues at the next round). Under a parallel
    layout (`shard` = (data rank, data ranks)) every rank encodes the round, forwards its share of the usable
    pairs (one forward per rank and round, the model's forwards being collective; a rank with no share forwards
    the round's first pair and drops the result), `gather` (an all-gather of each rank's {record: sums}) gives
    every rank all of them, and only the `writer` writes; `barrier` keeps the others from reading the file
    while the writer changes it."""
    head = header(stream, checkpoint)
    done = read_reference_logps(path, head) if path.exists() else []
    if barrier is not None:
        barrier()  # every rank has read what is done before the writer touches the file
    if writer:
        path.parent.mkdir(parents=True, exist_ok=True)
    mode = "r+" if path.exists() and done else "w"
    rank, ranks = shard
    per_round = stream.data.batch_size * ranks
    with open(path, mode, encoding="utf-8") if writer else _NoFile() as f:
        if mode == "w":
            f.write(json.dumps(head) + "\n")
        else:  # drop a partial last line, then append
            f.seek(0)
            keep = len(json.dumps(head).encode()) + 1 + sum(len(json.dumps(r).encode()) + 1 for r in done)
            f.truncate(keep)
            f.seek(keep)
        was_training = model.training
        model.eval()
        try:
            for first in range(len(done), len(stream.index), per_round):
                rows, usable = _encode_round(stream, range(first, min(first + per_round, len(stream.index))))
                mine = usable[rank::ranks]
                if usable:  # every rank knows the round, so all forward or none
                    sums = _logps(model, mine or usable[:1], stream, device, autocast, logps_fn)
                    local = {n: s for (n, _, _), s in zip(mine, sums)}
                    for part in gather(local) if gather is not None else [local]:
                        for n, (chosen, rejected) in part.items():
                            rows[n].update(chosen=chosen, rejected=rejected)
                for n in sorted(rows):
                    done.append(rows[n])
                    f.write(json.dumps(rows[n]) + "\n")
                f.flush()
                if f.fileno() >= 0:
                    os.fsync(f.fileno())
        finally:
            model.train(was_training)
    if barrier is not None:
        barrier()  # the file is complete before any rank goes on
    return {r["i"]: r for r in done}


def _encode_round(stream: PreferenceStream, records: range) -> tuple[dict[int, dict], list]:
    """Each record's line so far ({"i", "digest"} or {"i", "skip"}) and the usable (n, digest, pair)s."""
    rows, usable = {}, []
    for n in records:
        d, i = stream.index[n]
        src = stream.sources[d]
        try:
            pair = encode_pair(stream.processor, src.get(i), stream.data.seq_length, dataset=src.name)
        except SampleError as e:
            rows[n] = {"i": n, "skip": e.reason}
            continue
        rows[n] = {"i": n, "digest": pair_digest(*pair)}
        usable.append((n, rows[n]["digest"], pair))
    return rows, usable


def _logps(model: nn.Module, pending: list, stream, device, autocast, logps_fn) -> list[tuple[float, float]]:
    """(chosen, rejected) summed answer log-probs of the pairs in `pending`, in one forward."""
    batch = collate_pairs([p for _, _, p in pending], stream.processor.pad_token_id)
    with autocast():
        sums, _ = logps_fn(model, _to_device(batch, device))
    chosen, rejected = sums.chunk(2)
    return [(float(c), float(r)) for c, r in zip(chosen.tolist(), rejected.tolist())]


class _NoFile(contextlib.nullcontext):
    """What a rank that does not write the file writes to."""

    def __enter__(self):
        return self

    def write(self, *_) -> None:
        pass

    seek = truncate = flush = write

    def fileno(self) -> int:
        return -1


def lookup(table: dict[int, dict], path: Path) -> Callable[[list], tuple[torch.Tensor, torch.Tensor]]:
    """For the pair stream: drawn [(record number, chosen, rejected)] -> (ref chosen [B], ref rejected [B]), each
    pair checked against the digest stored for its record."""
    def ref(drawn: list) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for n, chosen, rejected in drawn:
            rec = table.get(n)
            if rec is None or "digest" not in rec or rec["digest"] != pair_digest(chosen, rejected):
                raise DataError(f"{path}: record {n} ({chosen.key}) is not the pair its reference log-probs were "
                                "computed for (the data or its rendering changed); delete the file to recompute")
            out.append((rec["chosen"], rec["rejected"]))
        return (torch.tensor([c for c, _ in out], dtype=torch.float32),
                torch.tensor([r for _, r in out], dtype=torch.float32))
    return ref
