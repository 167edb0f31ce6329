"""Vision encoders: InternViT (300M and 6B), SigLIP and CLIP ViT as one plain-PyTorch module.

All four are the same pre-norm ViT; they differ only in switches that `VisionConfig` carries:

    embeddings  conv patch embed (+ class token for InternViT/CLIP) + learned positions
    pre_norm    CLIP only (`pre_layrnorm`)
    layers      x = x + ls1 * attn(norm1(x));  x = x + ls2 * mlp(norm2(x))
                (ls = InternViT layer scale; RMSNorm and full-width QK-norm for InternViT-6B)
    post_norm   SigLIP/CLIP `post_layernorm`, InternVL-HF `layernorm`; applied only when the config asks

Numerics follow transformers' `InternVLVisionModel`, `SiglipVisionModel` and `CLIPVisionModel` so imported
weights give the same features (tests check it to 1e-5). q/k/v/o stay separate linears, the layout tensor
parallelism shards; fused-qkv checkpoints (OpenGVLab's InternViT) are split on import in
`stitch.checkpoint.hf_vision`. Nothing here knows about parallelism or HF names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from stitch.config import VisionConfig
from stitch.models.layers import RMSNorm, sdpa

__all__ = ["VisionEncoder", "VISION_PRESETS", "vision_param_count"]


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # OpenAI CLIP's sigmoid approximation, exactly as transformers' QuickGELUActivation computes it.
    return x * torch.sigmoid(1.702 * x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": _gelu_tanh, "quick_gelu": _quick_gelu}



def _norm(cfg: VisionConfig, dim: int) -> nn.Module:
    if cfg.norm_type == "rms_norm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps)


class ConvStem(nn.Module):
    """Early convolutions: log2(patch) stride-2 3x3 convs (GroupNorm + GELU), then a 1x1 conv to the width.

    Same output grid as a patch_size-stride patch conv, but with a convolutional prior, which is what lets a
    small ViT trained from scratch pick up shapes in a few hundred steps (see `VisionConfig.patch_stem`).
    """

    def __init__(self, in_channels: int, out_channels: int, patch_size: int, width: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i in range(patch_size.bit_length() - 1):
            w = min(width * 2**i, out_channels)
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.GroupNorm(1, w), nn.GELU()]
            c = w
        layers.append(nn.Conv2d(c, out_channels, 1))
        self.layers = nn.Sequential(*layers)

    @property
    def weight(self) -> torch.Tensor:
        """The first conv's weight (its dtype is the stem's input dtype, as for a plain patch conv)."""
        return self.layers[0].weight

    def reset_parameters(self) -> None:
        """PyTorch's default (Kaiming-uniform) conv init, which GroupNorm'd conv stacks are tuned for."""
        for m in self.layers:
            if isinstance(m, (nn.Conv2d, nn.GroupNorm)):
                m.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class VisionEmbeddings(nn.Module):
    """Pixels -> patch tokens (+ class token) + learned positions.

    `pos_embed` is stored flat as [num_positions, C] (class token's row first) whatever the source layout;
    the checkpoint maps reshape InternVL's [1, P, C] on the way in and out.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.grid_size = cfg.grid_size
        self.has_cls = cfg.has_cls_token
        # CLIP's patch conv has no bias; InternViT's and SigLIP's do.
        if cfg.patch_stem == "conv":
            self.patch_embed: nn.Module = ConvStem(cfg.num_channels, cfg.hidden_size, cfg.patch_size)
        else:
            self.patch_embed = nn.Conv2d(
                cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=cfg.kind != "clip"
            )
        self.cls_token = nn.Parameter(torch.zeros(cfg.hidden_size)) if self.has_cls else None
        self.pos_embed = nn.Parameter(torch.zeros(cfg.num_positions, cfg.hidden_size))

    def positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embeddings for a grid_h x grid_w patch grid: [P, C].

        Other image sizes than the trained one get the patch positions resized bicubically (as HF's
        `interpolate_pos_encoding` and InternViT do); the class token's row is kept as is.
        """
        pos = self.pos_embed
        if grid_h == self.grid_size and grid_w == self.grid_size:
            return pos
        cls_pos, patch_pos = (pos[:1], pos[1:]) if self.has_cls else (pos[:0], pos)
        c = pos.shape[-1]
        grid = patch_pos.float().reshape(1, self.grid_size, self.grid_size, c).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch_pos = grid.permute(0, 2, 3, 1).reshape(grid_h * grid_w, c).to(pos.dtype)
        return torch.cat([cls_pos, patch_pos], dim=0)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # [N, C, h, w]
        grid_h, grid_w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # [N, h*w, C]
        if self.cls_token is not None:
            cls = self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)  # [N, 1 + h*w, C]
        return x + self.positions(grid_h, grid_w).to(x.dtype)


class VisionAttention(nn.Module):
    """Bidirectional multi-head self-attention over all tokens of one image (SDPA, no mask).

    InternViT-6B's QK-norm normalises q and k over the full hidden width before the split into heads;
    under tensor parallelism that norm needs a reduction across ranks, which is why it is a separate module.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        c = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        self.any_shape_kernels = False  # see stitch.models.layers.set_any_shape_attention
        self.q_proj = nn.Linear(c, c, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(c, c, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(c, c, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(c, c, bias=True)
        self.q_norm = RMSNorm(c, cfg.qk_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(c, cfg.qk_norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [N, T, C] each
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (y.view(n, t, self.num_heads, self.head_dim).transpose(1, 2) for y in (q, k, v))  # [N, H, T, D]
        dropout = self.dropout if self.training else 0.0
        out = sdpa(q, k, v, dropout_p=dropout, any_shape=self.any_shape_kernels)  # [N, H, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(n, t, -1))  # [N, T, C]


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # [N, T, C] -> [N, T, F] -> [N, T, C]


class VisionLayer(nn.Module):
    """One pre-norm block; `ls1`/`ls2` (InternViT's layer scale) scale each branch per channel."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        c = cfg.hidden_size
        self.norm1 = _norm(cfg, c)
        self.attn = VisionAttention(cfg)
        self.norm2 = _norm(cfg, c)
        self.mlp = VisionMLP(cfg)
        ls = cfg.layer_scale_init
        self.ls1 = nn.Parameter(torch.full((c,), float(ls))) if ls is not None else None
        self.ls2 = nn.Parameter(torch.full((c,), float(ls))) if ls is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attn(self.norm1(x))
        x = x + (h * self.ls1 if self.ls1 is not None else h)
        h = self.mlp(self.norm2(x))
        return x + (h * self.ls2 if self.ls2 is not None else h)


class VisionEncoder(nn.Module):
    """pixel_values [N, 3, H, W] -> features [N, tokens, C] from `cfg.select_layer`.

    Layers after the selected one are kept (so checkpoints round-trip) but never run; `trim_unused_layers`
    drops them when memory matters (e.g. CLIP-L at select_layer -2 needs 23 of its 24 layers).
    Set `gradient_checkpointing = True` to recompute each layer's activations in the backward pass.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = False
        c = cfg.hidden_size
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_norm = nn.LayerNorm(c, eps=cfg.norm_eps) if cfg.has_pre_norm else None
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_layers))
        # post_norm is always a LayerNorm, even in RMSNorm InternViTs (HF's InternVLVisionModel does the same).
        self.post_norm = nn.LayerNorm(c, eps=cfg.norm_eps) if cfg.post_norm else None
        self.init_weights()

    @property
    def num_layers_used(self) -> int:
        return self.config.num_layers_used

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random init for training from scratch (real runs import pretrained weights instead)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        if isinstance(self.embeddings.patch_embed, ConvStem):
            self.embeddings.patch_embed.reset_parameters()
        nn.init.trunc_normal_(self.embeddings.pos_embed, std=std)
        if self.embeddings.cls_token is not None:
            nn.init.trunc_normal_(self.embeddings.cls_token, std=std)
        if self.config.layer_scale_init is not None:
            for layer in self.layers:
                layer.ls1.fill_(self.config.layer_scale_init)
                layer.ls2.fill_(self.config.layer_scale_init)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)  # [N, T, C], T = patches (+1 class token)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        for layer in self.layers[: self.num_layers_used]:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        if self.config.applies_post_norm:
            x = self.post_norm(x)
        if self.config.has_cls_token and self.config.drop_cls_token:
            x = x[:, 1:]  # [N, patches, C]
        return x

    def trim_unused_layers(self) -> VisionConfig:
        """Drop layers the selected features never use; returns (and adopts) the equivalent shorter config.

        The new config selects the last remaining layer (select_layer -1) without post-norm, so features are
        unchanged. HF export of a trimmed encoder writes the shorter tower.
        """
        cfg = self.config
        used = cfg.num_layers_used
        if used == cfg.num_layers:
            return cfg
        if used == 0:
            raise ValueError("select_layer 0 uses no layers; nothing sensible to keep")
        # A trimmed selection never reached the post-norm (only select_layer -1 does), so switch it off.
        new = VisionConfig.model_validate(
            {**cfg.model_dump(), "num_layers": used, "select_layer": -1, "feature_post_norm": False}
        )
        del self.layers[used:]
        self.config = new
        return new


def vision_param_count(cfg: VisionConfig) -> int:
    """Parameters of an encoder built from `cfg`, counted on the meta device (no memory, any size)."""
    with torch.device("meta"):
        model = VisionEncoder(cfg)
    return sum(p.numel() for p in model.parameters())


_INTERNVIT_300M = dict(kind="internvit", image_size=448, patch_size=14, norm_type="layer_norm", norm_eps=1e-6,
                       qkv_bias=True, qk_norm=False, layer_scale_init=0.1, hidden_act="gelu")
_INTERNVIT_6B = dict(kind="internvit", image_size=448, patch_size=14, norm_type="rms_norm", norm_eps=1e-6,
                     qkv_bias=False, qk_norm=True, layer_scale_init=0.1, hidden_act="gelu")
# SigLIP has no class token: drop_cls_token=False so exported VLM configs say strategy "full".
_SIGLIP = dict(kind="siglip", norm_eps=1e-6, layer_scale_init=None, hidden_act="gelu_tanh", post_norm=True,
               drop_cls_token=False)
_CLIP = dict(kind="clip", norm_eps=1e-5, layer_scale_init=None, hidden_act="quick_gelu", post_norm=True)
# Tiny encoders for tests: a 4x4 patch grid that pixel shuffle 0.5 halves to 2x2.
_TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)

VISION_PRESETS: dict[str, VisionConfig] = {
    # InternViT-300M-448px (InternVL2/2.5 small models).
    "internvit-300m": VisionConfig(**_INTERNVIT_300M, hidden_size=1024, intermediate_size=4096, num_layers=24,
                                   num_heads=16),
    # InternViT-6B-448px-V1-5 (NVLM-D): the 48-layer InternViT-6B with its last 3 blocks removed -> 5.5B params.
    "internvit-6b": VisionConfig(**_INTERNVIT_6B, hidden_size=3200, intermediate_size=12800, num_layers=45,
                                 num_heads=25),
    # siglip-so400m-patch14-384: 27x27 = 729 patches (384/14 rounds down), hidden_states[-1] as LLaVA-OV uses.
    "siglip-so400m": VisionConfig(**_SIGLIP, image_size=384, patch_size=14, hidden_size=1152,
                                  intermediate_size=4304, num_layers=27, num_heads=16),
    # clip-vit-large-patch14-336 as LLaVA-1.5 uses it: the penultimate layer, class token dropped.
    "clip-vit-l-336": VisionConfig(**_CLIP, image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                   num_layers=24, num_heads=16, select_layer=-2),
    # The small InternViT-style encoder `stitch quickstart` trains from scratch on 64 px easy-VQA images: an 8x8
    # patch grid from early convolutions (a shape classifier on it: 97% after 300 steps, 65% with a linear 16 px
    # patch embedding), layer scale 1 so it learns quickly; the quickstart shuffles it by 0.25 to 4 LLM tokens.
    "internvit-64px": VisionConfig(**_INTERNVIT_300M | dict(image_size=64, patch_size=8, layer_scale_init=1.0),
                                   hidden_size=192, intermediate_size=768, num_layers=4, num_heads=3,
                                   patch_stem="conv"),
    "internvit-tiny": VisionConfig(**_INTERNVIT_300M | dict(image_size=56), **_TINY),
    "internvit6b-tiny": VisionConfig(**_INTERNVIT_6B | dict(image_size=56), **_TINY),
    "siglip-tiny": VisionConfig(**_SIGLIP, image_size=64, patch_size=16, **_TINY),
    "clip-tiny": VisionConfig(**_CLIP, image_size=56, patch_size=14, select_layer=-2, **_TINY),
}
