"""Split and merge checkpoints between tensor x pipeline layouts (`stitch reshard`).

The successor of the seed system's `pp_checkpoint_converter.py`, without its limits: any TP x PP to any TP x PP
(not only PP 1 <-> N), uneven layers per stage, tensor-parallel splitting with the ViT's own degree and
zero-padded heads, and no tensor ever dropped (the seed's merge could lose the final norm).

A resharded checkpoint is the usual folder (config.json, tokenizer files, ...) with, instead of
`model.safetensors`, one folder per rank `tp{t}_pp{p}/` holding that rank's tensors (`model.safetensors`) and a
`layout.json` describing the split. Inside a rank folder names are the unsplit model's, except that decoder
layers are renumbered from 0 within their stage (Megatron's convention). Stage 0 holds the vision encoder,
projector and token embeddings; the last stage the final norm and output layer (with tied embeddings and
pp > 1, a copy of the embedding matrix as `llm.lm_head.weight`, as Megatron keeps one). Splitting rules are
`stitch.layout`'s, the ones the runtime uses, so a rank folder is exactly what that rank holds.

Reading merges lazily: `open_weights(path)` gives name -> full tensor for a plain or resharded folder, reading
only the shards of the tensor asked for. Splits and merges are concatenations, so a round trip is bit-exact.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from stitch.checkpoint.io import LORA_FILE, TensorSource, atomic_dir, read_json, save_tensors
from stitch.checkpoint.lora import load_lora_model
from stitch.checkpoint.weights import build_model, is_stitch_checkpoint, load_config, model_state
from stitch.config import VLMConfig
from stitch.errors import CheckpointError, StitchConfigError
from stitch.layout import (
    Layout,
    global_name,
    local_name,
    pad_heads,
    shard_rule,
    split_layers,
    stage_of,
    unpad_heads,
)
from stitch.models.lora import merge_lora

__all__ = ["DiskLayout", "open_weights", "ReshardedSource", "write_layout", "reshard_checkpoint", "reshard",
           "reshard_arguments", "LAYOUT_FILE", "rank_dir"]

LAYOUT_FILE = "layout.json"
FORMAT = "stitch-tp-pp"


def rank_dir(tp_rank: int, pp_rank: int) -> str:
    return f"tp{tp_rank}_pp{pp_rank}"


@dataclass
class DiskLayout:
    """What `layout.json` records: enough to find and reassemble every tensor."""

    tp: int
    pp: int
    vision_tp: int
    layers_per_stage: list[int]
    vision_num_heads: int
    vision_padded_heads: int
    tie_word_embeddings: bool
    format: str = FORMAT
    version: int = 1

    @property
    def ranges(self) -> list[range]:
        return split_layers(sum(self.layers_per_stage), self.pp, self.layers_per_stage)

    def save(self, root: Path) -> None:
        data = asdict(self)
        data["ranks"] = {
            rank_dir(t, p): {"tp_rank": t, "pp_rank": p, "vision_tp_rank": t % self.vision_tp,
                             "llm_layers": [r.start, r.stop] if (r := self.ranges[p]) else []}
            for p in range(self.pp) for t in range(self.tp)
        }
        (root / LAYOUT_FILE).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, root: Path) -> DiskLayout:
        data = read_json(root / LAYOUT_FILE)
        if data.get("format") != FORMAT:
            raise CheckpointError(f"{root / LAYOUT_FILE}: not a Stitch TP/PP layout (format {data.get('format')!r})")
        data.pop("ranks", None)
        try:
            layout = cls(**data)
        except TypeError as e:
            raise CheckpointError(f"{root / LAYOUT_FILE}: unexpected layout fields ({e})") from e
        layout._check(root / LAYOUT_FILE)
        return layout

    def _check(self, where: Path) -> None:
        """Field types and ranges, so a hand-edited layout fails here and not inside tensor assembly."""
        def positive_int(value) -> bool:
            return type(value) is int and value >= 1

        for key in ("tp", "pp", "vision_tp", "vision_num_heads", "vision_padded_heads"):
            if not positive_int(getattr(self, key)):
                raise CheckpointError(f"{where}: {key} must be a positive integer, got {getattr(self, key)!r}")
        stages = self.layers_per_stage
        if not isinstance(stages, list) or len(stages) != self.pp or not all(
                type(n) is int and n >= 0 for n in stages):
            raise CheckpointError(f"{where}: layers_per_stage must list {self.pp} layer counts (one per pipeline "
                                  f"stage), got {stages!r}")
        if self.tp % self.vision_tp:
            raise CheckpointError(f"{where}: vision_tp {self.vision_tp} must divide tp {self.tp}")


class ReshardedSource(Mapping):
    """name -> full, unpadded tensor, assembled on demand from the `tp{t}_pp{p}/` folders of a checkpoint."""

    def __init__(self, root: str | Path, cfg: VLMConfig | None = None):
        self.root = Path(root)
        self.layout = DiskLayout.load(self.root)
        self.cfg = cfg or load_config(self.root)
        lay = self.layout
        if sum(lay.layers_per_stage) != self.cfg.llm.num_layers:
            raise CheckpointError(
                f"{self.root / LAYOUT_FILE}: layers_per_stage {lay.layers_per_stage} does not cover the "
                f"{self.cfg.llm.num_layers} layers of config.json"
            )
        self._sources: dict[tuple[int, int], TensorSource] = {}
        self._where: dict[str, tuple[int, str]] = {}
        ranges = lay.ranges
        for p in range(lay.pp):
            names = set(self._source(0, p))
            for t in range(1, lay.tp):  # every tensor-parallel rank of a stage holds the same names
                other = set(self._source(t, p))
                if other != names:
                    odd = sorted(other ^ names)[0]
                    raise CheckpointError(f"{self.root / rank_dir(t, p)}: tensor '{odd}' is "
                                          f"{'extra' if odd in other else 'missing'} (compared with "
                                          f"{rank_dir(0, p)})")
            for local in self._source(0, p):
                name = global_name(local, ranges[p])
                if lay.tie_word_embeddings and lay.pp > 1 and name == "llm.lm_head.weight":
                    continue  # the last stage's copy of the tied embedding; the canonical state has one
                if name in self._where:
                    raise CheckpointError(f"{self.root}: tensor '{name}' appears in two stages")
                self._where[name] = (p, local)

    def _source(self, t: int, p: int) -> TensorSource:
        key = (t, p)
        if key not in self._sources:
            folder = self.root / rank_dir(t, p)
            if not folder.is_dir():
                raise CheckpointError(f"{folder}: missing rank folder (layout.json says tp={self.layout.tp}, "
                                      f"pp={self.layout.pp})")
            self._sources[key] = TensorSource(folder)
        return self._sources[key]

    def _read(self, t: int, p: int, local: str) -> torch.Tensor:
        source = self._source(t, p)
        if local not in source:
            raise CheckpointError(f"{source.root}: missing tensor '{local}'")
        return source[local]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(name)
        p, local = self._where[name]
        return self._assemble(name, p, local)

    def _assemble(self, name: str, p: int, local: str) -> torch.Tensor:
        lay = self.layout
        rule = shard_rule(name, self.cfg)
        if rule.dim is None:
            return self._read(0, p, local)
        degree = lay.vision_tp if rule.vision else lay.tp
        full = torch.cat([self._read(t, p, local) for t in range(degree)], dim=rule.dim)
        if rule.heads:
            full = unpad_heads(full, rule.dim, lay.vision_num_heads, lay.vision_padded_heads,
                               f"{self.root}: {name}")
        return full

    def check_tied_copy(self) -> None:
        """With tied embeddings split over stages, the last stage's copy must equal the embedding."""
        lay = self.layout
        if not (lay.tie_word_embeddings and lay.pp > 1):
            return
        copy = self._assemble("llm.lm_head.weight", lay.pp - 1, "llm.lm_head.weight")
        if not torch.equal(copy, self["llm.embed_tokens.weight"]):
            raise CheckpointError(
                f"{self.root}: tied embeddings, but the last stage's llm.lm_head.weight differs from stage 0's "
                "llm.embed_tokens.weight (the two copies were not kept in sync)"
            )

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


