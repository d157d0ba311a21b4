"""Merges with a report: write the P-SACPO merges and measure each one's KL to the token-level mixture.

:func:`merge_with_report` is the one merge path of ``sacpo merge``, the pipeline's merge stage and the
``MergeOnFitEnd`` callback; :func:`format_report` prints its report as a small table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sacpo_lightning.data.prompts import load_prompts
from sacpo_lightning.errors import MissingFileError
from sacpo_lightning.io import PathLike, atomic_write_json
from sacpo_lightning.merge_kl import kl_texts, mixture_vs_merge_kl
from sacpo_lightning.merge_weight import effective_lambda
from sacpo_lightning.merging import merge_model_folders
from sacpo_lightning.models.tokenizer import load_tokenizer

__all__ = ["REPORT_FILE", "format_report", "merge_with_report", "read_kl_prompts"]

REPORT_FILE = "merge_report.json"
"""The report :func:`merge_with_report` writes beside the merges (``sacpo merge``, ``MergeOnFitEnd``)."""


def read_kl_prompts(path: PathLike, max_prompts: int | None = None) -> list[str]:
    """The first ``max_prompts`` prompts of a prompt set, for :func:`merge_with_report`.

    The file is read by :func:`sacpo_lightning.data.prompts.load_prompts` (a JSON list or JSON lines of
    ``{"prompt": ..., "category": ...}`` objects, the format of the shared evaluation sets).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: ``max_prompts < 1``, or a malformed or empty prompt set (the message names the file and row).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"Prompt file {path} does not exist.")
    if max_prompts is not None and max_prompts < 1:
        raise ValueError(f"max_prompts must be >= 1, got {max_prompts}")
    prompts = [row["prompt"] for row in load_prompts(path)]
    return prompts if max_prompts is None else prompts[:max_prompts]


def _report_texts(base: Path, prompts: Sequence[str], tokenizer) -> tuple[Any, list[str]]:
    """``(tokenizer, KL texts)``: the tokenizer loaded from ``base`` when None, and the prompts as chat turns."""
    if tokenizer is None:
        tokenizer = load_tokenizer(str(base))
    return tokenizer, kl_texts(prompts, tokenizer)


def _report_entry(
    base: Path,
    other: Path,
    q: float,
    path: Path,
    texts: list[str] | None,
    tokenizer,
    *,
    batch_size: int,
    max_length: int | None,
    device: str | torch.device | None,
    lam: float | None,
) -> dict[str, Any]:
    """One merge's report entry: its KL to the token-level mixture on ``texts`` (None without texts)."""
    kl = num_tokens = None
    if texts:
        result = mixture_vs_merge_kl(
            base, other, path, q, texts, tokenizer, batch_size=batch_size, max_length=max_length, device=device
        )
        kl, num_tokens = result.mean_kl, result.num_tokens
    entry = {"q": float(q), "path": str(path), "kl_mixture_vs_merge": kl, "num_tokens": num_tokens}
    if lam is not None:
        entry["lam_effective"] = effective_lambda(q, lam)
    return entry


def merge_with_report(
    base: PathLike,
    other: PathLike,
    weights: Sequence[float],
    *,
    output_root: PathLike | None = None,
    output_dirs: Sequence[PathLike] | None = None,
    dtype: str | None = None,
    prompts: Sequence[str] | None = None,
    tokenizer=None,
    batch_size: int = 8,
    max_length: int | None = None,
    device: str | torch.device | None = None,
    lam: float | None = None,
    report_file: PathLike | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes the merges ``(1 - q) * base + q * other`` and reports each one's distance to the token-level mixture.

    The merges are written by :func:`merge_model_folders` (``output_root/merge_q{q:.2f}``, or one folder per weight
    in ``output_dirs``); with ``prompts``, :func:`mixture_vs_merge_kl` then measures the mean per-token
    ``KL(token-level mixture || merge)`` of each merge on the prompts, each rendered as a user turn of the tokenizer's
    chat template with the assistant header.

    Args:
        base: The ``q = 0`` folder (the step-1 model).
        other: The ``q = 1`` folder (a step-2 model).
        weights: Merge weights, each in ``[0, 1]``.
        output_root: Folder that receives ``merge_q{q:.2f}`` per weight. Exclusive with ``output_dirs``.
        output_dirs: One output folder per weight.
        dtype: Dtype the merges are loaded and saved in; ``None`` keeps the base's.
        prompts: Prompts (plain, see :func:`read_kl_prompts`) on which to measure the KL; no KL when empty or ``None``.
        tokenizer: Tokenizer for the KL texts; loaded from ``base`` when omitted.
        batch_size: Texts per forward pass for the KL.
        max_length: Truncate the texts to this many tokens for the KL.
        device: Device for the KL forward passes (CPU when ``None``).
        lam: The step-2 safety weight; each entry then also gets ``lam_effective = q * lam``.
        report_file: Where to write the report (atomically); not written when ``None``.
        extra: More top-level fields for the report (e.g. the prompt file, the training step).

    Returns:
        ``{"base", "other", "dtype", "num_prompts", "merges": [{"q", "path", "kl_mixture_vs_merge", "num_tokens"}],
        **extra}``, the entries with ``lam_effective`` when ``lam`` is given; the KL fields are ``None`` without
        prompts.

    Raises:
        MergeError: The models cannot be merged.
        ValueError: A weight outside ``[0, 1]``, weights that name the same folder, or bad output arguments.
    """
    base, other = Path(base), Path(other)
    paths = merge_model_folders(base, other, weights, output_dirs, output_root=output_root, dtype=dtype)
    texts = None
    if prompts:
        tokenizer, texts = _report_texts(base, prompts, tokenizer)
    entries = [
        _report_entry(base, other, q, path, texts, tokenizer, batch_size=batch_size, max_length=max_length,
                      device=device, lam=lam)
        for q, path in zip(weights, paths, strict=True)
    ]
    report = {
        "base": str(base.resolve()),
        "other": str(other.resolve()),
        "dtype": dtype,
        "num_prompts": len(prompts) if prompts else 0,
        "merges": entries,
        **(extra or {}),
    }
    if report_file is not None:
        atomic_write_json(report_file, report)
    return report


def format_report(report: Mapping[str, Any]) -> str:
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
