"""Run under torchrun (gloo, CPU) by test_preference_layouts.py: MPO steps of the tiny VLM under several layouts.

    torchrun --nproc_per_node 2 -m tests.parallel.preference_worker OUT

For each layout it writes OUT/<name>.json (per-step loss, gradient norm and metrics, from global rank 0) and
OUT/<name>.pp<p>.safetensors (the full weights of stage p afterwards, from that stage's dp0/tp0 rank).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from stitch.layout import from_live_shape
from stitch.parallel import parallelize
from tests.parallel.common import tiny_config
from tests.parallel.preference_common import micro_batches, run, setup

DEVICE = torch.device(os.environ["STITCH_TEST_DEVICE"]) if os.environ.get("STITCH_TEST_DEVICE") else None
LAYOUTS: list[tuple[str, str, dict]] = [
    ("dp2", "copy", {"dp": 2, "fsdp": True}),
    ("tp2", "copy", {"tp": 2}),
    ("pp2", "copy", {"pp": 2, "pp_schedule": "1f1b"}),
    ("dp2_lora", "lora", {"dp": 2, "fsdp": True}),
    ("dp2_bf16_reference", "bf16", {"dp": 2, "fsdp": True}),
]


def train(name: str, kind: str, layout: dict, out: Path) -> None:
    model, objective = setup(kind, DEVICE or torch.device("cpu"))
    pm = parallelize(model, layout, device=DEVICE)
    objective.reference.parallelize(lambda m: parallelize(m, layout, device=DEVICE), pm)
    cfg = tiny_config()
    records = run(pm, objective, lambda step: micro_batches(cfg, step, pm.dp_rank, pm.dp_size),
                  [p for p in pm.parameters() if p.requires_grad], pm.device)
    state = get_model_state_dict(pm.model, options=StateDictOptions(full_state_dict=True))
    padded = pm.layout.padded_heads(cfg)
    state = {k: from_live_shape(k, v, cfg, padded).contiguous().cpu() for k, v in state.items()}
    if pm.dp_rank == 0 and pm.pmesh.tp_rank == 0:
        save_file(state, str(out / f"{name}.pp{pm.pmesh.pp_rank}.safetensors"))
    if dist.get_rank() == 0:
        (out / f"{name}.json").write_text(json.dumps({"records": records, "layout": pm.layout.describe()}))
    dist.barrier()


def main() -> None:
    out = Path(sys.argv[1])
    torch.backends.cuda.matmul.allow_tf32 = False
    names = sys.argv[2:]
    for name, kind, layout in LAYOUTS:
        if not names or name in names:
            train(name, kind, layout, out)
    dist.destroy_process_group()
    os._exit(0)  # gloo can abort in its thread teardown at exit (see tests/train/test_dist_step.py)


if __name__ == "__main__":
    main()
