"""Training checkpoints: save, find and restore everything a run needs to continue bit for bit.

Layout of an output folder:

    OUT/checkpoints/step_000100/        a full Stitch checkpoint (config.json, model.safetensors, tokenizer)
        train_state/
            optimizer/                  torch DCP (reshardable: stitch.parallel may load it on another layout)
            rng.safetensors             torch (CPU, CUDA) and numpy generator states
            state.json                  step, data position, counters, python RNG, config (the LR schedule is
                                        recomputed from the step on resume)
    OUT/checkpoints/latest              the name of the newest complete step folder (one line)

Under a parallel layout (`Collective`) every rank writes its share of the same folder: the full weights through
the layout's writer (one `model.safetensors`, or per-stage `tp0_pp{s}/` folders + `layout.json` under pipeline
parallelism, which `stitch.load` merges on read), its optimizer shards into the one DCP checkpoint, and its own
`rank{r}.json` + `rng.rank{r}.safetensors` (data position and RNG states differ per rank). DCP keys are the
unsplit model's names, so such a step folder resumes under another layout or in one process, and a
single-process one under a layout.

A LoRA run's step folder holds `adapter.safetensors` + `trainable.safetensors` + `lora.json` (which points at the
base checkpoint) instead of `model.safetensors`; see `stitch.checkpoint.lora`.

Why it is crash-safe: a step folder is written under a temporary name and renamed into place only when every
file is complete (`stitch.checkpoint.io.atomic_dir`); `latest` is replaced atomically (write + rename) only
after that. So a kill at any instant leaves `latest` naming a complete folder, and a failed save (disk full)
leaves the previous checkpoint untouched. Weights are safetensors, never pickled; DCP stores the optimizer's
few non-tensor hyperparameters its own way.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from stitch.checkpoint.io import atomic_dir, save_tensors
from stitch.checkpoint.lora import write_adapter_files
from stitch.checkpoint.store import model_state
from stitch.errors import CheckpointError
from stitch.models.lora import has_lora
from stitch.parallel.dcp import load_repadded

__all__ = [
    "Collective",
    "TrainState",
    "save_checkpoint",
    "latest_checkpoint",
    "load_train_state",
    "capture_rng",
    "restore_rng",
    "isolated_rng",
    "seed_everything",
    "step_dir_name",
]

STATE_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)$")


@dataclass
class TrainState:
    """The loop's own counters (what is not in the model, optimizer, scheduler or data stream)."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # input tokens consumed (this rank)
    label_tokens: int = 0
    bad_steps: int = 0  # skipped non-finite steps, in all
    bad_in_a_row: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Collective:
    """How the ranks of a parallel run write one checkpoint together (see the module docstring)."""

    rank: int
    barrier: Callable[[], None]
    write_weights: Callable[[Path], None]  # collective: config.json + the full weights into the folder

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def collective_dir(target: Path, collective: Collective):
    """The parallel twin of `atomic_dir`: every rank writes into one partial folder, which rank 0 renames to
    `target` once all ranks are done (a leftover from a killed save is cleared first)."""
    tmp = target.with_name(f".{target.name}.partial")
    if collective.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    collective.barrier()
    yield tmp
    collective.barrier()
    if collective.is_main:
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    collective.barrier()


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _dcp(flatten: bool = True):
    """(dcp, get, set) for optimizer state keyed by parameter names. Flattened, a param group's settings are
    stored per parameter (`param_groups.<name>.lr`) rather than per group index, so ranks whose optimizers
    hold different groups (pipeline stages) write one consistent checkpoint, and any layout reads it back.
    `flatten=False` reads checkpoints written before that."""
    import functools

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    return (dcp, functools.partial(get_optimizer_state_dict, options=options),
            functools.partial(set_optimizer_state_dict, options=options))


def _is_flat(optimizer_dir: Path) -> bool:
    """Whether a DCP optimizer checkpoint keys its param groups by parameter name (see `_dcp`)."""
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(optimizer_dir)).read_metadata().state_dict_metadata
    return not any(re.match(r"optimizer\.param_groups\.\d+\.", k) for k in keys)


# ------------------------------------------------------------------------------------------- RNG
def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors for safetensors, JSON-able rest) of the torch, CUDA, numpy and python generators."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).view(np.int32).copy())
    version, internal, gauss = random.getstate()
    rest = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(internal), gauss]}
    return tensors, rest


