"""Prompt sets (the evaluation and KL prompt files) and the text a model continues for a prompt.

A prompt set is a JSON list or JSON lines of ``{"prompt": str, "category": str?}`` objects (the shared sets are
``eval/safety_problem.json`` and ``eval/helpful_problem.json``). A prompt is formatted with the tokenizer's chat
template (``template="chat"``), the PKU-SafeRLHF plain template (``template="pku"``), any format string containing
``{input}``, or left as it is (``template="raw"``); the named templates render exactly as in the training pairs.

A suite prompt file is a CSV in XSTest's layout (:func:`load_xstest_prompts`): ``id, prompt, type, label`` and the
optional ``focus, note``, with ``label`` ``safe`` (a prompt that only looks unsafe) or ``unsafe``.
:func:`xstest_subset` takes a deterministic stratified subset of it.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from sacpo_lightning.data.formatting import render_prompt
from sacpo_lightning.errors import MissingFileError, UserError
from sacpo_lightning.io import numbered_csv_rows

__all__ = [
    "DEFAULT_XSTEST_PROMPTS", "NAMED_TEMPLATES", "XSTEST_COLUMNS", "XSTEST_LABELS", "format_prompt", "load_prompts",
    "load_xstest_prompts", "xstest_subset",
]

NAMED_TEMPLATES = ("chat", "pku", "raw")
# Read from the working directory, like the other default evaluation prompt files (../shared/data beside the project).
DEFAULT_XSTEST_PROMPTS = "../shared/data/eval/xstest_prompts.csv"
XSTEST_COLUMNS = ("id", "prompt", "type", "label")  # required; "focus" and "note" are optional
XSTEST_OPTIONAL_COLUMNS = ("focus", "note")
XSTEST_LABELS = ("safe", "unsafe")


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


# The halves of a prompt file that the safety budget (0: rows at even positions) and the evaluation (1: odd
# positions) use when both read the same file, so the measurement is made on prompts the prediction never saw.
BUDGET_HALF, EVALUATION_HALF = 0, 1


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


def _xstest_row(record: list[str], header: list[str], where: str) -> dict[str, str]:
    if len(record) != len(header):
        raise UserError(f"{where}: {len(record)} fields but the header has {len(header)} ({','.join(header)}); "
                         "quote a field that contains a comma")
    row = dict(zip(header, record, strict=True))
    for column in ("id", "prompt", "type"):
        if not row[column].strip():
            raise UserError(f"{where}: column '{column}' is empty; every row needs an id, a prompt and a type")
    label = row["label"].strip().lower()
    if label not in XSTEST_LABELS:
        raise UserError(f"{where}: column 'label' must be 'safe' (a prompt that only looks unsafe) or 'unsafe', got "
                         f"{row['label']!r}")
    out = {"id": row["id"].strip(), "prompt": row["prompt"], "type": row["type"].strip(), "label": label}
    out.update({c: row.get(c, "") for c in XSTEST_OPTIONAL_COLUMNS})
    return out


def load_xstest_prompts(path: str | os.PathLike, *, option: str = "--xstest_prompts") -> list[dict[str, str]]:
    """Reads an XSTest-style prompt file: a CSV with a header line and the columns ``id, prompt, type, label``
    (``focus`` and ``note`` optional, other columns ignored), ``label`` being ``safe`` or ``unsafe``.

    Args:
        path: The CSV file (a relative path is read from the working directory).
        option: How error messages name the setting that chooses the file.

    Returns:
        The rows in file order, as ``{"id", "prompt", "type", "label", "focus", "note"}`` strings.

    Raises:
        FileNotFoundError: No such file; the message names ``option``.
        ValueError: Naming the file and line of a missing column, an empty field, an unknown label, a duplicate id,
            or a file without rows.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"XSTest prompt file {path} not found (a relative path is read from {Path.cwd()}); pass {option} PATH, a "
            f"CSV with the columns {','.join(XSTEST_COLUMNS)} (as XSTest v2's xstest_prompts.csv, which is "
            f"{DEFAULT_XSTEST_PROMPTS} beside the project)")
    rows: list[dict[str, str]] = []
    first_line: dict[str, int] = {}
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise UserError(f"{path}: empty file; expected a header line {','.join(XSTEST_COLUMNS)},focus,note") \
                from None
        except csv.Error as err:
            raise UserError(f"{path}:1: not valid CSV ({err})") from None
        missing = [c for c in XSTEST_COLUMNS if c not in header]
        if missing:
            raise UserError(f"{path}:1: missing column(s) {', '.join(missing)} in the header ({','.join(header)}); "
                             f"the first line must name the columns {','.join(XSTEST_COLUMNS)} (focus and note are "
                             "optional)")
        for start, record in numbered_csv_rows(reader, path, UserError):
            row = _xstest_row(record, header, f"{path}:{start}")
            if row["id"] in first_line:
                raise UserError(f"{path}:{start}: id {row['id']!r} is already used on line {first_line[row['id']]}; "
                                 "ids must be unique")
            first_line[row["id"]] = start
            rows.append(row)
    if not rows:
        raise UserError(f"{path}: no prompts found below the header")
    return rows


def xstest_subset(rows: list[dict[str, str]], per_type: int | None) -> list[dict[str, str]]:
    """At most ``per_type`` rows of every (type, label) group, evenly spaced within the group, in file order.

    Deterministic, and every type (so both safe and unsafe prompts) keeps at least one row; ``None`` keeps all rows.

    Raises:
        ValueError: ``per_type`` below 1.
    """
    if per_type is None:
        return list(rows)
    if per_type < 1:
        raise ValueError(f"--xstest_per_type must be >= 1 (or unset for every prompt), got {per_type}")
    groups: dict[tuple[str, str], list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault((row["type"], row["label"]), []).append(i)
    picked: list[int] = []
    for indices in groups.values():
        k = min(per_type, len(indices))
        picked += [indices[(j * len(indices)) // k] for j in range(k)]
    return [rows[i] for i in sorted(picked)]
