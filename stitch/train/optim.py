"""AdamW over the trainable parameters, one pair of parameter groups per part.

Groups are per part so each part can have its own peak learning rate (a ViT unfrozen in SFT usually wants a
smaller one than the projector), and split by weight decay: matrices decay, vectors (biases, norm weights,
layer scales, class token) do not, as in Megatron and most LLM recipes. Parameters are fp32 master weights
whatever the compute precision (bf16 comes from autocast), so the optimizer state is fp32 too.
"""

from __future__ import annotations

import torch
from torch import nn

from stitch.errors import StitchConfigError
from stitch.train.config import OptimConfig

__all__ = ["build_optimizer", "param_groups"]


def param_groups(parts: dict[str, nn.Module], cfg: OptimConfig) -> list[dict]:
    """Parameter groups named `<part>.decay` / `<part>.no_decay`, each with its part's peak `lr`."""
    groups = []
    seen: set[int] = set()
    for part, module in parts.items():
        decay, no_decay = [], []
        for p in module.parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (decay if p.ndim >= 2 else no_decay).append(p)
        lr = cfg.part_lr.get(part, cfg.lr)
        if decay:
            groups.append({"name": f"{part}.decay", "params": decay, "lr": lr, "weight_decay": cfg.weight_decay})
        if no_decay:
            groups.append({"name": f"{part}.no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0})
    return groups


def build_optimizer(parts: dict[str, nn.Module], cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; the fused kernel unless `cfg.fused` says otherwise. On a CPU it is taken for plain tensors only
    (sharded DTensor parameters keep the per-tensor path): there it is ~3.5x faster than `foreach`."""
    groups = param_groups(parts, cfg)
    if not groups:
        raise StitchConfigError("nothing to train: every parameter is frozen")
    plain = all(type(p) is nn.Parameter or type(p) is torch.Tensor for g in groups for p in g["params"])
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda" or (device.type == "cpu" and plain)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             fused=fused or None)
