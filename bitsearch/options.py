"""Options declared once: a dataclass field carries its help, choices and default, and the same
declaration builds the command line's flags and the Python API's config object.

    @dataclass
    class EvalConfig:
        seq_len: int = option(512, help="window length in tokens")

    add_options(parser, EvalConfig)        # --seq-len N   (help: "window length in tokens (default: 512)")
    config = from_args(EvalConfig, args)   # EvalConfig(seq_len=args.seq_len)

A field's flag is ``--`` + its name with dashes, unless ``flag`` says otherwise; ``aliases`` are
older spellings that still parse and are hidden from ``--help``. A boolean field that defaults to
True is switched off by its flag (``negate``: e.g. ``coupling`` ↔ ``--no-coupling``). ``choices``
may be a callable (a registry's names, read when the parser is built). ``group`` puts the flag in a
titled section of ``--help`` (e.g. the options of one search method). ``cli=False`` keeps a field
out of the command line (set by the CLI itself, e.g. ``show_progress`` from ``--quiet``).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable

from .errors import BitsearchError

__all__ = ["option", "add_options", "from_args", "check_choices", "option_flag", "replace_config"]

_MISSING = dataclasses.MISSING


def option(
    default: Any = _MISSING,
    *,
    help: str,
    choices: list | Callable[[], list] | None = None,
    flag: str | None = None,
    aliases: tuple[str, ...] = (),
    metavar: str | None = None,
    group: str | None = None,
    cli: bool = True,
    append: bool = False,
    show_default: bool = True,
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field with its command-line declaration in ``metadata``."""
    meta = {
        "help": help,
        "choices": choices,
        "flag": flag,
        "aliases": tuple(aliases),
        "metavar": metavar,
        "group": group,
        "cli": cli,
        "append": append,
        "show_default": show_default,
    }
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(hint) -> type:
    """int for ``int``, ``int | None`` and ``Optional[int]``; list for ``list[str] | None``."""
    if isinstance(hint, (types.UnionType,)) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0]
    origin = typing.get_origin(hint)
    return origin if origin is not None else hint


def _choices(meta) -> list | None:
    c = meta["choices"]
    return list(c()) if callable(c) else (list(c) if c is not None else None)


def option_flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _fields(cls) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def add_options(parser: argparse.ArgumentParser, cls, exclude: tuple[str, ...] = ()) -> None:
    """Add a flag for every command-line field of the dataclass ``cls`` (``exclude``: field names)."""
    groups: dict[str, Any] = {}
    for f, hint in _fields(cls):
        if f.name in exclude:
            continue
        meta = f.metadata
        where = parser
        if meta.get("group"):
            where = groups.get(meta["group"]) or groups.setdefault(
                meta["group"], parser.add_argument_group(meta["group"])
            )
        flag = option_flag(f)
        default = f.default if f.default is not _MISSING else f.default_factory()
        base = _base_type(hint)
        text = meta["help"]
        kwargs: dict[str, Any] = {"dest": f.name}
        if base is bool:
            kwargs["action"] = "store_false" if default else "store_true"
            kwargs["default"] = default
        else:
            choices = _choices(meta)
            if choices is not None:
                kwargs["choices"] = choices
            if meta.get("append"):
                kwargs["action"] = "append"
                kwargs["default"] = None
            else:
                kwargs["type"] = {int: int, float: float}.get(base, str)
                kwargs["default"] = default
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
            if default is not None and meta.get("show_default", True) and not meta.get("append"):
                text = f"{text} (default: {default})"
        where.add_argument(flag, help=text, **kwargs)
        for alias in meta.get("aliases", ()):
            hidden = {k: v for k, v in kwargs.items() if k not in ("default", "metavar")}
            where.add_argument(alias, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **hidden)


def from_args(cls, args: argparse.Namespace, **overrides):
    """The config object ``cls`` from parsed arguments (fields the parser lacks keep their default)."""
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if f.metadata.get("cli", True) and hasattr(args, f.name)
    }
    values.update(overrides)
    return cls(**values)


def check_choices(config) -> None:
    """Raise a one-line error for a field whose value is outside its declared choices (API callers
    bypass argparse's check)."""
    for f in dataclasses.fields(config):
        choices = _choices(f.metadata) if "choices" in f.metadata else None
        value = getattr(config, f.name)
        if choices is not None and value is not None and value not in choices:
            raise BitsearchError(f"{f.name} '{value}' is not one of {', '.join(map(str, choices))}")


def replace_config(config, **changes):
    """A copy of ``config`` with ``changes`` (names checked, so a typo is an error, not ignored)."""
    names = {f.name for f in dataclasses.fields(config)}
    bad = sorted(set(changes) - names)
    if bad:
        raise BitsearchError(f"{type(config).__name__} has no option '{bad[0]}'")
    return dataclasses.replace(config, **changes)
