"""The stitched model: vision encoder -> projector -> embeddings spliced into the LLM's token stream.

As in HF's InternVL/LLaVA, `input_ids` carry the image-context token once per image-embedding position, and
`pixel_values` holds every tile of the batch in order of appearance. Tile tags and image wrappers are ordinary
text tokens placed by the processor, so the model needs no knowledge of them: it only fills image positions.

The forward is prunable the torchtitan way (`torchtitan/models/llama3/model/model.py`): a model whose
`llm.embed_tokens` is `None` takes the previous pipeline stage's hidden state instead of token ids, its LLM runs
the layers it holds, and one whose `llm.lm_head` is `None` returns the hidden state. A pipeline stage is thus
this model with pieces removed (`stitch.parallel.pipeline.StageModule`), running this forward, varlen kernel
path for packed rows included; nothing here knows about parallelism.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from stitch.config import VLMConfig
from stitch.models.llm import LLM, KVCache, token_loss
from stitch.models.projector import Projector
from stitch.models.vision import VisionEncoder


@dataclass
class VLMOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    num_label_tokens: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None  # [B, T, D], only from a model without an output layer


class VLM(nn.Module):
    def __init__(self, config: VLMConfig):
        super().__init__()
        self.config = config
        self.vision = VisionEncoder(config.vision)
        self.projector = Projector(config)
        self.llm = LLM(config.llm)

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [tiles, 3, H, W] -> [tiles * tokens_per_tile, D_llm]."""
        dtype = next(self.projector.parameters()).dtype
        features = self.vision(pixel_values.to(dtype))  # [tiles, tokens, C]
        return self.projector(features).flatten(0, 1)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image embeddings written at the image-token positions."""
        embeds = self.llm.embed_tokens(input_ids)  # [B, T, D]
        is_image = input_ids == self.image_token_id
        if pixel_values is None or pixel_values.numel() == 0:
            return embeds
        image = self.image_embeddings(pixel_values).to(embeds.dtype)
        if not torch.compiler.is_compiling() and int(is_image.sum()) != image.shape[0]:
            raise ValueError(
                f"{int(is_image.sum())} image-token positions in input_ids but {image.shape[0]} image embeddings "
                f"({pixel_values.shape[0]} tiles x {self.config.tokens_per_tile} tokens)"
            )
        return embeds.masked_scatter(is_image[..., None], image)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        num_label_tokens: torch.Tensor | int | None = None,
        kv_cache: KVCache | None = None,
        cache_position: torch.Tensor | None = None,
        return_logits: bool = True,
        logits_to_keep: int = 0,
        fresh_cache: bool = False,
        loss_fn: Callable[[torch.Tensor, torch.Tensor, nn.Module], tuple[torch.Tensor, torch.Tensor]] | None = None,
        **_: object,
    ) -> VLMOutput:
        """Logits [B, T, V] (or the last `logits_to_keep` positions) and, with `labels`, the token-mean loss.

        Training passes `return_logits=False`: the loss is then computed from hidden states in chunks, only
        where labels exist, and the full logits tensor is never built. `fresh_cache`: see `LLM.forward`.
        `loss_fn(hidden, labels, lm_head) -> (loss, labelled tokens)` replaces the next-token loss (the preference
        losses of `stitch.train.preference`); its `loss` need not be a scalar.

        Pruned (a pipeline stage, see the module docstring): without `llm.embed_tokens`, `input_ids` is the
        previous stage's hidden state [B, T, D]; without `llm.lm_head`, the output carries only `hidden_states`.
        """
        if self.llm.embed_tokens is not None:
            h = self.embed(input_ids, pixel_values)  # [B, T] ids -> [B, T, D]
        else:
            h = input_ids  # [B, T, D] from the previous stage
        hidden = self.llm(h, position_ids, attention_mask, cu_seqlens, kv_cache, cache_position, max_seqlen,
                          fresh_cache)
        if self.llm.lm_head is None:
            return VLMOutput(logits=None, hidden_states=hidden)
        loss = n_tokens = logits = None
        if labels is not None:
            if loss_fn is not None:
                loss, n_tokens = loss_fn(hidden, labels, self.llm.lm_head)
            else:
                loss, n_tokens = self.label_loss(hidden, labels, num_label_tokens)
        if return_logits:
            logits = self.llm.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return VLMOutput(logits=logits, loss=loss, num_label_tokens=n_tokens)

    def label_loss(
        self, hidden: torch.Tensor, labels: torch.Tensor, num_label_tokens: torch.Tensor | int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(token-weighted loss, labelled tokens) of final hidden states [B, T, D]; see `token_loss`.

        A method so that a layout whose output layer is split (vocabulary-parallel logits) can supply its own
        cross-entropy without the forward changing."""
        return token_loss(hidden, self.llm.lm_head, labels, num_label_tokens)

    def parts(self) -> dict[str, nn.Module]:
        """The named parts that stages freeze/train and reports count (prismatic-style)."""
        return {"vision": self.vision, "projector": self.projector, "llm": self.llm}

    def num_parameters_per_part(self) -> dict[str, int]:
        counts = {}
        for name, part in self.parts().items():
            seen = {id(p): p.numel() for p in part.parameters()}
            counts[name] = sum(seen.values())
        return counts


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates (safetensors refuses shared storage, and HF omits them too).

    Defined with the model rather than with the checkpoint code because the adapter merge
    (`stitch.models.lora.merged_state_dict`) needs it too; `stitch.checkpoint.store` re-exports it."""
    state = model.state_dict()
    cfg = getattr(model, "config", None)
    if cfg is not None and cfg.llm.tie_word_embeddings:
        state.pop("llm.lm_head.weight", None)
    return state
