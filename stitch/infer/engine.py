"""The generation engine: batched prefill, then static-shape decode steps over a preallocated KV cache.

How a batch runs:
1. Prompts are left-padded to one length P, so every row's next token lands in the same cache slot and one
   `cache_position` serves the whole batch. `attention_mask` [B, S] marks padding (0) and `position_ids` count
   real tokens only, so a padded row computes exactly what it would alone (batched == unbatched).
2. One prefill forward (images and all) fills cache slots [0, P) and gives the first token; only the last
   position's logits are computed (`logits_to_keep=1`): [B, P, V] logits would be the memory peak.
3. Decode steps feed one token per row. Every step has the same shapes (cache [L, B, H, S, D], mask [B, S],
   tokens/positions [B, 1], cache_position [1]) and is a pure function of those buffers, so it can be
   `torch.compile`d and captured once as a CUDA graph, then replayed. Batch size and cache length are rounded
   up to buckets on CUDA so graphs are reused across calls. A shape's graph is captured after its first
   prefill, once the first tokens are out: capture costs ~0.1 s (far more when compiling), not TTFT's to pay.
4. The host never waits for the step it just launched: step t+1 is queued before the tokens of step t are
   read back (pinned memory, an event), so EOS, stop strings and streaming run while the GPU works. Finished
   rows keep their slot (static shapes) but their tokens are ignored; the batch ends when every row is done.

Seeded sampling does not depend on the batch (see `stitch.infer.sampling`), and a request's greedy output is the
same whatever it is batched with.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from stitch.errors import StitchError
from stitch.infer.prefix_cache import PrefixEntry, PrefixKVCache, request_tile_keys
from stitch.infer.sampling import BatchSampler, SamplingParams
from stitch.infer.text import TextStream
from stitch.models.layers import any_shape_attention
from stitch.models.llm import KVCache

__all__ = ["Request", "Event", "Completion", "Engine", "RequestHandle", "eos_token_ids"]

# End-of-turn tokens of common chat templates: they end generation when the template uses them.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


@dataclass
class Request:
    """One prompt, already tokenised: `input_ids` [T] with image tokens expanded, its tiles, its parameters."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    tile_keys: tuple[bytes, ...] | None = field(default=None, repr=False)  # content hashes, set on first use


@dataclass
class Completion:
    """A finished request. `finish_reason`: "stop" (EOS or a stop string) or "length" (max_new_tokens)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    time_to_first_token: float  # seconds from the start of its batch to its first token on the host

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Event:
    """New output of request `index`: text (empty unless text is tracked) and token ids since the last event.
    The last event of a request has `completion` set."""

    index: int
    text: str
    token_ids: list[int]
    completion: Completion | None = None

    @property
    def finished(self) -> bool:
        return self.completion is not None


def eos_token_ids(model, processor) -> set[int]:
    """Ids that end a reply: the config's and tokenizer's EOS, plus the end-of-turn token of the chat template
    (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3, ...)."""
    ids: set[int] = set()
    cfg_eos = model.config.llm.eos_token_id
    ids.update(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos] if cfg_eos is not None else [])
    tok = processor.tokenizer
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    template = getattr(tok, "chat_template", None) or ""
    vocab = tok.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in template and t in vocab)
    return ids


def _bucket_batch(b: int) -> int:
    """1, 2, 4, 8, then multiples of 16: few distinct graphs, little padding."""
    if b <= 8:
        return 1 << (b - 1).bit_length()
    return -(-b // 16) * 16


def _bucket_len(n: int) -> int:
    """256, 384, 512, 768, 1024, 1536, ...: powers of two and 1.5x between them."""
    size = 256
    while size < n:
        size = size * 3 // 2 if (size & (size - 1)) == 0 else size * 4 // 3
    return size


class _HostCopy:
    """A device tensor on its way to the host without blocking the stream (pinned buffer + event)."""

    def __init__(self, t: torch.Tensor):
        self.event = None
        if t.is_cuda:
            self.buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.buf.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.buf = t.clone()

    def get(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.buf.tolist()


def _row_slots(cache: KVCache, row: int, start: int, stop: int) -> list[torch.Tensor]:
    """Views of slots [start, stop) of one row: every layer's keys, then every layer's values."""
    return [k[row, :, start:stop] for k in cache.k] + [v[row, :, start:stop] for v in cache.v]


def _uncached(request: Request, hit: tuple | None) -> int:
    """Prompt tokens a request must compute: all but its prefix-cache match."""
    return int(request.input_ids.numel()) - (hit[1] if hit is not None else 0)


def _prefill_groups(needs: Sequence[int], rows: int, max_groups: int = 3) -> list[tuple[int, int]]:
    """Row ranges [lo, hi) prefilled together, from rows sorted by the tokens they must compute (`needs`): a
    new group starts where a row needs more than twice the group's first plus 32 (each group is one more
    forward, so near-equal ones stay together), at most `max_groups`. Rows past the requests (bucket padding)
    go with the last group."""
    starts = [0]
    for i, need in enumerate(needs):
        if len(starts) < max_groups and need > 2 * needs[starts[-1]] + 32:
            starts.append(i)
    return list(zip(starts, starts[1:] + [rows]))


def _decode_forward(model, tokens, positions, cache_position, mask, cache) -> torch.Tensor:
    """One decode step: tokens [B, 1] at `positions` [B, 1] into cache slot `cache_position` [1] -> logits [B, V]."""
    llm = model.llm
    hidden = llm(llm.embed_tokens(tokens), positions, mask, None, cache, cache_position)
    return llm.lm_head(hidden[:, -1])


class _DecodeState:
    """Static buffers of one (batch, cache length) shape, and the CUDA graph replaying a decode step on them."""

    def __init__(self, engine: Engine, batch: int, length: int):
        self.engine = engine
        cfg, device = engine.model.config.llm, engine.device
        self.cache = KVCache(cfg, batch, length, device=device, dtype=engine.dtype)
        self.mask = torch.ones(batch, length, dtype=torch.long, device=device)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.cache_position = torch.zeros(1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.busy = False  # a batch is running on these buffers

    def forward(self) -> torch.Tensor:
        return self.engine._decode_fn(
            self.engine.model, self.tokens, self.positions, self.cache_position, self.mask, self.cache
        )

    def capture(self) -> None:
        """Warm up (compiles, autotunes, allocates) on a side stream, then record one step as a graph."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self.forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self.forward()
        self.graph = graph

    def step(self) -> torch.Tensor:
        if self.graph is None:
            return self.forward()
        self.graph.replay()
        return self.logits


