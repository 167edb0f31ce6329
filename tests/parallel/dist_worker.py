"""Run under torchrun (gloo, CPU) by tests/parallel: train the tiny VLM under several layouts in one launch.

    torchrun --nproc_per_node N -m tests.parallel.dist_worker OUT SCENARIO [SCENARIO ...]

For each layout it writes OUT/<name>.json (losses, from global rank 0) and OUT/<name>.pp<p>.safetensors (the
full, unpadded weights of stage p, from that stage's dp0/tp0 rank); pytest compares them with a single-process
reference. Several layouts share one launch because starting torchrun is the slow part.
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

from stitch.checkpoint.store import build_model
from stitch.layout import from_live_shape
from stitch.parallel import load_dcp, parallelize, save_dcp, split_batch
from stitch.parallel.step import parallel_eval, save_weights, trainer_hooks
from stitch.train.step import train_step
from tests.parallel.common import (
    MAX_GRAD_NORM,
    STEPS,
    build,
    make_batch,
    make_optimizer,
    make_packed_microbatches,
    tiny_config,
)

MB2 = {"pp_microbatches": 2}
# STITCH_TEST_DEVICE=cpu keeps the run on gloo/CPU on a machine that has GPUs (default: CUDA when available).
DEVICE = torch.device(os.environ["STITCH_TEST_DEVICE"]) if os.environ.get("STITCH_TEST_DEVICE") else None
SCENARIOS: dict[str, list[tuple[str, str, dict]]] = {
    "two": [
        ("dp2", "base", {"dp": 2, "fsdp": True}),
        ("dp2_replicate", "base", {"dp": 2, "fsdp": False}),
        ("tp2", "base", {"tp": 2}),
        ("tp2_vit_replicated", "base", {"tp": 2, "vision_tp": 1}),
        ("pp2_gpipe_uneven", "base", {"pp": 2, "pp_schedule": "gpipe", **MB2, "pp_layers_per_stage": [1, 3]}),
        ("pp2_1f1b", "base", {"pp": 2, "pp_schedule": "1f1b", **MB2}),
        ("pp2_interleaved", "base", {"pp": 2, "pp_schedule": "interleaved_1f1b", **MB2,
                                    "pp_layers_per_stage": [0, 2, 1, 1]}),
        ("pp2_1f1b_tied", "tied", {"pp": 2, "pp_schedule": "1f1b", **MB2}),
        ("tp2_tied", "tied", {"tp": 2}),
        # packed rows (cu_seqlens) through the model's own forward: two packed micro-batches of unequal length
        ("pp2_packed", "packed", {"pp": 2, "pp_schedule": "1f1b", **MB2}),
        ("tp2_packed", "packed", {"tp": 2}),
    ],
    "four": [
        ("tp2_pp2", "base", {"tp": 2, "pp": 2, "pp_schedule": "1f1b", **MB2, "pp_layers_per_stage": [3, 1]}),
        ("dp2_tp2", "base", {"dp": 2, "fsdp": True, "tp": 2}),  # FSDP + TP: 2-D (strided) shards
        ("hsdp_2x2", "base", {"dp": 4, "dp_replicate": 2}),
        ("tp4_vit2", "mha", {"tp": 4, "vision_tp": 2}),  # the ViT on its own (tp_outer, vision_tp) mesh
    ],
}


def train(name: str, variant: str, layout: dict, out: Path, steps: int = STEPS, resume_from: Path | None = None,
          save_to: Path | None = None, first_step: int = 0, optimizer: str = "sgd", weights: Path | None = None,
          ) -> None:
    packed = variant == "packed"  # the base model, trained on `make_packed_microbatches`
    cfg = tiny_config("base" if packed else variant)
    if weights is None:
        pm = parallelize(build(cfg), layout, device=DEVICE)
    else:  # meta-device build: each rank allocates and reads only its own shards
        pm = parallelize(build_model(cfg, device="meta"), layout, device=DEVICE)
        pm.load_weights(weights)
    opt = make_optimizer(pm.parameters(), optimizer)
    if resume_from is not None:
        load_dcp(pm, opt, resume_from)
    losses, norms = [], []
    for step in range(first_step, first_step + steps):
        if packed:  # the trainer's way: packed rows cannot be split, so they come as micro-batches
            result = train_step(pm, opt, make_packed_microbatches(cfg, step), max_grad_norm=MAX_GRAD_NORM)
            losses.append(result.loss)
            norms.append(result.grad_norm)
            continue
        batch = split_batch(make_batch(cfg, step), pm.dp_size, cfg.tokens_per_tile, cfg.image_token_id)[pm.dp_rank]
        if layout.get("pp", 1) > 1 and layout.get("pp_schedule") != "gpipe":  # the trainer's way
            micro = split_batch(batch, 2, cfg.tokens_per_tile, cfg.image_token_id)
            result = train_step(pm, opt, micro, max_grad_norm=MAX_GRAD_NORM)
            losses.append(result.loss)
            norms.append(result.grad_norm)
        else:  # the bare API: forward_backward (micro-batches split by the layout) + the caller's optimizer
            step_out = pm.forward_backward(batch)
            norms.append(float(pm.clip_grad_norm_(MAX_GRAD_NORM)))
            opt.step()
            opt.zero_grad()
            losses.append(step_out.loss.item())
    # Evaluation after training: the trained model's mean loss on batch 0, summed over data ranks.
    pm.eval()
    batch = split_batch(make_batch(cfg, 0), pm.dp_size, cfg.tokens_per_tile, cfg.image_token_id)[pm.dp_rank]
    eval_loss, _ = parallel_eval(pm, batch)
    pm.train()
    assert trainer_hooks(layout)["dp_rank"] == pm.dp_rank  # the trainer's data split matches the mesh
    if save_to is not None:
        save_dcp(pm, opt, save_to)
    save_weights(pm, out / f"{name}.weights")
    state = get_model_state_dict(pm.model, options=StateDictOptions(full_state_dict=True))
    padded = pm.layout.padded_heads(cfg)
    state = {k: from_live_shape(k, v, cfg, padded).contiguous().cpu() for k, v in state.items()}
    if pm.dp_rank == 0 and pm.pmesh.tp_rank == 0:
        save_file(state, str(out / f"{name}.pp{pm.pmesh.pp_rank}.safetensors"))
    if dist.get_rank() == 0:
        record = {"losses": losses, "grad_norms": norms, "eval_loss": eval_loss,
                  "layout": pm.layout.describe()}
        (out / f"{name}.json").write_text(json.dumps(record))
    dist.barrier()


def logits_from_resharded(out: Path) -> None:
    """Build on the meta device, load the `stitch reshard` output prepared by the test, write the logits."""
    cfg = tiny_config()
    model = build_model(cfg, device="meta")  # nothing allocated until each rank's shards exist
    pm = parallelize(model, {"tp": 2, "pp": 2, "pp_layers_per_stage": [1, 3]}, device=DEVICE)
    pm.load_weights(out / "resharded")
    pm.eval()
    logits = pm.logits(make_batch(cfg, 0))
    if pm.is_last_stage and pm.pmesh.tp_rank == 0:
        save_file({"logits": logits.contiguous().cpu()}, str(out / "resharded_logits.safetensors"))
    dist.barrier()


def main() -> None:
    out = Path(sys.argv[1])
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: compare against the CPU reference
    torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True)
    for scenario in sys.argv[2:]:
        if scenario == "dcp":
            ckpt = out / "dcp_dp2"
            train("dcp_first", "base", {"dp": 2, "fsdp": True}, out, save_to=ckpt, optimizer="adamw",
                  weights=out / "initial")
            train("dcp_resumed", "base", {"tp": 2}, out, resume_from=ckpt, first_step=STEPS,
                  optimizer="adamw")
        elif scenario == "logits":
            logits_from_resharded(out)
        else:
            for name, variant, layout in SCENARIOS[scenario]:
                train(name, variant, layout, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
