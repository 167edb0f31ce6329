"""Synthetic training data: random tokens and pixels shaped like real VLM samples.

For throughput runs (`stitch train configs/internvl-2b-sft.yaml model.random_init=true synthetic.enabled=true`)
and tests, where no dataset is on disk. A sample is [image tokens..., prompt tokens..., answer tokens...] with
labels on the answer only, and one random tile per image token block, so the model, the loss mask, the FLOP
count and the batch layout are all exercised as with real data. Sample i is a pure function of (seed, i), so
the stream's whole state is one counter and a resumed run sees exactly the batches a straight run would.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from stitch.config import VLMConfig
from stitch.data.blend import group_fixed
from stitch.data.collate import IGNORE_INDEX, Sample, collate
from stitch.data.config import DataConfig
from stitch.data.packing import pack_greedy_stream
from stitch.errors import DataError, StitchConfigError
from stitch.train.config import SyntheticConfig

__all__ = ["SyntheticStream"]


class SyntheticStream:
    """An endless, resumable stream of collated batches (same interface as `stitch.data.blend.DataStream`).

    `rank`/`world_size` split the sample indices between data-parallel ranks (rank r takes r, r + W, ...).
    """

    def __init__(self, cfg: SyntheticConfig, data: DataConfig, model_cfg: VLMConfig, pad_token_id: int = 0,
                 rank: int = 0, world_size: int = 1, seed_offset: int = 0):
        self.cfg, self.data, self.model_cfg = cfg, data, model_cfg
        self.pad_token_id = pad_token_id
        self.rank, self.world_size = rank, world_size
        self.seed = cfg.seed + seed_offset
        self.next_index = 0  # this rank's next draw
        vocab = model_cfg.llm.vocab_size
        self.vocab_limit = min(cfg.vocab_limit or vocab, vocab)
        self.image_token_id = model_cfg.image_token_id
        image_tokens = cfg.images * cfg.tiles * model_cfg.tokens_per_tile
        if image_tokens + 2 > cfg.min_tokens:
            raise StitchConfigError(
                f"synthetic.min_tokens ({cfg.min_tokens}) leaves no room for text after {image_tokens} image "
                f"tokens ({cfg.images} image(s) x {cfg.tiles} tile(s) x {model_cfg.tokens_per_tile})"
            )
        if data.pack and cfg.max_tokens > data.row_tokens:
            raise StitchConfigError(f"synthetic.max_tokens ({cfg.max_tokens}) exceeds a packed row ({data.row_tokens})")

    # ------------------------------------------------------------------ samples
    def sample(self, index: int) -> Sample:
        """Sample `index` (global, before the modulo of `num_samples`)."""
        cfg, mc = self.cfg, self.model_cfg
        if cfg.num_samples is not None:
            index %= cfg.num_samples
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        n = int(torch.randint(cfg.min_tokens, cfg.max_tokens + 1, (1,), generator=g))
        image_tokens = cfg.images * cfg.tiles * mc.tokens_per_tile
        text = n - image_tokens
        answer = max(1, int(round(text * cfg.answer_fraction)))
        ids = torch.randint(0, self.vocab_limit, (n,), generator=g)
        ids[ids == self.image_token_id] = (self.image_token_id + 1) % self.vocab_limit
        ids[:image_tokens] = self.image_token_id
        labels = torch.full((n,), IGNORE_INDEX, dtype=torch.long)
        labels[n - answer :] = ids[n - answer :]
        pixels = None
        tiles = cfg.images * cfg.tiles
        if tiles:
            # Noise drawn at 1/8 resolution and scaled up: as good as full-size noise for a synthetic run,
            # and 64x cheaper to draw, so the data side never slows a GPU throughput measurement.
            size = mc.vision.image_size
            small = torch.randn((tiles, mc.vision.num_channels, -(-size // 8), -(-size // 8)), generator=g)
            pixels = F.interpolate(small, size=(size, size), mode="nearest")
        return Sample(input_ids=ids, labels=labels, pixel_values=pixels, num_tiles=[cfg.tiles] * cfg.images,
                      dataset="synthetic", key=f"synthetic#{index}")

    def _samples(self) -> Iterator[tuple[Sample, dict]]:
        i = self.next_index
        while True:
            yield self.sample(i * self.world_size + self.rank), {"index": i + 1}
            i += 1

    # ------------------------------------------------------------------ batches
    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream = self._samples()
        if self.data.pack:
            groups = pack_greedy_stream(stream, self.data.row_tokens)
        else:
            groups = group_fixed(stream, self.data.batch_size)
        for samples, state in groups:
            batch = collate(samples, pack=self.data.pack, max_tokens=self.data.row_tokens,
                            pad_token_id=self.pad_token_id)
            if not self.data.pack and all(len(s) == len(samples[0]) for s in samples):
                # Equal lengths: no padding, so let attention take its fused causal path.
                batch.pop("attention_mask", None)
            batch["sample_keys"] = [s.key for s in samples]
            self.next_index = state["index"]
            yield batch

    def state_dict(self) -> dict:
        return {"kind": "synthetic", "next_index": self.next_index, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue where the saved stream stopped. Rank r of W reads global samples r, r + W, ...; a state
        saved with another data-parallel size resumes at the same global sample count (rounded up, so no
        sample is seen twice)."""
        if state.get("kind") != "synthetic" or state.get("seed") != self.seed:
            raise DataError(f"data state {state} was not saved by this synthetic stream (seed {self.seed})")
        saved_world = int(state.get("world_size", self.world_size))
        consumed = int(state["next_index"]) * saved_world  # global samples every saved rank had read
        self.next_index = -(-consumed // self.world_size)

