"""Weighted, deterministic, resumable blends: the training data stream of every rank and worker.

API for the trainer:

    stream = build_train_stream(data_cfg, processor, rank, world_size, seed)   # a DataStream
    for batch in stream: ...                  # batches (padded or packed, see stitch.data.collate)
    state = stream.state_dict()               # save beside the checkpoint (plain Python data)
    stream.load_state_dict(state)             # before iterating: continues with exactly the next batch
    stream.stats                              # SkipStats: per-dataset attempts/used/skips by reason

How the stream is laid out, and why it resumes exactly:
- *Consumers.* Each rank runs `num_workers` DataLoader workers (or itself when 0); every (rank, worker slot) is
  a consumer with global id c = rank * W + slot among C = world_size * W. Each consumer produces its own
  stream; streams never share a sample within an epoch of a dataset (below), so ranks and workers are disjoint.
- *Which dataset.* A consumer interleaves datasets with a deterministic low-discrepancy schedule: at step t it
  takes the dataset whose count lags its weight the most (argmax of w_i * (t + 1) - n_i; Megatron's blended
  dataset does the same). Over any window the counts match the (relative) weights to within one sample.
- *Which sample.* The k-th draw of consumer c from dataset d is position g = k * C + c of that dataset's
  stream: epoch g // len(d), and within the epoch a keyed pseudo-random permutation (a Feistel network, O(1)
  memory) of the dataset's indices, seeded by (seed, dataset, epoch). Consumers take interleaved positions of
  the same permutation, hence disjoint. A sample that fails (`SampleError`) is counted and the consumer moves
  on to its next position in the same dataset, so the weights hold for used samples.
- *State.* A consumer's whole state is its schedule counts, its per-dataset positions and its skip counters.
  Every batch carries its consumer's state after the batch's last sample; the main process keeps the latest
  per consumer plus which worker comes next (DataLoader serves workers round-robin). Restoring re-seats
  workers so that the first one to be served plays the consumer that was next, so the order of batches, not
  just their contents, continues exactly.
A prompt template is drawn per sample from (seed, dataset, epoch, index), so resumed runs render identically.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stitch.data.collate import Sample, collate
from stitch.data.config import DataConfig
from stitch.data.metadataset import DatasetSpec, load_blend
from stitch.data.packing import pack_greedy_stream
from stitch.data.prompts import PromptLibrary, sample_seed
from stitch.data.skips import SampleError, SkipStats
from stitch.data.sources import Source, open_source
from stitch.errors import DataError

# `load_blend` is `stitch.data.metadataset`'s, re-exported where it has always been found.
__all__ = [
    "load_blend",
    "WeightedSchedule",
    "FeistelPermutation",
    "ConsumerStream",
    "BlendDataset",
    "DataStream",
    "build_train_stream",
]

STATE_VERSION = 1


# --------------------------------------------------------------------------- ordering primitives
class WeightedSchedule:
    """Deterministic weighted interleaving: step t picks argmax_i(w_i * (t + 1) - n_i) (ties: lowest i)."""

    def __init__(self, weights: Sequence[float], counts: Sequence[int] | None = None):
        total = float(sum(weights))
        if total <= 0 or any(w <= 0 for w in weights):
            raise ValueError("weights must be positive")
        self.weights = [w / total for w in weights]
        self.counts = list(counts) if counts is not None else [0] * len(weights)

    def next(self) -> int:
        t = sum(self.counts) + 1
        errors = [w * t - n for w, n in zip(self.weights, self.counts)]
        best = max(range(len(errors)), key=lambda i: (errors[i], -i))
        self.counts[best] += 1
        return best


class FeistelPermutation:
    """A keyed pseudo-random permutation of range(n) in O(1) memory (balanced Feistel net + cycle walking)."""

    ROUNDS = 4

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError("n must be >= 1")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2
        self.half = bits // 2
        self.mask = (1 << self.half) - 1
        self.keys = [sample_seed(key, r) for r in range(self.ROUNDS)]

    def _round(self, x: int, k: int) -> int:
        h = hashlib.blake2b(x.to_bytes(8, "little"), digest_size=8, key=k.to_bytes(8, "little")).digest()
        return int.from_bytes(h, "little") & self.mask

    def _encrypt(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ self._round(right, k)
        return (left << self.half) | right

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(i)
        x = self._encrypt(i)
        while x >= self.n:  # cycle-walk back into range; terminates because encrypt is a bijection
            x = self._encrypt(x)
        return x

    def __len__(self) -> int:
        return self.n


# --------------------------------------------------------------------------- one consumer's samples
class ConsumerStream:
    """The samples of consumer `consumer` (of `num_consumers`): see the module docstring."""

    def __init__(
        self,
        sources: Sequence[Source],
        weights: Sequence[float],
        processor,
        data_cfg: DataConfig,
        seed: int,
        consumer: int,
        num_consumers: int,
        state: dict | None = None,
    ):
        self.sources = list(sources)
        self.names = [s.name for s in self.sources]
        self.processor = processor
        self.cfg = data_cfg
        self.seed = seed
        self.consumer = consumer
        self.num_consumers = num_consumers
        state = state or {}
        self.schedule = WeightedSchedule(weights, state.get("sched"))
        self.pos = list(state.get("pos", [0] * len(self.sources)))
        self.stats = SkipStats.from_state(state.get("stats", {}))
        self._perms: dict[tuple[int, int], FeistelPermutation] = {}

    def state(self) -> dict:
        return {"sched": list(self.schedule.counts), "pos": list(self.pos), "stats": self.stats.state_dict()}

    def index_of(self, d: int, k: int) -> tuple[int, int]:
        """(epoch, record index) of this consumer's k-th draw from dataset d."""
        n = len(self.sources[d])
        epoch, offset = divmod(k * self.num_consumers + self.consumer, n)
        perm = self._perms.get((d, epoch))
        if perm is None:
            if len(self._perms) > 64:
                self._perms.clear()
            perm = self._perms[(d, epoch)] = FeistelPermutation(n, sample_seed(self.seed, self.names[d], epoch))
        return epoch, perm[offset]

    def next_sample(self) -> Sample:
        d = self.schedule.next()
        source, name = self.sources[d], self.names[d]
        failures = 0
        while True:
            if failures >= max(1000, 2 * self.cfg.skip_check_after):
                # Whatever max_skip_fraction says (check mode sets 1.0): a dataset with nothing usable would
                # otherwise loop forever. A consumer sees a random share of each epoch, so this is a count.
                reasons = self.stats.skipped.get(name, {})
                top = ", ".join(f"{r}: {c}" for r, c in sorted(reasons.items(), key=lambda x: -x[1])[:3])
                raise DataError(f"dataset {name}: {failures} samples in a row skipped, nothing usable ({top})")
            epoch, index = self.index_of(d, self.pos[d])
            self.pos[d] += 1
            key = sample_seed(self.seed, name, epoch, index)
            record = None
            try:
                record = source.get(index, key)
                sample = self.processor.encode(
                    record.conversation, record.images, record.videos, max_length=self.cfg.seq_length,
                    dataset=name, key=f"{name}#{index}",
                )
            except SampleError as e:
                if record is not None and record.key and not e.detail.startswith(record.key):
                    e = SampleError(e.reason, f"{record.key}: {e.detail}")  # where the rendered record came from
                failures += 1
                self.stats.record_skip(name, e)
                self.stats.check(name, self.cfg.max_skip_fraction, self.cfg.skip_check_after)
                continue
            self.stats.record_ok(name)
            return sample

    def __iter__(self) -> Iterator[tuple[Sample, dict]]:
        """(sample, state right after it) forever."""
        while True:
            sample = self.next_sample()
            yield sample, self.state()


