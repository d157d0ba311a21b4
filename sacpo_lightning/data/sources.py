"""Preference data sources: file readers, row validation and conversion into records.

Every row read from a file carries its origin (``path:line`` for JSON lines, ``path[index]`` for a JSON list or a
Parquet table, ``hub:id[split][index]`` for a Hub dataset), and every problem with a row is reported with that origin,
the field concerned and a way to fix it. With ``on_invalid="error"`` (the default) a file with bad rows is refused as a
whole; with ``on_invalid="skip"`` the bad rows are dropped and counted per reason.

Supported sources (field names are the defaults; ``column_mapping`` renames them):

``pku``      PKU-SafeRLHF rows ``prompt, response_0, response_1, is_response_0_safe, is_response_1_safe,
             better_response_id, safer_response_id``. Pairs follow ``better_response_id`` (objective ``helpful``) or
             ``safer_response_id`` (objective ``safe``); KTO examples come from the ``is_response_*_safe`` flags
             (two per row, desirable = safe; objective ``safe`` only) or from the pairs of the objective
             (``kto_from: pairs``: for ``helpful`` the ``better_response_id`` response is desirable, the other not).
``hh``       Anthropic HH-RLHF rows ``prompt, chosen, rejected`` whose prompt is a ``\\n\\nHuman: ... \\n\\nAssistant:``
             transcript (parsed into chat messages), or rows with only ``chosen`` and ``rejected`` full transcripts
             (split after the last ``\\n\\nAssistant:`` they share).
``generic``  TRL's preference rows ``prompt, chosen, rejected``, standard (text) or conversational (lists of
             ``{role, content}`` messages), with an explicit ``prompt`` or an implicit one (no ``prompt`` field: the
             prompt is the shared prefix of ``chosen`` and ``rejected``, messages for conversational rows, characters
             for text rows as TRL's ``extract_prompt`` cuts it). A conversational pair trains on its final assistant
             turn only: every message before it belongs to the prompt, so ``chosen`` and ``rejected`` must end with
             one assistant message each and agree on every message before it.
``kto``      TRL's unpaired rows ``prompt, completion, label`` (label true = desirable), standard or conversational
             (``completion`` a list of messages ending with the assistant turn that is trained on).
``auto``     the source is read from the first row of each file (:func:`detect_source`) and logged.

Files are JSON lines, JSON lists, Parquet tables, CSV files (read like JSON lines: one row a record, origins
``path:line``; cells ``true``/``false``/``0``/``1`` are accepted as labels and a cell holding a JSON list of messages
as a conversation), or Hub datasets (``hub:``, see :func:`parse_hub_ref`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from sacpo_lightning.errors import MissingFileError, UserError
from sacpo_lightning.io import numbered_csv_rows

__all__ = [
    "DataError",
    "KTORecord",
    "LoadResult",
    "PairRecord",
    "HubRef",
    "SourceSpec",
    "detect_source",
    "load_records",
    "parse_hub_ref",
    "parse_hh_transcript",
    "prompt_key",
    "read_rows",
    "resolve_data_path",
    "split_by_prompt",
    "split_hh_pair",
    "subsample",
]

Messages = list[dict[str, str]]
Prompt = Messages | str

SOURCES = ("pku", "hh", "generic", "kto", "auto")
SOURCE_FIELDS: dict[str, tuple[str, ...]] = {
    "pku": (
        "prompt",
        "response_0",
        "response_1",
        "is_response_0_safe",
        "is_response_1_safe",
        "better_response_id",
        "safer_response_id",
    ),
    "hh": ("prompt", "chosen", "rejected"),
    "generic": ("prompt", "chosen", "rejected"),
    "kto": ("prompt", "completion", "label"),
}
SOURCE_FIELDS["auto"] = tuple(dict.fromkeys(f for fields in SOURCE_FIELDS.values() for f in fields))
HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HUB_PREFIX = "hub:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)*$")
_LOCAL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".parquet", ".pq", ".csv")
_HUB_KEYS = ("config", "data_dir", "split", "revision")
_ROLES = ("system", "user", "assistant")
_SKIP_HINT = "set --data.on_invalid skip to drop such rows"


class DataError(UserError):
    """A data file or row that cannot be used; the message names the file, line and field and how to fix it."""


@dataclass(frozen=True)
class PairRecord:
    """One preference pair.

    Attributes:
        prompt: Chat messages (``{"role", "content"}`` dicts, the last one a user turn) or a plain string.
        chosen: The preferred response text.
        rejected: The dispreferred response text.
        source: Where the row came from (``path:line``).
    """

    prompt: Prompt
    chosen: str
    rejected: str
    source: str


@dataclass(frozen=True)
class KTORecord:
    """One unpaired example: a response labelled desirable or undesirable."""

    prompt: Prompt
    completion: str
    desirable: bool
    source: str


Record = PairRecord | KTORecord


@dataclass(frozen=True)
class SourceSpec:
    """How rows of a source become records.

    Args:
        source: Row format (see the module docstring); ``auto`` reads it from the first row of each file.
        objective: For ``pku`` pairs: ``helpful`` uses ``better_response_id``, ``safe`` uses ``safer_response_id``.
        kind: ``pairs`` (DPO-style) or ``kto`` (unpaired).
        kto_from: For ``kind="kto"``: ``flags`` (PKU per-response safety flags, so objective ``safe`` only) or
            ``pairs`` (chosen desirable, rejected undesirable; for ``pku`` the pair of ``objective``, so helpful KTO
            makes the ``better_response_id`` response desirable).
        filter: ``safety_differs`` keeps only PKU rows whose two responses differ in safety.
        column_mapping: Renames fields: ``{"prompt": "question"}`` reads the prompt from column ``question``.
        on_invalid: ``error`` refuses a file with bad rows; ``skip`` drops and counts them.
        duplicates: Exact duplicate examples are dropped and counted (``drop``), kept (``keep``) or refused
            (``error``).
    """

    source: Literal["pku", "hh", "generic", "kto", "auto"] = "pku"
    objective: Literal["helpful", "safe"] = "safe"
    kind: Literal["pairs", "kto"] = "pairs"
    kto_from: Literal["flags", "pairs"] = "flags"
    filter: Literal["none", "safety_differs"] = "none"
    column_mapping: dict[str, str] | None = None
    on_invalid: Literal["error", "skip"] = "error"
    duplicates: Literal["drop", "keep", "error"] = "drop"

    def __post_init__(self) -> None:
        _check_choice("--data.source", self.source, SOURCES)
        _check_choice("--data.objective", self.objective, ("helpful", "safe"))
        _check_choice("--data.kind", self.kind, ("pairs", "kto"))
        _check_choice("--data.kto_from", self.kto_from, ("flags", "pairs"))
        _check_choice("--data.filter", self.filter, ("none", "safety_differs"))
        _check_choice("--data.on_invalid", self.on_invalid, ("error", "skip"))
        _check_choice("--data.duplicates", self.duplicates, ("drop", "keep", "error"))
        if self.source == "auto":
            self._check_mapping()
            return  # the checks below run again on the detected source (see ``detect_source``)
        if self.source == "kto" and self.kind != "kto":
            raise UserError("--data.source kto holds unpaired rows; set --data.kind kto.")
        if self.kind == "kto" and self.kto_from == "flags" and self.source not in ("pku", "kto"):
            raise UserError(
                f"--data.kto_from flags needs per-response safety flags (--data.source pku), but the source is "
                f"{self.source!r}; set --data.kto_from pairs (chosen desirable, rejected undesirable)."
            )
        if self.kind == "kto" and self.kto_from == "flags" and self.source == "pku" and self.objective == "helpful":
            # The is_response_*_safe flags label safety; helpfulness KTO from them would train on the wrong objective.
            raise UserError(
                "--data.kto_from flags makes KTO examples from the per-response safety flags (is_response_*_safe: "
                "desirable = safe), which say nothing about helpfulness, but --data.objective is helpful. Set "
                "--data.kto_from pairs (the better_response_id response desirable, the other undesirable), or "
                "--data.objective safe for safety KTO."
            )
        if self.filter == "safety_differs" and self.source != "pku":
            raise UserError(f"--data.filter safety_differs needs --data.source pku, got {self.source!r}.")
        self._check_mapping()

    def _check_mapping(self) -> None:
        for key, column in (self.column_mapping or {}).items():
            if key not in SOURCE_FIELDS[self.source]:
                raise UserError(
                    f"--data.column_mapping key {key!r} is not a field of source {self.source!r}; "
                    f"expected some of {', '.join(SOURCE_FIELDS[self.source])} (mapping field -> column)."
                )
            if not isinstance(column, str) or not column:
                raise UserError(f"--data.column_mapping[{key!r}] must be a column name, got {column!r}.")

    def column(self, name: str) -> str:
        return (self.column_mapping or {}).get(name, name)

    def describe(self) -> str:
        parts = [f"source={self.source}", f"kind={self.kind}"]
        if self.source == "pku" and not (self.kind == "kto" and self.kto_from == "flags"):
            parts.append(f"objective={self.objective}")
        if self.kind == "kto":
            parts.append(f"kto_from={self.kto_from}")
        parts += [f"filter={self.filter}", f"on_invalid={self.on_invalid}"]
        if self.column_mapping:
            parts.append(f"column_mapping={self.column_mapping}")
        return ", ".join(parts)


@dataclass
class LoadResult:
    """Records read from some files, with the rows dropped per reason (``skipped``), the number of rows read and the
    shape detected in each file."""

    records: list[Record]
    skipped: Counter = field(default_factory=Counter)
    rows: int = 0
    shapes: dict[str, str] = field(default_factory=dict)  # path -> detected source and shape (``source="auto"``)


# ----------------------------------------------------------------------------------------------------- row issues
@dataclass(frozen=True)
class _Issue:
    reason: str  # the key under which skipped rows are counted
    field: str | None
    what: str  # "field 'x' is null": the problem, without the origin
    fix: str  # how to fix it
    all_rows_hint: str | None = None  # said instead of ``fix`` when every row of a file has this problem


class _Invalid(Exception):
    def __init__(self, issue: _Issue) -> None:
        super().__init__(issue.what)
        self.issue = issue


def _check_choice(option: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UserError(f"{option} must be one of {', '.join(choices)}; got {value!r}.")


def _fix(extra: str = "") -> str:
    return f"Fix or remove the row{extra}, or {_SKIP_HINT}."


# -------------------------------------------------------------------------------------------------------- paths
@dataclass(frozen=True)
class HubRef:
    """A Hub dataset named by a ``hub:`` reference: the arguments given to :func:`datasets.load_dataset`."""

    dataset_id: str
    config: str | None = None
    data_dir: str | None = None
    split: str = "train"
    revision: str | None = None


def parse_hub_ref(ref: str, option: str = "--data.train_files") -> HubRef:
    """Parses ``hub:OWNER/NAME[/DATA_DIR][:SPLIT][?config=C&data_dir=D&split=S&revision=R]``.

    ``config`` is the dataset's configuration (``load_dataset``'s ``name``), ``revision`` a branch, tag or commit.
    The split defaults to ``train``. ``hub:PKU-Alignment/PKU-SafeRLHF?config=default&split=test&revision=v1`` and
    ``hub:Anthropic/hh-rlhf/harmless-base:test`` are both references.

    Raises:
        ValueError: naming ``option`` for a malformed reference or an unknown or repeated key.
    """
    body = ref[len(_HUB_PREFIX) :] if ref.startswith(_HUB_PREFIX) else ref
    path, _, query = body.partition("?")
    name, _, split = path.partition(":")
    form = "hub:OWNER/NAME[/DATA_DIR][:SPLIT][?config=C&data_dir=D&split=S&revision=R]"
    if not _HUB_ID.match(name):
        raise UserError(f"{option}: {ref!r} does not name a Hub dataset; write {form}.")
    parts = name.split("/")
    values: dict[str, str | None] = {"data_dir": "/".join(parts[2:]) or None, "split": split or None}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if key not in _HUB_KEYS or not eq or not value:
            raise UserError(
                f"{option}: {ref!r} has {item!r} after '?'; expected key=value pairs with keys "
                f"{', '.join(_HUB_KEYS)} ({form})."
            )
        if values.get(key) is not None:
            raise UserError(f"{option}: {ref!r} gives {key} twice; give it once.")
        values[key] = value
    return HubRef(
        dataset_id="/".join(parts[:2]),
        config=values.get("config"),
        data_dir=values["data_dir"],
        split=values["split"] or "train",
        revision=values.get("revision"),
    )


def resolve_data_path(path: str, option: str = "--data.train_files") -> str:
    """Expands ``~`` and environment variables; returns a local path or a ``hub:`` dataset reference.

    A ``hub:`` reference (see :func:`parse_hub_ref`; it is checked here), or a string that is not an existing path
    and looks like a Hub id (``owner/name`` without a file suffix), is a Hub dataset.
    Anything else must be an existing file.

    Raises:
        FileNotFoundError: naming ``option`` when a local file is missing.
    """
    if not isinstance(path, str) or not path.strip():
        raise MissingFileError(f"{option}: expected a file path, got {path!r}.")
    if path.startswith(_HUB_PREFIX):
        parse_hub_ref(path, option)
        return path
    expanded = os.path.expandvars(os.path.expanduser(path))
    if os.path.isfile(expanded):
        return expanded
    if os.path.isdir(expanded):
        raise MissingFileError(
            f"{option}: {expanded} is a folder; list the data files in it (.jsonl, .json, .parquet, .csv)."
        )
    if expanded == path and _HUB_ID.match(path) and not path.lower().endswith(_LOCAL_SUFFIXES):
        return _HUB_PREFIX + path
    raise MissingFileError(f"{option}: data file {expanded} does not exist (given as {path!r}).")


# ------------------------------------------------------------------------------------------------------ readers
def read_rows(path: str) -> Iterator[tuple[str, dict | _Issue]]:
    """Yields ``(origin, row)`` for each row of a JSON lines, JSON list, CSV or Parquet file, or a ``hub:`` dataset.

    A row that cannot be decoded is yielded as an issue in place of the dict so the caller decides whether to fail or
    skip. Problems with the whole file (empty, binary, unreadable) raise :class:`DataError`.
    """
    if path.startswith(_HUB_PREFIX):
        yield from _read_hub(path)
        return
    with open(path, "rb") as f:
        head = f.read(8192)
    if head[:4] == b"PAR1" or path.lower().endswith((".parquet", ".pq")):
        yield from _read_parquet(path)
        return
    if not head.strip():
        raise DataError(f"{path} is empty (no rows); point the data option at a file with rows.")
    if b"\x00" in head:
        raise DataError(
            f"{path} looks like a binary file (it contains NUL bytes), not JSON lines, a JSON list or Parquet; "
            "check the path."
        )
    if path.lower().endswith(".csv"):
        yield from _read_csv(path)
        return
    first = head.lstrip()[:1]
    if first == b"[":
        yield from _read_json_list(path)
    else:
        yield from _read_jsonl(path)


def _read_jsonl(path: str) -> Iterator[tuple[str, dict | _Issue]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            origin = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = raw[e.start : e.start + 1].hex()
                yield origin, _Issue(
                    "invalid_utf8",
                    None,
                    f"line is not valid UTF-8 (byte 0x{bad} at column {e.start + 1})",
                    "Re-encode the file as UTF-8, or " + _SKIP_HINT + ".",
                )
                continue
            if lineno == 1:
                text = text.lstrip("\ufeff")
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield origin, _Issue(
                    "invalid_json",
                    None,
                    f"line is not valid JSON ({e.msg} at column {e.colno})",
                    "Write one JSON object per line, or " + _SKIP_HINT + ".",
                )
                continue
            if not isinstance(obj, dict):
                yield origin, _Issue(
                    "not_an_object",
                    None,
                    f"line holds a JSON {type(obj).__name__}, expected an object with named fields",
                    _fix(),
                )
                continue
            yield origin, obj


def _read_json_list(path: str) -> Iterator[tuple[str, dict | _Issue]]:
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: the file is not valid UTF-8 (byte 0x{data[e.start:e.start + 1].hex()}); "
                        "re-encode it as UTF-8.") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: the file is not valid JSON ({e.msg} at column {e.colno}).") from None
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON list of objects, got a JSON {type(obj).__name__}.")
    if not obj:
        raise DataError(f"{path} is empty (a JSON list with no rows); point the data option at a file with rows.")
    for i, row in enumerate(obj):
        origin = f"{path}[{i}]"
        if isinstance(row, dict):
            yield origin, row
        else:
            yield origin, _Issue(
                "not_an_object", None, f"item is a JSON {type(row).__name__}, expected an object with named fields",
                _fix(),
            )


class CsvRow(dict):
    """A row read from a CSV file: every cell is text (see :class:`_Row` for how labels and messages are read)."""


def _read_csv(path: str) -> Iterator[tuple[str, dict | _Issue]]:
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = Path(path).read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: the file is not valid UTF-8; re-encode it as UTF-8.") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except (StopIteration, csv.Error) as e:
        raise DataError(f"{path}:1: cannot read a CSV header ({e or 'no lines'}).") from None
    if len(set(header)) != len(header) or not all(h.strip() for h in header):
        raise DataError(
            f"{path}:1: the CSV header {header} has an empty or repeated column name; name every column once."
        )
    rows = 0
    for start, cells in numbered_csv_rows(reader, path, DataError):
        origin = f"{path}:{start}"
        rows += 1
        if len(cells) != len(header):
            yield origin, _Issue(
                "wrong_columns", None, f"row has {len(cells)} cells, the header {len(header)}",
                _fix(" (quote cells that hold commas or line breaks)"),
            )
            continue
        yield origin, CsvRow(zip(header, cells, strict=True))
    if not rows:
        raise DataError(f"{path} is empty (a CSV header and no rows); point the data option at a file with rows.")


def _read_parquet(path: str) -> Iterator[tuple[str, dict | _Issue]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read it as Parquet ({e}).") from None
    if not rows:
        raise DataError(f"{path} is empty (a Parquet table with no rows); point the data option at a file with rows.")
    for i, row in enumerate(rows):
        yield f"{path}[{i}]", row


def _read_hub(ref: str) -> Iterator[tuple[str, dict | _Issue]]:
    """Reads a ``hub:`` reference with :func:`datasets.load_dataset` (needs network or a local cache)."""
    import datasets  # lazy: only Hub sources need it

    hub = parse_hub_ref(ref)
    try:
        ds = datasets.load_dataset(
            hub.dataset_id, name=hub.config, data_dir=hub.data_dir, split=hub.split, revision=hub.revision
        )
    except Exception as e:  # offline, unknown id, unknown split ...
        raise MissingFileError(
            f"{ref}: not a local file, and loading it as a Hugging Face Hub dataset (id {hub.dataset_id!r}, config "
            f"{hub.config!r}, data_dir {hub.data_dir!r}, split {hub.split!r}, revision {hub.revision!r}) failed: {e}"
        ) from e
    if len(ds) == 0:
        raise DataError(f"{ref} is empty (split {hub.split!r} has no rows).")
    for i, row in enumerate(ds):
        yield f"{ref}[{i}]", row


# ------------------------------------------------------------------------------------------------- field access
class _Row:
    """Typed access to one row's fields, raising :class:`_Invalid` with the field's (mapped) column name."""

    def __init__(self, row: dict, spec: SourceSpec) -> None:
        self.row = row
        self.spec = spec
        self.csv = isinstance(row, CsvRow)

    def cell(self, name: str) -> Any:
        """A field's value; a CSV cell holding a JSON list (a conversation) is decoded, an empty cell is null."""
        value = self.raw(name)
        if self.csv and isinstance(value, str):
            if not value.strip():
                return None
            if value.lstrip().startswith("[{"):
                try:
                    return json.loads(value)
                except json.JSONDecodeError:
                    return value
        return value

    def _csv_label(self, value: Any) -> Any:
        if self.csv and isinstance(value, str):
            return {"true": True, "false": False, "1": 1, "0": 0}.get(value.strip().lower(), value)
        return value

    def raw(self, name: str) -> Any:
        col = self.spec.column(name)
        if col not in self.row:
            mapping = ""
            if col == name:
                mapping = f" or map another column to it with --data.column_mapping '{{\"{name}\": \"COLUMN\"}}'"
            raise _Invalid(
                _Issue(
                    "missing_field",
                    col,
                    f"field {col!r} is missing (source {self.spec.source} needs "
                    f"{', '.join(self.spec.column(f) for f in SOURCE_FIELDS[self.spec.source])})",
                    f"Add the field{mapping}, or {_SKIP_HINT}.",
                )
            )
        return self.row[col]

    def has(self, name: str) -> bool:
        return self.spec.column(name) in self.row

    def text(self, name: str) -> str:
        value = self.raw(name)
        col = self.spec.column(name)
        if not isinstance(value, str):
            shown = "null" if value is None else f"{_short(value)} ({type(value).__name__})"
            raise _Invalid(_Issue("wrong_type", col, f"field {col!r} must be text, got {shown}", _fix()))
        if not value.strip():
            raise _Invalid(_Issue("empty_text", col, f"field {col!r} is empty or whitespace", _fix()))
        return value

    def label01(self, name: str, all_rows_hint: str | None = None) -> int:
        value = self._csv_label(self.cell(name))
        value = int(value) if self.csv and isinstance(value, bool) else value
        col = self.spec.column(name)
        if value is None or (isinstance(value, float) and value != value):
            raise _Invalid(_Issue("null_label", col, f"field {col!r} is null", _fix(" (give the label)"),
                                  all_rows_hint))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid(
                _Issue("wrong_type", col, f"field {col!r} must be 0 or 1, got {_short(value)} ({type(value).__name__})",
                       _fix())
            )
        if value not in (0, 1):
            raise _Invalid(_Issue("invalid_label", col, f"field {col!r} must be 0 or 1, got {value!r}", _fix()))
        return int(value)

    def flag(self, name: str, all_rows_hint: str | None = None) -> bool:
        value = self._csv_label(self.cell(name))
        col = self.spec.column(name)
        if value is None:
            raise _Invalid(_Issue("null_label", col, f"field {col!r} is null", _fix(" (give the label)"),
                                  all_rows_hint))
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise _Invalid(
            _Issue("wrong_type", col, f"field {col!r} must be true or false, got {_short(value)} "
                   f"({type(value).__name__})", _fix())
        )

    def prompt(self, name: str = "prompt") -> Prompt:
        value = self.cell(name)
        if isinstance(value, list):
            return _messages(value, self.spec.column(name))
        return self.text(name)

    def response(self, name: str) -> Messages | str:
        """A response: text, or a conversation (list of messages) that ends with an assistant turn."""
        value = self.cell(name)
        if isinstance(value, list):
            return _messages(value, self.spec.column(name), last_role="assistant")
        return self.text(name)


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _messages(value: list, col: str, last_role: str = "user") -> Messages:
    def bad(what: str) -> _Invalid:
        return _Invalid(_Issue("wrong_type", col, f"field {col!r} {what}", _fix()))

    if not value:
        raise _Invalid(_Issue("empty_text", col, f"field {col!r} is an empty list of messages", _fix()))
    out: Messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise bad(f"must be text or a list of {{role, content}} messages; item {i} is {_short(m)}")
        if m["role"] not in _ROLES:
            raise bad(f"item {i} has role {m['role']!r}; expected one of {', '.join(_ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != last_role:
        raise bad(f"must end with a{'n' if last_role == 'assistant' else ''} {last_role} turn, but its last message "
                  f"has role {out[-1]['role']!r}")
    if not out[-1]["content"].strip():
        raise _Invalid(_Issue("empty_text", col, f"field {col!r} ends with an empty {last_role} turn", _fix()))
    return out


def _identical(col_a: str, col_b: str) -> _Invalid:
    return _Invalid(
        _Issue(
            "identical_responses",
            f"{col_a}/{col_b}",
            f"fields {col_a!r} and {col_b!r} are identical, so the pair states no preference",
            _fix(),
        )
    )


# ----------------------------------------------------------------------------------------------------- HH format
def parse_hh_transcript(text: str) -> Messages:
    """Parses a ``\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nAssistant:`` transcript into chat messages.

    One leading space of every turn's text is removed (HH writes ``Human: text``); the transcript must end with the
    ``Assistant:`` marker that awaits the reply, preceded by a human turn. Consecutive turns of the same role (a few
    exist in HH-RLHF) are kept as they are.

    Raises:
        ValueError: when the text is not such a transcript.
    """
    matches = list(_HH_TURN.finditer(text))
    if not matches or text[: matches[0].start()].strip():
        raise ValueError("does not start with '\\n\\nHuman:'")
    turns: list[tuple[str, str]] = []
    for m, nxt in zip(matches, [*matches[1:], None], strict=True):
        content = text[m.end() : nxt.start() if nxt is not None else len(text)]
        turns.append((m.group(1), content[1:] if content.startswith(" ") else content))
    role, tail = turns.pop()
    if role != "Assistant" or tail.strip():
        raise ValueError("does not end with '\\n\\nAssistant:' awaiting the reply")
    if not turns or turns[-1][0] != "Human":
        raise ValueError("has no human turn before the final '\\n\\nAssistant:'")
    if not turns[-1][1].strip():
        raise ValueError("ends with an empty human turn")
    return [{"role": "user" if r == "Human" else "assistant", "content": c} for r, c in turns]


def split_hh_pair(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Splits two full HH transcripts after the last ``\\n\\nAssistant:`` of their common prefix.

    Returns:
        ``(prompt, chosen_reply, rejected_reply)``, the prompt ending with ``\\n\\nAssistant:``.

    Raises:
        ValueError: when the transcripts share no ``\\n\\nAssistant:``.
    """
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, n)
    if cut < 0:
        raise ValueError("chosen and rejected share no '\\n\\nAssistant:' marker to split prompt and reply at")
    cut += len(HH_ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _strip_one_space(text: str) -> str:
    return text[1:] if text.startswith(" ") else text


# --------------------------------------------------------------------------------------------- row conversion
def _pku(row: _Row, spec: SourceSpec) -> tuple[list[tuple[Prompt, str, str]], list[tuple[Prompt, str, bool]], bool]:
    """Returns (pairs, kto examples, kept by the filter) for one PKU row."""
    prompt = row.text("prompt")
    responses = (row.text("response_0"), row.text("response_1"))
    keep = True
    flags_hint = "this file has no per-response safety flags; use --data.kto_from pairs"
    if spec.filter == "safety_differs" or (spec.kind == "kto" and spec.kto_from == "flags"):
        flags = (row.flag("is_response_0_safe", flags_hint), row.flag("is_response_1_safe", flags_hint))
        keep = flags[0] != flags[1] if spec.filter == "safety_differs" else True
    if spec.kind == "kto" and spec.kto_from == "flags":
        return [], [(prompt, responses[0], flags[0]), (prompt, responses[1], flags[1])], keep
    if spec.objective == "helpful":
        label = row.label01(
            "better_response_id", "this file has no helpfulness labels; use --data.objective safe (pairs from "
            f"{spec.column('safer_response_id')})"
        )
    else:
        label = row.label01(
            "safer_response_id", "this file has no safety labels; use --data.objective helpful (pairs from "
            f"{spec.column('better_response_id')})"
        )
    if responses[0] == responses[1]:
        raise _identical(spec.column("response_0"), spec.column("response_1"))
    return [(prompt, responses[label], responses[1 - label])], [], keep


def _hh(row: _Row, spec: SourceSpec) -> tuple[Prompt, str, str]:
    if row.has("prompt"):
        text = row.text("prompt")
        chosen, rejected = row.text("chosen"), row.text("rejected")
    else:
        full_chosen, full_rejected = row.text("chosen"), row.text("rejected")
        try:
            text, chosen, rejected = split_hh_pair(full_chosen, full_rejected)
        except ValueError as e:
            col = f"{spec.column('chosen')}/{spec.column('rejected')}"
            raise _Invalid(_Issue("bad_transcript", col, f"fields {col!r}: {e}", _fix())) from None
    try:
        messages = parse_hh_transcript(text)
    except ValueError as e:
        col = spec.column("prompt") if row.has("prompt") else spec.column("chosen")
        issue = _Issue("bad_transcript", col, f"field {col!r} is not an HH transcript: it {e}", _fix())
        raise _Invalid(issue) from None
    chosen, rejected = _strip_one_space(chosen), _strip_one_space(rejected)
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not value.strip():
            col = spec.column(name)
            raise _Invalid(_Issue("empty_text", col, f"field {col!r} has an empty reply", _fix()))
    if chosen == rejected:
        raise _identical(spec.column("chosen"), spec.column("rejected"))
    return messages, chosen, rejected


def _text_prefix_split(chosen: str, rejected: str) -> int:
    """Where TRL's ``extract_prompt`` cuts two texts: after their common prefix, less a space that ends it."""
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    if 0 < n < limit and chosen[n - 1] == " ":
        n -= 1
    return n


def _final_turns(
    prompt: Messages, chosen: Messages, rejected: Messages, spec: SourceSpec
) -> tuple[Messages, str, str]:
    """The prompt (``prompt`` plus the messages chosen and rejected share) and the two final assistant replies."""
    cols = f"{spec.column('chosen')}/{spec.column('rejected')}"
    if chosen == rejected:
        raise _identical(spec.column("chosen"), spec.column("rejected"))
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if len(chosen) - n != 1 or len(rejected) - n != 1:
        raise _Invalid(_Issue(
            "bad_conversation", cols,
            f"fields {cols!r} differ before their final assistant turn (message {n}); only the final assistant turn "
            "is trained on, so every message before it must be the same in both", _fix(),
        ))
    full = [*prompt, *chosen[:n]]
    if not full:
        raise _Invalid(_Issue(
            "no_prompt", cols,
            f"field {spec.column('prompt')!r} is missing and fields {cols!r} share no messages before their replies",
            _fix(f" (add a {spec.column('prompt')!r} field, or the user turn to both conversations)"),
        ))
    if full[-1]["role"] != "user":
        raise _Invalid(_Issue(
            "bad_conversation", cols,
            f"the prompt of fields {cols!r} ends with a {full[-1]['role']} turn, not a user turn", _fix(),
        ))
    return full, chosen[n]["content"], rejected[n]["content"]


def _as_prompt_messages(prompt: Prompt) -> Messages:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _generic(row: _Row, spec: SourceSpec, explicit_prompt: bool) -> tuple[Prompt, str, str]:
    """A pair; ``explicit_prompt`` (the file's first row has a prompt) makes a missing prompt an error."""
    prompt = row.prompt() if explicit_prompt or row.has("prompt") else None
    chosen, rejected = row.response("chosen"), row.response("rejected")
    if isinstance(chosen, list) != isinstance(rejected, list):
        cols = f"{spec.column('chosen')}/{spec.column('rejected')}"
        raise _Invalid(_Issue("wrong_type", cols, f"fields {cols!r} mix a conversation and a text", _fix()))
    if isinstance(chosen, list):
        return _final_turns(_as_prompt_messages(prompt) if prompt is not None else [], chosen, rejected, spec)
    if chosen == rejected:
        raise _identical(spec.column("chosen"), spec.column("rejected"))
    if prompt is not None:
        return prompt, chosen, rejected
    n = _text_prefix_split(chosen, rejected)
    if not chosen[:n].strip():
        cols = f"{spec.column('chosen')}/{spec.column('rejected')}"
        raise _Invalid(_Issue(
            "no_prompt", cols, f"field {spec.column('prompt')!r} is missing and fields {cols!r} share no prefix to "
            "take as the implicit prompt", _fix(f" (add a {spec.column('prompt')!r} field)"),
        ))
    if n in (len(chosen), len(rejected)):
        cols = f"{spec.column('chosen')}/{spec.column('rejected')}"
        raise _Invalid(_Issue(
            "no_prompt", cols, f"field {spec.column('prompt')!r} is missing and one of fields {cols!r} is a prefix "
            "of the other, so the implicit prompt would leave one reply empty",
            _fix(f" (add a {spec.column('prompt')!r} field)"),
        ))
    return chosen[:n], chosen[n:], rejected[n:]


def _kto(row: _Row, spec: SourceSpec) -> tuple[Prompt, str, bool]:
    prompt, completion = row.prompt(), row.response("completion")
    if isinstance(completion, list):
        full = [*_as_prompt_messages(prompt), *completion[:-1]]
        if full[-1]["role"] != "user":
            col = f"{spec.column('prompt')}/{spec.column('completion')}"
            raise _Invalid(_Issue(
                "bad_conversation", col,
                f"the messages before the final assistant turn of {col!r} end with a {full[-1]['role']} turn, not a "
                "user turn", _fix(),
            ))
        return full, completion[-1]["content"], row.flag("label")
    return prompt, completion, row.flag("label")


def _convert(row: dict, origin: str, spec: SourceSpec, explicit_prompt: bool = True) -> tuple[list[Record], bool]:
    """Records of one row and whether the row passed ``spec.filter``; raises :class:`_Invalid`.

    ``explicit_prompt``: whether the file's rows carry a prompt field (read from its first row).
    """
    access = _Row(row, spec)
    if spec.source == "pku":
        pairs, ktos, keep = _pku(access, spec)
    elif spec.source == "kto":
        pairs, ktos, keep = [], [_kto(access, spec)], True
    else:
        pair = _hh(access, spec) if spec.source == "hh" else _generic(access, spec, explicit_prompt)
        pairs, ktos, keep = [pair], [], True
    if spec.kind == "pairs":
        return [PairRecord(p, c, r, origin) for p, c, r in pairs], keep
    records: list[Record] = [KTORecord(p, c, d, origin) for p, c, d in ktos]
    for p, c, r in pairs:  # kto_from == "pairs"
        records += [KTORecord(p, c, True, origin), KTORecord(p, r, False, origin)]
    return records, keep


# ---------------------------------------------------------------------------------------------- shape detection
def _looks_hh(value: Any) -> bool:
    return isinstance(value, str) and value.lstrip(" \n").startswith("Human:") and HH_ASSISTANT in value


def detect_source(row: dict, spec: SourceSpec, origin: str) -> tuple[str, str]:
    """The source of a row (``pku``, ``hh``, ``generic`` or ``kto``) and a description of its shape.

    ``response_0``/``response_1`` fields make ``pku``; ``completion``/``label`` make ``kto``; ``chosen``/``rejected``
    make ``hh`` when the prompt (or, without one, ``chosen``) is an HH ``Human: ... Assistant:`` transcript and
    ``generic`` otherwise. Field names follow ``spec.column_mapping``.

    Raises:
        DataError: naming ``origin`` when the row has none of these field sets.
    """
    access = _Row(row, spec)
    if access.has("response_0") and access.has("response_1"):
        return "pku", "PKU-SafeRLHF pairs"
    if access.has("completion") and access.has("label"):
        conv = isinstance(access.cell("completion"), list)
        return "kto", f"unpaired prompt/completion/label, {'conversational' if conv else 'standard'}"
    if access.has("chosen") and access.has("rejected"):
        explicit = access.has("prompt")
        chosen = access.cell("chosen")
        prompt_kind = "explicit prompt" if explicit else "implicit prompt"
        if _looks_hh(access.cell("prompt") if explicit else chosen):
            return "hh", f"HH-RLHF transcripts, {prompt_kind}"
        conv = isinstance(chosen, list)
        return "generic", f"preference pairs, {'conversational' if conv else 'standard'}, {prompt_kind}"
    fields = ", ".join(map(repr, list(row)[:12]))
    raise DataError(
        f"{origin}: cannot tell the data's shape from its fields ({fields}). Expected prompt/chosen/rejected or "
        "chosen/rejected (preference pairs, text or lists of {role, content} messages), prompt/completion/label "
        "(unpaired, for --data.kind kto) or PKU-SafeRLHF's prompt/response_0/response_1/...; rename columns with "
        "--data.column_mapping, or set --data.source."
    )


# ------------------------------------------------------------------------------------------------------ loading
def _issue_message(origin: str, issue: _Issue) -> str:
    return f"{origin}: {issue.what}. {issue.fix}"


def _all_rows_message(path: str, rows: int, origin: str, issue: _Issue) -> str:
    if issue.all_rows_hint:
        return f"{issue.what} in all {rows} rows of {path}; {issue.all_rows_hint}."
    return f"{issue.what} in all {rows} rows of {path} (first at {origin}). {issue.fix}"


def load_records(files: Sequence[str], spec: SourceSpec, *, option: str = "--data.train_files") -> LoadResult:
    """Reads, validates and converts the rows of ``files`` into records, dropping duplicates per ``spec``.

    Args:
        files: Paths (already resolved with :func:`resolve_data_path`) or ``hub:`` references.
        spec: How rows become records.
        option: The option the files came from, named in error messages.

    Raises:
        DataError: for a bad file, for bad rows when ``spec.on_invalid == "error"``, for duplicates when
            ``spec.duplicates == "error"``, and when no record is left.
    """
    if not files:
        raise UserError(f"{option} is empty; give at least one data file.")
    result = LoadResult(records=[])
    examples: dict[str, str] = {}  # reason -> first message, for the skip report
    uniform: list[str] = []  # "every row of a file has the same problem" messages
    for path in files:
        file_rows = 0
        issues: list[tuple[str, _Issue]] = []
        file_spec = spec
        explicit_prompt: bool | None = None
        for origin, row in read_rows(path):
            file_rows += 1
            if isinstance(row, _Issue):
                issues.append((origin, row))
                continue
            if file_spec.source == "auto":
                file_spec = _detected_spec(row, spec, origin, path, result)
            if explicit_prompt is None:
                explicit_prompt = spec.column("prompt") in row
            try:
                records, keep = _convert(row, origin, file_spec, explicit_prompt)
            except _Invalid as e:
                issues.append((origin, e.issue))
                continue
            if not keep:
                result.skipped[f"filtered_{spec.filter}"] += 1
                continue
            result.records.extend(records)
        result.rows += file_rows
        if not issues:
            continue
        first_origin, first = issues[0]
        same = all((i.reason, i.field, i.what) == (first.reason, first.field, first.what) for _, i in issues)
        every_row = same and len(issues) == file_rows > 1
        if every_row:
            uniform.append(_all_rows_message(path, file_rows, first_origin, first))
        if spec.on_invalid == "error":
            if every_row:
                raise DataError(uniform[-1])
            counts = Counter(i.reason for _, i in issues)
            more = ""
            if len(issues) > 1:
                more = f" ({len(issues)} invalid rows in this file: " + ", ".join(
                    f"{k} {v}" for k, v in counts.most_common()) + ")"
            raise DataError(_issue_message(first_origin, first) + more)
        for origin, issue in issues:
            result.skipped[issue.reason] += 1
            examples.setdefault(issue.reason, f"{origin}: {issue.what}")
    if examples:
        from lightning.pytorch.utilities import rank_zero_warn

        total = sum(result.skipped[k] for k in examples)
        lines = "\n".join(f"  {k}: {result.skipped[k]} (e.g. {examples[k]})" for k in examples)
        rank_zero_warn(f"Skipped {total} invalid rows of {option} (--data.on_invalid skip):\n{lines}")
    _drop_duplicates(result, spec, option)
    if not result.records:
        detail = "; ".join(uniform) if uniform else (
            "rows dropped: " + ", ".join(f"{k} {v}" for k, v in result.skipped.items()) if result.skipped else "")
        raise DataError(
            f"No usable examples in {option} = {list(files)} ({result.rows} rows read; {spec.describe()})"
            + (f": {detail}" if detail else "") + "."
        )
    return result


def _detected_spec(row: dict, spec: SourceSpec, origin: str, path: str, result: LoadResult) -> SourceSpec:
    """``spec`` with the source detected from the first row of ``path`` (logged and kept in ``result.shapes``)."""
    from lightning.pytorch.utilities import rank_zero_info

    source, shape = detect_source(row, spec, origin)
    try:
        detected = replace(spec, source=source)
    except ValueError as e:
        raise DataError(f"{path} holds {shape} (--data.source {source}, read from {origin}): {e}") from None
    result.shapes[path] = f"{source} ({shape})"
    rank_zero_info(f"Data shape of {path}: {shape} (--data.source {source}, read from its first row).")
    return detected


def _record_key(record: Record) -> tuple:
    if isinstance(record, PairRecord):
        return (prompt_key(record.prompt), record.chosen, record.rejected)
    return (prompt_key(record.prompt), record.completion, record.desirable)


def _drop_duplicates(result: LoadResult, spec: SourceSpec, option: str) -> None:
    if spec.duplicates == "keep":
        return
    seen: dict[tuple, str] = {}
    kept: list[Record] = []
    for record in result.records:
        key = _record_key(record)
        if key in seen:
            if spec.duplicates == "error":
                raise DataError(
                    f"{record.source}: duplicate of the example at {seen[key]} (same prompt and responses); "
                    "remove it, or set --data.duplicates drop (or keep)."
                )
            result.skipped["duplicate"] += 1
            continue
        seen[key] = record.source
        kept.append(record)
    if len(kept) != len(result.records):
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(f"Dropped {len(result.records) - len(kept)} exact duplicate examples of {option} "
                       "(--data.duplicates drop).")
    result.records = kept


# ------------------------------------------------------------------------------------------ splits and subsets
def prompt_key(prompt: Prompt) -> str:
    """A canonical text for a prompt; a single user message and the same plain string give the same key."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    return json.dumps(prompt, ensure_ascii=False, sort_keys=True)


def _unit(key: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_by_prompt(records: Sequence[Record], val_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Splits records into (train, validation) by prompt, so no prompt is in both.

    A prompt goes to validation when a hash of its text and ``seed`` falls below ``val_fraction``: the split is the
    same on every process and every run, and a prompt keeps its side when rows are added or removed. With
    ``val_fraction > 0`` and at least two prompts, both sides get at least one prompt.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--data.val_fraction must be in [0, 1), got {val_fraction}.")
    if val_fraction == 0.0:
        return list(records), []
    units = {}
    for r in records:
        key = prompt_key(r.prompt)
        if key not in units:
            units[key] = _unit(key, seed)
    val_keys = {k for k, u in units.items() if u < val_fraction}
    if len(units) >= 2:
        if not val_keys:
            val_keys = {min(units, key=units.__getitem__)}
        elif len(val_keys) == len(units):
            val_keys.discard(max(units, key=units.__getitem__))
    train = [r for r in records if prompt_key(r.prompt) not in val_keys]
    val = [r for r in records if prompt_key(r.prompt) in val_keys]
    return train, val


def subsample(records: Sequence[Record], max_samples: int | None, seed: int) -> list[Record]:
    """At most ``max_samples`` records, chosen at random with ``seed``, in their original order."""
    if max_samples is None or max_samples >= len(records):
        return list(records)
    keep = sorted(random.Random(seed).sample(range(len(records)), max_samples))
    return [records[i] for i in keep]
