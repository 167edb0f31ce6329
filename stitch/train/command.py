"""`stitch train CONFIG.yaml [key=value ...]`: the command line of a training run (`Trainer` runs it)."""

from __future__ import annotations

import argparse
import os

import torch

from stitch.errors import StitchConfigError
from stitch.parallel.step import trainer_hooks
from stitch.train.config import load_config
from stitch.train.loop import Trainer
from stitch.train.step import Distributed

__all__ = ["train", "train_arguments"]


def train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training recipe (YAML), e.g. configs/tiny-sft.yaml")
    # REMAINDER, so options may come anywhere after the config (argparse would stop at `--out` otherwise).
    parser.add_argument("overrides", nargs=argparse.REMAINDER, metavar="key=value",
                        help="dotted config overrides, e.g. optim.lr=2e-5 train.steps=100 model.random_init=true")
    parser.add_argument("--out", default=None, help="output folder (same as output_dir=...)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _split_options(args: argparse.Namespace) -> list[str]:
    """Pull `--out DIR`, `--out=DIR` and `--print-config` out of the override list."""
    overrides, rest = [], list(args.overrides)
    while rest:
        item = rest.pop(0)
        if item == "--out":
            if not rest:
                raise StitchConfigError("command line: --out needs a folder")
            args.out = rest.pop(0)
        elif item.startswith("--out="):
            args.out = item.split("=", 1)[1]
        elif item == "--print-config":
            args.print_config = True
        elif item.startswith("--"):
            raise StitchConfigError(f"command line: unknown option {item} (overrides are key=value)")
        else:
            overrides.append(item)
    return overrides


def train(args: argparse.Namespace) -> int:
    """Train a model: stage (pretrain, sft, or the preference stages dpo / mpo) and everything else come from the
    YAML recipe.

    Running it again on the same output folder resumes from the latest checkpoint; SIGTERM or Ctrl-C saves a
    checkpoint and exits cleanly. Writes OUT/checkpoints/step_N/, OUT/metrics.jsonl, OUT/loss.png, OUT/final/.

    Example:
      stitch train configs/tiny-sft.yaml output_dir=runs/tiny-sft train.steps=200 optim.lr=1e-3
      stitch train configs/internvl-2b-sft.yaml model.random_init=true synthetic.enabled=true train.steps=50
      stitch train configs/tiny-dpo.yaml "data.datasets=[{path: pairs.jsonl}]"
    """
    overrides = _split_options(args)
    if args.out:
        overrides.append(f"output_dir={args.out}")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    # Before CUDA starts: without expandable segments the caching allocator can fail on fragmentation near a
    # full card (the 8B shape at batch 3 hit out-of-memory with 5 GiB reserved but unallocated, on an H200).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    dist = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: the layout comes from `parallel:`
        dist = Distributed(**trainer_hooks(cfg.parallel))
    Trainer(cfg, dist).fit()  # an interrupted run has saved its checkpoint: a clean exit either way
    # A process that exits with its process group alive can abort in teardown ("terminate called without an
    # active exception" from gloo's threads: seen under load on CPU after a finished run). Only on success: after
    # an error the other ranks may still sit in a collective, and tearing down must not wait for them.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0