class _TiedAlias(Mapping):
    """A canonical source seen with `llm.lm_head.weight` as well, for models whose state lists both names."""

    def __init__(self, source: Mapping):
        self.source = source

    def __getitem__(self, name: str) -> torch.Tensor:
        if name == "llm.lm_head.weight" and name not in self.source:
            return self.source["llm.embed_tokens.weight"]
        return self.source[name]

    def __contains__(self, name: object) -> bool:
        return name in self.source or (name == "llm.lm_head.weight" and "llm.embed_tokens.weight" in self.source)

    def __iter__(self) -> Iterator[str]:
        return iter(self.source)

    def __len__(self) -> int:
        return len(self.source)


def open_weights(path: str | Path) -> Mapping:
    """Canonical (unsplit) tensors of a Stitch checkpoint folder, plain or resharded, read lazily.

    With tied embeddings `llm.lm_head.weight` resolves to the embedding as well, so a parallel model whose
    last stage holds a copy can be filled from it.
    """
    path = Path(path)
    if not is_stitch_checkpoint(path):
        raise CheckpointError(f"{path}: not a Stitch checkpoint folder (no config.json with vision and llm)")
    cfg = load_config(path)
    source: Mapping = ReshardedSource(path, cfg) if (path / LAYOUT_FILE).exists() else TensorSource(path)
    return _TiedAlias(source) if cfg.llm.tie_word_embeddings else source


