"""Sampling parameters and a batched, sync-free sampler with per-request parameters.

Why it looks like this:
- Every request in a batch carries its own parameters (greedy next to top-p next to a repetition penalty), so a
  server can batch unrelated requests. The parameters become [B, 1] tensors once per batch; each step is a fixed
  sequence of tensor ops with no host sync and no data-dependent Python, so it can sit next to a CUDA graph.
  Which ops run at all (top-k, top-p, penalty) is decided once per batch from the Python parameters.
- Random numbers come from a counter-based hash of (request seed, step, token id) instead of a shared
  `torch.Generator`. A seeded request therefore samples the same tokens whatever else is in its batch and on
  any device, and the noise needs no generator state (CUDA-graph safe).
- Sampling is the Gumbel-max trick, `argmax(logits / T + Gumbel)`, exact for softmax(logits / T) over the
  tokens top-k/top-p leave, and the same `argmax` as greedy decoding when T = 0.
Order of the logit transforms follows `transformers`: repetition penalty, temperature, top-k, top-p.
"""

from __future__ import annotations

import math
import numbers
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from stitch.errors import StitchError

__all__ = ["SamplingParams", "BatchSampler"]

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. `temperature` 0 (or below 1e-5) is greedy; `stop` strings end generation (and
    are cut)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # HF/CTRL rule: seen tokens' logits divided (>0) or multiplied (<0) by it
    stop: tuple[str, ...] = field(default=())
    seed: int | None = None  # None: a fresh random seed per request
    ignore_eos: bool = False  # benchmarks: always produce max_new_tokens

    def __post_init__(self) -> None:
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        stop = tuple(stop) if isinstance(stop, Iterable) else None
        if stop is None or not all(isinstance(s, str) for s in stop):
            raise StitchError(f"stop must be a string or a list of strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(s for s in stop if s))
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise StitchError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise StitchError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise StitchError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.top_k == -1:  # vLLM's spelling of "off"
            object.__setattr__(self, "top_k", 0)
        if not _is_int(self.top_k) or self.top_k < 0:
            raise StitchError(f"top_k must be an integer >= 0 (0 or -1: off), got {self.top_k!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise StitchError(f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise StitchError(f"seed must be an integer or None, got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            raise StitchError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        """Temperatures this small are greedy decoding: logits / T would overflow float32 (vLLM's rule too)."""
        return self.temperature < GREEDY_BELOW


# Temperatures below this decode greedily (vLLM uses the same bound).
GREEDY_BELOW = 1e-5


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x) -> bool:
    """A finite real number (not a bool, not NaN or infinite)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (x in [0, 2^32) as int64; the multiplier keeps products below 2^63)."""
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def _fold_seed(seed: int) -> int:
    """Any Python int -> 32 bits (both halves of a 64-bit seed count)."""
    seed &= (1 << 64) - 1
    return (seed ^ (seed >> 32)) & _M32


class BatchSampler:
    """Turns a batch's next-token logits into tokens, each row with its own `SamplingParams`.

    `prompts` (the rows' prompt ids, unpadded) seed the repetition-penalty history, as in `transformers`.
    Rows beyond `len(params)` (batch padding for static shapes) decode greedily and are ignored by the caller.
    """

    def __init__(
        self,
        params: Sequence[SamplingParams],
        batch_size: int,
        vocab_size: int,
        device: torch.device,
        prompts: Sequence[torch.Tensor] | None = None,
    ):
        pad = [SamplingParams()] * (batch_size - len(params))
        self.rows = list(params) + pad
        self.device = device
        self.vocab_size = vocab_size
        rng = random.SystemRandom()
        self._seeds = [_fold_seed(p.seed if p.seed is not None else rng.getrandbits(64)) for p in self.rows]
        self._columns()
        self.seen: torch.Tensor | None = None
        if self.use_penalty:
            self.seen = torch.zeros(batch_size, vocab_size, dtype=torch.bool, device=device)
            for row, ids in enumerate(prompts or []):
                self.seen[row, ids.to(device)] = True
        # Per row, the batch step at which a row handed to a later request (`replace_row`) took its step 0.
        self.step_offsets: torch.Tensor | None = None
        self._token_keys: torch.Tensor | None = None

    def _columns(self) -> None:
        """The per-row parameters as [B, 1] device columns, and the switches that skip unused work."""
        rows = self.rows

        def column(values, dtype):
            return torch.tensor(values, dtype=dtype, device=self.device)[:, None]

        self.all_greedy = all(p.greedy for p in rows)
        self.greedy_rows = column([p.greedy for p in rows], torch.bool)
        self.temperature = column([p.temperature if not p.greedy else 1.0 for p in rows], torch.float32)
        self.max_k = max((p.top_k for p in rows if not p.greedy), default=0)
        self.top_k = column([p.top_k if p.top_k and not p.greedy else 0 for p in rows], torch.long)
        self.use_top_p = any(p.top_p < 1.0 and not p.greedy for p in rows)
        self.top_p = column([p.top_p for p in rows], torch.float32)
        self.use_penalty = any(p.repetition_penalty != 1.0 for p in rows)
        self.penalty = column([p.repetition_penalty for p in rows], torch.float32)
        self.seed_keys = _mix32(torch.tensor(self._seeds, dtype=torch.long, device=self.device))[:, None]  # [B, 1]

    def replace_row(self, row: int, params: SamplingParams, history: torch.Tensor, step: int) -> None:
        """Hand `row` to another request mid-batch (continuous batching): its parameters and seed, its
        repetition history (prompt and tokens so far), and `step`, the batch step that is its own step 0, so
        its seeded draws are the ones it gets alone."""
        self.rows[row] = params
        self._seeds[row] = _fold_seed(params.seed if params.seed is not None else random.SystemRandom().getrandbits(64))
        self._columns()
        if self.use_penalty and self.seen is None:
            self.seen = torch.zeros(len(self.rows), self.vocab_size, dtype=torch.bool, device=self.device)
        if self.seen is not None:
            self.seen[row] = False
            self.seen[row, history.to(self.device)] = True
        if self.step_offsets is None:
            self.step_offsets = torch.zeros(len(self.rows), 1, dtype=torch.long, device=self.device)
        self.step_offsets[row] = step

    def _uniform(self, step: int) -> torch.Tensor:
        """[B, V] uniforms in (0, 1) from (seed, the row's own step, token id) alone."""
        if self._token_keys is None:
            vocab = torch.arange(self.vocab_size, device=self.device, dtype=torch.long)
            self._token_keys = _mix32(vocab * 2 + 1)[None]  # [1, V]
        own_step = step if self.step_offsets is None else step - self.step_offsets  # int, or [B, 1]
        step_key = ((own_step + 1) * 0x2545F491) & _M32
        x = _mix32(_mix32(self.seed_keys ^ step_key) ^ self._token_keys)  # [B, V]
        return ((x >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] -> the transformed float32 logits that are sampled from (-inf where filtered)."""
        logits = logits.float()
        if self.use_penalty:
            penalised = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
            logits = torch.where(self.seen, penalised, logits)
        if self.all_greedy:
            return logits
        logits = logits / self.temperature
        neg_inf = torch.finfo(logits.dtype).min
        if self.max_k:
            kth = torch.topk(logits, min(self.max_k, logits.shape[-1]), dim=-1).values  # [B, max_k]
            idx = self.top_k.clamp(min=1, max=kth.shape[-1]) - 1
            threshold = kth.gather(1, idx).masked_fill(self.top_k == 0, neg_inf)  # [B, 1]
            logits = logits.masked_fill(logits < threshold, neg_inf)
        if self.use_top_p:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            # drop a token when the tokens ranked above it already reach top_p (the first one always stays)
            drop_sorted = (probs.cumsum(-1) - probs) >= self.top_p
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            logits = logits.masked_fill(drop, neg_inf)
        return logits

    def __call__(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """Next tokens [B] for decode step `step` (0 = the token after the prompt)."""
        processed = self.process(logits)
        greedy = processed.argmax(-1)
        if self.all_greedy:
            tokens = greedy
        else:
            gumbel = -torch.log(-torch.log(self._uniform(step)))
            sampled = (processed + gumbel).argmax(-1)
            tokens = torch.where(self.greedy_rows[:, 0], greedy, sampled)
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)
        return tokens
