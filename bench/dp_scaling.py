"""Data-parallel scaling of `stitch train`: one process against `--nproc` under torchrun, same work per device.

Weak scaling, as the issue's bar reads it: each run trains the same recipe with the same micro-batches per
device; the N-process run has `parallel.dp=N` and an N-times larger global batch. Efficiency = tokens/s of the
N-process run / (N x tokens/s of one process), both read from the runs' own `OUT/summary.json` (the trainer's
timing: the first 10% of steps left out).

  python bench/dp_scaling.py                                  # 2B synthetic recipe, 1 vs 2 GPUs
  python bench/dp_scaling.py --nproc 8 --steps 30 -- train.compile=true
  python bench/dp_scaling.py --tiny                           # CPU smoke check (gloo), about a minute

Writes bench/results/dp_scaling_<device>.json; a run that fails is recorded with the tail of its log.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import RESULTS_DIR, name_slug, write_json

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "internvl-2b-sft-synthetic.yaml"
TINY = ["model.preset=vlm-tiny", "data.batch_size=2", "data.seq_length=64", "synthetic.min_tokens=64",
        "synthetic.max_tokens=64", "synthetic.tiles=1", "train.device=cpu"]


def run(nproc: int, config: Path, out: Path, steps: int, global_batch: int, extra: list[str],
        timeout: float) -> dict:
    """One `stitch train` run with `nproc` processes; its summary, or why there is none."""
    stitch = ["-m", "stitch", "train", str(config), f"output_dir={out}", f"train.steps={steps}",
              f"train.global_batch_size={global_batch}", "log.plot=false", "log.progress=false",
              "checkpoint.every=0", "checkpoint.at_end=false", "checkpoint.save_final=false", *extra]
    if nproc == 1:
        cmd = [sys.executable, *stitch]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *stitch,
               f"parallel.dp={nproc}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    summary = out / "summary.json"
    if proc.returncode != 0 or not summary.exists():
        return dict(status="failed", returncode=proc.returncode, log_tail=(proc.stdout + proc.stderr)[-3000:])
    return dict(status="ok", command=" ".join(cmd), **json.loads(summary.read_text()))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=RECIPE)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--global-batch", type=int, default=None,
                    help="the one-process run's global batch (default: the recipe's); N processes get N times it")
    ap.add_argument("--tiny", action="store_true", help="vlm-tiny on the CPU (gloo): checks the script, not speed")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("overrides", nargs="*", help="key=value overrides for both runs (after --)")
    args = ap.parse_args(argv)
    extra = (TINY if args.tiny else []) + list(args.overrides)
    if args.global_batch is None:
        sys.path.insert(0, str(REPO))
        from stitch.train.config import load_config

        args.global_batch = load_config(args.config, extra).train.global_batch_size
    work = Path(tempfile.mkdtemp(prefix="dp_scaling_"))
    try:
        single = run(1, args.config, work / "dp1", args.steps, args.global_batch, extra, args.timeout)
        multi = run(args.nproc, args.config, work / f"dp{args.nproc}", args.steps, args.global_batch * args.nproc,
                    extra, args.timeout)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    efficiency = None
    if single["status"] == multi["status"] == "ok":
        efficiency = multi["tokens_per_s"] / (args.nproc * single["tokens_per_s"])
    device = single.get("device") or multi.get("device") or "unknown"
    report = dict(benchmark="dp_scaling", config=str(args.config.relative_to(REPO) if args.config.is_relative_to(REPO)
                                                     else args.config),
                  overrides=extra, nproc=args.nproc, steps=args.steps, global_batch_single=args.global_batch,
                  efficiency=None if efficiency is None else round(efficiency, 4), single=single, multi=multi)
    out = write_json(args.out or RESULTS_DIR / f"dp_scaling_{name_slug(device)}.json", report)
    for name, r in (("1 process", single), (f"{args.nproc} processes", multi)):
        print(f"{name}: " + (f"{r['tokens_per_s']:,.0f} tokens/s" if r["status"] == "ok" else
                             f"failed (exit {r['returncode']})\n{r['log_tail']}"))
    if efficiency is not None:
        print(f"scaling efficiency: {100 * efficiency:.1f}%  (written to {out})")
    return report


if __name__ == "__main__":
    main()