def _canonical_names(cfg: VLMConfig) -> dict[str, tuple[int, ...]]:
    """Expected tensor names (in the order `stitch.checkpoint.store.save` writes them) and shapes."""
    model = build_model(cfg, device="meta")
    return {name: tuple(t.shape) for name, t in model_state(model).items()}


def write_layout(
    tensors: Mapping,
    cfg: VLMConfig,
    out: Path,
    tp: int = 1,
    pp: int = 1,
    vision_tp: int | None = None,
    layers_per_stage: list[int] | None = None,
    vision_padded_heads: int | None = None,
    origin: str = "checkpoint",
) -> DiskLayout | None:
    """Write canonical `tensors` into folder `out` split for (tp, pp); tp = pp = 1 writes a plain checkpoint.

    Returns the written layout (None for a plain checkpoint).
    """
    vision_tp = tp if vision_tp is None else vision_tp
    layout = Layout(tp=tp, pp=pp, vision_tp=vision_tp, layers_per_stage=layers_per_stage,
                    vision_padded_heads=vision_padded_heads)
    layout.check(cfg)
    expected = _canonical_names(cfg)
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise CheckpointError(f"{origin}: missing tensor '{missing[0]}'")
    extra = [n for n in tensors if n not in expected]
    if extra:
        raise CheckpointError(f"{origin}: unexpected tensor '{extra[0]}'")

    def fetch(name: str) -> torch.Tensor:
        t = tensors[name]
        if tuple(t.shape) != expected[name]:
            raise CheckpointError(f"{origin}: tensor '{name}' has shape {tuple(t.shape)}, expected {expected[name]}")
        return t

    if tp == 1 and pp == 1 and layout.padded_heads(cfg) == cfg.vision.num_heads:
        save_tensors({name: fetch(name) for name in expected}, out)
        return None
    disk = DiskLayout(tp=tp, pp=pp, vision_tp=vision_tp, layers_per_stage=list(layout.layers_per_stage),
                      vision_num_heads=cfg.vision.num_heads, vision_padded_heads=layout.padded_heads(cfg),
                      tie_word_embeddings=cfg.llm.tie_word_embeddings)
    ranges = layout.ranges
    tied_copy = cfg.llm.tie_word_embeddings and pp > 1
    for p in range(pp):
        names = [n for n in expected if stage_of(n, ranges) == p]
        if tied_copy and p == pp - 1:
            names.append("llm.lm_head.weight")
        shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
        for name in names:
            full = fetch("llm.embed_tokens.weight" if name == "llm.lm_head.weight" and tied_copy else name)
            local = local_name(name, ranges)
            rule = shard_rule(name, cfg)
            if rule.dim is None:
                for t in range(tp):
                    shards[t][local] = full
                continue
            if rule.heads:
                full = pad_heads(full, rule.dim, cfg.vision.num_heads, disk.vision_padded_heads)
            degree = vision_tp if rule.vision else tp
            if full.shape[rule.dim] % degree:
                raise StitchConfigError(f"{name}: dimension {rule.dim} ({full.shape[rule.dim]}) not divisible by "
                                        f"tensor parallelism {degree}")
            pieces = [piece.clone() for piece in full.chunk(degree, dim=rule.dim)]
            for t in range(tp):
                shards[t][local] = pieces[t % degree]
        for t in range(tp):
            folder = out / rank_dir(t, p)
            folder.mkdir()
            save_tensors(shards[t], folder)
    disk.save(out)
    return disk


