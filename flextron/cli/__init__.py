"""The `flextron` command: thin wrappers over typed stage functions, imported lazily.

Every command prints progress on stderr and, as its last stdout line, one JSON object summarising
what it did. Flags, their defaults and their help come from each stage's config dataclass: a field
is a flag, its `#:` comment (Sphinx's convention: trailing, or on the lines above it) is the help,
a field without a default is a required flag, and a tuple field takes several values after one flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io
import json
import math
import os
import sys
import textwrap
import tokenize
import typing

from flextron.cli.stages import STAGES


@functools.lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """{field name: its `#:` documentation} for a dataclass, read from its source."""
    src = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT and tok.string.startswith("#:"):
            comments[tok.start[0]] = tok.string[2:].strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.COMMENT):
            code_lines.add(tok.start[0])
    lines = src.splitlines()
    docs = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for lineno, line in enumerate(lines, 1):
        name = line.strip().split(":", 1)[0]
        if name not in names or name in docs or not line.startswith(" ") or line.startswith(" " * 5):
            continue
        above, i = [], lineno - 1
        while i in comments and i not in code_lines:  # `#:` lines directly above
            above.insert(0, comments[i])
            i -= 1
        text = " ".join(above + ([comments[lineno]] if lineno in comments else []))
        if text:
            docs[name] = text
    return docs


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _metavar(name: str, typ) -> str:
    return {int: "N", float: "X"}.get(typ, name.split("_")[-1].upper())


def _add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else f.default if f.default is not dataclasses.MISSING else f.default_factory()
        doc = docs.get(f.name, "").replace("%", "%%")  # argparse formats help with %
        hint = hints[f.name]
        if hint is bool:
            parser.add_argument(_flag(f.name), default=default, action=argparse.BooleanOptionalAction,
                                help=doc or None)
            continue
        shown = "required" if required else f"default: {' '.join(map(str, default)) or 'none'}" \
            if isinstance(default, tuple) else "default: empty" if default == "" else f"default: {default}"
        help_ = f"{doc} ({shown})" if doc else f"({shown})"
        if typing.get_origin(hint) is tuple:  # several values after one flag (or the flag repeated)
            inner = typing.get_args(hint)[0]
            parser.add_argument(_flag(f.name), type=inner, nargs="+", action="extend", default=None,
                                required=required, metavar=_metavar(f.name, inner), help=help_)
        else:
            args = [t for t in typing.get_args(hint) if t is not type(None)]
            typ = args[0] if args else hint
            parser.add_argument(_flag(f.name), type=typ, default=default, required=required,
                                metavar=_metavar(f.name, typ), help=help_)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (to read its config dataclass)."""
    parser = argparse.ArgumentParser(prog="flextron",
                                     description="Flextron elastic LLMs: convert, profile, search, deploy.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, stage in STAGES.items():
        p = sub.add_parser(name, help=stage.help, description=stage.help)
        if name == command:
            _add_dataclass_args(p, stage.load()[0])
    return parser


def _args_to_config(cls, ns: argparse.Namespace):
    kwargs = {}
    for f in dataclasses.fields(cls):
        v = getattr(ns, f.name)
        if typing.get_origin(typing.get_type_hints(cls)[f.name]) is tuple:
            v = tuple(v) if v is not None else (f.default if f.default is not dataclasses.MISSING
                                                else f.default_factory())
        kwargs[f.name] = v
    return cls(**kwargs)


def main(argv: list[str] | None = None) -> int:
    from flextron.errors import FlextronError

    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    ns = build_parser(command if command in STAGES else None).parse_args(argv)
    cls, fn = STAGES[ns.command].load()
    try:
        summary = fn(_args_to_config(cls, ns))
    except FlextronError as e:
        print(f"flextron {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flextron {ns.command}: interrupted; finished work is kept and the command resumes where it stopped",
              file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary line (rank 0's), not one per process
        print(json.dumps(_finite_or_null(summary), default=str, allow_nan=False))
    return 0


def _finite_or_null(obj):
    """The summary as strict JSON: a NaN or infinite number (a missing measurement) becomes null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


if __name__ == "__main__":
    sys.exit(main())
