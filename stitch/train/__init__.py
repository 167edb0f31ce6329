"""Training: `stitch train CONFIG.yaml [key=value ...]`.

- `config`: the typed `TrainConfig` (YAML recipes with `base:` inheritance, dotted overrides);
- `stages`: what trains in pretrain / SFT, the parameter table;
- `optim`, `schedule`: AdamW with a group pair per part, warmup + cosine/linear decay to a floor;
- `step`: `train_step` (one token-weighted optimizer step for every layout: one process, or a
  `stitch.parallel.ParallelModel` as a branch inside) and `Distributed` (what a parallel launcher passes);
  `loop`: `Trainer`; `model_setup`: load or random-init, dropout, compile and activation checkpointing;
  `command`: the `stitch train` command; `trainer`: all of these names in one place;
- `state`: atomic checkpoints (safetensors weights + DCP optimizer + RNG/data/scheduler state) and resume;
- `metrics`: the FLOP model (MFU), tokens/s, memory; `log`: JSONL, progress bar, TensorBoard, loss plot;
- `synthetic`: generated data for throughput runs and tests.
"""