_SKIP = {LAYOUT_FILE, LORA_FILE, "model.safetensors.index.json", "train_state"}


def _copy_side_files(src: Path, dst: Path) -> None:
    """Config, tokenizer, chat template, ...: everything but weights, rank folders and training state."""
    for item in src.iterdir():
        if item.name in _SKIP or item.suffix == ".safetensors" or item.name.startswith("."):
            continue
        if item.is_dir():
            if re.fullmatch(r"tp\d+_pp\d+", item.name):
                continue
            shutil.copytree(item, dst / item.name)
        else:
            shutil.copy2(item, dst / item.name)


def reshard_checkpoint(
    src: str | Path,
    out: str | Path,
    tp: int = 1,
    pp: int = 1,
    vision_tp: int | None = None,
    layers_per_stage: list[int] | None = None,
    vision_padded_heads: int | None = None,
) -> DiskLayout | None:
    """Rewrite checkpoint `src` (plain or resharded) for layout (tp, pp) into `out`, atomically."""
    src, out = Path(src), Path(out)
    if src.resolve() == out.resolve():
        raise CheckpointError(f"{out}: the output must be a different folder from the input")
    if not is_stitch_checkpoint(src):
        raise CheckpointError(f"{src}: not a Stitch checkpoint (convert HF folders with `stitch import-hf` first)")
    cfg = load_config(src)
    if (src / LORA_FILE).is_file():  # adapters + a pointer to their base: the merged weights are what shards
        source = model_state(merge_lora(load_lora_model(src)))
    elif (src / LAYOUT_FILE).exists():
        source: Mapping = ReshardedSource(src, cfg)
        source.check_tied_copy()
    else:
        source = TensorSource(src)
    with atomic_dir(out, inputs=[src]) as tmp:
        _copy_side_files(src, tmp)
        return write_layout(source, cfg, tmp, tp, pp, vision_tp, layers_per_stage, vision_padded_heads, str(src))


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from e


def reshard_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a Stitch checkpoint folder (plain or already resharded)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of the output (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages of the output (default 1)")
    parser.add_argument("--vision-tp", type=int, default=None,
                        help="tensor-parallel degree of the ViT (1 = replicated; default: --tp)")
    parser.add_argument("--layers-per-stage", type=_int_list, default=None, metavar="A,B,..",
                        help="LLM decoder layers per stage, e.g. 6,8,8,6 (default: even, extras on later stages)")
    parser.add_argument("--vision-padded-heads", type=int, default=None,
                        help="pad the ViT's heads to this count (default: the next multiple of --vision-tp)")
    parser.add_argument("--out", required=True, help="output folder (replaced atomically if it exists)")


def reshard(args: argparse.Namespace) -> int:
    """Split or merge a checkpoint for any tensor x pipeline layout (TP x PP -> TP x PP, either way).

    Writes one folder per rank, tp{t}_pp{p}/, plus layout.json; --tp 1 --pp 1 merges back into a plain
    checkpoint. Stage 0 gets the ViT, projector and embeddings, the last stage the final norm and output
    layer; decoder layers are renumbered from 0 in each stage. The ViT's heads are zero-padded to a multiple
    of its TP degree (InternViT-6B: 25 -> 32 at TP 8) and the padding is removed, checked zero, on merge.
    A LoRA checkpoint is merged into its base first (the layout holds plain weights).
    Lossless: merging a split gives back the same tensors, bit for bit.

    Example:
      stitch reshard ckpt/ --tp 2 --pp 4 --layers-per-stage 6,8,8,6 --out ckpt-tp2-pp4/
      stitch reshard ckpt-tp2-pp4/ --tp 1 --pp 1 --out ckpt-merged/
    """
    layout = reshard_checkpoint(args.checkpoint, args.out, args.tp, args.pp, args.vision_tp, args.layers_per_stage,
                                args.vision_padded_heads)
    if layout is None:
        print(f"wrote {args.out} (single file, tp=1 pp=1)")
    else:
        print(f"wrote {args.out}: {layout.tp * layout.pp} rank folders, tp={layout.tp} (vision {layout.vision_tp}, "
              f"{layout.vision_padded_heads} heads) pp={layout.pp} layers/stage={layout.layers_per_stage}")
    return 0
