"""Reward (helpfulness) and cost (harmfulness) score models: training with Lightning, export, and scoring.

Two halves:

- :class:`ScoreModel` loads any Hugging Face sequence-classification model with one output (a reward or cost model
  from the Hub, or one exported here) and scores ``(prompt, response)`` pairs.
- :class:`RewardModelModule` and :class:`CostModelModule` train such a model from a causal LM folder (the tiny model,
  SmolLM2, ...) on preference pairs, so that evaluation needs no external service. The reward model is fitted with
  the Bradley-Terry loss on helpfulness pairs; the cost model as Safe RLHF's cost model (Dai et al., 2024):
  a Bradley-Terry term that ranks the unsafe response above the safe one, plus a classification term that pushes the
  cost of unsafe responses above zero and of safe ones below zero, so ``cost > 0`` reads as "unsafe".

Texts are tokenized exactly as the training pairs are (:mod:`sacpo_lightning.data.tokenization`: template, one BOS
where the tokenizer adds one, an EOS after the response), and the score is read by the model's own pooling (the last
token that is not padding; with a tokenizer that pads with its EOS, as SmolLM2's does, that is the last token before
the EOS), so training and scoring see the same inputs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics import MeanMetric

from sacpo_lightning.io import atomic_directory, atomic_write_json
from sacpo_lightning.models.policy import DTYPES, PolicySettings
from sacpo_lightning.optim import OptimSettings, configure_optimization

__all__ = [
    "SCORE_MODEL_FILE",
    "CostModelModule",
    "RewardModelModule",
    "ScoreModel",
    "ScoreModelLoadError",
    "ScoreModelModule",
    "bradley_terry_loss",
    "cost_sign_loss",
    "load_sequence_classifier",
]

SCORE_MODEL_FILE = "score_model.json"
ADAPTER_DIR = "adapter"


# ----------------------------------------------------------------------------------------------------------------------
# Losses (tensor math)
# ----------------------------------------------------------------------------------------------------------------------


def bradley_terry_loss(higher: Tensor, lower: Tensor) -> Tensor:
    """Per-pair Bradley-Terry loss ``-log sigmoid(s_higher - s_lower)`` (Ouyang et al., 2022, eq. 1).

    Args:
        higher: (B,) scores of the responses that should score higher.
        lower: (B,) scores of the other responses.

    Returns:
        (B,) losses; ``log 2`` for equal scores.
    """
    return -F.logsigmoid(higher - lower)


def cost_sign_loss(costs: Tensor, unsafe: Tensor) -> Tensor:
    """Per-response classification term of Safe RLHF's cost model, ``-log sigmoid(sign * c)`` (Dai et al., 2024).

    Args:
        costs: (N,) costs.
        unsafe: (N,) bool, True for unsafe responses (sign +1: the cost should be positive), False for safe ones
            (sign -1: negative).

    Returns:
        (N,) losses.
    """
    sign = unsafe.to(costs.dtype) * 2.0 - 1.0
    return -F.logsigmoid(sign * costs)


# ----------------------------------------------------------------------------------------------------------------------
# Loading and scoring
# ----------------------------------------------------------------------------------------------------------------------


class ScoreModelLoadError(ValueError):
    """A checkpoint whose weights do not fit the sequence-classification model built from its config."""


# Safe-RLHF score models (``LlamaForScore``: PKU-Alignment's beaver reward and cost models) keep their head in
# ``score_head.*`` and its size in ``config.score_dim``; the Hugging Face classes call the head ``score``.
_SAFE_RLHF_HEAD = "score_head."
_HF_HEAD = "score."
# Running score statistics of Safe-RLHF's normalizer. They only rescale scores during its training
# (``normalize_score_during_training``, saved as ``do_normalize``), so they are not part of the scoring function.
_SAFE_RLHF_STATS = ("normalizer.mean", "normalizer.var", "normalizer.count")
_MAX_NAMES = 12


def _names(keys: set[str]) -> str:
    shown = sorted(keys)
    more = f" and {len(shown) - _MAX_NAMES} more" if len(shown) > _MAX_NAMES else ""
    return ", ".join(shown[:_MAX_NAMES]) + more


def _checkpoint_tensors(path: str, keys: set[str], revision: str | None) -> dict[str, Tensor]:
    """Reads ``keys`` from the checkpoint files of a folder or Hub id (safetensors or ``.bin``, sharded or not)."""
    from transformers.utils import cached_file

    def fetch(filename: str) -> str | None:
        return cached_file(path, filename, revision=revision, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)

    found: dict[str, Tensor] = {}
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = fetch(index_name)
        if index is not None:
            weight_map = json.loads(Path(index).read_text())["weight_map"]
            files = sorted({weight_map[k] for k in keys if k in weight_map})
        else:
            files = [single] if fetch(single) is not None else []
        for filename in files:
            local = fetch(filename)
            if local is None:
                continue
            if filename.endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(local, framework="pt") as f:
                    found.update({k: f.get_tensor(k) for k in keys & set(f.keys())})
            else:
                state = torch.load(local, map_location="cpu", weights_only=True)
                found.update({k: state[k] for k in keys & set(state)})
        if found:
            break
    return found


def _map_safe_rlhf_head(model, path: str, missing: set[str], unexpected: set[str], revision: str | None) -> None:
    """Loads a Safe-RLHF ``score_head.*`` (or a ``score.bias`` the class has no slot for) into ``model.score``.

    Removes what it loads from ``missing`` and ``unexpected``. A bias is kept exactly: all zeros is dropped (it adds
    nothing), any other value turns ``model.score`` into a ``Linear`` with a bias, so the score is ``w . h + b`` as in
    Safe-RLHF (``save_pretrained`` then writes ``score.bias``, which this loader reads back the same way).
    """
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear):
        return  # not a ``score`` head: any leftover names are reported by the caller
    wanted = set()
    if "score.weight" in missing and "score_head.weight" in unexpected:
        wanted.add("score_head.weight")
    bias_keys = [k for k in ("score_head.bias", "score.bias") if k in unexpected]
    if len(bias_keys) == 1 and (head.bias is None or "score.bias" in missing):
        wanted.add(bias_keys[0])
    if not wanted:
        return
    tensors = _checkpoint_tensors(path, wanted, revision)
    weight = tensors.get("score_head.weight")
    if weight is not None:
        if weight.shape != head.weight.shape:
            raise ScoreModelLoadError(
                f"{path}: the checkpoint's score_head.weight has shape {tuple(weight.shape)}, but the model's "
                f"score.weight has {tuple(head.weight.shape)} (num_labels {model.config.num_labels}); set num_labels "
                "(or Safe-RLHF's score_dim) in its config.json to the number of outputs of the head."
            )
        with torch.no_grad():
            head.weight.copy_(weight)
        missing.discard("score.weight")
        unexpected.discard("score_head.weight")
    bias = tensors.get(bias_keys[0]) if bias_keys else None
    if bias is None or bias.shape != (head.out_features,):
        return  # a bias of another shape stays in ``unexpected``: reported
    if head.bias is not None:
        with torch.no_grad():
            head.bias.copy_(bias)
        missing.discard("score.bias")
    elif bool(torch.any(bias != 0)):
        biased = torch.nn.Linear(head.in_features, head.out_features, bias=True, dtype=head.weight.dtype,
                                 device=head.weight.device)
        with torch.no_grad():
            biased.weight.copy_(head.weight)
            biased.bias.copy_(bias)
        model.score = biased
    unexpected.discard(bias_keys[0])


def load_sequence_classifier(
    name_or_path: str,
    *,
    dtype: str | None = None,
    num_labels: int | None = None,
    pad_token_id: int | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    gguf_file: str | None = None,
    attn_implementation: str | None = None,
    quantization_config=None,
    device_map=None,
    new_head: bool = True,
):
    """Loads ``AutoModelForSequenceClassification`` from a Hub id, a folder or a named local model, strictly.

    Every weight of the model must come from the checkpoint: Hugging Face would otherwise initialise missing weights
    randomly and ignore unexpected ones without an error, and a random head scores noise. Known layouts are mapped:
    a Safe-RLHF score model's ``score_head.weight`` (and its bias, kept exactly; see :func:`_map_safe_rlhf_head`)
    becomes ``score.weight``, its ``num_labels`` is taken from ``score_dim``, and its normalizer statistics (which
    only act during its training) are ignored.

    Args:
        name_or_path: Folder, Hub id or named local model.
        dtype: Load dtype (default: the checkpoint's).
        num_labels: Outputs of the head (default: the config's).
        pad_token_id: Set on the config: the model pools at the last token that is not padding.
        trust_remote_code, revision, gguf_file, attn_implementation, quantization_config, device_map: As for
            ``from_pretrained``.
        new_head: Building a score model to train from a causal LM checkpoint: the head (weights outside the
            backbone) may be missing and is then newly initialised, and weights outside the backbone (the LM head)
            are dropped. Backbone weights must still all load. ``False`` (used for scoring) requires every weight.

    Raises:
        ScoreModelLoadError: naming the missing and unexpected weights and what to do, when the checkpoint does not
            fit the model, or when shapes differ (e.g. a head with another number of outputs than ``num_labels``).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from sacpo_lightning.models import resolve_model_path

    path = resolve_model_path(name_or_path)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "dtype": DTYPES[dtype] if dtype else "auto"}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    for key, value in (("revision", revision), ("attn_implementation", attn_implementation),
                       ("quantization_config", quantization_config), ("device_map", device_map)):
        if value is not None:
            kwargs[key] = value
    safe_rlhf = False
    if gguf_file is not None:
        from transformers import GgufConfig

        kwargs["gguf_file"] = gguf_file
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    else:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
        safe_rlhf = getattr(config, "score_dim", None) is not None
        if safe_rlhf and num_labels is None:
            # Without num_labels in its config.json the HF config defaults to 2 labels; the head has score_dim rows.
            kwargs["num_labels"] = int(config.score_dim)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True, **kwargs)
    except RuntimeError as err:
        if "ignore_mismatched_sizes" not in str(err):
            raise
        raise ScoreModelLoadError(
            f"{name_or_path}: some checkpoint weights have other shapes than the model built from its config "
            f"(num_labels {kwargs.get('num_labels', 'from config.json')}; the load report above lists them). A "
            "reward or cost model has one output: point at a checkpoint with a one-output head, or fix num_labels in "
            "its config.json."
        ) from err
    missing, unexpected = set(info["missing_keys"]), set(info["unexpected_keys"])
    _map_safe_rlhf_head(model, path, missing, unexpected, revision)
    if (safe_rlhf or "score_head.weight" in info["unexpected_keys"]) and not getattr(model.config, "do_normalize",
                                                                                      False):
        unexpected -= set(_SAFE_RLHF_STATS)
    if new_head:
        backbone = model.base_model_prefix + "."
        missing = {k for k in missing if k.startswith(backbone)}
        unexpected = {k for k in unexpected if k.startswith(backbone)}
    mismatched = [str(m) for m in info.get("mismatched_keys") or []]
    errors = [str(e) for e in info.get("error_msgs") or []]
    if missing or unexpected or mismatched or errors:
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint (they would be randomly initialised): {_names(missing)}")
        if unexpected:
            parts.append(f"in the checkpoint but not in the model (they would be ignored): {_names(unexpected)}")
        if mismatched:
            parts.append(f"with other shapes: {', '.join(mismatched)}")
        if errors:
            parts.append(f"errors: {'; '.join(errors)}")
        hint = ""
        if "score.weight" in missing and any(k.startswith("lm_head.") for k in unexpected):
            hint = (" It looks like a causal LM, not a score model: train one first (RewardModelModule or "
                    "CostModelModule, e.g. configs/eval/reward_model_tiny.yaml) and point at its export.")
        raise ScoreModelLoadError(
            f"{name_or_path} does not fit {type(model).__name__}; weights {'; weights '.join(parts)}.{hint} A score "
            "model must load every weight of its backbone and head: point at a sequence-classification (reward or "
            "cost) model saved with save_pretrained, or rename its weights to the names the model expects "
            f"(a Safe-RLHF {_SAFE_RLHF_HEAD}* head is mapped to {_HF_HEAD}* automatically)."
        )
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model


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
        from sacpo_lightning.data.tokenization import TokenizeConfig

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
        from sacpo_lightning.models import load_tokenizer, resolve_model_path

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
        from sacpo_lightning.data.sources import KTORecord
        from sacpo_lightning.data.tokenization import batch_tokenize_kto

        if len(prompts) != len(responses):
            raise ValueError(f"Got {len(prompts)} prompts but {len(responses)} responses")
        records = [KTORecord(prompt=p, completion=r, desirable=True, source="score")
                   for p, r in zip(prompts, responses, strict=True)]
        examples = batch_tokenize_kto(records, self.tokenizer, self.config)
        return [e["prompt_ids"] + e["completion_ids"] for e in examples]

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """One score per ``(prompt, response)``, in input order (batches are sorted by length internally).

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
        return scores


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


class ScoreModelModule(L.LightningModule):
    """Base of the score-model modules: a one-output sequence classifier on a causal LM backbone.

    Subclasses set ``kind`` and ``metric_names`` and implement :meth:`compute_loss`. Batches are preference pairs
    (:class:`sacpo_lightning.data.PreferenceDataModule`, ``kind: pairs``): rows ``0..B-1`` prompt + chosen, rows
    ``B..2B-1`` prompt + rejected, scored in one forward pass.

    Args:
        policy: The backbone (a causal LM folder or named model) and how to fine-tune it: ``full`` or ``lora`` (LoRA
            with ``task_type=SEQ_CLS``: the new score head is trained in full), or ``qlora``. The field is named
            ``policy`` so that the CLI takes the data tokenizer from ``policy.name_or_path``.
        optim: Optimizer and schedule.
        score_regularization: Weight of ``mean(score ** 2)``, which keeps scores near zero (Safe RLHF uses 0.001).
    """

    kind: ClassVar[str] = "score"
    metric_names: ClassVar[tuple[str, ...]] = ("loss", "accuracy")

    def __init__(
        self,
        policy: PolicySettings | None = None,
        optim: OptimSettings | None = None,
        score_regularization: float = 0.0,
    ) -> None:
        super().__init__()
        if not (math.isfinite(score_regularization) and score_regularization >= 0):
            raise ValueError(f"--model.score_regularization must be >= 0, got {score_regularization}")
        self.policy_settings = policy if policy is not None else PolicySettings()
        self.optim_settings = optim if optim is not None else OptimSettings()
        self.score_regularization = score_regularization
        self.save_hyperparameters(ignore=["policy", "optim"])
        self.hparams["policy"] = asdict(self.policy_settings)
        self.hparams["optim"] = asdict(self.optim_settings)
        self.model: torch.nn.Module | None = None
        self._tokenizer = None
        self.val_metrics = torch.nn.ModuleDict({n: MeanMetric() for n in self.metric_names})

    # ----------------------------------------------------------------------------------------------- model setup
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from sacpo_lightning.models import load_tokenizer

            s = self.policy_settings
            self._tokenizer = load_tokenizer(s.name_or_path, trust_remote_code=s.trust_remote_code,
                                             revision=s.revision, gguf_file=s.gguf_file)
        return self._tokenizer

    def _load_backbone(self, *, dtype: str, quantization_config=None, device_map=None):
        s = self.policy_settings
        return load_sequence_classifier(
            s.name_or_path,
            dtype=dtype,
            num_labels=1,
            pad_token_id=self.tokenizer.pad_token_id,
            trust_remote_code=s.trust_remote_code,
            revision=s.revision,
            gguf_file=s.gguf_file,
            attn_implementation=s.attn_implementation,
            quantization_config=quantization_config,
            device_map=device_map,
            new_head=True,  # from a causal LM the head is new; backbone weights must still all load
        )

    def configure_model(self) -> None:
        """Loads the classifier (and quantizes it / injects LoRA) once the device is known; idempotent."""
        if self.model is not None:
            return
        s = self.policy_settings
        quantization_config = device_map = None
        if s.finetune == "qlora":
            from sacpo_lightning.models.policy import bnb_4bit_config

            quantization_config = bnb_4bit_config(s)
            device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
            device_map = {"": device}
        model = self._load_backbone(dtype=s.dtype, quantization_config=quantization_config, device_map=device_map)
        model.config.use_cache = False
        if s.finetune != "full":
            from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

            if s.finetune == "qlora":
                model = prepare_model_for_kbit_training(
                    model, use_gradient_checkpointing=s.gradient_checkpointing,
                    gradient_checkpointing_kwargs={"use_reentrant": False},
                )
            config = LoraConfig(r=s.lora.r, lora_alpha=s.lora.alpha, lora_dropout=s.lora.dropout,
                                target_modules=s.lora.target_modules, bias="none", task_type="SEQ_CLS")
            model = get_peft_model(model, config)
            for p in model.parameters():
                if p.requires_grad and p.dtype != torch.float32:
                    p.data = p.data.float()
        if s.gradient_checkpointing and s.finetune != "qlora":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if s.finetune == "lora":
                model.enable_input_require_grads()
        self.model = model.train()

    def setup(self, stage: str) -> None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        kind = getattr(getattr(datamodule, "hparams", {}), "get", lambda *_: None)("kind")
        if kind is not None and kind != "pairs":
            raise ValueError(f"{type(self).__name__} trains on preference pairs but --data.kind is {kind!r}; "
                             "set data.kind: pairs.")

    # ------------------------------------------------------------------------------------------------- scoring
    def scores(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(N,) float32 scores of right-padded rows (the model pools at the last non-padding token)."""
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits[:, 0].float()

    def pair_scores(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(B,) chosen and (B,) rejected scores of a pair batch, from one forward pass over its 2B rows."""
        scores = self.scores(batch["input_ids"], batch["attention_mask"])
        b = scores.shape[0] // 2
        return scores[:b], scores[b:]

    def regularization(self, *scores: Tensor) -> Tensor:
        return self.score_regularization * torch.cat(scores).pow(2).mean()

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns the scalar loss and detached scalar metrics (names from ``metric_names``, without ``loss``)."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------------- steps
    @staticmethod
    def _batch_size(batch: dict[str, Tensor]) -> int:
        return int(batch["index"].shape[0])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, metrics = self.compute_loss(batch)
        size = self._batch_size(batch)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=size)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=size)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, metrics = self.compute_loss(batch)
        metrics = {"loss": loss.detach(), **metrics}
        for name in self.metric_names:
            if name in metrics:
                self.val_metrics[name].update(metrics[name], weight=self._batch_size(batch))

    def on_validation_epoch_end(self) -> None:
        values = {}
        for name in self.metric_names:
            metric = self.val_metrics[name]
            if metric.update_count > 0:
                values[f"val/{name}"] = metric.compute()
            metric.reset()
        if values:
            self.log_dict(values, prog_bar="val/accuracy" in values)

    @torch.no_grad()
    def evaluate_pairs(self, batches) -> dict[str, float]:
        """Pair-weighted means of the loss and metrics over ``batches`` (e.g. a validation dataloader)."""
        was_training = self.model.training
        self.model.eval()
        totals: dict[str, float] = {}
        count = 0
        try:
            for batch in batches:
                batch = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                loss, metrics = self.compute_loss(batch)
                size = self._batch_size(batch)
                for name, value in {"loss": loss, **metrics}.items():
                    totals[name] = totals.get(name, 0.0) + float(value) * size
                count += size
        finally:
            self.model.train(was_training)
        if not count:
            return {}
        return {**{name: total / count for name, total in totals.items()}, "pairs": count}

    # ------------------------------------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        trainable = (p for p in self.model.parameters() if p.requires_grad)
        return configure_optimization(trainable, self.optim_settings, self.trainer.estimated_stepping_batches)

    # -------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Adapter runs checkpoint only the trainable weights; the frozen base is reloaded from its source."""
        if self.policy_settings.uses_adapter:
            keep = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.strict_loading = not self.policy_settings.uses_adapter

    # ------------------------------------------------------------------------------------------------- export
    def _data_settings(self) -> dict[str, Any]:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        hp = getattr(datamodule, "hparams", None) or {}
        return {k: hp[k] for k in ("template", "max_length", "max_prompt_length", "source", "objective") if k in hp}

    def heldout_metrics(self) -> dict[str, float]:
        """Metrics of the current weights on the data module's validation pairs (empty without them)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or getattr(datamodule, "val_dataset", None) is None:
            return {}
        loader = datamodule.val_dataloader()
        return self.evaluate_pairs(loader) if loader else {}

    def score_metadata(self) -> dict[str, Any]:
        """What ``score_model.json`` records besides the data settings and held-out metrics."""
        return {"kind": self.kind, "base": self.policy_settings.name_or_path,
                "finetune": self.policy_settings.finetune, "score_regularization": self.score_regularization,
                "optim": asdict(self.optim_settings)}

    @torch.no_grad()
    def export_pretrained(self, output_dir: str, *, dtype: str | None = None, extra: dict | None = None) -> Path:
        """Writes a self-contained sequence-classification folder, atomically.

        Merged weights (safetensors; LoRA adapters are merged into a freshly loaded, unquantized backbone, and the
        adapter is kept under ``adapter/``), the tokenizer, and ``score_model.json`` with the kind (``reward`` or
        ``cost``), the data template and lengths (so :meth:`ScoreModel.from_pretrained` tokenizes as in training),
        and the held-out pair accuracy of the final weights.
        """
        settings = self.policy_settings
        dtype = dtype or settings.dtype
        heldout = self.heldout_metrics()
        with atomic_directory(output_dir) as tmp:
            if settings.uses_adapter:
                from peft import PeftModel

                adapter_dir = tmp / ADAPTER_DIR
                self.model.save_pretrained(adapter_dir, safe_serialization=True)
                base = self._load_backbone(dtype=dtype, device_map="cpu")
                merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
            else:
                merged = self.model
            if hasattr(merged.config, "quantization_config"):
                del merged.config.quantization_config
            merged.config.use_cache = True
            merged.config.pad_token_id = self.tokenizer.pad_token_id
            merged.config.dtype = dtype
            state = {k: v.detach().to("cpu", DTYPES[dtype]) for k, v in merged.state_dict().items()}
            merged.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            meta = {**self.score_metadata(), **self._data_settings(),
                    "heldout": heldout, "heldout_accuracy": heldout.get("accuracy"), **(extra or {})}
            atomic_write_json(tmp / SCORE_MODEL_FILE, meta)
        rank_zero_info(f"Exported {self.kind} model to {output_dir} (held-out accuracy {heldout.get('accuracy')})")
        return Path(output_dir)


class RewardModelModule(ScoreModelModule):
    """Reward (helpfulness) model: Bradley-Terry on pairs, ``-log sigmoid(r(x, y_chosen) - r(x, y_rejected))``.

    Logs ``train/loss``, ``train/accuracy`` (chosen scored higher), ``train/margin``, ``val/loss``, ``val/accuracy``.
    """

    kind: ClassVar[str] = "reward"
    metric_names: ClassVar[tuple[str, ...]] = ("loss", "accuracy", "margin")

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        chosen, rejected = self.pair_scores(batch)
        loss = bradley_terry_loss(chosen, rejected).mean() + self.regularization(chosen, rejected)
        margin = (chosen - rejected).detach()
        return loss, {"accuracy": (margin > 0).float().mean(), "margin": margin.mean(),
                      "chosen_score": chosen.detach().mean(), "rejected_score": rejected.detach().mean()}


class CostModelModule(ScoreModelModule):
    """Cost (harmfulness) model as in Safe RLHF: the unsafe response gets the higher cost, and ``sign(cost)`` says
    unsafe (+) or safe (-).

    Loss per pair (Dai et al., 2024, cost-model objective), with ``c_s`` the cost of the safer (chosen) and ``c_u``
    of the less safe (rejected) response::

        -log sigmoid(c_u - c_s) + w * (-log sigmoid(s_u * c_u) - log sigmoid(s_s * c_s))

    where the sign ``s`` is +1 for an unsafe and -1 for a safe response. Pair batches carry only chosen/rejected, so
    the per-response safety labels come from ``assume_chosen_safe``: for PKU-SafeRLHF safety pairs in which exactly one
    response is safe (the shared data; ``data.filter: safety_differs`` keeps only such rows elsewhere), the chosen
    (safer) response is the safe one and the rejected response the unsafe one. Batches that hold ``chosen_safe`` and
    ``rejected_safe`` (B,) bool tensors use those instead. Without either, only the Bradley-Terry term is used.

    Args:
        assume_chosen_safe: Label chosen responses safe and rejected ones unsafe for the classification term.
        classification_weight: ``w`` above (0 disables the classification term).
        policy, optim, score_regularization: See :class:`ScoreModelModule`.

    Logs ``train/loss``, ``train/accuracy`` (unsafe costs more), ``train/sign_accuracy`` (sign of the cost matches the
    label), and the same under ``val/``.
    """

    kind: ClassVar[str] = "cost"
    metric_names: ClassVar[tuple[str, ...]] = ("loss", "accuracy", "sign_accuracy", "margin")

    def __init__(
        self,
        policy: PolicySettings | None = None,
        optim: OptimSettings | None = None,
        score_regularization: float = 0.0,
        assume_chosen_safe: bool = True,
        classification_weight: float = 1.0,
    ) -> None:
        super().__init__(policy=policy, optim=optim, score_regularization=score_regularization)
        if not (math.isfinite(classification_weight) and classification_weight >= 0):
            raise ValueError(f"--model.classification_weight must be >= 0, got {classification_weight}")
        self.assume_chosen_safe = assume_chosen_safe
        self.classification_weight = classification_weight

    def _safety_labels(self, batch: dict[str, Tensor], b: int) -> tuple[Tensor, Tensor] | None:
        if "chosen_safe" in batch and "rejected_safe" in batch:
            return batch["chosen_safe"].bool(), batch["rejected_safe"].bool()
        if self.assume_chosen_safe:
            device = batch["input_ids"].device
            return torch.ones(b, dtype=torch.bool, device=device), torch.zeros(b, dtype=torch.bool, device=device)
        return None

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        safer, less_safe = self.pair_scores(batch)
        loss = bradley_terry_loss(less_safe, safer).mean() + self.regularization(safer, less_safe)
        margin = (less_safe - safer).detach()
        metrics = {"accuracy": (margin > 0).float().mean(), "margin": margin.mean(),
                   "safer_cost": safer.detach().mean(), "less_safe_cost": less_safe.detach().mean()}
        labels = self._safety_labels(batch, safer.shape[0])
        if labels is not None:
            safe_c, safe_r = labels
            costs = torch.cat([safer, less_safe])
            unsafe = torch.cat([~safe_c, ~safe_r])
            if self.classification_weight > 0:
                loss = loss + self.classification_weight * 2 * cost_sign_loss(costs, unsafe).mean()
            metrics["sign_accuracy"] = ((costs.detach() > 0) == unsafe).float().mean()
        return loss, metrics

    def score_metadata(self) -> dict[str, Any]:
        return {**super().score_metadata(), "assume_chosen_safe": self.assume_chosen_safe,
                "classification_weight": self.classification_weight}