def restore_rng(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    kind, pos, has_gauss, cached = rest["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().view(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = rest["python"]
    random.setstate((version, tuple(internal), gauss))


@contextlib.contextmanager
def isolated_rng():
    """Run a block without moving the CPU torch, numpy or python global RNG state."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------- save
def _jsonable(obj: Any) -> Any:
    """Plain JSON types for data states (tuples -> lists, numpy scalars -> numbers)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in state.json")


def save_checkpoint(
    out_dir: str | Path,
    model,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    data_state: dict | None,
    train_config: dict,
    tokenizer=None,
    keep_last: int = 2,
    lora_base: dict[str, str] | None = None,
    collective: Collective | None = None,
) -> Path:
    """Write OUT/checkpoints/step_N atomically, point `latest` at it, prune old step folders; return its path.

    With `collective` every rank of a parallel run calls it (see the module docstring); `optimizer` may be None
    on a rank that trains nothing (a middle pipeline stage in pretraining). The LR schedule is not saved: it is
    a function of the step, recomputed on resume.

    A model with LoRA layers saves only its adapters and trainable modules, with `lora_base` (a
    `stitch.checkpoint.lora.base_reference`) as the pointer to the frozen base weights.
    Raises CheckpointError naming the folder (and saying the previous checkpoint is intact) when writing fails,
    e.g. with the disk full.
    """
    root = Path(out_dir) / "checkpoints"
    target = root / step_dir_name(state.step)
    if collective is not None:
        return _save_collective(root, target, model, optimizer, state, data_state, train_config,
                                tokenizer, keep_last, collective)
    dcp, get_osd, _ = _dcp()
    lora = has_lora(model)
    if lora and lora_base is None:
        raise ValueError("a LoRA model's checkpoint needs lora_base (the base checkpoint it points at)")
    try:
        with atomic_dir(target) as tmp:
            model.config.save(tmp / "config.json")
            if lora:
                write_adapter_files(model, tmp, lora_base)
            else:
                save_tensors(model_state(model), tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            ts = tmp / "train_state"
            ts.mkdir()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
                dcp.save({"optimizer": get_osd(model, optimizer)}, checkpoint_id=str(ts / "optimizer"))
            rng_tensors, rng_rest = capture_rng()
            save_file(rng_tensors, str(ts / "rng.safetensors"))
            payload = _payload(state, data_state, rng_rest, train_config)
            # state.json last: its presence marks a complete train_state even to a reader that skips `latest`.
            (ts / "state.json").write_text(json.dumps(payload, indent=1))
    except OSError as e:
        _raise_save_error(e, root.parent, target)
    _write_latest(root, target.name)
    _prune(root, keep_last, keep=target.name)
    return target


def _payload(state: TrainState, data_state: dict | None, rng_rest: dict, train_config: dict) -> dict:
    return {
        "version": STATE_VERSION,
        "step": state.step,
        "tokens": state.tokens,
        "label_tokens": state.label_tokens,
        "bad_steps": state.bad_steps,
        "bad_in_a_row": state.bad_in_a_row,
        "extra": _jsonable(state.extra),
        "data": _jsonable(data_state) if data_state is not None else None,
        "rng": rng_rest,
        "config": train_config,
    }


def _raise_save_error(e: OSError, out_dir: Path, target: Path):
    previous = latest_checkpoint(out_dir)
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    reason = "disk full" if e.errno == errno.ENOSPC else f"{type(e).__name__}"
    raise CheckpointError(f"{reason} while saving checkpoint {target} ({e}); {kept}") from e


def _save_collective(root: Path, target: Path, model, optimizer, state: TrainState,
                     data_state: dict | None, train_config: dict, tokenizer, keep_last: int,
                     collective: Collective) -> Path:
    """Every rank: weights through the layout's writer, optimizer shards into one DCP checkpoint, its own data
    position and RNG; rank 0 then writes state.json and renames the folder into place (same crash safety as the
    single-process writer: `latest` only ever names a complete folder)."""
    if has_lora(model):
        raise CheckpointError("LoRA checkpoints under a parallel layout are not supported yet (save_final of a "
                              "LoRA run needs one process)")
    dcp, get_osd, _ = _dcp()
    rank = collective.rank
    try:
        with collective_dir(target, collective) as tmp:
            ts = tmp / "train_state"
            ts.mkdir(exist_ok=True)  # every rank: no rank waits on another's mkdir
            collective.write_weights(tmp)
            if collective.is_main and tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            dcp.save({"optimizer": get_osd(model, optimizer) if optimizer is not None else {}},
                     checkpoint_id=str(ts / "optimizer"))
            rng_tensors, rng_rest = capture_rng()
            save_file(rng_tensors, str(ts / f"rng.rank{rank}.safetensors"))
            mine = {"data": _jsonable(data_state) if data_state is not None else None, "rng": rng_rest}
            (ts / f"rank{rank}.json").write_text(json.dumps(mine, indent=1))
            if collective.is_main:  # inside the partial folder, so its presence means nothing until the rename
                payload = _payload(state, data_state, rng_rest, train_config)
                (ts / "state.json").write_text(json.dumps(payload, indent=1))
    except OSError as e:
        _raise_save_error(e, root.parent, target)
    if collective.is_main:
        _write_latest(root, target.name)
        _prune(root, keep_last, keep=target.name)
    return target


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".latest.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / "latest")


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir() and (p / "train_state" / "state.json").exists():
                found.append((int(m.group(1)), p))
    return sorted(found)


def _prune(root: Path, keep_last: int, keep: str) -> None:
    dirs = _step_dirs(root)
    for _, p in dirs[:-keep_last]:
        if p.name != keep:
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The step folder `latest` names, or (pointer missing/stale) the highest complete one; None if none."""
    root = Path(out_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.exists():
        cand = root / pointer.read_text().strip()
        if (cand / "train_state" / "state.json").exists():
            return cand
    dirs = _step_dirs(root)
    return dirs[-1][1] if dirs else None


# ------------------------------------------------------------------------------------------- load
def load_train_state(ckpt: str | Path, model, optimizer: torch.optim.Optimizer | None, scheduler,
                     rank: int = 0) -> tuple[TrainState, dict]:
    """Restore the optimizer from `ckpt/train_state` and put the scheduler at the saved step (the model's weights are
    loaded by the caller from the same folder). Returns (counters, payload); the payload holds the data
    position (`payload["data"]`) and RNG states (`payload["rng"]`, restored later by `restore_rng_from`).

    Under a parallel layout every rank calls it (DCP loads collectively) with its global `rank`: a checkpoint
    saved by as many ranks gives each its own data position and RNG; otherwise (another layout, or one
    process) rank 0's are used and the data stream re-maps its position (`load_state_dict`)."""
    ts = Path(ckpt) / "train_state"
    try:
        payload = json.loads((ts / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ts / 'state.json'}: unreadable training state ({e})") from e
    if payload.get("version") != STATE_VERSION:
        raise CheckpointError(f"{ts / 'state.json'}: state version {payload.get('version')}, expected {STATE_VERSION}")
    try:
        flat = _is_flat(ts / "optimizer")
    except Exception as e:  # a missing or unreadable .metadata
        raise CheckpointError(f"{ts / 'optimizer'}: cannot read the optimizer checkpoint ({e})") from e
    _, get_osd, set_osd = _dcp(flatten=flat)
    osd: dict = {}
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
        osd = get_osd(model, optimizer)  # allocates the state tensors DCP loads into
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            # stitch.parallel's DCP read path: it re-pads ViT heads saved under another vision TP degree.
            load_repadded({"optimizer": osd}, ts / "optimizer", model.config)
    except CheckpointError:
        raise
    except Exception as e:  # DCP raises several types (CheckpointException, RuntimeError, ...)
        raise CheckpointError(f"{ts / 'optimizer'}: cannot load the optimizer state ({e})") from e
    if optimizer is not None:
        set_osd(model, optimizer, osd)
    mine = _rank_file(ts, rank, "rank{}.json")
    if mine is not None:
        payload.update(json.loads(mine.read_text()))
    if scheduler is not None:
        _restore_scheduler(scheduler, payload["step"])
    state = TrainState(
        step=payload["step"], tokens=payload["tokens"], label_tokens=payload["label_tokens"],
        bad_steps=payload["bad_steps"], bad_in_a_row=payload["bad_in_a_row"], extra=payload.get("extra", {}),
    )
    return state, payload


def _restore_scheduler(scheduler, step: int) -> None:
    """Put a LambdaLR at `step`. The schedule is a function of the step alone, so the rates are recomputed
    rather than read back: exact, and right under any layout (a pipeline rank holds other param groups than
    the rank that saved the state)."""
    scheduler.last_epoch = step
    rates = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = lr
    scheduler._last_lr = rates


def _rank_file(ts: Path, rank: int, pattern: str) -> Path | None:
    """This rank's file of a checkpoint saved under a layout; rank 0's when it was saved by fewer ranks (or
    another layout); None for a single-process checkpoint."""
    for r in (rank, 0):
        path = ts / pattern.format(r)
        if path.exists():
            return path
    return None


def restore_rng_from(ckpt: str | Path, payload: dict, rank: int = 0) -> None:
    """Put every RNG back where it was when `ckpt` was saved (call right before the first resumed step)."""
    ts = Path(ckpt) / "train_state"
    path = _rank_file(ts, rank, "rng.rank{}.safetensors") or ts / "rng.safetensors"
    restore_rng(load_file(str(path)), payload["rng"])
