"""Parsing for the commands built from signatures and dataclasses with jsonargparse (``sacpo merge``, ``export``,
``evaluate``, ``generate``, ``pipeline``)."""

from __future__ import annotations

import json
import math
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from jsonargparse import ArgumentParser

__all__ = ["command_argv", "parse_command"]


def parse_command(parser: ArgumentParser, argv: list[str]) -> tuple[dict[str, Any] | None, int]:
    """The parsed options as keyword arguments (``--config`` left out), or ``None`` with the exit status when
    jsonargparse already handled the command line (``--help``, ``--print_config`` or a usage error it printed)."""
    try:
        config = parser.parse_args(argv)
    except SystemExit as exit_:
        code = exit_.code
        return None, 0 if code is None else code if isinstance(code, int) else 2
    return {key: value for key, value in config.as_dict().items() if key != "config"}, 0


def _unwrap(hint: Any) -> Any:
    """``X`` of ``X | None`` (and of ``Optional[X]``); other hints unchanged."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return hint


def _list_member(hint: Any) -> Any:
    """The ``list[X]`` of a union such as ``list[str] | dict[str, str]`` (a list option that also takes a mapping in
    YAML); other hints unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if typing.get_origin(a) is list]
        if len(members) == 1:
            return members[0]
    return hint


def _yaml_number(token: str) -> str:
    """A number in the YAML form jsonargparse reads (``.nan``, ``.inf``, ``1e-05``); a token that is not a number
    unchanged, so that jsonargparse names it in its error."""
    try:
        value = float(token)
    except ValueError:
        return token
    if math.isnan(value):
        return ".nan"
    if math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    return repr(value)


def command_argv(argv: Sequence[str], sources: Sequence[type | Callable]) -> list[str]:
    """``argv`` in jsonargparse's syntax for the options of ``sources`` (dataclasses or functions):

    - dashed names (``--kl-prompts``) become the underscore ones (``--kl_prompts``);
    - a bare boolean flag (``--do_sample``) becomes ``--do_sample=true``;
    - the values after every occurrence of a list option (``--models a b --models c``, ``--weights 0.25 0.5``; also
      of a union with one list, like ``list[str] | dict[str, str]``) become one list at its first occurrence:
      numbers in YAML form for a list of numbers, JSON strings otherwise.
      A single value that is already a list (``--weights [0.25,0.5]``) is passed as it is.
    """
    hints: dict[str, Any] = {}
    for source in sources:
        hints.update({k: _unwrap(v) for k, v in typing.get_type_hints(source).items() if k != "return"})
    flags = {name for name, hint in hints.items() if hint is bool}
    lists = {name: (typing.get_args(hint) or (str,))[0] for name, hint in
             ((name, _list_member(hint)) for name, hint in hints.items()) if typing.get_origin(hint) is list}
    out: list[str] = []
    values: dict[str, list[str]] = {}
    i = 0
    while i < len(argv):
        token, i = argv[i], i + 1
        if not token.startswith("--"):
            out.append(token)
            continue
        name, eq, value = token[2:].partition("=")
        name = name.replace("-", "_")
        if name in flags and not eq and (i == len(argv) or argv[i].startswith("--")):
            out.append(f"--{name}=true")
        elif name in lists and not eq:
            if name not in values:
                values[name] = []
                out.append(name)  # placeholder, replaced below
            while i < len(argv) and not argv[i].startswith("--"):
                values[name].append(argv[i])
                i += 1
        else:
            out.append(f"--{name}{eq}{value}")

    def joined(name: str) -> list[str]:
        items = values[name]
        if len(items) == 1 and items[0].lstrip().startswith("["):
            return [f"--{name}", items[0]]
        if not items:
            return [f"--{name}"]  # jsonargparse reports the missing value
        if lists[name] in (int, float):
            return [f"--{name}=[{', '.join(_yaml_number(v) for v in items)}]"]
        return [f"--{name}={json.dumps(items)}"]

    return [part for token in out
            for part in (joined(token) if token in values and not token.startswith("-") else [token])]
