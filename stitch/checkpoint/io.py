"""Reading and writing safetensors folders (single file or sharded with an index), and atomic output folders.

Every tensor remembers the file it came from, so an error can name both. Nothing here unpickles anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from stitch.errors import CheckpointError

SHARD_BYTES = 4 * 1024**3


class TensorSource(Mapping):
    """Lazy name -> tensor view over the safetensors files of one folder (or one file)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.root = path if path.is_dir() else path.parent
        weight_map: dict[str, str] | None = None
        if path.is_file():
            files = [path]
        elif (path / "model.safetensors.index.json").exists():
            weight_map = _read_weight_map(path / "model.safetensors.index.json")
            files = sorted({path / f for f in weight_map.values()})
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
            hint = f" (found {pickled[0]}: pickled weights are not read; convert to safetensors)" if pickled else ""
            raise CheckpointError(f"{path}: no .safetensors files{hint}")
        self._where: dict[str, Path] = {}
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{f}: listed in the index but missing")
            try:
                with safe_open(f, framework="pt") as handle:
                    names = list(handle.keys())
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from e
            for name in names:
                if weight_map is not None:
                    if weight_map.get(name) == f.name:  # the index says which file holds a tensor
                        self._where[name] = f
                elif name in self._where:
                    raise CheckpointError(f"{path}: tensor '{name}' is in both {self._where[name].name} and {f.name}"
                                          " (which one is meant? remove the other file)")
                else:
                    self._where[name] = f
        if weight_map is not None:
            lost = [n for n in weight_map if n not in self._where]
            if lost:
                raise CheckpointError(f"{path / weight_map[lost[0]]}: the index lists '{lost[0]}' in it but the "
                                      f"file does not hold it ({len(lost)} such tensors)")

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def origin(self, name: str) -> str:
        """The file holding `name`, or the folder when the tensor is missing (for error messages)."""
        return str(self._where.get(name, self.root))

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(name)
        with safe_open(self._where[name], framework="pt") as handle:
            return handle.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape_of(self, name: str) -> tuple[int, ...]:
        with safe_open(self._where[name], framework="pt") as handle:
            return tuple(handle.get_slice(name).get_shape())


def save_tensors(state: Mapping[str, torch.Tensor], out_dir: Path, prefix: str = "model") -> None:
    """Write `prefix.safetensors`, or `prefix-0000i-of-0000n.safetensors` + index when over SHARD_BYTES."""
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / f"{prefix}.safetensors"), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))


# Files whose presence marks a folder as one a Stitch command writes (a checkpoint, a resharded layout, an HF
# export, a peft adapter): only such a folder, or an empty one, is replaced wholesale by a new output.
OUTPUT_MARKERS = ("config.json", "layout.json", "adapter_config.json")
# The file that marks a LoRA checkpoint: adapters plus a pointer to their base (written by stitch.checkpoint.lora).
LORA_FILE = "lora.json"


def _read_weight_map(index_path: Path) -> dict[str, str]:
    """An index's tensor -> file map, checked: a mapping of names to plain file names in the same folder."""
    try:
        weight_map = json.loads(index_path.read_text()).get("weight_map")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index_path}: not a safetensors index ({type(e).__name__}: {e})") from e
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v and Path(v).name == v for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to file names in this folder")
    return weight_map


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = True, inputs: Sequence[str | Path] = ()):
    """Yield a temporary sibling folder that becomes `out` only if the block succeeds.

    On any error the temporary folder is removed and `out` is left as it was (absent or untouched), so a
    failed command leaves nothing behind and a crash never leaves a half-written checkpoint. An existing `out`
    is replaced only when that loses nothing the user did not ask to replace: it must not be (or hold) one of
    `inputs`, and it must be empty or an earlier output (see `OUTPUT_MARKERS`), never a folder of other files.
    """
    out = Path(out)
    _check_replaceable(out, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a checkpoint should get the usual folder permissions
    try:
        yield tmp
        if out.exists():
            if not overwrite:
                raise CheckpointError(f"{out}: already exists")
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_replaceable(out: Path, overwrite: bool, inputs: Sequence[str | Path]) -> None:
    """Refuse, before any work, an output folder whose replacement would destroy something else."""
    if not out.name or out.resolve() == Path.cwd().resolve() or out.resolve() == out.resolve().parent:
        raise CheckpointError(f"{out}: name a new folder for the output, not the current or root folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder")
    if not overwrite:
        raise CheckpointError(f"{out}: already exists")
    target = out.resolve()
    for src in inputs:
        src = Path(src).resolve()
        if src == target or target in src.parents:
            raise CheckpointError(f"{out}: the output would replace the input {src}; choose another folder")
    if any(out.iterdir()) and not any((out / name).exists() for name in OUTPUT_MARKERS):
        raise CheckpointError(
            f"{out}: exists and holds other files (no {' / '.join(OUTPUT_MARKERS)}), so it is not an earlier "
            "output to replace; remove it or choose another folder"
        )


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or a CheckpointError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: not found (is this a checkpoint folder?)") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
