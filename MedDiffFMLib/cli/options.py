"""Command-line options made from parameter specs (``tasks.registry.ParamSpec``).

Each spec gives the flag its help, default, metavar (choices, length) and, after parsing, its
check (type, bounds, finiteness, length, choices): nothing about a parameter is written twice.
Options are parsed as text and checked by the spec, so every message names the flag, the
value and what is allowed, e.g. ``parameter '--strength' must be > 0, got '-1'``.
"""

from __future__ import annotations

import argparse
from typing import Any, Mapping

from .errors import UsageError


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _help(spec) -> str:
    bounds = ""
    if spec.type in (int, float) and (spec.minimum is not None or spec.maximum is not None):
        lo = "" if spec.minimum is None else f"{spec.minimum:g}"
        hi = "" if spec.maximum is None else f"{spec.maximum:g}"
        left = "(" if spec.exclusive_minimum else "["
        bounds = f"; {left}{lo}, {hi}]" if lo and hi else (f"; >= {lo}" if lo else f"; <= {hi}")
        if spec.exclusive_minimum and lo and not hi:
            bounds = f"; > {lo}"
    unit = f" {spec.unit}" if spec.unit and spec.default is not None and not isinstance(spec.default, bool) else ""
    default = "automatic" if spec.default is None else (
        " ".join(str(v) for v in spec.default) if isinstance(spec.default, (tuple, list)) else spec.default)
    return f"{spec.help} (default: {default}{unit}{bounds})".replace("%", "%%")


def add_spec_options(group, specs: Mapping[str, Any]) -> None:
    """One option per spec; values the user does not give are left out of the namespace."""
    for name, spec in specs.items():
        if spec.type is bool:
            group.add_argument(flag(name), dest=name, default=argparse.SUPPRESS, action=argparse.BooleanOptionalAction,
                               help=_help(spec))
            continue
        metavar = "{" + ",".join(spec.choices) + "}" if spec.choices else name.upper()
        if spec.length is not None:
            axes = ("K", "J", "I") if spec.length == 3 else tuple(f"V{n}" for n in range(spec.length))
            group.add_argument(flag(name), dest=name, default=argparse.SUPPRESS, nargs=spec.length, metavar=axes,
                               help=_help(spec))
        else:
            group.add_argument(flag(name), dest=name, default=argparse.SUPPRESS, metavar=metavar, help=_help(spec))


def given_values(args: argparse.Namespace, specs: Mapping[str, Any]) -> dict[str, Any]:
    """The options the user gave, each checked by its spec (a one-line error naming the flag)."""
    out = {}
    for name, spec in specs.items():
        if hasattr(args, name):
            try:
                out[name] = spec.check(flag(name), getattr(args, name))
            except ValueError as e:
                raise UsageError(str(e)) from None
    return out


def all_values(args: argparse.Namespace, specs: Mapping[str, Any]) -> dict[str, Any]:
    """Every option: the given ones checked, the rest at their defaults."""
    values = given_values(args, specs)
    return {name: values.get(name, spec.default) for name, spec in specs.items()}