class _Row:
    """Host-side bookkeeping of one request in a running batch."""

    def __init__(self, index: int, request: Request, eos: set[int], tokenizer, track_text: bool, start: float):
        self.index = index
        self.params = request.params
        self.prompt_tokens = int(request.input_ids.numel())
        self.eos = set() if request.params.ignore_eos else eos
        self.tokenizer = tokenizer
        self.text = TextStream(tokenizer, request.params.stop) if (track_text or request.params.stop) else None
        self.token_ids: list[int] = []
        self.done = False
        self.start = start
        self.ttft: float | None = None
        # Batch steps whose sampled tokens are this row's: 0 (the prefill) to max_new_tokens - 1, unless it joined
        # a running batch (`Engine._join` moves them).
        self.first_step, self.last_step = 0, request.params.max_new_tokens - 1

    def push(self, token: int) -> Event | None:
        """Take this step's token; returns what is new for the caller (None when nothing is)."""
        if self.done:
            return None
        if self.ttft is None:
            self.ttft = time.perf_counter() - self.start
        new_ids: list[int] = []
        reason = None
        if token in self.eos:
            reason = "stop"
        else:
            self.token_ids.append(token)
            new_ids.append(token)
            if self.text is not None and self.text.add(token):
                reason = "stop"
            elif len(self.token_ids) >= self.params.max_new_tokens:
                reason = "length"
        if reason is None:
            piece = self.text.take() if self.text is not None else ""
            return Event(self.index, piece, new_ids) if (piece or new_ids) else None
        self.done = True
        if self.text is not None:
            self.text.finish()
            piece, final = self.text.take(final=True), self.text.text
        else:
            piece, final = "", self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        completion = Completion(final, self.token_ids, reason, self.prompt_tokens, self.ttft)
        return Event(self.index, piece, new_ids, completion)


class RequestHandle:
    """A request submitted to `Engine.submit`: iterate for its `Event`s, or wait for `result()`."""

    def __init__(self):
        self._events: queue.Queue = queue.Queue()
        self._completion: Completion | None = None
        self._error: BaseException | None = None

    def _put(self, item) -> None:
        self._events.put(item)

    def __iter__(self) -> Iterator[Event]:
        """The request's events as they come (blocking); raises the engine's error if its batch failed."""
        if self._error is not None:
            raise self._error
        if self._completion is not None:
            return
        while True:
            item = self._events.get()
            if isinstance(item, BaseException):
                self._error = item
                raise item
            yield item
            if item.completion is not None:
                self._completion = item.completion
                return

    def result(self) -> Completion:
        for _ in self:
            pass
        assert self._completion is not None
        return self._completion


