"""Projectors from vision features to LLM embeddings.

`mlp` is InternVL/NVLM's: pixel shuffle (scale 0.5 folds each 2x2 patch block into channels, so a 448px tile's
1024 tokens become 256) then LayerNorm -> Linear -> GELU -> Linear; `downsample="avg_pool"` averages each block
instead of folding it into channels. `mlp2x_gelu` and `linear` are LLaVA's,
without shuffle. Parameter names match HF's `multi_modal_projector` so the export table stays trivial.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stitch.config import VLMConfig


def pixel_shuffle(x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """[N, S*S, C] -> [N, (S*scale)^2, C/scale^2], in InternVL's exact element order (HF-compatible)."""
    n, tokens, c = x.shape
    side = math.isqrt(tokens)
    x = x.reshape(n, side, side, c)  # [N, W, H, C] in InternVL's naming
    x = x.reshape(n, side, int(side * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).reshape(n, int(side * scale), int(side * scale), int(c / scale**2))
    x = x.permute(0, 2, 1, 3)
    return x.reshape(n, -1, x.shape[-1])


def average_pool(x: torch.Tensor, scale: float) -> torch.Tensor:
    """[N, S*S, C] -> [N, (S*scale)^2, C]: the mean of each (1/scale)^2 block, rows in raster order."""
    n, tokens, c = x.shape
    side = math.isqrt(tokens)
    grid = x.transpose(1, 2).reshape(n, c, side, side)
    return F.adaptive_avg_pool2d(grid, int(round(side * scale))).flatten(2).transpose(1, 2)


class Projector(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        p, vision_dim, llm_dim = cfg.projector, cfg.vision.hidden_size, cfg.llm.hidden_size
        self.kind, self.scale, self.downsample = p.kind, p.downsample_ratio, p.downsample
        hidden = p.hidden_size or llm_dim
        if p.kind == "mlp":
            in_dim = p.input_width(vision_dim)
            self.layer_norm = nn.LayerNorm(in_dim, eps=p.layer_norm_eps)
            self.linear_1 = nn.Linear(in_dim, hidden)
            self.linear_2 = nn.Linear(hidden, llm_dim)
        elif p.kind == "mlp2x_gelu":
            self.linear_1 = nn.Linear(vision_dim, hidden)
            self.linear_2 = nn.Linear(hidden, llm_dim)
        else:
            self.linear_1 = nn.Linear(vision_dim, llm_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [tiles, tokens, C_vision] -> [tiles, tokens_per_tile, D_llm]."""
        if self.kind == "linear":
            return self.linear_1(features)
        if self.kind == "mlp":
            shrink = average_pool if self.downsample == "avg_pool" else pixel_shuffle
            features = self.layer_norm(shrink(features, self.scale))  # [tiles, tokens/4, 4C (avg_pool: C)]
        return self.linear_2(F.gelu(self.linear_1(features)))
