"""The `stitch` command.

Each sub-command lives beside the code it drives, as a pair of functions in one module:
`NAME_arguments(parser)` adds its flags and `NAME(args) -> int` runs it (the function's docstring is its help,
and an `Example:` section in that docstring is shown under `--help`). This file only routes, so heavy imports
(torch, transformers) happen only for the command that runs.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys

from stitch.errors import StitchError

# command -> "module:function"; "data" has sub-commands of its own.
COMMANDS: dict[str, str | dict[str, str]] = {
    "build": "stitch.checkpoint.commands:build",
    "import-hf": "stitch.checkpoint.commands:import_hf",
    "export-hf": "stitch.checkpoint.commands:export_hf",
    "reshard": "stitch.checkpoint.reshard:reshard",
    "data": {"check": "stitch.data.check:check"},
    "train": "stitch.train.command:train",
    "generate": "stitch.infer.generate:generate_cmd",
    "eval": "stitch.eval.runner:eval_cmd",
    "score": "stitch.eval.runner:score_cmd",
    "serve": "stitch.infer.server:serve",
    "demo": "stitch.infer.demo:demo",
    "quickstart": "stitch.quickstart:quickstart",
    "env": "stitch.env:env",
}


def _resolve(target: str):
    module_name, func_name = target.split(":")
    module = importlib.import_module(module_name)
    return getattr(module, func_name), getattr(module, f"{func_name}_arguments", None)


def _add(sub: argparse._SubParsersAction, name: str, target: str, wanted: bool) -> None:
    """Register `name`; its module is imported only when this command (or its --help) is asked for."""
    if not wanted:
        sub.add_parser(name, help=f"(see `stitch {name} --help`)", add_help=False)
        return
    func, add_arguments = _resolve(target)
    doc = inspect.getdoc(func) or ""
    summary, _, rest = doc.partition("\n")
    parser = sub.add_parser(
        name, help=summary, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if add_arguments is not None:
        add_arguments(parser)
    parser.set_defaults(_func=func)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stitch",
        description="Stitch a vision encoder to an LLM, train, evaluate, serve and export VLMs (NVLM style).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = argv[0] if argv else None
    for name, target in COMMANDS.items():
        if isinstance(target, dict):
            group = sub.add_parser(name, help=f"{name} tools: {', '.join(target)}")
            group_sub = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
            inner = argv[1] if chosen == name and len(argv) > 1 else None
            for inner_name, inner_target in target.items():
                _add(group_sub, inner_name, inner_target, wanted=inner == inner_name)
        else:
            _add(sub, name, target, wanted=chosen == name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help") or not argv:
        # Top-level help lists every command with its one-line summary (imports each module once).
        parser = argparse.ArgumentParser(prog="stitch", description=build_parser([]).description)
        sub = parser.add_subparsers(dest="command", metavar="COMMAND")
        for name, target in COMMANDS.items():
            if isinstance(target, dict):
                sub.add_parser(name, help=f"{name} tools: {', '.join(target)} (stitch {name} --help)")
                continue
            try:
                doc = inspect.getdoc(_resolve(target)[0]) or ""
            except (ImportError, AttributeError):
                doc = "(not available in this install)"
            sub.add_parser(name, help=doc.partition("\n")[0])
        parser.print_help()
        return 0 if argv else 2
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    func = getattr(args, "_func", None)
    if func is None:
        parser.parse_args([*argv, "--help"])
        return 2
    try:
        return int(func(args) or 0)
    except StitchError as e:
        print(f"stitch {args.command}: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"stitch {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
