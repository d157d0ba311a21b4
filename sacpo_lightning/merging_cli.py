"""``sacpo merge``: P-SACPO merges of two exported models, with an optional mixture-vs-merge KL report.

Example (step-1 export as the base, step-2 export as the other model)::

    sacpo merge --base outputs/step1/export --other outputs/step2/export --weights 0.25 0.5 0.75 \\
        --output outputs/merges --kl-prompts ../shared/data/eval/safety_problem.json

writes ``outputs/merges/merge_q0.25`` (and so on), each a Hugging Face folder with ``sacpo_merge.json``, and
``outputs/merges/merge_report.json`` with one entry per weight ``q``: the folder, and with ``--kl-prompts`` the mean
per-token ``KL(geometric mixture || weight merge)`` over the prompts and the number of positions it averages. With the
step-1 model as base and a step-2 model trained with ``lambda``, the merge at ``q`` approximates the optimum for safety
weight ``q * lambda``.

The helpers (:func:`load_prompts`, :func:`render_prompts`, :func:`merge_with_report`, :func:`format_report`) are also
used by the end-of-fit merge callback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sacpo_lightning.io import atomic_write_json
from sacpo_lightning.merging import MergeError, merge_model_folders, mixture_vs_merge_kl

if TYPE_CHECKING:
    import torch

__all__ = ["REPORT_FILE", "format_report", "load_prompts", "main", "merge_with_report", "render_prompts"]

REPORT_FILE = "merge_report.json"
NAME_FORMAT = "merge_q{q:.2f}"
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
KL_MAX_LENGTH = 512


# ----------------------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------------------


def _prompt_of(row: Any, where: str) -> str:
    if isinstance(row, str):
        text = row
    elif isinstance(row, dict):
        if "prompt" not in row:
            raise ValueError(f"{where}: the row has no 'prompt' field (fields: {', '.join(map(str, row)) or 'none'}).")
        text = row["prompt"]
        if not isinstance(text, str):
            raise ValueError(f"{where}: 'prompt' must be a string, got {type(text).__name__}.")
    else:
        raise ValueError(f"{where}: expected an object with a 'prompt' field or a string, got {type(row).__name__}.")
    if not text.strip():
        raise ValueError(f"{where}: the prompt is empty.")
    return text


def load_prompts(path: str | os.PathLike, max_prompts: int | None = None) -> list[str]:
    """Reads prompts from a JSON list, a JSONL file, or plain text (one prompt per non-empty line).

    The format follows the extension: ``.json`` holds a list of ``{"prompt": ...}`` objects (other fields are ignored)
    or strings, ``.jsonl`` one such object or string per line, anything else plain text lines.

    Args:
        path: The prompt file.
        max_prompts: Keep only the first this many prompts (all when ``None``).

    Returns:
        The prompts, in file order.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: A malformed row (the message names the file and the item or line), or no prompts at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Prompt file {path} does not exist.")
    if max_prompts is not None and max_prompts < 1:
        raise ValueError(f"max_prompts must be >= 1, got {max_prompts}")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    prompts: list[str] = []
    if suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err}).") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of prompts, got a {type(rows).__name__}.")
        prompts = [_prompt_of(row, f"{path} item {i}") for i, row in enumerate(rows)]
    elif suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {lineno}: not valid JSON ({err.msg}).") from None
            prompts.append(_prompt_of(row, f"{path} line {lineno}"))
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts found.")
    return prompts[:max_prompts] if max_prompts is not None else prompts


def render_prompts(prompts: Sequence[str], tokenizer) -> list[str]:
    """Renders each prompt as a user turn with the tokenizer's chat template (plain text when it has none).

    The generation prompt (the assistant header) is appended, so the KL is measured where a response would start. A
    BOS token written by the template is dropped when the tokenizer adds one itself, so it is not doubled.
    """
    if not getattr(tokenizer, "chat_template", None):
        return list(prompts)
    bos = getattr(tokenizer, "bos_token", None)
    adds_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    rendered = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        if adds_bos and text.startswith(bos):
            text = text[len(bos) :]
        rendered.append(text)
    return rendered


# ----------------------------------------------------------------------------------------------------------------------
# Merging with a report
# ----------------------------------------------------------------------------------------------------------------------


