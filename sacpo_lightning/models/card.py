"""Model cards: the ``README.md`` with Hugging Face metadata that every export and merge carries.

The card is built from what the folder already records: ``sacpo_step.json`` (a trained step: kind, coefficients,
reference, data fingerprint, final metrics), ``sacpo_merge.json`` (a P-SACPO merge: the two models and ``q``) and
``sacpo_chain.json`` (the base model and adapters of an adapter export). A caller that knows more (the budget that
picked lambda, an evaluation's measured safety and helpfulness) passes it in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from sacpo_lightning.io import atomic_write_text
from sacpo_lightning.models.chain import CHAIN_FILE, read_chain

CARD_FILE = "README.md"
STEP_FILE = "sacpo_step.json"
MERGE_FILE = "sacpo_merge.json"
LIBRARY_TAGS = ("sacpo", "safe-alignment", "dpo")


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _number(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _base_license(base: str | None) -> str | None:
    """The ``license`` of a local base model's own card, if it has one."""
    if not base or not os.path.isdir(base):
        return None
    card = Path(base) / CARD_FILE
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return None
    front = text.split("---", 2)[1] if text.count("---") >= 2 else ""
    try:
        meta = yaml.safe_load(front) or {}
    except yaml.YAMLError:
        return None
    return meta.get("license") if isinstance(meta, dict) else None


def _base_model(folder: Path, step: Mapping[str, Any] | None, merge: Mapping[str, Any] | None) -> str | None:
    chain = read_chain(folder) if (folder / CHAIN_FILE).is_file() else None
    if chain is not None:
        return chain.base
    for meta in (merge, step):
        if meta and meta.get("base_model"):
            return str(meta["base_model"])
    if merge:
        return str(merge.get("base"))
    if step:
        return str(step.get("reference"))
    return None


def _datasets(step: Mapping[str, Any] | None) -> tuple[list[str], dict[str, str]]:
    """Hub dataset ids (for the metadata) and every data file with its fingerprint (for the text)."""
    files = dict(((step or {}).get("data") or {}).get("files") or {})
    hub = sorted({name.removeprefix("hub:").split(":")[0] for name in files if name.startswith("hub:")})
    return hub, files


