"""``sacpo merge``: P-SACPO merges of two exported models, with an optional mixture-vs-merge KL report.

Example (step-1 export as the base, step-2 export as the other model)::

    sacpo merge --base outputs/step1/export --other outputs/step2/export --weights 0.25 0.5 0.75 \\
        --output outputs/merges --kl_prompts ../shared/data/eval/safety_problem.json

writes ``outputs/merges/merge_q0.25`` (and so on), each a Hugging Face folder with ``sacpo_merge.json``, and
``outputs/merges/merge_report.json`` with one entry per weight ``q``: the folder, and with ``--kl_prompts`` the mean
per-token ``KL(geometric mixture || weight merge)`` over the prompts and the number of positions it averages. With the
step-1 model as base and a step-2 model trained with ``lambda``, the merge at ``q`` approximates the optimum for safety
weight ``q * lambda``.

The options are the parameters of :func:`merge` (a jsonargparse parser built from its signature), so
``sacpo merge --config merge.yaml`` and ``--print_config`` work like ``sacpo fit``'s. The dashed spellings
(``--kl-prompts``) are accepted as aliases of the underscore ones, and ``--weights`` also takes space-separated values
(``--weights 0.25 0.5``) besides a list (``--weights [0.25,0.5]``).
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Literal

from jsonargparse import ActionConfigFile, ArgumentParser
from jsonargparse.typing import PositiveInt

from sacpo_lightning.cli_args import command_argv, parse_command
from sacpo_lightning.errors import MissingFileError, debug_enabled
from sacpo_lightning.merge_kl import KL_MAX_LENGTH
from sacpo_lightning.merge_report import REPORT_FILE, format_report, merge_with_report, read_kl_prompts
from sacpo_lightning.merge_weight import check_q
from sacpo_lightning.models.compat import MergeError

__all__ = ["KL_MAX_LENGTH", "REPORT_FILE", "build_parser", "main", "merge"]

def _check_model_folder(option: str, path: str) -> None:
    if not Path(path).is_dir():
        raise MissingFileError(f"{option} folder {path} does not exist.")
    if not (Path(path) / "config.json").is_file():
        raise MissingFileError(f"{option} folder {path} is not a Hugging Face model folder (no config.json).")


def merge(
    base: str,
    other: str,
    weights: list[float],
    output: str,
    dtype: Literal["float32", "bfloat16", "float16"] | None = None,
    kl_prompts: str | None = None,
    kl_max_prompts: PositiveInt = 16,
    kl_max_length: PositiveInt = KL_MAX_LENGTH,
    kl_batch_size: PositiveInt = 8,
    device: str | None = None,
) -> dict:
    """Linear weight-space merges (1 - q) * base + q * other of two exported models (P-SACPO).

    With the step-1 model as base and a step-2 model trained with lambda, weight q approximates safety weight
    q * lambda.

    Args:
        base: The q = 0 model folder (the step-1 export).
        other: The q = 1 model folder (a step-2 export).
        weights: Weights in [0, 1] (space-separated, or a list).
        output: Folder receiving merge_q{q:.2f}/ and merge_report.json.
        dtype: Dtype of the merges (default: the base's).
        kl_prompts: Prompts (a .json list or .jsonl of {"prompt": ...}) on which to measure the mean per-token KL
            between the token-level geometric mixture and each merge.
        kl_max_prompts: Use the first N prompts.
        kl_max_length: Cut prompts to N tokens.
        kl_batch_size: Prompts per forward pass.
        device: Device for the KL forward passes (default: cpu).

    Returns:
        The report written to ``output/merge_report.json``.
    """
    weights = [check_q(q, "--weights: weights") for q in weights]
    _check_model_folder("--base", base)
    _check_model_folder("--other", other)
    prompts = None if kl_prompts is None else read_kl_prompts(kl_prompts, kl_max_prompts)
    return merge_with_report(
        base,
        other,
        weights,
        output_root=output,
        dtype=dtype,
        prompts=prompts,
        batch_size=kl_batch_size,
        max_length=kl_max_length,
        device=device,
        report_file=Path(output) / REPORT_FILE,
        extra={"kl_prompts": None if kl_prompts is None else str(Path(kl_prompts).resolve())},
    )


def build_parser() -> ArgumentParser:
    """The ``sacpo merge`` parser: ``--config``, ``--print_config`` and one option per parameter of :func:`merge`."""
    parser = ArgumentParser(prog="sacpo merge", description=merge.__doc__.split("\n\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file with the options below.")
    parser.add_function_arguments(merge, as_group=False)
    return parser


def main(argv: list[str]) -> int:
    """Runs ``sacpo merge``; returns the exit status (2 for bad arguments or models that cannot be merged)."""
    kwargs, code = parse_command(build_parser(), command_argv(argv, [merge]))
    if kwargs is None:
        return code
    try:
        report = merge(**kwargs)
    except (MergeError, ValueError, OSError) as err:
        if debug_enabled():
            traceback.print_exception(err)
        print(f"sacpo merge: error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(f"Report: {Path(kwargs['output']) / REPORT_FILE}")
    return 0
