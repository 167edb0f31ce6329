"""Run logging: a JSONL metrics file, a rich progress bar, optional TensorBoard, and a loss-curve PNG.

`OUT/metrics.jsonl` is the record of a run: one JSON object per logged step (`{"step", "loss", "lr", ...}`)
and one per evaluation (`{"step", "val_loss", ...}`). On resume the lines past the checkpoint's step are
dropped first, so the file of a killed-and-resumed run reads exactly like that of a straight run (the steps
done after the last checkpoint are redone, and logged once).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from stitch.errors import StitchConfigError

__all__ = ["MetricsLog", "Progress", "plot_losses", "read_metrics"]


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything before it is sound
    return out


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable
    return value


class MetricsLog:
    """Appends metric records to `OUT/metrics.jsonl` (and TensorBoard when asked)."""

    def __init__(self, out_dir: str | Path, resume_step: int | None = None, tensorboard: bool = False):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a")  # noqa: SIM115 (kept open for the run; closed in close())
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # the `tensorboard` package is an optional extra

                raise StitchConfigError(
                    "log.tensorboard: the tensorboard package is not installed (pip install stitch-vlm[log])"
                ) from e
            self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k if "/" in k else f"train/{k}", v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class Progress:
    """A rich progress bar with step, loss, lr, tokens/s, MFU and ETA; plain lines when not on a terminal."""

    def __init__(self, total: int, start: int, enabled: bool = True, every: int = 1):
        self.total, self.start, self.every = total, start, every
        self.enabled = enabled
        self.interactive = enabled and sys.stdout.isatty()
        self._t0 = time.perf_counter()
        self._bar = None
        if self.interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, record: dict[str, Any]) -> None:
        info = _summary(record)
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        elif self.enabled and (step % self.every == 0 or step == self.total):
            done = step - self.start
            elapsed = time.perf_counter() - self._t0
            eta = elapsed / done * (self.total - step) if done else float("nan")
            print(f"step {step}/{self.total}  {info}  eta {_duration(eta)}", flush=True)

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _summary(r: dict[str, Any]) -> str:
    parts = [f"loss {r['loss']:.4f}" if isinstance(r.get("loss"), float) else "loss -"]
    if "lr" in r:
        parts.append(f"lr {r['lr']:.2e}")
    if r.get("tokens_per_s"):
        parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    if r.get("skipped"):
        parts.append("[skipped: non-finite]")
    return "  ".join(parts)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def plot_losses(metrics_path: str | Path, out_png: str | Path) -> Path | None:
    """Training loss (and validation loss when logged) against step, as a PNG; None when nothing to plot."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
    val = [(r["step"], r["val_loss"]) for r in records if isinstance(r.get("val_loss"), (int, float))]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="val", linewidth=1.2, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)
