"""Parsing for the commands built from a function's signature with jsonargparse (``sacpo merge``, ``sacpo export``)."""

from __future__ import annotations

from typing import Any

from jsonargparse import ArgumentParser


def parse_command(parser: ArgumentParser, argv: list[str]) -> tuple[dict[str, Any] | None, int]:
    """The parsed options as keyword arguments (``--config`` left out), or ``None`` with the exit status when
    jsonargparse already handled the command line (``--help``, ``--print_config`` or a usage error it printed)."""
    try:
        config = parser.parse_args(argv)
    except SystemExit as exit_:
        code = exit_.code
        return None, 0 if code is None else code if isinstance(code, int) else 2
    return {key: value for key, value in config.as_dict().items() if key != "config"}, 0