def build_model_card(
    folder: str | os.PathLike,
    *,
    budget: Mapping[str, Any] | None = None,
    evaluation: Mapping[str, Any] | None = None,
    source: str | None = None,
    license: str | None = None,
) -> str:
    """The card of a model folder as Markdown with a YAML front matter.

    Args:
        folder: An export or merge folder (its ``sacpo_*.json`` files are read).
        budget: The safety budget's ``budget.json`` when it picked this model's lambda (lambda*, b, status).
        evaluation: Measured numbers for this model (for example ``{"safety": 0.91, "helpfulness": 0.42}``), each a
            number or a ``{"value": ..., "interval": [lo, hi]}`` mapping.
        source: The folder this one was converted from (``sacpo export``).
        license: The licence identifier; default: the base model's own card's, else ``other``.
    """
    folder = Path(folder)
    step, merge = _read_json(folder / STEP_FILE), _read_json(folder / MERGE_FILE)
    base = _base_model(folder, step, merge)
    hub_data, files = _datasets(step)
    tags = list(LIBRARY_TAGS) + (["merge"] if merge else []) + (["lora"] if (folder / CHAIN_FILE).is_file() else [])
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "license": license or _base_license(base) or "other",
        "base_model": base,
        "tags": tags,
    }
    if hub_data:
        meta["datasets"] = hub_data
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", ""]
    title = "P-SACPO merge" if merge else f"SACPO step: {step['kind']}" if step else "SACPO model"
    lines += [f"# {title}", ""]
    if source:
        lines += [f"Converted to a plain Hugging Face folder from `{source}`.", ""]
    if step:
        lines += ["## Training", "", "| field | value |", "|---|---|"]
        rows = [("step", step.get("kind")), ("beta", step.get("beta")), ("finetune", step.get("finetune")),
                ("reference", step.get("reference")), ("global_step", step.get("global_step")),
                ("data settings fingerprint", (step.get("data") or {}).get("settings"))]
        if budget is not None and budget.get("lambda_star") is not None:
            rows.insert(2, ("lambda", f"lambda* = {_number(budget['lambda_star'])} (picked by the safety budget)"))
        elif "lam" in step:
            rows.insert(2, ("lambda", step["lam"]))
        if "kl_coef" in step:
            rows.insert(3, ("KL coefficient (beta / lambda)", step["kl_coef"]))
        lines += [f"| {k} | {_number(v)} |" for k, v in rows if v is not None]
        lines.append("")
    if budget is not None:
        solution = budget.get("solution") or {}
        lines += ["## Safety budget", "",
                  f"- b (target E[g]): {_number(solution.get('b'))}",
                  f"- lambda*: {_number(budget.get('lambda_star'))} (status `{budget.get('status')}`; "
                  f"searched in [0, {_number(solution.get('lam_max'))}])"]
        interval = budget.get("lambda_star_interval")
        if isinstance(interval, list | tuple) and len(interval) == 2 and interval != [None, None]:
            level = (budget.get("interval") or {}).get("level")
            shown = f"{level:.0%} " if isinstance(level, int | float) else ""
            # budget.json writes an unbounded end (resamples with no root below lam_max) as null
            ends = [_number(v) if v is not None else "unbounded" for v in interval]
            lines.append(f"- {shown}bootstrap interval of lambda*: [{ends[0]}, {ends[1]}]")
        if budget.get("step2_beta") is not None:
            lines.append(f"- beta / lambda* (step 2's KL coefficient): {_number(budget['step2_beta'])}")
        lines += [f"- predicted E[g] at lambda*: {_number((budget.get('predicted') or {}).get('safety'))}",
                  f"- {budget.get('message')}", ""]
    if merge:
        lines += ["## Merge", "", f"`(1 - q) * base + q * other` with q = {_number(merge.get('q'))}", "",
                  f"- base: `{merge.get('base')}`", f"- other: `{merge.get('other')}`", ""]
    if files:
        lines += ["## Data", "", "| file | sha256 (first 16) |", "|---|---|"]
        lines += [f"| `{name}` | {fp} |" for name, fp in files.items()]
        lines.append("")
    final = (step or {}).get("final_metrics") or {}
    if final:
        lines += ["## Final training metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_number(v)} |" for k, v in sorted(final.items())]
        lines.append("")
    if evaluation:
        lines += ["## Evaluation", "", "| measure | value | interval |", "|---|---|---|"]
        for name, value in evaluation.items():
            if isinstance(value, Mapping):
                interval = value.get("interval")
                shown = f"{_number(interval[0])} - {_number(interval[1])}" if interval else ""
                lines.append(f"| {name} | {_number(value.get('value'))} | {shown} |")
            else:
                lines.append(f"| {name} | {_number(value)} | |")
        lines.append("")
    lines += ["## Loading", ""]
    if (folder / CHAIN_FILE).is_file():
        lines += [f"This folder holds the base model's config and adapters (listed in `{CHAIN_FILE}`), not full "
                  "weights. `sacpo export FOLDER OUT` writes a plain folder that `AutoModelForCausalLM` loads.", ""]
    else:
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  'model = AutoModelForCausalLM.from_pretrained("PATH")',
                  'tokenizer = AutoTokenizer.from_pretrained("PATH")', "```", ""]
    return "\n".join(lines)


def write_model_card(folder: str | os.PathLike, **kwargs: Any) -> Path:
    """Writes :func:`build_model_card`'s card to ``folder/README.md`` atomically; returns its path."""
    path = Path(folder) / CARD_FILE
    atomic_write_text(path, build_model_card(folder, **kwargs))
    return path
