"""The data section of a training config: which datasets, in what proportions, and how samples become batches.

A blend is either a metadataset YAML in the seed system's (Megatron-Energon) layout, named by `blend`, or an
inline list of `datasets`. Either way every entry resolves to a `DatasetSpec`; `resolve_datasets()` does that
so the rest of the pipeline sees one shape. Everything that changes which samples are drawn or how they are
rendered is here, so a data position saved with a checkpoint can be checked against the config it came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from stitch.config import validate
from stitch.data.metadataset import DatasetSpec, SourceKind, load_blend
from stitch.errors import DataError

# `DatasetSpec` and `SourceKind` are `stitch.data.metadataset`'s, re-exported where they have always been found.
__all__ = ["DatasetSpec", "DataConfig", "SourceKind"]


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class DataConfig(_Base):
    """How training data is read, rendered and batched (see module docstring)."""

    blend: str | None = None  # metadataset YAML (seed-system layout)
    datasets: list[DatasetSpec] = Field(default_factory=list)  # inline alternative to `blend`
    split: Literal["train", "val"] = "train"  # which split of a blend file to read
    seq_length: int = Field(default=4096, gt=0)  # max tokens of one sample (images included)
    pack: bool = False  # pack samples into rows of `max_tokens` (else pad `batch_size` samples)
    max_tokens: int | None = Field(default=None, gt=0)  # packing budget per row; default: seq_length
    batch_size: int = Field(default=1, gt=0)  # samples per micro-batch when not packing
    num_workers: int = Field(default=2, ge=0)  # DataLoader worker processes per rank
    prefetch_factor: int = Field(default=2, gt=0)
    prompts: str | None = None  # prompt-variety JSON; default: stitch/resources/prompts.json
    system_prompt: str | None = None  # prepended as a system turn when a sample has none
    # "template": the tokenizer's chat template; "plain": LLaVA's pretraining format (user turns as written,
    # then the answer and EOS; no role markers or system turn), for cheap projector pretraining on captions.
    chat_format: Literal["template", "plain"] = "template"
    # Tile budgets tried in order when image tokens would overflow seq_length (only those below max_tiles).
    tile_budgets: list[int] = Field(default_factory=lambda: [12, 8, 6, 4, 2, 1])
    max_image_pixels: int = Field(default=64_000_000, gt=0)  # larger images are skipped (decompression bomb)
    # Video frames (stitch.data.video): None keeps the model config's video_frames / video_sampling. The
    # token budget lowers the frame count (halving, not below min_frames) before image tiles and text.
    num_frames: int | None = Field(default=None, ge=1)
    frame_sampling: Literal["uniform", "internvl", "hf", "fps"] | None = None
    sample_fps: float | None = Field(default=None, gt=0)  # frames per second of video, for "fps"
    max_frames: int | None = Field(default=None, ge=1)
    min_frames: int = Field(default=1, ge=1)
    # "decoder": frames resized to the tile size by swscale while decoding (cheaper; ~1/255 from the default
    # PIL resize that transformers' processors match; docs/video.md).
    frame_resize: Literal["exact", "decoder"] = "exact"
    max_skip_fraction: float = Field(default=0.05, ge=0.0, le=1.0)
    skip_check_after: int = Field(default=100, ge=1)  # attempts on a dataset before its skip rate is judged

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.blend is not None and self.datasets:
            raise ValueError("give either 'blend' (a metadataset YAML) or 'datasets', not both")
        if self.max_tokens is not None and self.max_tokens < self.seq_length:
            raise ValueError(f"max_tokens ({self.max_tokens}) must be >= seq_length ({self.seq_length})")
        if any(b < 1 for b in self.tile_budgets):
            raise ValueError("tile_budgets must be positive")
        return self

    @property
    def row_tokens(self) -> int:
        """Tokens per packed row."""
        return self.max_tokens or self.seq_length

    def resolve_datasets(self, base_dir: str | Path | None = None) -> list[DatasetSpec]:
        """The datasets of this config's split, with paths made absolute (blend file or `base_dir` relative)."""
        if self.blend is not None:
            blend_path = Path(self.blend)
            if base_dir is not None and not blend_path.is_absolute():
                blend_path = Path(base_dir) / blend_path
            return load_blend(blend_path, split=self.split)
        if not self.datasets:
            raise DataError("data config: no datasets (set 'blend' or 'datasets')")
        base = Path(base_dir) if base_dir is not None else None
        return [_absolute(d, base) for d in self.datasets]

    @classmethod
    def from_dict(cls, data: Any, source: str = "data config") -> DataConfig:
        return validate(cls, data, source=source)


def _absolute(spec: DatasetSpec, base: Path | None) -> DatasetSpec:
    if base is None or spec.path.startswith("easy-vqa") or Path(spec.path).is_absolute():
        return spec
    update: dict[str, Any] = {"path": str(base / spec.path)}
    if spec.image_root is not None and not Path(spec.image_root).is_absolute():
        update["image_root"] = str(base / spec.image_root)
    return spec.model_copy(update=update)
