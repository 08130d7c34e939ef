"""The `flextron` command: thin wrappers over typed stage functions, imported lazily.

Every command prints progress on stderr and, as its last stdout line, one JSON object summarising
what it did. Flags and their defaults come from each stage's config dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import typing

# command -> (module, config class, function, help)
COMMANDS = {
    "convert": ("flextron.convert", "ConvertConfig", "convert", "make a nested elastic model from a source model"),
    "eval": ("flextron.evaluate", "EvalConfig", "evaluate", "validation perplexity of one sub-network"),
    "export": ("search.export", "ExportConfig", "export", "write a sliced sub-model or the budget lookup table"),
    "profile": ("profiler.sweep", "ProfileConfig", "profile", "measure every layer width and sub-networks end to end"),
    "fit": ("profiler.latency_model", "FitConfig", "fit", "fit the latency model and report its held-out error"),
    "search": ("search.optuna_search", "SearchConfig", "search", "Optuna search for sub-networks under budgets"),
    "verify": ("search.verify", "VerifyConfig", "verify", "measure chosen configs on the device; replace misses"),
    "report": ("reports.build", "ReportConfig", "build_report", "HTML + PNG + Markdown report of a run"),
    "train": ("flextron.train", "TrainConfig", "train", "elastic continued training (sandwich distillation)"),
    "route": ("search.route", "RouteConfig", "route", "train the static and dynamic routers, or pick a config for --budget-ms"),
    "lookup": ("search.lookup", "LookupConfig", "lookup", "the lookup row a budget is served by (config, latency, ppl)"),
    "run": ("flextron.pipeline", "RunConfig", "run_pipeline", "convert → profile → fit → search → verify → export → report"),
}


def _add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        hint = hints[f.name]
        if hint is bool:
            parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction)
        elif typing.get_origin(hint) is tuple:  # repeatable flag
            inner = typing.get_args(hint)[0]
            parser.add_argument(flag, type=inner, action="append", default=None,
                                help=f"repeatable (default {list(default)})")
        else:
            typ = next((t for t in typing.get_args(hint) if t is not type(None)), hint) if typing.get_args(hint) else hint
            parser.add_argument(flag, type=typ, default=default, help=f"default: {default}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (to read its config dataclass)."""
    parser = argparse.ArgumentParser(prog="flextron", description="Flextron elastic LLMs: convert, profile, search, deploy.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (mod, cls_name, _fn, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == command:
            _add_dataclass_args(p, getattr(importlib.import_module(mod), cls_name))
    return parser


def _args_to_config(cls, ns: argparse.Namespace):
    kwargs = {}
    for f in dataclasses.fields(cls):
        v = getattr(ns, f.name)
        if typing.get_origin(typing.get_type_hints(cls)[f.name]) is tuple:
            v = tuple(v) if v is not None else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        kwargs[f.name] = v
    return cls(**kwargs)


def main(argv: list[str] | None = None) -> int:
    from flextron.errors import FlextronError

    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    ns = build_parser(command if command in COMMANDS else None).parse_args(argv)
    mod, cls_name, fn_name, _ = COMMANDS[ns.command]
    module = importlib.import_module(mod)
    try:
        cfg = _args_to_config(getattr(module, cls_name), ns)
        summary = getattr(module, fn_name)(cfg)
    except FlextronError as e:
        print(f"flextron {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flextron {ns.command}: interrupted; finished work is kept and the command resumes where it stopped",
              file=sys.stderr)
        return 130
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