class Engine:
    """Generates for lists of requests (each with its own `SamplingParams`) in static-shape batches.

    `generate(requests)` returns completions; `stream(requests)` yields `Event`s of all requests interleaved,
    as they are produced; `submit(request)` queues one request from any thread and returns a `RequestHandle`
    (a background thread batches whatever is waiting: what a server needs). `prepare()` turns a conversation and
    images into a `Request` through the processor.

    compile: `torch.compile` the decode step. cuda_graphs: capture decode steps as CUDA graphs (default: on
    CUDA). max_graphs: how many (batch, length) shapes keep their graph and KV cache between calls.
    any_shape_attention: prefill on attention kernels that need no per-shape plan (on by default): every batch
    of prompts brings a new length and tile count, and cuDNN's attention builds a plan for each new shape
    (~70-140 ms, and seconds for the first; `bench/serve_latency.py` measures it), which lands on the time to
    first token. Off: SDPA's own choice, ~1.6x faster attention once a shape has been seen.
    continuous_batching: requests from `submit` join a running batch (a finished or spare row) instead of waiting
    for it to end: each is prefilled alone into its row, its prompt ending where the batch's next token goes.
    Such batches get every row of `max_batch_size` and twice the cache length of their first requests, so later
    ones fit (a prompt longer than the tokens already in the cache, or one that would outrun the cache, waits).
    prefix_cache_bytes: the budget of the prefix KV cache (`stitch.infer.prefix_cache`; 0 = off): a prompt that
    starts like an earlier one (the next turn of a chat about the same image) copies that prefix's keys and
    values instead of recomputing them, and only the rest of the prompt (and no image in the prefix) is run.
    """

    def __init__(
        self,
        model,
        processor,
        *,
        max_batch_size: int = 64,
        compile: bool = False,
        cuda_graphs: bool | None = None,
        max_graphs: int = 4,
        eos_ids: Iterable[int] | None = None,
        batch_wait_s: float = 0.005,
        any_shape_attention: bool = True,
        continuous_batching: bool = False,
        prefix_cache_bytes: int = 1 << 30,
    ):
        self.model = model
        self.processor = processor
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.max_batch_size = max_batch_size
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs needs a model on a CUDA device")
        self._decode_fn = torch.compile(_decode_forward, dynamic=False) if compile else _decode_forward
        self.max_graphs = max_graphs
        self._states: OrderedDict[tuple[int, int], _DecodeState] = OrderedDict()
        self._fingerprint = self._weights_fingerprint()
        self.eos_ids = set(eos_ids) if eos_ids is not None else eos_token_ids(model, processor)
        self.pad_id = processor.pad_token_id
        self.batch_wait_s = batch_wait_s
        self.any_shape_attention = any_shape_attention
        self.continuous_batching = continuous_batching
        self._stop_requested = False  # close() was seen while admitting requests into a running batch
        self._queue: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()
        self._options: tuple = ()  # the options `get_engine` created it with
        if prefix_cache_bytes < 0:
            raise StitchError(f"prefix_cache_bytes must be >= 0 (0 turns the prefix cache off), got "
                              f"{prefix_cache_bytes}")
        cfg = model.config
        self.prefix_cache = PrefixKVCache(prefix_cache_bytes, getattr(cfg, "image_token_id", None),
                                          getattr(cfg, "tokens_per_tile", 1)) if prefix_cache_bytes > 0 else None
        self._prefix_lock = threading.Lock()

    # ------------------------------------------------------------------ requests
    def prepare(self, conversation: Sequence[dict], images: Sequence | None = None,
                params: SamplingParams | None = None, videos: Sequence | None = None,
                num_frames: int | None = None) -> Request:
        """Render `conversation` (with `<image>` / `<video>` placeholders), its images and videos into a
        `Request`; `num_frames` overrides the frames sampled per video. With the prefix cache on, the tiles'
        content hashes are computed here too, outside the engine's thread."""
        processor = self.processor if num_frames is None else self.processor.with_options(num_frames=num_frames)
        sample = processor.encode(list(conversation), list(images or []), list(videos or []),
                                  add_generation_prompt=True)
        request = Request(sample.input_ids, sample.pixel_values, params or SamplingParams())
        if self.prefix_cache is not None:  # hashed here, in the caller's thread (a server's request thread)
            self._tile_keys(request)
        return request

    def generate(self, requests: Sequence[Request], max_batch_size: int | None = None) -> list[Completion]:
        """Run `requests` to completion; completions in request order."""
        out: list[Completion | None] = [None] * len(requests)
        for event in self._run(requests, track_text=False, max_batch_size=max_batch_size):
            if event.completion is not None:
                out[event.index] = event.completion
        return out  # type: ignore[return-value]

    def stream(self, requests: Sequence[Request], max_batch_size: int | None = None) -> Iterator[Event]:
        """`Event`s with text pieces for all `requests`, interleaved; a request's pieces join to its text."""
        yield from self._run(requests, track_text=True, max_batch_size=max_batch_size)

    def check_fits(self, request: Request, what: str = "the request") -> None:
        """A StitchError when the prompt plus its new tokens run past the model's context: positions beyond
        `max_position_embeddings` give output no one trained the model for."""
        context = self.model.config.llm.max_position_embeddings
        prompt, new = int(request.input_ids.numel()), request.params.max_new_tokens
        if prompt + new > context:
            raise StitchError(f"{what}: {prompt} prompt tokens + {new} new tokens exceed the model's context of "
                              f"{context} tokens (shorten the prompt or ask for fewer tokens)")

    def submit(self, request: Request) -> RequestHandle:
        """Queue a request from any thread; a background thread batches waiting requests together. A request
        that does not fit the model's context is refused here (StitchError), before it can join a batch."""
        self.check_fits(request)
        handle = RequestHandle()
        self._queue.put((request, handle))
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._serve_forever, name="stitch-engine", daemon=True)
                self._worker.start()
        return handle

    def close(self) -> None:
        """Stop the background thread (after the batch it is running) and free cached graphs and caches."""
        if self._worker is not None and self._worker.is_alive():
            self._queue.put(None)
            self._worker.join()
        self._worker = None
        self._states.clear()

    def _serve_forever(self) -> None:
        waiting: deque = deque()  # (request, handle) taken from the queue, not running yet
        stop = self._stop_requested = False
        while not (stop and not waiting):
            if not waiting:
                item = self._queue.get()
                if item is None:
                    return
                waiting.append(item)
            deadline = time.perf_counter() + self.batch_wait_s
            while not stop and len(waiting) < self.max_batch_size:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True  # finish what is waiting, then stop
                    break
                waiting.append(nxt)
            batch = [waiting.popleft() for _ in range(min(len(waiting), self.max_batch_size))]
            handles = [h for _, h in batch]  # joined requests are appended: event.index is their place
            try:
                if self.continuous_batching and not stop:
                    admit = functools.partial(self._admit, waiting, handles)
                    events = self._run_batch(list(enumerate(r for r, _ in batch)), True, admit)
                else:
                    events = self._run([r for r, _ in batch], track_text=True)
                for event in events:
                    handles[event.index]._put(event)
            except Exception as e:  # noqa: BLE001 - delivered to every waiting caller
                for h in handles:
                    h._put(e)
            stop = stop or self._stop_requested

    def _admit(self, waiting: deque, handles: list, free: int, cache_position: int, length: int
               ) -> list[tuple[int, Request]]:
        """Up to `free` waiting requests that fit a running batch whose next token goes to cache slot
        `cache_position` of `length`: the prompt fits before it, the new tokens after it. First come, first in;
        one that does not fit keeps its place for the next batch."""
        while not self._stop_requested:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._stop_requested = True
            else:
                waiting.append(item)
        joining, keep = [], deque()
        for request, handle in waiting:
            prompt, new = int(request.input_ids.numel()), request.params.max_new_tokens
            if len(joining) < free and prompt <= cache_position and cache_position + new - 1 <= length:
                joining.append((len(handles), request))
                handles.append(handle)
            else:
                keep.append((request, handle))
        waiting.clear()
        waiting.extend(keep)
        return joining

    # ------------------------------------------------------------------ batching
    def _run(self, requests: Sequence[Request], track_text: bool, max_batch_size: int | None = None
             ) -> Iterator[Event]:
        """Split into batches of at most `max_batch_size`, similar lengths together (less padding)."""
        for i, request in enumerate(requests):
            self.check_fits(request, f"request {i}")
        size = max_batch_size or self.max_batch_size
        order = sorted(range(len(requests)), key=lambda i: requests[i].input_ids.numel())
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            yield from self._run_batch([(i, requests[i]) for i in chunk], track_text)

    def _weights_fingerprint(self) -> tuple:
        return tuple(p.data_ptr() for p in self.model.parameters())

    def _state(self, batch: int, length: int) -> _DecodeState:
        """Buffers for this shape: fresh ones in eager mode, cached (with their CUDA graph) otherwise.

        A cached state already running a batch (a `generate` inside a `stream` loop, or another thread) is not
        shared: that call gets fresh eager buffers instead."""
        if not self.cuda_graphs:
            return _DecodeState(self, batch, length)
        with self._lock:
            fingerprint = self._weights_fingerprint()
            if fingerprint != self._fingerprint:  # weights moved (to(), load_state_dict(assign=True)): graphs stale
                self._states = OrderedDict((k, s) for k, s in self._states.items() if s.busy)
                self._fingerprint = fingerprint
            key = (batch, length)
            state = self._states.get(key)
            if state is not None:
                if state.busy:
                    return _DecodeState(self, batch, length)
                self._states.move_to_end(key)
                state.busy = True
                return state
            idle = [k for k, s in self._states.items() if not s.busy]
            for old in idle[: max(0, len(self._states) - self.max_graphs + 1)]:
                del self._states[old]  # least recently used first
            state = _DecodeState(self, batch, length)
            state.busy = True
            self._states[key] = state
        return state

    def _capture(self, state: _DecodeState) -> None:
        """Record `state`'s decode step as a CUDA graph (once per cached state). Called after the prefill, so the
        first token does not wait for it: capturing runs three eager steps first (~0.1 s for the 2B shape, tens
        of seconds when compiling). Their key/value writes go to the slot the first real step overwrites."""
        try:
            state.capture()
        except BaseException:
            with self._lock:
                if self._states.get(key := tuple(state.mask.shape)) is state:
                    del self._states[key]
            raise

    def _run_batch(self, batch: list[tuple[int, Request]], track_text: bool, admit: Callable | None = None
                   ) -> Iterator[Event]:
        """Prefill + decode one batch; yields events (outside inference mode, so nothing leaks to the caller).
        `admit(free_rows, cache_position, length)`: requests to join the running batch (continuous batching)."""
        was_training = self.model.training
        self.model.eval()
        start = time.perf_counter()
        prompt_len = max(int(r.input_ids.numel()) for _, r in batch)
        steps = max(r.params.max_new_tokens for _, r in batch)
        size, length = len(batch), prompt_len + steps
        if admit is not None:  # room for requests that join later
            size, length = max(size, self.max_batch_size), 2 * length
        if self.cuda_graphs:
            size, length = _bucket_batch(size), _bucket_len(length)
        state = None
        try:
            with torch.inference_mode():
                state = self._state(size, length)
                hits = self._prefix_lookup([r for _, r in batch])
                # Rows in order of the tokens they must compute, so that similar ones prefill together.
                order = sorted(range(len(batch)), key=lambda i: _uncached(batch[i][1], hits[i]))
                batch, hits = [batch[i] for i in order], [hits[i] for i in order]
                sampler, tok = self._prefill(state, batch, hits, spare_rows_empty=admit is not None)
            rows: list[_Row | None] = [_Row(i, r, self.eos_ids, self.processor.tokenizer, track_text, start)
                                       for i, r in batch]
            rows += [None] * (size - len(rows))
            pending: _HostCopy | None = _HostCopy(tok)
            with torch.inference_mode():  # copies queued after the first tokens': not on their critical path
                snapshots = self._prefix_snapshot(state.cache, [(i, r, prompt_len) for i, (_, r) in enumerate(batch)])
            if self.cuda_graphs and state.graph is None and steps > 1:
                # A shape without its graph yet: hand out the first tokens, then capture.
                yield from self._push(rows, pending.get(), 0)
                snapshots = self._prefix_insert(snapshots)
                if all(row is None or row.done for row in rows):
                    return
                with torch.inference_mode():
                    self._capture(state)
                pending = None
            pending_step, step = 0, 1
            while True:
                slot = prompt_len + step - 1  # the cache slot step `step` writes
                if admit is not None and slot < length:
                    tok = yield from self._join(state, sampler, rows, tok, step, slot, admit, track_text)
                last = max((row.last_step for row in rows if row is not None and not row.done), default=0)
                nxt = None
                if step <= last and slot < length:
                    with torch.inference_mode():  # queue the next step before reading this one back
                        state.tokens.copy_(tok[:, None])
                        tok = sampler(state.step(), step)
                        state.positions.add_(1)
                        state.cache_position.add_(1)
                        nxt = _HostCopy(tok)
                if pending is not None:
                    yield from self._push(rows, pending.get(), pending_step)
                if snapshots:  # hashing images and the bookkeeping wait until the first tokens are out
                    snapshots = self._prefix_insert(snapshots)
                if nxt is None or all(row is None or row.done for row in rows):
                    break
                pending, pending_step, step = nxt, step, step + 1
            self._prefix_insert(snapshots)  # a batch whose every row ended at its first token
        finally:
            if state is not None:
                state.busy = False
            self.model.train(was_training)

    @staticmethod
    def _push(rows: list[_Row | None], tokens: list[int], step: int) -> list[Event]:
        """The tokens batch step `step` sampled, as the events of the rows they belong to."""
        return [e for row, t in zip(rows, tokens)
                if row is not None and row.first_step <= step and (e := row.push(t)) is not None]

    def _join(self, state: _DecodeState, sampler: BatchSampler, rows: list[_Row | None], tok: torch.Tensor,
              step: int, slot: int, admit: Callable, track_text: bool) -> Generator[Event, None, torch.Tensor]:
        """Give finished and spare rows to requests `admit` lets in before step `step`, which writes cache slot
        `slot`: each prompt is prefilled alone into its row's cache at the slots just before `slot`, its first
        token is handed out and becomes the row's input to step `step`. Returns the batch's next input tokens."""
        free = [r for r, row in enumerate(rows) if row is None or row.done]
        if not free:
            return tok
        for r, (index, request) in zip(free, admit(len(free), slot, state.mask.shape[1])):
            with torch.inference_mode():
                first = self._prefill_row(state, r, request, slot)
                history = torch.cat([request.input_ids.reshape(-1), first.cpu()])
                sampler.replace_row(r, request.params, history, step - 1)
                tok[r] = first[0]
            row = _Row(index, request, self.eos_ids, self.processor.tokenizer, track_text, time.perf_counter())
            row.first_step, row.last_step = step, step + request.params.max_new_tokens - 2
            rows[r] = row
            if (event := row.push(int(first[0]))) is not None:
                yield event
        return tok

    def _prefill_row(self, state: _DecodeState, row: int, request: Request, slot: int) -> torch.Tensor:
        """Run one prompt into row `row` of a running batch, ending just before cache slot `slot` (the slots
        before it are masked out), and sample its first token ([1])."""
        device, n = self.device, int(request.input_ids.numel())
        state.mask[row, : slot - n] = 0
        state.mask[row, slot - n :] = 1
        state.positions[row] = n
        pixels = request.pixel_values
        pixels = pixels.to(device) if pixels is not None and pixels.numel() else None
        hits = self._prefix_lookup([request])
        if hits[0] is not None:
            logits = self._resume_logits(state.cache.rows(row, row + 1), state.mask[row : row + 1], [request],
                                         hits, slot, n - hits[0][1])
        else:
            if self.prefix_cache is not None:
                self.prefix_cache.misses += 1
            logits = self._prompt_logits(request.input_ids.reshape(1, -1), pixels, torch.arange(n)[None],
                                         state.cache.rows(row, row + 1), slot - n)
        sampler = BatchSampler([request.params], 1, logits.shape[-1], device, [request.input_ids.reshape(-1)])
        first = sampler(logits, 0)
        self._prefix_insert(self._prefix_snapshot(state.cache, [(row, request, slot)]))
        return first

    def _prompt_logits(self, ids: torch.Tensor, pixel_values: torch.Tensor | None, position_ids: torch.Tensor,
                       cache: KVCache, first_slot: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Last-position logits [rows, V] of prompts written into `cache` from slot `first_slot` on; attention
        runs over the prompts' own keys (`fresh_cache`), on the engine's choice of attention kernels."""
        device = self.device
        with any_shape_attention(self.model, self.any_shape_attention):
            out = self.model(
                ids.to(device), pixel_values, attention_mask=attention_mask, position_ids=position_ids.to(device),
                kv_cache=cache, cache_position=torch.arange(first_slot, first_slot + ids.shape[1], device=device),
                logits_to_keep=1, fresh_cache=True,
            )
        return out.logits[:, -1]

    def _prefill(self, state: _DecodeState, batch: list[tuple[int, Request]],
                 hits: Sequence[tuple[PrefixEntry, int] | None], spare_rows_empty: bool = False
                 ) -> tuple[BatchSampler, torch.Tensor]:
        """Left-pad the prompts into `state`'s cache and mask, run them (images and all) and sample the first
        token of every row; leaves `state.positions`/`cache_position` pointing at that token.

        `hits`: each row's prefix-cache match (`_prefix_lookup`), rows sorted by their uncached tokens. Without
        any, one forward over all prompts. With some, up to three, over groups of rows whose uncached tails are
        of similar length (`_prefill_groups`), each computing only its own longest tail: one long miss would
        otherwise make every row recompute its whole prefix.

        Rows beyond the batch (bucket padding) run as all-padding rows, or with `spare_rows_empty` (continuous
        batching keeps them for requests that join) not at all: their mask is all ones, so their idle decode
        steps attend to something and stay finite."""
        device = self.device
        size, length = state.mask.shape
        lengths = [int(r.input_ids.numel()) for _, r in batch]
        prompt_len = max(lengths)
        run = len(batch) if spare_rows_empty else size  # rows prefilled
        # [pad ... pad, prompt] per row
        ids = torch.full((run, prompt_len), self.pad_id, dtype=torch.long)
        mask = torch.ones(size, length, dtype=torch.long)
        mask[:run, :prompt_len] = 0
        for row, ((_, req), n_tok) in enumerate(zip(batch, lengths)):
            ids[row, prompt_len - n_tok :] = req.input_ids.reshape(-1)
            mask[row, prompt_len - n_tok : prompt_len] = 1
        state.mask.copy_(mask)
        cache = state.cache if run == size else state.cache.rows(0, run)
        if any(hit is not None for hit in hits):
            needs = [_uncached(r, h) for (_, r), h in zip(batch, hits)]
            parts = []
            for lo, hi in _prefill_groups(needs, run):
                # The group's rows run their last `window` slots; tokens before them come from the cache.
                parts.append(self._resume_logits(state.cache.rows(lo, hi), state.mask[lo:hi],
                                                 [r for _, r in batch[lo:hi]], hits[lo:hi], prompt_len,
                                                 max(needs[lo:hi])))
            logits = torch.cat(parts)
        else:
            if self.prefix_cache is not None:
                self.prefix_cache.misses += len(batch)
            position_ids = (mask[:run, :prompt_len].cumsum(-1) - 1).clamp(min=0)
            tiles = [r.pixel_values for _, r in batch if r.pixel_values is not None and r.pixel_values.numel()]
            pixel_values = torch.cat([t.to(device) for t in tiles]) if tiles else None
            # The cache is empty: attention runs over the prompt's own keys, with no mask at all (the fused
            # causal kernel) when no row is padded.
            padded = run > len(batch) or min(lengths) < prompt_len
            logits = self._prompt_logits(ids, pixel_values, position_ids, cache, 0,
                                         state.mask[:run] if padded else None)
        if run < size:
            logits = torch.cat([logits, logits.new_zeros(size - run, logits.shape[-1])])
        sampler = BatchSampler(
            [r.params for _, r in batch], size, logits.shape[-1], device, [r.input_ids for _, r in batch]
        )
        tok = sampler(logits, 0)
        state.positions.copy_(torch.tensor(lengths + [0] * (size - len(batch)), device=device)[:, None])
        state.cache_position.fill_(prompt_len)
        return sampler, tok

    # ------------------------------------------------------------------ prefix cache
    def _prefix_fingerprint(self) -> tuple:
        """What the cached KV was computed with: the weights' storage and in-place version counters (an
        optimizer step bumps them), and which LoRA adapters are on (`adapters_disabled` flips them)."""
        params = list(self.model.parameters())
        try:
            version = sum(p._version for p in params)
        except RuntimeError:  # inference tensors have no version counter (and cannot change outside inference)
            version = None
        adapters = tuple(m.adapter_enabled for m in self.model.modules() if hasattr(m, "adapter_enabled"))
        return tuple(p.data_ptr() for p in params), version, adapters

    def _tile_keys(self, request: Request) -> tuple[bytes, ...]:
        if request.tile_keys is None:
            request.tile_keys = request_tile_keys(request.pixel_values)
        return request.tile_keys

    def _prefix_lookup(self, requests: Sequence[Request]) -> list[tuple[PrefixEntry, int] | None]:
        """Each request's longest cached prefix (entry, tokens; at most all but its last token) or None. All
        None when the cache is off or a request's image tokens do not match its tiles (the plain prefill then
        raises the model's error)."""
        cache = self.prefix_cache
        none: list[tuple[PrefixEntry, int] | None] = [None] * len(requests)
        if cache is None:
            return none
        with self._prefix_lock:
            cache.check(self._prefix_fingerprint())
            hits = []
            for request in requests:
                ids = request.input_ids.reshape(-1)
                if not self._tiles_match_tokens(request):
                    return none
                keys = functools.partial(self._tile_keys, request)  # hashed only if a match reaches an image
                hits.append(cache.lookup(ids, keys, int(ids.numel()) - 1) if len(cache) else None)
        return hits

    def _tiles_match_tokens(self, request: Request) -> bool:
        """Its image tokens are its tiles x tokens_per_tile (what the prefix cache's tile bookkeeping assumes)."""
        cache = self.prefix_cache
        assert cache is not None
        if cache.image_token_id is None:
            return True
        pixels = request.pixel_values
        tiles = int(pixels.shape[0]) if pixels is not None and pixels.numel() else 0
        return int((request.input_ids == cache.image_token_id).sum()) == tiles * cache.tokens_per_tile

    def _prefix_snapshot(self, cache: KVCache, rows: Sequence[tuple[int, Request, int]]
                         ) -> list[tuple[Request, torch.Tensor]]:
        """Copies of the KV of each (row, request, end), whose prompt sits in cache slots [end - n, end), for
        `_prefix_insert`: device copies, queued without waiting."""
        store = self.prefix_cache
        if store is None:
            return []
        out = []
        for row, request, end in rows:
            n = int(request.input_ids.numel())
            if (store.min_tokens <= n and n * self._kv_bytes_per_token() <= store.max_bytes
                    and self._tiles_match_tokens(request)):
                out.append((request, torch.stack(_row_slots(cache, row, end - n, end)).unflatten(0, (2, -1))))
        return out

    def _prefix_insert(self, snapshots: list[tuple[Request, torch.Tensor]]) -> list:
        """Store snapshots in the prefix cache (hashing their tiles); returns [] (nothing left to insert)."""
        for request, kv in snapshots:
            keys = self._tile_keys(request)
            with self._prefix_lock:
                self.prefix_cache.store(request.input_ids.reshape(-1), keys, kv)
        return []

    def _kv_bytes_per_token(self) -> int:
        cfg = self.model.config.llm
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.finfo(self.dtype).bits // 8

    def _resume_logits(self, cache: KVCache, mask: torch.Tensor, requests: Sequence[Request],
                       hits: Sequence[tuple[PrefixEntry, int] | None], end: int, window: int) -> torch.Tensor:
        """Last-position logits [rows, V] of prompts that end at cache slot `end` (left-padded, `mask` [rows, L]
        marks their slots), computing only the last `window` slots: each row's tokens before them are copied
        from its prefix-cache entry, and the window attends to them through the cache.

        Rows share one window (one `cache_position` for the batch), so a row that needs fewer new tokens
        recomputes a few of its cached ones (the same values) and a row shorter than the window is padding
        there. Only the tiles with tokens in the window go through the vision encoder."""
        device, llm, store = self.device, self.model.llm, self.prefix_cache
        assert store is not None
        image_id, per_tile = store.image_token_id, store.tokens_per_tile
        rows = mask.shape[0]
        ids = torch.full((rows, window), self.pad_id, dtype=torch.long)
        positions = torch.zeros(rows, window, dtype=torch.long)
        tiles, spans = [], []  # tiles to encode; per row (their tokens, tokens in the window)
        for r, (request, hit) in enumerate(zip(requests, hits)):
            full = request.input_ids.reshape(-1)
            n = int(full.numel())
            keep = n - window  # tokens before the window, all from the cache
            if keep > 0:
                assert hit is not None and hit[1] >= keep
                start = end - n
                dst = _row_slots(cache, r, start, start + keep)
                torch._foreach_copy_(dst, list(hit[0].kv[..., :keep, :].flatten(0, 1).unbind(0)))
                store.hits += 1
                store.reused_tokens += keep
            else:
                store.misses += 1
            toks = full[max(0, keep) :]
            ids[r, window - toks.numel() :] = toks
            positions[r, window - toks.numel() :] = torch.arange(max(0, keep), n)
            in_window = int((toks == image_id).sum()) if image_id is not None else 0
            if in_window:
                count = -(-in_window // per_tile)
                tiles.append(request.pixel_values[-count:])
                spans.append((count * per_tile, in_window))
        ids = ids.to(device)
        embeds = llm.embed_tokens(ids)
        if tiles:
            image = self.model.image_embeddings(torch.cat([t.to(device) for t in tiles]))
            parts, at = [], 0
            for total, used in spans:  # a row's window holds the last `used` image tokens of its tiles
                parts.append(image[at + total - used : at + total])
                at += total
            embeds = embeds.masked_scatter((ids == image_id)[..., None], torch.cat(parts).to(embeds.dtype))
        with any_shape_attention(self.model, self.any_shape_attention):
            hidden = llm(embeds, positions.to(device), mask[:, :end], None, cache.slots(end),
                         torch.arange(end - window, end, device=device))
        return llm.lm_head(hidden[:, -1])
