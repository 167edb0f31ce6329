"""The token-weighted step stays exact across data-parallel ranks: 2 gloo ranks, each with its own unequal
micro-batches, give the gradient of the whole global batch's per-token mean through `train_step` on a
`stitch.parallel` data-parallel layout (the same function one process uses)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from stitch.checkpoint.store import load_model
from stitch.data.collate import collate
from stitch.data.config import DataConfig
from stitch.train.config import SyntheticConfig
from stitch.train.synthetic import SyntheticStream

pytestmark = pytest.mark.dist

SYN = SyntheticConfig(enabled=True, min_tokens=8, max_tokens=40, answer_fraction=0.6, vocab_limit=250)


class _RecordGrads(torch.optim.Optimizer):
    """Records the (already data-parallel reduced) gradients instead of stepping."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.0})
        self.grads: list[torch.Tensor] = []

    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                self.grads.append(grad.clone())


def _samples(model):
    stream = SyntheticStream(SYN, DataConfig(batch_size=1, num_workers=0), model.config)
    return [stream.sample(i) for i in range(8)]


def _trainable(model):
    for p in model.vision.parameters():
        p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def _worker(rank: int, world: int, ckpt: str, init: str, out: str) -> None:
    from stitch.parallel import parallelize
    from stitch.train.step import train_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    model = load_model(ckpt).train()
    _trainable(model)
    samples = _samples(model)
    pm = parallelize(model, {"dp": 2, "fsdp": False}, device=torch.device("cpu"))
    opt = _RecordGrads([p for p in pm.parameters() if p.requires_grad])
    mine = samples[rank * 4 : rank * 4 + 4]
    micro = [collate(mine[:1]), collate(mine[1:4])]  # unequal micro-batches, unequal ranks
    res = train_step(pm, opt, micro, max_grad_norm=None)
    if rank == 0:
        torch.save({"loss": res.loss, "n": res.label_tokens, "grads": opt.grads}, out)
    dist.barrier()
    dist.destroy_process_group()
    # torch 2.13's gloo sometimes aborts in its thread teardown at interpreter exit ("terminate called without
    # an active exception"; seen at the unchanged test too, ~2 runs in 5). The results are saved: skip it.
    os._exit(0)


def test_token_weighted_loss_is_exact_across_ranks(small_ckpt, tmp_path):
    out = tmp_path / "rank0.pt"
    init = f"file://{tmp_path / 'rendezvous'}"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(2, str(small_ckpt), init, str(out)), nprocs=2, join=True)
    got = torch.load(out)

    model = load_model(small_ckpt).train()
    params = _trainable(model)
    big = collate(_samples(model))
    res = model(**{k: big[k] for k in ("input_ids", "labels", "attention_mask", "position_ids", "pixel_values")},
                return_logits=False)
    res.loss.backward()
    assert got["n"] == int(res.num_label_tokens)
    assert abs(got["loss"] - res.loss.item()) < 1e-6
    worst = max((g - p.grad).abs().max().item() for g, p in zip(got["grads"], params))
    assert worst < 1e-6, worst
