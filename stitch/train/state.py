"""Training checkpoints: save, find and restore everything a run needs to continue bit for bit.

Layout of an output folder:

    OUT/checkpoints/step_000100/        a full Stitch checkpoint (config.json, model.safetensors, tokenizer)
        train_state/
            optimizer/                  torch DCP (reshardable: stitch.parallel may load it on another layout)
            rng.safetensors             torch (CPU, CUDA) and numpy generator states
            state.json                  step, scheduler, data position, counters, python RNG, config
    OUT/checkpoints/latest              the name of the newest complete step folder (one line)

A LoRA run's step folder holds `adapter.safetensors` + `trainable.safetensors` + `lora.json` (which points at the
base checkpoint) instead of `model.safetensors`; see `stitch.train.lora`.

Why it is crash-safe: a step folder is written under a temporary name and renamed into place only when every
file is complete (`stitch.checkpoint.io.atomic_dir`); `latest` is replaced atomically (write + rename) only
after that. So a kill at any instant leaves `latest` naming a complete folder, and a failed save (disk full)
leaves the previous checkpoint untouched. Weights are safetensors, never pickled; DCP stores the optimizer's
few non-tensor hyperparameters its own way.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from stitch.checkpoint.io import atomic_dir, save_tensors
from stitch.checkpoint.store import model_state
from stitch.errors import CheckpointError

__all__ = [
    "TrainState",
    "save_checkpoint",
    "latest_checkpoint",
    "load_train_state",
    "capture_rng",
    "restore_rng",
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


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _dcp():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    return dcp, get_optimizer_state_dict, set_optimizer_state_dict


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


# ------------------------------------------------------------------------------------------- save
def _jsonable(obj: Any) -> Any:
    """Plain JSON types for scheduler/data states (tuples -> lists, numpy scalars -> numbers)."""
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


def _scheduler_state(scheduler) -> dict:
    state = dict(scheduler.state_dict())
    state.pop("lr_lambdas", None)  # the schedule's shape comes from the config, not the checkpoint
    return state


def save_checkpoint(
    out_dir: str | Path,
    model,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: TrainState,
    data_state: dict | None,
    train_config: dict,
    tokenizer=None,
    keep_last: int = 2,
    lora_base: dict[str, str] | None = None,
) -> Path:
    """Write OUT/checkpoints/step_N atomically, point `latest` at it, prune old step folders; return its path.

    A model with LoRA layers saves only its adapters and trainable modules, with `lora_base` (a
    `stitch.train.lora.base_reference`) as the pointer to the frozen base weights.
    Raises CheckpointError naming the folder (and saying the previous checkpoint is intact) when writing fails,
    e.g. with the disk full.
    """
    root = Path(out_dir) / "checkpoints"
    target = root / step_dir_name(state.step)
    dcp, get_osd, _ = _dcp()
    from stitch.train.lora import has_lora, write_adapter_files

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
            payload = {
                "version": STATE_VERSION,
                "step": state.step,
                "tokens": state.tokens,
                "label_tokens": state.label_tokens,
                "bad_steps": state.bad_steps,
                "bad_in_a_row": state.bad_in_a_row,
                "extra": _jsonable(state.extra),
                "scheduler": _jsonable(_scheduler_state(scheduler)),
                "data": _jsonable(data_state) if data_state is not None else None,
                "rng": rng_rest,
                "config": train_config,
            }
            # state.json last: its presence marks a complete train_state even to a reader that skips `latest`.
            (ts / "state.json").write_text(json.dumps(payload, indent=1))
    except OSError as e:
        previous = latest_checkpoint(out_dir)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        reason = "disk full" if e.errno == errno.ENOSPC else f"{type(e).__name__}"
        raise CheckpointError(f"{reason} while saving checkpoint {target} ({e}); {kept}") from e
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
def load_train_state(ckpt: str | Path, model, optimizer: torch.optim.Optimizer, scheduler) -> tuple[TrainState, dict]:
    """Restore optimizer and scheduler from `ckpt/train_state` into the live objects (the model's weights are
    loaded by the caller from the same folder). Returns (counters, payload); the payload holds the data
    position (`payload["data"]`) and RNG states (`payload["rng"]`, restored later by `restore_rng_from`)."""
    ts = Path(ckpt) / "train_state"
    try:
        payload = json.loads((ts / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ts / 'state.json'}: unreadable training state ({e})") from e
    if payload.get("version") != STATE_VERSION:
        raise CheckpointError(f"{ts / 'state.json'}: state version {payload.get('version')}, expected {STATE_VERSION}")
    dcp, get_osd, set_osd = _dcp()
    optimizer.zero_grad(set_to_none=True)
    osd = get_osd(model, optimizer)  # allocates the state tensors DCP loads into
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load({"optimizer": osd}, checkpoint_id=str(ts / "optimizer"))
    except Exception as e:  # DCP raises several types (CheckpointException, RuntimeError, ...)
        raise CheckpointError(f"{ts / 'optimizer'}: cannot load the optimizer state ({e})") from e
    set_osd(model, optimizer, osd)
    sched = dict(payload["scheduler"])
    sched["lr_lambdas"] = [None] * len(optimizer.param_groups)
    scheduler.load_state_dict(sched)
    state = TrainState(
        step=payload["step"], tokens=payload["tokens"], label_tokens=payload["label_tokens"],
        bad_steps=payload["bad_steps"], bad_in_a_row=payload["bad_in_a_row"], extra=payload.get("extra", {}),
    )
    return state, payload


def restore_rng_from(ckpt: str | Path, payload: dict) -> None:
    """Put every RNG back where it was when `ckpt` was saved (call right before the first resumed step)."""
    restore_rng(load_file(str(Path(ckpt) / "train_state" / "rng.safetensors")), payload["rng"])