# --------------------------------------------------------------------------- DataLoader dataset
class BlendDataset(IterableDataset):
    """Batches of one rank, for `torch.utils.data.DataLoader(batch_size=None)`; each worker is a consumer.

    Yields batch dicts (see `stitch.data.collate`) plus `sample_keys` and a private `_stitch_state` entry that
    `DataStream` strips and records.
    """

    def __init__(self, sources, weights, processor, data_cfg: DataConfig, rank: int, world_size: int, seed: int):
        self.sources, self.weights = list(sources), list(weights)
        self.processor, self.cfg = processor, data_cfg
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_slots = max(1, data_cfg.num_workers)
        self.slot_states: dict[int, dict] = {}
        self.rotation = 0

    def consumer(self, slot: int, state: dict | None = None) -> ConsumerStream:
        return ConsumerStream(
            self.sources, self.weights, self.processor, self.cfg, self.seed,
            consumer=self.rank * self.num_slots + slot, num_consumers=self.world_size * self.num_slots,
            state=state,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        slot = (worker + self.rotation) % self.num_slots
        stream = self.consumer(slot, copy.deepcopy(self.slot_states.get(slot)))
        try:
            yield from self._batches(stream, slot)
        except DataError as e:  # re-raised cleanly by DataStream (DataLoader would wrap it in a traceback)
            yield {"_stitch_error": str(e)}

    def _batches(self, stream: ConsumerStream, slot: int) -> Iterator[dict[str, Any]]:
        pad = self.processor.pad_token_id
        if self.cfg.pack:
            groups = pack_greedy_stream(iter(stream), self.cfg.row_tokens)
        else:
            groups = group_fixed(iter(stream), self.cfg.batch_size)
        for samples, state in groups:
            batch = collate(samples, pack=self.cfg.pack, max_tokens=self.cfg.row_tokens, pad_token_id=pad)
            batch["sample_keys"] = [s.key for s in samples]
            batch["_stitch_state"] = (slot, state)
            if get_worker_info() is not None:
                batch = _to_wire(batch)
            yield batch


def group_fixed(stream: Iterator[tuple[Sample, dict]], size: int) -> Iterator[tuple[list[Sample], dict]]:
    """Groups of `size` (sample, state) pairs as (samples, state after the last), for padded batches."""
    while True:
        group, state = [], None
        for _ in range(size):
            sample, state = next(stream)
            group.append(sample)
        yield group, state


def _identity(x):
    return x


# Small tensors cross the worker -> main pipe as numpy arrays (plain pickles); torch would put each in its own
# shared-memory segment, which costs more than the copy for anything but the pixel values.
_WIRE_LIMIT = 1 << 20


def _to_wire(batch: dict[str, Any]) -> dict[str, Any]:
    wire = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.numel() < _WIRE_LIMIT:
            wire[k] = ("__np__", v.numpy())
        else:
            wire[k] = v
    return wire


def _from_wire(batch: dict[str, Any]) -> dict[str, Any]:
    return {
        k: torch.from_numpy(v[1]) if isinstance(v, tuple) and len(v) == 2 and v[0] == "__np__" else v
        for k, v in batch.items()
    }


# --------------------------------------------------------------------------- the trainer's stream
class DataStream:
    """An endless, resumable stream of batches for one rank (see the module docstring)."""

    def __init__(
        self,
        specs: Sequence[DatasetSpec],
        processor,
        data_cfg: DataConfig,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        prompts: PromptLibrary | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        prompts = prompts or PromptLibrary.load(data_cfg.prompts)
        self.specs = list(specs)
        self.sources = [open_source(s, prompts) for s in self.specs]
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise DataError(f"two datasets share a name ({names}); set 'name' on one of them")
        self.cfg = data_cfg
        self.rank, self.world_size, self.seed = rank, world_size, seed
        processor = processor.with_options(
            max_image_pixels=data_cfg.max_image_pixels,
            budget_steps=data_cfg.tile_budgets,
            system_prompt=data_cfg.system_prompt,
            chat_format=data_cfg.chat_format,
            num_frames=data_cfg.num_frames,
            frame_sampling=data_cfg.frame_sampling,
            sample_fps=data_cfg.sample_fps,
            max_frames=data_cfg.max_frames,
            min_frames=data_cfg.min_frames,
            frame_resize=data_cfg.frame_resize,
        )
        self.processor = processor
        self.dataset = BlendDataset(
            self.sources, [s.weight for s in self.specs], processor, data_cfg, rank, world_size, seed
        )
        self.slot_states: dict[int, dict] = {}
        self.next_slot = 0

    @property
    def num_slots(self) -> int:
        return self.dataset.num_slots

    def _fingerprint(self) -> dict:
        return {
            "datasets": [[s.name, len(s), spec.weight] for s, spec in zip(self.sources, self.specs)],
            "world_size": self.world_size,
            "num_slots": self.num_slots,
            "seed": self.seed,
        }

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "rank": self.rank,
            **self._fingerprint(),
            "slots": copy.deepcopy(self.slot_states),
            "next_slot": self.next_slot,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self._fingerprint()
        for k, v in mine.items():
            if state.get(k) != v:
                raise DataError(
                    f"data state does not match this run: {k} was {state.get(k)!r}, now {v!r} "
                    "(resume with the same datasets, world size, num_workers and seed)"
                )
        if state.get("rank") != self.rank:
            raise DataError(f"data state belongs to rank {state.get('rank')}, this is rank {self.rank}")
        self.slot_states = {int(k): v for k, v in copy.deepcopy(state["slots"]).items()}
        self.next_slot = int(state["next_slot"])

    @property
    def stats(self) -> SkipStats:
        total = SkipStats()
        for st in self.slot_states.values():
            total.merge(SkipStats.from_state(st["stats"]))
        return total

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.dataset.slot_states = copy.deepcopy(self.slot_states)
        self.dataset.rotation = self.next_slot
        workers = self.cfg.num_workers
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=workers,
            collate_fn=_identity,
            prefetch_factor=self.cfg.prefetch_factor if workers else None,
            persistent_workers=False,
        )
        for batch in loader:
            batch = _from_wire(batch)
            if "_stitch_error" in batch:
                raise DataError(batch["_stitch_error"])
            slot, state = batch.pop("_stitch_state")
            self.slot_states[slot] = state
            self.next_slot = (slot + 1) % self.num_slots
            yield batch

    def samples(self) -> Iterator[Sample]:
        """Unbatched samples of this rank in the main process (all slots round-robin; for checks and tests).

        Advances the same state as iterating batches with batch_size 1 would.
        """
        streams = {
            slot: self.dataset.consumer(slot, copy.deepcopy(self.slot_states.get(slot)))
            for slot in range(self.num_slots)
        }
        while True:
            slot = self.next_slot
            try:
                sample = streams[slot].next_sample()
            finally:  # a stream that gave up (nothing usable) keeps the counts of what it tried, for the report
                self.slot_states[slot] = streams[slot].state()
            self.next_slot = (slot + 1) % self.num_slots
            yield sample


def build_train_stream(
    data_cfg: DataConfig,
    processor,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    base_dir: str | Path | None = None,
) -> DataStream:
    """The training stream of one rank: datasets from `data_cfg` (blend file or inline list), batches as the
    config says (padded `batch_size` or packed `max_tokens` rows). Relative inline paths resolve against
    `base_dir` (e.g. the training config's folder)."""
    specs = data_cfg.resolve_datasets(base_dir)
    return DataStream(specs, processor, data_cfg, rank=rank, world_size=world_size, seed=seed)

