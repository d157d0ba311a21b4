"""Implicit-reward preference accuracy on held-out pairs.

A policy trained with DPO-style objectives from a reference defines the implicit reward
``r(x, y) = log pi(y | x) - log pi_ref(y | x)`` (up to the factor beta and a prompt-only term, which cancel between two
responses to one prompt). The preference accuracy is the fraction of pairs whose chosen response has the larger
implicit reward. Measured on helpfulness pairs it says how well step 1 learnt the reward; on safety pairs, how well
step 2 learnt safety. For SACPO's step 2 the natural reference is the step-1 model; with the SFT model as reference
the accuracy measures the combined objective learnt by both steps.

Ties: ``accuracy`` counts a pair only when the chosen log-ratio is strictly larger (by more than ``tie_eps``), the
convention of DPO's ``rewards/accuracy``, so a model compared with itself (all log-ratios 0) scores 0.
``accuracy_ties_half`` counts ties as half a win (0.5 for a model against itself), and ``ties`` is their fraction.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from sacpo_lightning.errors import UserError
from sacpo_lightning.logprobs import pair_sequence_logps
from sacpo_lightning.progress import Progress

__all__ = [
    "ImplicitAccuracy",
    "implicit_accuracies",
    "implicit_accuracy_from_log_ratios",
    "pair_dataloader",
    "pair_logps",
]


@dataclass
class ImplicitAccuracy:
    """Result of an implicit-reward accuracy measurement (see the module docstring for tie handling)."""

    accuracy: float
    accuracy_ties_half: float
    ties: float
    mean_margin: float
    num_pairs: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def implicit_accuracy_from_log_ratios(chosen: Tensor, rejected: Tensor, *, tie_eps: float = 0.0) -> ImplicitAccuracy:
    """Accuracy from per-pair implicit rewards.

    Args:
        chosen: (N,) ``log pi(y_w | x) - log pi_ref(y_w | x)``.
        rejected: (N,) ``log pi(y_l | x) - log pi_ref(y_l | x)``.
        tie_eps: Margins with ``|margin| <= tie_eps`` are ties.
    """
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(f"chosen and rejected must be (N,), got {tuple(chosen.shape)} and {tuple(rejected.shape)}")
    n = chosen.numel()
    if n == 0:
        raise ValueError("no pairs to score")
    margin = (chosen - rejected).double()
    wins = int((margin > tie_eps).sum())
    ties = int((margin.abs() <= tie_eps).sum())
    return ImplicitAccuracy(
        accuracy=wins / n,
        accuracy_ties_half=(wins + 0.5 * ties) / n,
        ties=ties / n,
        mean_margin=float(margin.mean()),
        num_pairs=n,
    )


@torch.no_grad()
def pair_logps(
    model: torch.nn.Module, batches: Iterable[Mapping[str, Tensor]], *, average: bool = False, desc: str | None = None
) -> Tensor:
    """(2N,) sequence log-probs of every pair's chosen then rejected responses, batch by batch (each prompt once per
    pass: :func:`~sacpo_lightning.logprobs.pair_sequence_logps`), on the CPU; with
    ``desc`` (and a list of batches) progress lines with rate and ETA."""
    device = next(model.parameters()).device
    batches = list(batches)
    out = []
    total = sum(int(b["input_ids"].shape[0]) // 2 for b in batches)
    bar = Progress(total, desc, unit="pairs") if desc else None
    for batch in batches:
        logps = pair_sequence_logps(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                    batch["labels"].to(device), average=average)
        out.append(logps.float().cpu())
        if bar is not None:
            bar.update(int(batch["input_ids"].shape[0]) // 2)
    if bar is not None:
        bar.close()
    if not out:
        raise ValueError("no pair batches to score")
    return torch.cat(out)


def _split_pairs(logps: Tensor, batch_sizes: list[int]) -> tuple[Tensor, Tensor]:
    chosen, rejected, start = [], [], 0
    for b in batch_sizes:
        chosen.append(logps[start:start + b])
        rejected.append(logps[start + b:start + 2 * b])
        start += 2 * b
    return torch.cat(chosen), torch.cat(rejected)


def implicit_accuracies(
    models: Mapping[str, str],
    reference: str,
    pair_sets: Mapping[str, Mapping[str, Any]],
    *,
    dtype: str | None = "float32",
    device: str | None = None,
    average: bool = False,
    tie_eps: float = 0.0,
    precision: str = "float32",
) -> dict[str, dict[str, dict[str, Any]]]:
    """Implicit-reward accuracy of several models against one reference.

    Each pair set is tokenized once and scored once by the reference; then each model is loaded, scored and freed in
    turn, so the cost is one reference pass plus one pass per model. A set's ``models`` key (model names) limits it
    to those models; a model in no set is not loaded. A set's ``against`` key (``{model: other model}``, both scored
    on the set) also measures a model with another one as the reference, e.g. SACPO's step 2 against step 1, its own
    reference: ``log pi_2 - log pi_1 = (log pi_2 - log pi_ref) - (log pi_1 - log pi_ref)``, from the passes already
    made, at no extra cost.

    ``precision="bf16"`` runs the passes under bf16 autocast (float32 weights), with eager attention on the CPU so
    that each pair's prompt is held once (:func:`~sacpo_lightning.logprobs.pair_sequence_logps`): about twice as fast
    as float32 on a CPU with native bf16, but rounding moves each log-ratio by a few tenths of a nat, so some pairs
    with small margins change sign (README, the main job). Such noise does not depend on which answer people chose,
    so in expectation it pulls the accuracy toward 0.5 (one set of pairs can land on either side). ``float32`` (the
    default) is the exact measurement.

    Returns:
        ``{model name: {set name: ImplicitAccuracy.to_dict()}}``; ``against`` results under the key
        ``"<set name> against <other model>"``.
    """
    if precision not in ("float32", "bf16"):
        raise UserError(f"implicit_precision must be float32 or bf16, got {precision!r}")
    from sacpo_lightning.evaluation.generation import load_generation_model

    chosen_models = {name: list(kwargs.get("models") or models) for name, kwargs in pair_sets.items()}
    unknown = sorted({m for names in chosen_models.values() for m in names} - set(models))
    if unknown:
        raise UserError(f"implicit: models {', '.join(unknown)} are not scored; scored: {', '.join(models)}")
    for name, kwargs in pair_sets.items():
        for model_name, other in (kwargs.get("against") or {}).items():
            missing = [m for m in (model_name, other) if m not in chosen_models[name]]
            if missing or model_name == other:
                raise UserError(f"implicit.{name}.against: {model_name} against {other} needs two different models "
                                f"scored on {name!r} (scored: {', '.join(chosen_models[name])})")
    ref, ref_tokenizer = load_generation_model(reference, dtype=dtype, device=device)
    _prepare(ref, precision)
    sets = {}
    for name, kwargs in pair_sets.items():
        kwargs = {k: v for k, v in kwargs.items() if k not in ("models", "against")}
        kwargs.setdefault("tokenizer", ref_tokenizer)
        batches = list(pair_dataloader(**kwargs))
        sizes = [b["input_ids"].shape[0] // 2 for b in batches]
        with _autocast(ref, precision):
            sets[name] = (batches, sizes, pair_logps(ref, batches, average=average,
                                                     desc=f"implicit {name}: reference"))
    del ref
    results: dict[str, dict[str, dict[str, Any]]] = {}
    ratios: dict[tuple[str, str], Tensor] = {}
    for model_name, spec in models.items():
        model_sets = {name: value for name, value in sets.items() if model_name in chosen_models[name]}
        if not model_sets:
            continue
        policy, _ = load_generation_model(spec, dtype=dtype, device=device)
        _prepare(policy, precision)
        results[model_name] = {}
        for name, (batches, sizes, ref_logps) in model_sets.items():
            with _autocast(policy, precision):
                logps = pair_logps(policy, batches, average=average, desc=f"implicit {name}: {model_name}")
            ratios[model_name, name] = logps - ref_logps
            chosen, rejected = _split_pairs(ratios[model_name, name], sizes)
            results[model_name][name] = implicit_accuracy_from_log_ratios(chosen, rejected, tie_eps=tie_eps).to_dict()
        del policy
    for name, kwargs in pair_sets.items():
        for model_name, other in (kwargs.get("against") or {}).items():
            chosen, rejected = _split_pairs(ratios[model_name, name] - ratios[other, name], sets[name][1])
            results[model_name][f"{name} against {other}"] = implicit_accuracy_from_log_ratios(
                chosen, rejected, tie_eps=tie_eps).to_dict()
    return results


def _device_type(model: torch.nn.Module) -> str:
    param = next(model.parameters(), None)
    return param.device.type if param is not None else "cpu"


def _prepare(model: torch.nn.Module, precision: str) -> None:
    """Under bf16 on the CPU, eager attention: SDPA keeps two rows per pair in bf16 (see ``pair_sequence_logps``)."""
    config = getattr(model, "config", None)
    if precision == "bf16" and _device_type(model) == "cpu" and config is not None:
        if getattr(config, "_attn_implementation", None) == "sdpa":
            if hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation("eager")
            else:
                config._attn_implementation = "eager"


def _autocast(model: torch.nn.Module, precision: str):
    return torch.autocast(_device_type(model), dtype=torch.bfloat16, enabled=precision == "bf16")


def pair_dataloader(
    train_files: list[str],
    *,
    tokenizer: str | Any,
    source: str = "pku",
    objective: str = "safe",
    split: str = "val",
    template: str = "chat",
    max_length: int = 512,
    max_prompt_length: int = 256,
    val_fraction: float = 0.05,
    max_pairs: int | None = None,
    seed: int = 42,
    batch_size: int = 8,
    **data_kwargs: Any,
) -> DataLoader:
    """Pair batches from a :class:`~sacpo_lightning.data.PreferenceDataModule`, shortest pairs first (batches of
    similar length pad less; each pair is scored on its own, so the order changes no result).

    Args:
        train_files: Pair files.
        tokenizer: Tokenizer name/path or a loaded tokenizer (the reference's).
        source, objective, template, max_length, max_prompt_length: As for the data module.
        split: ``val`` takes the held-out split a training run with the same ``val_fraction`` and ``seed`` did not
            train on; ``all`` takes every pair.
        val_fraction: Held-out fraction of prompts (``split="val"``).
        max_pairs: Use at most this many pairs (a seeded subset).
        seed: Seed of the split and the subset.
        batch_size: Pairs per batch.
        **data_kwargs: Other ``PreferenceDataModule`` arguments (``filter``, ``column_mapping``, ...).
    """
    from sacpo_lightning.data import PreferenceDataModule, collate_pairs

    if split not in ("val", "all"):
        raise ValueError(f"split must be 'val' or 'all', got {split!r}")
    dm = PreferenceDataModule(
        train_files=train_files,
        source=source,
        objective=objective,
        kind="pairs",
        tokenizer=tokenizer if isinstance(tokenizer, str) else None,
        template=template,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        val_fraction=val_fraction if split == "val" else 0.0,
        max_samples=max_pairs if split == "all" else None,
        max_val_samples=max_pairs if split == "val" else None,
        seed=seed,
        batch_size=batch_size,
        **data_kwargs,
    )
    if not isinstance(tokenizer, str):
        dm.set_tokenizer(tokenizer)
    dm.setup("validate")
    dataset = dm.val_dataset if split == "val" else dm.train_dataset
    if not dataset:
        raise ValueError(f"No {split} pairs in {train_files} (val_fraction={val_fraction}); raise val_fraction.")
    collate = functools.partial(collate_pairs, pad_token_id=dm.pad_token_id)
    lengths = dataset.lengths()
    order = sorted(range(len(dataset)), key=lengths.__getitem__)
    return DataLoader(dataset, batch_size=batch_size, sampler=order, collate_fn=collate)
