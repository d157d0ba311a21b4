"""Errors the user can fix: a bad option, malformed data, a missing file, model or optional extra.

``sacpo`` (:func:`sacpo_lightning.cli.main`) ends on one of these with its message alone on stderr and exit status 2;
``--debug`` or ``SACPO_DEBUG=1`` shows the traceback too. Any other exception is a bug and keeps its traceback.

Each class also derives from the builtin a caller would catch for that kind of failure (``ValueError`` for all,
``FileNotFoundError``, ``ModuleNotFoundError``, ``PermissionError``), so ``except ValueError`` and the like keep
working.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = [
    "DEBUG_ENV",
    "MissingDependencyError",
    "MissingFileError",
    "NotWritableError",
    "UserError",
    "debug_enabled",
    "find_user_error",
    "require_extra",
]

DEBUG_ENV = "SACPO_DEBUG"


class UserError(ValueError):
    """An error the user caused and can fix; the message names the option, file (and line) and the fix."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (data, prompts, a model or an earlier step's export) does not exist."""


class MissingDependencyError(UserError, ModuleNotFoundError):
    """An optional package a chosen feature needs is not installed; the message says what to install."""


class NotWritableError(UserError, PermissionError):
    """An output folder the user chose cannot be created or written."""


def debug_enabled() -> bool:
    """Whether tracebacks of user errors are shown (``SACPO_DEBUG`` set to anything but ``""``/``0``/``false``)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def find_user_error(err: BaseException) -> UserError | None:
    """The :class:`UserError` that ``err`` is or was raised from (libraries such as jsonargparse wrap the errors of
    the classes they instantiate in their own ``ValueError``); ``None`` when there is none, i.e. ``err`` is a bug."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, UserError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def require_extra(module: str, *, extra: str, feature: str, alternative: str = "") -> ModuleType:
    """Imports ``module`` for ``feature``, or raises :class:`MissingDependencyError` naming the extra to install.

    Args:
        module: The module to import (e.g. ``"bitsandbytes"``).
        extra: The sacpo-lightning extra that installs it (e.g. ``"qlora"``).
        feature: The setting that needs it, as the user wrote it (e.g. ``"--model.policy.finetune=qlora"``).
        alternative: What to do instead when installing is not wanted (e.g. ``"Use finetune: lora instead."``).
    """
    try:
        return importlib.import_module(module)
    except Exception as err:  # a broken native library fails with OSError/RuntimeError, not only ImportError
        raise MissingDependencyError(
            f'{feature} needs {module} (the {extra} extra: pip install "sacpo-lightning[{extra}]"); importing it '
            f"failed: {err}." + (f" {alternative}" if alternative else "")
        ) from err