def merge_with_report(
    base: str | os.PathLike,
    other: str | os.PathLike,
    weights: Sequence[float],
    output_root: str | os.PathLike,
    *,
    dtype: str | None = None,
    prompts: Sequence[str] | None = None,
    tokenizer=None,
    batch_size: int = 8,
    max_length: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Writes ``output_root/merge_q{q:.2f}`` for each weight and returns a report (not yet written).

    Args:
        base: The ``q = 0`` folder (the step-1 model).
        other: The ``q = 1`` folder (a step-2 model).
        weights: Merge weights, each in ``[0, 1]``.
        output_root: Folder that receives the merged folders.
        dtype: Dtype the merges are loaded and saved in; ``None`` keeps the base's.
        prompts: Texts (already rendered) on which to measure ``KL(mixture || merge)``; no KL when ``None``.
        tokenizer: Tokenizer for the KL texts; loaded from ``base`` when omitted.
        batch_size: Texts per forward pass for the KL.
        max_length: Truncate the texts to this many tokens for the KL.
        device: Device for the KL forward passes (CPU when ``None``).

    Returns:
        ``{"base", "other", "dtype", "num_prompts", "merges": [{"q", "path", "kl_mixture_vs_merge", "num_tokens"}]}``;
        the KL fields are ``None`` without prompts.

    Raises:
        MergeError: The models cannot be merged.
        ValueError: A weight outside ``[0, 1]`` or weights that name the same folder.
    """
    base, other, output_root = Path(base), Path(other), Path(output_root)
    paths = merge_model_folders(base, other, weights, output_root=output_root, name_format=NAME_FORMAT, dtype=dtype)
    if prompts and tokenizer is None:
        from sacpo_lightning.models import load_tokenizer

        tokenizer = load_tokenizer(str(base))
    entries = []
    for q, path in zip(weights, paths, strict=True):
        kl = num_tokens = None
        if prompts:
            result = mixture_vs_merge_kl(
                base, other, path, q, prompts, tokenizer, batch_size=batch_size, max_length=max_length, device=device
            )
            kl, num_tokens = result.mean_kl, result.num_tokens
        entries.append({"q": float(q), "path": str(path), "kl_mixture_vs_merge": kl, "num_tokens": num_tokens})
    return {
        "base": str(base.resolve()),
        "other": str(other.resolve()),
        "dtype": dtype,
        "num_prompts": len(prompts) if prompts else 0,
        "merges": entries,
    }


def format_report(report: dict[str, Any]) -> str:
    """A small text table of a report's merges (``lam_effective`` shown when the entries have it)."""
    entries = report["merges"]
    with_lam = any("lam_effective" in entry for entry in entries)
    header = ["q"] + (["lam_eff"] if with_lam else []) + ["KL(mix||merge)", "tokens", "path"]
    rows = []
    for entry in entries:
        kl = entry.get("kl_mixture_vs_merge")
        row = [f"{entry['q']:.4g}"]
        if with_lam:
            lam = entry.get("lam_effective")
            row.append("-" if lam is None else f"{lam:.4g}")
        tokens = entry.get("num_tokens")
        row += ["-" if kl is None else f"{kl:.6f}", "-" if tokens is None else str(tokens), entry["path"]]
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)), row[-1]])
        for row in [header, *rows]
    )


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def _weight(value: str) -> float:
    try:
        q = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not (math.isfinite(q) and 0.0 <= q <= 1.0):
        raise argparse.ArgumentTypeError(f"weights must be in [0, 1], got {value}")
    return q


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sacpo merge",
        description="Linear weight-space merges (1 - q) * base + q * other of two exported models (P-SACPO). With the "
        "step-1 model as base and a step-2 model trained with lambda, weight q approximates safety weight q * lambda.",
    )
    parser.add_argument("--base", required=True, help="The q = 0 model folder (the step-1 export).")
    parser.add_argument("--other", required=True, help="The q = 1 model folder (a step-2 export).")
    parser.add_argument("--weights", required=True, nargs="+", type=_weight, metavar="Q", help="Weights in [0, 1].")
    parser.add_argument("--output", required=True, help="Folder receiving merge_q{q:.2f}/ and merge_report.json.")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="Dtype of the merges (default: base's).")
    parser.add_argument(
        "--kl-prompts",
        default=None,
        help="Prompts (.json list or .jsonl of {prompt}, or plain text lines) on which to measure the mean per-token "
        "KL between the token-level geometric mixture and each merge.",
    )
    parser.add_argument("--kl-max-prompts", type=_positive_int, default=16, help="Use the first N prompts.")
    parser.add_argument("--kl-max-length", type=_positive_int, default=KL_MAX_LENGTH, help="Cut prompts to N tokens.")
    parser.add_argument("--kl-batch-size", type=_positive_int, default=8, help="Prompts per forward pass.")
    parser.add_argument("--device", default=None, help="Device for the KL forward passes (default: cpu).")
    return parser


def _check_model_folder(option: str, path: str) -> None:
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{option} folder {path} does not exist.")
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{option} folder {path} is not a Hugging Face model folder (no config.json).")


def main(argv: list[str]) -> int:
    """Runs ``sacpo merge``; returns the exit status (2 for bad arguments or models that cannot be merged)."""
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already printed by argparse
        code = exit_.code
        return 0 if code is None else code if isinstance(code, int) else 2
    try:
        _check_model_folder("--base", ns.base)
        _check_model_folder("--other", ns.other)
        prompts = tokenizer = None
        if ns.kl_prompts is not None:
            from sacpo_lightning.models import load_tokenizer

            tokenizer = load_tokenizer(ns.base)
            prompts = render_prompts(load_prompts(ns.kl_prompts, ns.kl_max_prompts), tokenizer)
        report = merge_with_report(
            ns.base,
            ns.other,
            ns.weights,
            ns.output,
            dtype=ns.dtype,
            prompts=prompts,
            tokenizer=tokenizer,
            batch_size=ns.kl_batch_size,
            max_length=ns.kl_max_length,
            device=ns.device,
        )
        report["kl_prompts"] = None if ns.kl_prompts is None else str(Path(ns.kl_prompts).resolve())
        atomic_write_json(Path(ns.output) / REPORT_FILE, report)
    except (MergeError, ValueError, OSError) as err:
        print(f"sacpo merge: error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(f"Report: {Path(ns.output) / REPORT_FILE}")
    return 0
