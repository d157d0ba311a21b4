"""Reward (helpfulness) and cost (harmfulness) score models: scoring ``(prompt, response)`` pairs.

:class:`ScoreModel` loads any Hugging Face sequence-classification model with one output (a reward or cost model from
the Hub, or one exported by :class:`~sacpo_lightning.modules.RewardModelModule` or
:class:`~sacpo_lightning.modules.CostModelModule`, which train them; see :mod:`sacpo_lightning.modules.score`) and
scores ``(prompt, response)`` pairs. Loading is strict
(:func:`sacpo_lightning.models.classifier.load_sequence_classifier`): a checkpoint whose weights do not fit the model
raises :class:`~sacpo_lightning.models.classifier.ScoreModelLoadError` rather than scoring with a random head.

Texts are tokenized exactly as the training pairs are (:mod:`sacpo_lightning.data.tokenization`: template, one BOS
where the tokenizer adds one, an EOS after the response), and the score is read by the model's own pooling (the last
token that is not padding; with a tokenizer that pads with its EOS, as SmolLM2's does, that is the last token before
the EOS), so training and scoring see the same inputs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from sacpo_lightning.data.sources import KTORecord
from sacpo_lightning.data.tokenization import TokenizeConfig, batch_tokenize_kto
from sacpo_lightning.models.classifier import SCORE_MODEL_FILE, load_sequence_classifier
from sacpo_lightning.models.registry import resolve_model_path
from sacpo_lightning.models.tokenizer import load_tokenizer
from sacpo_lightning.progress import Progress

__all__ = ["ScoreModel"]


class ScoreModel:
    """Scores ``(prompt, response)`` pairs with a sequence-classification model (one output).

    Args:
        model: A ``*ForSequenceClassification`` model in eval mode.
        tokenizer: Its tokenizer (with a pad token).
        template: How prompts are rendered: ``chat``, ``pku`` or ``raw`` (:mod:`sacpo_lightning.data.formatting`).
        max_length: Most tokens of prompt + response (longer responses are cut from the right).
        max_prompt_length: Most prompt tokens (cut from the left).
        batch_size: Pairs per forward pass.
        kind: ``reward``, ``cost`` or None (informational).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        template: str = "chat",
        max_length: int = 1024,
        max_prompt_length: int = 512,
        batch_size: int = 8,
        kind: str | None = None,
    ) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("The score model's tokenizer has no pad token; load it with load_tokenizer")
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.config = TokenizeConfig(max_length=max_length, max_prompt_length=max_prompt_length, template=template)
        self.batch_size = batch_size
        self.kind = kind

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        template: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int = 8,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
    ) -> ScoreModel:
        """Loads a folder or Hub id; settings default to the folder's ``score_model.json`` when there is one.

        Without ``score_model.json`` and ``template``, the tokenizer's chat template is used if it has one, else the
        PKU template (``BEGINNING OF CONVERSATION: USER: ... ASSISTANT:``, as Safe RLHF's score models expect).

        Loading is strict (:func:`load_sequence_classifier` with ``new_head=False``): a checkpoint without its head
        (a causal LM), or with weights the model has no place for, is refused rather than scored by a random head.

        Raises:
            ScoreModelLoadError: naming the missing and unexpected weights.
        """
        resolved = resolve_model_path(str(path))
        meta_file = Path(resolved) / SCORE_MODEL_FILE
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        tokenizer = load_tokenizer(str(resolved))
        if template is None:
            template = meta.get("template") or ("chat" if getattr(tokenizer, "chat_template", None) else "pku")
        model = load_sequence_classifier(str(resolved), dtype=dtype, pad_token_id=None, new_head=False)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(device).eval()
        return cls(
            model,
            tokenizer,
            template=template,
            max_length=max_length or meta.get("max_length", 1024),
            max_prompt_length=max_prompt_length or meta.get("max_prompt_length", 512),
            batch_size=batch_size,
            kind=meta.get("kind"),
        )

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> list[list[int]]:
        """Token ids of ``prompt + response`` rows, as the training pairs are tokenized."""
        if len(prompts) != len(responses):
            raise ValueError(f"Got {len(prompts)} prompts but {len(responses)} responses")
        records = [KTORecord(prompt=p, completion=r, desirable=True, source="score")
                   for p, r in zip(prompts, responses, strict=True)]
        examples = batch_tokenize_kto(records, self.tokenizer, self.config)
        return [e["prompt_ids"] + e["completion_ids"] for e in examples]

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str], *, desc: str | None = None) -> list[float]:
        """One score per ``(prompt, response)``, in input order (batches are sorted by length internally).

        ``desc`` starts the progress lines (:class:`~sacpo_lightning.progress.Progress`; default ``KIND scores``).

        Raises:
            ValueError: when the model has more than one output (a label classifier): its first logit is no score.
        """
        num_labels = int(getattr(self.model.config, "num_labels", 1))
        if num_labels != 1:
            labels = getattr(self.model.config, "id2label", None) or {}
            raise ValueError(
                f"A reward or cost model has one output, but this model has {num_labels} "
                f"(labels {sorted(map(str, labels.values()))}); its first logit is not a score. Use a one-output "
                "score model, or judge a label classifier with ClassifierJudge (mode labels, unsafe_label)."
            )
        if not prompts:
            return []
        rows = self.encode(prompts, responses)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        device = next(self.model.parameters()).device
        scores = [0.0] * len(rows)
        bar = Progress(len(rows), desc or f"{self.kind or 'score model'} scores", unit="responses")
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            width = max(len(rows[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, i in enumerate(chunk):
                input_ids[j, : len(rows[i])] = torch.tensor(rows[i])
                attention_mask[j, : len(rows[i])] = 1
            logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            for j, i in enumerate(chunk):
                scores[i] = float(logits[j, 0])
            bar.update(len(chunk))
        return scores
