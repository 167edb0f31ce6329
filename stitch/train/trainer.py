"""`stitch train`: stages, optimiser, schedule, the loop, checkpoints, resume, logging.

This module gathers the names of a training run from where they live, so `from stitch.train.trainer import ...`
keeps working:

- `stitch.train.step`: `train_step` (one optimizer step over a list of micro-batches, token-weighted over the
  global batch, for every layout), `StepResult`, and `Distributed` (what a parallel launcher passes);
- `stitch.train.loop`: `Trainer` (everything around the step: model, stage, data, schedule, logging, evaluation,
  checkpoints, resume, signals) and `TrainingError`;
- `stitch.train.model_setup`: loading or random-initialising the model, dropout, compile and activation
  checkpointing;
- `stitch.train.command`: the `stitch train` command (`train`, `train_arguments`).
"""

from __future__ import annotations

from stitch.train.command import train, train_arguments
from stitch.train.loop import Trainer, TrainingError
from stitch.train.metrics import RunSummary
from stitch.train.model_setup import (
    batch_shapes_vary,
    build_training_model,
    configure_layers,
    init_for_training,
    set_dropout,
)
from stitch.train.state import isolated_rng, seed_everything
from stitch.train.step import (
    MODEL_INPUTS,
    Distributed,
    StepResult,
    _to_device,
    count_label_tokens,
    mask_is_redundant,
    train_step,
)

__all__ = ["train", "train_arguments", "train_step", "StepResult", "Trainer", "Distributed", "TrainingError",
           "count_label_tokens", "MODEL_INPUTS", "RunSummary", "batch_shapes_vary", "build_training_model",
           "configure_layers", "init_for_training", "set_dropout", "mask_is_redundant", "seed_everything",
           "isolated_rng", "_to_device"]
