"""How far a weight-space merge is from the token-level geometric mixture: the mean per-token KL on given texts.

:func:`mixture_vs_merge_kl` runs ``GeometricMixtureLM(A, B, q)`` (:mod:`sacpo_lightning.models.mixture`) and the merge
(:mod:`sacpo_lightning.merging`) teacher-forced over the texts and averages ``KL(mixture || merge)`` over their tokens;
:func:`kl_texts` renders prompts as the chat turns the KL is measured on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from sacpo_lightning.data.prompts import format_prompt
from sacpo_lightning.data.tokenization import encode_with_bos
from sacpo_lightning.io import PathLike
from sacpo_lightning.merge_weight import check_q
from sacpo_lightning.models.compat import check_compatible
from sacpo_lightning.models.mixture import GeometricMixtureLM, token_kl
from sacpo_lightning.models.policy import load_model_folder
from sacpo_lightning.models.tokenizer import load_tokenizer
from sacpo_lightning.progress import Progress

__all__ = ["KL_MAX_LENGTH", "MixtureKL", "kl_texts", "mixture_vs_merge_kl"]

KL_MAX_LENGTH = 512
"""Tokens a KL prompt is cut to by default (``sacpo merge --kl_max_length``, the ``MergeOnFitEnd`` callback)."""


class MixtureKL(NamedTuple):
    """Result of :func:`mixture_vs_merge_kl`."""

    mean_kl: float
    """Mean per-token ``KL(mixture || merged)`` in nats."""
    num_tokens: int
    """Number of positions averaged over."""


@torch.no_grad()
def mixture_vs_merge_kl(
    dir_a: PathLike,
    dir_b: PathLike,
    merged_dir: PathLike,
    q: float,
    prompts: Sequence[str],
    tokenizer=None,
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    dtype: str | torch.dtype | None = torch.float32,
    device: str | torch.device | None = None,
) -> MixtureKL:
    """How far a weight-space merge is from the token-level geometric mixture, measured on given texts.

    Each text is tokenized (one BOS where training puts one, right-padded) and both the token-level mixture
    ``GeometricMixtureLM(A, B, q)`` and the merged model are run teacher-forced over it. At every real (non-padding)
    position ``t`` the next-token distributions are compared with ``KL(mixture(. | x_<=t) || merged(. | x_<=t))``;
    the result is the mean over all positions of all texts. No tokens are generated. The value is 0 when the merged
    model is A at ``q = 0`` or B at ``q = 1``, and grows as the merge departs from the token-level mixture. It does not
    measure the distance to the sequence-level mixture (see
    :class:`~sacpo_lightning.models.mixture.GeometricMixtureLM`).

    Args:
        dir_a: The ``q = 0`` folder (step-1 model).
        dir_b: The ``q = 1`` folder (step-2 model).
        merged_dir: The merged folder to evaluate (e.g. from :func:`merge_model_folders` with the same ``q``).
        q: Mixture weight in ``[0, 1]``.
        prompts: Texts to score (prompts, or prompts with responses).
        tokenizer: Tokenizer shared by the models; loaded from ``dir_a`` when omitted.
        batch_size: Texts per forward pass.
        max_length: Truncate texts to this many tokens.
        dtype: Dtype the three models are loaded in (float32 by default, for an accurate KL).
        device: Device to run on (CPU when omitted).

    Returns:
        ``MixtureKL(mean_kl, num_tokens)``.
    """
    q = check_q(q)
    if not prompts:
        raise ValueError("prompts is empty; pass at least one text to score.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer is None:
        tokenizer = load_tokenizer(str(dir_a))
    check_compatible(dir_a, merged_dir)
    mixture = GeometricMixtureLM.from_folders(dir_a, dir_b, q, dtype=dtype, device=device)
    merged = load_model_folder(str(merged_dir), dtype).eval()
    if device is not None:
        merged = merged.to(device)
    total, count = 0.0, 0
    bar = Progress(len(prompts), f"KL of merge q={q:g} vs mixture", unit="texts")
    for start in range(0, len(prompts), batch_size):
        rows = [ids[:max_length] for ids in encode_with_bos(tokenizer, prompts[start : start + batch_size])]
        batch = tokenizer.pad({"input_ids": rows}, padding=True, padding_side="right", return_tensors="pt")
        batch = {k: v.to(mixture.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        mask = batch["attention_mask"]
        log_mix = mixture(batch["input_ids"], attention_mask=mask).logits
        log_merged = torch.log_softmax(merged(**batch, use_cache=False).logits.float(), dim=-1)
        kl = token_kl(log_mix, log_merged.to(log_mix.dtype))
        total += float(kl.masked_fill(mask == 0, 0.0).double().sum())
        count += int(mask.sum())
        bar.update(int(mask.shape[0]))
    bar.close()
    return MixtureKL(mean_kl=total / count if count else math.nan, num_tokens=count)


def kl_texts(prompts: Sequence[str], tokenizer) -> list[str]:
    """Each prompt as a user turn of the chat template with the assistant header (plain text without a template).

    The KL is so measured where a response would start; :func:`mixture_vs_merge_kl` encodes the texts with one BOS
    where training puts one.
    """
    if not getattr(tokenizer, "chat_template", None):
        return list(prompts)
    return [format_prompt(tokenizer, prompt, "chat") for prompt in prompts]
