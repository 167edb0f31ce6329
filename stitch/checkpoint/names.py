"""Explicit name tables between HF and Stitch, and the one function that applies them.

A table is a list of (stitch_name, hf_name) pairs with `{i}` for the layer index; `expand` turns it into
concrete pairs and `convert` moves tensors across, failing on the first missing tensor or shape mismatch with
the tensor's name (and file, when known).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from stitch.errors import CheckpointError

Table = list[tuple[str, str]]

# The Llama family inside an HF causal LM; `model.` / `model.language_model.` prefixes are added by callers.
LLM_TABLE: Table = [
    ("embed_tokens.weight", "embed_tokens.weight"),
    ("layers.{i}.input_layernorm.weight", "layers.{i}.input_layernorm.weight"),
    ("layers.{i}.self_attn.q_proj.weight", "layers.{i}.self_attn.q_proj.weight"),
    ("layers.{i}.self_attn.k_proj.weight", "layers.{i}.self_attn.k_proj.weight"),
    ("layers.{i}.self_attn.v_proj.weight", "layers.{i}.self_attn.v_proj.weight"),
    ("layers.{i}.self_attn.o_proj.weight", "layers.{i}.self_attn.o_proj.weight"),
    ("layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.gate_proj.weight"),
    ("layers.{i}.mlp.up_proj.weight", "layers.{i}.mlp.up_proj.weight"),
    ("layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.down_proj.weight"),
    ("norm.weight", "norm.weight"),
]
LLM_BIAS_TABLE: Table = [
    ("layers.{i}.self_attn.q_proj.bias", "layers.{i}.self_attn.q_proj.bias"),
    ("layers.{i}.self_attn.k_proj.bias", "layers.{i}.self_attn.k_proj.bias"),
    ("layers.{i}.self_attn.v_proj.bias", "layers.{i}.self_attn.v_proj.bias"),
]

# InternVL's pixel-shuffle MLP and LLaVA's 2-layer MLP (HF `multi_modal_projector`).
PROJECTOR_TABLES: dict[str, Table] = {
    "mlp": [
        ("layer_norm.weight", "layer_norm.weight"),
        ("layer_norm.bias", "layer_norm.bias"),
        ("linear_1.weight", "linear_1.weight"),
        ("linear_1.bias", "linear_1.bias"),
        ("linear_2.weight", "linear_2.weight"),
        ("linear_2.bias", "linear_2.bias"),
    ],
    "mlp2x_gelu": [
        ("linear_1.weight", "linear_1.weight"),
        ("linear_1.bias", "linear_1.bias"),
        ("linear_2.weight", "linear_2.weight"),
        ("linear_2.bias", "linear_2.bias"),
    ],
    "linear": [("linear_1.weight", "linear_1.weight"), ("linear_1.bias", "linear_1.bias")],
}


def expand(table: Table, num_layers: int, stitch_prefix: str = "", hf_prefix: str = "") -> list[tuple[str, str]]:
    pairs = []
    for ours, theirs in table:
        layers = range(num_layers) if "{i}" in ours else [None]
        for i in layers:
            pairs.append((stitch_prefix + ours.format(i=i), hf_prefix + theirs.format(i=i)))
    return pairs


def llm_pairs(num_layers: int, qkv_bias: bool, tied: bool, stitch_prefix: str, hf_prefix: str, head: str):
    """All (stitch, hf) pairs of an LLM; `head` is the HF name of the output layer (absent when tied)."""
    table = LLM_TABLE + (LLM_BIAS_TABLE if qkv_bias else [])
    pairs = expand(table, num_layers, stitch_prefix, hf_prefix)
    if not tied:
        pairs.append((stitch_prefix + "lm_head.weight", head))
    return pairs


def convert(
    source: Mapping[str, torch.Tensor],
    pairs: list[tuple[str, str]],
    direction: str,
    expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
    where: Callable[[str], str] | str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Move tensors by name. direction 'to_stitch' reads hf names, 'to_hf' reads stitch names.

    `expected_shapes` (keyed by destination name) catches shape mismatches before any tensor is loaded into a
    model; `where` names the file for errors (a string, or a function of the source name).
    """
    out = {}
    for ours, theirs in pairs:
        src, dst = (theirs, ours) if direction == "to_stitch" else (ours, theirs)
        origin = where(src) if callable(where) else where
        if src not in source:
            raise CheckpointError(f"{origin}: missing tensor '{src}'")
        tensor = source[src]
        if expected_shapes is not None and dst in expected_shapes:
            want = tuple(expected_shapes[dst])
            if tuple(tensor.shape) != want:
                raise CheckpointError(
                    f"{origin}: tensor '{src}' has shape {tuple(tensor.shape)}, expected {want} for '{dst}'"
                )
        out[dst] = tensor
    return out
