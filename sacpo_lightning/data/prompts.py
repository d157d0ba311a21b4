"""Prompt sets (the evaluation and KL prompt files) and the text a model continues for a prompt.

A prompt set is a JSON list or JSON lines of ``{"prompt": str, "category": str?}`` objects (the shared sets are
``eval/safety_problem.json`` and ``eval/helpful_problem.json``). A prompt is formatted with the tokenizer's chat
template (``template="chat"``), the PKU-SafeRLHF plain template (``template="pku"``), any format string containing
``{input}``, or left as it is (``template="raw"``); the named templates render exactly as in the training pairs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sacpo_lightning.data.formatting import render_prompt
from sacpo_lightning.errors import MissingFileError, UserError

__all__ = ["NAMED_TEMPLATES", "format_prompt", "load_prompts"]

NAMED_TEMPLATES = ("chat", "pku", "raw")


def _check_prompt_row(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object with a 'prompt' field, got {type(row).__name__}")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}")
    category = row.get("category")
    if category is not None and not isinstance(category, str):
        raise UserError(f"{where}: 'category' must be a string when present, got {category!r}")
    return {"prompt": prompt, "category": category}


def load_prompts(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads ``{prompt, category?}`` rows from a JSON list or a JSON-lines file.

    Returns:
        A list of ``{"prompt": str, "category": str | None}``.

    Raises:
        UserError: Naming the file and the line (JSONL) or item (JSON list) of a malformed row, or an empty set.
        MissingFileError: The file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"prompt file {path} does not exist; pass a JSON list or JSON-lines file of prompts.")
    text = path.read_text(encoding="utf-8")
    rows: list[dict[str, Any]] = []
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON ({err})") from None
        rows = [_check_prompt_row(item, f"{path}: item {i}") for i, item in enumerate(items)]
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{lineno}: not valid JSON ({err})") from None
            rows.append(_check_prompt_row(item, f"{path}:{lineno}"))
    if not rows:
        raise UserError(f"{path}: no prompts found")
    return rows


def format_prompt(tokenizer, prompt: str, template: str = "chat") -> str:
    """The text the model continues: ``chat``/``pku``/``raw`` as in training, or a format string with ``{input}``.

    The named templates are rendered by :func:`sacpo_lightning.data.formatting.render_prompt`, so a prompt looks
    exactly as it did in the training pairs.
    """
    if template in NAMED_TEMPLATES:
        return render_prompt(prompt, template, tokenizer)
    return template.replace("{input}", prompt)
