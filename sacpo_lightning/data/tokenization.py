"""Tokenization of records into prompt and response token ids, with BOS/EOS handling and truncation.

Prompt and responses are tokenized separately with ``add_special_tokens=False``, so the boundary between them is
exact and labels can be built from lengths. Special tokens are then placed explicitly:

- BOS is put in front of the prompt only when the tokenizer adds one by default (Llama-style tokenizers do, SmolLM2's
  does not), and only when the rendered prompt (a chat template may write it) does not already start with it: the
  sequence starts with exactly one BOS or none.
- EOS is appended to each response unless the response already ends with it: exactly one EOS.

Truncation: a prompt longer than ``max_prompt_length`` loses tokens from the left (the start of a long conversation
matters least; a leading BOS is kept), then a response is cut from the right so that prompt + response fits
``max_length``. A response cut this way loses its EOS: the model is trained on a reply that does not end there, which
is the usual and harmless consequence of truncation; raise ``max_length`` to avoid it.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sacpo_lightning.data.formatting import TEMPLATES, render_prompt, render_response
from sacpo_lightning.data.sources import KTORecord, PairRecord, prompt_key
from sacpo_lightning.errors import UserError

__all__ = [
    "TokenizeConfig",
    "batch_tokenize_kto",
    "batch_tokenize_pairs",
    "kl_partners",
    "tokenizer_adds_bos",
    "encode_with_bos",
    "with_bos",
]


@dataclass(frozen=True)
class TokenizeConfig:
    """Tokenization settings.

    Args:
        max_length: Most tokens of prompt + response.
        max_prompt_length: Most prompt tokens (kept from the right); must be smaller than ``max_length``.
        template: Prompt template, ``chat``, ``pku`` or ``raw`` (see :mod:`sacpo_lightning.data.formatting`).
        system_prompt: Optional system text added to every prompt.
    """

    max_length: int = 512
    max_prompt_length: int = 256
    template: Literal["chat", "pku", "raw"] = "chat"
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise UserError(f"--data.max_length must be an integer >= 2, got {self.max_length!r}.")
        if not isinstance(self.max_prompt_length, int) or self.max_prompt_length < 1:
            raise UserError(f"--data.max_prompt_length must be an integer >= 1, got {self.max_prompt_length!r}.")
        if self.max_prompt_length >= self.max_length:
            raise UserError(
                f"--data.max_prompt_length ({self.max_prompt_length}) must be smaller than --data.max_length "
                f"({self.max_length}) so that every response keeps at least one token."
            )
        if self.template not in TEMPLATES:
            raise UserError(f"--data.template must be one of {', '.join(TEMPLATES)}; got {self.template!r}.")


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` puts BOS in front of a text by default (``add_special_tokens=True``)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def with_bos(ids: Sequence[int], bos: int | None, max_tokens: int | None = None) -> list[int]:
    """``ids`` with exactly one leading ``bos`` (added only when missing; none when ``bos`` is None), cut from the
    left to ``max_tokens`` with the BOS kept at the front."""
    ids = list(ids)
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    if max_tokens is not None and len(ids) > max_tokens:
        ids = ([ids[0]] + ids[len(ids) - max_tokens + 1 :]) if bos is not None else ids[len(ids) - max_tokens :]
    return ids


def encode_with_bos(tokenizer: Any, texts: Sequence[str], max_tokens: int | None = None) -> list[list[int]]:
    """Token ids of rendered texts with one BOS exactly where training puts one: at the front when the tokenizer adds
    BOS by default, never doubled when a chat template already wrote it, and none otherwise (see :func:`with_bos`).
    Training, generation, the guard judges and the merge KL all encode through this."""
    bos = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
    if not texts:
        return []
    out = tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)
    return [with_bos(ids, bos, max_tokens) for ids in out["input_ids"]]


class _Encoder:
    """Renders and tokenizes prompts and responses in batches (one tokenizer call per list), caching prompts."""

    def __init__(self, tokenizer: Any, config: TokenizeConfig, stats: Counter | None) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.stats = stats if stats is not None else Counter()
        self.bos = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
        self.eos = tokenizer.eos_token_id

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        out = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)
        return list(out["input_ids"])

    def prompts(self, prompts: Sequence[Any]) -> tuple[list[list[int]], list[str]]:
        """Token ids and rendered texts of each prompt."""
        keys = [prompt_key(p) for p in prompts]
        unique: dict[str, int] = {}
        unique_prompts = []
        for key, p in zip(keys, prompts, strict=True):
            if key not in unique:
                unique[key] = len(unique_prompts)
                unique_prompts.append(p)
        texts = [
            render_prompt(p, self.config.template, self.tokenizer, self.config.system_prompt) for p in unique_prompts
        ]
        ids = [self._finish_prompt(x) for x in self._ids(texts)]
        return [ids[unique[k]] for k in keys], [texts[unique[k]] for k in keys]

    def _finish_prompt(self, ids: list[int]) -> list[int]:
        limit = self.config.max_prompt_length
        # Only a tokenizer that adds BOS by default gets one kept at the front; SmolLM2's "BOS" is <|im_start|>,
        # which starts every chat turn and is an ordinary token for truncation.
        ids = with_bos(ids, self.bos)
        if len(ids) > limit:
            self.stats["prompts_truncated"] += 1
            ids = with_bos(ids, self.bos, limit)
        return ids

    def responses(self, texts: list[str], prompt_texts: list[str], prompt_ids: list[list[int]]) -> list[list[int]]:
        rendered = [render_response(t, self.config.template, p) for t, p in zip(texts, prompt_texts, strict=True)]
        out = []
        for ids, prompt in zip(self._ids(rendered), prompt_ids, strict=True):
            if self.eos is not None and (not ids or ids[-1] != self.eos):
                ids = [*ids, self.eos]
            room = self.config.max_length - len(prompt)
            if len(ids) > room:
                self.stats["responses_truncated"] += 1
                ids = ids[:room]
            out.append(ids)
        return out


def batch_tokenize_pairs(
    records: Sequence[PairRecord], tokenizer: Any, config: TokenizeConfig, *, stats: Counter | None = None
) -> list[dict[str, Any]]:
    """Tokenizes pairs into ``{"prompt_ids", "chosen_ids", "rejected_ids", "index"}`` dicts (index = position).

    Args:
        records: The pairs.
        tokenizer: A Hugging Face tokenizer.
        config: Lengths and template.
        stats: Optional counter that receives ``prompts_truncated`` and ``responses_truncated``.
    """
    enc = _Encoder(tokenizer, config, stats)
    prompt_ids, prompt_texts = enc.prompts([r.prompt for r in records])
    chosen = enc.responses([r.chosen for r in records], prompt_texts, prompt_ids)
    rejected = enc.responses([r.rejected for r in records], prompt_texts, prompt_ids)
    return [
        {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r, "index": i}
        for i, (p, c, r) in enumerate(zip(prompt_ids, chosen, rejected, strict=True))
    ]


def kl_partners(n: int, seed: int = 0) -> list[int]:
    """A seeded derangement of ``range(n)``: ``partners[i] != i`` for ``n >= 2`` (``[0]`` for ``n = 1``).

    Sattolo's algorithm draws a uniformly random single-cycle permutation, which never maps an index to itself.
    """
    rng = random.Random(seed)
    partners = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        partners[i], partners[j] = partners[j], partners[i]
    return partners


def batch_tokenize_kto(
    records: Sequence[KTORecord],
    tokenizer: Any,
    config: TokenizeConfig,
    *,
    stats: Counter | None = None,
    kl_seed: int = 0,
) -> list[dict[str, Any]]:
    """Tokenizes unpaired examples into ``{"prompt_ids", "completion_ids", "kl_completion_ids", "desirable", "index"}``.

    ``kl_completion_ids`` is the mismatched completion of KTO's KL estimate: the completion of example
    ``kl_partners(n, kl_seed)[i]`` (another example of the same list), cut so that prompt + it fits
    ``config.max_length``. It is fixed here, once, rather than drawn from each shuffled batch, so that a KL row
    depends only on its example and its reference log-prob can be computed ahead of training.
    """
    enc = _Encoder(tokenizer, config, stats)
    prompt_ids, prompt_texts = enc.prompts([r.prompt for r in records])
    completions = enc.responses([r.completion for r in records], prompt_texts, prompt_ids)
    partners = kl_partners(len(records), kl_seed)
    return [
        {
            "prompt_ids": p,
            "completion_ids": c,
            "kl_completion_ids": completions[partners[i]][: config.max_length - len(p)],
            "desirable": bool(r.desirable),
            "index": i,
        }
        for i, (p, c, r) in enumerate(zip(prompt_ids, completions, records, strict=True))
    ]
