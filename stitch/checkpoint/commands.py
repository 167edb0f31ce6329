"""`stitch build`, `stitch import-hf`, `stitch export-hf`: the command-line wrappers.

The work is done by non-CLI modules (`stitch.checkpoint.build`, `.export`, `.tokenizer`, `.lora`); nothing
imports this module except the `stitch` command's router. Every command writes through `atomic_dir`, so a
failure (bad source, missing tensor, shape mismatch) exits non-zero with a one-line error and leaves nothing in
`--out`.
"""

from __future__ import annotations

import argparse

from stitch.checkpoint.build import stitch_build
from stitch.checkpoint.export import export_to_hf
from stitch.checkpoint.io import atomic_dir, save_tensors
from stitch.checkpoint.lora import export_peft, require_lora_checkpoint
from stitch.checkpoint.store import load_model, model_state
from stitch.checkpoint.tokenizer import load_tokenizer
from stitch.device import DTYPES
from stitch.errors import StitchError

# `stitch_build` and `export_to_hf` are also importable from here, where scripts have found them.
__all__ = ["build", "build_arguments", "import_hf", "import_hf_arguments", "export_hf", "export_hf_arguments",
           "stitch_build", "export_to_hf"]


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
        require_lora_checkpoint(args.checkpoint)  # before --out is written: nothing half done
    if args.out is not None:
        export_to_hf(args.checkpoint, args.format, args.out)
        print(f"wrote {args.out}")
    if args.peft_out is not None:
        export_peft(args.checkpoint, args.format, args.peft_out)
        print(f"wrote {args.peft_out}")
    return 0
