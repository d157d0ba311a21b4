"""Collate functions: tokenized examples to padded tensors, with labels built from lengths.

Labels are ``-100`` on prompt and padding positions and the token id on response positions. They are built from the
prompt and response lengths, never by comparing ids with ``pad_token_id``: tokenizers that pad with EOS (SmolLM2 pads
with ``<|im_end|>``) would otherwise lose the EOS that ends every response. Padding is on the right.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sacpo_lightning.errors import UserError

__all__ = ["IGNORE_INDEX", "collate_kto", "collate_pairs", "pad_and_label"]

IGNORE_INDEX = -100


def _round_up(n: int, multiple: int | None) -> int:
    if multiple is None or multiple <= 1:
        return n
    return -(-n // multiple) * multiple


def pad_and_label(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pads ``prompt + response`` rows.

    Returns:
        ``input_ids`` (N, L) long, ``attention_mask`` (N, L) long and ``labels`` (N, L) long, where L is the longest
        row rounded up to ``pad_to_multiple_of``.
    """
    n = len(prompts)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    width = _round_up(max(lengths), pad_to_multiple_of)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        end = len(p) + len(r)
        input_ids[i, :end] = torch.tensor([*p, *r], dtype=torch.long)
        attention_mask[i, :end] = 1
        labels[i, len(p) : end] = torch.tensor(r, dtype=torch.long)
    return input_ids, attention_mask, labels


def _check(examples: Sequence[Any], pad_token_id: int | None) -> None:
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; give the tokenizer a pad token (load_tokenizer does).")


def collate_pairs(
    examples: Sequence[dict[str, Any]], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Collates B pairs into one padded batch of 2B rows for a single concatenated forward pass.

    Args:
        examples: Dicts with ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (lists of ints) and ``index``.
        pad_token_id: Id written at padding positions (may equal EOS).
        pad_to_multiple_of: Optional multiple to round the padded length up to.

    Returns:
        ``input_ids`` (2B, L): rows ``0..B-1`` are prompt + chosen, rows ``B..2B-1`` prompt + rejected of the same
        pairs; ``attention_mask`` (2B, L); ``labels`` (2B, L), -100 except on response tokens; ``index`` (B,).
    """
    _check(examples, pad_token_id)
    prompts = [e["prompt_ids"] for e in examples] * 2
    responses = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    input_ids, attention_mask, labels = pad_and_label(prompts, responses, pad_token_id, pad_to_multiple_of)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "index": torch.tensor([e["index"] for e in examples], dtype=torch.long),
    }


def collate_kto(
    examples: Sequence[dict[str, Any]],
    pad_token_id: int,
    max_length: int | None = None,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Collates B unpaired examples, with the mismatched pairs of KTO's KL estimate.

    KL row ``i`` is prompt ``i`` followed by the example's own fixed mismatched completion ``kl_completion_ids``
    (chosen once at tokenization, see :func:`~sacpo_lightning.data.tokenization.batch_tokenize_kto`), so it does not
    depend on which examples share the batch.

    Args:
        examples: Dicts with ``prompt_ids``, ``completion_ids``, ``kl_completion_ids``, ``desirable`` and ``index``.
        pad_token_id: Id written at padding positions (may equal EOS).
        max_length: Optional cap on the tokens of a KL row (the KL completion is cut to fit).
        pad_to_multiple_of: Optional multiple to round the padded lengths up to.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` (B, L); ``desirable`` (B,) bool; ``index`` (B,); and
        ``kl_input_ids``, ``kl_attention_mask``, ``kl_labels`` (B, L').
    """
    _check(examples, pad_token_id)
    missing = [e.get("index", i) for i, e in enumerate(examples) if "kl_completion_ids" not in e]
    if missing:
        raise ValueError(
            f"KTO examples {missing[:5]} lack kl_completion_ids; tokenize them with batch_tokenize_kto, which picks "
            "each example's mismatched KL completion."
        )
    prompts = [e["prompt_ids"] for e in examples]
    completions = [e["completion_ids"] for e in examples]
    input_ids, attention_mask, labels = pad_and_label(prompts, completions, pad_token_id, pad_to_multiple_of)
    kl_completions = []
    for prompt, e in zip(prompts, examples, strict=True):
        completion = e["kl_completion_ids"]
        if max_length is not None:
            room = max_length - len(prompt)
            if room < 1:
                raise UserError(f"a prompt of {len(prompt)} tokens leaves no room for a completion in max_length "
                                f"{max_length}; --data.max_prompt_length must be smaller than --data.max_length.")
            completion = completion[:room]
        kl_completions.append(completion)
    kl_ids, kl_mask, kl_labels = pad_and_label(prompts, kl_completions, pad_token_id, pad_to_multiple_of)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "desirable": torch.tensor([bool(e["desirable"]) for e in examples], dtype=torch.bool),
        "index": torch.tensor([e["index"] for e in examples], dtype=torch.long),
        "kl_input_ids": kl_ids,
        "kl_attention_mask": kl_mask,
        "kl_labels": kl_labels,
    }
